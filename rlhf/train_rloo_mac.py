"""RLOO (online RL against the reward model) with LoRA on Apple silicon (``mps``); on the CPU where MPS is missing.

    python -m rlhf.train_rloo_mac                                      # models/sft_output + models/reward_output -> models/rloo_output
    python -m rlhf.train_rloo_mac --sft_adapter_dir models/sft_output --reward_model_dir models/reward_output \\
        --max_steps 100 --num_generations 4 --max_new_tokens 64 --beta 0.05 --output_dir models/rloo_output
    python -m rlhf.train_rloo_mac --prompt_file my_prompts.jsonl --missing_eos_penalty 1.0
    python -m rlhf.train_rloo_mac --output_dir models/rloo_output --resume   # continue after a crash or Ctrl-C
    python -m rlhf.train_rloo_mac --help                               # every key, default and meaning

The policy starts from the SFT adapter; the reference is the frozen SFT model; prompts are the SFT
run's training prompts unless ``--prompt_file`` is given. For QLoRA on an NVIDIA GPU use
``python -m rlhf.train_rloo_cuda``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from core.cli import run_cli
from rlhf.rloo_config import RLOOConfig, parse_rloo_config

if TYPE_CHECKING:  # core.training imports torch: main imports it once the arguments are parsed
    from core.training import DevicePlan

PRESET = "mac"
PROG = "python -m rlhf.train_rloo_mac"


def plan_mac(config: RLOOConfig) -> DevicePlan:
    """MPS if present, else the CPU (said in one line); the base model in full precision."""
    from core.training import plan_mac as plan_mac_for

    return plan_mac_for(config, cuda_command="python -m rlhf.train_rloo_cuda")


def main(argv: Sequence[str] | None = None) -> int:
    # The arguments first: --help and a misspelled flag answer before torch and transformers load.
    config = parse_rloo_config(argv, preset=PRESET, prog=PROG, description=__doc__)
    from core.threads import apply_thread_guard
    from rlhf.rloo_training import run_rloo

    apply_thread_guard()
    return run_rloo(argv, config=config, preset=PRESET, plan_model=plan_mac, prog=PROG, description=__doc__,
                    entry_point="rlhf.train_rloo_mac")


if __name__ == "__main__":
    run_cli(main)
