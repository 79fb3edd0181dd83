"""A newcomer's first hour (issue 14): each dead end seen on a clean clone, as a test.

Every test drives the entry points a user runs (``sft.train_sft_mac``, ``scripts/prepare_dpo_data.py``,
``sft.eval_sft``'s pair choice) on the tiny Llama. The DPO-from-``--train_eos_embedding`` dead end
is in tests/test_eos_embedding.py.
"""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch
from transformers import Trainer

import tiny_assets
from core.cli import UserError, run_cli
from scripts import prepare_dpo_data
from sft import train_sft_mac


def sft_argv(model_dir, data, out: Path, **overrides) -> list[str]:
    keys = {"model_name_or_path": model_dir, "train_file": data[0], "val_file": data[1], "output_dir": out,
            "max_steps": 4, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "learning_rate": 1e-2,
            "warmup_ratio": 0.0, "lora_r": 4, "logging_steps": 1, "eval_steps": 2, "save_steps": 2, "report_to": "none",
            "precision": "fp32"}
    keys.update(overrides)
    return [f"--{k}={v}" for k, v in keys.items()]


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "adapter_model.safetensors"))


# --------------------------------------------------------------------------- 1. a failed start


@pytest.mark.slow
def test_a_run_that_failed_before_training_does_not_block_the_corrected_rerun(tmp_path, tiny_llama_dir, sft_data):
    out = tmp_path / "out"
    with pytest.raises(UserError):  # a wrong local path: refused before anything is written
        train_sft_mac.main(sft_argv(tmp_path / "no_such_model", sft_data, out))
    assert not (out / "sft_config.json").exists()
    with pytest.raises(Exception):  # a hub id that cannot be fetched offline: fails after sft_config.json is written
        train_sft_mac.main(sft_argv("no-such-org/no-such-model", sft_data, out))
    assert (out / "sft_config.json").is_file()
    train_sft_mac.main(sft_argv(tiny_llama_dir, sft_data, out, max_steps=1))  # the corrected rerun, no flag needed
    assert (out / "adapter_model.safetensors").is_file()


# --------------------------------------------------------------------------- 4. extending a finished run


