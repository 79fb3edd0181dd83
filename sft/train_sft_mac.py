"""LoRA SFT on Apple silicon (``mps``), in float32 by default; on the CPU where MPS is missing.

    python -m sft.train_sft_mac --model_name_or_path PATH --train_file data/processed/sft_train.jsonl \\
        --val_file data/processed/sft_val.jsonl --max_steps 200 --output_dir models/sft_mac
    python -m sft.train_sft_mac --output_dir models/sft_mac --resume      # continue after a crash or Ctrl-C
    python -m sft.train_sft_mac --config run.yaml --learning_rate 1e-4   # any config key as a flag
    python -m sft.train_sft_mac --help                                    # every key, default and meaning

bf16 is opt-in (``--precision bf16``) and only where the backend supports it. Data-parallel on CPU
cores also works: ``torchrun --nproc_per_node 2 -m sft.train_sft_mac ...``. For QLoRA on an NVIDIA
GPU use ``python -m sft.train_sft_cuda``.
"""
from __future__ import annotations

from core.cli import run_cli
from core.entry import training_entry
from sft.sft_config import parse_sft_config

PRESET = "mac"


def load_run():
    from sft.training import run_sft  # torch and transformers load here, once the arguments are parsed

    return run_sft


main, plan_mac = training_entry("sft", PRESET, parse_sft_config, load_run, __doc__)

if __name__ == "__main__":
    run_cli(main)
