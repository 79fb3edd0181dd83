"""Every GPU figure docs/performance.md asks for, in one command, within a time budget.

    python -m bench.gpu_checks --out gpu_results                       # all phases, 540 s budget
    python -m bench.gpu_checks --out gpu_results --phases qlora profile --budget_s 300
    python -m bench.gpu_checks --out gpu_results --tokenizer path/to/tinyllama --data sample.jsonl

For a contributor with a CUDA GPU (also an offline one: pass a local tokenizer and a data sample).
The phases run in this order, each in its own process with whatever time the budget has left,
so the most important figures come first and a run cut short still leaves what it measured:

- ``env``: the GPU, driver, torch/CUDA and library versions;
- ``tests``: ``python -m pytest -m gpu`` (packed vs unpacked gradients with SDPA and flex attention
  on the GPU, the QLoRA SFT and DPO entry points, bf16 auto-precision);
- ``bench``: ``bench_train`` in bf16 at TinyLlama-1.1B shape, batch 16, 3 warm-up + 40 timed
  steps: ours, ours packed, the plain-PyTorch ceiling, the original recipe and TRL at its best
  (plain, ``padding_free``, ``packing``), and ours with Liger's kernels where ``liger-kernel`` is
  installed: the issue's throughput targets, with MFU;
- ``qlora``: the same in 4-bit NF4 (ours, ours packed, the original recipe in 4-bit);
- ``profile``: ``profile_step``: where our step's time goes (ms per step, host-device syncs);
- ``generate``: ``bench_generate``: batched eval generation against one prompt at a time.

Everything lands in ``--out``: one ``<phase>.log`` each, the benches' JSON, and ``summary.md`` /
``summary.json`` (rewritten after every phase: status, seconds, the last lines of the log). The
random TinyLlama-shape model is built once (``--work``, default a temporary folder) and shared.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import DEFAULT_TOKENIZER, REPO_ROOT, build_random_llama, child_env, tail  # noqa: E402
from core.cli import UserError, run_cli  # noqa: E402

PHASES = ("env", "tests", "bench", "qlora", "profile", "generate")
# Upper bounds in seconds, so one phase that hangs cannot eat the ones after it.
PHASE_CAP_S = {"env": 60, "tests": 240, "bench": 420, "qlora": 300, "profile": 180, "generate": 180}
MIN_PHASE_S = 30  # less than this left: the phase is skipped, not started
BENCH_CONFIGS = ["ours", "ours_packed", "ceiling", "original", "trl_best", "trl_padding_free", "trl_packed"]
QLORA_CONFIGS = ["ours", "ours_packed", "original"]
ENV_SCRIPT = """
import importlib.metadata as md, torch
print("gpu:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
print("torch:", torch.__version__, "cuda:", torch.version.cuda, "bf16:", torch.cuda.is_available() and torch.cuda.is_bf16_supported())
for name in ("transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes", "triton", "liger-kernel"):
    try:
        print(f"{name}:", md.version(name))
    except md.PackageNotFoundError:
        print(f"{name}: not installed")
"""


def phase_commands(phase: str, args: argparse.Namespace, model_dir: Path) -> list[list[str]]:
    """The child commands of one phase."""
    py = sys.executable
    shared = ["--model", str(model_dir), "--device", "cuda", "--precision", "bf16"] + (["--data", args.data] if args.data else [])
    bench = [py, "-m", "bench.bench_train", *shared, "--batch_size", str(args.batch_size), "--repeats", str(args.repeats),
             "--skip_full_data_padding"]
    if phase == "env":
        return [["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv"], [py, "-c", ENV_SCRIPT]]
    if phase == "tests":
        return [[py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-ra", *gpu_test_files()]]
    if phase == "bench":
        liger = ["ours_liger"] if importlib.util.find_spec("liger_kernel") else []  # optional: measured where installed
        return [bench + ["--configs", *BENCH_CONFIGS, *liger, "--results_dir", str(args.out / "bench")]]
    if phase == "qlora":
        return [bench + ["--load_in_4bit", "--configs", *QLORA_CONFIGS, "--results_dir", str(args.out / "qlora")]]
    if phase == "profile":
        return [[py, "-m", "bench.profile_step", *shared, "--batch_size", str(args.batch_size)],
                [py, "-m", "bench.profile_step", *shared, "--batch_size", str(args.batch_size), "--packing"]]
    if phase == "generate":
        return [[py, "-m", "bench.bench_generate", *shared, "--repeats", "1", "--results_dir", str(args.out / "generate")]]
    raise ValueError(phase)


def gpu_test_files() -> list[str]:
    """The test files holding ``@pytest.mark.gpu`` tests: only these are collected, so a machine
    without the evaluation-only dependencies (if-verifiable, nltk) can still run them."""
    return sorted(str(path.relative_to(REPO_ROOT)) for path in (REPO_ROOT / "tests").glob("test_*.py")
                  if "pytest.mark.gpu" in path.read_text(encoding="utf-8"))


def run_command(command: list[str], log, timeout_s: float) -> tuple[int | None, float]:
    """Run one command (its own process group, output appended to ``log``); (exit code or None
    when it ran out of time, seconds)."""
    log.write(f"\n$ {' '.join(command)}\n")
    log.flush()
    started = time.perf_counter()
    if shutil.which(command[0]) is None and not Path(command[0]).is_file():
        log.write(f"{command[0]}: not found\n")
        return 127, 0.0
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=child_env(2),
                            start_new_session=True)
    try:
        return proc.wait(timeout=max(1.0, timeout_s)), time.perf_counter() - started
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.write(f"\n[killed after {timeout_s:.0f} s: out of time]\n")
        return None, time.perf_counter() - started


def run_phase(phase: str, args: argparse.Namespace, model_dir: Path, deadline: float) -> dict:
    """Run a phase's commands while time is left; its status, seconds and log tail."""
    log_path = args.out / f"{phase}.log"
    started, status = time.perf_counter(), "ok"
    with log_path.open("w", encoding="utf-8") as log:
        for command in phase_commands(phase, args, model_dir):
            left = min(deadline - time.perf_counter(), PHASE_CAP_S[phase] - (time.perf_counter() - started))
            if left < MIN_PHASE_S:
                status = "out of time"
                break
            code, _ = run_command(command, log, left)
            if code is None:
                status = "out of time"
                break
            if code != 0:
                status = f"failed (exit {code})"
    return {"phase": phase, "status": status, "seconds": round(time.perf_counter() - started, 1),
            "log": log_path.name, "tail": tail(log_path.read_text(encoding="utf-8", errors="replace"), 40)}


def write_summary(out: Path, results: list[dict], started_at: str) -> None:
    (out / "summary.json").write_text(json.dumps({"started": started_at, "phases": results}, indent=2), encoding="utf-8")
    lines = [f"# GPU checks ({started_at})", "", "| phase | status | seconds |", "|---|---|---:|"]
    lines += [f"| {r['phase']} | {r['status']} | {r['seconds']} |" for r in results]
    for r in results:
        lines += ["", f"## {r['phase']}: {r['status']}", "", "```", r["tail"], "```"]
    (out / "summary.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_checks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the logs, the benches' JSON and summary.md")
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES), help="phases to run, in this order (default: all)")
    parser.add_argument("--budget_s", type=float, default=540, help="wall-clock budget for all phases (default: 540)")
    parser.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER), help="tokenizer of the random TinyLlama-shape model")
    parser.add_argument("--data", help="SFT .jsonl or Alpaca .json for the benches (default: as bench_train)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1, help="runs per bench configuration (default: 1)")
    parser.add_argument("--work", type=Path, help="scratch folder for the model (default: a temporary folder)")
    args = parser.parse_args(argv)
    needs_gpu = set(args.phases) - {"env"}
    if needs_gpu:
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"phases {', '.join(sorted(needs_gpu))} need a CUDA GPU; none is visible to torch")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    deadline = time.perf_counter() + args.budget_s
    args.out.mkdir(parents=True, exist_ok=True)
    started_at = time.strftime("%Y-%m-%d %H:%M:%S")
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="gpu_checks_", dir=args.work) as work:
        model_dir = Path(work) / "tinyllama_random"
        if set(args.phases) & {"bench", "qlora", "profile", "generate"}:
            print(f"building a random TinyLlama-shape Llama with {args.tokenizer} ...", flush=True)
            build_random_llama(model_dir, args.tokenizer, "tinyllama", seed=42)
        for phase in args.phases:
            print(f"[{time.strftime('%H:%M:%S')}] {phase} ...", flush=True)
            result = run_phase(phase, args, model_dir, deadline)
            results.append(result)
            write_summary(args.out, results, started_at)
            print(f"[{time.strftime('%H:%M:%S')}] {phase}: {result['status']} in {result['seconds']} s", flush=True)
    print(f"summary: {args.out / 'summary.md'}")
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    run_cli(main)
