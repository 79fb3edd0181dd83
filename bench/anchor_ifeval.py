"""IFEval on one model, one factor at a time: what moves our number towards its model card's.

    python -m bench.anchor_ifeval --model path/to/smollm2-135m-instruct --ifeval ifeval_input_data.jsonl \\
        --limit 60 --max_new_tokens 256 1024 1280 --system_prompt default none --out_dir runs/anchor
    python -m bench.anchor_ifeval --model path/to/smollm2-135m-instruct --ifeval ifeval_input_data.jsonl \
        --limit 60 --precision bf16                                  # the dtype alone, at 256 tokens
    python -m bench.anchor_ifeval --model path/to/smollm2-135m-instruct --ifeval ifeval_input_data.jsonl \
        --responses study/if_ifeval_generations.jsonl --max_new_tokens  # rescore the study's answers only

One factor at a time: the first ``--system_prompt`` at every answer budget (``--max_new_tokens``),
each other system prompt at the smallest budget. The first ``--limit`` IFEval prompts are answered greedily through the project's own engine (``core.engines.EnginePool``,
``--engine vllm`` or ``hf``, as the eval builds it) and scored by the project's checkers
(``evaluation.instruction_following.score_responses``). The table gives prompt-level and
instruction-level strict (with counts), loose, the card-style aggregate
(``evaluation.anchor.card_average``: the mean of the two strict accuracies) and how many answers
ran to the budget. System prompts:

- ``default``: what the study's eval sends (``--template chat`` with no ``--system_prompt``): the user
  turn alone, rendered by the tokenizer's chat template, which itself inserts its default system
  message when none is given (SmolLM2: "You are a helpful AI assistant named SmolLM, trained by
  Hugging Face"); lighteval's ``--use_chat_template`` renders the same text.
- ``none``: the same ChatML turns with no system message at all (the default one suppressed).
- any other text: that text as the system message.

Greedy answers to one prompt share their first tokens whatever the budget, so the first system prompt
is generated once, at the largest budget, and each smaller budget's answer is that one's first tokens
(:func:`cut_to_budget`); rerun with a single budget to check it (vLLM's batching may flip a
near-tie token).

``--responses FILE``: rescore answers already written (an eval's ``if_ifeval_generations.jsonl``,
``--column base``) as one more row, without generating. Each setting's answers are written to
``--out_dir`` (``<budget>_<system>.jsonl``) for rescoring with another checker.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # run as a file: make `bench` and `core` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.cli import UserError, run_cli  # noqa: E402

# ChatML turns exactly as SmolLM2's template writes them, minus its default system message.
CHATML_NO_DEFAULT_SYSTEM = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.anchor_ifeval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a model folder (its tokenizer and chat template)")
    parser.add_argument("--ifeval", required=True, help="IFEval prompts (ifeval_input_data.jsonl)")
    parser.add_argument("--limit", type=int, default=None, help="the first N prompts (default: all)")
    parser.add_argument("--max_new_tokens", type=int, nargs="*", default=[256], help="answer budgets (default: 256)")
    parser.add_argument("--system_prompt", nargs="*", default=["default"],
                        help="default | none | a system text, one row each (default: default)")
    parser.add_argument("--engine", choices=("vllm", "hf"), default="vllm", help="generation engine (default: vllm)")
    parser.add_argument("--precision", default="fp32", help="fp32 | bf16 (default: fp32, as the study)")
    parser.add_argument("--vllm_memory_share", type=float, default=0.1,
                        help="share of RAM vLLM reserves on a CPU (default: 0.1, enough for a 135M model)")
    parser.add_argument("--responses", help="also rescore this generations file (no generation)")
    parser.add_argument("--column", default="base", help="the model label to take from --responses (default: base)")
    parser.add_argument("--out_dir", help="write each setting's answers here")
    return parser.parse_args(argv)


def render_prompts(tokenizer, prompts: Sequence[str], system_prompt: str) -> list[str]:
    """The text each prompt is sent as, for one system-prompt choice (see the module docstring)."""
    from core.prompting import load_template, prompt_format

    if system_prompt == "default":
        fmt = prompt_format(load_template("chat"), tokenizer)
        return [fmt.prompt({"instruction": p, "input": ""}) for p in prompts]
    if system_prompt == "none":
        return [tokenizer.apply_chat_template([{"role": "user", "content": p}], chat_template=CHATML_NO_DEFAULT_SYSTEM,
                                              tokenize=False, add_generation_prompt=True) for p in prompts]
    fmt = prompt_format(load_template("chat", system_prompt=system_prompt), tokenizer)
    return [fmt.prompt({"instruction": p, "input": ""}) for p in prompts]


def score_row(label: str, samples: list, texts: Sequence[str], cut: int | None) -> dict:
    """One table row: counts and shares from the project's scorer."""
    from evaluation.anchor import card_average
    from evaluation.instruction_following import score_responses

    scores = score_responses("ifeval", samples, texts)
    prompt_pass = sum(bool(p.strict) for p in scores.prompts if p.scored)
    inst_pass = sum(bool(i.strict) for p in scores.prompts if p.scored for i in p.instructions)
    return {"setting": label, "prompts": scores.prompts_scored, "prompt_strict_pass": prompt_pass,
            "instructions": scores.instructions_scored, "instruction_strict_pass": inst_pass,
            "prompt_strict": 100 * scores.prompt_strict, "instruction_strict": 100 * scores.instruction_strict,
            "prompt_loose": 100 * scores.prompt_loose, "instruction_loose": 100 * scores.instruction_loose,
            "card_average": card_average(prompt_pass, scores.prompts_scored, inst_pass, scores.instructions_scored),
            "cut": cut, "checker": scores.library}


