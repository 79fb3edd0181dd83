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

from typing import TYPE_CHECKING, Sequence

from core.cli import run_cli
from sft.sft_config import SFTConfig, parse_sft_config

if TYPE_CHECKING:  # core.training imports torch: main imports it once the arguments are parsed
    from core.training import DevicePlan

PRESET = "mac"
PROG = "python -m sft.train_sft_mac"


def plan_mac(config: SFTConfig) -> DevicePlan:
    """MPS if present, else the CPU (said in one line); the base model in full precision."""
    from core.training import plan_mac as plan_mac_for

    return plan_mac_for(config, cuda_command="python -m sft.train_sft_cuda")


def main(argv: Sequence[str] | None = None) -> int:
    # The arguments first: --help and a misspelled flag answer before torch and transformers load.
    config = parse_sft_config(argv, preset=PRESET, prog=PROG, description=__doc__)
    from core.threads import apply_thread_guard
    from sft.training import run_sft

    apply_thread_guard()
    return run_sft(argv, config=config, preset=PRESET, plan_model=plan_mac, prog=PROG, description=__doc__,
                   entry_point="sft.train_sft_mac")


if __name__ == "__main__":
    run_cli(main)
