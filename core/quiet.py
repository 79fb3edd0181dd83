"""Silence third-party notices that are harmless in this project, in one place; keep the rest.

Called by :func:`core.cli.run_cli` before an entry point runs (so even ``--help`` is quiet). Each
entry below names the exact message and why it does not apply here; a warning not listed is shown.
"""
from __future__ import annotations

import logging
import re
import warnings

# (logger name, message start, why it is harmless here)
QUIET_LOG_MESSAGES = (
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward",
     "an optional CPU kernel for 4-bit matmuls; the CPU/Mac path never loads a 4-bit model"),
    ("transformers.tokenization_utils_base", "Token indices sequence length is longer",
     "raw Alpaca rows are tokenised whole to measure them; they are cut to max_seq_length (and counted) before the model sees them"),
    ("transformers.trainer_utils", "The tokenizer has new PAD/BOS/EOS tokens",
     "the pad token is added on purpose (core.tokenization.ensure_pad_token); the model config follows it"),
    ("huggingface_hub.repocard", "Repo card metadata block was not found",
     "our model cards (README.md in an output dir) carry no YAML header; nothing reads one"),
    ("torch._library.triton", "Triton not available, find_triton_kernels",
     "importing vLLM's CPU build registers its custom ops, and torch looks for Triton kernels in them; a CPU has "
     "none to find (vLLM's own processes: core/vllm_engine.py)"),
    ("transformers.generation.stopping_criteria", "This is a friendly reminder - the current text generation call",
     "a prompt + max_new_tokens past the model's max_position_embeddings: core.generation says so itself, with "
     "how many prompts"),
)
# Deprecation notices addressed to library developers, not to the user running a command.
QUIET_WARNING_MODULES = r"(transformers|trl|peft|accelerate|datasets|torch\.utils\.checkpoint)(\.|$)"
# (warning module, message start, why it is harmless here)
QUIET_WARNINGS = (
    ("peft.utils.save_and_load", "Could not find a config file in",
     "on every adapter save peft looks for the base's config.json to learn whether the vocabulary was resized; a "
     "GGUF base has none beside it and offline the hub cannot be asked. Nothing here resizes the embedding matrix, "
     "so its assumption ('the vocabulary was not modified') holds"),
)


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_third_party() -> None:
    """Install the filters (idempotent). Loggers are filtered by name, so this works before the
    libraries are imported; worker processes forked later inherit it."""
    by_logger: dict[str, tuple[str, ...]] = {}
    for name, prefix, _why in QUIET_LOG_MESSAGES:
        by_logger[name] = by_logger.get(name, ()) + (prefix,)
    for name, prefixes in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(prefixes))
    warnings.filterwarnings("ignore", category=FutureWarning, module=QUIET_WARNING_MODULES)
    for module, prefix, _why in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(prefix), module=re.escape(module) + "$")
