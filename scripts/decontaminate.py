"""Decontamination by Tülu 3's rule: a training instruction is dropped when more than half of its tokens
lie in 8-grams that some test prompt also has.

Tokens are lower-cased words (``\\w+``), so punctuation and spacing do not hide an overlap. An
instruction shorter than 8 tokens has no 8-gram and is never dropped by this rule.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

from core.cli import UserError
from core.tokenization import read_jsonl_objects

NGRAM = 8
TOKEN = re.compile(r"\w+")


def tokens(text: str) -> list[str]:
    return TOKEN.findall(text.lower())


def ngrams(words: list[str], n: int = NGRAM) -> Iterable[tuple[str, ...]]:
    return (tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def ngram_set(texts: Iterable[str]) -> set[tuple[str, ...]]:
    found: set[tuple[str, ...]] = set()
    for text in texts:
        found.update(ngrams(tokens(text)))
    return found


def overlap_share(text: str, test_grams: set[tuple[str, ...]]) -> float:
    """Share of ``text``'s tokens that lie in at least one 8-gram also found in a test prompt."""
    words = tokens(text)
    covered = [False] * len(words)
    for start, gram in enumerate(ngrams(words)):
        if gram in test_grams:
            covered[start:start + NGRAM] = [True] * NGRAM
    return sum(covered) / len(words) if words else 0.0


def is_contaminated(text: str, test_grams: set[tuple[str, ...]]) -> bool:
    return overlap_share(text, test_grams) > 0.5


def read_test_prompts(path: Path) -> list[str]:
    """The prompts of a test file: JSONL rows with ``prompt`` (IFEval/IFBench release format) or
    ``instruction`` (+ ``input``); a missing file or a row with neither is a one-line error."""
    if not path.is_file():
        raise UserError(f"--decontaminate: {path} not found")
    prompts = []
    for number, row in enumerate(read_jsonl_objects(path), start=1):
        text = row.get("prompt")
        if not isinstance(text, str) and isinstance(row.get("instruction"), str):
            text = "\n\n".join(part for part in (row["instruction"], row.get("input") or "") if part)
        if not isinstance(text, str):
            raise UserError(f"{path}: row {number}: no 'prompt' or 'instruction' string to decontaminate against")
        prompts.append(text)
    return prompts
