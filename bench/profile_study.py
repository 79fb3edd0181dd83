"""Where a study's time went, stage by stage and phase by phase, beside the floor of each.

    python -m bench.profile_study STUDY_DIR                 # measures this machine's matmul FLOP/s once
    python -m bench.profile_study STUDY_DIR --gflops 166    # or takes it as given (another machine's, say)

For every stage in ``STUDY_DIR/study.json``: its wall time (``study.json``'s, which includes the
process start), and from its run's ``metrics.json`` the phases its run timed (``core/phases.py``:
data, model load, trainer build, engine start, training compute, reference / reward forwards,
generation, weight pushes, held-out evaluation, checkpoints, logging, outputs, other), each beside
its floor (and the process start before the run's clock: the stage's seconds less its run's): counted tokens x FLOPs per token / FLOP/s, and the share of the floor reached
(floor / seconds: 100% would be the matmuls alone at the measured rate). Which tokens each phase
counts and the FLOPs-per-token rule (~4N per LoRA-trained token, 6N with full fine-tuning, 2N per
forwarded or generated token) are in ``bench/stage_floors.py``. Peak RSS per stage, MiB.

The FLOP/s is this machine's best of a few rounds of ``torch.nn.functional.linear`` over the study
model's own linear shapes at ``--rows`` rows (``bench/decode_ceiling.py``), in the run's precision,
with all torch threads or one, whichever is faster (a floor is the best the machine can do).
Runs made before the phase clock have no phase breakdown: their stage total stands against the
floor of the tokens they counted. On a shared machine the seconds are not the machine's speed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # run as a file: make `bench` and `core` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import format_table  # noqa: E402
from bench.stage_floors import (ModelFlops, counted_tokens, lora_parameters, peak_rss, phase_rows,  # noqa: E402
                                read_json, stage_floor, stage_output_dir)
from core.cli import UserError, make_parser, run_cli  # noqa: E402

TRAINING_ROWS = 512  # tokens per matmul in the throughput probe: a training micro-batch's order of size
NO_PHASES = "no phase breakdown (run before phase timing)"
STARTUP = "process start (python, imports)"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = make_parser(prog="python -m bench.profile_study", description=__doc__.split("\n\n")[0])
    parser.add_argument("study_dir", type=Path, help="a study folder (holds study.json)")
    parser.add_argument("--gflops", type=float, default=None,
                        help="matmul GFLOP/s to measure floors against (default: measured here, in each run's precision)")
    parser.add_argument("--rows", type=int, default=TRAINING_ROWS, help=f"rows of the throughput probe (default {TRAINING_ROWS})")
    args = parser.parse_args(argv)
    if args.gflops is not None and args.gflops <= 0:
        raise UserError(f"--gflops must be > 0, got {args.gflops}")
    if args.rows < 1:
        raise UserError(f"--rows must be >= 1, got {args.rows}")
    return args


def read_study(study_dir: Path) -> dict:
    record = read_json(study_dir / "study.json")
    if not isinstance(record, dict) or not isinstance(record.get("stages"), dict):
        raise UserError(f"{study_dir} holds no readable study.json: is it the --out_dir of scripts/run_study.py?")
    return record


def meta_model(model: str, study_dir: Path):
    """The study's model on the meta device (its config only: no weights read), or None when not found here."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    local = study_dir / model
    source = str(local) if not Path(model).is_absolute() and local.exists() else model
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError):
        return None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def linear_layers(model) -> dict[str, tuple[int, int]]:
    import torch

    return {name: (m.in_features, m.out_features) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def measured_flop_per_s(model, precision: str, rows: int) -> tuple[float, int]:
    """This machine's best matmul FLOP/s over the model's linear shapes at ``rows`` rows, and the torch threads
    it was reached with: all of them or one (on a busy CPU, threads that wait for each other at every small
    matmul run it up to 40x slower than one thread alone; measured here, 2 cores: 2 vs 94 GFLOP/s at 512x64x512)."""
    import torch

    from bench.decode_ceiling import decode_ceiling, linear_shapes

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    threads = torch.get_num_threads()
    best = (0.0, threads)
    try:
        for count in dict.fromkeys((threads, 1)):
            torch.set_num_threads(count)
            rate = decode_ceiling(linear_shapes(model), rows, dtype=dtype, repeats=3)["gflop_per_s"] * 1e9
            best = max(best, (rate, count))
    finally:
        torch.set_num_threads(threads)
    return best


class Throughput:
    """FLOP/s per precision: given once (``--gflops``), or measured on first need."""

    def __init__(self, model, gflops: float | None, rows: int):
        self.model, self.rows, self.given = model, rows, gflops
        self.measured: dict[str, tuple[float, int]] = {}  # precision -> (FLOP/s, torch threads)

    def __call__(self, precision: str) -> float | None:
        if self.given is not None:
            return self.given * 1e9
        if self.model is None:
            return None
        if precision not in self.measured:
            self.measured[precision] = measured_flop_per_s(self.model, precision, self.rows)
        return self.measured[precision][0]


def stage_table_rows(name: str, info: dict, study_dir: Path, base: ModelFlops | None, layers: dict,
                     throughput: Throughput) -> list[list]:
    """The stage's total row, then one row per phase."""
    from core.runs import run_stage

    out = stage_output_dir(info.get("command") or [])
    run_dir = study_dir / out if out else None
    metrics = (read_json(run_dir / "metrics.json") if run_dir else None) or {}
    kind = run_stage(run_dir) if run_dir and run_dir.is_dir() else None
    flops = None
    if base is not None:
        adapter = read_json(run_dir / "adapter_config.json") if run_dir else None
        flops = ModelFlops(base.frozen, base.trained + lora_parameters(layers, adapter))
    phases = (metrics.get("phases") or {}).get("seconds")
    rate = throughput(metrics.get("precision", "fp32")) if kind else None
    rows = phase_rows(kind, phases, counted_tokens(kind, run_dir, metrics) if run_dir else {}, flops, rate)
    seconds = info.get("seconds") or metrics.get("wall_time_seconds_this_session")
    floor = stage_floor(rows)
    note = "" if phases or not metrics else NO_PHASES
    table = [[name, "total" + (f": {note}" if note else ""), seconds, None, _floor(floor),
              _share(floor, seconds), peak_rss(metrics)]]
    table += [["", row.phase, row.seconds, row.tokens, _floor(row.floor_seconds), _share(row.floor_seconds, row.seconds), None]
              for row in rows]
    wall = (metrics.get("phases") or {}).get("wall_seconds")
    if phases and seconds and wall:  # the study's seconds include the process start the run's clock cannot see
        table.append(["", STARTUP, max(0.0, seconds - wall), None, None, None, None])
    return table


def _share(floor: float | None, seconds: float | None) -> str | None:
    if floor is None or not seconds:
        return None
    share = floor / seconds
    return f"{share:.1%}" if share >= 0.01 else f"{share * 100:.2g}%" if share else "0%"


def _floor(seconds: float | None) -> str | None:
    """Floors of a tiny model are milliseconds: three significant digits, not two decimals."""
    return None if seconds is None else f"{seconds:,.1f}" if seconds >= 100 else f"{seconds:.3g}"


def profile(study_dir: Path, gflops: float | None = None, rows: int = TRAINING_ROWS) -> str:
    """The profile table and the lines that say what it was measured against."""
    from bench.ceiling import matmul_parameters

    record = read_study(study_dir)
    model_name = record.get("model") or ""
    model = meta_model(model_name, study_dir) if model_name else None
    base = ModelFlops(*matmul_parameters(model)) if model is not None else None
    layers = linear_layers(model) if model is not None else {}
    if base is not None:  # the base is frozen in every stage: what a run trained is its adapter
        base = ModelFlops(base.frozen + base.trained, 0)
    throughput = Throughput(model, gflops, rows)
    table = []
    for name, info in record["stages"].items():
        table += stage_table_rows(name, info, study_dir, base, layers, throughput)
    headers = ["stage", "phase", "seconds", "tokens", "floor s", "share of floor", "peak RSS MiB"]
    lines = [format_table(headers, table), ""]
    if base is None:
        lines.append(f"no floors: the study's model {model_name!r} has no config here")
    else:
        lines.append(f"model {model_name}: {base.frozen:,} matmul weights (2N = {base.forward_per_token:,} FLOPs per "
                     "forwarded token; trained tokens 4N + 6 x the adapter's; bench/stage_floors.py)")
    if gflops is not None:
        lines.append(f"floors at {gflops:,.1f} GFLOP/s (given)")
    for precision, (rate, threads) in throughput.measured.items():
        lines.append(f"floors at {rate / 1e9:,.1f} GFLOP/s: this machine's best {precision} matmul over the model's "
                     f"linear shapes at {rows} rows ({threads} torch thread{'s' if threads > 1 else ''})")
    from core.environment import cpu_flags, cpu_model

    bf16 = [flag for flag in cpu_flags() if flag in ("avx512_bf16", "amx_bf16")]
    lines.append(f"machine: {cpu_model()} ({', '.join(bf16) or 'no avx512_bf16 / amx_bf16'}); stage seconds from study.json (process start included), phases from each "
                 "run's metrics.json (core/phases.py)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    print(profile(args.study_dir, args.gflops, args.rows))
    return 0


if __name__ == "__main__":
    run_cli(main)
