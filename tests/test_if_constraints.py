"""The constraints the prompt generator draws: the checker agrees with the sentence, conflicts never meet.

For every IFEval type the generator uses, with arguments the generator itself drew (several draws
each), a response built to comply passes the checker and one built to violate fails.
``language:response_language`` is the exception: a compliant answer in any of ~30 drawn languages
cannot be built generically (only its violation is tested). IFBench's types (the out-of-distribution
file) have no generic builders either: each of its 58 checkers tests something different.
"""
from __future__ import annotations

import random

import pytest

from core.if_checker import checker_registry, judge_response
from core.release_format import to_sample
from scripts.if_constraints import (
    WIDER_RANGES, build_constraint, conflict_table, default_held_out, parse_held_out, pick_types, row_seed,
)
from core.cli import UserError

FILLER = "1 2 3"  # no letters, no words: counts of letters, keywords and capitals stay what the builder put


def words(word: str, count: int) -> str:
    return " ".join([word] * count)


def sentences(count: int) -> str:
    return " ".join(["This is one sentence."] * count)


def at_least(kwargs: dict, number: str, relation: str) -> tuple[int, int]:
    """(count that complies, count that violates) for an "at least N" / "less than N" threshold."""
    n = kwargs[number]
    return (n, n - 1) if kwargs[relation] == "at least" else (n - 1, n)


def paragraphs(count: int, separator: str = "\n\n") -> str:
    return separator.join(f"Paragraph number {i} here." for i in range(count))


def nth_first_word(kw: dict, word: str) -> str:
    parts = [f"Plain paragraph {i}." for i in range(kw["num_paragraphs"])]
    parts[kw["nth_paragraph"] - 1] = f"{word} starts this paragraph."
    return "\n\n".join(parts)


def sections(kw: dict, count: int) -> str:
    return "Intro.\n" + "\n".join(f"{kw['section_spliter']} {i + 1}\nText of the section." for i in range(count))


def threshold_pair(kw: dict, number: str, relation: str, make) -> tuple[str, str]:
    comply, violate = at_least(kw, number, relation)
    return make(comply), make(violate)


ENGLISH = "the answer is written here in plain english for the reader to see"

# type -> kwargs -> (a response that complies, one that violates)
BUILDERS = {
    "keywords:existence": lambda kw: (" ".join(kw["keywords"]), FILLER),
    "keywords:frequency": lambda kw: threshold_pair(kw, "frequency", "relation", lambda n: words(kw["keyword"], n) or FILLER),
    "keywords:forbidden_words": lambda kw: (FILLER, " ".join(kw["forbidden_words"])),
    "keywords:letter_frequency": lambda kw: threshold_pair(
        kw, "let_frequency", "let_relation", lambda n: words(kw["letter"].lower(), n) or FILLER),
    "length_constraints:number_sentences": lambda kw: threshold_pair(kw, "num_sentences", "relation", sentences),
    "length_constraints:number_paragraphs": lambda kw: (paragraphs(kw["num_paragraphs"], "\n\n***\n\n"),
                                                        paragraphs(kw["num_paragraphs"] + 1, "\n\n***\n\n")),
    "length_constraints:number_words": lambda kw: threshold_pair(kw, "num_words", "relation", lambda n: words("word", n)),
    "length_constraints:nth_paragraph_first_word": lambda kw: (nth_first_word(kw, kw["first_word"]), nth_first_word(kw, "zebra")),
    "detectable_content:number_placeholders": lambda kw: (" ".join(f"[p{i}]" for i in range(kw["num_placeholders"])),
                                                          " ".join(f"[p{i}]" for i in range(kw["num_placeholders"] - 1)) or FILLER),
    "detectable_content:postscript": lambda kw: (f"Answer.\n\n{kw['postscript_marker']} a note.", "Answer."),
    "detectable_format:number_bullet_lists": lambda kw: ("\n".join(["* item"] * kw["num_bullets"]),
                                                         "\n".join(["* item"] * (kw["num_bullets"] + 1))),
    "detectable_format:constrained_response": lambda kw: ("My answer is yes.", "Perhaps."),
    "detectable_format:number_highlighted_sections": lambda kw: (" ".join(["*highlighted*"] * kw["num_highlights"]),
                                                                 " ".join(["*highlighted*"] * (kw["num_highlights"] - 1)) or FILLER),
    "detectable_format:multiple_sections": lambda kw: (sections(kw, kw["num_sections"]), sections(kw, kw["num_sections"] - 1)),
    "detectable_format:json_format": lambda kw: ('{"answer": 1}', "not json"),
    "detectable_format:title": lambda kw: ("<<A title>>\nThe text.", "The text."),
    "combination:two_responses": lambda kw: ("First answer.\n******\nSecond answer.", "Only one answer."),
    "combination:repeat_prompt": lambda kw: (kw["prompt_to_repeat"] + " The answer.", "The answer."),
    "startend:end_checker": lambda kw: ("The text. " + kw["end_phrase"], "The text."),
    "change_case:capital_word_frequency": lambda kw: threshold_pair(
        kw, "capital_frequency", "capital_relation", lambda n: (words("WORD", n) + " and more words").strip()),
    "change_case:english_capital": lambda kw: (ENGLISH.upper(), ENGLISH),
    "change_case:english_lowercase": lambda kw: (ENGLISH, ENGLISH.upper()),
    "punctuation:no_comma": lambda kw: ("No commas at all here.", "Yes, a comma."),
    "startend:quotation": lambda kw: ('"The quoted answer."', "The unquoted answer."),
}
NOT_BUILT = {"language:response_language"}


