"""Where a model is read from: a hub id, a local directory or a local ``.gguf`` file (no torch here).

``core/modeling.py`` loads from a :class:`ModelSource`; ``scripts/run_study.py`` checks every model path
with :func:`check_model_source` before its first stage runs, so a wrong path fails in a second, not after
the data is prepared.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.cli import UserError

# What every entry point's model flag accepts (core/keys.py, evaluation/config.py, scripts/ say it the same way).
MODEL_SOURCE_HELP = ("a hub id, a local model directory, or a local .gguf file (dequantised as it loads; "
                     "scripts/convert_gguf.py turns it into a model directory once)")


@dataclass(frozen=True)
class ModelSource:
    """Where ``from_pretrained`` reads from: a hub id or directory, plus an optional GGUF file name."""

    path: str
    gguf_file: str | None = None

    def kwargs(self) -> dict[str, Any]:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}

    def __str__(self) -> str:
        return str(Path(self.path) / self.gguf_file) if self.gguf_file else self.path


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _is_hub_id(text: str) -> bool:
    """``name`` or ``org/name``; paths such as ``./x``, ``/x`` or ``a/b/c`` are not."""
    return bool(_HUB_ID.match(text)) and ".." not in text


def _local_source(name_or_path: str) -> ModelSource | None:
    """The source of an existing local directory or ``.gguf`` file; None for a hub id; UserError for a wrong path."""
    expanded = os.path.expanduser(name_or_path)
    path = Path(expanded)
    if expanded.lower().endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"GGUF file not found: {name_or_path}")
        return ModelSource(str(path.parent), path.name)
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{name_or_path} is a file: give a model directory, a .gguf file or a hub id")
        return ModelSource(str(path))
    if not _is_hub_id(name_or_path):
        raise UserError(f"model path not found: {name_or_path}")
    return None


def resolve_model_source(name_or_path: str) -> ModelSource:
    """Turn a hub id, a directory or a ``.gguf`` file into a :class:`ModelSource` (local paths must exist)."""
    source = _local_source(name_or_path)
    if source is not None:
        return source
    from core.hub import go_offline_if_unreachable

    go_offline_if_unreachable()  # no network: the local cache at once, not a minute of retries
    return ModelSource(name_or_path)  # a hub id


def check_model_source(name_or_path: str, offline: bool, marker: str = "config.json") -> None:
    """Raise UserError unless ``name_or_path`` can be loaded: a ``.gguf`` file, a directory holding ``marker``
    (a model's ``config.json``; a tokenizer's ``tokenizer_config.json``), or a hub id (offline: one whose
    ``marker`` is in the local hub cache; online: one the hub has). Reads no weights, loads no torch."""
    source = _local_source(name_or_path)
    if source is not None:
        if source.gguf_file is None and not (Path(source.path) / marker).is_file():
            raise UserError(f"{name_or_path} holds no {marker}: give the folder a model (or tokenizer) was saved to, "
                            "a .gguf file or a hub id")
        return
    if offline:
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name_or_path, marker), str):
            raise UserError(f"{name_or_path} is not a local path and not in the hub cache, and the hub is offline "
                            "(--offline, or no network): give the model's local folder or .gguf file")
    elif not _hub_repo_exists(name_or_path):
        raise UserError(f"{name_or_path} is not a local path and no model of that name is on the hub: check the name "
                        "(org/name), or give a local folder or .gguf file")


def _hub_repo_exists(repo_id: str) -> bool:
    """Whether the hub has ``repo_id`` (a gated one counts); True where the question cannot be answered
    (a network error): the stage that downloads it will say what is wrong."""
    from huggingface_hub import HfApi

    try:
        return HfApi().repo_exists(repo_id)
    except Exception:  # noqa: BLE001  (timeouts, proxies, server errors: not the user's typo)
        return True
