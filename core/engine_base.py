"""The generation interface every engine implements (``core/engines.py``: hf; ``core/vllm_engine.py``: vllm),
and vLLM's settings and the model shape keys. Both engine modules import it; neither imports the other at module level."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from core.cli import UserError


class Engine:
    """What every engine offers. ``generate`` returns results in the order of ``prompt_ids``."""

    name = "engine"

    def generate(self, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int, sampling=None,
                 stop_ids: Sequence[int] | None = None, desc: str = "generating", show_progress: bool = True,
                 seeds: Sequence[int] | None = None) -> list:
        """``sampling``: a ``core.generation.SamplingSettings`` (None = greedy); returns ``Generation``s."""
        raise NotImplementedError

    def close(self) -> None:
        """Free what the engine holds (vLLM: its engine process and reserved memory)."""

    def describe(self) -> dict:
        return {"engine": self.name}


@dataclass(frozen=True)
class VLLMSettings:
    """vLLM's knobs that matter on a laptop; every one is a flag where vLLM is offered.

    On the CPU backend ``memory_share`` is the share of *RAM* vLLM reserves for weights and KV cache
    (vLLM's ``gpu_memory_utilization``: its 0.92 default fails on a 24 GB machine with anything else
    open); on a GPU it is the share of GPU memory.
    """

    memory_share: float = 0.2
    max_model_len: Optional[int] = None  # None: the model's max_position_embeddings, at most 4096
    eager: bool = True  # no torch.compile warm-up: measured 25 s load vs 110-127 s, same speed on a CPU
    adapters: str = "auto"  # auto | merged | lora: how adapter columns are served (see core/vllm_engine.py)

    def __post_init__(self) -> None:
        if not 0.0 < self.memory_share <= 1.0:
            raise UserError(f"--vllm_memory_share must be in (0, 1], got {self.memory_share}")
        if self.adapters not in ("auto", "merged", "lora"):
            raise UserError(f"--vllm_adapters must be auto, merged or lora, got {self.adapters!r}")


# config.json keys that decide what vLLM can run (core/engine_verdicts.py) and that a copy reloaded into a running
# engine must share with its model (core/vllm_engine.py)
SHAPE_KEYS = ("architectures", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings")


def read_shape(model_dir: str) -> dict:
    """The shape keys of a local model's config.json ({} for a hub id or a folder without one)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return {}
    config = json.loads(path.read_text(encoding="utf-8"))
    return {k: config[k] for k in SHAPE_KEYS if k in config}
