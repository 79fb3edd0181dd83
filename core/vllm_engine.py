"""The ``vllm`` engine of ``core/engines.py``: vLLM's offline ``LLM`` fed with our token ids.

Imported only when vLLM was chosen. What makes its answers mean what the hf engine's mean:

- prompts go in as ``TokensPrompt`` built by our exact encoder, so tokenization is identical;
- ``ignore_eos=True`` + ``stop_token_ids=stop_ids``: generation ends at exactly the caller's stop
  ids (EOS and the chat template's end-of-turn), never at an id from the model's
  ``generation_config`` that the hf engine would not stop at; ``max_tokens = max_new_tokens``;
- greedy is ``temperature=0``; sampling takes temperature / top_p / top_k as given (0 = off) and,
  per request, a seed, so a prompt's sample does not depend on its batch;
- vLLM does not detokenize (``skip_tokenizer_init``): we cut at the first stop id and decode with
  our tokenizer, special tokens skipped, as the hf engine does.

Adapters. vLLM serves LoRA adapters from one engine (``enable_lora``, one ``LoRARequest`` each), but
on a CPU that measured 4x slower than a merged model (SmolLM2-135M, r=16 on all linear layers, 16
IFEval prompts, 128 new tokens: 23 vs 93 generated tokens/s, same greedy tokens 16/16), and vLLM
refuses an adapter carrying trained token rows (``--train_eos_embedding``: "trainable_tokens_delta is
unsupported LoRA weight"). So ``adapters=auto`` merges each adapter into a temporary copy of the base
(PEFT ``merge_and_unload``, token rows included) on a CPU, and serves LoRA on a GPU except for
adapters with token rows, which are merged there too. Merged copies of one base go into one running
engine in turn (``reload_weights_from``): an engine start is 20-25 s on a CPU, a reload a few.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import torch

from core.cli import UserError
from core.engine_base import Engine, VLLMSettings, read_shape
from core.generation import GREEDY, Generation, SamplingSettings, finish_generation

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's accepted max_lora_rank values
DEFAULT_MAX_MODEL_LEN = 4096


class VLLMUnavailable(Exception):
    """vLLM cannot run this model here (under ``--engine auto`` the caller falls back to hf)."""


# What vLLM's engine processes (spawned: our logging filters do not reach them) print below ERROR otherwise, each
# line on every engine start and none asking anything of our user: torch's "Triton not available,
# find_triton_kernels = []" once per process (TORCH_LOGS), and the C++ notice "NUMA binding: Using MEMBIND
# policy ..." of the CPU worker (TORCH_CPP_LOG_LEVEL). Errors still print.
ENGINE_EXIT_SECONDS = 30.0  # how long a closing engine may take to exit before vLLM kills it
ENGINE_PROCESS_QUIET = {"TORCH_LOGS": "-torch", "TORCH_CPP_LOG_LEVEL": "ERROR"}


def _quiet_vllm() -> dict[str, str]:
    """vLLM's own errors only, unless the user chose a lower level (``VLLM_LOGGING_LEVEL=WARNING`` or ``INFO``):
    returns the variables its engine processes get for that (:data:`ENGINE_PROCESS_QUIET`, less any the user set;
    none at a level below ERROR). TRL sets ERROR too when imported (DPO, RLOO): the same quiet then.

    At WARNING an engine start printed ~12 lines on a CPU (Triton missing, eager mode chosen, tcmalloc not
    preloaded, ...), none of which asks anything of our user; our own lines say what the engine does."""
    level = os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    if level.upper() not in ("ERROR", "CRITICAL"):
        return {}
    return {name: value for name, value in ENGINE_PROCESS_QUIET.items() if name not in os.environ}


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    """``values`` in os.environ while vLLM starts its processes (they copy it), then as before."""
    os.environ.update(values)
    try:
        yield
    finally:
        for name in values:
            os.environ.pop(name, None)


def _give_the_engine_the_planned_cores() -> None:
    """Bind vLLM's CPU engine to every core this run's thread plan gave it (``torch.get_num_threads()``, set by
    core/threads.py: all of them on an idle machine, fewer beside other jobs).

    vLLM's default keeps one core for the calling process, but ours only waits while the engine generates.
    Measured on a 2-core AMD EPYC (no AVX-512), idle: 210 vs 118 generated tokens/s (SmolLM2-135M-Instruct,
    128 IFEval prompts, 64 new tokens). ``VLLM_CPU_OMP_THREADS_BIND`` set by the user wins.
    """
    if "VLLM_CPU_OMP_THREADS_BIND" in os.environ or not hasattr(os, "sched_getaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))[:max(1, torch.get_num_threads())]
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, cores))
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


class _NoTokenizerWarmup(logging.Filter):
    """vLLM warms a chat template up at start even without a tokenizer (we pass ``skip_tokenizer_init``: our own
    tokenizer encodes and decodes) and logs the failure as a warning with a traceback: nothing is wrong."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Chat template warmup failed" not in record.getMessage()


