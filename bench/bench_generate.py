"""Generation throughput of the eval script: batched against one prompt at a time, and hf against vllm.

    python -m bench.bench_generate --wait_idle 600          # 16 prompts, the CPU table in docs/performance.md
    python -m bench.bench_generate --model path/to/stories260K --max_new_tokens 128
    python -m bench.bench_generate --device cuda --shape tinyllama --precision bf16
    python -m bench.bench_generate --model path/to/SmolLM2-135M-Instruct --ifeval ifeval_input_data.jsonl \
        --template chat --num_prompts 48 --max_new_tokens 256 --engines hf vllm --repeats 1   # engine rows

Engine rows (``--engines hf vllm``): the hf rows are ``core.engines.HFEngine`` at each batch size, the
vllm row is ``core.engines.EnginePool`` as ``sft.eval_sft --engine vllm`` builds it (a merged copy of
the adapter, one engine); same prompt token ids, same stop ids. Load time is reported apart from
generation time; peak memory is this process's for hf and the vLLM engine processes' (sampled) for
vllm. ``--ifeval FILE`` takes the first ``--num_prompts`` IFEval prompts, rendered with ``--template``
(``chat``: the tokenizer's chat template).

The model is set up the way ``python -m sft.eval_sft`` sets it up (its own functions): a base model
with a LoRA adapter (r=16 on all linear projections, read from an adapter dir with its
``sft_config.json``) attached by ``build_shared_model`` and made active, prompts rendered with the
Alpaca template from real data and encoded by ``encode_prompts``, then greedy decoding through
``generate_from_ids`` (left-padded, length-sorted batches), the eval script's generation path.

Each batch size runs on the same prompts; repetitions alternate the order of batch sizes after a
warm-up; medians are reported. Tokens/s counts the generated tokens each prompt kept (up to its
first EOS), so the steps a finished row of a batch waits for the others are not counted. Outputs
of every batch size are compared with one-at-a-time: greedy batching should change no token.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # run as a file: make `bench` and `sft` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    DEFAULT_TOKENIZER, SHAPES, build_random_llama, busy_share, command_line, count_parameters,
    cpu_ticks, BUSY_SHARE, print_run_footer, format_table, machine_info, median, peak_rss_mb,
    sample_rows, wait_until_idle, write_results,
)
from core.cli import UserError, run_cli  # noqa: E402
from core.config import ALL_LINEAR_LLAMA  # noqa: E402

TARGET_SPEEDUP = 4.0  # eval's default batch against one at a time
TARGET_VLLM_SPEEDUP = 8.0  # vllm against hf's best batch size, generated tokens/s
EVAL_DEFAULT_BATCH = 8  # sft.eval_sft --batch_size default


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_prompts", type=int, default=16, help="prompts to generate for (default: 16)")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, EVAL_DEFAULT_BATCH, 16],
                        help=f"batch sizes to compare; 1 = one prompt at a time (default: 1 {EVAL_DEFAULT_BATCH} 16)")
    parser.add_argument("--max_new_tokens", type=int, default=128, help="as sft.eval_sft (default: 128)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per batch size after a warm-up; medians reported (default: 3)")
    parser.add_argument("--model", help="a base model folder instead of a random Llama")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small", help="shape of the random Llama (default: small)")
    parser.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER), help="tokenizer for the random Llama (default: TinyLlama's)")
    parser.add_argument("--data", help="SFT .jsonl or Alpaca .json for the prompts (default: as bench_train)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--wait_idle", type=float, default=0, metavar="SECONDS",
                        help="before each timed pass, wait up to this long for the CPUs to be idle (shared machines; default: 0 = off)")
    parser.add_argument("--retries", type=int, default=2,
                        help="with --wait_idle: repeat a pass (up to this many times) when other processes took over 10%% of the CPUs during it (default: 2)")
    parser.add_argument("--results_dir", type=Path, default=None, help="where to write generate.json (default: bench/results)")
    parser.add_argument("--ifeval", help="prompts: the first --num_prompts of an IFEval JSONL (key, prompt, ...) instead of --data")
    parser.add_argument("--template", default="alpaca",
                        help="with --ifeval: how prompts are rendered, alpaca or chat (the tokenizer's chat template) (default: alpaca)")
    parser.add_argument("--engines", nargs="+", choices=["hf", "vllm"], default=["hf"],
                        help="engines to time on the same prompts: hf (at each --batch_sizes; always run, the reference) and vllm (default: hf)")
    parser.add_argument("--vllm_memory_share", type=float, default=0.2, help="vllm: share of the memory it reserves (default: 0.2)")
    parser.add_argument("--vllm_adapters", choices=["auto", "merged", "lora"], default="auto",
                        help="vllm: the adapter as a merged copy or as LoRA (default: auto = merged on a CPU)")
    args = parser.parse_args(argv)
    for name in ("num_prompts", "max_new_tokens", "repeats", "threads"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if any(b < 1 for b in args.batch_sizes):
        raise UserError(f"--batch_sizes must all be >= 1, got {args.batch_sizes}")
    if 1 not in args.batch_sizes:
        args.batch_sizes = [1, *args.batch_sizes]  # the reference every speed-up is measured against
    if "vllm" in args.engines:
        from core.engines import choose_engine

        choose_engine("vllm", args.device)  # not usable here: one line naming the install command
    if args.ifeval and not Path(args.ifeval).is_file():
        raise UserError(f"--ifeval {args.ifeval}: file not found")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA GPU is visible to torch")
    return args


def save_fresh_adapter(model_dir: Path, out_dir: Path, seed: int) -> Path:
    """A LoRA adapter dir as training leaves it (adapter, tokenizer, sft_config.json).

    The adapter is freshly initialised (B = 0, so it does not change outputs) but costs what a
    trained one costs at generation time, which is what is measured here.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sft.sft_config import SFTConfig, save_sft_config

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=ALL_LINEAR_LLAMA, task_type="CAUSAL_LM")
    get_peft_model(base, lora).save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out_dir)
    save_sft_config(SFTConfig(model_name_or_path=str(model_dir)), out_dir, preset="bench")
    return out_dir


