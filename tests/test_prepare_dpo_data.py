"""scripts/prepare_dpo_data.py: both file formats (with malformed rows), the split, determinism, errors.

The ``--from_sft_model`` source needs a trained SFT run; it is tested in tests/test_dpo_training.py.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from scripts import prepare_dpo_data as prep
from scripts.pair_sources import FILE_REASONS
from core.cli import UserError
from core.prompting import load_template

TEMPLATE = load_template("alpaca")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def hh(*turns: str) -> str:
    """A dialogue in HH-RLHF's layout from alternating Human/Assistant texts."""
    roles = ["Human", "Assistant"]
    return "".join(f"\n\n{roles[i % 2]}: {text}" for i, text in enumerate(turns))


def write_gz_lines(path: Path, lines: list[str]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write("".join(line + "\n" for line in lines))
    return path


GOOD_HH = [
    {"chosen": hh("How do I boil an egg?", "Put it in boiling water for nine minutes."),
     "rejected": hh("How do I boil an egg?", "Eggs are bad.")},
    {"chosen": hh("Hi", "Hello! How can I help?", "Name a red fruit.", "A strawberry."),
     "rejected": hh("Hi", "Hello! How can I help?", "Name a red fruit.", "I will not answer.")},
    {"chosen": hh("What is two plus two?", "Four."), "rejected": hh("What is two plus two?", "Five.")},
    {"chosen": hh("Say something kind.", "You are doing great."), "rejected": hh("Say something kind.", "No.")},
]
MALFORMED_HH = {
    "not_an_object": ["a list", "not a pair"],
    "missing_field": {"chosen": hh("Hi", "Hello")},
    "field_not_string": {"chosen": 3, "rejected": hh("Hi", "Hello")},
    "no_assistant_turn": {"chosen": "\n\nHuman: only a question", "rejected": "\n\nHuman: only a question"},
    "prompt_mismatch": {"chosen": hh("Question A?", "Answer."), "rejected": hh("Question B?", "Other answer.")},
    "last_turn_not_human": {"chosen": hh("Hi", "Hello") + "\n\nAssistant: again", "rejected": hh("Hi", "Hello") + "\n\nAssistant: once more"},
    "empty_chosen": {"chosen": hh("Tell me a joke.", "   "), "rejected": hh("Tell me a joke.", "No.")},
    "chosen_equals_rejected": {"chosen": hh("Hi there", "Hello  friend."), "rejected": hh("Hi there", "Hello friend.")},
}


@pytest.fixture()
def hh_file(tmp_path) -> Path:
    lines = [json.dumps(row) for row in GOOD_HH]
    lines += [json.dumps(row) for row in MALFORMED_HH.values()]
    lines.append(json.dumps(GOOD_HH[0]))  # an exact duplicate
    lines.append('{"chosen": "unterminated')  # not JSON at all
    return write_gz_lines(tmp_path / "hh.jsonl.gz", lines)


def run(args: list[str]) -> int:
    return prep.main(args)


def test_hh_rlhf_rows_become_template_prompts_and_final_replies(hh_file, tmp_path):
    out = tmp_path / "out"
    assert run(["--from_file", str(hh_file), "--format", "hh-rlhf", "--out_dir", str(out), "--val_ratio", "0.25"]) == 0
    rows = read_jsonl(out / "prefs_train.jsonl") + read_jsonl(out / "prefs_val.jsonl")
    assert len(rows) == len(GOOD_HH)
    by_instruction = {row["instruction"]: row for row in rows}

    single = by_instruction["How do I boil an egg?"]
    assert single["input"] == ""
    assert single["chosen"] == "Put it in boiling water for nine minutes."
    assert single["rejected"] == "Eggs are bad."
    assert set(single) == {"instruction", "input", "chosen", "rejected", "source", "id"}  # template-free

    multi = by_instruction["Name a red fruit."]  # instruction = last Human turn, input = the turns before it
    assert multi["input"] == "Human: Hi\nAssistant: Hello! How can I help?"
    assert multi["chosen"] == "A strawberry." and multi["rejected"] == "I will not answer."
    assert "Human:" not in multi["chosen"] + multi["rejected"]


def test_hh_rlhf_malformed_rows_are_counted_by_reason_and_kept_aside(hh_file, tmp_path):
    out = tmp_path / "out"
    run(["--from_file", str(hh_file), "--format", "hh-rlhf", "--out_dir", str(out)])
    stats = json.loads((out / "prefs_stats.json").read_text())
    expected = {reason: 1 for reason in MALFORMED_HH} | {"invalid_json": 1, "duplicate": 1}
    assert {k: v for k, v in stats["dropped"].items() if v} == expected
    assert stats["read"] == len(GOOD_HH) + len(MALFORMED_HH) + 2
    assert stats["kept"] == stats["train"] + stats["val"] == len(GOOD_HH)
    rejected = read_jsonl(out / "prefs_rejected.jsonl")
    assert sorted(r["reason"] for r in rejected) == sorted(expected)
    assert all("record" in r and "index" in r for r in rejected)
    duplicate = next(r for r in rejected if r["reason"] == "duplicate")
    assert duplicate["duplicate_of"] in {row["id"] for row in read_jsonl(out / "prefs_train.jsonl") + read_jsonl(out / "prefs_val.jsonl")}


def test_summary_table_is_printed_with_every_reason(hh_file, tmp_path, capsys):
    run(["--from_file", str(hh_file), "--format", "hh-rlhf", "--out_dir", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    for reason in FILE_REASONS["hh-rlhf"]:
        assert f"dropped: {reason}" in printed
    assert "prompts in both splits: 0" in printed


def test_pairs_format_parses_rendered_prompts_back_into_instruction_and_input(tmp_path):
    variant = "### Instruction:\nTranslate to French.\n\n### Input:\nI like apples.\n\n### Response:\n"  # no preamble
    rows = [
        {"instruction": "Name a colour.", "input": "", "chosen": "Red.", "rejected": "Seven."},
        {"prompt": variant, "chosen": "J'aime les pommes.", "rejected": "I like apples."},
        {"prompt": TEMPLATE.render("List two primes.", ""), "chosen": "2 and 3.", "rejected": "4 and 6."},
        {"prompt": "Just a question without layout?", "chosen": "An answer.", "rejected": "Another answer."},
        {"prompt": "Missing rejected", "chosen": "x"},
    ]
    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "out"
    run(["--from_file", str(source), "--out_dir", str(out), "--val_ratio", "0.25"])
    kept = {row["instruction"]: row for row in read_jsonl(out / "prefs_train.jsonl") + read_jsonl(out / "prefs_val.jsonl")}
    assert kept["Translate to French."]["input"] == "I like apples."
    assert kept["List two primes."]["input"] == "" and kept["Just a question without layout?"]["input"] == ""
    assert "prompt" not in kept["Translate to French."]
    stats = json.loads((out / "prefs_stats.json").read_text())
    assert stats["notes"] == {"instruction_given": 1, "prompt_in_template": 1, "prompt_parsed_from_variant": 1,
                              "prompt_used_as_instruction": 1}
    assert stats["dropped"]["missing_field"] == 1 and stats["kept"] == 4


def _pairs_sharing_prompts(n_prompts: int = 12, per_prompt: int = 3) -> list[dict]:
    return [{"instruction": f"Question number {p}?", "chosen": f"Good answer {p}.{k}", "rejected": f"Bad answer {p}.{k}"}
            for p in range(n_prompts) for k in range(per_prompt)]


def test_no_prompt_in_both_splits_and_same_seed_same_bytes(tmp_path):
    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in _pairs_sharing_prompts()), encoding="utf-8")
    outputs = []
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        run(["--from_file", str(source), "--out_dir", str(tmp_path / name), "--seed", seed, "--val_ratio", "0.25"])
        outputs.append({f: (tmp_path / name / f).read_bytes() for f in ("prefs_train.jsonl", "prefs_val.jsonl", "prefs_stats.json")})
    assert outputs[0] == outputs[1]
    assert outputs[0]["prefs_val.jsonl"] != outputs[2]["prefs_val.jsonl"]
    train = read_jsonl(tmp_path / "a" / "prefs_train.jsonl")
    val = read_jsonl(tmp_path / "a" / "prefs_val.jsonl")
    assert len(train) + len(val) == 36 and len(val) >= 9
    assert not {(r["instruction"], r["input"]) for r in train} & {(r["instruction"], r["input"]) for r in val}


def test_num_pairs_keeps_a_seeded_subset_and_says_so(tmp_path, capsys):
    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in _pairs_sharing_prompts()), encoding="utf-8")
    run(["--from_file", str(source), "--out_dir", str(tmp_path / "out"), "--num_pairs", "10"])
    stats = json.loads((tmp_path / "out" / "prefs_stats.json").read_text())
    assert stats["train"] + stats["val"] == 10 and stats["left_out_over_num_pairs"] == 26
    assert "left out (over --num_pairs)" in capsys.readouterr().out


