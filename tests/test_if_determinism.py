"""The same response gets the same IFEval score on every scoring, in any order, in any process.

IFEval prompt 1122 asks for at least four '#'; if-verifiable's letter-frequency checker finds '#' is
not a letter and draws a random letter to count instead. Unseeded, one response passed on some
scorings and failed on others (prompt-strict 15.0 four times and 20.0 once in the issue). The row
is rebuilt here as in the release file; no shared data is read.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

from evaluation import instruction_following as ifl
from core.if_checker import instruction_seed, seeded_random

ROOT = Path(__file__).resolve().parents[1]
PROMPT_1122 = {
    "key": 1122,
    "prompt": "make a tweet for playboy's twitter account without using capital letters. Include at least 4 hashtags, "
              "starting with '#'",
    "instruction_id_list": ["change_case:english_lowercase", "keywords:letter_frequency"],
    "kwargs": [{}, {"let_relation": "at least", "letter": "#", "let_frequency": 4}],
}
# Half the alphabet 4+ times, half never: whichever letter the checker draws decides pass or fail,
# so an unseeded checker gives both outcomes over ten scorings (all ten equal: p ~ 0.002).
RESPONSE = "aaaa bbbb cccc dddd eeee ffff gggg hhhh iiii jjjj kkkk llll mmmm #one #two #three #four"
OTHERS = [
    {"key": 7, "prompt": "No commas.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
    {"key": 8, "prompt": "Lower case.", "instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}]},
]


def _samples(tmp_path: Path, rows) -> list:
    path = tmp_path / "ifeval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return ifl.load_benchmark("ifeval", path)


def _outcome_1122(scores) -> tuple:
    prompt = next(p for p in scores.prompts if p.key == 1122)
    return prompt.strict, prompt.loose, tuple((i.strict, i.loose) for i in prompt.instructions)


def test_prompt_1122_scores_the_same_ten_times_and_in_any_order(tmp_path):
    samples = _samples(tmp_path, [PROMPT_1122] + OTHERS)
    responses = [RESPONSE, "no commas here", "Not Lower"]
    outcomes = {_outcome_1122(ifl.score_responses("ifeval", samples, responses)) for _ in range(10)}
    for seed in range(5):  # other prompts before it, and other uses of random in between
        order = list(range(len(samples)))
        random.Random(seed).shuffle(order)
        random.random()
        outcomes.add(_outcome_1122(ifl.score_responses("ifeval", [samples[i] for i in order],
                                                       [responses[i] for i in order])))
    assert len(outcomes) == 1, outcomes
    scores = ifl.score_responses("ifeval", samples, responses)
    assert scores.drawn_at_random == [{"key": 1122, "instruction_id": "keywords:letter_frequency"}]
    assert "drew one at random" in ifl.format_table(scores)
    assert scores.prompt_strict == {True: 2, False: 1}[_outcome_1122(scores)[0]] / 3


def test_scoring_leaves_the_global_random_state_as_it_was(tmp_path):
    samples = _samples(tmp_path, [PROMPT_1122])
    random.seed(5)
    expected = [random.random() for _ in range(3)]
    random.seed(5)
    ifl.score_responses("ifeval", samples, [RESPONSE])
    assert [random.random() for _ in range(3)] == expected


def test_another_process_gives_the_same_score(tmp_path):
    samples = _samples(tmp_path, [PROMPT_1122])
    here = _outcome_1122(ifl.score_responses("ifeval", samples, [RESPONSE]))
    code = ("import sys, json; sys.path.insert(0, sys.argv[1]); from evaluation import instruction_following as ifl; "
            "p = ifl.score_responses('ifeval', ifl.load_benchmark('ifeval', sys.argv[2]), [sys.argv[3]]).prompts[0]; "
            "print(json.dumps([p.strict, p.loose, [[i.strict, i.loose] for i in p.instructions]]))")
    for hash_seed in ("1", "2"):  # str hashes differ between these processes; the score must not
        out = subprocess.run([sys.executable, "-c", code, str(ROOT), str(tmp_path / "ifeval.jsonl"), RESPONSE],
                             capture_output=True, text=True, check=True, env={**os.environ, "PYTHONHASHSEED": hash_seed})
        strict, loose, rows = json.loads(out.stdout.strip().splitlines()[-1])
        assert (strict, loose, tuple(tuple(r) for r in rows)) == here


def test_the_seed_depends_on_benchmark_key_and_instruction_only():
    assert instruction_seed("ifeval", 1122, 1, "keywords:letter_frequency") == \
        instruction_seed("ifeval", "1122", 1, "keywords:letter_frequency")
    seeds = {instruction_seed(b, k, i, "x") for b in ("ifeval", "ifbench") for k in (1, 2) for i in (0, 1)}
    assert len(seeds) == 8
    with seeded_random(3):
        first = random.random()
    with seeded_random(3):
        assert random.random() == first