def load_like_eval(adapter_dir: Path, device: str, precision: str):
    """(model with the adapter active, tokenizer, adapter spec), through eval_sft's own loaders."""
    import torch

    from evaluation.models import build_model_specs, build_shared_model, load_eval_tokenizer
    from core.modeling import torch_dtype

    specs = build_model_specs([str(adapter_dir)], None)
    tokenizer = load_eval_tokenizer(specs[1], specs[0].model_name_or_path)
    model = build_shared_model(specs, torch.device(device), torch_dtype(precision))
    return model, tokenizer, specs[1]


def time_generation(model, tokenizer, prompt_ids, batch_size: int, max_new_tokens: int, stop_ids=None):
    """(seconds, generations, CPU share other processes took) for one pass at ``batch_size``."""
    import os

    import torch

    from core.generation import generate_from_ids

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    ticks, cpu_started, started = cpu_ticks(), time.process_time(), time.perf_counter()
    generations = generate_from_ids(model, tokenizer, prompt_ids, max_new_tokens=max_new_tokens,
                                    batch_size=batch_size, show_progress=False, stop_ids=stop_ids)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    busy = busy_share(ticks, cpu_ticks())
    own = (time.process_time() - cpu_started) / (seconds * (os.cpu_count() or 1))
    return seconds, generations, None if busy is None else max(0.0, busy - own)


def timed_pass(args: argparse.Namespace, model, tokenizer, prompt_ids, batch_size: int, stop_ids=None):
    """One timed pass; with ``--wait_idle``, started on idle CPUs and run again (up to
    ``--retries`` times) when other processes took over 10% of the CPUs meanwhile."""
    tries = []
    for _ in range(1 + (args.retries if args.wait_idle > 0 else 0)):
        if args.wait_idle > 0:
            wait_until_idle(max_wait_s=args.wait_idle)
        tries.append(time_generation(model, tokenizer, prompt_ids, batch_size, args.max_new_tokens, stop_ids))
        if (tries[-1][2] or 0.0) <= BUSY_SHARE:
            break
    return min(tries, key=lambda t: t[2] or 0.0)


