"""LoRA SFT on Apple silicon (``mps``, float32); on the CPU where MPS is missing (bf16 where the CPU has it).

    python -m sft.train_sft_mac --model_name_or_path PATH --train_file data/processed/sft_train.jsonl \\
        --val_file data/processed/sft_val.jsonl --max_steps 200 --output_dir models/sft_mac
    python -m sft.train_sft_mac --output_dir models/sft_mac --resume      # continue after a crash or Ctrl-C
    python -m sft.train_sft_mac --config run.yaml --learning_rate 1e-4   # any config key as a flag
    python -m sft.train_sft_mac --help                                    # every key, default and meaning

``--precision auto`` (the default): fp32 on MPS; on the CPU bf16 autocast where the CPU has AVX512_BF16
or AMX-BF16 and bf16 matmul measures faster, else fp32 (said in one line). ``--precision fp32|bf16``
overrides; bf16 on a CPU without those instructions is an error. Data-parallel on CPU
cores also works: ``torchrun --nproc_per_node 2 -m sft.train_sft_mac ...``. For QLoRA on an NVIDIA
GPU use ``python -m sft.train_sft_cuda``.
"""
from __future__ import annotations

from core.cli import run_cli
from core.entry import training_entry
from sft.sft_config import parse_sft_config

PRESET = "mac"


def load_run():
    from sft.training import run_sft  # torch and transformers load here, once the arguments are parsed

    return run_sft


main, plan_mac = training_entry("sft", PRESET, parse_sft_config, load_run, __doc__)

if __name__ == "__main__":
    run_cli(main)
