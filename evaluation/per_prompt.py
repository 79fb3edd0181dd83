"""``per_prompt.jsonl.gz``: every prompt's verdicts per benchmark and column, the file a report is re-checked from.

One JSON object a line: ``benchmark, column, arm, seed, key``; ``prompt_strict`` / ``prompt_loose`` (null when the
prompt could not be scored); ``instruction_strict`` / ``instruction_loose`` as ``[followed, total]``;
``instructions`` as ``[[type, strict, loose], ...]`` (what the per-type rows are made from); ``tokens``, ``cut``
(ran to the token limit without a stop), ``stopped`` (EOS), ``loop`` (evaluation/repetition.py). Written by the
eval stage beside ``report.md``; ``scripts/verify_study.py`` rebuilds the report's numbers from it. Gzip with a
fixed timestamp: the same evaluation writes the same bytes.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Mapping, Sequence

from core.cli import UserError
from evaluation.comparisons import PromptItem, is_cut
from evaluation.seeds import arm_of

PER_PROMPT_FILE = "per_prompt.jsonl.gz"


def per_prompt_rows(benchmarks: Mapping[str, Mapping[str, Sequence[PromptItem]]], max_new_tokens: int | None) -> list[dict]:
    """One row per benchmark, column and prompt, in report order."""
    rows = []
    for bench, by_label in benchmarks.items():
        for label, items in by_label.items():
            arm, seed = arm_of(label)
            for item in items:
                followed = [sum(bool(i[level]) for i in item.instructions) for level in (1, 2)]
                total = len(item.instructions)
                rows.append({"benchmark": bench, "column": label, "arm": arm, "seed": seed, "key": item.key,
                             "prompt_strict": item.strict, "prompt_loose": item.loose,
                             "instruction_strict": [followed[0], total], "instruction_loose": [followed[1], total],
                             "instructions": [[i[0], bool(i[1]), bool(i[2])] for i in item.instructions],
                             "tokens": item.num_tokens, "cut": is_cut(item, max_new_tokens), "stopped": item.stopped,
                             "loop": item.loop})
    return rows


def write_per_prompt(path: Path, rows: Sequence[Mapping]) -> Path:
    """The rows as gzipped JSONL (mtime 0, so the bytes depend on the rows alone), written whole or not at all."""
    tmp = path.with_name(f".{path.name}.tmp")
    data = "".join(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n" for row in rows).encode("utf-8")
    with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as out:
        out.write(data)
    tmp.replace(path)
    return path


def read_per_prompt(path: Path) -> list[dict]:
    try:
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]
    except (OSError, ValueError, EOFError) as exc:
        raise UserError(f"{path}: cannot read ({exc})") from None


def items_from_rows(rows: Sequence[Mapping]) -> dict[str, dict[str, list[PromptItem]]]:
    """Benchmark -> column -> PromptItems, back from the rows (what ``evaluation.comparisons`` takes)."""
    out: dict[str, dict[str, list[PromptItem]]] = {}
    for row in rows:
        instructions = tuple((str(i[0]), bool(i[1]), bool(i[2])) for i in row["instructions"])
        item = PromptItem(str(row["key"]), row["prompt_strict"], row["prompt_loose"], instructions, int(row["tokens"]),
                          bool(row["stopped"]), bool(row["loop"]))
        out.setdefault(row["benchmark"], {}).setdefault(row["column"], []).append(item)
    return out


def row_problems(rows: Sequence[Mapping], max_new_tokens: int | None) -> list[str]:
    """Rows whose summary fields disagree with their own instructions, tokens and stop (an edit by hand shows here)."""
    problems = []
    for number, row in enumerate(rows, start=1):
        expected = per_prompt_rows({row["benchmark"]: {row["column"]: items_from_rows([row])[row["benchmark"]][row["column"]]}},
                                   max_new_tokens)[0]
        for name in ("arm", "seed", "instruction_strict", "instruction_loose", "cut"):
            if row.get(name) != expected[name]:
                problems.append(f"{PER_PROMPT_FILE} row {number} ({row['benchmark']} {row['column']} {row['key']}): "
                                f"{name} is {row.get(name)!r}, its own fields give {expected[name]!r}")
        for level, name in ((1, "prompt_strict"), (2, "prompt_loose")):
            if row[name] is not None and row[name] != all(i[level] for i in row["instructions"]):
                problems.append(f"{PER_PROMPT_FILE} row {number} ({row['benchmark']} {row['column']} {row['key']}): "
                                f"{name} is {row[name]!r} but its instructions say {not row[name]!r}")
    return problems
