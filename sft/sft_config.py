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
from typing import Optional

from core.config import ConfigError, check_training_keys, config_from_dict, key
from core.keys import LoraKeys, StageConfig, TrainingKeys, stage_presets
from core.model_source import MODEL_SOURCE_HELP
from core.prompting import PromptTemplate, load_template
from core.runs import RUN_CONFIG_FILES, read_run

CONFIG_FILENAME = RUN_CONFIG_FILES["sft"]


# Per-device presets (core/keys.py) with what SFT does differently on a GPU: larger batches, and
# padding to a multiple of 8 for tensor cores (on CPU/MPS that rounding only costs ~3% extra padding).
# What fits where on the cuda preset (ESTIMATES from parameter arithmetic, not measured; see the
# GPU memory section of docs/performance.md): a 7B base is ~3.9 GB in 4-bit, LoRA r16 on all linear layers ~40M
# parameters (~0.4 GB with 8-bit paged AdamW states); with checkpointing the activations are ~0.3 MB
# per token, so 8 x 512 tokens fit a 16 GB T4. Without checkpointing a TinyLlama-1.1B-shaped model
# keeps ~1.5-2 MB of activations per token: batch 64 x 512 padded tokens is ~60-90 GB -- keep tokens
# per forward under ~6k on 16 GB. Plain AdamW (--optim adamw_torch, with --load_in_4bit false) runs
# fused on CUDA; the preset keeps paged 8-bit AdamW because for a 7B QLoRA run its states are 4x
# smaller and page to host memory on a spike instead of failing. Packing stays off until
# `python -m bench.bench_train --device cuda` shows it wins on a GPU (not yet measured).
PRESETS = stage_presets(cuda={"packing": False, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 2,
                              "pad_to_multiple_of": 8})


