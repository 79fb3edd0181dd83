"""Whether an answer is stuck in a repetition loop: a confound reported beside every IF score.

A small model that never stops often repeats itself until the token limit; its IF verdicts then
measure the loop, not instruction following. :func:`has_repetition_loop` is the report's definition:
some run of ``LOOP_WORDS`` consecutive words occurs ``LOOP_REPEATS`` or more times in the answer
(words are whitespace-separated and compared case-insensitively; occurrences may overlap, so a
one-word answer repeated 10 times counts).
"""
from __future__ import annotations

from collections import Counter

LOOP_WORDS = 8
LOOP_REPEATS = 3
LOOP_DEFINITION = f"an {LOOP_WORDS}-word run repeated {LOOP_REPEATS}+ times"


def has_repetition_loop(text: str | None, words: int = LOOP_WORDS, repeats: int = LOOP_REPEATS) -> bool:
    """True when some ``words``-word run occurs at least ``repeats`` times in ``text``."""
    tokens = (text or "").lower().split()
    if len(tokens) < words:
        return False
    runs = Counter(tuple(tokens[i:i + words]) for i in range(len(tokens) - words + 1))
    return max(runs.values()) >= repeats
