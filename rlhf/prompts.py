"""The prompts RLOO samples on: the SFT run's training prompts (never its validation file) or a prompt file.

Each prompt is rendered with the run's format (its template, or its tokenizer's chat template;
rows that carry only a rendered ``prompt`` are used as they are), de-duplicated, split into training and monitoring prompts with the seed, and
measured in tokens; every prompt left out is counted and said.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from core.cli import UserError
from core.prompting import PromptFormat, prompt_file_rows, record_problem
from core.tokenization import encode_prompt


def read_prompt_rows(path: str | Path, fmt: PromptFormat) -> list[str]:
    """Rendered prompts from JSONL (template-free records: 'instruction' [+ 'input'] or 'messages'; or a
    rendered 'prompt') or text (one instruction per line)."""
    prompts = []
    for number, row in enumerate(prompt_file_rows(path, "prompt file", "prompts"), start=1):
        if "messages" in row and record_problem(row) is None:
            prompts.append(fmt.prompt(row))
        elif str(row.get("instruction") or "").strip():
            prompts.append(fmt.prompt({"instruction": row["instruction"], "input": row.get("input") or ""}))
        elif str(row.get("prompt") or "").strip():
            prompts.append(row["prompt"])
        else:
            raise UserError(f"{path}: row {number} has neither 'instruction' nor 'prompt'")
    return prompts


@dataclass
class PromptSet:
    train: list[str] = field(default_factory=list)
    monitor: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        c = self.counts
        return (f"{c['read']} prompts read -> {c['duplicates']} duplicates and {c['too_long']} too long for max_length "
                f"left out; {len(self.monitor)} held back for monitoring, {len(self.train)} to train on"
                + (f" (first {c['limited_to']})" if c.get("limited_to") else ""))


def build_prompt_set(prompts: list[str], tokenizer, *, max_prompt_tokens: int, monitor: int, seed: int,
                     max_prompts: int | None) -> PromptSet:
    """De-duplicate, drop prompts over ``max_prompt_tokens``, hold ``monitor`` back (seeded), limit the rest."""
    unique = list(dict.fromkeys(prompts))
    fitting = [p for p in unique if len(encode_prompt(p, tokenizer)) <= max_prompt_tokens]
    counts = {"read": len(prompts), "duplicates": len(prompts) - len(unique), "too_long": len(unique) - len(fitting)}
    order = list(range(len(fitting)))
    random.Random(seed).shuffle(order)
    held = set(order[:monitor]) if len(fitting) > monitor else set()
    result = PromptSet([p for i, p in enumerate(fitting) if i not in held], [fitting[i] for i in sorted(held)], counts)
    if max_prompts:
        counts["limited_to"] = max_prompts
        result.train = result.train[:max_prompts]
    if not result.train:
        raise UserError(f"no prompt left to train on ({result.summary()}): raise --max_length or lower --max_new_tokens")
    return result