@pytest.mark.slow
def test_a_finished_run_continues_to_more_steps_with_resume(tmp_path, tiny_llama_dir, sft_data):
    out = tmp_path / "out"
    train_sft_mac.main(sft_argv(tiny_llama_dir, sft_data, out, max_steps=4))
    first = _adapter(out)
    train_sft_mac.main(sft_argv(tiny_llama_dir, sft_data, out, max_steps=6, resume=True))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 6 and metrics["resumed_from"] == "checkpoint-4"
    assert any(not torch.equal(first[k], v) for k, v in _adapter(out).items())  # the two extra steps trained
    state = json.loads((out / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "loss" in e][-2:] == [5, 6]


# --------------------------------------------------------------------------- 5. Ctrl-C


@pytest.mark.slow
def test_ctrl_c_names_the_complete_checkpoint_and_the_command_that_continues(tmp_path, tiny_llama_dir, sft_data,
                                                                            monkeypatch, capsys):
    out = tmp_path / "out"
    argv = sft_argv(tiny_llama_dir, sft_data, out, max_steps=6)
    real_step, calls = Trainer.training_step, []

    def interrupted_step(self, *args, **kwargs):  # Ctrl-C during the 4th step (checkpoint-2 is complete)
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", interrupted_step)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train_sft_mac.main, argv)
    assert exit_info.value.code == 130
    err = capsys.readouterr().err.strip().splitlines()[-2:]  # after the progress bars
    assert err[0].startswith("interrupted: ") and "checkpoint-2 is complete" in err[0]
    command = shlex.split(err[-1])
    assert command[:3] == ["python", "-m", "sft.train_sft_mac"] and command[-1] == "--resume"

    monkeypatch.setattr(Trainer, "training_step", real_step)
    train_sft_mac.main(command[3:])  # the printed command, as the user would paste it
    assert json.loads((out / "metrics.json").read_text())["resumed_from"] == "checkpoint-2"


# --------------------------------------------------------------------------- 3. pairs of two origins


def _pairs_file(path: Path, answer: str) -> Path:
    rows = [{"instruction": f"Question {i}?", "chosen": f"Answer {i}.", "rejected": answer} for i in range(12)]
    return tiny_assets.write_jsonl(path, rows)


def test_pairs_of_another_source_are_not_replaced_unasked(tmp_path):
    out = tmp_path / "processed"
    first, second = _pairs_file(tmp_path / "a.jsonl", "No."), _pairs_file(tmp_path / "b.jsonl", "Never.")
    prepare_dpo_data.main(["--from_file", str(first), "--out_dir", str(out)])
    before = (out / "prefs_train.jsonl").read_bytes()
    prepare_dpo_data.main(["--from_file", str(first), "--out_dir", str(out)])  # the same source again: fine
    with pytest.raises(UserError, match=r"already holds preference pairs from pairs file a\.jsonl.*--overwrite"):
        prepare_dpo_data.main(["--from_file", str(second), "--out_dir", str(out)])
    assert (out / "prefs_train.jsonl").read_bytes() == before
    prepare_dpo_data.main(["--from_file", str(second), "--out_dir", str(out), "--overwrite"])
    assert json.loads((out / "prefs_stats.json").read_text())["from_file"] == "b.jsonl"


def test_eval_scores_default_pairs_only_when_they_belong_to_the_evaluated_model(tmp_path, monkeypatch, capsys):
    from evaluation.models import AdapterSpec, BaseModelSpec
    from evaluation.preference import resolve_prefs_file

    monkeypatch.chdir(tmp_path)
    processed = tmp_path / "data" / "processed"
    tiny_assets.write_jsonl(processed / "prefs_val.jsonl", [{"instruction": "p", "input": "", "chosen": "a", "rejected": "b"}])
    stats = {"sft_model": "models/stories_sft", "base_model": "stories260K", "format": None}
    (processed / "prefs_stats.json").write_text(json.dumps(stats))
    specs = [BaseModelSpec(label="base", settings=None, model_name_or_path="SmolLM2-135M"),
             AdapterSpec(label="sft", settings=None, adapter_dir="models/smol_sft")]
    assert resolve_prefs_file("auto", specs) is None  # another model's pairs: skipped, and said why
    assert "sampled from the SFT run models/stories_sft" in capsys.readouterr().out
    assert resolve_prefs_file("data/processed/prefs_val.jsonl", specs) is not None  # asked for: used
    same_base = [BaseModelSpec(label="base", settings=None, model_name_or_path="stories260K"), specs[1]]
    assert resolve_prefs_file("auto", same_base) == Path("data/processed/prefs_val.jsonl")
    (processed / "prefs_stats.json").unlink()  # pairs of unknown origin are not scored unasked either
    assert resolve_prefs_file("auto", same_base) is None


# --------------------------------------------------------------------------- 6. HH-RLHF without --format


def test_hh_rlhf_file_without_format_says_which_flag_reads_it(tmp_path):
    turns = lambda q, a: f"\n\nHuman: {q}\n\nAssistant: {a}"  # noqa: E731
    rows = [{"chosen": turns(f"Q{i}?", "Yes."), "rejected": turns(f"Q{i}?", "No.")} for i in range(5)]
    source = tiny_assets.write_jsonl(tmp_path / "hh.jsonl", rows)
    with pytest.raises(UserError, match=r"missing_field 5\).*5 rows are Anthropic HH-RLHF dialogues.*--format hh-rlhf"):
        prepare_dpo_data.main(["--from_file", str(source), "--out_dir", str(tmp_path / "out")])
    prepare_dpo_data.main(["--from_file", str(source), "--format", "hh-rlhf", "--out_dir", str(tmp_path / "out")])


# --------------------------------------------------------------------------- 7. threads on a busy CPU
# (tests/test_threads.py)


def test_the_data_script_does_not_import_torch():
    """Preparing data needs no torch; importing it (~2 s) would be most of the script's run time."""
    import subprocess
    import sys

    code = ("import runpy, sys\nsys.argv = ['prepare_sft_data', '--help']\ntry:\n"
            "    runpy.run_module('scripts.prepare_sft_data', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('torch imported:', 'torch' in sys.modules)")
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo, check=True).stdout
    assert out.strip().endswith("torch imported: False")


# --------------------------------------------------------------------------- 11. readable log lines


def test_trainer_log_lines_are_readable_and_say_which_tokens_per_second_includes_evaluation():
    from core.log import log_line

    line = log_line(10, 100, {"loss": 3.5812, "grad_norm": 0.52, "learning_rate": 2e-4, "epoch": 0.034,
                              "train_runtime": 37.4, "num_input_tokens_seen": 48826, "tokens_per_second": 1305.2})
    assert line == ("step 10/100 (epoch 0.03): loss 3.581, grad_norm 0.52, lr 2.00e-04, tokens seen 48,826, "
                    "tokens/s (wall clock, incl. evaluation) 1305")
    assert log_line(10, 100, {"eval_loss": 3.2, "eval_runtime": 1.2, "eval_tokens": 5000}) == "step 10/100 held-out: loss 3.2, tokens 5,000"
