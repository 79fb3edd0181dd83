"""The one configuration for every SFT run, with ``mac`` and ``cuda`` presets.

Read it top to bottom: every key a run uses is a field below, with its default and meaning.
Key names follow Hugging Face ``TrainingArguments`` wherever one exists.

Priority, lowest first: defaults < preset (picked by the entry point) < ``--config run.yaml``
< command-line flags (``--max_steps 100`` or ``--max_steps=100``). ``--help`` lists every key.

    python -m sft.train_sft_mac --help
    python -m sft.train_sft_mac --config run.yaml --max_steps 200
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from sft.config_cli import ConfigError, config_from_dict, format_config, resolve_config, write_json_atomic
from sft.prompting import PromptTemplate, load_template, template_from_dict

CONFIG_FILENAME = "sft_config.json"
# Every linear projection of a Llama-style attention and MLP block: adapting only q/v (the old
# alpaca-lora default) leaves most of the model's capacity untouched.
ALL_LINEAR_LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Shortest usable sequence: the Alpaca template alone is ~40 tokens, and a response needs room.
MIN_SEQ_LENGTH = 64


def _key(default: Any, help: str, **extra: Any) -> Any:
    """A config field with its help text (and optional choices) next to the default."""
    metadata = {"help": help, **extra}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class SFTConfig:
    # --- model -------------------------------------------------------------------------------
    model_name_or_path: str = _key("TinyLlama/TinyLlama_v1.1", "base model: hub id, local directory, or local .gguf file")
    tokenizer_name_or_path: Optional[str] = _key(None, "tokenizer source if different from the model")
    trust_remote_code: bool = _key(False, "allow model code from the hub (off unless you trust the repo)")

    # --- data --------------------------------------------------------------------------------
    train_file: str = _key("data/processed/sft_train.jsonl", "training JSONL from scripts/prepare_sft_data.py")
    val_file: str = _key("data/processed/sft_val.jsonl", "validation JSONL from scripts/prepare_sft_data.py")
    template: str = _key("alpaca", "prompt template name (sft/templates/NAME.json) or path to a template JSON")
    max_seq_length: int = _key(512, "longest tokenized example; longer responses are cut at the tail")
    train_on_inputs: bool = _key(False, "also train on prompt tokens (default: loss on response + EOS only)")
    max_train_samples: Optional[int] = _key(None, "use only the first N training rows (quick runs)")
    max_eval_samples: Optional[int] = _key(None, "use only the first N validation rows for periodic evaluation")
    preprocessing_num_workers: Optional[int] = _key(None, "processes for tokenization (default: automatic for large data)")
    pad_to_multiple_of: int = _key(1, "pad each batch to a multiple of this many tokens (1 = no rounding; 8 suits GPU tensor cores)")
    group_by_length: bool = _key(True, "batch examples of similar length together, so little compute goes to padding")

    # --- LoRA --------------------------------------------------------------------------------
    lora_r: int = _key(16, "LoRA rank")
    lora_alpha: int = _key(32, "LoRA scaling numerator (scale = alpha / r)")
    lora_dropout: float = _key(0.05, "dropout on the LoRA branch")
    lora_target_modules: list[str] = _key(ALL_LINEAR_LLAMA, "module names that get adapters (comma-separated or several values)")
    # A base model whose pretraining never emitted EOS (llama2.c's stories models end documents with
    # BOS) has an untrained EOS embedding; LoRA on the blocks alone then barely learns to stop
    # (stories260K: 0% of generations stopped after 1000 steps; 90% after 300 steps with this on).
    train_eos_embedding: bool = _key(False, "also train the EOS token's embedding row (hidden_size parameters): "
                                            "turn on when the fine-tuned model never stops")

    # --- precision, quantisation, memory -----------------------------------------------------
    precision: str = _key("fp32", "compute precision: auto = bf16 where supported, else fp16 on CUDA, fp32 elsewhere",
                          choices=["auto", "fp32", "bf16", "fp16"])
    load_in_4bit: bool = _key(False, "QLoRA: load the frozen base model in 4-bit through bitsandbytes")
    bnb_4bit_quant_type: str = _key("nf4", "4-bit data type", choices=["nf4", "fp4"])
    bnb_4bit_use_double_quant: bool = _key(True, "also quantise the quantisation constants (saves ~0.4 bit/param)")
    gradient_checkpointing: bool = _key(False, "recompute activations in backward to save memory (slower)")
    optim: str = _key("adamw_torch", "optimizer name as in TrainingArguments (e.g. adamw_torch, paged_adamw_8bit)")

    # --- optimisation ------------------------------------------------------------------------
    learning_rate: float = _key(2e-4, "peak learning rate")
    per_device_train_batch_size: int = _key(4, "examples per device per forward pass")
    per_device_eval_batch_size: int = _key(8, "examples per device per evaluation pass")
    gradient_accumulation_steps: int = _key(4, "forward passes per optimizer step")
    num_train_epochs: float = _key(1.0, "epochs over the training data (ignored when max_steps > 0)")
    max_steps: int = _key(-1, "optimizer steps to run; -1 = use num_train_epochs")
    warmup_ratio: float = _key(0.03, "fraction of steps spent warming the learning rate up")
    lr_scheduler_type: str = _key("cosine", "learning-rate schedule as in TrainingArguments")
    weight_decay: float = _key(0.0, "AdamW weight decay")
    max_grad_norm: float = _key(1.0, "gradient clipping norm")
    seed: int = _key(42, "seed for adapter init, dropout and data order (set before the adapter is created)")

    # --- logging, evaluation, checkpoints -----------------------------------------------------
    logging_steps: int = _key(10, "log train loss every N optimizer steps")
    eval_steps: int = _key(100, "evaluate on the validation set every N optimizer steps")
    save_steps: int = _key(100, "write a checkpoint every N optimizer steps")
    save_total_limit: Optional[int] = _key(2, "keep at most N checkpoints (none = keep all)")
    report_to: list[str] = _key(["tensorboard"], "loggers as in TrainingArguments (tensorboard, wandb, ...; none = off)")
    output_dir: str = _key("models/sft_output", "where the adapter, config, metrics and checkpoints go")
    overwrite_output_dir: bool = _key(False, "allow writing over an output_dir that holds a different run")
    resume: bool = _key(False, "continue from the newest complete checkpoint in output_dir")

    def validate(self) -> None:
        """Reject combinations that would fail late or train nothing useful."""
        check_training_keys(self, length_key="max_seq_length", extra_positive=("pad_to_multiple_of",),
                            extra_optional_positive=("preprocessing_num_workers",))

    def prompt_template(self) -> PromptTemplate:
        return load_template(self.template)


def check_training_keys(config: Any, *, length_key: str, extra_positive: Sequence[str] = (),
                        extra_optional_positive: Sequence[str] = ()) -> None:
    """The checks every training config (SFT and DPO) shares; raises ConfigError naming the key."""
    positive = ["lora_r", "lora_alpha", "per_device_train_batch_size", "per_device_eval_batch_size",
                "gradient_accumulation_steps", "logging_steps", "eval_steps", "save_steps", *extra_positive]
    for key in positive:
        if getattr(config, key) <= 0:
            raise ConfigError(f"{key} must be > 0, got {getattr(config, key)}")
    length = getattr(config, length_key)
    if length < MIN_SEQ_LENGTH:
        raise ConfigError(f"{length_key} must be at least {MIN_SEQ_LENGTH} (the prompt template alone is ~40 tokens), got {length}")
    if not 0.0 <= config.lora_dropout < 1.0:
        raise ConfigError(f"lora_dropout must be in [0, 1), got {config.lora_dropout}")
    if config.learning_rate <= 0:
        raise ConfigError(f"learning_rate must be > 0, got {config.learning_rate}")
    if not 0.0 <= config.warmup_ratio < 1.0:
        raise ConfigError(f"warmup_ratio must be in [0, 1), got {config.warmup_ratio}")
    if config.max_steps == 0 or config.max_steps < -1:
        raise ConfigError(f"max_steps must be -1 (use epochs) or > 0, got {config.max_steps}")
    if config.max_steps == -1 and config.num_train_epochs <= 0:
        raise ConfigError("num_train_epochs must be > 0 when max_steps is -1")
    if not config.lora_target_modules:
        raise ConfigError("lora_target_modules is empty: name at least one module to adapt")
    for key in ("max_train_samples", "max_eval_samples", "save_total_limit", *extra_optional_positive):
        value = getattr(config, key)
        if value is not None and value <= 0:
            raise ConfigError(f"{key} must be > 0 or none, got {value}")
    if config.resume and config.overwrite_output_dir:
        raise ConfigError("choose one of resume (continue the run in output_dir) and overwrite_output_dir (start over)")
    if config.template is not None:
        try:
            load_template(config.template)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


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

    Evaluation and DPO read this file, so they prompt with exactly the training template even if
    the template file changes later.
    """
    payload = {
        "preset": preset,
        "config": asdict(config),
        "template": config.prompt_template().to_dict(),
        **(extra or {}),
    }
    path = Path(output_dir) / CONFIG_FILENAME
    write_json_atomic(path, payload)
    return path


def load_sft_run(run_dir: str | Path) -> tuple[SFTConfig, PromptTemplate, dict]:
    """Read a run's saved config: (config, the exact template it trained with, the whole payload)."""
    path = Path(run_dir) / CONFIG_FILENAME
    if not path.is_file():
        raise ConfigError(f"{path} not found: is {run_dir} the output_dir of an SFT run?")
    payload = json.loads(path.read_text(encoding="utf-8"))
    config = config_from_dict(SFTConfig, payload["config"])
    return config, template_from_dict(payload["template"]), payload


def describe(config: SFTConfig) -> str:
    return format_config(config, title="resolved SFT config")
