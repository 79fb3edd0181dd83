"""Reward model with QLoRA on an NVIDIA GPU: 4-bit NF4 base, bf16 compute (fp16 on older GPUs), gradient
checkpointing and a paged 8-bit optimizer, as in ``sft.train_sft_cuda``.

    python -m rlhf.train_reward_cuda --sft_adapter_dir models/sft_qlora --max_steps 500 --output_dir models/reward_qlora
    python -m rlhf.train_reward_cuda --output_dir models/reward_qlora --resume
    python -m rlhf.train_reward_cuda --load_in_4bit false          # plain LoRA on the GPU
    python -m rlhf.train_reward_cuda --help

Several GPUs, data parallel: ``accelerate launch -m rlhf.train_reward_cuda ...`` or
``torchrun --nproc_per_node N -m rlhf.train_reward_cuda ...``.
Without CUDA this exits with status 2 (use ``python -m rlhf.train_reward_mac``).
"""
from __future__ import annotations

from typing import Sequence

from core.cli import run_cli
from core.training import DevicePlan, plan_cuda as plan_cuda_for
from rlhf.reward_config import RewardConfig
from rlhf.reward_training import run_reward

PRESET = "cuda"


def plan_cuda(config: RewardConfig) -> DevicePlan:
    """This process's GPU (LOCAL_RANK under torchrun/accelerate) and 4-bit loading on it."""
    return plan_cuda_for(config, mac_command="python -m rlhf.train_reward_mac")


def main(argv: Sequence[str] | None = None) -> int:
    return run_reward(argv, preset=PRESET, plan_model=plan_cuda, prog="python -m rlhf.train_reward_cuda",
                      description=__doc__, entry_point="rlhf.train_reward_cuda")


if __name__ == "__main__":
    run_cli(main)
