"""Optional fused GPU kernels: Liger's Triton RMSNorm, SwiGLU and rotary embedding (``--liger_kernels``).

Off by default. ``liger-kernel`` is an optional dependency (``pip install liger-kernel``; its Triton
kernels need a CUDA GPU). The kernels replace the base model's norm, MLP activation and RoPE in
place, before LoRA is attached: the LoRA projections, our response-token loss (the LM head only at
labelled positions) and everything else stay as they are. Liger's loss kernels (cross-entropy,
fused linear cross-entropy) are not used: our loss already skips the LM head on prompt and padding
positions, and Liger's fused path would compute it on every position.

Whether it pays is measured, not assumed: ``python -m bench.bench_train --device cuda --configs ours
ours_liger ceiling`` times it beside ours without it.
"""
from __future__ import annotations

import torch

from core.cli import UserError

LIGER_PACKAGE = "liger-kernel"
# What is swapped; the loss kernels stay off (see the module docstring).
LIGER_OPTIONS = {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False, "fused_linear_cross_entropy": False}


def check_liger_kernels(device: torch.device) -> None:
    """A one-line UserError unless Liger can run here: a CUDA device and the package importable."""
    if device.type != "cuda":
        raise UserError(f"--liger_kernels needs a CUDA GPU (Liger's kernels are Triton), not {device.type}: turn it off")
    _registry()


def _registry() -> dict:
    """Liger's {model type: apply function} table (importing it imports Triton)."""
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError as exc:
        raise UserError(f"--liger_kernels needs the {LIGER_PACKAGE} package (pip install {LIGER_PACKAGE}), "
                        f"which needs Triton: {str(exc).splitlines()[0]}") from None
    return MODEL_TYPE_TO_APPLY_LIGER_FN


def liger_apply_function(model):
    """Liger's ``apply_liger_kernel_to_<model type>`` for this model, or a one-line UserError."""
    registry = _registry()
    model_type = getattr(model.config, "model_type", None)
    if model_type not in registry:
        raise UserError(f"--liger_kernels: {LIGER_PACKAGE} has no kernels for model type {model_type!r}; turn it off")
    return registry[model_type]


def apply_liger_kernels(model, device: torch.device) -> dict[str, bool]:
    """Swap ``model``'s RMSNorm, SwiGLU and RoPE for Liger's kernels, in place (call before LoRA);
    returns the options applied."""
    check_liger_kernels(device)
    apply = liger_apply_function(model)
    options = {key: value for key, value in LIGER_OPTIONS.items() if key in _parameters(apply)}
    apply(model=model, **options)
    return options


def _parameters(function) -> set[str]:
    import inspect

    return set(inspect.signature(function).parameters)