def measure(args: argparse.Namespace, model, tokenizer, spec, prompt_ids, stop_ids=None) -> tuple[dict[int, dict], list]:
    """(a row per batch size, the one-at-a-time generations every other row is compared with)."""
    sizes = args.batch_sizes
    times: dict[int, list[float]] = {b: [] for b in sizes}
    others: dict[int, list[float]] = {b: [] for b in sizes}
    outputs: dict[int, list] = {}
    with spec.active(model):
        time_generation(model, tokenizer, prompt_ids[:2], 2, 4)  # warm-up: kernels, allocator, caches
        for repetition in range(args.repeats):
            order = sizes if repetition % 2 == 0 else list(reversed(sizes))
            for batch_size in order:
                seconds, generations, busy = timed_pass(args, model, tokenizer, prompt_ids, batch_size, stop_ids)
                times[batch_size].append(seconds)
                if busy is not None:
                    others[batch_size].append(busy)
                outputs[batch_size] = generations
                tokens = sum(g.num_tokens for g in generations)
                note = f"  (others used {busy:.0%} of the CPUs)" if busy and busy > BUSY_SHARE else ""
                print(f"  repetition {repetition + 1}, batch {batch_size:>3}: {seconds:6.2f} s, {tokens / seconds:8.1f} tokens/s{note}", flush=True)
    reference = outputs[1]
    results = {}
    for batch_size in sizes:
        tokens = sum(g.num_tokens for g in outputs[batch_size])
        seconds = median(times[batch_size])
        results[batch_size] = {
            "seconds": seconds, "all_seconds": times[batch_size], "generated_tokens": tokens,
            "tokens_per_s": tokens / seconds,
            "stopped_with_eos": sum(g.stopped_with_eos for g in outputs[batch_size]),
            "same_as_one_at_a_time": sum(a.token_ids == b.token_ids for a, b in zip(outputs[batch_size], reference)),
            "others_cpu_share_median": median(others[batch_size]),
        }
    for row in results.values():
        row["speedup"] = row["tokens_per_s"] / results[1]["tokens_per_s"]
    return results, reference


def bench_prompts(args: argparse.Namespace, tokenizer) -> tuple[list[str], list[int] | None, str]:
    """(rendered prompts, stop ids or None for EOS, where they came from)."""
    if args.ifeval:
        from core.prompting import load_template, prompt_format
        from evaluation.instruction_following import load_benchmark

        samples = load_benchmark("ifeval", args.ifeval, args.num_prompts)
        if len(samples) < args.num_prompts:
            raise UserError(f"{args.ifeval} has {len(samples)} prompts; the benchmark needs {args.num_prompts}")
        fmt = prompt_format(load_template(args.template), tokenizer)
        return [fmt.prompt({"instruction": s.prompt, "input": ""}) for s in samples], fmt.stop_ids, \
            f"{args.ifeval} (first {args.num_prompts}, template {args.template})"
    rows, data_path = sample_rows(args.num_prompts, args.seed, args.data)
    return [row["prompt"] for row in rows], None, str(data_path)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_generate_") as tmp:
        work = Path(tmp)
        if args.model:
            model_dir, model_name = Path(args.model), args.model
        else:
            print(f"building a random Llama ({args.shape}) with the tokenizer {args.tokenizer} ...", flush=True)
            model_dir = build_random_llama(work / "model", args.tokenizer, args.shape, args.seed)
            model_name = f"random Llama ({args.shape}) with tokenizer {args.tokenizer}"
        adapter_dir = save_fresh_adapter(model_dir, work / "adapter", args.seed)
        started = time.perf_counter()
        model, tokenizer, spec = load_like_eval(adapter_dir, args.device, args.precision)
        hf_load = time.perf_counter() - started
        from core.generation import encode_prompts

        prompts, stop_ids, source = bench_prompts(args, tokenizer)
        prompt_ids = encode_prompts(tokenizer, prompts)
        parameters = count_parameters(model_dir)
        print(f"model: {model_name}, {parameters / 1e6:.1f}M parameters + LoRA r=16; {len(prompts)} prompts "
              f"({min(map(len, prompt_ids))}-{max(map(len, prompt_ids))} tokens) from {source}")
        results, reference = measure(args, model, tokenizer, spec, prompt_ids, stop_ids)
        hf_peak = peak_rss_mb()
        ceilings = measure_ceilings(args, model, [*args.batch_sizes, len(prompts)])
        vllm = None
        if "vllm" in args.engines:
            from bench.engine_rows import vllm_row

            vllm = vllm_row(args, tokenizer, str(model_dir), str(adapter_dir), prompt_ids, stop_ids, reference)
    report(args, argv, results, vllm, hf_load, hf_peak, model_name, parameters, source, len(prompts), ceilings)
    return 0


def measure_ceilings(args: argparse.Namespace, model, rows: Sequence[int]) -> dict[int, dict]:
    """The matmul-only decode ceiling (bench/decode_ceiling.py) at each number of rows an engine ran at once."""
    from bench.decode_ceiling import decode_ceiling, linear_shapes
    from core.modeling import torch_dtype

    shapes = linear_shapes(model)
    ceilings = {m: decode_ceiling(shapes, m, device=args.device, dtype=torch_dtype(args.precision)) for m in sorted(set(rows))}
    for m, c in ceilings.items():
        print(f"  matmul-only ceiling, {m:>3} rows: {c['tokens_per_s']:8.1f} tokens/s ({c['gflop_per_s']:.1f} GFLOP/s)", flush=True)
    return ceilings


