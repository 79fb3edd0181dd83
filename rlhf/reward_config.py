"""The one configuration for every reward-model run, with ``mac`` and ``cuda`` presets (shaped like ``dpo/dpo_config.py``).

Every key a run uses is a field below, with its default and meaning. Names follow the SFT and DPO
configs (and Hugging Face ``TrainingArguments``) wherever one exists.

Priority, lowest first: defaults < preset (picked by the entry point) < ``--config run.yaml``
< command-line flags. ``--help`` lists every key.

    python -m rlhf.train_reward_mac --help
    python -m rlhf.train_reward_mac --sft_adapter_dir models/sft_output --max_steps 200
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from core.config import ALL_LINEAR_LLAMA, ConfigError, check_training_keys, format_config, key, resolve_config
from core.prompting import PromptTemplate
from core.runs import RUN_CONFIG_FILES, save_run_config

CONFIG_FILENAME = RUN_CONFIG_FILES["reward"]


@dataclass
class RewardConfig:
    # --- where to start ----------------------------------------------------------------------
    sft_adapter_dir: str = key("models/sft_output", "the SFT run whose base model, tokenizer and template are used")
    init: str = key("sft", "sft: the reward model's body starts as the SFT model (the SFT adapter, trained further); "
                           "base: a fresh LoRA adapter on the base model", choices=["sft", "base"])
    model_name_or_path: Optional[str] = key(None, "base model (default: the SFT run's base model)")
    tokenizer_name_or_path: Optional[str] = key(None, "tokenizer source (default: the SFT run's saved tokenizer)")
    trust_remote_code: bool = key(False, "allow model code from the hub (off unless you trust the repo)")

    # --- data --------------------------------------------------------------------------------
    train_file: str = key("data/processed/prefs_train.jsonl", "training pairs from scripts/prepare_dpo_data.py")
    val_file: str = key("data/processed/prefs_val.jsonl", "held-out pairs from scripts/prepare_dpo_data.py")
    template: Optional[str] = key(None, "prompt template (default: the one saved in the SFT run); only recorded, "
                                         "the pair files already hold rendered prompts")
    max_length: int = key(512, "longest prompt + response in tokens; longer pairs lose the end of the response")
    max_train_samples: Optional[int] = key(None, "use only the first N training pairs (quick runs)")
    max_eval_samples: Optional[int] = key(None, "use only the first N held-out pairs for evaluation")

    # --- reward model ------------------------------------------------------------------------
    center_rewards_coefficient: float = key(0.0, "weight of a penalty on the squared mean reward, keeping scores "
                                                 "centred on 0 (0 = off; 0.01 as in the InstructGPT-style recipes)")

    # --- LoRA (init base only: with init sft the SFT adapter's own LoRA config is continued) --
    lora_r: int = key(16, "LoRA rank of the fresh adapter (init base)")
    lora_alpha: int = key(32, "LoRA scaling numerator (init base)")
    lora_dropout: float = key(0.05, "dropout on the LoRA branch (TRL switches dropout off for reward training)")
    lora_target_modules: list[str] = key(ALL_LINEAR_LLAMA, "module names that get adapters (init base)")

    # --- precision, quantisation, memory -----------------------------------------------------
    precision: str = key("fp32", "compute precision: auto = bf16 where supported, else fp16 on CUDA, fp32 elsewhere",
                         choices=["auto", "fp32", "bf16", "fp16"])
    load_in_4bit: bool = key(False, "QLoRA: load the frozen base model in 4-bit through bitsandbytes")
    bnb_4bit_quant_type: str = key("nf4", "4-bit data type", choices=["nf4", "fp4"])
    bnb_4bit_use_double_quant: bool = key(True, "also quantise the quantisation constants")
    gradient_checkpointing: bool = key(False, "recompute activations in backward to save memory (slower)")
    optim: str = key("adamw_torch", "optimizer name as in TrainingArguments")

    # --- optimisation ------------------------------------------------------------------------
    learning_rate: float = key(1e-4, "peak learning rate (the score head starts random, so higher than DPO's)")
    per_device_train_batch_size: int = key(4, "pairs per device per forward pass (each pair = 2 sequences)")
    per_device_eval_batch_size: int = key(8, "pairs per device per evaluation pass")
    gradient_accumulation_steps: int = key(4, "forward passes per optimizer step")
    num_train_epochs: float = key(1.0, "epochs over the pairs (ignored when max_steps > 0)")
    max_steps: int = key(-1, "optimizer steps to run; -1 = use num_train_epochs")
    warmup_ratio: float = key(0.03, "fraction of steps spent warming the learning rate up")
    lr_scheduler_type: str = key("cosine", "learning-rate schedule as in TrainingArguments")
    weight_decay: float = key(0.0, "AdamW weight decay")
    max_grad_norm: float = key(1.0, "gradient clipping norm")
    seed: int = key(42, "seed for the score head and adapter init, and data order")

    # --- logging, evaluation, checkpoints -----------------------------------------------------
    logging_steps: int = key(10, "log train loss, accuracy and margin every N optimizer steps")
    eval_steps: int = key(50, "evaluate on the held-out pairs every N optimizer steps (and once before training)")
    save_steps: int = key(100, "write a checkpoint every N optimizer steps")
    save_total_limit: Optional[int] = key(2, "keep at most N checkpoints (none = keep all)")
    report_to: list[str] = key(["tensorboard"], "loggers as in TrainingArguments (tensorboard, wandb, ...; none = off)")
    output_dir: str = key("models/reward_output", "where the adapter + score head, config, metrics and checkpoints go")
    overwrite_output_dir: bool = key(False, "allow writing over an output_dir that holds a different run")
    resume: bool = key(False, "continue from the newest complete checkpoint in output_dir")

    def validate(self) -> None:
        """Reject combinations that would fail late or train nothing useful."""
        check_training_keys(self, length_key="max_length")
        if self.center_rewards_coefficient < 0:
            raise ConfigError(f"center_rewards_coefficient must be >= 0, got {self.center_rewards_coefficient}")


# Per-device presets: only what must differ between an Apple laptop and a CUDA box (as for DPO).
PRESETS: dict[str, dict[str, Any]] = {
    "mac": {
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 4,
        "precision": "fp32",
        "load_in_4bit": False,
        "gradient_checkpointing": False,
        "optim": "adamw_torch",
    },
    # Each pair is two sequences and there is no reference forward: DPO's batch fits.
    "cuda": {
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 4,
        "precision": "auto",
        "load_in_4bit": True,
        "gradient_checkpointing": True,
        "optim": "paged_adamw_8bit",
    },
}


def parse_reward_config(argv: Sequence[str] | None = None, preset: str = "mac", prog: str | None = None,
                        description: str | None = None) -> RewardConfig:
    """Resolve the config for an entry point (raises ConfigError on any bad key or value)."""
    return resolve_config(RewardConfig, argv, PRESETS[preset], preset_name=preset, prog=prog, description=description)


def save_reward_config(config: RewardConfig, output_dir: str | Path, template: PromptTemplate, preset: str = "",
                       base_model: str | None = None, extra: dict | None = None) -> Path:
    """Save the resolved config, the template and the start point (``core.runs`` format)."""
    return save_run_config("reward", config, output_dir, template, preset=preset, base_model=base_model, extra=extra)


def describe(config: RewardConfig) -> str:
    return format_config(config, title="resolved reward-model config")
