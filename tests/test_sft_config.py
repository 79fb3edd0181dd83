"""sft/sft_config.py: layered overrides, strict keys and types, invalid combinations, save/load."""
from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from core.cli import UserError, run_cli
from core.config import ConfigError
from sft.sft_config import PRESETS, SFTConfig, load_sft_run, parse_sft_config, save_sft_config


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


# --------------------------------------------------------------------------- overrides


@pytest.mark.parametrize("argv", [["--max_steps", "100"], ["--max_steps=100"]])
def test_cli_override_in_both_spellings(argv):
    assert parse_sft_config(argv).max_steps == 100
    assert parse_sft_config([]).max_steps == -1


def test_yaml_file_overrides_preset_and_cli_wins_over_file(tmp_path):
    config_file = _write(tmp_path / "run.yaml", "max_steps: 50\nlearning_rate: 1.0e-4\nper_device_train_batch_size: 2\n")
    config = parse_sft_config(["--config", config_file, "--max_steps", "100"], preset="mac")
    assert config.max_steps == 100  # CLI beats the file
    assert config.learning_rate == 1e-4  # the file beats the default
    assert config.per_device_train_batch_size == 2  # the file beats the preset's 4


def test_json_file_overrides_and_cli_wins(tmp_path):
    config_file = _write(tmp_path / "run.json", json.dumps({"lora_r": 8, "max_seq_length": 256, "train_on_inputs": True}))
    config = parse_sft_config(["--config", config_file, "--lora_r=4"])
    assert (config.lora_r, config.max_seq_length, config.train_on_inputs) == (4, 256, True)


def test_list_and_bool_flags():
    config = parse_sft_config(["--lora_target_modules", "q_proj,v_proj", "--report_to", "none", "--train_on_inputs"])
    assert config.lora_target_modules == ["q_proj", "v_proj"]
    assert config.report_to == []
    assert config.train_on_inputs is True
    assert parse_sft_config(["--group_by_length", "false"]).group_by_length is False


def test_optional_int_accepts_none():
    assert parse_sft_config(["--max_train_samples", "10"]).max_train_samples == 10
    assert parse_sft_config(["--save_total_limit", "none"]).save_total_limit is None


# --------------------------------------------------------------------------- rejection


@pytest.mark.parametrize("argv", [["--max_step", "5"], ["--no_such_key", "1"]])
def test_unknown_cli_key_is_rejected(argv):
    with pytest.raises(ConfigError, match="unknown config key"):
        parse_sft_config(argv)


def test_unknown_file_key_is_rejected(tmp_path):
    config_file = _write(tmp_path / "run.yaml", "max_stepz: 5\n")
    with pytest.raises(ConfigError, match="unknown config key 'max_stepz'"):
        parse_sft_config(["--config", config_file])


