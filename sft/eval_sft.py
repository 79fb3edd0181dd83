"""Evaluate base vs fine-tuned (SFT, DPO, ...) side by side: the user's entry point to ``evaluation/``.

    python -m sft.eval_sft                                   # models/sft_output vs its base model
    python -m sft.eval_sft --adapter_dir models/sft_output --num_examples 50 --prompts my_prompts.txt
    python -m sft.eval_sft --adapter_dir models/sft_output models/dpo_output   # base | sft | dpo
    python -m sft.eval_sft --help

What it measures and writes: see ``evaluation/run.py``.
"""
from __future__ import annotations

from core.cli import run_cli
from evaluation.run import main

__all__ = ["main"]

if __name__ == "__main__":
    run_cli(main)
