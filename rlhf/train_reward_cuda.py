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

from typing import TYPE_CHECKING, Sequence

from core.cli import run_cli
from rlhf.reward_config import RewardConfig, parse_reward_config

if TYPE_CHECKING:  # core.training imports torch: main imports it once the arguments are parsed
    from core.training import DevicePlan

PRESET = "cuda"
PROG = "python -m rlhf.train_reward_cuda"


def plan_cuda(config: RewardConfig) -> DevicePlan:
    """This process's GPU (LOCAL_RANK under torchrun/accelerate) and 4-bit loading on it."""
    from core.training import plan_cuda as plan_cuda_for

    return plan_cuda_for(config, mac_command="python -m rlhf.train_reward_mac")


def main(argv: Sequence[str] | None = None) -> int:
    # The arguments first: --help and a misspelled flag answer before torch and transformers load.
    config = parse_reward_config(argv, preset=PRESET, prog=PROG, description=__doc__)
    from core.threads import apply_thread_guard
    from rlhf.reward_training import run_reward

    apply_thread_guard()
    return run_reward(argv, config=config, preset=PRESET, plan_model=plan_cuda, prog=PROG, description=__doc__,
                      entry_point="rlhf.train_reward_cuda")


if __name__ == "__main__":
    run_cli(main)
