"""The thread guard (core/threads.py), measured: runs back to back on an idle CPU, and beside a real
competing process.

    python -m bench.bench_threads --wait_idle 600                 # the figures in docs/performance.md
    python -m bench.bench_threads --model path/to/model --steps 20 --repeats 3

Each run is ``python -m sft.train_sft_mac`` as a user starts it (a fresh process; training tokens/s
from its metrics.json, so model loading is not in the figure), each started the moment the previous
one ended, in this order:

1. a warm-up run with ``OMP_NUM_THREADS=<cores>`` (the stage that has just finished);
2. then, ``--repeats`` times: a run where the guard decides (no ``OMP_NUM_THREADS``), followed by one
   with ``OMP_NUM_THREADS=<cores>``: the guarded run must reach >= 85% of the fixed count's tokens/s
   and print no note;
3. a run where the guard decides, beside a busy loop (another process keeping one CPU busy): the
   note must appear, with one thread less.

The default model is the random ``small`` Llama of bench_train (44.6M parameters, TinyLlama tokenizer).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # run as a file: make `bench` and `sft` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (DEFAULT_TOKENIZER, REPO_ROOT, SHAPES, build_random_llama, command_line,  # noqa: E402
                          describe_machine, format_table, machine_info, median, run_child, sample_rows, tail,
                          wait_until_idle, write_results, write_sft_jsonl)
from core.cli import UserError, make_parser, run_cli  # noqa: E402
from core.threads import FREE_CPUS_ENV, available_cpus  # noqa: E402

TARGET_RATIO = 0.85  # guarded / fixed OMP_NUM_THREADS=<cores>, back to back on an idle CPU
NOTE = "note: other processes used"
BUSY_LOOP = "while True:\n    pass\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = make_parser(prog="python -m bench.bench_threads", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model folder (default: a random Llama of --shape with the TinyLlama tokenizer)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small", help="shape of the random Llama (default: small)")
    parser.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER), help="tokenizer of the random Llama")
    parser.add_argument("--data", help="SFT .jsonl or Alpaca .json (default: data/processed/sft_train.jsonl, else raw Alpaca)")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run (default: 12)")
    parser.add_argument("--batch_size", type=int, default=4, help="examples per step (default: 4)")
    parser.add_argument("--repeats", type=int, default=2, help="guarded / fixed pairs (default: 2)")
    parser.add_argument("--wait_idle", type=float, default=0, metavar="SECONDS",
                        help="first wait up to this long for idle CPUs (default: 0 = do not wait)")
    parser.add_argument("--results_dir", type=Path, default=None, help="where to write threads.json (default: bench/results)")
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "repeats"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    return args


def stage_env(threads: int | None) -> dict[str, str]:
    """A user's environment: offline, the repo importable; ``OMP_NUM_THREADS`` only when given."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", FREE_CPUS_ENV)}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])))
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def train(name: str, model: Path, data: Path, work: Path, args: argparse.Namespace, threads: int | None) -> dict:
    out = work / name
    flags = [f"--model_name_or_path={model}", f"--train_file={data}", f"--val_file={data}", f"--output_dir={out}",
             f"--max_steps={args.steps}", f"--per_device_train_batch_size={args.batch_size}",
             "--gradient_accumulation_steps=1", "--max_eval_samples=4", "--max_seq_length=256",
             f"--logging_steps={args.steps}", f"--eval_steps={args.steps}", f"--save_steps={args.steps}", "--report_to=none"]
    run = run_child([sys.executable, "-m", "sft.train_sft_mac", *flags], env=stage_env(threads))
    if run.returncode != 0:
        raise UserError(f"run {name} failed (exit {run.returncode}):\n{tail(run.log, 20)}")
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    note = next((line for line in run.log.splitlines() if line.startswith(NOTE)), None)
    return {"run": name, "OMP_NUM_THREADS": threads, "note": note, "tokens_per_s": metrics["train_tokens_per_second"],
            "others_cpu_share": run.others_cpu_share, "wall_s": run.wall_s}


def beside_busy_loop(model: Path, data: Path, work: Path, args: argparse.Namespace) -> dict:
    """A guarded run while a sibling process (not in the run's own tree) keeps a CPU busy."""
    busy = subprocess.Popen([sys.executable, "-c", BUSY_LOOP])
    try:
        return train("guarded beside a busy loop", model, data, work, args, None)
    finally:
        busy.kill()
        busy.wait()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cores = available_cpus()
    rows, _ = sample_rows(args.steps * args.batch_size, seed=0, data=args.data)
    with tempfile.TemporaryDirectory(prefix="bench_threads_") as tmp:
        work = Path(tmp)
        data = write_sft_jsonl(work / "train.jsonl", rows)
        model = Path(args.model) if args.model else build_random_llama(work / "model", args.tokenizer, args.shape, seed=0)
        waited = wait_until_idle(max_wait_s=args.wait_idle) if args.wait_idle > 0 else 0.0
        runs = [train("warm-up (the previous stage)", model, data, work, args, cores)]
        for i in range(args.repeats):  # each right after the previous one
            runs.append(train(f"guarded {i + 1}", model, data, work, args, None))
            runs.append(train(f"OMP_NUM_THREADS={cores} {i + 1}", model, data, work, args, cores))
        runs.append(beside_busy_loop(model, data, work, args))
    guarded = [r for r in runs if r["run"].startswith("guarded ") and "busy" not in r["run"]]
    fixed = [r for r in runs if r["run"].startswith("OMP_NUM_THREADS")]
    ratio = median([r["tokens_per_s"] for r in guarded]) / median([r["tokens_per_s"] for r in fixed])
    notes_idle = sum(r["note"] is not None for r in guarded)
    busy = runs[-1]
    print(format_table(["run", "tokens/s", "others' CPU share", "note"],
                       [[r["run"], r["tokens_per_s"], r["others_cpu_share"], r["note"] or "-"] for r in runs]))
    print(f"\nback to back: guarded / OMP_NUM_THREADS={cores} = {ratio:.2f} (target >= {TARGET_RATIO}: "
          f"{'met' if ratio >= TARGET_RATIO else 'NOT met'}); notes on the guarded runs: {notes_idle}/{len(guarded)} (target 0)")
    print(f"beside a busy loop: {'note printed' if busy['note'] else 'NO note (target: a note)'}")
    info = machine_info()
    command = command_line("bench.bench_threads", argv)
    print(f"machine: {describe_machine(info)}\ncommand: {command}")
    write_results("threads", {"machine": info, "command": command, "cores": cores, "runs": runs, "ratio": ratio,
                              "notes_on_guarded_idle_runs": f"{notes_idle}/{len(guarded)}", "waited_for_idle_s": waited},
                  **({"results_dir": args.results_dir} if args.results_dir else {}))
    return 0


if __name__ == "__main__":
    run_cli(main)