def _dtype_name(dtype: Optional[torch.dtype]) -> str:
    names = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
    return names.get(dtype, "float32")


def _read_config(model_dir: str) -> dict:
    path = Path(model_dir) / "config.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def check_model(model_dir: str, device_type: str) -> None:
    """Raise :class:`VLLMUnavailable` for what vLLM is known to refuse, before its slow start."""
    config = _read_config(model_dir)
    if not config:
        return  # a hub id: vLLM reads it itself
    _quiet_vllm()  # before vLLM's first import: it logs at import ("Triton not installed ...")
    from vllm import ModelRegistry

    architectures = config.get("architectures") or []
    if architectures and not set(architectures) & set(ModelRegistry.get_supported_archs()):
        raise VLLMUnavailable(f"vLLM does not support the architecture {', '.join(architectures)}")
    heads = config.get("num_attention_heads") or 0
    head_dim = config.get("head_dim") or (config.get("hidden_size", 0) // heads if heads else 0)
    if device_type == "cpu" and head_dim:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        sizes = CPUAttentionBackend.get_supported_head_sizes()
        if head_dim not in sizes:
            raise VLLMUnavailable(f"vLLM's CPU attention supports head sizes {sizes}; this model's is {head_dim}")


class VLLMEngine(Engine):
    """One vLLM engine (its own process) on one set of weights, optionally serving LoRA adapters."""

    name = "vllm"

    def __init__(self, model_dir: str, tokenizer, *, dtype=None, settings: VLLMSettings = VLLMSettings(),
                 device: str = "cpu", max_model_len: Optional[int] = None, seed: int = 0, max_lora_rank: int = 0):
        quiet_processes = _quiet_vllm()
        if device == "cpu":
            _give_the_engine_the_planned_cores()
        check_model(model_dir, device)
        from vllm import LLM

        logging.getLogger("vllm.renderers.base").addFilter(_NoTokenizerWarmup())

        self.tokenizer, self.model_dir, self.settings = tokenizer, str(model_dir), settings
        self._shape = read_shape(model_dir)  # what a reload must match
        self.max_model_len = max_model_len or settings.max_model_len or _default_max_len(model_dir)
        lora = {}
        if max_lora_rank:
            rank = next((r for r in LORA_RANKS if r >= max_lora_rank), LORA_RANKS[-1])
            lora = {"enable_lora": True, "max_lora_rank": rank, "max_loras": 1}
        try:
            with _environment(quiet_processes):  # use_tqdm_on_load: no loading bar from the worker at each (re)load
                self.llm = LLM(model=self.model_dir, skip_tokenizer_init=True, dtype=_dtype_name(dtype), seed=seed,
                               gpu_memory_utilization=settings.memory_share, max_model_len=self.max_model_len,
                               enforce_eager=settings.eager, generation_config="vllm", use_tqdm_on_load=False, **lora,
                               **_whole_prompt_prefill(device, self.max_model_len))
        except (RuntimeError, ValueError, OSError) as exc:
            raise VLLMUnavailable(f"vLLM could not start on {model_dir}: {_first_line(exc)}") from None
        self._probe()

    def _probe(self) -> None:
        """One token from a one-token prompt: a model or CPU the engine cannot run fails here, as one line."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        token = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id
        try:
            self.llm.generate([TokensPrompt(prompt_token_ids=[int(token)])],
                              SamplingParams(max_tokens=1, temperature=0.0, detokenize=False), use_tqdm=False)
        except Exception as exc:  # vLLM's engine process died: its own log above says why
            self.close()
            raise VLLMUnavailable(f"vLLM's engine failed on {self.model_dir}: {_first_line(exc)}") from None

    def generate(self, prompt_ids, *, max_new_tokens, sampling: Optional[SamplingSettings] = None, stop_ids=None,
                 desc="generating", show_progress=True, seeds=None, lora=None) -> list[Generation]:
        from vllm.inputs import TokensPrompt

        sampling = sampling or GREEDY
        if max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be > 0, got {max_new_tokens}")
        stop_ids = list(stop_ids) if stop_ids else [self.tokenizer.eos_token_id]
        too_long = sum(len(ids) + max_new_tokens > self.max_model_len for ids in prompt_ids)
        if too_long:
            raise UserError(f"{too_long} prompt(s) + max_new_tokens {max_new_tokens} exceed vLLM's max_model_len "
                            f"{self.max_model_len}: raise --vllm_max_model_len or use --engine hf")
        params = [self._params(max_new_tokens, sampling, stop_ids, _seed(sampling, seeds, i)) for i in range(len(prompt_ids))]
        prompts = [TokensPrompt(prompt_token_ids=list(ids)) for ids in prompt_ids]
        outputs = self.llm.generate(prompts, params, use_tqdm=show_progress, lora_request=lora)
        return [finish_generation(self.tokenizer, output.outputs[0].token_ids, stop_ids) for output in outputs]

    @staticmethod
    def _params(max_new_tokens: int, sampling: SamplingSettings, stop_ids: list[int], seed: Optional[int]):
        from vllm import SamplingParams

        common = {"max_tokens": max_new_tokens, "ignore_eos": True, "stop_token_ids": stop_ids, "detokenize": False}
        if not sampling.do_sample:
            return SamplingParams(temperature=0.0, **common)
        return SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k, seed=seed,
                              **common)

    def load_weights(self, named_tensors: Sequence[tuple[str, torch.Tensor]], config) -> None:
        """Replace the engine's weights in place (Hugging Face names, the whole model): RLOO's policy after a step.

        They go through a safetensors file in the engine's own folder: vLLM's RPC does not carry tensors
        inside keyword arguments (measured: the worker receives lists), its ``reload_weights`` reads a folder.
        """
        if getattr(self, "_sync_dir", None) is None:  # never the folder the engine was started from: a user's model
            self._sync_dir = WorkDir(prefix="vllm_sync_")
        folder = save_plain_model(named_tensors, config, self._sync_dir.path)
        if not self.reload_weights_from(folder):
            raise ValueError(f"the pushed weights do not have the shapes of the engine's model ({self.model_dir})")

    def reload_weights_from(self, folder: str) -> bool:
        """Load a Hugging Face folder's weights into the running engine; False (nothing loaded) when its
        shapes differ from the engine's model (another vocabulary size, another architecture)."""
        theirs = _read_config(folder)
        # keys both configs state: a hub config.json may leave out what transformers writes on save (head_dim)
        if any(theirs[k] != v for k, v in self._shape.items() if k in theirs):
            return False
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(folder)})
        self.llm.reset_prefix_cache()  # cached prompt KV was computed with the old weights
        return True

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            try:  # time to exit by itself: killed after vLLM's default 5 s (a busy CPU), it leaves its shared
                # memory to Python's resource tracker, which warns of "leaked shared_memory objects" at our exit
                llm.llm_engine.engine_core.shutdown(timeout=ENGINE_EXIT_SECONDS)
            except Exception:  # already gone: nothing left to free
                pass
            self.llm = None
        if getattr(self, "_sync_dir", None) is not None:
            self._sync_dir.close()

    def describe(self) -> dict:
        return {"engine": self.name, "memory_share": self.settings.memory_share, "max_model_len": self.max_model_len,
                "eager": self.settings.eager}


