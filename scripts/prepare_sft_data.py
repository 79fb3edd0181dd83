"""Build the SFT train/validation files from Stanford Alpaca and the cleaned Code Alpaca.

Run from the repository root:

    python scripts/prepare_sft_data.py
    python scripts/prepare_sft_data.py --download      # first fetch missing raw files (HTTPS; SHA-256 checked where pinned)
    python scripts/prepare_sft_data.py --raw_dir data/raw --out_dir data/processed --val_ratio 0.1 --seed 42

(``python -m scripts.prepare_sft_data`` works the same.)

Reads ``data/raw/alpaca_data.json`` and ``data/raw/cleaned_data.json`` (built from
``code_alpaca_20k.json`` by scripts/clean_code_data.py when missing), as the original study did:
the records are combined, shuffled with a fixed seed and split 90/10. Rows stay template-free
(``instruction``, ``input``, ``output``): the training run's ``--template`` renders them at
tokenization (core/prompting.py), so the flag does what it says. On top of that, nothing is lost silently:

- unusable records are dropped with a reason and written to ``rejected.jsonl``;
- exact duplicates (after whitespace normalisation, across all sources) are kept once;
- all records sharing a prompt (instruction + input) go to the same split, so no validation prompt
  was seen in training;
- outputs are written atomically and only after every input has been read and checked, so a bad
  input file leaves the previous outputs untouched;
- same inputs and seed give byte-identical outputs.

Writes to ``data/processed/``: ``sft_train.jsonl``, ``sft_val.jsonl``, ``rejected.jsonl`` and
``stats.json`` (the figures of the summary table printed at the end).
"""
from __future__ import annotations

import argparse
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a file: make `sft` and `scripts` importable
    sys.path.insert(0, str(REPO_ROOT))

from scripts.clean_code_data import NO_INPUT, STRIPPED, clean_file, clean_record, describe  # noqa: E402
from scripts.data_io import (  # noqa: E402
    content_id,
    load_json_records,
    normalise_whitespace,
    print_summary_table,
    sha256_of_file,
    write_json_atomic,
    write_jsonl_atomic,
)
from scripts.raw_sources import DERIVED_FILES, RAW_FILES, fetch_raw_file, raw_files_to_fetch  # noqa: E402
from core.cli import UserError, make_parser, parse_raising, run_cli  # noqa: E402

DEFAULT_RAW_DIR = REPO_ROOT / "data" / "raw"
DEFAULT_OUT_DIR = REPO_ROOT / "data" / "processed"
DEFAULT_SOURCES = ("alpaca_data.json", "cleaned_data.json")
OUTPUT_FILES = {"train": "sft_train.jsonl", "val": "sft_val.jsonl", "rejected": "rejected.jsonl", "stats": "stats.json"}

# Short, readable id prefixes; any other source uses its file stem.
ID_PREFIXES = {"alpaca_data.json": "alpaca", "cleaned_data.json": "code_alpaca"}

# An output that is, or begins with, a "no output" placeholder: Alpaca writes `<nooutput>`,
# `<No Output>`, `<no output> (...)`, even an unclosed `<nooutput - cannot ...`. A bare "No output"
# counts only as the whole field: in a sentence ("No output is printed because ...") it is an answer.
PLACEHOLDER_OUTPUT = re.compile(r"<\s*no\s*[-_]?\s*output|no\s*[-_]?\s*output\.?\Z", re.IGNORECASE)

# Why a record is dropped, in the order the checks run (and the summary table lists them).
REJECTION_REASONS = (
    "not_an_object",
    "missing_instruction",
    "instruction_not_string",
    "empty_instruction",
    "input_not_string",
    "missing_output",
    "output_not_string",
    "empty_output",
    "placeholder_output",
    "duplicate",
)
REPAIRS = (STRIPPED, NO_INPUT)


# ----------------------------------------------------------------------------- raw files


def ensure_raw_files(raw_dir: Path, sources: Sequence[str], download: bool) -> None:
    """Make sure every source exists: download what is allowed and needed, then build derived files."""
    missing = [name for name in sources if not (raw_dir / name).is_file()]
    for name in raw_files_to_fetch(raw_dir, sources, download):
        fetch_raw_file(raw_dir, name)
    for name in missing:
        if name in DERIVED_FILES:
            build_derived_file(raw_dir, name)


