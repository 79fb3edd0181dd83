"""A benchmark file that does not match the IFEval/IFBench release format: one line naming the first bad line."""
from __future__ import annotations

import json

import pytest

from core.cli import UserError, run_cli
from evaluation.instruction_following import load_benchmark

GOOD = {"key": 1, "prompt": "Answer in lowercase.", "instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}]}


def good(key: int) -> str:
    return json.dumps({**GOOD, "key": key})


@pytest.mark.parametrize("bad, message", [
    ('{"key": 9, "prompt": "x"', "not valid JSON"),
    ('["a list"]', "expected a JSON object"),
    ('{"key": 9, "prompt": "x", "kwargs": [{}]}', "not in the ifeval release format (missing instruction_id_list)"),
    (json.dumps({**GOOD, "key": None}), "'key' is NoneType, not a number or a string"),
    (json.dumps({**GOOD, "key": 9, "prompt": 3}), "'prompt' is int, not a string"),
    (json.dumps({**GOOD, "key": 9, "instruction_id_list": "punctuation:no_comma"}), "must be a list of strings"),
    (json.dumps({**GOOD, "key": 9, "kwargs": []}), "one per instruction (1)"),
    (good(1), "duplicate key 1 (first at "),
])
def test_the_error_names_the_first_bad_line_and_what_is_wrong(tmp_path, bad, message):
    path = tmp_path / "ifeval.jsonl"
    # line 1 good, line 2 blank (still counted), line 3 bad, line 4 also bad: line 3 is reported
    path.write_text("\n".join([good(1), "", bad, "not json either"]) + "\n", encoding="utf-8")
    with pytest.raises(UserError) as error:
        load_benchmark("ifeval", path, limit=1)  # the whole file is checked, not only the first prompt
    text = str(error.value)
    assert text.startswith(f"{path}:3: ") and message in text and "\n" not in text


def test_a_file_that_is_not_utf8_names_its_line(tmp_path):
    path = tmp_path / "ifeval.jsonl"
    path.write_bytes((good(1) + "\n").encode() + b'{"key": 2, "prompt": "caf\xe9"}\n')
    with pytest.raises(UserError, match=rf"^{path}:2: not UTF-8 text"):
        load_benchmark("ifeval", path)


def test_a_good_file_with_blank_lines_and_a_bom_loads(tmp_path):
    path = tmp_path / "ifeval.jsonl"
    path.write_text("\ufeff" + good(1) + "\n\n" + json.dumps({**GOOD, "key": "b"}) + "\n", encoding="utf-8")
    assert [s.key for s in load_benchmark("ifeval", path)] == [1, "b"]


def test_the_cli_prints_one_line_and_exits_2(tmp_path, capsys):
    from evaluation.score_if import main

    data = tmp_path / "ifeval.jsonl"
    data.write_text(good(1) + "\n" + '{"key": 2}' + "\n", encoding="utf-8")
    responses = tmp_path / "responses.jsonl"
    responses.write_text(json.dumps({"key": 1, "response": "hi"}) + "\n", encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, ["--responses", str(responses), "--data", str(data), "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == f"error: {data}:2: not in the ifeval release format (missing prompt, instruction_id_list, kwargs)\n"


def test_the_study_refuses_a_bad_file_before_any_stage_runs(tmp_path):
    from scripts import run_study

    bad = tmp_path / "ifbench.jsonl"
    bad.write_text(good(1) + "\n" + json.dumps({**GOOD, "key": 2, "kwargs": {}}) + "\n", encoding="utf-8")
    stage = run_study.Stage("report", ["sft.eval_sft", "--ifbench", str(bad)], tmp_path / "report.md")
    with pytest.raises(UserError, match=rf"^{bad}:2: 'kwargs' must be a list of objects"):
        run_study.check_benchmarks([stage], offline=True)
