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

from typing import TYPE_CHECKING, Sequence

from core.cli import run_cli
from sft.sft_config import SFTConfig, parse_sft_config

if TYPE_CHECKING:  # core.training imports torch: main imports it once the arguments are parsed
    from core.training import DevicePlan

PRESET = "cuda"
PROG = "python -m sft.train_sft_cuda"


def plan_cuda(config: SFTConfig) -> DevicePlan:
    """This process's GPU (LOCAL_RANK under torchrun/accelerate) and the 4-bit loader for it."""
    from core.training import plan_cuda as plan_cuda_for

    return plan_cuda_for(config, mac_command="python -m sft.train_sft_mac")


def main(argv: Sequence[str] | None = None) -> int:
    # The arguments first: --help and a misspelled flag answer before torch and transformers load.
    config = parse_sft_config(argv, preset=PRESET, prog=PROG, description=__doc__)
    from core.threads import apply_thread_guard
    from sft.training import run_sft

    apply_thread_guard()
    return run_sft(argv, config=config, preset=PRESET, plan_model=plan_cuda, prog=PROG, description=__doc__,
                   entry_point="sft.train_sft_cuda")


if __name__ == "__main__":
    run_cli(main)