def build_derived_file(raw_dir: Path, name: str) -> None:
    """Build e.g. cleaned_data.json from code_alpaca_20k.json; the repairs it made are printed.

    (They are not put in stats.json: that file must come out the same whether or not this run
    happened to build the derived file.)
    """
    base = DERIVED_FILES[name]
    counts = clean_file(raw_dir / base, raw_dir / name)
    print(f"built {raw_dir / name} from {base}: {describe(counts)}")


# ----------------------------------------------------------------------------- records


def rejection_reason(record: Any) -> str | None:
    """Why a (cleaned) record cannot be used, or None when it can (duplicates are checked elsewhere)."""
    if not isinstance(record, dict):
        return "not_an_object"
    problem = text_field_problem(record, "instruction")
    if problem:
        return problem
    if not isinstance(record.get("input"), (str, type(None))):
        return "input_not_string"  # a missing or null input means "no input"
    problem = text_field_problem(record, "output")
    if problem:
        return problem
    if PLACEHOLDER_OUTPUT.match(record["output"].strip()):
        return "placeholder_output"
    return None


def text_field_problem(record: dict, name: str) -> str | None:
    """missing_/…_not_string/empty_<name>, or None when the field is a non-empty string."""
    value = record.get(name)
    if value is None:
        return f"missing_{name}"
    if not isinstance(value, str):
        return f"{name}_not_string"
    if not value.strip():
        return f"empty_{name}"
    return None


@dataclass
class SourceResult:
    rows: list[dict] = field(default_factory=list)
    prompt_keys: list[tuple[str, str]] = field(default_factory=list)  # one per row, for the split
    rejected: list[dict] = field(default_factory=list)
    counts: dict = field(default_factory=dict)


def prepare_source(name: str, records: list, seen: dict[tuple, str]) -> SourceResult:
    """Clean, check and de-duplicate one source's records.

    ``seen`` maps each kept record's normalised (instruction, input, output) to its id; it is
    shared across sources so a record repeated in a later file is dropped as a duplicate.
    """
    prefix = ID_PREFIXES.get(name) or re.sub(r"[^A-Za-z0-9]+", "_", Path(name).stem)
    result = SourceResult(counts={
        "read": len(records), "kept": 0,
        "dropped": dict.fromkeys(REJECTION_REASONS, 0), "repaired": dict.fromkeys(REPAIRS, 0),
    })
    for index, original in enumerate(records):
        record, repairs = clean_record(original)
        reason = rejection_reason(record)
        if reason is None:
            instruction, input_text, output = record["instruction"], record.get("input") or "", record["output"]
            key = (normalise_whitespace(instruction), normalise_whitespace(input_text), normalise_whitespace(output))
            if key in seen:
                reason = "duplicate"
        if reason is not None:
            result.counts["dropped"][reason] += 1
            rejected = {"source": name, "index": index, "reason": reason, "record": original}
            if reason == "duplicate":
                rejected["duplicate_of"] = seen[key]
            result.rejected.append(rejected)
            continue
        # Repairs are counted for kept records only: a dropped record is accounted for by its reason.
        for repair in repairs:
            result.counts["repaired"][repair] += 1
        seen[key] = record_id = content_id(prefix, *key)
        result.prompt_keys.append(key[:2])
        result.rows.append({
            "id": record_id,
            "source": name,
            "instruction": instruction,
            "input": input_text,
            "output": output,
        })
        result.counts["kept"] += 1
    return result


# ----------------------------------------------------------------------------- split


def prompt_key(row: dict) -> tuple[str, str]:
    return normalise_whitespace(row["instruction"]), normalise_whitespace(row["input"])


