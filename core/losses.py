"""The one response-token loss and per-sequence log-prob, used by training, evaluation and preference metrics.

Position t predicts token t+1, so the logits needed are those at positions whose *next* label is
not -100. Where the model accepts a boolean ``logits_to_keep`` mask, only those rows go through
the LM head (prompt and padding positions are never projected onto the vocabulary); otherwise
full logits are computed and the same rows selected. Log-softmax runs in fp32: bf16/fp16 over a
large vocabulary loses too much precision.
"""
from __future__ import annotations

import inspect
import sys

import torch
import torch.nn.functional as F

from core.tokenization import IGNORE_INDEX


def _unwrap(model):
    """The plain transformers model under DDP and PEFT wrappers."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def supports_logits_mask(model) -> bool:
    """True when the model's forward accepts a boolean ``logits_to_keep`` mask.

    transformers' own causal LMs slice hidden states with ``slice_logits_to_keep``, which takes a
    (batch, seq) boolean mask; remote-code models may only accept an int, so they get full logits.
    """
    base = _unwrap(model)
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        return False
    module = sys.modules.get(type(base).__module__)
    return module is not None and hasattr(module, "slice_logits_to_keep")


def _labelled_logits(model, batch: dict[str, torch.Tensor], logits_mask: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits at positions whose next token is labelled, their targets, the (batch, seq-1) target mask)."""
    labels = batch["labels"]
    target_mask = labels[:, 1:] != IGNORE_INDEX
    targets = labels[:, 1:][target_mask]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if logits_mask:
        position_mask = F.pad(target_mask, (0, 1), value=False)
        logits = model(**inputs, logits_to_keep=position_mask).logits  # (num_targets, vocab)
    else:
        logits = model(**inputs).logits[:, :-1][target_mask]
    return logits.float(), targets, target_mask


def response_token_loss_sum(model, batch: dict[str, torch.Tensor], logits_mask: bool = True) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropy over labelled positions, number of those positions)."""
    logits, targets, _ = _labelled_logits(model, batch, logits_mask)
    return F.cross_entropy(logits, targets, reduction="sum"), int(targets.numel())


def sequence_logps(model, batch: dict[str, torch.Tensor], logits_mask: bool = True) -> torch.Tensor:
    """Per row, the summed log-probability of its labelled tokens (e.g. a response given its prompt)."""
    logits, targets, target_mask = _labelled_logits(model, batch, logits_mask)
    # log_softmax at the target only (gather - logsumexp): no second vocabulary-sized tensor.
    token_logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    rows = target_mask.nonzero()[:, 0]
    return torch.zeros(target_mask.shape[0], dtype=token_logps.dtype, device=token_logps.device).index_add_(0, rows, token_logps)
