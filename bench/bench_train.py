"""Training throughput: our SFT pipeline against the original recipe and TRL's SFTTrainer.

    python -m bench.bench_train --repeats 3 --wait_idle 600              # the CPU table in docs/performance.md
    python -m bench.bench_train --repeats 5 --steps 8 --batch_size 8
    python -m bench.bench_train --model path/to/llama                    # another model (and its tokenizer)
    python -m bench.bench_train --configs ours trl_best --ours_flag optim=adamw_torch_fused   # a what-if
    python -m bench.bench_train --device cuda --precision bf16 --shape tinyllama --batch_size 16   # on a GPU
    python -m bench.bench_train --device cuda --precision bf16 --shape tinyllama --batch_size 16 --load_in_4bit \
        --configs ours ours_packed ceiling original trl_best          # QLoRA rows

Every configuration trains the same LoRA adapter (r=16 on all linear projections) on the same
model, for the same optimizer steps over the same examples (one epoch of ``steps x batch_size``
real Alpaca rows rendered through our template), with the same seed:

- ``ours``: our pipeline as users run it: ``sft.train_sft_mac`` (``sft.train_sft_cuda`` with
  ``--device cuda``) through ``sft.training.run_sft`` with config flags, its preset deciding the rest;
- ``ours_packed``: the same with ``--packing true``, rows of ``batch_size`` x the examples' mean
  length tokens (the real tokens of an average unpadded batch per step, no padding);
- ``ceiling`` (default on cuda): the same model, adapter, precision and tokens in a plain PyTorch
  loop (bench/ceiling.py); every row is then also shown as a share of it, with its MFU;
- ``original``: the original study's recipe rebuilt on the plain transformers Trainer: every
  example padded to ``max_seq_length`` (512), prompt tokens in the loss, random order;
- ``trl_default``: TRL's SFTTrainer on prompt/completion rows with its defaults (only output_dir,
  max_length, steps, batch size, seed and report_to set);
- ``trl_best``: the same at its best for the device: no gradient checkpointing, length-grouped
  batches, completion-only loss, ``--precision`` (fp32 on CPU); on a CPU also ``trl_best_bf16``,
  since bf16 autocast is TRL's faster setting on CPUs with bf16 matrix instructions. The target
  counts against the faster of the two. (``ours_bf16`` is available on request.) On cuda also
  ``trl_padding_free`` (its ``padding_free=True``) and ``trl_packed`` (its ``packing=True``, bfd);
  "TRL at its best" is the fastest of its best rows. ``ours_liger`` (on request, CUDA with
  ``liger-kernel`` installed) is ours with ``--liger_kernels true``.

On cuda every configuration runs ``--warmup_steps`` (3) untimed steps before its clock starts and
then ``--steps`` (40) timed ones; on a CPU the defaults are 0 and 8 (the CPU tables in docs/performance.md).

Each run is a fresh process (so its peak memory is its own); repetitions rotate the order of the
configurations so none always runs first or last; the table shows medians. Time is the training
loop only (``on_train_begin`` to ``on_train_end``: no model loading, tokenization or saving), wall
clock and, for a shared machine, the process's CPU time. Useful tokens are the real (non-padding)
tokens fed to the model; padding efficiency is useful / processed (batch x padded length);
trained tokens are those that carry a loss. See bench/train_worker.py for how each is measured.
Other processes' CPU share during each run is recorded; ``--wait_idle`` waits for idle CPUs and
reruns disturbed runs (``--retries``).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # run as a file: make `bench` and `sft` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    DEFAULT_TOKENIZER, SHAPES, build_random_llama, child_env, command_line, count_parameters,
    BUSY_SHARE, print_run_footer, format_table, machine_info, median, run_child, sample_rows, tail,
    wait_until_idle, write_results, write_sft_jsonl,
)
from core.cli import UserError, run_cli  # noqa: E402
from bench.token_stats import full_data_padding  # noqa: E402
from core.config import ALL_LINEAR_LLAMA  # noqa: E402

CONFIGURATIONS = ("ours", "ours_packed", "ceiling", "original", "trl_default", "trl_best", "trl_best_bf16",
                  "trl_padding_free", "trl_packed", "ours_bf16", "ours_liger")
# On a CPU, TRL's fastest setting depends on the CPU: bf16 autocast wins where the CPU has bf16
# matrix instructions (AVX512-BF16, AMX), fp32 elsewhere; both are run and the faster counts.
# On a GPU, TRL at its best also means its padding-free rows and its packing.
DEFAULT_CONFIGS = {"cpu": ["ours", "ours_packed", "original", "trl_default", "trl_best", "trl_best_bf16"],
                   "cuda": ["ours", "ours_packed", "ceiling", "original", "trl_default", "trl_best",
                            "trl_padding_free", "trl_packed"]}
DEFAULT_STEPS = {"cpu": 8, "cuda": 40}  # timed steps; on a GPU, >= 40 so one slow step cannot dominate
DEFAULT_WARMUP = {"cpu": 0, "cuda": 3}  # untimed first steps (allocator, kernel choice); the same for every row
DESCRIPTIONS = {
    "ours": "our sft pipeline (sft.train_sft_mac)",
    "ours_packed": "our sft pipeline, --packing true",
    "ours_bf16": "our sft pipeline, --precision bf16",
    "ours_liger": "our sft pipeline, --liger_kernels true",
    "ceiling": "ceiling: plain PyTorch loop, dense real tokens",
    "original": "original recipe: pad to max_seq_length, loss on prompt, random order",
    "trl_default": "TRL SFTTrainer, defaults",
    "trl_best": "TRL SFTTrainer, best for device",
    "trl_best_bf16": "TRL SFTTrainer, best for device but bf16",
    "trl_padding_free": "TRL SFTTrainer, best + padding_free",
    "trl_packed": "TRL SFTTrainer, best + packing (bfd)",
}
LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": ALL_LINEAR_LLAMA}
OURS = ("ours", "ours_packed", "ours_liger")
# ours / configuration, in useful tokens/s; TRL "at its best" is the fastest of its best rows.
TARGETS = {"original": ("original recipe", ["original"], {"cpu": 3.5, "cuda": 3.0}),
           "trl_default": ("TRL defaults", ["trl_default"], {"cpu": 2.0, "cuda": None}),
           "trl_best": ("TRL at its best", ["trl_best", "trl_best_bf16", "trl_padding_free", "trl_packed"],
                        {"cpu": 2.0, "cuda": 2.0})}
TARGET_CEILING_SHARE = 0.70  # on a GPU: ours >= 70% of the plain PyTorch loop's tokens/s
TARGET_QLORA_VS_ORIGINAL = 2.0  # on a GPU in 4-bit: ours >= 2x the original recipe in 4-bit
TARGET_PADDING_EFFICIENCY = 0.95


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", choices=CONFIGURATIONS,
                        help=f"configurations to run (default on cpu: {' '.join(DEFAULT_CONFIGS['cpu'])}; on cuda: {' '.join(DEFAULT_CONFIGS['cuda'])})")
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration; medians are reported (default: 3)")
    parser.add_argument("--steps", type=int, default=None, help="timed optimizer steps per run (default: 8 on cpu, 40 on cuda)")
    parser.add_argument("--warmup_steps", type=int, default=None,
                        help="optimizer steps run before every configuration's clock starts (default: 0 on cpu, 3 on cuda)")
    parser.add_argument("--batch_size", type=int, default=8, help="examples per step (default: 8)")
    parser.add_argument("--max_seq_length", type=int, default=512, help="longest example; the original recipe pads to it (default: 512)")
    parser.add_argument("--model", help="a model folder to use instead of a random Llama (must be a Llama-style causal LM)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small", help="shape of the random Llama (default: small, ~45M parameters)")
    parser.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER), help="tokenizer for the random Llama (default: the TinyLlama tokenizer)")
    parser.add_argument("--data", help="SFT .jsonl (prepared) or Alpaca .json (default: data/processed/sft_train.jsonl, else raw Alpaca)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="compute precision of ours, original and trl_best (default: fp32)")
    parser.add_argument("--load_in_4bit", action="store_true", help="QLoRA: load the base model in 4-bit NF4 for every configuration")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads per run (default: 2)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--wait_idle", type=float, default=0, metavar="SECONDS",
                        help="before each run, wait up to this long for the CPUs to be idle (for shared machines; default: 0 = off)")
    parser.add_argument("--retries", type=int, default=2,
                        help="with --wait_idle: run a configuration again (up to this many times) when other processes took over 10%% of the CPUs during it (default: 2)")
    parser.add_argument("--ours_flag", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config flag for our pipeline, to measure a change (e.g. optim=adamw_torch; repeatable)")
    parser.add_argument("--skip_full_data_padding", action="store_true",
                        help="skip measuring padding efficiency over the whole training file (tokenizes it once; cached)")
    parser.add_argument("--results_dir", type=Path, default=None, help="where to write train.json (default: bench/results)")
    args = parser.parse_args(argv)
    args.configs = args.configs or DEFAULT_CONFIGS[args.device]
    args.steps = DEFAULT_STEPS[args.device] if args.steps is None else args.steps
    args.warmup_steps = DEFAULT_WARMUP[args.device] if args.warmup_steps is None else args.warmup_steps
    if args.warmup_steps < 0:
        raise UserError(f"--warmup_steps must be >= 0, got {args.warmup_steps}")
    if any("=" not in flag for flag in args.ours_flag):
        raise UserError(f"--ours_flag expects KEY=VALUE, got {args.ours_flag}")
    for name in ("repeats", "steps", "batch_size", "threads"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.load_in_4bit and args.device != "cuda":
        raise UserError("--load_in_4bit (QLoRA) needs --device cuda: our CPU/Mac entry point trains full-precision LoRA")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA GPU is visible to torch")
    return args


# ----------------------------------------------------------------------------- setup


def make_spec(args: argparse.Namespace, work: Path, model_dir: Path, train_file: Path) -> dict[str, Any]:
    return {
        "model_dir": str(model_dir), "train_file": str(train_file), "val_file": str(train_file),
        "steps": args.steps, "warmup_steps": args.warmup_steps, "batch_size": args.batch_size,
        "max_seq_length": args.max_seq_length,
        "seed": args.seed, "device": args.device, "precision": args.precision, "load_in_4bit": args.load_in_4bit,
        "threads": args.threads, "lora": LORA, "work_dir": str(work),
        "ours_flags": dict(flag.split("=", 1) for flag in args.ours_flag),
    }


# ----------------------------------------------------------------------------- runs


def run_once(config: str, spec: dict, work: Path, index: int, wait_idle: float) -> dict:
    """One configuration in a fresh process; its result plus the process's own peak memory and
    the CPU share other processes took while it ran."""
    spec_file = work / f"spec-{config}-{index}.json"
    result_file = work / f"result-{config}-{index}.json"
    spec_file.write_text(json.dumps({**spec, "config": config}), encoding="utf-8")
    waited = wait_until_idle(max_wait_s=wait_idle) if wait_idle > 0 else 0.0
    run = run_child([sys.executable, "-m", "bench.train_worker", str(spec_file), str(result_file)], env=child_env(spec["threads"]))
    if run.returncode != 0 or not result_file.is_file():
        raise UserError(f"configuration {config!r} failed (exit {run.returncode}):\n{tail(run.log, 25)}")
    result = json.loads(result_file.read_text(encoding="utf-8"))
    result.update(peak_rss_mb=run.peak_rss_mb, process_wall_s=run.wall_s, others_cpu_share=run.others_cpu_share,
                  waited_for_idle_s=waited)
    return result


def rotated(configs: Sequence[str], repetition: int) -> list[str]:
    """Configuration order for one repetition: rotated, so each takes every position in turn."""
    shift = repetition % len(configs)
    return list(configs[shift:]) + list(configs[:shift])


def run_all(args: argparse.Namespace, spec: dict, work: Path) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {config: [] for config in args.configs}
    total = args.repeats * len(args.configs)
    done = attempts = 0
    for repetition in range(args.repeats):
        for config in rotated(args.configs, repetition):
            tries = []
            for _ in range(1 + (args.retries if args.wait_idle > 0 else 0)):
                result = run_once(config, spec, work, attempts, args.wait_idle)
                attempts += 1
                tries.append(result)
                if not is_disturbed(result):
                    break
                print(f"      {config}: other processes used {result['others_cpu_share']:.0%} of the CPUs; "
                      f"{'running it again' if len(tries) <= args.retries and args.wait_idle > 0 else 'keeping it'}", flush=True)
            result = min(tries, key=lambda r: r["others_cpu_share"] or 0.0)  # the least disturbed attempt
            result["discarded_attempts"] = len(tries) - 1
            runs[config].append(result)
            done += 1
            print(f"  [{done}/{total}] {config:<13} train {result['train_s']:7.2f} s (CPU {result['cpu_s']:6.1f} s)  "
                  f"{result['useful_tokens'] / result['train_s']:8,.0f} useful tok/s  "
                  f"padding eff {result['useful_tokens'] / result['processed_tokens']:.2f}  "
                  f"peak RSS {result['peak_rss_mb']:,.0f} MiB{others_note(result['others_cpu_share'])}", flush=True)
    return runs


def is_disturbed(result: dict) -> bool:
    return (result["others_cpu_share"] or 0.0) > BUSY_SHARE


# ----------------------------------------------------------------------------- summary


def others_note(share: float | None) -> str:
    return f"  (others used {share:.0%} of the CPUs)" if share is not None and share > BUSY_SHARE else ""


def summarise(runs: dict[str, list[dict]]) -> dict[str, dict]:
    summary = {}
    for config, results in runs.items():
        first = results[0]
        summary[config] = {
            "train_s": median([r["train_s"] for r in results]),
            "cpu_s": median([r["cpu_s"] for r in results]),
            "useful_tok_s": median([r["useful_tokens"] / r["train_s"] for r in results]),
            "useful_tokens": first["useful_tokens"], "processed_tokens": first["processed_tokens"],
            "supervised_tokens": first["supervised_tokens"],
            "padding_efficiency": median([r["useful_tokens"] / r["processed_tokens"] for r in results]),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
            "gpu_peak_mb": max((r["gpu_peak_mb"] or 0) for r in results) or None,
            "settings": first["settings"],
            "others_cpu_share_median": median([r["others_cpu_share"] for r in results if r["others_cpu_share"] is not None]),
        }
    if "ours" in summary:
        for config, row in summary.items():
            row["ours_speedup"] = summary["ours"]["useful_tok_s"] / row["useful_tok_s"]
    add_ceiling_shares(summary, runs.get("ceiling"))
    return summary


def add_ceiling_shares(summary: dict[str, dict], ceiling_runs: list[dict] | None) -> None:
    """Every row's tokens/s as a share of the ceiling's, and its MFU: useful tokens/s x the
    ceiling's FLOPs per token (4 per frozen, 6 per trained matmul weight: the same model and
    adapter) / the GPU's dense peak. MFU is None where no peak is known (CPUs)."""
    if not ceiling_runs:
        return
    per_token, peak = ceiling_runs[0]["flops_per_token"], ceiling_runs[0]["peak_tflops"]
    for row in summary.values():
        row["ceiling_share"] = row["useful_tok_s"] / summary["ceiling"]["useful_tok_s"]
        row["mfu"] = row["useful_tok_s"] * per_token / (peak * 1e12) if peak else None


