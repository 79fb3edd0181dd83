"""Evaluate base vs fine-tuned (SFT, DPO, ...) side by side: the user's entry point to ``evaluation/``.

    python -m sft.eval_sft                                   # models/sft_output vs its base model
    python -m sft.eval_sft --adapter_dir models/sft_output --num_examples 50 --prompts my_prompts.txt
    python -m sft.eval_sft --adapter_dir models/sft_output models/dpo_output   # base | sft | dpo
    python -m sft.eval_sft --help

What it measures and writes: see ``evaluation/run.py``.
"""
from __future__ import annotations

from typing import Sequence

from core.cli import run_cli
from evaluation.config import parse_eval_config


def main(argv: Sequence[str] | None = None) -> int:
    # The arguments first: --help and a misspelled flag answer before torch and transformers load.
    # (evaluation.run parses them again: a few milliseconds, and it stays callable on its own.)
    parse_eval_config(argv)
    from core.threads import apply_thread_guard
    from evaluation.run import main as evaluate

    apply_thread_guard()
    return evaluate(argv)


main.check_argv = parse_eval_config  # the flags alone, checked (scripts/run_study.py, before its first stage)

if __name__ == "__main__":
    run_cli(main)