@pytest.mark.parametrize("argv, message", [
    (["--max_steps", "ten"], "--max_steps expects int"),
    (["--learning_rate", "fast"], "--learning_rate expects float"),
    (["--train_on_inputs", "maybe"], "--train_on_inputs expects bool"),
])
def test_wrong_cli_type_is_rejected(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_sft_config(argv)


@pytest.mark.parametrize("text, key", [("max_steps: '100'\n", "max_steps"), ("learning_rate: true\n", "learning_rate"),
                                       ("load_in_4bit: 1\n", "load_in_4bit")])
def test_wrong_file_type_is_rejected(tmp_path, text, key):
    with pytest.raises(ConfigError, match=f"config key '{key}' expects"):
        parse_sft_config(["--config", _write(tmp_path / "run.yaml", text)])


def test_choice_outside_the_list_is_rejected():
    with pytest.raises(ConfigError, match="precision"):
        parse_sft_config(["--precision", "fp8"])


@pytest.mark.parametrize("argv, message", [
    (["--lora_r", "0"], "lora_r must be > 0"),
    (["--lora_r", "-4"], "lora_r must be > 0"),
    (["--max_seq_length", "32"], "max_seq_length must be at least 64"),
    (["--max_steps", "0"], "max_steps must be -1"),
    (["--lora_dropout", "1.5"], "lora_dropout"),
    (["--resume", "--overwrite_output_dir"], "choose one of resume"),
    (["--template", "no_such_template"], "unknown prompt template"),
])
def test_invalid_combinations_are_rejected(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_sft_config(argv)


def test_errors_are_one_line_at_the_command_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda argv: parse_sft_config(argv), ["--lora_r", "0"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: lora_r must be > 0, got 0\n"


def test_config_file_that_is_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="must hold a mapping"):
        parse_sft_config(["--config", _write(tmp_path / "run.yaml", "- a\n- b\n")])


# --------------------------------------------------------------------------- presets, save/load


def test_presets_differ_where_the_hardware_does():
    mac, cuda = parse_sft_config([], preset="mac"), parse_sft_config([], preset="cuda")
    assert (mac.load_in_4bit, cuda.load_in_4bit) == (False, True)
    assert (mac.optim, cuda.optim) == ("adamw_torch", "paged_adamw_8bit")
    assert mac.gradient_checkpointing is False and cuda.gradient_checkpointing is True
    assert set(PRESETS) == {"mac", "cuda"}
    # Everything a preset does not set is shared.
    differing = {k for k in asdict(mac) if getattr(mac, k) != getattr(cuda, k)}
    assert differing and differing <= set(PRESETS["mac"]) | set(PRESETS["cuda"])


def test_length_grouping_is_on_by_default_for_training():
    assert SFTConfig().group_by_length is True
    assert parse_sft_config([], preset="cuda").group_by_length is True


def test_saved_config_round_trips(tmp_path):
    config = parse_sft_config(["--max_steps", "7", "--lora_target_modules", "q_proj,v_proj", "--save_total_limit", "none"],
                              preset="cuda")
    path = save_sft_config(config, tmp_path, preset="cuda", extra={"git_commit": "abc"})
    loaded, template, payload = load_sft_run(tmp_path)
    assert loaded == config
    assert template == config.prompt_template()
    assert payload["preset"] == "cuda" and payload["git_commit"] == "abc"
    assert path.name == "sft_config.json"


def test_saved_template_text_survives_a_template_change(tmp_path):
    custom = tmp_path / "mine.json"
    custom.write_text(json.dumps({"prompt_input": "I: {instruction} {input}\nR: ", "prompt_no_input": "I: {instruction}\nR: ",
                                  "response_split": "R:"}), encoding="utf-8")
    config = parse_sft_config(["--template", str(custom)])
    save_sft_config(config, tmp_path / "run")
    custom.write_text(json.dumps({"prompt_input": "changed", "prompt_no_input": "changed", "response_split": "x"}))
    _, template, _ = load_sft_run(tmp_path / "run")
    assert template.render("hi") == "I: hi\nR: "


def test_loading_a_dir_without_a_run_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="holds no sft_config.json"):
        load_sft_run(tmp_path)


def test_a_run_prints_its_config_in_a_few_lines_and_saves_every_key(tmp_path):
    config = parse_sft_config(["--max_steps", "7", "--logging_steps", "3", "--output_dir", str(tmp_path)], preset="mac")
    path = save_sft_config(config, tmp_path, preset="mac")
    printed = config.summary("mac", path)
    lines = printed.splitlines()
    assert len(lines) <= 8 and str(path) in lines[0]
    assert "max_steps=7" in printed and "logging_steps=3" in printed and "learning_rate=" in printed
    # the device preset's own values are defaults there: not listed as changes
    assert "precision=" not in printed and "gradient_checkpointing=" not in printed
    assert "changed from the defaults: logging_steps=3" in printed
    saved = json.loads(path.read_text())["config"]
    assert saved == asdict(config) and len(saved) > 3 * len(lines)  # the file has every key
    assert len(config.describe().splitlines()) == len(saved) + 1  # the full listing is still there
