"""bench/profile_study.py on a fabricated study folder: floors from given tokens and a given FLOP/s (nothing timed)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from bench.profile_study import NO_PHASES, main, profile
from core.cli import run_cli

LORA = {"r": 2, "target_modules": ["q_proj", "v_proj"]}


def write(path: Path, payload) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload), encoding="utf-8")


def weights(model_dir: Path) -> tuple[int, int]:
    """(N of the model, LoRA weights of LORA on it), counted on the real model. N as bench/ceiling.py counts it:
    every parameter but an input embedding that is not also the LM head."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    embedding = model.get_input_embeddings().weight
    tied = embedding is model.get_output_embeddings().weight
    base = sum(p.numel() for p in model.parameters()) - (0 if tied else embedding.numel())
    lora = sum(LORA["r"] * (m.in_features + m.out_features) for name, m in linears.items()
               if name.rsplit(".", 1)[-1] in LORA["target_modules"])
    return base, lora


@pytest.fixture
def study(tmp_path, tiny_llama_dir) -> Path:
    out = tmp_path / "study"
    write(out / "study.json", {"model": str(tiny_llama_dir), "stages": {
        "prepare": {"command": ["scripts.prepare_sft_data", "--out_dir", "data"], "seconds": 1.0},
        "sft": {"command": ["sft.train_sft_mac", "--output_dir", "sft"], "seconds": 12.0},
        "dpo": {"command": ["dpo.train_dpo_mac", "--output_dir", "dpo"], "seconds": 40.0}}})
    write(out / "sft" / "sft_config.json", {})
    write(out / "sft" / "adapter_config.json", LORA)
    write(out / "sft" / "trainer_state.json", {"log_history": [{"eval_loss": 3.0, "step": 0}, {"loss": 2.0, "step": 1},
                                                               {"eval_loss": 2.5, "step": 2}]})
    write(out / "sft" / "metrics.json", {
        "train_tokens_seen": 1000, "precision": "fp32", "data": {"val": {"tokens": 50}},
        "phases": {"seconds": {"model_load": 1.0, "training_compute": 5.0, "evaluation": 2.0, "other": 1.0},
                   "wall_seconds": 9.0, "peak_rss_mb": 300.0, "peak_rss_children_mb": 450.0}})
    write(out / "dpo" / "dpo_config.json", {})  # a run from before the phase clock, without an adapter file
    write(out / "dpo" / "metrics.json", {"train_tokens_seen": 400, "precision": "fp32", "peak_memory_mb": 500.0,
                                         "peak_memory_kind": "process peak RSS"})
    return out


def row(table: str, stage_or_phase: str, after: str | None = None) -> list[str]:
    lines = table.splitlines()
    start = next(i for i, line in enumerate(lines) if after and f"| {after} " in line) if after else 0
    line = next(line for line in lines[start:] if f" {stage_or_phase} " in line or f" {stage_or_phase}:" in line)
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_floors_are_tokens_times_flops_per_token_over_the_given_rate(study, tiny_llama_dir):
    base, lora = weights(tiny_llama_dir)
    train_flops = 4 * base + 6 * lora  # per LoRA-trained token
    gflops = 1000 * train_flops / 2.5 / 1e9  # SFT's 1000 trained tokens: a floor of 2.5 s
    table = profile(study, gflops=gflops)

    training = row(table, "training_compute")
    assert training[2:] == ["5.00", "1,000", "2.5", "50.0%", "-"]
    evaluation = row(table, "evaluation")  # 50 held-out tokens x 2 evaluations, 2N per token
    eval_floor = 100 * 2 * (base + lora) / (gflops * 1e9)
    assert evaluation[3] == "100" and evaluation[4] == f"{eval_floor:.3g}"
    assert row(table, "model_load")[4] == "-"  # no counted tokens: no floor

    sft = row(table, "sft")
    assert sft[2] == "12.00" and sft[4] == f"{2.5 + eval_floor:.3g}" and sft[6] == "450"  # the larger peak RSS
    assert sft[5] == f"{(2.5 + eval_floor) / 12:.1%}"

    dpo = row(table, "dpo")  # no phases: its total against the trained tokens + the reference's forwards
    dpo_floor = 400 * (4 * base + 2 * base) / (gflops * 1e9)
    assert NO_PHASES in dpo[1] and dpo[4] == f"{dpo_floor:.3g}" and dpo[6] == "500"
    assert row(table, "reference_forwards", after="dpo")[3] == "400"
    assert row(table, "prepare")[2:] == ["1.00", "-", "-", "-", "-"]
    assert f"floors at {gflops:,.1f} GFLOP/s (given)" in table


def test_a_model_without_a_config_here_leaves_floors_out(study):
    record = json.loads((study / "study.json").read_text())
    write(study / "study.json", {**record, "model": str(study / "no_such_model")})
    table = profile(study, gflops=100.0)
    assert "no floors" in table and row(table, "training_compute")[4] == "-"


def test_a_folder_without_study_json_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, [str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "study.json" in err and len(err.splitlines()) == 1
