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

from core.cli import run_cli
from core.entry import training_entry
from dpo.dpo_config import parse_dpo_config

PRESET = "mac"


def load_run():
    from dpo.training import run_dpo  # torch and transformers load here, once the arguments are parsed

    return run_dpo


main, plan_mac = training_entry("dpo", PRESET, parse_dpo_config, load_run, __doc__)

if __name__ == "__main__":
    run_cli(main)