def split_by_prompt(
    rows: list[dict], val_ratio: float, seed: int, keys: Sequence[tuple[str, str]] | None = None
) -> tuple[list[dict], list[dict], dict]:
    """Shuffle with ``seed`` and split about ``val_ratio`` of the rows into validation.

    The unit of the split is the prompt group (all rows with the same normalised instruction and
    input), so a prompt never appears in both splits; validation may overshoot its target by less
    than one group. Groups are listed in first-seen order before shuffling, so the result depends
    only on the rows and the seed. ``keys`` (each row's :func:`prompt_key`) may be passed when the
    caller has them already.
    """
    groups: dict[tuple[str, str], list[dict]] = {}
    for row, key in zip(rows, keys if keys is not None else map(prompt_key, rows)):
        groups.setdefault(key, []).append(row)
    ordered = list(groups.items())
    rng = random.Random(seed)
    rng.shuffle(ordered)
    target = round(len(rows) * val_ratio)
    train: list[dict] = []
    val: list[dict] = []
    train_keys = set()
    for key, group in ordered:
        if len(val) < target:
            val.extend(group)
        else:
            train.extend(group)
            train_keys.add(key)
    # Shuffle again inside each split so the rows of one group are not next to each other.
    rng.shuffle(train)
    rng.shuffle(val)
    # Check the promise on the rows themselves, not on the bookkeeping above.
    leaked = {prompt_key(row) for row in val} & train_keys
    if leaked:
        raise RuntimeError(f"bug: {len(leaked)} prompt groups were split across train and val")
    shared = [group for _, group in ordered if len(group) > 1]
    return train, val, {
        "val_target": target,
        "prompt_groups": len(ordered),
        "prompt_groups_with_several_records": len(shared),
        "records_in_shared_prompt_groups": sum(len(group) for group in shared),
        "prompts_in_both_splits": len(leaked),
    }


# ----------------------------------------------------------------------------- statistics


def count_by_source(rows: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["source"]] = counts.get(row["source"], 0) + 1
    return counts


def build_stats(args, results: dict[str, SourceResult], hashes: dict[str, str], train, val, split) -> dict:
    """Everything the summary table shows, plus provenance. No times or absolute paths: the file
    must be byte-identical for the same inputs and seed."""
    train_by_source, val_by_source = count_by_source(train), count_by_source(val)
    sources = {}
    for name, result in results.items():
        sources[name] = {
            "sha256": hashes[name], **result.counts,
            "train": train_by_source.get(name, 0), "val": val_by_source.get(name, 0),
        }
    totals = {
        "read": sum(s["read"] for s in sources.values()),
        "kept": sum(s["kept"] for s in sources.values()),
        "dropped": {r: sum(s["dropped"][r] for s in sources.values()) for r in REJECTION_REASONS},
        "repaired": {r: sum(s["repaired"][r] for s in sources.values()) for r in REPAIRS},
        "train": len(train),
        "val": len(val),
    }
    return {
        "seed": args.seed,
        "val_ratio": args.val_ratio,
        "format": "template-free rows (instruction, input, output): the training run's --template renders them",
        "sources": sources,
        "totals": totals,
        "split": split,
        "outputs": dict(OUTPUT_FILES),  # file names, in the folder of this stats file
    }


def summary_rows(stats: dict) -> tuple[list[str], list[list]]:
    columns = [*stats["sources"].values(), stats["totals"]]
    header = ["", *stats["sources"], "total"]
    rows: list[list] = [["read", *(c["read"] for c in columns)]]
    rows += [[f"dropped: {r}", *(c["dropped"][r] for c in columns)] for r in REJECTION_REASONS]
    rows.append(["kept", *(c["kept"] for c in columns)])
    rows += [[f"repaired: {r}", *(c["repaired"][r] for c in columns)] for r in REPAIRS]
    rows += [["train", *(c["train"] for c in columns)], ["val", *(c["val"] for c in columns)]]
    return header, rows


def count_notes(stats: dict) -> list[str]:
    """A note for each source whose size differs from the published file's (e.g. a truncated download)."""
    notes = []
    for name, counts in stats["sources"].items():
        raw = RAW_FILES.get(DERIVED_FILES.get(name, name))
        if raw and counts["read"] != raw.expected_records:
            notes.append(f"note: {name} has {counts['read']:,} records; the published file has {raw.expected_records:,}")
    return notes


