"""Reward model on a tiny Llama: learns a toy preference, loads with stock HF/PEFT calls, one-line errors.

Real code paths only: TRL's RewardTrainer through ``rlhf.train_reward_mac``, models loaded with
``from_pretrained`` from temp dirs.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import tiny_assets
from core.prompting import load_template, prompt_format
from core.cli import UserError
from core.pairs import encode_pairs, read_pairs
from rlhf import train_reward_mac

BAD_ANSWERS = ["no no no no no no no no", "bad bad bad bad"]  # a pattern a reward model can learn to rank last


def write_pairs(path: Path, rows: list[dict]) -> Path:
    return tiny_assets.write_jsonl(path, [{"instruction": r["instruction"], "input": r["input"], "chosen": r["output"], "rejected": bad}
                                          for r in rows for bad in BAD_ANSWERS])


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory) -> tuple[Path, Path]:
    data = tmp_path_factory.mktemp("reward_pairs")
    rows = tiny_assets.sft_rows(repeat=1)
    return write_pairs(data / "prefs_train.jsonl", rows[:8]), write_pairs(data / "prefs_val.jsonl", rows[8:])


def reward_args(pair_files, out: Path, *extra: str) -> list[str]:
    train, val = pair_files
    return ["--train_file", str(train), "--val_file", str(val), "--output_dir", str(out), "--learning_rate", "1e-2",
            "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "3", "--gradient_accumulation_steps", "1",
            "--lora_r", "4", "--lora_alpha", "8", "--logging_steps", "2", "--eval_steps", "4", "--save_steps", "4",
            "--report_to", "none", "--precision", "fp32", *extra]


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory, tiny_llama_dir, pair_files) -> Path:
    out = tmp_path_factory.mktemp("reward") / "reward_output"
    train_reward_mac.main(reward_args(pair_files, out, "--init", "base", "--sft_adapter_dir", str(out.parent / "no_sft"),
                                      "--model_name_or_path", str(tiny_llama_dir), "--max_steps", "8"))
    return out


def stock_scores(run_dir: Path, base: Path, val_file: Path) -> tuple[list[float], list[float]]:
    """Scores of the held-out pairs through the model card's stock HF/PEFT loading."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    model = PeftModel.from_pretrained(model, run_dir).eval()
    features = encode_pairs(read_pairs(val_file), prompt_format(load_template("alpaca"), tokenizer), 512).features
    with torch.no_grad():
        score = lambda ids: model(input_ids=torch.tensor([ids])).logits[0, 0].item()  # noqa: E731
        return ([score(f["prompt_ids"] + f["chosen_ids"]) for f in features],
                [score(f["prompt_ids"] + f["rejected_ids"]) for f in features])


@pytest.mark.slow
def test_reward_model_learns_a_toy_preference_and_loads_with_stock_calls(reward_run, tiny_llama_dir, pair_files):
    metrics = json.loads((reward_run / "metrics.json").read_text())
    history = json.loads((reward_run / "trainer_state.json").read_text())["log_history"]
    assert [e["step"] for e in history if "eval_accuracy" in e][0] == 0  # measured before the first step
    assert metrics["val_accuracy_after"] >= 0.75  # above chance on prompts never trained on
    assert metrics["val_margin_after"] > metrics["val_margin_before"] + 0.1
    assert metrics["val_loss_after"] < metrics["val_loss_before"]
    chosen, rejected = stock_scores(reward_run, tiny_llama_dir, pair_files[1])
    accuracy = sum(c > r for c, r in zip(chosen, rejected)) / len(chosen)
    margin = sum(c - r for c, r in zip(chosen, rejected)) / len(chosen)
    assert accuracy == pytest.approx(metrics["val_accuracy_after"])  # exact over all 8 pairs, eval batches of 3
    assert margin == pytest.approx(metrics["val_margin_after"], abs=1e-4)
    config = json.loads((reward_run / "reward_config.json").read_text())
    assert config["stage"] == "reward" and config["template"]["name"] == "alpaca"
    for name in ("accuracy_curves.png", "loss_curve.png", "README.md", "adapter_model.safetensors"):
        assert (reward_run / name).is_file()
    assert "AutoModelForSequenceClassification" in (reward_run / "README.md").read_text()


def test_missing_sft_run_and_empty_pairs_are_one_line_errors(tmp_path, pair_files, tiny_llama_dir):
    with pytest.raises(UserError, match="needs a finished SFT run") as error:
        train_reward_mac.main(reward_args(pair_files, tmp_path / "out", "--sft_adapter_dir", str(tmp_path / "no_sft")))
    assert "\n" not in str(error.value)
    empty = tiny_assets.write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(UserError, match="holds no pairs"):
        train_reward_mac.main(reward_args((empty, pair_files[1]), tmp_path / "out", "--init", "base",
                                          "--sft_adapter_dir", str(tmp_path / "no_sft"), "--model_name_or_path", str(tiny_llama_dir)))
    assert not (tmp_path / "out").exists()
