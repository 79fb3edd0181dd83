"""The prompts RLOO samples on: the SFT run's training prompts (never its validation file) or a prompt file.

Each prompt is rendered with the run's format (its template, or its tokenizer's chat template;
rows that carry only a rendered ``prompt`` are used as they are), de-duplicated, split into training and monitoring prompts with the seed, and
measured in tokens; every prompt left out is counted and said. A prompt is a row: ``{"prompt": rendered}``
plus, for a row with constraints (IFEval release format), the columns the checker reward reads
(``rlhf/verifiable_reward.py``); TRL hands every column to the reward functions.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from core.cli import UserError
from core.prompting import PromptFormat, prompt_file_rows, record_problem
from core.tokenization import encode_prompt
from rlhf.verifiable_reward import constraint_columns, mark_benchmark, require_constraints


def read_prompt_rows(path: str | Path, fmt: PromptFormat) -> list[dict]:
    """Prompt rows (``{"prompt": rendered, ...constraint columns}``) from JSONL (template-free records:
    'instruction' [+ 'input'] or 'messages'; or a rendered 'prompt') or text (one instruction per line)."""
    prompts = []
    for number, row in enumerate(prompt_file_rows(path, "prompt file", "prompts"), start=1):
        if "messages" in row and record_problem(row) is None:
            rendered = fmt.prompt(row)
        elif str(row.get("instruction") or "").strip():
            rendered = fmt.prompt({"instruction": row["instruction"], "input": row.get("input") or ""})
        elif str(row.get("prompt") or "").strip():
            rendered = row["prompt"]
        else:
            raise UserError(f"{path}: row {number} has neither 'instruction' nor 'prompt'")
        prompts.append({"prompt": rendered, **constraint_columns(row, f"{path}:{number}")})
    return prompts


@dataclass
class PromptSet:
    train: list[dict] = field(default_factory=list)
    monitor: list[dict] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        c = self.counts
        without = f", {c['no_constraints']} without constraints" if c.get("no_constraints") else ""
        return (f"{c['read']} prompts read -> {c['duplicates']} duplicates{without} and {c['too_long']} too long for "
                f"max_length left out; {c.get('held_back', len(self.monitor))} held back for monitoring, {len(self.train)} to train on"
                + (f" (first {c['limited_to']})" if c.get("limited_to") else ""))


def fitting_rows(rows: list[dict], tokenizer, max_prompt_tokens: int) -> list[dict]:
    return [row for row in rows if len(encode_prompt(row["prompt"], tokenizer)) <= max_prompt_tokens]


def build_prompt_set(prompts: list[dict], tokenizer, *, max_prompt_tokens: int, monitor: int, seed: int,
                     max_prompts: int | None, need_constraints: bool = False) -> PromptSet:
    """De-duplicate, drop prompts over ``max_prompt_tokens`` (and, with ``need_constraints``, those the checker
    cannot judge), hold ``monitor`` back (seeded, marked ``monitor_set`` "held-back"), limit the rest."""
    first: dict[str, dict] = {}
    for row in prompts:
        first.setdefault(row["prompt"], row)
    unique = list(first.values())
    judged = [row for row in unique if row.get("instruction_id_list")] if need_constraints else unique
    fitting = fitting_rows(judged, tokenizer, max_prompt_tokens)
    counts = {"read": len(prompts), "duplicates": len(prompts) - len(unique), "too_long": len(judged) - len(fitting)}
    if need_constraints:
        counts["no_constraints"] = len(unique) - len(judged)
    order = list(range(len(fitting)))
    random.Random(seed).shuffle(order)
    held = set(order[:monitor]) if len(fitting) > monitor else set()
    counts["held_back"] = len(held)
    result = PromptSet([p for i, p in enumerate(fitting) if i not in held],
                       [{**fitting[i], "monitor_set": "held-back"} for i in sorted(held)], counts)
    if max_prompts:
        counts["limited_to"] = max_prompts
        result.train = result.train[:max_prompts]
    if not result.train:
        raise UserError(f"no prompt left to train on ({result.summary()}): raise --max_length or lower --max_new_tokens")
    return result


def monitor_file_rows(paths: Sequence[str], read_rows, tokenizer, max_prompt_tokens: int, per_file: int,
                      seed: int) -> tuple[list[dict], dict[str, dict]]:
    """Monitoring rows from constraint files: ``per_file`` of each (seeded sample), marked with the file's name.

    ``read_rows(path)``: the prompt rows of a file (``rlhf.prompts.read_prompt_rows`` with the run's format).
    Returns the rows and, per set, what was read, too long and used.
    """
    rows, counts = [], {}
    for path in paths:
        name = Path(path).stem
        if name in counts:
            raise UserError(f"--monitor_files: two files named {name!r}; the pass rates are logged per file name")
        read = mark_benchmark(read_rows(path), path)
        require_constraints(read, path)
        constrained = [row for row in read if row.get("instruction_id_list")]
        fitting = fitting_rows(constrained, tokenizer, max_prompt_tokens)
        chosen = sorted(random.Random(seed).sample(range(len(fitting)), min(per_file, len(fitting))))
        rows += [{**fitting[i], "monitor_set": name} for i in chosen]
        counts[name] = {"read": len(read), "without_constraints": len(read) - len(constrained),
                        "too_long": len(constrained) - len(fitting), "used": len(chosen)}
    return rows, counts
