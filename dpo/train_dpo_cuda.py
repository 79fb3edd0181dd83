"""DPO with QLoRA on an NVIDIA GPU: 4-bit NF4 base, bf16 compute (fp16 on older GPUs), gradient
checkpointing and a paged 8-bit optimizer, as in ``sft.train_sft_cuda``.

    python -m dpo.train_dpo_cuda --sft_adapter_dir models/sft_qlora --max_steps 500 --output_dir models/dpo_qlora
    python -m dpo.train_dpo_cuda --output_dir models/dpo_qlora --resume
    python -m dpo.train_dpo_cuda --load_in_4bit false          # plain LoRA on the GPU
    python -m dpo.train_dpo_cuda --help

Several GPUs, data parallel: ``accelerate launch -m dpo.train_dpo_cuda ...`` or
``torchrun --nproc_per_node N -m dpo.train_dpo_cuda ...``. The reference is TRL's frozen copy of
the SFT adapter on the same 4-bit base, so one base model is in memory per GPU.
Without CUDA this exits with status 2 (use ``python -m dpo.train_dpo_mac``).
"""
from __future__ import annotations

from core.cli import run_cli
from core.entry import training_entry
from dpo.dpo_config import parse_dpo_config

PRESET = "cuda"


def load_run():
    from dpo.training import run_dpo  # torch and transformers load here, once the arguments are parsed

    return run_dpo


main, plan_cuda = training_entry("dpo", PRESET, parse_dpo_config, load_run, __doc__)

if __name__ == "__main__":
    run_cli(main)
