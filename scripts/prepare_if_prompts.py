"""Build constraint-augmented prompts for instruction-following training and validation.

Run from the repository root:

    python scripts/prepare_if_prompts.py --raw_dir data/raw --sources alpaca_data.json --out_dir data/if \\
        --decontaminate data/raw/ifeval_input_data.jsonl
    python scripts/prepare_if_prompts.py --sft_file data/processed/sft_train.jsonl --out_dir data/if \\
        --held_out punctuation:no_comma,startend:quotation --num_train 5000 --num_val 300 --seed 42

Each instruction (Alpaca-style ``instruction`` + ``input``) gets 1 to ``--max_constraints``
verifiable constraints (scripts/if_constraints.py: the checker's own sentence, arguments wider than
IFEval's, never two conflicting types). The original ``input`` is folded into the prompt text:
``prompt`` = instruction, a blank line, input (when there is one), a blank line, the constraint
sentences (one a line); ``instruction`` holds that same whole text and ``input`` is empty, so every stage that
renders (instruction, input) shows the model exactly ``prompt``.

Outputs in ``--out_dir``, each row ``{key, prompt, instruction_id_list, kwargs, instruction, input,
source, source_id}`` (IFEval's release format, read unchanged by ``evaluation.score_if`` and
``eval_sft --ifeval``):

- ``if_train.jsonl``: seen IFEval types only (no held-out type ever);
- ``if_val_seen.jsonl``: other instructions, seen types; ``if_val_heldout.jsonl``: other
  instructions, held-out types only; ``if_val_ood.jsonl``: other instructions, one IFBench type each
  (score with benchmark ``ifbench``);
- ``if_rejected.jsonl``: every instruction dropped, with its reason; ``if_stats.json``: the figures.

The four files share no instruction. Instructions that overlap a test file (``--decontaminate``;
default: ``ifeval_input_data.jsonl`` in ``--raw_dir`` when it is there) are dropped by Tülu 3's
8-gram rule (scripts/decontaminate.py). Instructions beyond the requested sizes are counted as
unused. The same inputs and seed give byte-identical files.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a file: make `core` and `scripts` importable
    sys.path.insert(0, str(REPO_ROOT))

from core.cli import UserError, make_parser, parse_raising, run_cli  # noqa: E402
from scripts.data_io import (  # noqa: E402
    load_json_records, load_jsonl_records, normalise_whitespace, print_summary_table, sha256_of_file,
    write_json_atomic, write_jsonl_atomic,
)
from scripts.decontaminate import is_contaminated, read_test_prompts, ngram_set  # noqa: E402
from scripts.if_constraints import (  # noqa: E402
    build_constraint, conflict_table, parse_held_out, pick_types, registries, row_seed, usable_ood_types,
)
from scripts.prepare_sft_data import ensure_raw_files, prepare_source  # noqa: E402

DEFAULT_RAW_DIR = REPO_ROOT / "data" / "raw"
DEFAULT_OUT_DIR = REPO_ROOT / "data" / "if"
DEFAULT_TEST_FILE = "ifeval_input_data.jsonl"
SPLITS = ("train", "val_seen", "val_heldout", "val_ood")
OUTPUT_FILES = {**{split: f"if_{split}.jsonl" for split in SPLITS}, "rejected": "if_rejected.jsonl", "stats": "if_stats.json"}


# ----------------------------------------------------------------------------- instructions


def read_instructions(args) -> tuple[list[dict], list[dict], dict, dict]:
    """(kept rows, rejected entries, drop counts, source sha256s): cleaned as for SFT, one row per distinct prompt."""
    if args.sft_file is not None:
        if not args.sft_file.is_file():
            raise UserError(f"--sft_file {args.sft_file} not found")
        loaded = {args.sft_file.name: (args.sft_file, load_jsonl_records(args.sft_file))}
    else:
        ensure_raw_files(args.raw_dir, args.sources, download=False)
        loaded = {name: (args.raw_dir / name, load_json_records(args.raw_dir / name)) for name in args.sources}
    seen_records: dict[tuple, str] = {}
    rows, rejected, drops, seen_prompts = [], [], Counter(), {}
    for name, (path, records) in loaded.items():
        result = prepare_source(name, records, seen_records)
        drops.update({reason: count for reason, count in result.counts["dropped"].items() if count})
        rejected += result.rejected
        for index, row in enumerate(result.rows):
            key = (normalise_whitespace(row["instruction"]), normalise_whitespace(row["input"]))
            if key in seen_prompts:  # another answer to the same prompt: one prompt row is enough
                drops["duplicate_prompt"] += 1
                rejected.append({"source": name, "reason": "duplicate_prompt", "record": row, "duplicate_of": seen_prompts[key]})
                continue
            seen_prompts[key] = row["id"]
            rows.append(row)
    hashes = {name: sha256_of_file(path) for name, (path, _) in loaded.items()}
    return rows, rejected, dict(drops), hashes


def base_prompt(row: dict) -> str:
    """The request without constraints: instruction, then the input (Alpaca's context) after a blank line."""
    return "\n\n".join(part.strip() for part in (row["instruction"], row.get("input") or "") if part.strip())


def test_files(args) -> list[Path]:
    if args.decontaminate is not None:
        return [] if args.decontaminate == ["none"] else [Path(p) for p in args.decontaminate]
    default = args.raw_dir / DEFAULT_TEST_FILE
    return [default] if args.sft_file is None and default.is_file() else []


def decontaminate(rows: list[dict], files: list[Path]) -> tuple[list[dict], list[dict]]:
    """(clean rows, rejected entries) by Tülu 3's 8-gram rule against every test file's prompts."""
    grams = ngram_set(prompt for path in files for prompt in read_test_prompts(path))
    clean, rejected = [], []
    for row in rows:
        if grams and is_contaminated(base_prompt(row), grams):
            rejected.append({"source": row["source"], "reason": "contaminated_8gram", "record": row})
        else:
            clean.append(row)
    return clean, rejected


def allocate(rows: list[dict], num_train: int, num_val: int, seed: int) -> tuple[dict[str, list[dict]], int]:
    """Rows shuffled with ``seed``: ``num_val`` for each validation file first, then up to ``num_train``; also the unused count."""
    if len(rows) < 3 * num_val + 1:
        raise UserError(f"only {len(rows):,} usable instructions: not enough for three validation files of {num_val} "
                        f"and a training file; lower --num_val")
    order = list(rows)
    random.Random(seed).shuffle(order)
    parts, start = {}, 0
    for split in ("val_seen", "val_heldout", "val_ood"):
        parts[split], start = order[start:start + num_val], start + num_val
    parts["train"] = order[start:start + num_train]
    return {split: parts[split] for split in SPLITS}, max(0, len(order) - start - num_train)


# ----------------------------------------------------------------------------- constraints


def constrained_row(key: int, row: dict, types: list[str], registry: dict, rng: random.Random) -> dict:
    """One release-format row: the request, the checker-built constraint sentences, their arguments."""
    request = base_prompt(row)
    built = [build_constraint(registry, instruction_id, rng, request) for instruction_id in types]
    # One constraint a line: some sentences end without a full stop (IFEval's bullet example ends "* This is point 2").
    prompt = request + "\n\n" + "\n".join(sentence for sentence, _ in built)
    return {"key": key, "prompt": prompt, "instruction_id_list": list(types), "kwargs": [kwargs for _, kwargs in built],
            "instruction": prompt, "input": "", "source": row["source"], "source_id": row["id"]}


def build_split(split: str, rows: list[dict], pool: list[str], registry: dict, max_constraints: int,
                conflicts: dict, seed: int) -> list[dict]:
    out = []
    for key, row in enumerate(rows, start=1):
        rng = random.Random(row_seed(seed, split, row["id"]))
        types = pick_types(rng, pool, rng.randint(1, max_constraints), conflicts)
        out.append(constrained_row(key, row, types, registry, rng))
    return out


# ----------------------------------------------------------------------------- statistics and output


def split_stats(rows: list[dict]) -> dict:
    per_type = Counter(t for row in rows for t in row["instruction_id_list"])
    per_prompt = Counter(len(row["instruction_id_list"]) for row in rows)
    return {"rows": len(rows), "per_type": dict(sorted(per_type.items())),
            "constraints_per_prompt": {str(n): per_prompt[n] for n in sorted(per_prompt)}}


def build_stats(args, held_out, seen, ood, ood_excluded, read, drops, contaminated, unused, hashes, files, outputs) -> dict:
    """Everything the summary shows; no times or absolute paths (byte-identical reruns)."""
    return {
        "seed": args.seed, "max_constraints": args.max_constraints, "num_train": args.num_train, "num_val": args.num_val,
        "sources": hashes,
        "held_out_types": held_out, "seen_types": seen, "ood_types": ood, "ood_types_excluded": ood_excluded,
        "instructions_read": read, "dropped": dict(sorted(drops.items())),
        "decontamination": {"rule": "Tulu 3: drop when > 50% of tokens lie in 8-grams shared with a test prompt",
                            "test_files": {p.name: sha256_of_file(p) for p in files}, "dropped": contaminated},
        "unused_instructions": unused,
        "files": {OUTPUT_FILES[split]: split_stats(rows) for split, rows in outputs.items()},
    }


def print_summary(stats: dict) -> None:
    rows = [["instructions read", stats["instructions_read"]]]
    rows += [[f"dropped: {reason}", count] for reason, count in stats["dropped"].items()]
    rows += [["dropped: contaminated_8gram", stats["decontamination"]["dropped"]], ["unused (over the sizes)", stats["unused_instructions"]]]
    rows += [[name, figures["rows"]] for name, figures in stats["files"].items()]
    print_summary_table(["", "count"], rows, title=f"IF prompts (seed {stats['seed']}):")
    histogram = [[name] + [figures["constraints_per_prompt"].get(str(n), 0) for n in range(1, stats["max_constraints"] + 1)]
                 for name, figures in stats["files"].items()]
    print_summary_table(["constraints per prompt"] + list(range(1, stats["max_constraints"] + 1)), histogram)
    types = sorted({t for figures in stats["files"].values() for t in figures["per_type"]})
    print_summary_table(["type"] + [name.removeprefix("if_").removesuffix(".jsonl") for name in stats["files"]],
                        [[t] + [figures["per_type"].get(t, 0) for figures in stats["files"].values()] for t in types])
    print(f"held out ({len(stats['held_out_types'])}): {', '.join(stats['held_out_types'])}")
    if stats["ood_types_excluded"]:
        print(f"IFBench types not used ({len(stats['ood_types_excluded'])}): "
              + "; ".join(f"{t} ({why})" for t, why in stats["ood_types_excluded"].items()))


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(description="Constraint-augmented prompts (IFEval release format) for training and validation.")
    parser.add_argument("--raw_dir", type=Path, default=DEFAULT_RAW_DIR, help="folder holding --sources (default: data/raw)")
    parser.add_argument("--sources", nargs="+", default=["alpaca_data.json"], metavar="FILE",
                        help="JSON files in --raw_dir, each a list of {instruction, input, output} (default: alpaca_data.json)")
    parser.add_argument("--sft_file", type=Path, default=None, help="instead of --sources: an SFT JSONL from prepare_sft_data.py")
    parser.add_argument("--out_dir", type=Path, default=DEFAULT_OUT_DIR, help="output folder (default: data/if)")
    parser.add_argument("--held_out", default="default",
                        help="IFEval types kept out of training: 'default' (one per category, drawn with --seed) or TYPE,TYPE,...")
    parser.add_argument("--max_constraints", type=int, default=3, help="most constraints per prompt (default: 3)")
    parser.add_argument("--num_train", type=int, default=3000, help="training prompts, at most (default: 3000)")
    parser.add_argument("--num_val", type=int, default=300, help="prompts in each validation file (default: 300)")
    parser.add_argument("--decontaminate", nargs="+", default=None, metavar="FILE",
                        help=f"test files (JSONL with 'prompt') to decontaminate against, or 'none' "
                             f"(default: {DEFAULT_TEST_FILE} in --raw_dir when it is there)")
    parser.add_argument("--seed", type=int, default=42, help="seed for the split, the types and their arguments (default: 42)")
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def check_args(args) -> None:
    if args.max_constraints < 1 or args.num_train < 1 or args.num_val < 1:
        raise UserError("--max_constraints, --num_train and --num_val must be >= 1")


def check_argv(argv: Sequence[str]) -> None:
    """Parse and check the flags (``--held_out`` included), raising UserError, and stop there (scripts/run_study.py,
    before its first stage)."""
    args = parse_raising(build_parser(), argv)
    check_args(args)
    parse_held_out(args.held_out, sorted(registries()[0]), args.seed)


def main(argv: Sequence[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    check_args(args)
    ifeval, ifbench = registries()
    types = sorted(ifeval)
    held_out = parse_held_out(args.held_out, types, args.seed)  # before any reading: a bad type costs nothing
    seen = [t for t in types if t not in held_out]
    ood, ood_excluded = usable_ood_types(ifbench)
    files = test_files(args)
    rows, rejected, drops, hashes = read_instructions(args)
    read = len(rows) + sum(drops.values())
    rows, contaminated = decontaminate(rows, files)
    parts, unused = allocate(rows, args.num_train, args.num_val, args.seed)
    conflicts = conflict_table()
    pools = {"train": (seen, ifeval, args.max_constraints), "val_seen": (seen, ifeval, args.max_constraints),
             "val_heldout": (held_out, ifeval, args.max_constraints), "val_ood": (ood, ifbench, 1)}
    outputs = {split: build_split(split, parts[split], pools[split][0], pools[split][1], pools[split][2], conflicts, args.seed)
               for split in SPLITS}
    stats = build_stats(args, held_out, seen, ood, ood_excluded, read, drops, len(contaminated), unused, hashes, files, outputs)
    for split in SPLITS:
        write_jsonl_atomic(args.out_dir / OUTPUT_FILES[split], outputs[split])
    write_jsonl_atomic(args.out_dir / OUTPUT_FILES["rejected"], rejected + contaminated)
    write_json_atomic(args.out_dir / OUTPUT_FILES["stats"], stats)
    print_summary(stats)
    print(f"wrote {', '.join(str(args.out_dir / name) for name in OUTPUT_FILES.values())} in {time.perf_counter() - started:.2f} s")
    return 0


main.check_argv = check_argv

if __name__ == "__main__":
    run_cli(main)
