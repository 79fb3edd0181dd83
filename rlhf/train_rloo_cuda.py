"""RLOO with QLoRA on an NVIDIA GPU: 4-bit NF4 base for the policy and the reward model, bf16 compute
(fp16 on older GPUs), gradient checkpointing and a paged 8-bit optimizer, as in ``sft.train_sft_cuda``.

    python -m rlhf.train_rloo_cuda --sft_adapter_dir models/sft_qlora --reward_model_dir models/reward_qlora \\
        --max_steps 200 --output_dir models/rloo_qlora
    python -m rlhf.train_rloo_cuda --output_dir models/rloo_qlora --resume
    python -m rlhf.train_rloo_cuda --load_in_4bit false          # plain LoRA on the GPU
    python -m rlhf.train_rloo_cuda --help

Several GPUs, data parallel: ``accelerate launch -m rlhf.train_rloo_cuda ...`` or
``torchrun --nproc_per_node N -m rlhf.train_rloo_cuda ...`` (each prompt's k completions are
scored together across processes by TRL). Without CUDA this exits with status 2
(use ``python -m rlhf.train_rloo_mac``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from core.cli import run_cli
from rlhf.rloo_config import RLOOConfig, parse_rloo_config

if TYPE_CHECKING:  # core.training imports torch: main imports it once the arguments are parsed
    from core.training import DevicePlan

PRESET = "cuda"
PROG = "python -m rlhf.train_rloo_cuda"


def plan_cuda(config: RLOOConfig) -> DevicePlan:
    """This process's GPU (LOCAL_RANK under torchrun/accelerate) and 4-bit loading on it."""
    from core.training import plan_cuda as plan_cuda_for

    return plan_cuda_for(config, mac_command="python -m rlhf.train_rloo_mac")


def main(argv: Sequence[str] | None = None) -> int:
    # The arguments first: --help and a misspelled flag answer before torch and transformers load.
    config = parse_rloo_config(argv, preset=PRESET, prog=PROG, description=__doc__)
    from core.threads import apply_thread_guard
    from rlhf.rloo_training import run_rloo

    apply_thread_guard()
    return run_rloo(argv, config=config, preset=PRESET, plan_model=plan_cuda, prog=PROG, description=__doc__,
                    entry_point="rlhf.train_rloo_cuda")


if __name__ == "__main__":
    run_cli(main)
