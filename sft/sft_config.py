"""The one configuration for every SFT run, with ``mac`` and ``cuda`` presets.

Read it top to bottom: every key a run uses is a field below, with its default and meaning.
Key names follow Hugging Face ``TrainingArguments`` wherever one exists.

Priority, lowest first: defaults < preset (picked by the entry point) < ``--config run.yaml``
< command-line flags (``--max_steps 100`` or ``--max_steps=100``). ``--help`` lists every key.

    python -m sft.train_sft_mac --help
    python -m sft.train_sft_mac --config run.yaml --max_steps 200
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from core.config import ALL_LINEAR_LLAMA, check_training_keys, config_from_dict, format_config, key, resolve_config
from core.prompting import PromptTemplate, load_template
from core.runs import RUN_CONFIG_FILES, read_run, save_run_config

CONFIG_FILENAME = RUN_CONFIG_FILES["sft"]


@dataclass
class SFTConfig:
    # --- model -------------------------------------------------------------------------------
    model_name_or_path: str = key("TinyLlama/TinyLlama_v1.1", "base model: hub id, local directory, or local .gguf file")
    tokenizer_name_or_path: Optional[str] = key(None, "tokenizer source if different from the model")
    trust_remote_code: bool = key(False, "allow model code from the hub (off unless you trust the repo)")

    # --- data --------------------------------------------------------------------------------
    train_file: str = key("data/processed/sft_train.jsonl", "training JSONL from scripts/prepare_sft_data.py")
    val_file: str = key("data/processed/sft_val.jsonl", "validation JSONL from scripts/prepare_sft_data.py")
    template: str = key("alpaca", "prompt template name (core/templates/NAME.json) or path to a template JSON")
    max_seq_length: int = key(512, "longest tokenized example; longer responses are cut at the tail")
    train_on_inputs: bool = key(False, "also train on prompt tokens (default: loss on response + EOS only)")
    max_train_samples: Optional[int] = key(None, "use only the first N training rows (quick runs)")
    max_eval_samples: Optional[int] = key(None, "use only the first N validation rows for periodic evaluation")
    preprocessing_num_workers: Optional[int] = key(None, "processes for tokenization (default: automatic for large data)")
    pad_to_multiple_of: int = key(1, "pad each batch to a multiple of this many tokens (1 = no rounding; 8 suits GPU tensor cores)")
    group_by_length: bool = key(True, "batch examples of similar length together, so little compute goes to padding")

    # --- LoRA --------------------------------------------------------------------------------
    lora_r: int = key(16, "LoRA rank")
    lora_alpha: int = key(32, "LoRA scaling numerator (scale = alpha / r)")
    lora_dropout: float = key(0.05, "dropout on the LoRA branch")
    lora_target_modules: list[str] = key(ALL_LINEAR_LLAMA, "module names that get adapters (comma-separated or several values)")
    # A base model whose pretraining never emitted EOS (llama2.c's stories models end documents with
    # BOS) has an untrained EOS embedding; LoRA on the blocks alone then barely learns to stop.
    # Measured on stories260K, 300 steps, 40 held-out Alpaca prompts, greedy, 128 new tokens: at
    # --learning_rate 1e-3, 0% stopped without this key and 95% with it; at the default 2e-4 the
    # row moves too little (at most 0.035 per element) and 0% stopped even with it.
    train_eos_embedding: bool = key(False, "also train the EOS token's embedding row (hidden_size parameters): "
                                            "turn on when the fine-tuned model never stops")

    # --- precision, quantisation, memory -----------------------------------------------------
    precision: str = key("fp32", "compute precision: auto = bf16 where supported, else fp16 on CUDA, fp32 elsewhere",
                          choices=["auto", "fp32", "bf16", "fp16"])
    load_in_4bit: bool = key(False, "QLoRA: load the frozen base model in 4-bit through bitsandbytes")
    bnb_4bit_quant_type: str = key("nf4", "4-bit data type", choices=["nf4", "fp4"])
    bnb_4bit_use_double_quant: bool = key(True, "also quantise the quantisation constants (saves ~0.4 bit/param)")
    gradient_checkpointing: bool = key(False, "recompute activations in backward to save memory (slower)")
    optim: str = key("adamw_torch", "optimizer name as in TrainingArguments (e.g. adamw_torch, paged_adamw_8bit)")

    # --- optimisation ------------------------------------------------------------------------
    learning_rate: float = key(2e-4, "peak learning rate")
    per_device_train_batch_size: int = key(4, "examples per device per forward pass")
    per_device_eval_batch_size: int = key(8, "examples per device per evaluation pass")
    gradient_accumulation_steps: int = key(4, "forward passes per optimizer step")
    num_train_epochs: float = key(1.0, "epochs over the training data (ignored when max_steps > 0)")
    max_steps: int = key(-1, "optimizer steps to run; -1 = use num_train_epochs")
    warmup_ratio: float = key(0.03, "fraction of steps spent warming the learning rate up")
    lr_scheduler_type: str = key("cosine", "learning-rate schedule as in TrainingArguments")
    weight_decay: float = key(0.0, "AdamW weight decay")
    max_grad_norm: float = key(1.0, "gradient clipping norm")
    seed: int = key(42, "seed for adapter init, dropout and data order (set before the adapter is created)")

    # --- logging, evaluation, checkpoints -----------------------------------------------------
    logging_steps: int = key(10, "log train loss every N optimizer steps")
    eval_steps: int = key(100, "evaluate on the validation set every N optimizer steps")
    save_steps: int = key(100, "write a checkpoint every N optimizer steps")
    save_total_limit: Optional[int] = key(2, "keep at most N checkpoints (none = keep all)")
    report_to: list[str] = key(["tensorboard"], "loggers as in TrainingArguments (tensorboard, wandb, ...; none = off)")
    output_dir: str = key("models/sft_output", "where the adapter, config, metrics and checkpoints go")
    overwrite_output_dir: bool = key(False, "allow writing over an output_dir that holds a different run")
    resume: bool = key(False, "continue from the newest complete checkpoint in output_dir")

    def validate(self) -> None:
        """Reject combinations that would fail late or train nothing useful."""
        check_training_keys(self, length_key="max_seq_length", extra_positive=("pad_to_multiple_of",),
                            extra_optional_positive=("preprocessing_num_workers",))

    def prompt_template(self) -> PromptTemplate:
        return load_template(self.template)


# Per-device presets: only what must differ between an Apple laptop and a CUDA box.
PRESETS: dict[str, dict[str, Any]] = {
    # LoRA in fp32 on MPS/CPU: MPS bf16 support varies by macOS version, so it is opt-in.
    "mac": {
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 4,
        "precision": "fp32",
        "load_in_4bit": False,
        "gradient_checkpointing": False,
        "optim": "adamw_torch",
    },
    # QLoRA: 4-bit NF4 base, bf16 (or fp16) compute, checkpointing and a paged optimizer so a
    # 7B model fits a 16-24 GB GPU.
    "cuda": {
        "per_device_train_batch_size": 8,
        "gradient_accumulation_steps": 2,
        "precision": "auto",
        "load_in_4bit": True,
        "gradient_checkpointing": True,
        "optim": "paged_adamw_8bit",
        # Tensor cores like multiples of 8; on CPU/MPS the rounding only costs ~3% extra padding.
        "pad_to_multiple_of": 8,
    },
}


def parse_sft_config(argv: Sequence[str] | None = None, preset: str = "mac", prog: str | None = None,
                     description: str | None = None) -> SFTConfig:
    """Resolve the config for an entry point (raises ConfigError on any bad key or value)."""
    return resolve_config(SFTConfig, argv, PRESETS[preset], preset_name=preset, prog=prog, description=description)


def save_sft_config(config: SFTConfig, output_dir: str | Path, preset: str = "", extra: dict | None = None) -> Path:
    """Save the resolved config *and* the template text it used next to the run's outputs.

    Evaluation, DPO and the reward model read this file (``core.runs.read_run``), so they prompt
    with exactly the training template even if the template file changes later.
    """
    return save_run_config("sft", config, output_dir, config.prompt_template(), preset=preset, extra=extra)


def load_sft_run(run_dir: str | Path) -> tuple[SFTConfig, PromptTemplate, dict]:
    """Read a run's saved config: (config, the exact template it trained with, the whole payload)."""
    run = read_run(run_dir, expect="sft")
    return config_from_dict(SFTConfig, run.config), run.template, run.payload


def describe(config: SFTConfig) -> str:
    return format_config(config, title="resolved SFT config")
