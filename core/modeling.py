"""Loading models and tokenizers: one place for SFT, evaluation, DPO and the merge script.

Every loader takes explicit arguments (not a whole config) so any stage can reuse it. A model
source is a hub id (``TinyLlama/TinyLlama_v1.1``), a local directory, or a local ``.gguf`` file,
which is split into its directory plus ``gguf_file=`` as ``from_pretrained`` expects.
``trust_remote_code`` stays off unless the caller turns it on.

bitsandbytes is imported only inside the 4-bit functions, so the Mac path never needs it.
"""
from __future__ import annotations

import functools
import json
from contextlib import contextmanager
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch

from core.cli import UserError
from core.cpu_features import auto_cpu_precision, cpu_bf16_feature, missing_bf16_message
from core.log import say
from core.model_source import ModelSource, resolve_model_source  # noqa: F401  (loaders below; callers import them here)

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# --------------------------------------------------------------------------- sources: core/model_source.py (no torch)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --------------------------------------------------------------------------- devices and precision


def mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def pick_device(preferred: str = "auto") -> torch.device:
    """``auto`` = cuda if present, else mps, else cpu; a named device must exist (UserError otherwise)."""
    if preferred == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if mps_available() else "cpu")
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": mps_available()}
    if preferred not in available:
        raise UserError(f"unknown device {preferred!r} (use auto, cpu, cuda or mps)")
    if not available[preferred]:
        raise UserError(f"device {preferred!r} is not available on this machine")
    return torch.device(preferred)


def bf16_supported(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 in hardware: a CPU only with AVX512_BF16 or AMX-BF16 (core/cpu_features.py)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "mps":
        try:  # older macOS versions reject bf16 tensors on MPS outright
            torch.ones(1, dtype=torch.bfloat16, device=device)
            return True
        except (RuntimeError, TypeError):
            return False
    return cpu_bf16_feature() is not None


@functools.lru_cache(maxsize=1)
def _auto_on_cpu() -> str:
    """``auto``'s measured choice on the CPU, said in one line the first time a stage or engine asks."""
    choice = auto_cpu_precision()
    say(choice.line())
    return choice.precision


def resolve_precision(precision: str, device: torch.device) -> str:
    """Map a config's ``precision`` (auto|fp32|bf16|fp16) to what this device can run.

    ``auto``: bf16 on CUDA GPUs that support it, fp16 on older GPUs; on the CPU bf16 where it has
    bf16 instructions and bf16 matmul measures faster there, fp32 otherwise; fp32 on MPS (its bf16
    varies by macOS version, so it is opt-in there).
    """
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if bf16_supported(device) else "fp16"
        return _auto_on_cpu() if device.type == "cpu" else "fp32"
    if precision == "bf16" and not bf16_supported(device):
        if device.type == "cpu":
            raise UserError(missing_bf16_message())
        raise UserError(f"bf16 is not supported on this {device.type} device: use --precision fp32" +
                        (" or fp16" if device.type == "cuda" else ""))
    if precision == "fp16" and device.type == "cpu":
        raise UserError("fp16 needs a GPU: use --precision fp32 (or bf16) on the CPU")
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r} (use auto, fp32, bf16 or fp16)")
    return precision


def precision_reason(precision: str, device: torch.device) -> str:
    """Why a run has the precision it has, for its metrics: ``given``, or what ``auto`` went by."""
    if precision != "auto":
        return "given"
    if device.type == "cpu":
        return auto_cpu_precision().reason()
    return f"auto on {device.type}"


def torch_dtype(precision: str) -> torch.dtype:
    return _DTYPES[precision]


# --------------------------------------------------------------------------- tokenizer and model


def load_tokenizer(model_name_or_path: str, tokenizer_name_or_path: str | None = None, trust_remote_code: bool = False):
    """The tokenizer of a model (or an explicit tokenizer source), from a hub id, directory or GGUF file."""
    from transformers import AutoTokenizer

    source = resolve_model_source(tokenizer_name_or_path or model_name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code, **source.kwargs())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load tokenizer from {source}: {_first_line(exc)}") from None
    # Whole rows are tokenised to measure them and cut to max_seq_length afterwards (and counted), so
    # "longer than the maximum ... will result in indexing errors" never applies. Marked as already
    # said on the tokenizer itself, so dataset worker processes (spawned on macOS) inherit it.
    if isinstance(getattr(tokenizer, "deprecation_warnings", None), dict):
        tokenizer.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
    return tokenizer