def report(args, argv, results: dict, vllm: dict | None, hf_load: float, hf_peak: float, model_name: str, parameters: int,
           source: str, count: int, ceilings: dict[int, dict]) -> None:
    info = machine_info()
    headers = ["engine, batch", "load s", "seconds", "generated tokens", "tokens/s", "x one-at-a-time", "stopped with EOS",
               "same tokens as one-at-a-time", "peak memory MiB", "share of matmul ceiling"]
    for b, r in results.items():
        r["share_of_ceiling"] = r["tokens_per_s"] / ceilings[b]["tokens_per_s"]
    rows = [[f"hf, {b} (eval default)" if b == EVAL_DEFAULT_BATCH else ("hf, 1 (one at a time)" if b == 1 else f"hf, {b}"),
             hf_load, r["seconds"], r["generated_tokens"], r["tokens_per_s"], r["speedup"], f"{r['stopped_with_eos']}/{count}",
             f"{r['same_as_one_at_a_time']}/{count}", hf_peak, f"{r['share_of_ceiling']:.0%} of {b} rows"]
            for b, r in results.items()]
    if vllm:
        vllm["speedup"] = vllm["tokens_per_s"] / results[1]["tokens_per_s"]
        vllm["share_of_ceiling"] = vllm["tokens_per_s"] / ceilings[count]["tokens_per_s"]
        rows.append(["vllm", vllm["load_seconds"], vllm["seconds"], vllm["generated_tokens"], vllm["tokens_per_s"],
                     vllm["speedup"], f"{vllm['stopped_with_eos']}/{count}", f"{vllm['same_as_one_at_a_time']}/{count}",
                     vllm["peak_memory_mb"], f"{vllm['share_of_ceiling']:.0%} of {count} rows"])
    rows += [[f"ceiling: matmuls only, {m} rows", "", c["step_seconds"], "", c["tokens_per_s"], "", "", "", "", "100%"]
             for m, c in ceilings.items()]
    table = format_table(headers, rows)
    command = command_line("bench.bench_generate", argv)
    print(f"\nGreedy generation (as sft.eval_sft), {count} prompts from {source}, max_new_tokens {args.max_new_tokens}, "
          f"{args.precision} on {args.device}; median of {args.repeats}; load time apart (hf: base + adapter as eval "
          f"loads them; vllm: merged copy + engine start)")
    print(f"model: {model_name}, {parameters / 1e6:.1f}M parameters + LoRA adapter (r=16, all linear); peak memory: "
          "this process for hf, the vLLM engine processes for vllm")
    print(table)
    targets = []
    if EVAL_DEFAULT_BATCH in results:
        got = results[EVAL_DEFAULT_BATCH]["speedup"]
        targets.append(f"batched (eval default {EVAL_DEFAULT_BATCH}) vs one at a time: {got:.2f}x "
                       f"(target >= {TARGET_SPEEDUP}x): {'met' if got >= TARGET_SPEEDUP else 'MISSED'}")
    if vllm:
        best = max(results, key=lambda b: results[b]["tokens_per_s"])
        ratio = vllm["tokens_per_s"] / results[best]["tokens_per_s"]
        vllm["x_best_hf"] = ratio
        targets.append(f"vllm vs hf's best batch ({best}): {ratio:.2f}x generated tokens/s (target >= "
                       f"{TARGET_VLLM_SPEEDUP}x): {'met' if ratio >= TARGET_VLLM_SPEEDUP else 'MISSED'}; "
                       f"differences from one-at-a-time hf at prompts {vllm['differences'] or 'none'}")
        needed, most = TARGET_VLLM_SPEEDUP * results[best]["tokens_per_s"], ceilings[count]["tokens_per_s"]
        targets.append(f"the target needs {needed:.0f} tokens/s; the matmul-only ceiling with all {count} prompts running "
                       f"at once is {most:.0f} on this machine: {'within' if needed <= most else 'beyond'} what it allows")
    for line in targets:
        print(line)
    print_run_footer({f"hf batch size {b}": r for b, r in results.items()}, info, command)
    print(f"load average (1 min) now: {os.getloadavg()[0]:.2f}")
    path = write_results("generate", {
        "command": command, "machine": info, "model": model_name, "parameters": parameters, "prompts": source,
        "settings": {k: v for k, v in vars(args).items() if k != "results_dir"},
        "results": {str(b): r for b, r in results.items()}, "vllm": vllm, "hf_load_seconds": hf_load, "table": table,
        "matmul_ceilings": {str(m): c for m, c in ceilings.items()},
        "targets": targets, "peak_rss_mb": hf_peak,
    }, **({"results_dir": args.results_dir} if args.results_dir else {}))
    print(f"wrote {path}")


if __name__ == "__main__":
    run_cli(main)
