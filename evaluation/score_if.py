"""Score existing responses on IFEval or IFBench; no model is loaded.

    python -m evaluation.score_if --responses responses.jsonl --data ifeval_input_data.jsonl --out results/
    python -m evaluation.score_if --responses responses.jsonl --data ifeval_input_data.jsonl --out sft_scores.json

The responses file is JSONL, one ``{"key": ..., "response": ...}`` (or ``{"prompt": ...,
"response": ...}``) a line, so outputs from any model or API can be put in the same table. Each is
matched to a benchmark prompt by key, else by its exact prompt text; responses that match no prompt
are counted and listed, and prompts with no response are reported as unscored. A file with a
``model`` field naming several models (the eval stage's ``if_<benchmark>_generations.jsonl``) is
scored one model at a time: ``--model sft``. Without ``--data``
the prompts come from the hub (``google/IFEval`` / ``allenai/IFBench_test``; needs network).
Prints the four IFEval numbers and the per-instruction-type table, and writes ``if_scores.json`` into
the ``--out`` folder, or to ``--out`` itself when it ends in ``.json``. The same response always gets
the same score (each instruction's checker runs with its own seed: ``core/if_checker.py``).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

from evaluation.instruction_following import (
    BENCHMARKS,
    IFScores,
    format_table,
    load_benchmark,
    score_responses,
)
from core.cli import UserError, make_parser, run_cli
from core.tokenization import read_jsonl_objects

SCORES_FILE = "if_scores.json"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = make_parser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--responses", required=True, help="JSONL of {key or prompt, response}")
    parser.add_argument("--benchmark", choices=sorted(BENCHMARKS), default="ifeval")
    parser.add_argument("--data", default=None,
                        help="benchmark prompts as JSONL in the release format (default: the hub id)")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N prompts")
    parser.add_argument("--model", default=None,
                        help="score only the rows whose 'model' is this (files holding several models' responses)")
    parser.add_argument("--out", default=".",
                        help=f"where the scores go: a file name ending in .json, else a folder that gets {SCORES_FILE} "
                             "(default: .)")
    return parser.parse_args(argv)


def match_responses(samples: Sequence, rows: Sequence[dict], path: Path) -> tuple[list[str | None], list[dict]]:
    """``responses[i]`` for ``samples[i]`` (None where none was given), and the rows that matched none.

    A row is matched by ``key`` when it has one (compared as text), else by its exact ``prompt``.
    Two responses for one prompt are a UserError.
    """
    by_key = {str(s.key): i for i, s in enumerate(samples)}
    by_prompt: dict[str, int] = {}
    for i, s in enumerate(samples):
        by_prompt.setdefault(s.prompt, i)
    responses: list[str | None] = [None] * len(samples)
    unmatched: list[dict] = []
    for line, row in enumerate(rows, start=1):
        if not isinstance(row.get("response"), str):
            raise UserError(f"{path}: response {line}: field 'response' is missing or not a string")
        if row.get("key") is None and not isinstance(row.get("prompt"), str):
            raise UserError(f"{path}: response {line}: needs a 'key' or a 'prompt'")
        index = by_key.get(str(row["key"])) if row.get("key") is not None else by_prompt.get(row["prompt"])
        if index is None:
            label = {"key": row["key"]} if row.get("key") is not None else {"prompt": row["prompt"][:80]}
            unmatched.append({"line": line, **label})
            continue
        if responses[index] is not None:
            raise UserError(f"{path}: response {line}: a second response for prompt key {samples[index].key!r}")
        responses[index] = row["response"]
    return responses, unmatched


def select_model(rows: list[dict], model: str | None, path: Path) -> list[dict]:
    """The rows of one model: all rows when the file names at most one model, else those of ``--model``."""
    if not rows:
        raise UserError(f"{path} holds no responses")
    models = sorted({str(r["model"]) for r in rows if r.get("model") is not None})
    if model is None:
        if len(models) > 1:
            raise UserError(f"{path} holds responses of several models ({', '.join(models)}): pass --model")
        return rows
    chosen = [r for r in rows if str(r.get("model")) == model]
    if not chosen:
        raise UserError(f"{path} holds no responses of model {model!r} (models: {', '.join(models) or 'none named'})")
    return chosen


def scores_path(out: str) -> Path:
    """``--out``: a name ending in ``.json`` is the file itself (unless a folder of that name exists), else a folder."""
    path = Path(out)
    if path.suffix.lower() == ".json" and not path.is_dir():
        return path
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {out} is a file that is not .json: name a folder or a .json file")
    return path / SCORES_FILE


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    responses_path = Path(args.responses)
    if not responses_path.is_file():
        raise UserError(f"responses file not found: {responses_path}")
    samples = load_benchmark(args.benchmark, args.data, limit=args.limit)
    rows = select_model(read_jsonl_objects(responses_path), args.model, responses_path)
    responses, unmatched = match_responses(samples, rows, responses_path)
    scores: IFScores = score_responses(args.benchmark, samples, responses)

    print(format_table(scores))
    no_response = sum(r is None for r in responses)
    print(f"\nresponses: {len(rows)} read, {len(rows) - len(unmatched)} matched a prompt, "
          f"{len(unmatched)} unmatched; {no_response} prompts had no response")
    for item in unmatched[:5]:
        print(f"  unmatched: line {item['line']}: {item.get('key', item.get('prompt'))!r}")

    out_file = scores_path(args.out)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "responses_file": str(responses_path),
        "model": args.model,
        "data": str(args.data) if args.data else BENCHMARKS[args.benchmark],
        "limit": args.limit,
        "responses_read": len(rows),
        "responses_matched": len(rows) - len(unmatched),
        "responses_unmatched": len(unmatched),
        "unmatched_responses": unmatched,
        **scores.to_dict(),
    }
    out_file.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {out_file}")
    return 0


if __name__ == "__main__":
    run_cli(main)
