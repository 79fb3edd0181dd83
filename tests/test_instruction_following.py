"""IFEval/IFBench scoring: the score-only CLI gives exactly the numbers if-verifiable gives directly.

Hand-written responses that pass and fail each instruction type, in tiny JSONL files built in
tmp_path; no network, no model, no shared data.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from evaluation import instruction_following as ifl
from evaluation.score_if import SCORES_FILE, main
from core.cli import UserError, run_cli

END = "Any other questions?"
# (instruction id, kwargs, a response that passes, a response that fails)
IFEVAL_CASES = [
    ("punctuation:no_comma", {}, "Hello world. No commas here.", "Hello, world."),
    ("length_constraints:number_words", {"relation": "less than", "num_words": 6},
     "Three short words.", "This answer has far more than six words in it."),
    # Punkt knows "Mr." and "p.m." are abbreviations: 2 sentences (a naive split on "." says 4).
    ("length_constraints:number_sentences", {"relation": "less than", "num_sentences": 3},
     "Mr. Smith arrived at 5 p.m. today. He sat down.", "One. Two. Three. Four."),
    ("detectable_format:json_format", {}, '```json\n{"answer": 42}\n```', "The answer is 42."),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* first\n* second", "* only one"),
    ("change_case:english_lowercase", {}, "all of this is lower case.", "Not All Lower Case."),
    ("startend:end_checker", {"end_phrase": END}, f"Done. {END}", f"{END} Done."),
]
IFBENCH_CASES = [
    ("format:no_whitespace", {}, "nowhitespaceatall", "some white space"),
    ("count:word_count_range", {"min_words": 2, "max_words": 4}, "exactly three words", "one"),
]


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _benchmark_rows(cases, key_type=int):
    """Two one-instruction prompts per case (the passing and the failing response), in release format."""
    prompts, responses = [], []
    for n, (iid, kwargs, good, bad) in enumerate(cases):
        for half, response in enumerate((good, bad)):
            key = key_type(2 * n + half + 1)
            prompts.append({"key": key, "prompt": f"Prompt {key} about {iid}.",
                            "instruction_id_list": [iid], "kwargs": [kwargs]})
            responses.append({"key": key, "response": response})
    return prompts, responses


def _library_numbers(benchmark: str, samples, responses) -> dict:
    """The four numbers and per-type counts computed straight from if_verifiable's own results."""
    from if_verifiable import evaluate_output_for_sample

    ifl.checker_registry(benchmark)  # import the library's checkers without nltk.download
    prompt_strict = prompt_loose = 0
    inst_total = inst_strict = inst_loose = 0
    per_type: dict[str, list[int]] = {}
    for sample, response in zip(samples, responses):
        results, scores = evaluate_output_for_sample(benchmark, sample, response)
        prompt_strict += scores.binary_strict == 1.0
        prompt_loose += scores.binary_loose == 1.0
        inst_total += len(sample.instruction_id_list)
        passed = {r.instruction_id: r for r in results}
        for iid in sample.instruction_id_list:
            r = passed.get(iid)
            counts = per_type.setdefault(iid, [0, 0, 0])
            counts[0] += 1
            counts[1] += bool(r and r.strict_pass)
            counts[2] += bool(r and r.loose_pass)
            inst_strict += bool(r and r.strict_pass)
            inst_loose += bool(r and r.loose_pass)
    n = len(samples)
    return {
        "prompt_strict": prompt_strict / n, "prompt_loose": prompt_loose / n,
        "instruction_strict": inst_strict / inst_total, "instruction_loose": inst_loose / inst_total,
        "per_type": {k: {"count": c[0], "strict_pass": c[1], "loose_pass": c[2],
                         "strict": c[1] / c[0], "loose": c[2] / c[0]} for k, c in per_type.items()},
    }


def _run(argv) -> dict:
    assert main([str(a) for a in argv]) == 0
    out = Path(argv[argv.index("--out") + 1]) / SCORES_FILE
    return json.loads(out.read_text(encoding="utf-8"))


