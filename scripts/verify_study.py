"""Re-check a study's report from its committed files: every count, rate, interval and p-value it prints.

    python scripts/verify_study.py results/smollm2-135m-instruct      # a published study
    python scripts/verify_study.py runs/my_study                       # a study folder (its report/)

Reads ``per_prompt.jsonl.gz`` and ``metrics.json`` beside ``report.md`` (never the weights), recomputes the
comparisons with the report's own seed and resample count (``evaluation/verify.py``), and checks both
metrics.json's numbers and report.md's study sections against them. Exit 0 with one summary line when
all match; exit 1 listing every mismatch.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from core.cli import make_parser, run_cli  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = make_parser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("study", help="a study folder (with report/) or the folder holding report.md")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from evaluation.verify import verify_report

    result = verify_report(args.study)
    for line in result.mismatches:
        print(f"mismatch: {line}")
    print(result.summary())
    return 1 if result.mismatches else 0


if __name__ == "__main__":
    run_cli(main)
