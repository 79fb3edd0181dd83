"""Greedy answers in fp32 and in bf16 on the same prompts: how many are identical, and tokens/s of each.

    python -m bench.precision_agreement --model path/to/SmolLM2-135M-Instruct --ifeval ifeval_input_data.jsonl \
        --num_prompts 48 --max_new_tokens 256 --engine vllm
    python -m bench.precision_agreement --model path/to/stories260K --max_new_tokens 32 --engine hf

``auto`` precision picks bf16 on a CPU with bf16 instructions where it measures faster
(core/cpu_features.py). bf16 rounds every weight and activation to 8 bits of mantissa, so greedy
decoding can take another token where two candidates were close, and from there the answer differs.
This counts it instead of assuming it: each engine generates every prompt once per precision (same
prompt token ids, same stop ids, greedy), after a short warm-up; answers are compared token for
token. Tokens/s counts the tokens each answer kept. On a shared CPU the rates are only as good as
the machine was idle: say so beside them.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # run as a file: make `bench` and `core` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.cli import UserError  # noqa: E402

PRECISIONS = ("fp32", "bf16")
FALLBACK_PROMPTS = ("Write a haiku about the sea.", "List three prime numbers.", "Say hello in French.",
                    "Explain what a verb is in one sentence.")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.precision_agreement", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a local model directory (HF format)")
    parser.add_argument("--ifeval", help="prompts: the first --num_prompts of an IFEval JSONL (default: four built-in prompts)")
    parser.add_argument("--num_prompts", type=int, default=48)
    parser.add_argument("--template", default="chat", help="how prompts are rendered: chat (the tokenizer's) or alpaca")
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--engine", choices=["hf", "vllm"], default="hf")
    parser.add_argument("--batch_size", type=int, default=8, help="hf: rows per generate call")
    parser.add_argument("--vllm_memory_share", type=float, default=0.1)
    args = parser.parse_args(argv)
    if not Path(args.model).is_dir():
        raise UserError(f"--model {args.model}: directory not found")
    if args.ifeval and not Path(args.ifeval).is_file():
        raise UserError(f"--ifeval {args.ifeval}: file not found")
    return args


def agreement(first: Sequence, second: Sequence) -> dict:
    """How many answers (``Generation``s, prompt by prompt) have identical token ids, which differ, and
    after how many shared tokens each differing pair parts."""
    if len(first) != len(second):
        raise ValueError(f"{len(first)} answers against {len(second)}")
    differing = [i for i, (a, b) in enumerate(zip(first, second)) if list(a.token_ids) != list(b.token_ids)]
    parted_after = [_shared_prefix(first[i].token_ids, second[i].token_ids) for i in differing]
    return {"identical": len(first) - len(differing), "total": len(first), "differing": differing,
            "parted_after_tokens": parted_after}


def _shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def rendered_prompts(args: argparse.Namespace, tokenizer) -> tuple[list[str], list[int]]:
    """(prompts rendered with ``--template``, stop ids)."""
    from core.prompting import load_template, prompt_format

    fmt = prompt_format(load_template(args.template), tokenizer)
    if args.ifeval:
        from evaluation.instruction_following import load_benchmark

        texts = [s.prompt for s in load_benchmark("ifeval", args.ifeval, args.num_prompts)]
    else:
        texts = list(FALLBACK_PROMPTS)
    return [fmt.prompt({"instruction": t, "input": ""}) for t in texts], fmt.stop_ids


def generate_in(precision: str, args: argparse.Namespace, tokenizer, prompt_ids, stop_ids) -> tuple[list, float]:
    """Every prompt once, greedy, on ``args.engine`` with the model in ``precision``: (answers, seconds)."""
    import torch

    from core.engines import EnginePool, VLLMSettings, Weights, choose_engine
    from core.modeling import load_base_model, torch_dtype

    dtype = torch_dtype(precision)
    choice = choose_engine(args.engine, torch.device("cpu"))
    with EnginePool(choice, tokenizer=tokenizer, model_loader=lambda: load_base_model(args.model, dtype=dtype).eval(),
                    batch_size=args.batch_size, dtype=dtype,
                    settings=VLLMSettings(memory_share=args.vllm_memory_share)) as pool:
        engine = pool.engine_for(Weights(args.model))
        engine.generate(prompt_ids[:2], max_new_tokens=4, stop_ids=stop_ids, show_progress=False)  # warm-up
        started = time.perf_counter()
        answers = engine.generate(prompt_ids, max_new_tokens=args.max_new_tokens, stop_ids=stop_ids, show_progress=False)
        return answers, time.perf_counter() - started


def compare(args: argparse.Namespace) -> dict:
    """Both precisions' answers, rates and their agreement."""
    from core.generation import encode_prompts
    from core.modeling import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    prompts, stop_ids = rendered_prompts(args, tokenizer)
    prompt_ids = encode_prompts(tokenizer, prompts)
    runs = {}
    for precision in PRECISIONS:
        answers, seconds = generate_in(precision, args, tokenizer, prompt_ids, stop_ids)
        tokens = sum(a.num_tokens for a in answers)
        runs[precision] = {"answers": answers, "seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}
    return {"runs": runs, **agreement(runs["fp32"]["answers"], runs["bf16"]["answers"])}


def main(argv: Sequence[str] | None = None) -> int:
    import os

    args = parse_args(argv)
    result = compare(args)
    load = os.getloadavg()[0]
    for precision, run in result["runs"].items():
        print(f"{precision}: {run['tokens']} tokens in {run['seconds']:.1f} s = {run['tokens_per_s']:.1f} tokens/s "
              f"({args.engine})")
    print(f"identical answers: {result['identical']}/{result['total']} (greedy, {args.max_new_tokens} tokens at most); "
          f"differing prompts {result['differing']} part after {result['parted_after_tokens']} tokens; "
          f"1-min load average at the end {load:.1f} on {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    from core.cli import run_cli

    run_cli(main)