def _assert_same_numbers(report: dict, expected: dict) -> None:
    for name in ("prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose"):
        assert report[name] == pytest.approx(expected[name], abs=0), name
    assert report["per_type"] == expected["per_type"]


def test_punkt_english_works_offline():
    import nltk

    from core.punkt_offline import ensure_punkt_english

    assert ensure_punkt_english() is None
    assert "punkt" in ifl.sentence_splitter_source().lower()
    assert nltk.sent_tokenize("Mr. Smith arrived at 5 p.m. today. He sat down.") == [
        "Mr. Smith arrived at 5 p.m. today.", "He sat down."]


def test_ifeval_score_only_matches_the_library(tmp_path):
    prompts, responses = _benchmark_rows(IFEVAL_CASES)
    # A prompt with two instructions, one followed and one not; one passed only in loose mode
    # (the first line is a preamble); an empty response fails everything.
    prompts += [
        {"key": 100, "prompt": "Two instructions.", "instruction_id_list":
            ["punctuation:no_comma", "change_case:english_lowercase"], "kwargs": [{}, {}]},
        {"key": 101, "prompt": "Loose only.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
        {"key": 102, "prompt": "Empty answer.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
    ]
    responses += [{"key": 100, "response": "hello, world"},
                  {"prompt": "Loose only.", "response": "Sure, here it is:\nno commas at all"},
                  {"key": 102, "response": "   "}]
    data = _write_jsonl(tmp_path / "ifeval.jsonl", prompts)
    resp = _write_jsonl(tmp_path / "responses.jsonl", responses)
    report = _run(["--responses", resp, "--data", data, "--out", tmp_path / "out"])

    samples = ifl.load_benchmark("ifeval", data)
    by_key = {r.get("key", None): r["response"] for r in responses}
    texts = [by_key.get(s.key, "Sure, here it is:\nno commas at all") for s in samples]
    _assert_same_numbers(report, _library_numbers("ifeval", samples, texts))

    # The hand-written responses really pass and fail (so the comparison above means something).
    outcome = {p["key"]: p for p in report["prompts"]}
    for n, (iid, *_rest) in enumerate(IFEVAL_CASES):
        assert outcome[2 * n + 1]["strict"] is True, iid
        assert outcome[2 * n + 2]["strict"] is False, iid
    assert [i["strict"] for i in outcome[100]["instructions"]] == [False, True]
    assert (outcome[101]["strict"], outcome[101]["loose"]) == (False, True)
    assert (outcome[102]["strict"], outcome[102]["loose"]) == (False, False)
    assert report["prompts_scored"] == report["prompts_total"] == len(prompts)
    assert report["instructions_total"] == 2 * len(IFEVAL_CASES) + 4
    assert report["unscored"] == [] and report["responses_unmatched"] == 0
    assert report["sentence_splitter"]


def test_ifbench_score_only_matches_the_library_and_lists_unscored(tmp_path):
    import nltk

    prompts, responses = _benchmark_rows(IFBENCH_CASES, key_type=str)
    prompts += [
        {"key": "u1", "prompt": "Made up.", "instruction_id_list": ["made:up"], "kwargs": [{}]},
        {"key": "s1", "prompt": "Stop words.", "instruction_id_list": ["ratio:stop_words"],
         "kwargs": [{"percentage": 50}]},
    ]
    responses += [{"key": "u1", "response": "anything"}, {"key": "s1", "response": "the cat and the dog"}]
    data = _write_jsonl(tmp_path / "ifbench.jsonl", prompts)
    resp = _write_jsonl(tmp_path / "responses.jsonl", responses)
    report = _run(["--benchmark", "ifbench", "--responses", resp, "--data", data, "--out", tmp_path])

    reasons = {u["key"]: u["reason"] for u in report["unscored"]}
    assert "unknown to if-verifiable" in reasons.pop("u1")
    try:
        nltk.data.find("corpora/stopwords")
        stopwords_here = True
    except LookupError:
        stopwords_here = False
    if not stopwords_here:
        assert "stopwords" in reasons.pop("s1")
    assert reasons == {}
    scored_keys = {p["key"] for p in report["prompts"] if p["unscored_reason"] is None}
    samples = [s for s in ifl.load_benchmark("ifbench", data) if s.key in scored_keys]
    by_key = {r["key"]: r["response"] for r in responses}
    _assert_same_numbers(report, _library_numbers("ifbench", samples, [by_key[s.key] for s in samples]))
    assert report["prompts_total"] == len(prompts)
    assert report["prompts_scored"] == len(samples)
    outcome = {p["key"]: p for p in report["prompts"]}
    for n, (iid, *_rest) in enumerate(IFBENCH_CASES):
        assert (outcome[str(2 * n + 1)]["strict"], outcome[str(2 * n + 2)]["strict"]) == (True, False), iid


def test_limit_and_unmatched_responses(tmp_path):
    prompts, responses = _benchmark_rows(IFEVAL_CASES[:2])
    data = _write_jsonl(tmp_path / "ifeval.jsonl", prompts)
    assert [s.key for s in ifl.load_benchmark("ifeval", data, limit=2)] == [1, 2]
    resp = _write_jsonl(tmp_path / "responses.jsonl",
                        responses[1:] + [{"key": 999, "response": "no such prompt"}])
    report = _run(["--responses", resp, "--data", data, "--limit", "3", "--out", tmp_path])
    assert report["prompts_total"] == 3
    # key 4 is past the limit and key 999 is nowhere: both unmatched; prompt 1 has no response.
    assert report["responses_unmatched"] == 2
    assert sorted(u["key"] for u in report["unmatched_responses"]) == [4, 999]
    assert report["unscored"] == [{"key": 1, "reason": "no response", "instructions": [
        {"instruction_id": IFEVAL_CASES[0][0], "reason": "no response"}]}]
    assert report["prompts_scored"] == 2


@pytest.mark.parametrize("content, message", [
    (None, "data file not found"),
    ('{"key": 1, "prompt": "x"\n', "not valid JSON"),
    ('{"key": 1, "prompt": "x", "kwargs": [{}]}\n', "missing instruction_id_list"),
    ('{"key": 1, "prompt": "x", "instruction_id_list": ["punctuation:no_comma"], "kwargs": []}\n',
     "one per instruction"),
    ("", "holds no ifeval prompts"),
])
def test_missing_or_malformed_data_is_a_one_line_error(tmp_path, capsys, content, message):
    data = tmp_path / "ifeval.jsonl"
    if content is not None:
        data.write_text(content, encoding="utf-8")
    resp = _write_jsonl(tmp_path / "responses.jsonl", [{"key": 1, "response": "hi"}])
    with pytest.raises(UserError, match=message):
        ifl.load_benchmark("ifeval", data)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, ["--responses", str(resp), "--data", str(data), "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_bad_arguments_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="unknown benchmark"):
        ifl.load_benchmark("mmlu", tmp_path / "x.jsonl")
    with pytest.raises(UserError, match="positive"):
        ifl.load_benchmark("ifeval", tmp_path / "x.jsonl", limit=0)
    data = _write_jsonl(tmp_path / "d.jsonl", _benchmark_rows(IFEVAL_CASES[:1])[0])
    resp = _write_jsonl(tmp_path / "r.jsonl", [{"key": 1, "response": "a"}, {"key": 1, "response": "b"}])
    with pytest.raises(UserError, match="second response"):
        main(["--responses", str(resp), "--data", str(data), "--out", str(tmp_path)])
    with pytest.raises(UserError, match="responses file not found"):
        main(["--responses", str(tmp_path / "none.jsonl"), "--data", str(data)])


def test_scores_are_json_serialisable_and_expose_per_type():
    from if_verifiable import IFEvalSample

    samples = [IFEvalSample(key=1, prompt="p", instruction_id_list=["punctuation:no_comma"], kwargs=[{}])]
    scores = ifl.score_responses("ifeval", samples, ["no commas"])
    json.dumps(scores.to_dict())
    assert scores.per_type_dict() == {"punctuation:no_comma": {
        "count": 1, "strict_pass": 1, "loose_pass": 1, "strict": 1.0, "loose": 1.0}}
    assert "prompt-level accuracy" in ifl.format_table(scores)