def rows_from_responses(path: str, column: str, samples: list) -> list[str]:
    """The ``column`` answers of a generations file, in the order of ``samples`` (missing: one-line error)."""
    by_key = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if row.get("model") == column:
            by_key[row["key"]] = row
    missing = [s.key for s in samples if s.key not in by_key]
    if missing:
        raise UserError(f"{path}: no {column!r} answer for {len(missing)} prompt(s), e.g. key {missing[0]}")
    return [by_key[s.key] for s in samples]


def generate_setting(engine, tokenizer, prompts, system_prompt: str, budget: int, stop_ids):
    from core.generation import encode_prompts

    ids = encode_prompts(tokenizer, render_prompts(tokenizer, prompts, system_prompt))
    return engine.generate(ids, max_new_tokens=budget, stop_ids=stop_ids, desc=f"{budget} tokens, system {system_prompt}")


def cut_to_budget(tokenizer, generation, budget: int, stop_ids):
    """The answer a smaller budget gives: greedy decoding's first ``budget`` tokens are the same either way."""
    from core.generation import finish_generation

    if generation.num_tokens < budget:
        return generation
    return finish_generation(tokenizer, list(generation.token_ids[:budget]), stop_ids)


def write_answers(out_dir: str, name: str, samples: list, generations) -> None:
    path = Path(out_dir) / f"{name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"key": s.key, "model": "base", "prompt": s.prompt, "response": g.text,
                                        "num_tokens": g.num_tokens, "stopped_with_eos": g.stopped_with_eos},
                                       ensure_ascii=False) + "\n" for s, g in zip(samples, generations)), encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from core.engines import EnginePool, VLLMSettings, Weights, choose_engine
    from core.modeling import load_tokenizer, torch_dtype
    from core.prompting import load_template, prompt_format
    from core.threads import apply_thread_guard
    from evaluation.instruction_following import load_benchmark

    apply_thread_guard()
    samples = load_benchmark("ifeval", args.ifeval, args.limit)
    rows = []
    if args.responses:
        answers = rows_from_responses(args.responses, args.column, samples)
        rows.append(score_row(f"{Path(args.responses).name} [{args.column}]", samples, [a["response"] for a in answers],
                              sum(not a["stopped_with_eos"] for a in answers)))
        print(format_rows(rows[-1:]), flush=True)
    budgets = sorted(set(args.max_new_tokens))
    if budgets and args.system_prompt:
        tokenizer = load_tokenizer(args.model)
        stop_ids = prompt_format(load_template("chat"), tokenizer).stop_ids
        device = torch.device("cpu")
        loader = None
        if args.engine == "hf":
            from core.modeling import load_base_model
            loader = lambda: load_base_model(args.model, dtype=torch_dtype(args.precision)).eval()  # noqa: E731
        with EnginePool(choose_engine(args.engine, device, args.model), tokenizer=tokenizer, model_loader=loader,
                        dtype=torch_dtype(args.precision), settings=VLLMSettings(memory_share=args.vllm_memory_share)) as pool:
            engine = pool.engine_for(Weights(args.model, None, "base"))
            for index, system in enumerate(args.system_prompt):
                # one factor at a time: the first system prompt at every budget, the others at the smallest
                wanted = budgets if index == 0 else budgets[:1]
                longest = generate_setting(engine, tokenizer, [s.prompt for s in samples], system, max(wanted), stop_ids)
                for budget in wanted:
                    gens = [cut_to_budget(tokenizer, g, budget, stop_ids) for g in longest]
                    name = f"{budget}_{system if system in ('default', 'none') else 'custom'}"
                    if args.out_dir:
                        write_answers(args.out_dir, name, samples, gens)
                    rows.append(score_row(f"{budget} tokens, system {system[:20]}", samples, [g.text for g in gens],
                                          sum(not g.stopped_with_eos for g in gens)))
                    print(format_rows(rows[-1:]), flush=True)
    print("\n" + format_rows(rows))
    return 0


def format_rows(rows: Sequence[dict]) -> str:
    from bench.common import format_table

    return format_table(["setting", "prompt strict", "inst strict", "card avg", "prompt loose", "inst loose", "cut"],
                        [[r["setting"], f"{r['prompt_strict']:.1f} ({r['prompt_strict_pass']}/{r['prompts']})",
                          f"{r['instruction_strict']:.1f} ({r['instruction_strict_pass']}/{r['instructions']})",
                          f"{r['card_average']:.1f}", f"{r['prompt_loose']:.1f}", f"{r['instruction_loose']:.1f}",
                          r["cut"]] for r in rows])


if __name__ == "__main__":
    run_cli(main)
