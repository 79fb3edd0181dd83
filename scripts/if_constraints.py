"""Verifiable constraints drawn for a prompt: which types, which arguments, and the sentence the model reads.

The sentence is the one the checker itself builds from the arguments (its ``build_description``),
and the arguments stored with the row are the ones it reports back (``get_instruction_args``), so
the prompt and the check cannot disagree.

- **Types**: never two that IFEval's conflict table lists as conflicting (the table is not
  symmetric in the library; here a conflict either way counts). IFBench publishes no conflict
  table, so an IFBench (out-of-distribution) prompt gets one constraint.
- **Arguments range wider than IFEval's own** (IFBench's finding: models overfit the narrow
  ranges of the benchmark): :data:`WIDER_RANGES` draws the numbers; ``build_description`` draws the
  rest (keywords, letters, languages, markers) from Python's ``random``, seeded per row. Thresholds
  that no response can meet (fewer than 1 sentence, paragraph n of fewer than n) are not drawn.
- **Held-out types**: one type of each IFEval category (9 of 25, about a third), fixed by the seed.
"""
from __future__ import annotations

import hashlib
import random
from typing import Any, Callable

from core.cli import UserError
from core.if_checker import checker_registry, seeded_random

RELATIONS = ("less than", "at least")


def _threshold(name: str, low: int, high: int, relation: str | None = None) -> Callable[[random.Random], dict]:
    """Draw ``name`` in [low, high] (and a relation when given "relation"); "less than 1" is impossible, so
    under "less than" the threshold starts at 2."""
    def draw(rng: random.Random) -> dict:
        kwargs = {}
        if relation:
            kwargs[relation] = rng.choice(RELATIONS)
        start = max(low, 2) if kwargs.get(relation) == "less than" else low
        kwargs[name] = rng.randint(start, high)
        return kwargs
    return draw


def _nth_paragraph(rng: random.Random) -> dict:
    num = rng.randint(1, 8)
    return {"num_paragraphs": num, "nth_paragraph": rng.randint(1, num)}  # IFEval draws up to num + 1: unmeetable


#: IFEval type -> how its numeric arguments are drawn (IFEval's own range in the comment).
WIDER_RANGES: dict[str, Callable[[random.Random], dict]] = {
    "length_constraints:number_sentences": _threshold("num_sentences", 1, 30, "relation"),  # 1-20
    "length_constraints:number_paragraphs": _threshold("num_paragraphs", 1, 8),  # 1-5
    "length_constraints:number_words": _threshold("num_words", 20, 800, "relation"),  # 100-500
    "length_constraints:nth_paragraph_first_word": _nth_paragraph,  # 1-5
    "detectable_content:number_placeholders": _threshold("num_placeholders", 1, 8),  # 1-4
    "detectable_format:number_bullet_lists": _threshold("num_bullets", 1, 10),  # 1-5
    "detectable_format:number_highlighted_sections": _threshold("num_highlights", 1, 8),  # 1-4
    "detectable_format:multiple_sections": _threshold("num_sections", 1, 8),  # 1-5
    "keywords:frequency": _threshold("frequency", 1, 6, "relation"),  # 1-3
    "keywords:letter_frequency": _threshold("let_frequency", 1, 20, "let_relation"),  # 1-10
    "change_case:capital_word_frequency": _threshold("capital_frequency", 1, 40, "capital_relation"),  # 1-20
}


def row_seed(seed: int, *parts: Any) -> int:
    """A seed fixed by the run's seed and the row's identity alone (sha256: the same in every process)."""
    text = "\x1f".join(str(part) for part in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def conflict_table() -> dict[str, set[str]]:
    """IFEval type -> the types it may not share a prompt with (itself included), made symmetric."""
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_CONFLICTS

    table = {name: set(others) | {name} for name, others in INSTRUCTION_CONFLICTS.items()}
    for name, others in list(table.items()):
        for other in others:
            table.setdefault(other, {other}).add(name)
    return table


def category(instruction_id: str) -> str:
    return instruction_id.split(":", 1)[0]


def default_held_out(types: list[str], seed: int) -> list[str]:
    """One type per category, drawn with ``seed``."""
    rng = random.Random(row_seed(seed, "held_out"))
    categories = sorted({category(t) for t in types})
    return sorted(rng.choice(sorted(t for t in types if category(t) == c)) for c in categories)


def parse_held_out(value: str, types: list[str], seed: int) -> list[str]:
    """``default`` or a comma-separated list of IFEval types; an unknown type is a one-line error."""
    if value == "default":
        return default_held_out(types, seed)
    chosen = sorted({name.strip() for name in value.split(",") if name.strip()})
    unknown = [name for name in chosen if name not in types]
    if unknown:
        raise UserError(f"--held_out: unknown IFEval instruction type(s) {', '.join(unknown)}; known: {', '.join(types)}")
    if not chosen or len(chosen) == len(types):
        raise UserError(f"--held_out must name at least one type and leave at least one seen ({len(types)} in all)")
    return chosen


def pick_types(rng: random.Random, pool: list[str], count: int, conflicts: dict[str, set[str]]) -> list[str]:
    """Up to ``count`` distinct types of ``pool``, none conflicting with another (fewer when the pool runs out)."""
    picked: list[str] = []
    for _ in range(count):
        allowed = [t for t in pool if not any(t in conflicts.get(p, {p}) or p in conflicts.get(t, {t}) for p in picked)]
        if not allowed:
            break
        picked.append(rng.choice(allowed))
    return picked


def build_constraint(registry: dict, instruction_id: str, rng: random.Random, base_prompt: str) -> tuple[str, dict]:
    """(the checker's own sentence, the arguments it reports) for one type; numbers from :data:`WIDER_RANGES`."""
    checker = registry[instruction_id](instruction_id)
    kwargs = WIDER_RANGES[instruction_id](rng) if instruction_id in WIDER_RANGES else {}
    if "prompt_to_repeat" in (checker.get_instruction_args_keys() or []):
        kwargs["prompt_to_repeat"] = base_prompt  # "repeat the request": the request is the prompt without its constraints
    with seeded_random(rng.getrandbits(64)):
        description = checker.build_description(**kwargs)
        args = checker.get_instruction_args() or {}
    return description.strip(), {key: value for key, value in args.items() if value is not None}


def usable_ood_types(registry: dict) -> tuple[list[str], dict[str, str]]:
    """IFBench types whose checker can run here, and why each other one cannot.

    Each checker is probed once on a plain response: one that needs NLTK data absent on this machine,
    or an argument this generator cannot supply (a reference text), would leave every such row unscored.
    """
    usable, excluded = [], {}
    probe = "A short answer. It has two sentences.\n\nAnd a second paragraph."
    for instruction_id in sorted(registry):
        with seeded_random(row_seed(0, "probe", instruction_id)):
            checker = registry[instruction_id](instruction_id)
            kwargs = {"prompt_to_repeat": "Write a note."} if "prompt_to_repeat" in (checker.get_instruction_args_keys() or []) else {}
            try:
                checker.build_description(**kwargs)
                checker.check_following(probe)
            except LookupError:
                excluded[instruction_id] = "checker needs NLTK data that is not installed"
                continue
            except Exception as exc:  # noqa: BLE001 - a checker this generator cannot drive: excluded, with the reason
                excluded[instruction_id] = f"checker raised {type(exc).__name__} on a probe response"
                continue
        usable.append(instruction_id)
    return usable, excluded


def registries() -> tuple[dict, dict]:
    return checker_registry("ifeval"), checker_registry("ifbench")