def table(summary: dict[str, dict], gpu: bool, ours_flags: dict[str, str]) -> str:
    ceiling = "ceiling" in summary
    headers = ["configuration", "train s", "CPU s", "useful tok/s", "ours is x faster"]
    headers += ["share of ceiling", "MFU"] if ceiling else []
    headers += ["padding eff.", "useful / processed tokens", "trained tokens", "peak RSS MiB"]
    headers += ["peak GPU MiB"] if gpu else []
    rows = []
    for config, row in summary.items():
        name = DESCRIPTIONS[config]
        if config in OURS and ours_flags:
            name += " with " + ", ".join(f"{k}={v}" for k, v in ours_flags.items())
        cells = [name, row["train_s"], row["cpu_s"], row["useful_tok_s"], row.get("ours_speedup")]
        if ceiling:
            mfu = row.get("mfu")
            cells += [f"{row['ceiling_share']:.0%}", f"{mfu:.1%}" if mfu is not None else None]
        cells += [f"{row['padding_efficiency']:.3f}", f"{row['useful_tokens']:,} / {row['processed_tokens']:,}",
                  row["supervised_tokens"], row["peak_rss_mb"]]
        if gpu:
            cells.append(row["gpu_peak_mb"])
        rows.append(cells)
    return format_table(headers, rows)


