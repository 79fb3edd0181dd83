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

from typing import Sequence

from core.cli import run_cli
from core.training import DevicePlan, plan_mac as plan_mac_for
from dpo.dpo_config import DPOConfig
from dpo.training import run_dpo

PRESET = "mac"


def plan_mac(config: DPOConfig) -> DevicePlan:
    """MPS if present, else the CPU (said in one line); the base model in full precision."""
    return plan_mac_for(config, cuda_command="python -m dpo.train_dpo_cuda")


def main(argv: Sequence[str] | None = None) -> int:
    return run_dpo(argv, preset=PRESET, plan_model=plan_mac, prog="python -m dpo.train_dpo_mac",
                   description=__doc__, entry_point="dpo.train_dpo_mac")


if __name__ == "__main__":
    run_cli(main)
