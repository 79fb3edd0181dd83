"""DPO's reference log-probs computed once per pair (dpo/reference_cache.py): same numbers, fewer forwards.

The unit tests drive the cache with a stand-in trainer; the end-to-end ones run real DPO on the tiny
Llama with and without the cache (``--reference_cache``) and compare every logged number.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

import tiny_assets
from dpo import train_dpo_mac
from dpo.reference_cache import CACHE_FILENAME, ReferenceCache, pair_keys
from dpo.training import run_dpo


def collated(pairs: list[tuple[list[int], list[int], list[int]]], pad_to: int) -> dict:
    """A DPO batch as TRL's collator makes it: chosen rows then rejected rows, right-padded to ``pad_to``."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    batch = DataCollatorForPreference(pad_token_id=0)(
        [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in pairs])
    grow = pad_to - batch["input_ids"].shape[1]
    return {name: torch.nn.functional.pad(tensor, (0, grow)) for name, tensor in batch.items()}


PAIR_A = ([5, 6, 7], [8, 9], [10])
PAIR_B = ([5, 6], [7, 8, 9], [10])  # the same tokens as PAIR_A's chosen side, another prompt/answer split


class CountingTrainer:
    """Stands in for the DPOTrainer: its reference forward returns numbers made from the batch, and is counted."""

    model = None

    def __init__(self):
        self.forwards = 0

    def compute_ref_log_probs(self, model, inputs):
        self.forwards += 1
        sums = (inputs["input_ids"] * inputs["completion_mask"]).sum(dim=1).float() / -10.0
        return sums.chunk(2)


def test_a_pair_has_one_key_in_any_batch_and_its_split_counts():
    alone, padded = pair_keys(collated([PAIR_A], 6)), pair_keys(collated([PAIR_B, PAIR_A], 9))
    assert alone[0] == padded[1]  # padding and the batch's other pairs do not change the key
    assert padded[0] != padded[1]  # the same tokens with another completion mask are another pair


def test_each_pair_is_computed_once_then_reused_and_read_back_from_a_checkpoint(tmp_path):
    trainer, cache = CountingTrainer(), ReferenceCache("fp")
    first = cache.fill(trainer, collated([PAIR_A, PAIR_B], 7), "eval")
    again = cache.fill(trainer, collated([PAIR_B, PAIR_A], 9), "eval")  # another order, another padding
    assert trainer.forwards == 1
    assert again["ref_chosen_logps"].tolist() == first["ref_chosen_logps"].flip(0).tolist()
    assert again["ref_rejected_logps"].tolist() == first["ref_rejected_logps"].flip(0).tolist()
    assert cache.computed == {"train": 0, "eval": 2} and cache.reused == {"train": 0, "eval": 2}
    cache.fill(trainer, collated([PAIR_A, ([1], [2], [3])], 5), "train")  # one new pair: the batch is forwarded
    assert trainer.forwards == 2 and cache.computed["train"] == 2
    assert "computed once for 2 training + 2 held-out pairs" in cache.summary()

    cache.save(tmp_path)
    resumed = ReferenceCache("fp")
    assert resumed.load(tmp_path) is None and resumed.read == 3
    assert resumed.fill(trainer, collated([PAIR_A, PAIR_B], 7), "eval")["ref_chosen_logps"].tolist() == \
        first["ref_chosen_logps"].tolist()
    assert trainer.forwards == 2 and f"3 read from {tmp_path.name}" in resumed.summary()
    other = ReferenceCache("another reference")
    assert "another reference" in other.load(tmp_path) and other.read == 0 and not other.values
    assert "holds no" in ReferenceCache("fp").load(tmp_path / "nothing")


def test_values_already_in_the_batch_are_left_alone():
    trainer, batch = CountingTrainer(), collated([PAIR_A], 6)
    batch = {**batch, "ref_chosen_logps": torch.tensor([1.0]), "ref_rejected_logps": torch.tensor([2.0])}
    assert ReferenceCache("fp").fill(trainer, batch, "eval") is batch and trainer.forwards == 0


# --------------------------------------------------------------------------- real DPO, with and without


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory) -> tuple[Path, Path]:
    rows = [{"instruction": r["instruction"], "input": r["input"], "chosen": r["output"], "rejected": "no no no no"}
            for r in tiny_assets.rendered_rows(repeat=1)]
    data = tmp_path_factory.mktemp("pairs")
    return tiny_assets.write_jsonl(data / "train.jsonl", rows[:8]), tiny_assets.write_jsonl(data / "val.jsonl", rows[8:])


def dpo_args(model_dir: Path, pair_files, out: Path, *extra: str) -> list[str]:
    """2 epochs of 8 pairs in 4 steps, 4 held-out pairs (batches of 3 and 1) evaluated at steps 0, 2 and 4."""
    return ["--init", "base", "--model_name_or_path", str(model_dir), "--train_file", str(pair_files[0]),
            "--val_file", str(pair_files[1]), "--output_dir", str(out), "--lora_r", "4", "--learning_rate", "5e-3",
            "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "3", "--gradient_accumulation_steps", "1",
            "--max_steps", "4", "--logging_steps", "1", "--eval_steps", "2", "--save_steps", "2", "--report_to", "none",
            *extra]