def _verdict(got: float, needed: float) -> str:
    return "met" if got >= needed else "MISSED"


def target_lines(summary: dict[str, dict], full_padding: dict | None, device: str = "cpu",
                 load_in_4bit: bool = False) -> list[str]:
    """One line per target and variant of ours (unpacked, packed): the measured value, the target, met or missed."""
    lines = []
    for ours in (o for o in OURS if o in summary):
        speed = summary[ours]["useful_tok_s"]
        for key, (name, configs, needed_by_device) in TARGETS.items():
            needed = TARGET_QLORA_VS_ORIGINAL if (key == "original" and load_in_4bit) else needed_by_device[device]
            present = [c for c in configs if c in summary]
            if present and needed:
                got = speed / max(summary[c]["useful_tok_s"] for c in present)
                lines.append(f"{ours} vs {name}: {got:.2f}x useful tok/s (target >= {needed}x): {_verdict(got, needed)}")
        if "ceiling" in summary and device == "cuda":
            got = summary[ours]["ceiling_share"]
            lines.append(f"{ours} vs the plain PyTorch ceiling: {got:.0%} of its tokens/s "
                         f"(target >= {TARGET_CEILING_SHARE:.0%}): {_verdict(got, TARGET_CEILING_SHARE)}")
        eff = summary[ours]["padding_efficiency"]
        lines.append(f"{ours} padding efficiency in these runs ({summary[ours]['useful_tokens']:,} real tokens): {eff:.3f}")
    if full_padding and "ours" in summary:
        eff = full_padding["ours (length-grouped, dynamic)"]
        lines.append(f"ours padding efficiency over the full training file ({full_padding['examples']:,} examples, "
                     f"batch {full_padding['batch_size']}): {eff:.3f} (target >= {TARGET_PADDING_EFFICIENCY}): "
                     f"{_verdict(eff, TARGET_PADDING_EFFICIENCY)}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        work = Path(tmp)
        rows, data_path = sample_rows((args.warmup_steps + args.steps) * args.batch_size, args.seed, args.data)
        train_file = write_sft_jsonl(work / "train.jsonl", rows)
        if args.model:
            model_dir = Path(args.model)
            model_name = str(model_dir)
        else:
            print(f"building a random Llama ({args.shape}) with the tokenizer {args.tokenizer} ...", flush=True)
            model_dir = build_random_llama(work / "model", args.tokenizer, args.shape, args.seed)
            model_name = f"random Llama ({args.shape}) with tokenizer {args.tokenizer}"
        parameters = count_parameters(model_dir)
        print(f"model: {model_name}, {parameters / 1e6:.1f}M parameters; data: {len(rows)} rows sampled from {data_path}")
        spec = make_spec(args, work, model_dir, train_file)
        runs = run_all(args, spec, work)
        full_padding = None if args.skip_full_data_padding else full_data_padding(args, data_path, model_dir)

    summary = summarise(runs)
    info = machine_info()
    info["torch_threads"] = args.threads
    text = table(summary, gpu=args.device == "cuda", ours_flags=spec["ours_flags"])
    command = command_line("bench.bench_train", argv)
    print(f"\nTraining throughput: {args.steps} timed steps (after {args.warmup_steps} untimed) x batch "
          f"{args.batch_size} ({len(rows)} examples), "
          f"LoRA r={LORA['r']} on all linear projections, {args.precision}{', 4-bit base' if args.load_in_4bit else ''}, "
          f"{args.device}; median of {args.repeats}")
    print(f"model: {model_name}, {parameters / 1e6:.1f}M parameters; data: {data_path}")
    print(text)
    if full_padding:
        print(f"\npadding efficiency over the full training file ({full_padding['examples']:,} examples, batch "
              f"{full_padding['batch_size']}, padded to a multiple of {full_padding['pad_to_multiple_of']}):")
        print(format_table(["batching", "real / processed tokens"],
                           [[k, f"{v:.3f}"] for k, v in full_padding.items() if isinstance(v, float)]))
    targets = target_lines(summary, full_padding, args.device, args.load_in_4bit)
    for line in targets:
        print(line)
    print_run_footer(summary, info, command)
    path = write_results("train", {
        "command": command, "machine": info, "model": model_name, "parameters": parameters, "data": str(data_path),
        "settings": {k: v for k, v in spec.items() if k not in ("work_dir", "model_dir", "train_file", "val_file")},
        "summary": summary, "runs": runs, "table": text, "full_data_padding": full_padding, "targets": targets,
    }, **({"results_dir": args.results_dir} if args.results_dir else {}))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    run_cli(main)
