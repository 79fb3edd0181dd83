"""DPO with and without the reference log-probs cache (``--reference_cache``), side by side.

    python -m bench.bench_dpo_reference --model /path/to/SmolLM2-135M-Instruct --template chat \\
        --steps 10 --eval_steps 5 --eval_pairs 40 --batch_size 4 --max_length 512

Pairs are made from Alpaca-style rows (``--data``, else the benchmark's default data,
``bench/common.py``): the gold answer is chosen, the next sampled row's answer rejected, so both
runs read the very same pairs (``train_pairs`` defaults to one epoch: steps x batch size). Each run is
``python -m dpo.train_dpo_mac --init base`` in a fresh child process; the table is each run's
``metrics.json`` phases (``core/phases.py``), seconds per phase and the ratio off / on, then the
largest difference between the two runs' logged losses, rewards and held-out accuracies (the cache
must not change them) and the cache's counts. Results go to ``bench/results/dpo_reference.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from bench.common import (RESULTS_DIR, child_env, command_line, describe_machine, format_table, machine_info, run_child,
                          sample_rows, tail, write_results)
from core.cli import UserError, run_cli

RUNS = {"cache off": "false", "cache on": "true"}
# Logged numbers compared between the runs (train and held-out): what the cache must leave unchanged
COMPARED = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "eval_loss",
            "eval_rewards/accuracies", "eval_rewards/margins", "eval_pairs_correct")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_dpo_reference", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="base model folder (a fresh LoRA adapter is trained on it)")
    parser.add_argument("--data", default=None, help="Alpaca-style .json or prepared .jsonl rows to make pairs from")
    parser.add_argument("--template", default="alpaca", help="prompt template (chat for an instruct model)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--eval_steps", type=int, default=5)
    parser.add_argument("--train_pairs", type=int, default=None, help="default: steps x batch_size (one epoch)")
    parser.add_argument("--eval_pairs", type=int, default=40)
    parser.add_argument("--batch_size", type=int, default=4, help="pairs per step and per held-out batch")
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None, help="torch threads of each run (default: every core)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out_dir", default=None, help="where the pairs and both runs go (default: a temp folder)")
    parser.add_argument("--results_dir", default=str(RESULTS_DIR))
    args = parser.parse_args(argv)
    if min(args.steps, args.eval_steps, args.eval_pairs, args.batch_size) < 1:
        raise UserError("steps, eval_steps, eval_pairs and batch_size must be >= 1")
    args.train_pairs = args.train_pairs or args.steps * args.batch_size
    return args


def write_pairs(args: argparse.Namespace, folder: Path) -> tuple[Path, Path]:
    """Train and held-out pair files: each sampled row's answer chosen, the next row's rejected."""
    rows, _ = sample_rows(args.train_pairs + args.eval_pairs + 1, args.seed, args.data)
    pairs = [{"instruction": row["instruction"], "input": row["input"], "chosen": row["output"],
              "rejected": following["output"]} for row, following in zip(rows, rows[1:])]
    folder.mkdir(parents=True, exist_ok=True)
    files = folder / "prefs_train.jsonl", folder / "prefs_val.jsonl"
    for path, part in zip(files, (pairs[:args.train_pairs], pairs[args.train_pairs:])):
        path.write_text("".join(json.dumps(pair, ensure_ascii=False) + "\n" for pair in part), encoding="utf-8")
    return files


def dpo_command(args: argparse.Namespace, pairs: tuple[Path, Path], out: Path, cache: str) -> list[str]:
    return [sys.executable, "-m", "dpo.train_dpo_mac", "--init", "base", "--model_name_or_path", args.model,
            "--template", args.template, "--train_file", str(pairs[0]), "--val_file", str(pairs[1]),
            "--output_dir", str(out), "--max_steps", str(args.steps), "--eval_steps", str(args.eval_steps),
            "--save_steps", str(args.steps), "--logging_steps", "1", "--per_device_train_batch_size", str(args.batch_size),
            "--per_device_eval_batch_size", str(args.batch_size), "--gradient_accumulation_steps", "1",
            "--max_length", str(args.max_length), "--seed", str(args.seed), "--report_to", "none",
            "--reference_cache", cache]


def logged(out: Path) -> list[dict]:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [{key: entry[key] for key in COMPARED if key in entry} for entry in history]


def largest_difference(a: list[dict], b: list[dict]) -> float:
    """The largest absolute difference between two runs' logged numbers (inf when they logged different things)."""
    if [sorted(entry) for entry in a] != [sorted(entry) for entry in b]:
        return float("inf")
    return max((abs(x[key] - y[key]) for x, y in zip(a, b) for key in x), default=0.0)


def phase_table(phases: dict[str, dict]) -> str:
    names = list(dict.fromkeys(name for run in phases.values() for name in run["seconds"]))
    rows = []
    for name in [*names, "wall"]:
        off, on = (run["wall_seconds"] if name == "wall" else run["seconds"].get(name, 0.0) for run in phases.values())
        rows.append([name, f"{off:.1f}", f"{on:.1f}", f"{off / on:.2f}x" if on > 0.05 else "-"])
    return format_table(["phase", *[f"{run} (s)" for run in phases], "off / on"], rows)


def main(argv: Sequence[str] | None = None) -> int:
    import os
    import tempfile

    args = parse_args(argv)
    root = Path(args.out_dir) if args.out_dir else Path(tempfile.mkdtemp(prefix="bench_dpo_reference_"))
    pairs = write_pairs(args, root / "pairs")
    env = child_env(args.threads or os.cpu_count() or 1)
    phases, numbers, runs = {}, {}, {}
    for name, cache in RUNS.items():
        out = root / name.replace(" ", "_")
        child = run_child(dpo_command(args, pairs, out, cache), env=env)
        if child.returncode != 0:
            raise UserError(f"the DPO run '{name}' failed (exit {child.returncode}):\n{tail(child.log)}")
        metrics = json.loads((out / "metrics.json").read_text())
        phases[name], numbers[name] = metrics["phases"], logged(out)
        runs[name] = {"wall_s": round(child.wall_s, 3), "peak_rss_mb": child.peak_rss_mb, "phases": metrics["phases"],
                      "others_cpu_share": child.others_cpu_share, "reference_cache": metrics.get("reference_cache")}
    difference = largest_difference(*numbers.values())
    print(phase_table(phases))
    print(f"largest difference between the runs' logged losses, rewards and accuracies: {difference:.3g}")
    cache = runs["cache on"]["reference_cache"]
    print(f"cache on: computed {cache['computed_pairs']}, reused {cache['reused_pairs']} pairs, {cache['seconds']} s")
    busy = [f"{name} {run['others_cpu_share']:.0%}" for name, run in runs.items() if run["others_cpu_share"] is not None]
    print(f"other processes' CPU share during each run: {', '.join(busy) or 'unknown'} (timings are contended above ~10%)")
    info = machine_info()
    command = command_line("bench.bench_dpo_reference", argv)
    print(f"machine: {describe_machine(info)}\ncommand: {command}")
    write_results("dpo_reference", {"machine": info, "command": command, "runs": runs, "largest_difference": difference},
                  Path(args.results_dir))
    return 0


if __name__ == "__main__":
    run_cli(main)
