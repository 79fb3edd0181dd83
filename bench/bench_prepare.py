"""Preparation benchmark: wall time and peak memory of scripts/prepare_sft_data.py on the real data.

    python -m bench.bench_prepare --alpaca path/to/alpaca_data.json \
        --code path/to/code_alpaca_2k.json --repeats 5 --wait_idle 600
    python -m bench.bench_prepare --alpaca data/raw/alpaca_data.json --code data/raw/cleaned_data.json

Each repetition runs the script exactly as a user does (a fresh ``python`` process, so interpreter
start-up and imports count) on a temporary copy of the inputs, writing to a temporary folder.
Times are medians over ``--repeats``; peak memory is the child's own ``ru_maxrss``.

The target is "under 3 s for the 72k records" of Alpaca (52,002) + cleaned Code Alpaca 20k
(20,022). When the code file given is smaller (the official 2k subset), a second row also runs on
the code records cycled up to ``--code_records`` (each copy's instruction numbered so none is a
duplicate): the same work per record as the full file, clearly labelled as extended.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # run as a file: make `bench` and `sft` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    REPO_ROOT, SHARED_DIR, child_env, command_line, print_run_footer, format_table, machine_info,
    median, run_child, tail, wait_until_idle, write_results,
)
from core.cli import UserError, run_cli  # noqa: E402

PREPARE_SCRIPT = REPO_ROOT / "scripts" / "prepare_sft_data.py"
TARGET_SECONDS = 3.0
FULL_CODE_RECORDS = 20_022  # records in code_alpaca_20k.json, the file the original study cleaned


def shared(relative: str) -> tuple[Path, ...]:
    """The file under $BENCH_SHARED_DIR (local material on an offline machine), if that is set."""
    return (SHARED_DIR / relative,) if SHARED_DIR else ()


def first_existing(*paths: Path) -> Path | None:
    return next((p for p in paths if p.is_file()), None)


def parse_args(argv: Sequence[str] | None):
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.bench_prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--alpaca", type=Path, help="Alpaca JSON file (default: data/raw/alpaca_data.json, else $BENCH_SHARED_DIR/data/alpaca_data.json)")
    parser.add_argument("--code", type=Path, help="Code Alpaca JSON file (default: data/raw/cleaned_data.json, else $BENCH_SHARED_DIR/data/code_alpaca_2k.json)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per input set; the median is reported (default: 3)")
    parser.add_argument("--code_records", type=int, default=FULL_CODE_RECORDS,
                        help=f"also run with the code file cycled up to this many records when it has fewer (0 = skip; default: {FULL_CODE_RECORDS})")
    parser.add_argument("--wait_idle", type=float, default=0, metavar="SECONDS",
                        help="before each run, wait up to this long for the CPUs to be idle (shared machines; default: 0 = off)")
    parser.add_argument("--script", type=Path, default=PREPARE_SCRIPT, help="the preparation script to time")
    parser.add_argument("--results_dir", type=Path, default=None, help="where to write prepare.json (default: bench/results)")
    args = parser.parse_args(argv)
    args.alpaca = args.alpaca or first_existing(REPO_ROOT / "data/raw/alpaca_data.json", *shared("data/alpaca_data.json"))
    args.code = args.code or first_existing(REPO_ROOT / "data/raw/cleaned_data.json", *shared("data/code_alpaca_2k.json"))
    for name in ("alpaca", "code"):
        path = getattr(args, name)
        if path is None or not Path(path).is_file():
            raise UserError(f"--{name} file not found: {path or '(no default file exists; pass --' + name + ' PATH)'}")
    if args.repeats < 1:
        raise UserError(f"--repeats must be >= 1, got {args.repeats}")
    if not args.script.is_file():
        raise UserError(f"preparation script not found: {args.script}")
    return args


def extended_code_file(code: Path, records: int, out: Path) -> Path | None:
    """The code records cycled up to ``records`` (None if the file already has that many)."""
    original = json.loads(code.read_text(encoding="utf-8"))
    if len(original) >= records:
        return None
    rows = []
    for i in range(records):
        record = dict(original[i % len(original)])
        copy = i // len(original)
        if copy:  # numbered so the copy is a new prompt, not a duplicate the script drops
            record["instruction"] = f"{record.get('instruction', '')} (variant {copy})"
        rows.append(record)
    out.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return out


def time_prepare(script: Path, sources: Sequence[Path], work: Path, repeats: int, wait_idle: float = 0) -> dict:
    """Run the script ``repeats`` times on ``sources``; wall times, peak memory, record counts."""
    raw = work / "raw"
    raw.mkdir(parents=True)
    for source in sources:
        (raw / source.name).symlink_to(source.resolve())
    walls, peaks, others = [], [], []
    for i in range(repeats):
        if wait_idle > 0:
            wait_until_idle(max_wait_s=wait_idle)
        out = work / f"out{i}"
        argv = [sys.executable, str(script), "--raw_dir", str(raw), "--out_dir", str(out),
                "--sources", *(s.name for s in sources)]
        run = run_child(argv, env=child_env(threads=2))
        if run.returncode != 0:
            raise UserError(f"{script.name} failed (exit {run.returncode}):\n{tail(run.log)}")
        walls.append(run.wall_s)
        peaks.append(run.peak_rss_mb)
        if run.others_cpu_share is not None:
            others.append(run.others_cpu_share)
        note = f"  (others used {run.others_cpu_share:.0%} of the CPUs)" if (run.others_cpu_share or 0) > 0.1 else ""
        print(f"  run {i + 1}/{repeats}: {run.wall_s:.2f} s, peak RSS {run.peak_rss_mb:,.0f} MiB{note}", flush=True)
    totals = json.loads((work / "out0" / "stats.json").read_text(encoding="utf-8"))["totals"]
    return {
        "sources": [str(s) for s in sources], "wall_s": walls, "peak_rss_mb": peaks,
        "wall_s_median": median(walls), "peak_rss_mb_max": max(peaks), "others_cpu_share_median": median(others),
        "records_read": totals["read"], "records_kept": totals["kept"], "train": totals["train"], "val": totals["val"],
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench_prepare_") as tmp:
        tmp = Path(tmp)
        print(f"real files: {args.alpaca} + {args.code}")
        runs["real files"] = time_prepare(args.script, [args.alpaca, args.code], tmp / "real", args.repeats, args.wait_idle)
        if args.code_records:
            extended = extended_code_file(args.code, args.code_records, tmp / f"{args.code.stem}_x{args.code_records}.json")
            if extended is not None:
                print(f"code file cycled up to {args.code_records:,} records (numbered copies): {extended.name}")
                runs[f"code extended to {args.code_records:,}"] = time_prepare(args.script, [args.alpaca, extended], tmp / "ext", args.repeats, args.wait_idle)

    info = machine_info()
    headers = ["input", "records read", "kept", "wall s (median)", "records/s", "peak RSS MiB", f"< {TARGET_SECONDS:g} s"]
    rows = [
        [name, r["records_read"], r["records_kept"], r["wall_s_median"], r["records_read"] / r["wall_s_median"],
         r["peak_rss_mb_max"], "yes" if r["wall_s_median"] < TARGET_SECONDS else "NO"]
        for name, r in runs.items()
    ]
    table = format_table(headers, rows)
    command = command_line("bench.bench_prepare", argv)
    print(f"\nscripts/prepare_sft_data.py, median of {args.repeats} fresh processes (start-up and imports included)")
    print(table)
    print_run_footer(runs, info, command)
    path = write_results("prepare", {"command": command, "machine": info, "runs": runs, "table": table},
                         **({"results_dir": args.results_dir} if args.results_dir else {}))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    run_cli(main)
