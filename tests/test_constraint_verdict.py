"""core.if_checker.judge_response: the one verdict behind checker-judged pairs and verifiable rewards."""
from __future__ import annotations

from core.if_checker import judge_response
from core.release_format import to_sample


def _sample(ids, kwargs):
    return to_sample("ifeval", {"key": 7, "prompt": "p", "instruction_id_list": ids, "kwargs": kwargs}, "test")


def test_counts_each_constraint_followed():
    sample = _sample(["change_case:english_lowercase", "punctuation:no_comma"], [{}, {}])
    assert judge_response("ifeval", sample, "all lower and no commas").followed == 2
    half = judge_response("ifeval", sample, "all lower, with a comma")
    assert (half.followed, half.total, half.fraction, half.all_followed) == (1, 2, 0.5, False)
    assert judge_response("ifeval", sample, "Upper, comma").fraction == 0.0


def test_an_unknown_constraint_is_never_counted_as_followed():
    sample = _sample(["punctuation:no_comma", "made_up:type"], [{}, {}])
    verdict = judge_response("ifeval", sample, "no commas here")
    assert (verdict.followed, verdict.total, verdict.unchecked) == (1, 2, 1)
    assert not verdict.all_followed
