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

from typing import Sequence

from core.cli import run_cli
from core.training import DevicePlan, plan_mac as plan_mac_for
from sft.sft_config import SFTConfig
from sft.training import run_sft

PRESET = "mac"


def plan_mac(config: SFTConfig) -> DevicePlan:
    """MPS if present, else the CPU (said in one line); the base model in full precision."""
    return plan_mac_for(config, cuda_command="python -m sft.train_sft_cuda")


def main(argv: Sequence[str] | None = None) -> int:
    return run_sft(argv, preset=PRESET, plan_model=plan_mac, prog="python -m sft.train_sft_mac",
                   description=__doc__, entry_point="sft.train_sft_mac")


if __name__ == "__main__":
    run_cli(main)
