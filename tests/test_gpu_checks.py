"""bench.gpu_checks on a CPU: every phase's command is one its script accepts, and the env phase
runs and writes its summary (the GPU phases themselves need a GPU)."""
import json
from pathlib import Path

import pytest
import torch

from bench import bench_generate, bench_train, gpu_checks, profile_step
from core.cli import UserError

PARSERS = {"bench.bench_train": bench_train.parse_args, "bench.profile_step": profile_step.parse_args,
           "bench.bench_generate": bench_generate.parse_args}


def test_every_phase_command_parses(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the scripts' own GPU check
    args = gpu_checks.parse_args(["--out", str(tmp_path), "--data", "rows.jsonl"])
    seen = set()
    for phase in gpu_checks.PHASES:
        for command in gpu_checks.phase_commands(phase, args, tmp_path / "model"):
            if command[1:3] == ["-m", "pytest"]:
                assert command[3:5] == ["-m", "gpu"]
                files = [arg for arg in command if arg.startswith("tests/")]
                assert "tests/test_packing.py" in files and "tests/test_gpu_checks.py" not in files
            elif len(command) > 2 and command[2] in PARSERS:
                parsed = PARSERS[command[2]](command[3:])  # raises SystemExit on an unknown flag
                assert parsed.device == "cuda" and parsed.precision == "bf16" and parsed.model == str(tmp_path / "model")
                seen.add(command[2])
    assert seen == set(PARSERS)
    bench = gpu_checks.phase_commands("bench", args, tmp_path / "model")[0]
    parsed = bench_train.parse_args(bench[3:])
    assert (parsed.steps, parsed.warmup_steps, parsed.batch_size) == (40, 3, 16)  # the issue's >= 40 timed steps
    assert {"ours", "ceiling", "original", "trl_best"} <= set(parsed.configs)
    qlora = bench_train.parse_args(gpu_checks.phase_commands("qlora", args, tmp_path / "model")[0][3:])
    assert qlora.load_in_4bit and "original" in qlora.configs


def test_env_phase_writes_a_summary(tmp_path):
    code = gpu_checks.main(["--out", str(tmp_path / "out"), "--phases", "env", "--budget_s", "120"])

    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    [env] = summary["phases"]
    assert env["phase"] == "env" and "torch:" in env["tail"]
    assert code == (0 if env["status"] == "ok" else 1)  # no nvidia-smi on a CPU machine: reported, not raised
    assert "| env |" in Path(tmp_path / "out" / "summary.md").read_text()


def test_gpu_phases_need_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(UserError, match="need a CUDA GPU"):
        gpu_checks.main(["--out", str(tmp_path), "--phases", "bench"])


def test_out_of_time_phase_is_killed_and_reported(tmp_path, monkeypatch):
    monkeypatch.setitem(gpu_checks.PHASE_CAP_S, "env", 31)
    monkeypatch.setattr(gpu_checks, "MIN_PHASE_S", 0)
    monkeypatch.setattr(gpu_checks, "phase_commands", lambda *a: [["sleep", "60"], ["true"]])
    args = gpu_checks.parse_args(["--out", str(tmp_path), "--phases", "env"])
    result = gpu_checks.run_phase("env", args, tmp_path, deadline=gpu_checks.time.perf_counter() + 2)

    assert result["status"] == "out of time" and result["seconds"] < 20
    assert "out of time" in result["tail"]
