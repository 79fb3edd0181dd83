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

from typing import TYPE_CHECKING, Sequence

from core.cli import run_cli
from dpo.dpo_config import DPOConfig, parse_dpo_config

if TYPE_CHECKING:  # core.training imports torch: main imports it once the arguments are parsed
    from core.training import DevicePlan

PRESET = "cuda"
PROG = "python -m dpo.train_dpo_cuda"


def plan_cuda(config: DPOConfig) -> DevicePlan:
    """This process's GPU (LOCAL_RANK under torchrun/accelerate) and 4-bit loading on it."""
    from core.training import plan_cuda as plan_cuda_for

    return plan_cuda_for(config, mac_command="python -m dpo.train_dpo_mac")


def main(argv: Sequence[str] | None = None) -> int:
    # The arguments first: --help and a misspelled flag answer before torch and transformers load.
    config = parse_dpo_config(argv, preset=PRESET, prog=PROG, description=__doc__)
    from core.threads import apply_thread_guard
    from dpo.training import run_dpo

    apply_thread_guard()
    return run_dpo(argv, config=config, preset=PRESET, plan_model=plan_cuda, prog=PROG, description=__doc__,
                   entry_point="dpo.train_dpo_cuda")


if __name__ == "__main__":
    run_cli(main)
