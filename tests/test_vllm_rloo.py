"""RLOO with ``--engine vllm``: rollouts through the vllm engine, weights pushed each step, exact resume.

Skipped where vLLM is not installed or not usable here. The tiny Llama has head size 32 (vLLM's CPU
attention needs >= 32) and a large init range, so a few RL steps move it.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

import tiny_assets
from core.engines import vllm_unusable_reason
from rlhf import rloo_training, train_rloo_mac

REASON = vllm_unusable_reason("cpu")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(REASON is not None, reason=f"vLLM tests skipped: {REASON}")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, sp_tokenizer_dir):
    from test_rlhf_rloo import BAD

    from rlhf import train_reward_mac
    from sft.train_sft_mac import main as train_sft

    work = tmp_path_factory.mktemp("vllm_rloo")
    llama = tiny_assets.build_tiny_llama(work / "llama", sp_tokenizer_dir, hidden_size=64, heads=2, initializer_range=0.3)
    train = tiny_assets.write_jsonl(work / "data" / "sft_train.jsonl", tiny_assets.sft_rows(repeat=2))
    val = tiny_assets.write_jsonl(work / "data" / "sft_val.jsonl", tiny_assets.sft_rows(repeat=1)[:4])
    train_sft(["--model_name_or_path", str(llama), "--train_file", str(train), "--val_file", str(val),
               "--output_dir", str(work / "sft"), "--max_steps", "2", "--learning_rate", "1e-3",
               "--per_device_train_batch_size", "6", "--gradient_accumulation_steps", "1", "--lora_r", "4",
               "--lora_alpha", "8", "--report_to", "none", "--eval_steps", "100", "--save_steps", "100",
               "--precision", "fp32"])
    rows = tiny_assets.sft_rows(repeat=1)
    pairs = [{"instruction": r["instruction"], "input": r["input"], "chosen": r["output"], "rejected": BAD} for r in rows]
    prefs_train = tiny_assets.write_jsonl(work / "data" / "prefs_train.jsonl", pairs[:8])
    prefs_val = tiny_assets.write_jsonl(work / "data" / "prefs_val.jsonl", pairs[8:])
    train_reward_mac.main(["--sft_adapter_dir", str(work / "sft"), "--train_file", str(prefs_train), "--val_file",
                           str(prefs_val), "--output_dir", str(work / "reward"), "--max_steps", "4", "--learning_rate",
                           "1e-2", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1",
                           "--eval_steps", "4", "--save_steps", "4", "--report_to", "none", "--precision", "fp32"])
    return work


def _args(work: Path, out: Path, *extra: str) -> list[str]:
    return ["--sft_adapter_dir", str(work / "sft"), "--reward_model_dir", str(work / "reward"), "--output_dir", str(out),
            "--num_generations", "4", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8",
            "--gradient_accumulation_steps", "1", "--max_new_tokens", "8", "--learning_rate", "1e-2",
            "--monitor_prompts", "2", "--eval_steps", "1", "--save_steps", "2", "--report_to", "none",
            "--engine", "vllm", "--vllm_memory_share", "0.05", "--max_steps", "4", "--precision", "fp32", *extra]


def _rewards(run_dir: Path) -> list[float]:
    history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    return [entry["reward"] for entry in history if "reward" in entry]


def test_vllm_rollouts_train_and_resume_exactly(runs, capsys):
    from safetensors.torch import load_file

    class StopAt(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 2:
                control.should_training_stop = True  # as if killed right after the step-2 checkpoint

    straight, interrupted = runs / "rloo_straight", runs / "rloo_interrupted"
    train_rloo_mac.main(_args(runs, straight))
    assert "generation engine: vllm (asked for" in capsys.readouterr().out
    metrics = json.loads((straight / "metrics.json").read_text())
    assert metrics["generation"] == {"engine": "vllm", "weight_syncs": metrics["generation"]["weight_syncs"]}
    assert metrics["generation"]["weight_syncs"] >= 4  # the policy changed at every step: pushed each time
    assert json.loads((straight / "rloo_config.json").read_text())["generation"]["engine"] == "vllm"
    rloo_training.run_rloo(_args(runs, interrupted), preset="mac", plan_model=train_rloo_mac.plan_mac, prog="test",
                           description="", callbacks=[StopAt()])
    train_rloo_mac.main(_args(runs, interrupted, "--resume"))
    a, b = load_file(straight / "adapter_model.safetensors"), load_file(interrupted / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert _rewards(straight)[2:] == pytest.approx(_rewards(interrupted)[-2:])
    sft = load_file(runs / "sft" / "adapter_model.safetensors")
    assert any(not torch.allclose(a[k], sft[k]) for k in a if k in sft)  # RLOO moved the policy
