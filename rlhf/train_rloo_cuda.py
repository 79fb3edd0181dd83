"""RLOO with QLoRA on an NVIDIA GPU: 4-bit NF4 base for the policy and the reward model, bf16 compute
(fp16 on older GPUs), gradient checkpointing and a paged 8-bit optimizer, as in ``sft.train_sft_cuda``.

    python -m rlhf.train_rloo_cuda --sft_adapter_dir models/sft_qlora --reward_model_dir models/reward_qlora \\
        --max_steps 200 --output_dir models/rloo_qlora
    python -m rlhf.train_rloo_cuda --reward checker --prompt_file data/if/if_train.jsonl \\
        --monitor_files data/if/if_val_seen.jsonl data/if/if_val_heldout.jsonl   # RLVR: the checker is the reward
    python -m rlhf.train_rloo_cuda --output_dir models/rloo_qlora --resume
    python -m rlhf.train_rloo_cuda --load_in_4bit false          # plain LoRA on the GPU
    python -m rlhf.train_rloo_cuda --help

Several GPUs, data parallel: ``accelerate launch -m rlhf.train_rloo_cuda ...`` or
``torchrun --nproc_per_node N -m rlhf.train_rloo_cuda ...`` (each prompt's k completions are
scored together across processes by TRL). Without CUDA this exits with status 2
(use ``python -m rlhf.train_rloo_mac``).
"""
from __future__ import annotations

from core.cli import run_cli
from core.entry import training_entry
from rlhf.rloo_config import parse_rloo_config

PRESET = "cuda"


def load_run():
    from rlhf.rloo_training import run_rloo  # torch and transformers load here, once the arguments are parsed

    return run_rloo


main, plan_cuda = training_entry("rloo", PRESET, parse_rloo_config, load_run, __doc__)

if __name__ == "__main__":
    run_cli(main)