def run(argv: list[str], callbacks=()) -> None:
    run_dpo(argv, preset="mac", plan_model=train_dpo_mac.plan_mac, prog="test", description="", callbacks=list(callbacks))


def logged_numbers(out: Path) -> list[dict]:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    keep = ("loss", "rewards/", "logps/", "eval_loss", "eval_rewards/", "eval_logps/", "pairs", "eval_pairs")
    return [{k: v for k, v in entry.items() if k.startswith(keep)} for entry in history]


def assert_same_numbers(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    first, second = logged_numbers(a), logged_numbers(b)
    assert [sorted(e) for e in first] == [sorted(e) for e in second]
    for x, y in zip(first, second):
        assert x == pytest.approx(y, rel=1e-5, abs=1e-6), (x, y)
    adapters = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert all(torch.allclose(adapters[0][k], adapters[1][k], atol=1e-6) for k in adapters[0])


@pytest.fixture(scope="module")
def without_cache(tmp_path_factory, tiny_llama_dir, pair_files) -> Path:
    out = tmp_path_factory.mktemp("dpo_cache") / "without"
    run(dpo_args(tiny_llama_dir, pair_files, out, "--reference_cache", "false"))
    return out


@pytest.mark.slow
def test_the_cache_gives_the_numbers_of_a_forward_at_every_use(without_cache, tiny_llama_dir, pair_files, tmp_path):
    out = tmp_path / "with"
    with tiny_assets.recorded_stdout(tmp_path / "dpo.log"):
        run(dpo_args(tiny_llama_dir, pair_files, out))
    assert_same_numbers(without_cache, out)
    metrics = json.loads((out / "metrics.json").read_text())
    cache = metrics["reference_cache"]  # 8 training pairs seen twice, 4 held-out pairs evaluated 3 times
    assert cache["computed_pairs"] == {"train": 8, "eval": 4} and cache["reused_pairs"] == {"train": 8, "eval": 8}
    assert metrics["phases"]["seconds"]["reference_forwards"] > 0
    assert "reference_cache" not in json.loads((without_cache / "metrics.json").read_text())
    printed = (tmp_path / "dpo.log").read_text(encoding="utf-8").splitlines()
    lines = [line for line in printed if line.startswith("reference log-probs")]
    assert len(lines) == 1 and "computed once for 8 training + 4 held-out pairs" in lines[0], lines
    assert json.loads((out / "checkpoint-4" / CACHE_FILENAME).read_text())["pairs"]


@pytest.mark.slow
def test_a_resumed_run_reads_the_checkpoints_cache_and_ends_the_same(without_cache, tiny_llama_dir, pair_files, tmp_path):
    class StopAt(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 2  # as if killed right after the step-2 checkpoint

    out = tmp_path / "interrupted"
    run(dpo_args(tiny_llama_dir, pair_files, out), callbacks=[StopAt()])
    run(dpo_args(tiny_llama_dir, pair_files, out, "--resume"))
    assert_same_numbers(without_cache, out)
    cache = json.loads((out / "metrics.json").read_text())["reference_cache"]
    assert cache["read_from"] == "checkpoint-2" and cache["read_pairs"] == 12  # every pair, seen before the stop
    assert cache["computed_pairs"] == {"train": 0, "eval": 0}


@pytest.mark.slow
def test_the_benchmark_puts_both_runs_side_by_side(tiny_llama_dir, tmp_path, capsys):
    from bench import bench_dpo_reference

    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": i, "input": x, "output": o} for i, x, o in tiny_assets.INSTRUCTIONS]))
    assert bench_dpo_reference.main(["--model", str(tiny_llama_dir), "--data", str(alpaca), "--steps", "2",
                                     "--eval_steps", "1", "--eval_pairs", "3", "--batch_size", "2", "--max_length", "128",
                                     "--threads", "1", "--out_dir", str(tmp_path / "runs"),
                                     "--results_dir", str(tmp_path / "results")]) == 0
    payload = json.loads((tmp_path / "results" / "dpo_reference.json").read_text())
    assert payload["largest_difference"] < 1e-5  # the same pairs, the same numbers
    on = payload["runs"]["cache on"]["reference_cache"]  # 3 held-out pairs evaluated at steps 0, 1 and 2
    used = json.loads((tmp_path / "runs" / "cache_on" / "metrics.json").read_text())["data"]["train"]["used"]
    assert on["computed_pairs"] == {"train": used, "eval": 3} and on["reused_pairs"] == {"train": 0, "eval": 6}
    assert payload["runs"]["cache off"]["reference_cache"] is None
    assert "reference_forwards" in capsys.readouterr().out
