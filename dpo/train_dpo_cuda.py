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

import os
from typing import Sequence

import torch

from dpo.dpo_config import DPOConfig
from dpo.training import DevicePlan, run_dpo
from sft.cli import UserError, run_cli
from sft.modeling import require_bitsandbytes, resolve_precision

PRESET = "cuda"


def plan_cuda(config: DPOConfig) -> DevicePlan:
    """This process's GPU (LOCAL_RANK under torchrun/accelerate) and 4-bit loading on it."""
    if not torch.cuda.is_available():
        raise UserError("no CUDA GPU found: on a Mac or a CPU-only machine use python -m dpo.train_dpo_mac", exit_code=2)
    if config.load_in_4bit:
        require_bitsandbytes()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank)
    kind = f"QLoRA ({config.bnb_4bit_quant_type} 4-bit base)" if config.load_in_4bit else "LoRA"
    return DevicePlan(device, resolve_precision(config.precision, device), load_in_4bit=config.load_in_4bit,
                      device_map={"": local_rank}, description=kind)


def main(argv: Sequence[str] | None = None) -> int:
    return run_dpo(argv, preset=PRESET, plan_model=plan_cuda, prog="python -m dpo.train_dpo_cuda",
                   description=__doc__, entry_point="dpo.train_dpo_cuda")


if __name__ == "__main__":
    run_cli(main)