def no_usable_records_message(results: dict[str, SourceResult]) -> str:
    dropped: dict[str, int] = {}
    for result in results.values():
        for reason, count in result.counts["dropped"].items():
            dropped[reason] = dropped.get(reason, 0) + count
    reasons = ", ".join(f"{reason} {count}" for reason, count in dropped.items() if count) or "the sources are empty"
    return f"no usable records in {', '.join(results)} (dropped: {reasons})"


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(
        description="Combine Alpaca and cleaned Code Alpaca into template-free SFT train/val JSONL files (the training run renders its --template).",
    )
    parser.add_argument("--raw_dir", type=Path, default=DEFAULT_RAW_DIR,
                        help="folder holding the raw source files (default: data/raw)")
    parser.add_argument("--out_dir", type=Path, default=DEFAULT_OUT_DIR,
                        help="folder for sft_train.jsonl, sft_val.jsonl, rejected.jsonl, stats.json (default: data/processed)")
    parser.add_argument("--val_ratio", type=float, default=0.1,
                        help="share of records in the validation split, between 0 and 1 (default: 0.1)")
    parser.add_argument("--seed", type=int, default=42, help="shuffling seed; same inputs and seed give identical files (default: 42)")
    parser.add_argument("--sources", nargs="+", default=list(DEFAULT_SOURCES), metavar="FILE",
                        help="JSON files inside raw_dir, each a list of {instruction, input, output} "
                             f"(default: {' '.join(DEFAULT_SOURCES)}; cleaned_data.json is built from code_alpaca_20k.json when missing)")
    parser.add_argument("--download", action="store_true",
                        help="fetch missing raw files from their public source over HTTPS (their SHA-256 is checked where one is pinned in scripts/raw_sources.py, else printed)")
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    if not 0 < args.val_ratio < 1:
        raise UserError(f"--val_ratio must be between 0 and 1 (exclusive), got {args.val_ratio}")
    if len(set(args.sources)) != len(args.sources):
        raise UserError(f"--sources lists a file twice: {' '.join(args.sources)}")


def main(argv: Sequence[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    check_args(args)
    ensure_raw_files(args.raw_dir, args.sources, args.download)

    # Read and check every input before writing anything, so a bad file leaves old outputs intact.
    loaded = {name: load_json_records(args.raw_dir / name) for name in args.sources}
    hashes = {name: sha256_of_file(args.raw_dir / name) for name in args.sources}
    seen: dict[tuple, str] = {}
    results = {name: prepare_source(name, records, seen) for name, records in loaded.items()}
    rows = [row for result in results.values() for row in result.rows]
    keys = [key for result in results.values() for key in result.prompt_keys]
    if not rows:
        raise UserError(no_usable_records_message(results))
    if len({row["id"] for row in rows}) != len(rows):  # 48-bit content hashes: a clash is ~1e-5 at 72k rows
        raise RuntimeError("bug: two different records got the same id; lengthen the id hash")
    train, val, split = split_by_prompt(rows, args.val_ratio, args.seed, keys)
    stats = build_stats(args, results, hashes, train, val, split)

    out = args.out_dir
    write_jsonl_atomic(out / OUTPUT_FILES["train"], train)
    write_jsonl_atomic(out / OUTPUT_FILES["val"], val)
    write_jsonl_atomic(out / OUTPUT_FILES["rejected"], [r for result in results.values() for r in result.rejected])
    write_json_atomic(out / OUTPUT_FILES["stats"], stats)

    print_summary_table(*summary_rows(stats), title=f"SFT data (seed {args.seed}, val_ratio {args.val_ratio}):")
    print(
        f"prompt groups: {split['prompt_groups']:,}; {split['prompt_groups_with_several_records']:,} with several records "
        f"({split['records_in_shared_prompt_groups']:,} records), each kept whole in one split; "
        f"prompts in both splits: {split['prompts_in_both_splits']}"
    )
    for note in count_notes(stats):
        print(note)
    print(f"wrote {', '.join(str(out / name) for name in OUTPUT_FILES.values())} in {time.perf_counter() - started:.2f} s")
    return 0


def check_argv(argv: Sequence[str]) -> None:
    """Parse and check the flags, raising UserError, and stop there (scripts/run_study.py, before its first stage)."""
    check_args(parse_raising(build_parser(), argv))


main.check_argv = check_argv

if __name__ == "__main__":
    run_cli(main)