def _whole_prompt_prefill(device: str, max_model_len: int) -> dict:
    """On the CPU backend every prompt is prefilled in one step (no chunked prefill).

    vLLM 0.30 rewinds a seeded request's generator after a partial prefill, and a CPU generator has
    no offset to rewind: seeded sampling over a few hundred prompts died with "CPU Generator does not
    use offset" (measured: 600 Alpaca prompts, DPO pair sampling). Whole prompts never leave a
    partial prefill behind; the token budget per step must then hold the longest prompt.
    """
    if device != "cpu":
        return {}
    return {"enable_chunked_prefill": False, "max_num_batched_tokens": max(max_model_len, 4096)}


def _seed(sampling: SamplingSettings, seeds: Optional[Sequence[int]], index: int) -> Optional[int]:
    """Per-request seed: the caller's, else ``sampling.seed + index`` (a prompt's sample independent of batching)."""
    if seeds is not None:
        return int(seeds[index])
    return None if sampling.seed is None else sampling.seed + index


def _default_max_len(model_dir: str) -> int:
    limit = _read_config(model_dir).get("max_position_embeddings") or DEFAULT_MAX_MODEL_LEN
    return min(int(limit), DEFAULT_MAX_MODEL_LEN)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# --------------------------------------------------------------------------- weights vLLM can read


