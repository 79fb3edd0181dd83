"""``--resume --max_steps N`` on a finished run: the schedule is re-planned over N steps, said in one line,
from the very first new step, and the extension stays exactly resumable (core/schedule.py)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from sft.train_sft_mac import main as mac_main, plan_mac
from sft.training import run_sft
from test_training import train_argv

LINEAR = dict(lr_scheduler_type="linear", learning_rate=1e-3, warmup_ratio=0.0, save_steps=2, eval_steps=100,
              save_total_limit="none")


def _rates(run: Path) -> dict[int, float]:
    history = json.loads((run / "trainer_state.json").read_text())["log_history"]
    return {e["step"]: e["learning_rate"] for e in history if "learning_rate" in e}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_llama_dir) -> tuple[Path, tuple[Path, Path]]:
    """An 8-step run with a linear decay: its last step trains at 1e-3 / 8, its checkpoint ends at 0."""
    import tiny_assets

    root = tmp_path_factory.mktemp("extend")
    data = (tiny_assets.write_jsonl(root / "train.jsonl", tiny_assets.sft_rows(repeat=2)),
            tiny_assets.write_jsonl(root / "val.jsonl", tiny_assets.sft_rows(repeat=1)[:4]))
    mac_main(train_argv(tiny_llama_dir, data, root / "run", max_steps=8, **LINEAR))
    return root / "run", data


def test_extending_a_finished_run_replans_the_schedule_and_says_so(finished_run, tiny_llama_dir, tmp_path, capsys):
    done, data = finished_run
    run = tmp_path / "run"
    shutil.copytree(done, run)
    capsys.readouterr()
    mac_main(train_argv(tiny_llama_dir, data, run, max_steps=12, **LINEAR) + ["--resume"])
    out = capsys.readouterr().out
    assert ("note: extending a run planned for 8 steps to 12: its linear schedule (peak 1.00e-03) is re-planned over "
            "12 steps, so steps 9-12 train at 3.33e-04 -> 8.33e-05 (33% of the peak at first)") in out
    rates = _rates(run)
    # As if planned for 12 steps from the start: step k+1 trains at 1e-3 * (12 - k) / 12, the first new step too
    # (it trained at the checkpoint's 0 before).
    assert [rates[step] for step in (9, 10, 11, 12)] == pytest.approx([1e-3 * (12 - k) / 12 for k in (8, 9, 10, 11)])
    assert rates[8] == pytest.approx(1e-3 / 8)  # the first 8 steps are the original run's


def test_a_resume_with_the_same_plan_says_nothing(finished_run, tiny_llama_dir, tmp_path, capsys):
    done, data = finished_run
    run = tmp_path / "run"
    shutil.copytree(done, run)
    shutil.rmtree(run / "checkpoint-8")  # killed after step 6's checkpoint
    capsys.readouterr()
    mac_main(train_argv(tiny_llama_dir, data, run, max_steps=8, **LINEAR) + ["--resume"])
    assert "re-planned" not in capsys.readouterr().out
    assert _rates(run)[7] == pytest.approx(1e-3 * 2 / 8)


@pytest.mark.slow
def test_an_extension_interrupted_and_resumed_ends_like_an_uninterrupted_one(finished_run, tiny_llama_dir, tmp_path):
    class StopAt10(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 10:
                control.should_training_stop = True  # as if killed right after the step-10 checkpoint

    done, data = finished_run
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    shutil.copytree(done, straight)
    shutil.copytree(done, interrupted)
    argv = train_argv(tiny_llama_dir, data, straight, max_steps=12, **LINEAR) + ["--resume"]
    mac_main(argv)
    argv = train_argv(tiny_llama_dir, data, interrupted, max_steps=12, **LINEAR) + ["--resume"]
    run_sft(argv, preset="mac", plan_model=plan_mac, prog="test", description="", callbacks=[StopAt10()])
    assert json.loads((interrupted / "metrics.json").read_text())["global_step"] == 10
    mac_main(argv)
    expected, actual = load_file(straight / "adapter_model.safetensors"), load_file(interrupted / "adapter_model.safetensors")
    assert expected.keys() == actual.keys()
    assert all(torch.allclose(expected[k], actual[k], rtol=1e-5, atol=1e-6) for k in expected)
    assert _rates(interrupted) == pytest.approx(_rates(straight))


WARMUP = dict(lr_scheduler_type="cosine", learning_rate=1e-3, warmup_ratio=0.5, max_steps=4, save_steps=2, eval_steps=100,
              save_total_limit="none")


def test_the_first_step_trains_above_zero_and_a_resume_keeps_the_warmed_schedule(finished_run, tiny_llama_dir, tmp_path):
    """4 steps, 2 of warm-up: Hugging Face's warm-up trained step 1 at lr 0; here (k+1)/(W+1) of the peak, then
    the cosine decay as before. Killed after step 2's checkpoint and resumed, the run ends as an uninterrupted one."""
    _, data = finished_run
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    mac_main(train_argv(tiny_llama_dir, data, straight, **WARMUP))
    rates = _rates(straight)
    assert [rates[step] for step in (1, 2, 3, 4)] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3 * 0.5])
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoint-4")
    mac_main(train_argv(tiny_llama_dir, data, resumed, **WARMUP) + ["--resume"])
    assert _rates(resumed) == pytest.approx(rates)
    expected, actual = load_file(straight / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    assert all(torch.allclose(expected[k], actual[k], rtol=1e-5, atol=1e-6) for k in expected)


def test_the_warmup_factor_starts_above_zero_meets_the_peak_and_leaves_the_rest():
    from transformers import get_cosine_schedule_with_warmup, get_constant_schedule

    from core.schedule import warm_from_first_step

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    cosine = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=3, num_training_steps=10).lr_lambdas[0]
    warmed = warm_from_first_step(cosine, 3)
    assert cosine(0) == 0 and [warmed(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert [warmed(s) for s in range(3, 10)] == [cosine(s) for s in range(3, 10)]
    assert get_constant_schedule(optimizer).lr_lambdas[0](0) == 1  # not warmed from 0: the callback leaves it
