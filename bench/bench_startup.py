"""How long each entry point takes to answer ``--help`` and a misspelled flag (``--max_step 3``).

    python -m bench.bench_startup                      # every entry point, 3 runs each, medians
    python -m bench.bench_startup --repeats 5 --baseline ../other_clone   # side by side with another checkout

Both should answer before torch, transformers or peft are imported (the arguments are parsed
first), well under the 1.5 s target on a laptop CPU. Each run is a fresh ``python`` process, as a
user's command is; the wall time includes the interpreter's start. With ``--baseline DIR`` the same
commands also run in another checkout (e.g. the commit before a change), interleaved run by run so
both see the same machine load.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # run as a file: make `bench` and `core` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO_ROOT, command_line, describe_machine, format_table, machine_info, median, write_results  # noqa: E402
from core.cli import UserError, make_parser, run_cli  # noqa: E402

TARGET_S = 1.5
# (name, the command's words after `python`)
ENTRY_POINTS = (
    ("sft.train_sft_mac", ["-m", "sft.train_sft_mac"]),
    ("sft.train_sft_cuda", ["-m", "sft.train_sft_cuda"]),
    ("sft.eval_sft", ["-m", "sft.eval_sft"]),
    ("dpo.train_dpo_mac", ["-m", "dpo.train_dpo_mac"]),
    ("dpo.train_dpo_cuda", ["-m", "dpo.train_dpo_cuda"]),
    ("rlhf.train_reward_mac", ["-m", "rlhf.train_reward_mac"]),
    ("rlhf.train_reward_cuda", ["-m", "rlhf.train_reward_cuda"]),
    ("rlhf.train_rloo_mac", ["-m", "rlhf.train_rloo_mac"]),
    ("rlhf.train_rloo_cuda", ["-m", "rlhf.train_rloo_cuda"]),
    ("evaluation.score_if", ["-m", "evaluation.score_if"]),
    ("evaluation.charts", ["-m", "evaluation.charts"]),
    ("scripts/prepare_sft_data.py", ["scripts/prepare_sft_data.py"]),
    ("scripts/prepare_dpo_data.py", ["scripts/prepare_dpo_data.py"]),
    ("scripts/merge_adapter.py", ["scripts/merge_adapter.py"]),
    ("scripts/run_study.py", ["scripts/run_study.py"]),
)
CASES = {"--help": ["--help"], "--max_step 3": ["--max_step", "3"]}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = make_parser(prog="python -m bench.bench_startup", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per command; medians are shown (default: 3)")
    parser.add_argument("--baseline", type=Path, default=None, help="another checkout to time side by side (default: none)")
    parser.add_argument("--only", nargs="+", default=None, help="entry point names to time (default: all)")
    parser.add_argument("--results_dir", type=Path, default=None, help="where to write startup.json (default: bench/results)")
    return parser.parse_args(argv)


def time_command(words: Sequence[str], cwd: Path) -> tuple[float, int]:
    """Wall seconds and exit status of ``python <words>`` run in ``cwd`` (output discarded)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(cwd))
    started = time.perf_counter()
    code = subprocess.run([sys.executable, *words], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL).returncode
    return time.perf_counter() - started, code


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    checkouts = {"this": REPO_ROOT, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    for name, path in checkouts.items():
        if not (path / "core" / "cli.py").is_file():
            raise UserError(f"{path} is not a checkout of this repository ({name})")
    entries = [e for e in ENTRY_POINTS if not args.only or e[0] in args.only]
    times: dict[tuple[str, str, str], list[float]] = {}
    for _ in range(args.repeats):  # interleaved: every command of both checkouts once per round
        for entry, words in entries:
            for case, extra in CASES.items():
                for checkout, path in checkouts.items():
                    seconds, _code = time_command([*words, *extra], path)
                    times.setdefault((entry, case, checkout), []).append(seconds)
    headers = ["entry point", *(f"{case} ({checkout}) s" for case in CASES for checkout in checkouts)]
    rows = [[entry, *(median(times[(entry, case, checkout)]) for case in CASES for checkout in checkouts)]
            for entry, _ in entries]
    print(format_table(headers, rows))
    slow = sum(1 for entry, _ in entries for case in CASES if median(times[(entry, case, "this")]) >= TARGET_S)
    total = len(entries) * len(CASES)
    print(f"\n{total - slow}/{total} commands of this checkout answered in under {TARGET_S} s (median of {args.repeats})")
    info = machine_info()
    command = command_line("bench.bench_startup", argv)
    print(f"machine: {describe_machine(info)}\ncommand: {command}")
    rows_out = {f"{entry} {case} ({checkout})": median(values) for (entry, case, checkout), values in times.items()}
    write_results("startup", {"machine": info, "command": command, "target_s": TARGET_S, "repeats": args.repeats,
                              "median_wall_s": rows_out, "under_target": f"{total - slow}/{total}"},
                  **({"results_dir": args.results_dir} if args.results_dir else {}))
    return 0


if __name__ == "__main__":
    run_cli(main)
