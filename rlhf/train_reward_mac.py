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

from core.cli import run_cli
from core.entry import training_entry
from rlhf.reward_config import parse_reward_config

PRESET = "mac"


def load_run():
    from rlhf.reward_training import run_reward  # torch and transformers load here, once the arguments are parsed

    return run_reward


main, plan_mac = training_entry("reward", PRESET, parse_reward_config, load_run, __doc__)

if __name__ == "__main__":
    run_cli(main)
