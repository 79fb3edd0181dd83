"""QLoRA SFT on NVIDIA GPUs: 4-bit NF4 base (double quantisation), bf16 compute (fp16 on GPUs
without bf16, with loss scaling), gradient checkpointing and a paged 8-bit optimizer.

    python -m sft.train_sft_cuda --model_name_or_path TinyLlama/TinyLlama_v1.1 --max_steps 1000 \\
        --output_dir models/sft_qlora
    python -m sft.train_sft_cuda --output_dir models/sft_qlora --resume
    python -m sft.train_sft_cuda --help

Several GPUs, data parallel (each process puts its own 4-bit copy on its GPU, device_map={"": local_rank}):

    accelerate launch -m sft.train_sft_cuda --output_dir models/sft_qlora
    torchrun --nproc_per_node N -m sft.train_sft_cuda --output_dir models/sft_qlora

The effective batch is per_device_train_batch_size x gradient_accumulation_steps x number of GPUs.
Without CUDA this exits with status 2 (use ``python -m sft.train_sft_mac``); plain LoRA on the GPU
is ``--load_in_4bit false``.
"""
from __future__ import annotations

from core.cli import run_cli
from core.entry import training_entry
from sft.sft_config import parse_sft_config

PRESET = "cuda"


def load_run():
    from sft.training import run_sft  # torch and transformers load here, once the arguments are parsed

    return run_sft


main, plan_cuda = training_entry("sft", PRESET, parse_sft_config, load_run, __doc__)

if __name__ == "__main__":
    run_cli(main)
