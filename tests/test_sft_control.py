"""The study's control arm on SFT's side (sft/budget.py): continue an SFT run's adapter on a preference
file's chosen answers, for as many tokens as another run trained."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import tiny_assets
from core.cli import UserError
from core.config import ConfigError
from sft.dataset import read_sft_rows
from sft.sft_config import parse_sft_config
from sft.train_sft_mac import plan_mac
from sft.training import run_sft
from test_training import _run_and_capture, train_argv


def pairs_file(path: Path) -> Path:
    """The tiny SFT rows as preference pairs: chosen = the gold answer, rejected = another text."""
    rows = [{"instruction": r["instruction"], "input": r["input"], "chosen": r["output"], "rejected": "no."}
            for r in tiny_assets.sft_rows(repeat=2)]
    return tiny_assets.write_jsonl(path, rows)


def test_chosen_answers_read_as_sft_rows(tmp_path):
    rows = read_sft_rows(pairs_file(tmp_path / "prefs.jsonl"), "chosen")
    assert [r["output"] for r in rows] == [r["output"] for r in tiny_assets.sft_rows(repeat=2)]
    with pytest.raises(UserError, match="row 1: needs a 'chosen' answer"):
        read_sft_rows(tiny_assets.write_jsonl(tmp_path / "sft.jsonl", tiny_assets.sft_rows()), "chosen")


@pytest.mark.parametrize("extra, message", [
    ({"max_train_tokens": 100}, "max_train_tokens and max_steps each set how long"),
    ({"max_train_tokens": 100, "match_tokens_of": "x", "max_steps": -1}, "max_train_tokens and match_tokens_of"),
    ({"max_train_tokens": 0, "max_steps": -1}, "max_train_tokens must be >= 1"),
    ({"init_adapter_dir": "x", "train_eos_embedding": "true"}, "train_eos_embedding applies to a fresh one"),
])
def test_budget_and_init_keys_refuse_contradictions(tmp_path, sft_data, tiny_llama_dir, extra, message):
    with pytest.raises(ConfigError, match=message):
        parse_sft_config(train_argv(tiny_llama_dir, sft_data, tmp_path / "out", **extra), preset="mac")


def _run(argv: list[str]) -> dict:
    run_sft(argv, preset="mac", plan_model=plan_mac, prog="test", description="")
    out = Path(next(a for a in argv if a.startswith("--output_dir=")).split("=", 1)[1])
    return json.loads((out / "metrics.json").read_text())


def _lora(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "adapter_model.safetensors"))


@pytest.mark.slow
def test_control_continues_the_adapter_for_the_matched_tokens(tmp_path, sft_data, tiny_llama_dir):
    sft = tmp_path / "sft"
    first = _run(train_argv(tiny_llama_dir, sft_data, sft, max_steps=4))
    prefs = pairs_file(tmp_path / "prefs.jsonl")
    target = first["train_tokens_seen"] // 2  # a run to match: half of SFT's tokens
    (tmp_path / "dpo").mkdir()
    (tmp_path / "dpo" / "metrics.json").write_text(json.dumps({"train_tokens_seen": target}))
    control = tmp_path / "control"
    argv = train_argv(tiny_llama_dir, (prefs, prefs), control, max_steps=-1, learning_rate=1e-12, seed=3,
                      init_adapter_dir=sft, response_key="chosen", match_tokens_of=tmp_path / "dpo")
    metrics = _run(argv)
    assert metrics["token_budget"] == target
    per_step = 2 * 2  # batch x accumulation: one step more than the budget needs is at most this many examples
    longest = max(len(r["output"]) for r in tiny_assets.sft_rows()) * 4
    assert target <= metrics["train_tokens_seen"] < target + per_step * longest
    assert metrics["global_step"] <= metrics["max_steps_for_budget"]
    # learning rate ~0: the continued adapter is the SFT run's, weight for weight (it was loaded, not drawn afresh)
    before, after = _lora(sft), _lora(control)
    assert before.keys() == after.keys() and all(torch.allclose(before[k], after[k], atol=1e-8) for k in before)
    assert "continued" in (control / "README.md").read_text()


def test_init_adapter_must_be_an_sft_run_on_the_same_base(tmp_path, sft_data, tiny_llama_dir, capsys):
    argv = train_argv(tiny_llama_dir, sft_data, tmp_path / "out", init_adapter_dir=tmp_path / "nothing")
    code, err = _run_and_capture(capsys, argv)
    assert code == 2 and "--init_adapter_dir" in err and "no finished SFT run there" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()  # refused before anything is written
    code, err = _run_and_capture(capsys, train_argv(tiny_llama_dir, sft_data, tmp_path / "out", max_steps=-1,
                                                    match_tokens_of=tmp_path))
    assert code == 2 and "--match_tokens_of" in err and "no readable metrics.json" in err
