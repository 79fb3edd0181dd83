"""The one response-token loss and per-sequence log-prob, used by training, evaluation and preference metrics.

Position t predicts token t+1, so the logits needed are those at positions whose *next* label is
not -100. Where the model accepts a boolean ``logits_to_keep`` mask, only those rows of the final
hidden states are kept (prompt and padding positions are never projected onto the vocabulary);
otherwise the full hidden states are taken and the same rows selected.

Those rows then go through the LM head and the cross-entropy a chunk at a time
(:data:`LOGITS_PER_CHUNK` logits, 64 MiB in fp32), each chunk under activation checkpointing: a
chunk's logits are freed as soon as its loss is summed and recomputed in backward, so neither pass
ever holds the (labelled rows x vocabulary) logits — at SmolLM2's 49,152-token vocabulary that is
380 MiB per copy for a batch of 2,000 labelled tokens, and cross-entropy keeps several copies.
The rows are taken from the input of the model's own LM head module (a forward pre-hook), so LoRA
and trainable-token wrappers on the head, and the model's final norm, are exactly the model's.
One row still goes through the model's own head: where the model changes logits after the head
(Gemma 2's soft-capping, Cohere's logit scale), its logits differ from the head's, and the loss is
computed from the model's full logits instead (decided once per model, :func:`_head_is_last`).

Log-softmax runs in fp32: bf16/fp16 over a large vocabulary loses too much precision.
"""
from __future__ import annotations

import inspect
import sys
import weakref
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from core.tokenization import IGNORE_INDEX

# Logits computed at once: rows per chunk = this // vocabulary size (341 rows at 49,152 tokens).
LOGITS_PER_CHUNK = 2 ** 24
# Models whose logits are not their LM head's output (found by the probe): their loss uses full logits.
_HEAD_NOT_LAST: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()


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


# --------------------------------------------------------------------------- labelled rows


class _HeadInput:
    """A forward pre-hook on the LM head that keeps its input and lets only the first row through.

    The model then returns one row of logits (the probe) and the hidden states come back here,
    to be projected a chunk at a time."""

    def __init__(self):
        self.hidden: torch.Tensor | None = None
        self.calls = 0

    def __call__(self, module, args):
        self.calls += 1
        if not args or not isinstance(args[0], torch.Tensor):
            return None
        self.hidden = args[0]
        return (args[0][..., :1, :],) + tuple(args[1:])


def _forward(model, batch: dict[str, torch.Tensor], target_mask: torch.Tensor, logits_mask: bool) -> torch.Tensor:
    """The model's logits (or, under the pre-hook, its probe row) at the rows the loss needs."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if logits_mask:
        return model(**inputs, logits_to_keep=F.pad(target_mask, (0, 1), value=False)).logits
    return model(**inputs).logits


def _head_is_last(head, hook: _HeadInput, probe: torch.Tensor) -> bool:
    """Whether the model's logits are its head's output, unchanged: the probe row, computed again."""
    if hook.calls != 1 or hook.hidden is None:
        return False
    with torch.no_grad():
        again = head(hook.hidden[..., :1, :])
    return again.shape == probe.shape and torch.allclose(again.float(), probe.float(), rtol=1e-5, atol=1e-6)


class Labelled(NamedTuple):
    """What the loss is computed from, one row per labelled position."""

    rows: torch.Tensor  # final hidden states to project with ``head``; or logits, where ``head`` is None
    targets: torch.Tensor  # the next token of each row
    target_mask: torch.Tensor  # (batch, seq-1): position t's next token is labelled
    head: torch.nn.Module | None
    vocab: int


def _labelled_rows(model, batch: dict[str, torch.Tensor], logits_mask: bool) -> Labelled:
    """The labelled rows: hidden states where the model's logits are its head's output (the probe
    says so), else the model's own logits (a model that changes logits after its head)."""
    labels = batch["labels"]
    target_mask = labels[:, 1:] != IGNORE_INDEX
    targets = labels[:, 1:][target_mask]
    base = _unwrap(model)
    head = base.get_output_embeddings()
    if head is None or base in _HEAD_NOT_LAST:
        logits = _forward(model, batch, target_mask, logits_mask)
        return Labelled(_select(logits, target_mask, logits_mask), targets, target_mask, None, logits.shape[-1])
    hook = _HeadInput()
    handle = head.register_forward_pre_hook(hook)
    try:
        probe = _forward(model, batch, target_mask, logits_mask)
    finally:
        handle.remove()
    if not _head_is_last(head, hook, probe):
        _HEAD_NOT_LAST.add(base)  # this once, the forward runs twice
        logits = _forward(model, batch, target_mask, logits_mask)
        return Labelled(_select(logits, target_mask, logits_mask), targets, target_mask, None, logits.shape[-1])
    return Labelled(_select(hook.hidden, target_mask, logits_mask), targets, target_mask, head, probe.shape[-1])


def _select(rows: torch.Tensor, target_mask: torch.Tensor, logits_mask: bool) -> torch.Tensor:
    """Rows at labelled positions: already those under the mask, else (batch, seq, ...) selected."""
    return rows if logits_mask else rows[:, :-1][target_mask]


# --------------------------------------------------------------------------- chunked head + loss


def _per_chunk(labelled: Labelled, score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
               logits_per_chunk: int) -> list[torch.Tensor]:
    """``score(fp32 logits, targets)`` of each chunk of the labelled rows; with gradients, each chunk checkpointed."""
    rows, targets, head = labelled.rows, labelled.targets, labelled.head
    def chunk_score(chunk: torch.Tensor, chunk_targets: torch.Tensor) -> torch.Tensor:
        logits = chunk if head is None else head(chunk)
        return score(logits.float(), chunk_targets)

    if head is None:  # already logits: the vocabulary is their last dimension
        return [chunk_score(rows, targets)]
    size = max(1, logits_per_chunk // labelled.vocab)
    scores = []
    for start in range(0, max(len(rows), 1), size):
        chunk, chunk_targets = rows[start:start + size], targets[start:start + size]
        if torch.is_grad_enabled():
            scores.append(checkpoint(chunk_score, chunk, chunk_targets, use_reentrant=False))
        else:
            scores.append(chunk_score(chunk, chunk_targets))
    return scores


def _cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, targets, reduction="sum")


def _target_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # log_softmax at the target only (gather - logsumexp): no second vocabulary-sized tensor.
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def response_token_loss_sum(model, batch: dict[str, torch.Tensor], logits_mask: bool = True, *,
                            logits_per_chunk: int = LOGITS_PER_CHUNK) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropy over labelled positions, number of those positions)."""
    labelled = _labelled_rows(model, batch, logits_mask)
    return torch.stack(_per_chunk(labelled, _cross_entropy_sum, logits_per_chunk)).sum(), int(labelled.targets.numel())


def sequence_logps(model, batch: dict[str, torch.Tensor], logits_mask: bool = True, *,
                   logits_per_chunk: int = LOGITS_PER_CHUNK) -> torch.Tensor:
    """Per row, the summed log-probability of its labelled tokens (e.g. a response given its prompt)."""
    labelled = _labelled_rows(model, batch, logits_mask)
    token_logps = torch.cat(_per_chunk(labelled, _target_logps, logits_per_chunk))
    positions = labelled.target_mask.nonzero()[:, 0]
    return torch.zeros(labelled.target_mask.shape[0], dtype=token_logps.dtype,
                       device=token_logps.device).index_add_(0, positions, token_logps)