def test_bad_input_is_a_one_line_error_and_leaves_old_outputs(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "prefs_train.jsonl").write_text("old\n")
    with pytest.raises(UserError, match="file not found"):
        run(["--from_file", str(tmp_path / "missing.jsonl"), "--out_dir", str(out)])
    useless = tmp_path / "useless.jsonl"
    useless.write_text(json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"}) + "\n")
    with pytest.raises(UserError, match="no usable pairs.*chosen_equals_rejected 1"):
        run(["--from_file", str(useless), "--out_dir", str(out)])
    for name, text in (("empty.jsonl", ""), ("blank.jsonl", "\n  \n"), ("empty.json", " ")):  # it said "the source is empty"
        (tmp_path / name).write_text(text)                                                     # or "not valid JSON"
        with pytest.raises(UserError, match=rf"^\S+{name} is empty$"):
            run(["--from_file", str(tmp_path / name), "--out_dir", str(out)])
    assert (out / "prefs_train.jsonl").read_text() == "old\n"
    with pytest.raises(UserError, match="val_ratio"):
        run(["--from_file", str(useless), "--val_ratio", "1.5"])


def test_sample_problem_drops_empty_and_gold_copies():
    assert prep.sample_problem("The answer.", "  ") == "empty_sample"
    assert prep.sample_problem("The  answer.", "The answer.\n") == "sample_equals_gold"
    assert prep.sample_problem("The answer.", "Another answer.") is None


def test_command_line_errors_exit_with_one_line(tmp_path, capsys):
    from core.cli import run_cli

    with pytest.raises(SystemExit) as exit_info:
        run_cli(prep.main, ["--from_file", str(tmp_path / "nope.jsonl")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err


def test_sampling_draws_only_prompts_that_fit_and_is_seeded():
    candidates = [{"instruction": f"q{i}", "response": "a"} for i in range(6)]
    ids = [[1] * n for n in (3, 9, 4, 10, 2, 5)]
    picked, too_long = prep.pick_fitting(candidates, ids, limit=5, num_pairs=10, seed=0)
    assert too_long == 2 and sorted(e["instruction"] for e, _ in picked) == ["q0", "q2", "q4", "q5"]
    first, _ = prep.pick_fitting(candidates, ids, limit=5, num_pairs=2, seed=3)
    again, _ = prep.pick_fitting(candidates, ids, limit=5, num_pairs=2, seed=3)
    assert first == again and len(first) == 2


def test_sampling_rows_without_instruction_or_response_are_counted(tmp_path, capsys):
    rows = [{"instruction": "q", "input": "", "response": "a"}, {"instruction": "", "response": "a"}, {"prompt": "p"}]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    assert len(prep.load_sft_examples(path)) == 1
    assert "3 of 4 rows" in capsys.readouterr().out
