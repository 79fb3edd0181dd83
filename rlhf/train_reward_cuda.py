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

from core.cli import run_cli
from core.entry import training_entry
from rlhf.reward_config import parse_reward_config

PRESET = "cuda"


def load_run():
    from rlhf.reward_training import run_reward  # torch and transformers load here, once the arguments are parsed

    return run_reward


main, plan_cuda = training_entry("reward", PRESET, parse_reward_config, load_run, __doc__)

if __name__ == "__main__":
    run_cli(main)
