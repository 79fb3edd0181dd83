"""DPO with LoRA on Apple silicon (``mps``), in float32 by default; on the CPU where MPS is missing.

    python -m dpo.train_dpo_mac                                        # models/sft_output -> models/dpo_output
    python -m dpo.train_dpo_mac --sft_adapter_dir models/sft_output --train_file data/processed/prefs_train.jsonl \\
        --val_file data/processed/prefs_val.jsonl --max_steps 200 --beta 0.1 --output_dir models/dpo_output
    python -m dpo.train_dpo_mac --init base                            # preference-only: from the base model
    python -m dpo.train_dpo_mac --output_dir models/dpo_output --resume   # continue after a crash or Ctrl-C
    python -m dpo.train_dpo_mac --help                                 # every key, default and meaning

With ``--init sft`` (default) the policy starts from the SFT adapter and the reference is the frozen
SFT model; with ``--init base`` the reference is the base model. For QLoRA on an NVIDIA GPU use
``python -m dpo.train_dpo_cuda``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from core.cli import run_cli
from dpo.dpo_config import DPOConfig, parse_dpo_config

if TYPE_CHECKING:  # core.training imports torch: main imports it once the arguments are parsed
    from core.training import DevicePlan

PRESET = "mac"
PROG = "python -m dpo.train_dpo_mac"


def plan_mac(config: DPOConfig) -> DevicePlan:
    """MPS if present, else the CPU (said in one line); the base model in full precision."""
    from core.training import plan_mac as plan_mac_for

    return plan_mac_for(config, cuda_command="python -m dpo.train_dpo_cuda")


def main(argv: Sequence[str] | None = None) -> int:
    # The arguments first: --help and a misspelled flag answer before torch and transformers load.
    config = parse_dpo_config(argv, preset=PRESET, prog=PROG, description=__doc__)
    from core.threads import apply_thread_guard
    from dpo.training import run_dpo

    apply_thread_guard()
    return run_dpo(argv, config=config, preset=PRESET, plan_model=plan_mac, prog=PROG, description=__doc__,
                   entry_point="dpo.train_dpo_mac")


if __name__ == "__main__":
    run_cli(main)
