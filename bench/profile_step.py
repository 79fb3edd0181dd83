"""Where a training step's time goes: torch.profiler (CPU and CUDA activity) over our SFT step.

    python -m bench.profile_step --device cuda --precision bf16 --shape tinyllama --batch_size 16
    python -m bench.profile_step --device cuda --precision bf16 --shape tinyllama --batch_size 16 --packing
    python -m bench.profile_step --device cuda --shape tinyllama --sft_flag load_in_4bit=true   # sft.train_sft_cuda's preset step
    python -m bench.profile_step --model /path/to/llama --data data/processed/sft_train.jsonl --batch_size 2 --steps 3

It runs the bench's ``ours`` configuration (bench/train_worker.py: ``sft.train_sft_cuda`` on
``--device cuda``, ``sft.train_sft_mac`` on the CPU, through ``sft.training.run_sft`` with the same
flags, data and random model), skips ``--skip`` steps (allocator, kernel selection), profiles
``--steps`` optimizer steps and prints, in milliseconds per step:

- the step's wall time (CUDA-synchronised at both ends of the profiled window);
- host-device syncs per step: ``.item()``/``int()``/``float()`` on a device tensor
  (``aten::_local_scalar_dense``), ``aten::nonzero`` (boolean-mask indexing: a sync on CUDA),
  ``cudaStreamSynchronize``/``cudaDeviceSynchronize`` and device-to-host copies;
- the top operators by self CPU time (Python and launch overhead show here) and, on CUDA, by self
  GPU time (the kernels). ``--trace FILE.json`` also writes a Chrome trace (chrome://tracing);
- the same totals for the ``ceiling`` loop (bench/ceiling.py: a plain PyTorch loop on the same
  model, adapter, precision and tokens per step) side by side, and the operators ours calls more
  often per step than the ceiling does: where a GPU step is bound by kernel launches and Python
  (short rows, small batches), extra operator calls are extra time (``--no_ceiling`` skips it).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from bench.common import DEFAULT_TOKENIZER, SHAPES, build_random_llama, format_table, sample_rows, write_sft_jsonl  # noqa: E402
from core.cli import UserError, run_cli  # noqa: E402

SYNC_EVENTS = {"aten::_local_scalar_dense": ".item()/int() on a tensor", "aten::nonzero": "boolean-mask indexing",
               "cudaStreamSynchronize": "stream sync", "cudaDeviceSynchronize": "device sync",
               "Memcpy DtoH (Device -> Pageable)": "copy to host", "Memcpy DtoH (Device -> Pinned)": "copy to host"}

LAUNCH_EVENTS = {"cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx"}


def new_profiler(cuda: bool, skip: int, steps: int, with_stack: bool = False):
    """A profiler that records ``steps`` steps after ``skip`` (``.step()`` once per optimizer step)."""
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    schedule = torch.profiler.schedule(wait=max(0, skip - 1), warmup=min(1, skip), active=steps, repeat=1)
    return torch.profiler.profile(activities=activities, schedule=schedule, with_stack=with_stack)


class StepProfiler(TrainerCallback):
    """Profiles optimizer steps ``skip`` .. ``skip + steps`` of a Trainer run."""

    def __init__(self, skip: int, steps: int, cuda: bool, with_stack: bool = False):
        self.profiler = new_profiler(cuda, skip, steps, with_stack)
        self.skip, self.steps, self.cuda = skip, steps, cuda
        self.window_s: float | None = None
        self._window_start: float | None = None

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def on_train_begin(self, args, state, control, **kwargs):
        self.profiler.start()
        if self.skip == 0:
            self._window_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.profiler.step()
        if state.global_step == self.skip:
            self._sync()
            self._window_start = time.perf_counter()
        elif state.global_step == self.skip + self.steps and self._window_start is not None:
            self._sync()
            self.window_s = time.perf_counter() - self._window_start

    def on_train_end(self, args, state, control, **kwargs):
        self.profiler.stop()


def summarise(profiler, steps: int, top: int) -> dict[str, Any]:
    """Per-step milliseconds of the top operators by self CPU and self GPU time, and sync counts."""
    events = profiler.key_averages()
    rows = [{"name": e.key, "calls": e.count / steps, "self_cpu_ms": e.self_cpu_time_total / 1e3 / steps,
             "self_gpu_ms": getattr(e, "self_device_time_total", 0) / 1e3 / steps} for e in events]
    syncs = {name: next((r["calls"] for r in rows if r["name"] == name), 0.0) for name in SYNC_EVENTS}
    by_cpu = sorted(rows, key=lambda r: -r["self_cpu_ms"])[:top]
    by_gpu = sorted((r for r in rows if r["self_gpu_ms"] > 0), key=lambda r: -r["self_gpu_ms"])[:top]
    return {"syncs_per_step": syncs, "top_self_cpu": by_cpu, "top_self_gpu": by_gpu,
            "total_self_cpu_ms": sum(r["self_cpu_ms"] for r in rows), "total_self_gpu_ms": sum(r["self_gpu_ms"] for r in rows),
            "aten_calls": sum(r["calls"] for r in rows if r["name"].startswith("aten::")),
            "kernel_launches": sum(r["calls"] for r in rows if r["name"] in LAUNCH_EVENTS),
            "calls_by_op": {r["name"]: r["calls"] for r in rows if r["name"].startswith("aten::")}}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--model", help="a Llama-style model folder (default: a random Llama of --shape)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER))
    parser.add_argument("--data", help="SFT .jsonl or Alpaca .json (default: as bench_train)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_seq_length", type=int, default=512)
    parser.add_argument("--skip", type=int, default=3, help="steps run before profiling starts (default: 3)")
    parser.add_argument("--steps", type=int, default=5, help="profiled optimizer steps (default: 5)")
    parser.add_argument("--packing", action="store_true", help="profile --packing true (rows of batch_size x mean length tokens)")
    parser.add_argument("--sft_flag", action="append", default=[], metavar="KEY=VALUE", help="extra SFT config flag (repeatable)")
    parser.add_argument("--top", type=int, default=15, help="operators listed per table (default: 15)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--sync_sources", action="store_true", help="also list where each sync is called from (slower)")
    parser.add_argument("--trace", type=Path, help="also write a Chrome trace of the profiled steps here")
    parser.add_argument("--no_ceiling", action="store_true", help="do not profile the ceiling loop for comparison")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.skip < 0 or args.batch_size < 1:
        raise UserError("--steps and --batch_size must be >= 1 and --skip >= 0")
    if any("=" not in flag for flag in args.sft_flag):
        raise UserError(f"--sft_flag expects KEY=VALUE, got {args.sft_flag}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible to torch")
    return args


def profile(args: argparse.Namespace, work: Path) -> tuple[dict[str, Any], StepProfiler]:
    from bench.ceiling import mean_example_tokens
    from bench.train_worker import ours_argv
    from sft import train_sft_cuda, train_sft_mac
    from sft.training import run_sft

    total = args.skip + args.steps + 1  # the last step logs (reads the loss back): outside the window
    rows, _ = sample_rows(total * args.batch_size, args.seed, args.data)
    train_file = write_sft_jsonl(work / "train.jsonl", rows)
    model_dir = Path(args.model) if args.model else build_random_llama(work / "model", args.tokenizer, args.shape, args.seed)
    spec = {"model_dir": str(model_dir), "train_file": str(train_file), "val_file": str(train_file), "steps": total,
            "batch_size": args.batch_size, "max_seq_length": args.max_seq_length, "seed": args.seed,
            "device": args.device, "precision": args.precision, "load_in_4bit": False,
            "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                               "gate_proj", "up_proj", "down_proj"]},
            "ours_flags": dict(flag.split("=", 1) for flag in args.sft_flag)}
    if args.packing:
        spec["ours_flags"].update(packing=True, max_tokens_per_batch=args.batch_size * mean_example_tokens(spec))
    entry = train_sft_cuda if args.device == "cuda" else train_sft_mac
    plan = train_sft_cuda.plan_cuda if args.device == "cuda" else train_sft_mac.plan_mac
    profiler = StepProfiler(args.skip, args.steps, cuda=args.device == "cuda", with_stack=args.sync_sources)
    argv = ours_argv(spec, str(work / "out"))
    run_sft(argv, preset=entry.PRESET, plan_model=plan, prog=f"python -m {entry.__name__}", description="",
            entry_point=entry.__name__, callbacks=[profiler])
    if args.trace:
        profiler.profiler.export_chrome_trace(str(args.trace))
    result = summarise(profiler.profiler, args.steps, args.top)
    result["step_ms"] = profiler.window_s * 1e3 / args.steps if profiler.window_s else None
    result["argv"] = argv
    result["sync_sources"] = sync_sources(profiler.profiler, args.steps) if args.sync_sources else []
    result["ceiling"] = None if args.no_ceiling else profile_ceiling(args, spec)
    return result, profiler


def profile_ceiling(args: argparse.Namespace, spec: dict[str, Any]) -> dict[str, Any]:
    """The ceiling loop (bench/ceiling.py) on the same model, adapter and precision, with as many
    tokens per step as an average batch of ours, profiled over the same steps."""
    from bench.ceiling import (AUTOCAST_DTYPES, ceiling_throughput, example_sequences, load_ceiling_model, mean_length,
                               token_blocks)

    cuda = args.device == "cuda"
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    sequences = example_sequences(spec)
    block_len = mean_length(sequences)
    model = load_ceiling_model(spec["model_dir"], spec["lora"], device=device, precision=args.precision,
                               base_dtype=AUTOCAST_DTYPES.get(args.precision, torch.float32), seed=args.seed)
    profiler = new_profiler(cuda, args.skip, args.steps)
    profiler.start()
    timing = ceiling_throughput(model, token_blocks(sequences, args.batch_size, block_len), steps=args.steps,
                                warmup_steps=args.skip, precision=args.precision, device=device, on_step=profiler.step)
    profiler.stop()
    result = summarise(profiler, args.steps, args.top)
    result.update(step_ms=timing["train_s"] * 1e3 / args.steps, tokens_per_step=args.batch_size * block_len)
    return result


def extra_calls(ours: dict[str, Any], ceiling: dict[str, Any], top: int) -> list[tuple[str, float, float]]:
    """(operator, ours calls/step, ceiling calls/step) where ours calls it more often, most extra first."""
    names = set(ours["calls_by_op"]) | set(ceiling["calls_by_op"])
    rows = [(name, ours["calls_by_op"].get(name, 0.0), ceiling["calls_by_op"].get(name, 0.0)) for name in names]
    return sorted((r for r in rows if r[1] > r[2]), key=lambda r: r[2] - r[1])[:top]


def sync_sources(profiler, steps: int, depth: int = 8) -> list[tuple[float, str, str]]:
    """(calls per step, event, innermost Python frames outside torch) for every sync event."""
    found = []
    for event in profiler.key_averages(group_by_stack_n=depth):
        if event.key in SYNC_EVENTS and event.stack:
            frames = [f for f in event.stack if "torch/" not in f and "<built-in" not in f][:3]
            found.append((event.count / steps, event.key, " <- ".join(frames) or " <- ".join(event.stack[:3])))
    return sorted(found, reverse=True)


def report(result: dict[str, Any], args: argparse.Namespace) -> None:
    print(f"\nprofiled {args.steps} steps after {args.skip} on {args.device} ({args.precision}), batch {args.batch_size}"
          f"{', packed' if args.packing else ''}: {result['step_ms']:.1f} ms per step (wall)"
          if result["step_ms"] else "\nprofiled window incomplete (the run ended early)")
    print(f"self time per step, all operators: CPU {result['total_self_cpu_ms']:.1f} ms, GPU {result['total_self_gpu_ms']:.1f} ms")
    print("\nhost-device syncs per step:")
    print(format_table(["event", "what", "per step"],
                       [[name, SYNC_EVENTS[name], f"{count:.1f}"] for name, count in result["syncs_per_step"].items()]))
    for count, name, where in result["sync_sources"]:
        print(f"  {count:5.1f}/step {name}: {where}")
    print("\ntop operators by self CPU time (ms per step):")
    print(format_table(["operator", "calls/step", "self CPU ms", "self GPU ms"],
                       [[r["name"][:70], f"{r['calls']:.0f}", r["self_cpu_ms"], r["self_gpu_ms"]] for r in result["top_self_cpu"]]))
    if result["top_self_gpu"]:
        print("\ntop kernels/operators by self GPU time (ms per step):")
        print(format_table(["operator", "calls/step", "self GPU ms", "self CPU ms"],
                           [[r["name"][:70], f"{r['calls']:.0f}", r["self_gpu_ms"], r["self_cpu_ms"]] for r in result["top_self_gpu"]]))
    if result.get("ceiling"):
        report_ceiling(result, args)
    print("\ncommand: python -m bench.profile_step " + " ".join(sys.argv[1:]))


def report_ceiling(result: dict[str, Any], args: argparse.Namespace) -> None:
    ceiling = result["ceiling"]

    def totals(r: dict[str, Any]) -> list[Any]:
        syncs = sum(r["syncs_per_step"].values())
        return [f"{r['step_ms']:.1f}" if r.get("step_ms") else "-", f"{r['total_self_cpu_ms']:.1f}", f"{r['total_self_gpu_ms']:.1f}",
                f"{r['aten_calls']:.0f}", f"{r['kernel_launches']:.0f}" if args.device == "cuda" else "-", f"{syncs:.1f}"]

    print(f"\nours against the ceiling loop (same model, adapter and precision; {ceiling['tokens_per_step']} real tokens "
          "per ceiling step, an average batch of ours), per step:")
    print(format_table(["run", "wall ms", "self CPU ms", "self GPU ms", "aten calls", "kernel launches", "syncs"],
                       [["ours"] + totals(result), ["ceiling"] + totals(ceiling)]))
    print("\noperators ours calls more often than the ceiling (calls per step):")
    print(format_table(["operator", "ours", "ceiling", "extra"],
                       [[name[:60], f"{o:.0f}", f"{c:.0f}", f"{o - c:+.0f}"] for name, o, c in extra_calls(result, ceiling, args.top)]))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="profile_step_") as tmp:
        result, _ = profile(args, Path(tmp))
    report(result, args)
    return 0


if __name__ == "__main__":
    run_cli(main)