@dataclass
class SFTConfig(StageConfig, LoraKeys, TrainingKeys):
    # core.keys.StageConfig: its name in core/stages.py, the printed config's title, its device presets
    STAGE, TITLE, PRESETS = "sft", "resolved SFT config", PRESETS
    RESUME_FREE = frozenset({"preview"})  # prints examples and stops: nothing a run learns

    # --- model -------------------------------------------------------------------------------
    model_name_or_path: str = key("TinyLlama/TinyLlama_v1.1", f"base model: {MODEL_SOURCE_HELP}")
    tokenizer_name_or_path: Optional[str] = key(None, "tokenizer source if different from the model")
    trust_remote_code: bool = key(False, "allow model code from the hub (off unless you trust the repo)")

    # --- data --------------------------------------------------------------------------------
    train_file: str = key("data/processed/sft_train.jsonl", "training JSONL from scripts/prepare_sft_data.py")
    val_file: str = key("data/processed/sft_val.jsonl", "validation JSONL from scripts/prepare_sft_data.py")
    template: str = key("alpaca", "how records become text: alpaca (core/templates/NAME.json, or a path to a template "
                               "JSON) or chat (the tokenizer's own chat template, for instruct/chat models)")
    system_prompt: Optional[str] = key(None, "--template chat only: a system message put before every conversation")
    max_seq_length: int = key(512, "longest tokenized example; longer responses are cut at the tail")
    train_on_inputs: bool = key(False, "also train on prompt tokens (default: loss on response + EOS only)")
    response_key: str = key("output", "the answer each row teaches: output (SFT data) or chosen (a preference file's "
                                      "prompt and chosen answer: rejection-sampling fine-tuning)", choices=["output", "chosen"])
    max_train_samples: Optional[int] = key(None, "use only the first N training rows (quick runs)")
    max_eval_samples: Optional[int] = key(None, "use only the first N validation rows for periodic evaluation")
    preprocessing_num_workers: Optional[int] = key(None, "processes for tokenization (default: automatic for large data)")
    pad_to_multiple_of: int = key(1, "pad each batch to a multiple of this many tokens (1 = no rounding; 8 suits GPU tensor cores)")
    group_by_length: bool = key(True, "batch examples of similar length together, so little compute goes to padding")
    # Padding-free packing (core/packing.py): several examples share one row, attention confined to
    # each by position_ids restarting at 0. Off by default on both presets: on a CPU it measured no
    # faster (docs/performance.md), and on a GPU it is not yet measured (bench_train --device cuda does).
    packing: bool = key(False, "pack several examples into each training row with no padding (attention stays "
                                "within each example; evaluation stays unpacked)")
    max_tokens_per_batch: Optional[int] = key(None, "with packing: tokens per packed row, i.e. per forward pass "
                                                    "(default: per_device_train_batch_size x max_seq_length)")

    # --- continuing a run, and a budget in tokens (the study's matched-compute control) ----------
    init_adapter_dir: Optional[str] = key(None, "continue this SFT run's LoRA adapter (trainable) instead of a fresh one: "
                                                "same base model and template; its own LoRA shape applies (lora_* keys unused)")
    max_train_tokens: Optional[int] = key(None, "train until this many non-padding tokens have gone through the model "
                                                "(train_tokens_seen); max_steps is derived from the data's mean length")
    match_tokens_of: Optional[str] = key(None, "a finished run (DPO, say): train for its metrics.json train_tokens_seen, "
                                               "as --max_train_tokens does")

    # --- LoRA (lora_r, lora_alpha, lora_dropout, lora_target_modules: core/keys.py) -------------
    # A base model whose pretraining never emitted EOS (llama2.c's stories models end documents with
    # BOS) has an untrained EOS embedding; LoRA on the blocks alone then barely learns to stop.
    # Measured on stories260K, 300 steps, 40 held-out Alpaca prompts, greedy, 128 new tokens: at
    # --learning_rate 1e-3, 0% stopped without this key and 95% with it; at the default 2e-4 the
    # row moves too little (at most 0.035 per element) and 0% stopped even with it.
    train_eos_embedding: bool = key(False, "also train the EOS token's embedding row (hidden_size parameters): "
                                            "turn on when the fine-tuned model never stops")

    torch_compile: bool = key(False, "compile the model with torch.compile (first steps are slow while it compiles)")
    liger_kernels: bool = key(False, "CUDA only: Liger's fused Triton kernels for RMSNorm, SwiGLU and RoPE "
                                     "(pip install liger-kernel; core/kernels.py)")

    # --- shared training keys (precision, optimisation, logging, checkpoints): core/keys.py ---------
    output_dir: str = key("models/sft_output", "where the adapter, config, metrics and checkpoints go")
    preview: int = key(0, "print N training examples as the model sees them (loss tokens marked) and exit without training")

    def validate(self) -> None:
        """Reject combinations that would fail late or train nothing useful."""
        check_training_keys(self, length_key="max_seq_length", extra_positive=("pad_to_multiple_of",),
                            extra_optional_positive=("preprocessing_num_workers", "max_tokens_per_batch"))
        if self.preview < 0:
            raise ConfigError(f"preview must be >= 0, got {self.preview}")
        budgets = [name for name in ("max_train_tokens", "match_tokens_of") if getattr(self, name) is not None]
        if len(budgets) > 1 or (budgets and self.max_steps > 0):
            given = budgets + (["max_steps"] if self.max_steps > 0 else [])
            raise ConfigError(f"{' and '.join(given)} each set how long the run trains: give one")
        if self.max_train_tokens is not None and self.max_train_tokens < 1:
            raise ConfigError(f"max_train_tokens must be >= 1, got {self.max_train_tokens}")
        if self.init_adapter_dir is not None and self.train_eos_embedding:
            raise ConfigError("init_adapter_dir continues an adapter as it was trained: train_eos_embedding applies to a "
                              "fresh one only (drop it)")

    def prompt_template(self) -> PromptTemplate:
        return load_template(self.template, self.system_prompt)


parse_sft_config = SFTConfig.parse


def save_sft_config(config: SFTConfig, output_dir: str | Path, preset: str = "", extra: dict | None = None) -> Path:
    """Save the resolved config *and* the template text it used next to the run's outputs.

    Evaluation, DPO and the reward model read this file (``core.runs.read_run``), so they prompt
    with exactly the training template even if the template file changes later.
    """
    return config.save(output_dir, config.prompt_template(), preset=preset, extra=extra)


def load_sft_run(run_dir: str | Path) -> tuple[SFTConfig, PromptTemplate, dict]:
    """Read a run's saved config: (config, the exact template it trained with, the whole payload)."""
    run = read_run(run_dir, expect="sft")
    return config_from_dict(SFTConfig, run.config), run.template, run.payload
