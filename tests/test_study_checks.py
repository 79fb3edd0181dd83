"""scripts/run_study.py checks every stage's flags and every input path before its first stage runs
(scripts/study_checks.py), and runs each stage with its flags merged (issue 27, items 4 and 5).

A failed check is one line naming the flag and the stage, raised before anything is written: no
stage runs (the recorder of tests/test_run_study.py sees none) and the study folder is not created.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from core.cli import UserError
from scripts import run_study
from scripts.study_presets import merge_flags
from test_run_study import recorder, study_argv, study_inputs  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("extra, message", [
    (["--dpo_args", "--betta 0.2"], r"^--dpo_args \(stage dpo\): unknown config key\(s\): --betta \(did you mean --beta\?\)$"),
    (["--sft_args", "--max_steps x"], r"^--sft_args \(stage sft\): --max_steps expects int, got 'x'$"),
    (["--eval_args", "--num_exmples 3"], r"^--eval_args \(stage eval_sft\): unknown config key\(s\): --num_exmples"),
    (["--pairs_args", "--num_pairs 0"], r"^--pairs_args \(stage dpo_pairs\): --num_pairs must be > 0, got 0$"),
    (["--dpo_args", '--beta "0.2'], r"^--dpo_args: No closing quotation$"),
    (["--reward_args", "--beta 0.1"], r"^--reward_args \(stage reward_if_s0\): unknown config key\(s\): --beta$"),
    (["--ifbench_limit", "5"], r"^--ifbench_limit: no stage scores ifbench"),
])
def test_a_bad_stage_flag_fails_in_one_line_before_any_stage_runs(study_inputs, tmp_path, recorder, extra, message):
    study = tmp_path / "study"
    with pytest.raises(UserError, match=message):
        run_study.main(study_argv(study_inputs, study, *extra))
    assert recorder.ran == [] and not study.exists()


def test_extra_args_for_a_stage_the_preset_does_not_run_are_an_error_not_ignored(study_inputs, tmp_path, recorder):
    study = tmp_path / "study"
    with pytest.raises(UserError, match=r"^--rlvr_args: this preset has no rlvr stage"):
        run_study.main(["--preset", "small", *study_argv(study_inputs, study, "--rlvr_args", "--max_steps 2")[1:]])
    assert recorder.ran == [] and not study.exists()


def test_every_stage_of_the_small_preset_is_parsed_by_its_own_parser(study_inputs, tmp_path, recorder):
    small = [a for a in study_argv(study_inputs, tmp_path / "study") if a != "--quick"] + ["--preset", "small",
                                                                                          "--ifbench_data", "none"]
    # per_device_train_batch_size 3 x gradient_accumulation_steps 1 is no multiple of RLOO's 4 generations
    with pytest.raises(UserError, match=r"^--rloo_args \(stage rloo\): per_device_train_batch_size x "):
        run_study.main(small + ["--rloo_args", "--per_device_train_batch_size 3"])
    with pytest.raises(UserError, match=r"^--reward_args \(stage reward\): unknown config key\(s\): --bta"):
        run_study.main(small + ["--reward_args", "--bta 1"])
    assert recorder.ran == []


def test_a_wrong_input_path_fails_in_one_line_before_any_stage_runs(study_inputs, tmp_path, recorder):
    study, argv = tmp_path / "study", study_argv(study_inputs, tmp_path / "study")

    def fails(message: str, *replace: str):
        changed = list(argv)
        for flag, value in zip(replace[::2], replace[1::2]):
            if flag in changed:
                changed[changed.index(flag) + 1] = value
            else:
                changed += [flag, value]
        with pytest.raises(UserError, match=message):
            run_study.main(changed)

    fails(r"^--model_name_or_path: model path not found: .*no_model$", "--model_name_or_path", str(tmp_path / "no_model"))
    not_a_model = tmp_path / "empty_dir"
    not_a_model.mkdir()
    fails(r"^--model_name_or_path: .*empty_dir holds no config\.json", "--model_name_or_path", str(not_a_model))
    fails(r"^--model_name_or_path: GGUF file not found", "--model_name_or_path", str(tmp_path / "base.gguf"))
    fails(r"^--model_name_or_path: nobody/not-cached is not a local path and not in the hub cache",
          "--model_name_or_path", "nobody/not-cached")
    fails(r"^--sft_args \(stage sft\) --tokenizer_name_or_path: model path not found",
          "--sft_args", f"--tokenizer_name_or_path {tmp_path / 'no_tokenizer'}")
    fails(r"^--raw_dir/--sources: missing raw data in .*no_raw: alpaca_data\.json .*without --offline",
          "--raw_dir", str(tmp_path / "no_raw"))
    fails(r"^--raw_dir/--sources: .*other\.json is missing and has no known download source", "--sources", "other.json")
    fails(r"^--pairs_file: .*pairs\.jsonl: file not found", "--pairs_file", str(tmp_path / "pairs.jsonl"))
    fails(r"ifeval data .*missing\.jsonl", "--ifeval_data", str(tmp_path / "missing.jsonl"))
    assert recorder.ran == [] and not study.exists()


def test_a_gguf_file_or_a_cached_hub_id_passes_the_model_check(tmp_path, monkeypatch):
    from core.model_source import check_model_source

    (tmp_path / "base.gguf").write_bytes(b"GGUF")
    check_model_source(str(tmp_path / "base.gguf"), offline=True)
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name: f"/cache/{repo}/{name}")
    check_model_source("some/hub-model", offline=True)
    # online: the hub is asked whether it has the model (a misspelled name fails before prepare, not after it)
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_exists", lambda self, repo: repo == "some/hub-model")
    check_model_source("some/hub-model", offline=False)
    with pytest.raises(UserError, match="some/hub-modle is not a local path and no model of that name is on the hub"):
        check_model_source("some/hub-modle", offline=False)

    def unreachable(self, repo):
        raise ConnectionError("no route")

    monkeypatch.setattr(huggingface_hub.HfApi, "repo_exists", unreachable)
    check_model_source("some/hub-modle", offline=False)  # unanswerable: the stage that downloads it says why


def test_the_checks_load_no_torch_and_answer_at_once(study_inputs, tmp_path):
    """run_study's checks import each stage's parser, not the stage: a typo costs no torch import."""
    argv = study_argv(study_inputs, tmp_path / "study", "--dpo_args", "--betta 0.2")
    probe = ("import json, sys\nfrom core.cli import UserError\nfrom scripts import run_study\n"
             f"try:\n    run_study.main({argv!r})\nexcept UserError as exc:\n    print(exc)\n"
             "print(json.dumps([m for m in ('torch', 'transformers', 'peft', 'trl') if m in sys.modules]))\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    said, heavy = done.stdout.strip().splitlines()[-2:]
    assert said.startswith("--dpo_args (stage dpo): unknown config key(s): --betta") and json.loads(heavy) == []


# --------------------------------------------------------------------------- merged commands


def test_merge_flags_keeps_each_flag_once_with_its_last_value_in_its_first_place():
    assert merge_flags(["--max_steps", "150", "--report_to", "none", "--lr", "1", "--max_steps", "4"]) == [
        "--max_steps", "4", "--report_to", "none", "--lr", "1"]
    assert merge_flags(["--adapter_dir", "sft", "dpo", "--adapter_dir=x"]) == ["--adapter_dir=x"]
    assert merge_flags(["--resume", "--seed", "1", "--resume"]) == ["--resume", "--seed", "1"]
    assert merge_flags(["--system_prompt", "--be brief", "--seed", "2"]) == ["--system_prompt", "--be brief", "--seed", "2"]


def test_a_users_flag_replaces_the_presets_and_each_command_names_every_flag_once(study_inputs, tmp_path, recorder):
    study = tmp_path / "study"
    assert run_study.main(study_argv(study_inputs, study, "--sft_args", "--max_steps 4 --seed 7",
                                     "--eval_args", "--max_new_tokens 32")) == 0
    commands = {name: info["command"] for name, info in json.loads((study / run_study.STUDY_FILE).read_text())["stages"].items()}
    for command in commands.values():
        flags = [w for w in command if w.startswith("--")]
        assert len(flags) == len(set(flags)), command
    sft = commands["sft"]
    assert sft[sft.index("--max_steps") + 1] == "4" and sft[sft.index("--seed") + 1] == "7"
    for stage in ("eval_sft", "report"):  # --eval_args reach both evaluation stages
        assert commands[stage][commands[stage].index("--max_new_tokens") + 1] == "32"
    assert json.loads((study / run_study.STUDY_FILE).read_text())["seeds"]["sft"] == "7"


def test_a_study_recorded_with_repeated_flags_still_resumes(study_inputs, tmp_path, recorder):
    study, argv = tmp_path / "study", study_argv(study_inputs, tmp_path / "study")
    assert run_study.main(argv) == 0
    record = json.loads((study / run_study.STUDY_FILE).read_text())
    record["stages"]["sft"]["command"] += ["--max_steps", record["stages"]["sft"]["command"][
        record["stages"]["sft"]["command"].index("--max_steps") + 1]]  # as an earlier version recorded it
    (study / run_study.STUDY_FILE).write_text(json.dumps(record))
    recorder.ran.clear()
    assert run_study.main(argv + ["--resume"]) == 0 and recorder.ran == []


def test_the_printed_command_is_the_one_that_runs(tmp_path, capfd):
    (tmp_path / "echo_argv.py").write_text("import json, sys\nprint('ARGV', json.dumps(sys.argv[1:]))\n")
    stage = run_study.Stage("echo", ["echo_argv", "--max_steps", "4", "--note", "two words"], tmp_path / "done")
    run_study.run_stage(stage, tmp_path, {**run_study.stage_env(False, {}), "PYTHONPATH": str(tmp_path)})
    printed = capfd.readouterr().out
    shown = printed.split(": python -m ", 1)[1].splitlines()[0]
    ran = json.loads(printed.split("ARGV ", 1)[1].splitlines()[0])
    import shlex

    assert shlex.split(shown) == ["echo_argv", *ran] == stage.command


# --------------------------------------------------------------------------- --ifeval_limit and the help


def test_ifeval_limit_reaches_the_stage_that_scores_ifeval_over_the_presets(study_inputs, tmp_path, recorder):
    study = tmp_path / "study"
    assert run_study.main(study_argv(study_inputs, study, "--ifeval_limit", "7")) == 0
    commands = {name: info["command"] for name, info in json.loads((study / run_study.STUDY_FILE).read_text())["stages"].items()}
    scoring = [name for name, command in commands.items() if "--ifeval" in command]
    assert scoring == ["report"]
    assert [commands["report"][i + 1] for i, w in enumerate(commands["report"]) if w == "--ifeval_limit"] == ["7"]
    with pytest.raises(UserError, match=r"^--ifeval_limit: no stage scores ifeval"):
        run_study.main(study_argv(study_inputs, tmp_path / "other", "--ifeval_limit", "7", "--ifeval_data", "none"))


def test_the_help_says_which_stages_eval_args_reach_and_that_a_gguf_file_is_a_model(capsys):
    with pytest.raises(SystemExit):
        run_study.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--eval_args FLAGS extra flags (one quoted string) for the stages eval_sft" in text and "and report (" in text
    assert "--ifeval_limit N" in text and ".gguf" in text


@pytest.mark.parametrize("config, field", [("sft.sft_config:SFTConfig", "model_name_or_path"),
                                           ("dpo.dpo_config:DPOConfig", "model_name_or_path"),
                                           ("rlhf.reward_config:RewardConfig", "model_name_or_path"),
                                           ("evaluation.config:EvalConfig", "base_model")])
def test_every_model_flag_says_a_gguf_file_works(config, field):
    import dataclasses
    import importlib

    from core.model_source import MODEL_SOURCE_HELP

    module, name = config.split(":")
    fields = {f.name: f for f in dataclasses.fields(getattr(importlib.import_module(module), name))}
    assert MODEL_SOURCE_HELP in fields[field].metadata["help"] and ".gguf" in MODEL_SOURCE_HELP