def load_base_model(
    model_name_or_path: str,
    *,
    dtype: torch.dtype = torch.float32,
    device_map: Any = None,
    trust_remote_code: bool = False,
    quantization_config: Any = None,
):
    """A causal LM from a hub id, directory or GGUF file, in ``dtype`` (the compute dtype when quantised)."""
    from transformers import AutoModelForCausalLM

    source = resolve_model_source(model_name_or_path)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code, **source.kwargs()}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    try:
        model = AutoModelForCausalLM.from_pretrained(source.path, **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load model from {source}: {_first_line(exc)}") from None
    if source.gguf_file and quantization_config is None:
        _unmark_dequantized_gguf(model)
    return model


def _unmark_dequantized_gguf(model) -> None:
    """Let a model read from a GGUF file train and save like any other, once it is plain tensors.

    transformers dequantises GGUF weights into ordinary float tensors on load (unless GGUF kernels
    are installed) but leaves the model marked as GGUF-quantised, and that mark alone makes the
    Trainer refuse to fine-tune it and ``save_pretrained`` refuse to save it. The mark is dropped
    only when no weight was kept in GGUF blocks.
    """
    if getattr(model, "hf_quantizer", None) is None:
        return
    plain = all(p.is_floating_point() for p in model.parameters()) and not any(
        "gguf" in type(m).__module__ for m in model.modules())
    if plain:
        model.hf_quantizer.remove_quantization_config(model)  # what transformers does for dequantize=True


# --------------------------------------------------------------------------- 4-bit (QLoRA)


def require_bitsandbytes() -> None:
    """Fail in one line when bitsandbytes is missing (it is never installed on macOS)."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError("4-bit loading needs bitsandbytes: pip install bitsandbytes "
                        "(Linux/Windows; on a Mac use python -m sft.train_sft_mac)") from None


def bnb_4bit_config(compute_dtype: torch.dtype, quant_type: str = "nf4", double_quant: bool = True):
    """QLoRA's quantisation: NF4 weights, double-quantised constants, matmuls in ``compute_dtype``."""
    require_bitsandbytes()
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def load_4bit_model(
    model_name_or_path: str,
    *,
    compute_dtype: torch.dtype,
    device_map: Any,
    quant_type: str = "nf4",
    double_quant: bool = True,
    trust_remote_code: bool = False,
):
    """The frozen base in 4-bit, prepared for k-bit training (norms/embeddings in fp32, grads off).

    ``device_map`` is ``{"": local_rank}`` on a GPU (each data-parallel process holds its own copy)
    and ``"cpu"`` in tests, where bitsandbytes also runs NF4 matmuls.
    """
    from peft import prepare_model_for_kbit_training

    model = load_base_model(
        model_name_or_path, dtype=compute_dtype, device_map=device_map, trust_remote_code=trust_remote_code,
        quantization_config=bnb_4bit_config(compute_dtype, quant_type, double_quant),
    )
    keep_cpu_4bit_layout_trainable(model)
    # Gradient checkpointing is switched on later by the Trainer (non-reentrant, so no input-grad hack).
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def keep_cpu_4bit_layout_trainable(model) -> None:
    """Stop bitsandbytes' CPU inference repacking, which would break training after an evaluation.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a 4-bit layer's weights for a faster
    kernel the first time it runs in eval mode without gradients, and keeps them repacked. That
    kernel has no backward, so training after the first validation pass would silently lose the
    gradient through every base layer. Training code evaluates mid-run, so keep the normal layout.
    This is about that kernel's missing backward, not about speed: it stays off even where
    core/cpu_features.py finds AVX512_BF16 and ``auto`` trains in bf16.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


# --------------------------------------------------------------------------- LoRA


def linear_module_names(model) -> list[str]:
    """Leaf names of the model's linear layers (what ``lora_target_modules`` can name)."""
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


@contextmanager
def quiet_peft_probe():
    """peft 0.21 reads ``is_gradient_checkpointing``, deprecated in transformers 5: hide that one warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def attach_lora(model, *, r: int, alpha: int, dropout: float, target_modules: Sequence[str], seed: int,
                trainable_tokens: dict[str, list[int]] | None = None):
    """Wrap ``model`` with fresh LoRA adapters.

    The seed is set right here, just before the adapter weights are drawn: two runs with one seed
    then start from the same adapter, which exact resume and reproducibility both rely on.
    ``trainable_tokens`` ({embedding module name: token ids}) makes just those rows trainable,
    through PEFT's ``trainable_token_indices``, not the whole vocabulary.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    lora = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                      bias="none", task_type="CAUSAL_LM", trainable_token_indices=trainable_tokens or None)
    set_seed(seed)
    try:
        with quiet_peft_probe():
            peft_model = get_peft_model(model, lora)
    except ValueError as exc:
        if "not found" in str(exc) or "Target modules" in str(exc):
            raise UserError(f"lora_target_modules {list(target_modules)} match no layer of this model; "
                            f"its linear layers are: {', '.join(linear_module_names(model))}") from None
        raise
    if hasattr(peft_model, "config"):
        peft_model.config.use_cache = False  # a KV cache is useless in training and clashes with checkpointing
    return peft_model


def trainable_parameter_summary(model) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.2f}%)"


# --------------------------------------------------------------------------- trained adapters


def base_model_of(adapter_dir: str | Path) -> str:
    """The base model an adapter was trained on: the run's saved config first, else adapter_config.json.

    The run config keeps the user's exact source (e.g. a ``.gguf`` path), which the adapter config
    cannot express.
    """
    adapter_dir = Path(adapter_dir)
    run_config = adapter_dir / "sft_config.json"
    if run_config.is_file():
        return json.loads(run_config.read_text(encoding="utf-8"))["config"]["model_name_or_path"]
    adapter_config = adapter_dir / "adapter_config.json"
    if not adapter_config.is_file():
        raise UserError(f"{adapter_dir} holds no adapter_config.json: is it the output_dir of an SFT run?")
    base = json.loads(adapter_config.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base:
        raise UserError(f"{adapter_config} does not name its base model (base_model_name_or_path)")
    return base


def load_adapter_model(
    adapter_dir: str | Path,
    *,
    base_model: str | None = None,
    dtype: torch.dtype = torch.float32,
    device_map: Any = None,
    trust_remote_code: bool = False,
    is_trainable: bool = False,
):
    """Base model in full precision (never 4-bit) with a trained LoRA adapter on top."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise UserError(f"no LoRA adapter in {adapter_dir} (adapter_config.json missing)")
    base = load_base_model(base_model or base_model_of(adapter_dir), dtype=dtype, device_map=device_map,
                           trust_remote_code=trust_remote_code)
    with quiet_peft_probe():
        return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=is_trainable)
