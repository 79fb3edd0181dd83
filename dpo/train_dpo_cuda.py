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

from typing import Sequence

from dpo.dpo_config import DPOConfig
from dpo.training import DevicePlan, run_dpo
from sft.cli import run_cli
from sft.modeling import resolve_precision
from sft.training import adapter_kind, cuda_device

PRESET = "cuda"


def plan_cuda(config: DPOConfig) -> DevicePlan:
    """This process's GPU (LOCAL_RANK under torchrun/accelerate) and 4-bit loading on it."""
    device, local_rank = cuda_device(config, mac_command="python -m dpo.train_dpo_mac")
    return DevicePlan(device, resolve_precision(config.precision, device), load_in_4bit=config.load_in_4bit,
                      device_map={"": local_rank}, description=adapter_kind(config))


def main(argv: Sequence[str] | None = None) -> int:
    return run_dpo(argv, preset=PRESET, plan_model=plan_cuda, prog="python -m dpo.train_dpo_cuda",
                   description=__doc__, entry_point="dpo.train_dpo_cuda")


if __name__ == "__main__":
    run_cli(main)