@pytest.fixture(scope="module")
def registry() -> dict:
    return checker_registry("ifeval")


def drawn(registry: dict, instruction_id: str, draw: int) -> tuple[str, dict]:
    return build_constraint(registry, instruction_id, random.Random(row_seed(7, instruction_id, draw)), "Name three fruits.")


def verdict(instruction_id: str, sentence: str, kwargs: dict, response: str):
    row = {"key": 1, "prompt": "Name three fruits.\n\n" + sentence, "instruction_id_list": [instruction_id], "kwargs": [kwargs]}
    return judge_response("ifeval", to_sample("ifeval", row, "test"), response)


def test_every_ifeval_type_has_a_builder_or_a_reason(registry):
    assert set(BUILDERS) | NOT_BUILT == set(registry)


@pytest.mark.parametrize("instruction_id", sorted(BUILDERS))
def test_built_compliant_response_passes_and_violating_one_fails(registry, instruction_id):
    for draw in range(6):
        sentence, kwargs = drawn(registry, instruction_id, draw)
        comply, violate = BUILDERS[instruction_id]({**kwargs, "prompt_to_repeat": kwargs.get("prompt_to_repeat", "")})
        assert verdict(instruction_id, sentence, kwargs, comply).all_followed, (instruction_id, kwargs, comply)
        assert verdict(instruction_id, sentence, kwargs, violate).followed == 0, (instruction_id, kwargs, violate)


def test_response_language_violation_fails(registry):
    for draw in range(6):
        sentence, kwargs = drawn(registry, "language:response_language", draw)
        if kwargs["language"] != "en":
            assert verdict("language:response_language", sentence, kwargs, ENGLISH * 3).followed == 0


def test_wider_ranges_reach_past_ifeval_and_stay_meetable():
    rng = random.Random(0)
    sentences_drawn = [WIDER_RANGES["length_constraints:number_sentences"](rng) for _ in range(400)]
    assert max(k["num_sentences"] for k in sentences_drawn) > 20  # IFEval's own maximum
    assert all(k["num_sentences"] >= 2 for k in sentences_drawn if k["relation"] == "less than")
    nth = [WIDER_RANGES["length_constraints:nth_paragraph_first_word"](rng) for _ in range(200)]
    assert all(1 <= k["nth_paragraph"] <= k["num_paragraphs"] for k in nth)


def test_conflicting_types_never_drawn_together(registry):
    conflicts, pool = conflict_table(), sorted(registry)
    rng = random.Random(3)
    for _ in range(2000):
        picked = pick_types(rng, pool, 3, conflicts)
        assert len(set(picked)) == len(picked)
        for a in picked:
            for b in picked:
                assert a == b or b not in conflicts.get(a, set()), (a, b)
    # the table is made symmetric: english_capital is listed under english_lowercase only
    assert "change_case:english_lowercase" in conflicts["change_case:english_capital"]


def test_default_held_out_is_one_per_category_and_seeded(registry):
    types = sorted(registry)
    held = default_held_out(types, 1)
    assert len({t.split(":")[0] for t in held}) == len(held) == len({t.split(":")[0] for t in types})
    assert held == default_held_out(types, 1) and parse_held_out("default", types, 1) == held
    assert any(default_held_out(types, seed) != held for seed in range(2, 6))
    with pytest.raises(UserError, match="unknown IFEval instruction type"):
        parse_held_out("punctuation:no_comma,made:up", types, 1)
