"""RLOO (online RL against the reward model) with LoRA on Apple silicon (``mps``); on the CPU where MPS is missing.

    python -m rlhf.train_rloo_mac                                      # models/sft_output + models/reward_output -> models/rloo_output
    python -m rlhf.train_rloo_mac --sft_adapter_dir models/sft_output --reward_model_dir models/reward_output \\
        --max_steps 100 --num_generations 4 --max_new_tokens 64 --beta 0.05 --output_dir models/rloo_output
    python -m rlhf.train_rloo_mac --prompt_file my_prompts.jsonl --missing_eos_penalty 1.0
    python -m rlhf.train_rloo_mac --reward checker --prompt_file data/if/if_train.jsonl \\
        --monitor_files data/if/if_val_seen.jsonl data/if/if_val_heldout.jsonl   # RLVR: the checker is the reward
    python -m rlhf.train_rloo_mac --output_dir models/rloo_output --resume   # continue after a crash or Ctrl-C
    python -m rlhf.train_rloo_mac --help                               # every key, default and meaning

The policy starts from the SFT adapter; the reference is the frozen SFT model; prompts are the SFT
run's training prompts unless ``--prompt_file`` is given. For QLoRA on an NVIDIA GPU use
``python -m rlhf.train_rloo_cuda``.
"""
from __future__ import annotations

from core.cli import run_cli
from core.entry import training_entry
from rlhf.rloo_config import parse_rloo_config

PRESET = "mac"


def load_run():
    from rlhf.rloo_training import run_rloo  # torch and transformers load here, once the arguments are parsed

    return run_rloo


main, plan_mac = training_entry("rloo", PRESET, parse_rloo_config, load_run, __doc__)

if __name__ == "__main__":
    run_cli(main)
