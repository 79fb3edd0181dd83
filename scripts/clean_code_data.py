"""Clean the raw Code Alpaca 20k file into ``cleaned_data.json``.

Run from the repository root:

    python scripts/clean_code_data.py
    python scripts/clean_code_data.py --input data/raw/code_alpaca_20k.json --output data/raw/cleaned_data.json

(``python scripts/prepare_sft_data.py`` runs this step itself when ``cleaned_data.json`` is missing.)

What it changes, and nothing else:
- whitespace around ``instruction``, ``input`` and ``output`` is stripped; whitespace inside a field
  (code indentation, blank lines) is kept;
- an ``input`` that is only a no-input marker (``<noinput>``, ``< noinput >``, ``<no input>``, a bare
  ``No input``, any case) becomes the empty string.

It drops no records: deciding what is unusable, and recording why, is the prepare step's job, so
every dropped record is accounted for in one place (``data/processed/rejected.jsonl``).
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a file: make `sft` and `scripts` importable
    sys.path.insert(0, str(REPO_ROOT))

from scripts.data_io import load_json_records, write_json_atomic  # noqa: E402
from scripts.raw_sources import RAW_FILES  # noqa: E402
from core.cli import UserError, make_parser, run_cli  # noqa: E402

TEXT_FIELDS = ("instruction", "input", "output")

# Matched against the whole (stripped) input only: a marker inside real text is content, not a marker.
NO_INPUT_MARKER = re.compile(
    r"<\s*(?:no\s*[-_]?\s*input|ninput|noput)\s*>"  # <noinput>, < noinput >, <no input>, <No-Input>;
    # <ninput> and <noput> are typos of it that occur in Alpaca's input field
    r"|no\s*[-_]?\s*input\.?",  # a bare "No input" / "no input."
    re.IGNORECASE,
)

# Blank lines before the first line with text (spaces/tabs on them included).
_LEADING_BLANK_LINES = re.compile(r"\A(?:[^\S\n]*\n)+")

# Names of the repairs, as counted in the statistics.
STRIPPED = "whitespace_stripped"
NO_INPUT = "no_input_marker"


def is_no_input_marker(text: str) -> bool:
    """True when the whole field (ignoring surrounding whitespace) is a no-input marker."""
    return NO_INPUT_MARKER.fullmatch(text.strip()) is not None


def strip_field(text: str) -> str:
    """Strip whitespace around a field without breaking code.

    Trailing whitespace and leading blank lines always go. Leading spaces on the first line go too,
    except when the field is a multi-line block whose first line is indented: there the
    indentation is relative to the following lines (code), and removing it would change the code.
    """
    if not text or not (text[0].isspace() or text[-1].isspace()):
        return text  # the common case, checked first: the full run touches ~200k fields
    body = _LEADING_BLANK_LINES.sub("", text.rstrip())
    if "\n" in body and body[:1] in (" ", "\t"):
        return body
    return body.lstrip()


def clean_record(record: Any) -> tuple[Any, list[str]]:
    """The cleaned record and the repairs made (a subset of ``[STRIPPED, NO_INPUT]``).

    Anything that is not an object, and fields that are not strings, are passed through unchanged
    so the prepare step can reject them with a reason. The input record is never modified (an
    unchanged record is returned as it is).
    """
    if not isinstance(record, dict):
        return record, []
    changes = {}
    for field in TEXT_FIELDS:
        value = record.get(field)
        if isinstance(value, str):
            stripped = strip_field(value)
            if stripped != value:
                changes[field] = stripped
    repairs = [STRIPPED] if changes else []
    input_text = changes.get("input", record.get("input"))
    if isinstance(input_text, str) and input_text and is_no_input_marker(input_text):
        changes["input"] = ""
        repairs.append(NO_INPUT)
    if not changes:
        return record, repairs  # unchanged: no copy (the full run cleans ~72k records)
    cleaned = {**record, **changes}
    return cleaned, repairs


def clean_records(records: list) -> tuple[list, dict[str, int]]:
    """Clean every record; the counts are records affected per repair (plus ``records``)."""
    counts = {"records": len(records), STRIPPED: 0, NO_INPUT: 0}
    cleaned = []
    for record in records:
        record, repairs = clean_record(record)
        for repair in repairs:
            counts[repair] += 1
        cleaned.append(record)
    return cleaned, counts


def clean_file(src: str | Path, dst: str | Path) -> dict[str, int]:
    """Read ``src`` (a JSON list of records), write the cleaned list to ``dst`` atomically; return the counts."""
    records = load_json_records(src)
    cleaned, counts = clean_records(records)
    write_json_atomic(dst, cleaned)
    return counts


def describe(counts: dict[str, int]) -> str:
    return (
        f"{counts['records']:,} records; no-input markers normalised to an empty input: {counts[NO_INPUT]:,}; "
        f"records with surrounding whitespace stripped: {counts[STRIPPED]:,}"
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = make_parser(
        description="Clean Code Alpaca: strip whitespace around fields, turn no-input markers into an empty input.",
    )
    parser.add_argument(
        "--input",
        type=Path,
        default=REPO_ROOT / "data" / "raw" / "code_alpaca_20k.json",
        help="raw Code Alpaca file, a JSON list of {instruction, input, output} (default: data/raw/code_alpaca_20k.json)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=REPO_ROOT / "data" / "raw" / "cleaned_data.json",
        help="where to write the cleaned list (default: data/raw/cleaned_data.json); written atomically",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.input.is_file():
        source = RAW_FILES["code_alpaca_20k.json"].url
        raise UserError(
            f"{args.input}: file not found; download it from {source} "
            "(or run `python scripts/prepare_sft_data.py --download`, which fetches and cleans it)"
        )
    counts = clean_file(args.input, args.output)
    print(f"cleaned {args.input} -> {args.output}: {describe(counts)}")
    return 0


if __name__ == "__main__":
    run_cli(main)
