"""Cleaning rules for Code Alpaca (scripts/clean_code_data.py). Small JSON files in tmp_path; no network."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # so `import scripts...` works under plain `pytest` too
    sys.path.insert(0, str(REPO_ROOT))

from scripts.clean_code_data import (  # noqa: E402
    NO_INPUT,
    STRIPPED,
    clean_file,
    clean_record,
    clean_records,
    is_no_input_marker,
    main,
    strip_field,
)
from core.cli import UserError  # noqa: E402


@pytest.mark.parametrize(
    "marker",
    ["<noinput>", "<NOINPUT>", "< noinput >", "<no input>", "<No Input>", "<no-input>", "<no_input>",
     "No input", "no input", "NO INPUT", "No input.", "  <noinput>\n", "<ninput>", "<noput>"],
)
def test_every_spelling_of_the_no_input_marker_becomes_an_empty_input(marker):
    cleaned, repairs = clean_record({"instruction": "Sort a list.", "input": marker, "output": "sorted(x)"})
    assert cleaned["input"] == ""
    assert NO_INPUT in repairs


@pytest.mark.parametrize(
    "text",
    ["Table name: Salary\n\n<noinput>", "no input is needed here", "<input>", "None", "N/A", "x = '<noinput>'", ""],
)
def test_a_marker_inside_real_text_or_other_words_is_not_a_marker(text):
    assert not is_no_input_marker(text)
    cleaned, repairs = clean_record({"instruction": "Do it.", "input": text, "output": "ok"})
    assert cleaned["input"] == text.strip()
    assert NO_INPUT not in repairs


def test_markers_are_only_normalised_in_the_input_field():
    cleaned, _ = clean_record({"instruction": "<noinput>", "input": "", "output": "No input"})
    assert cleaned["instruction"] == "<noinput>" and cleaned["output"] == "No input"


def test_whitespace_around_fields_is_stripped_and_counted():
    record = {"instruction": "  Reverse a string.\n", "input": "\t'abc' ", "output": "\n\ns[::-1]  \n"}
    cleaned, repairs = clean_record(record)
    assert cleaned == {"instruction": "Reverse a string.", "input": "'abc'", "output": "s[::-1]"}
    assert repairs == [STRIPPED]
    assert record["instruction"] == "  Reverse a string.\n"  # the caller's record is not modified


def test_code_indentation_inside_fields_is_kept():
    code = "def f(xs):\n    for x in xs:\n\tif x:\n            yield x\n\n    return"
    cleaned, repairs = clean_record({"instruction": "Write f.", "input": "", "output": f"\n{code}\n\n"})
    assert cleaned["output"] == code
    assert repairs == [STRIPPED]


def test_an_indented_code_block_keeps_its_first_line_indentation():
    block = "    x = 1\n    if x:\n        y = 2"
    assert strip_field("\n\n" + block + "\n") == block
    assert strip_field("   single line   ") == "single line"


def test_clean_records_are_unchanged_and_not_counted():
    record = {"instruction": "Add.", "input": "1, 2", "output": "3"}
    cleaned, repairs = clean_record(record)
    assert cleaned == record and repairs == []


def test_non_objects_and_non_string_fields_pass_through_for_the_prepare_step_to_reject():
    records = [["a list"], "text", 3, None, {"instruction": 5, "input": None, "output": ["x"], "extra": " kept "}]
    cleaned, counts = clean_records(records)
    assert cleaned == records
    assert counts == {"records": 5, STRIPPED: 0, NO_INPUT: 0}


def test_clean_file_writes_the_cleaned_list_and_returns_the_counts(tmp_path):
    src, dst = tmp_path / "code_alpaca_20k.json", tmp_path / "cleaned_data.json"
    src.write_text(json.dumps([
        {"instruction": " A ", "input": "<noinput>", "output": "print(1)"},
        {"instruction": "B", "input": "x = 2", "output": "  print(x)"},
        {"instruction": "C", "input": "", "output": "pass"},
    ]))
    counts = clean_file(src, dst)
    assert counts == {"records": 3, STRIPPED: 2, NO_INPUT: 1}
    assert json.loads(dst.read_text()) == [
        {"instruction": "A", "input": "", "output": "print(1)"},
        {"instruction": "B", "input": "x = 2", "output": "print(x)"},
        {"instruction": "C", "input": "", "output": "pass"},
    ]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_cli_reports_a_missing_input_with_its_public_source(tmp_path):
    with pytest.raises(UserError, match=r"code_alpaca_20k\.json: file not found.*https://raw\.githubusercontent\.com/sahil280114"):
        main(["--input", str(tmp_path / "code_alpaca_20k.json"), "--output", str(tmp_path / "out.json")])


def test_cli_reports_malformed_json_in_one_line_with_exit_status_2(tmp_path):
    src = tmp_path / "code_alpaca_20k.json"
    src.write_text('[\n  {"instruction": "a",\n   "output": }\n]')
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "clean_code_data.py"), "--input", str(src), "--output", str(tmp_path / "o.json")],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "code_alpaca_20k.json: not valid JSON at line 3, column 14" in result.stderr
    assert not (tmp_path / "o.json").exists()
