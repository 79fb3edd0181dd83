"""Reward model with LoRA on Apple silicon (``mps``), in float32 by default; on the CPU where MPS is missing.

    python -m rlhf.train_reward_mac                                    # models/sft_output -> models/reward_output
    python -m rlhf.train_reward_mac --sft_adapter_dir models/sft_output --train_file data/processed/prefs_train.jsonl \\
        --val_file data/processed/prefs_val.jsonl --max_steps 200 --output_dir models/reward_output
    python -m rlhf.train_reward_mac --init base                        # body from the base model, not the SFT model
    python -m rlhf.train_reward_mac --output_dir models/reward_output --resume   # continue after a crash or Ctrl-C
    python -m rlhf.train_reward_mac --help                             # every key, default and meaning

The pairs are the ones ``scripts/prepare_dpo_data.py`` writes (``prefs_{train,val}.jsonl``). For
QLoRA on an NVIDIA GPU use ``python -m rlhf.train_reward_cuda``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from core.cli import run_cli
from rlhf.reward_config import RewardConfig, parse_reward_config

if TYPE_CHECKING:  # core.training imports torch: main imports it once the arguments are parsed
    from core.training import DevicePlan

PRESET = "mac"
PROG = "python -m rlhf.train_reward_mac"


def plan_mac(config: RewardConfig) -> DevicePlan:
    """MPS if present, else the CPU (said in one line); the base model in full precision."""
    from core.training import plan_mac as plan_mac_for

    return plan_mac_for(config, cuda_command="python -m rlhf.train_reward_cuda")


def main(argv: Sequence[str] | None = None) -> int:
    # The arguments first: --help and a misspelled flag answer before torch and transformers load.
    config = parse_reward_config(argv, preset=PRESET, prog=PROG, description=__doc__)
    from core.threads import apply_thread_guard
    from rlhf.reward_training import run_reward

    apply_thread_guard()
    return run_reward(argv, config=config, preset=PRESET, plan_model=plan_mac, prog=PROG, description=__doc__,
                      entry_point="rlhf.train_reward_mac")


if __name__ == "__main__":
    run_cli(main)