def is_plain_model_dir(name_or_path: str) -> bool:
    """A local Hugging Face folder with config and safetensors/bin weights (not GGUF): vLLM reads it as it is."""
    path = Path(name_or_path)
    return path.is_dir() and (path / "config.json").is_file() and (
        any(path.glob("*.safetensors")) or any(path.glob("*.bin")))


def has_token_rows(adapter_dir: str) -> bool:
    config = Path(adapter_dir) / "adapter_config.json"
    return config.is_file() and bool(json.loads(config.read_text(encoding="utf-8")).get("trainable_token_indices"))


def lora_rank(adapter_dir: str) -> int:
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text(encoding="utf-8"))
    ranks = [config.get("r") or 0, *(config.get("rank_pattern") or {}).values()]
    return int(max(ranks))


def export_merged(base_model: str, adapter_dir: Optional[str], out_dir: Path, dtype: torch.dtype,
                  trust_remote_code: bool = False) -> str:
    """Write base (+ adapter merged in, token rows included) as a plain safetensors folder vLLM can load."""
    from core.modeling import load_adapter_model, load_base_model

    dtype = dtype or torch.float32
    if adapter_dir:
        model = load_adapter_model(adapter_dir, base_model=base_model, dtype=dtype, trust_remote_code=trust_remote_code)
        model = model.merge_and_unload()
    else:
        model = load_base_model(base_model, dtype=dtype, trust_remote_code=trust_remote_code)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    del model
    return str(out_dir)


@torch.no_grad()
def merged_weights(model, adapter: str = "default") -> list[tuple[str, torch.Tensor]]:
    """Every weight of ``model`` (a PeftModel or a plain one) with ``adapter``'s LoRA merged in, under plain HF names.

    Computed beside the weights (W + delta), never by merging into them and back: merge/unmerge
    rounds in floating point and would move the trained model a little at each call.
    """
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model() if isinstance(model, PeftModel) else model
    lora = {name: module for name, module in base.named_modules() if isinstance(module, LoraLayer)}
    out = []
    for name, param in base.named_parameters():
        if ".lora_" in name or "lora_magnitude" in name:
            continue
        if ".base_layer." in name:
            module_name, leaf = name.split(".base_layer.", 1)
            tensor = param
            module = lora.get(module_name)
            if leaf == "weight" and module is not None and adapter in module.lora_A:
                tensor = param + module.get_delta_weight(adapter).to(param.dtype)
            out.append((f"{module_name}.{leaf}", tensor))
        else:
            out.append((name, param))
    return out


def save_plain_model(named_tensors: Sequence[tuple[str, torch.Tensor]], config, out_dir: Path) -> str:
    """``config.json`` + one safetensors file: a folder vLLM (and ``from_pretrained``) can load."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out_dir)
    save_file({name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in named_tensors},
              str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return str(out_dir)


class WorkDir:
    """A temporary folder for merged copies, removed on close."""

    def __init__(self, prefix: str = "vllm_weights_"):
        self.path = Path(tempfile.mkdtemp(prefix=prefix))

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
