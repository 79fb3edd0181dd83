"""One policy forward per RLOO batch instead of two: the scoring forward's log-probs reused by the loss.

TRL's RLOOTrainer runs the policy over each batch of prompt + completion twice with the same weights:
once without gradients to score the samples (``old_logps``, which with the reference's log-probs gives
the KL in the reward) and once more in the loss, where with one optimisation pass per sample
(``num_iterations`` 1) and the whole generation batch in one optimizer step (``steps_per_generation`` 1)
it recomputes the same numbers (dropout is off) only to get their gradient. On the monitoring prompts
the second forward gives an evaluation "loss" that the samples' own advantages already fix.

:class:`PolicyForwardReuse` makes the scoring forward the only one: in training it runs with gradients
kept (and the entropies the loss logs) and hands TRL detached log-probs; the loss then takes the same
tensors (rows matched, as TRL shuffles the batch between the two) and back-propagates through them. The
numbers are the ones the second forward gives (``log_ratio`` is exactly 0 instead of 0 up to rounding);
where the batch does not match (several passes per sample, gradient accumulation, gradient checkpointing,
another model's forward) TRL's own forward runs, unchanged.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

POLICY_ADAPTER = "default"  # the trainable adapter's name (TRL copies it into the frozen "ref")


class PolicyForwardReuse:
    """The policy's last scoring forward (input rows, log-probs, entropies), kept for the loss that follows."""

    def __init__(self, *, keep_graph_in_training: bool):
        self.keep_graph_in_training = keep_graph_in_training
        self._kept: Optional[tuple] = None
        self.reused = 0  # forwards saved (tests and the run's metrics)

    @staticmethod
    def for_trainer(trainer) -> Optional["PolicyForwardReuse"]:
        """None where the forwards differ: several optimisation passes per sample (TRL's ``num_iterations``)."""
        if trainer.num_iterations != 1:
            return None
        one_batch = trainer.args.steps_per_generation == 1 and not trainer.args.gradient_checkpointing
        return PolicyForwardReuse(keep_graph_in_training=one_batch)

    @staticmethod
    def is_policy(trainer, model) -> bool:
        """The trainable adapter is the one active (not TRL's frozen copy "ref", the reference)."""
        unwrapped = trainer.accelerator.unwrap_model(model)
        return "ref" in getattr(unwrapped, "peft_config", {}) and getattr(unwrapped, "active_adapter", None) == POLICY_ADAPTER

    def score(self, trainer, forward, model, input_ids, attention_mask, logits_to_keep, batch_size, extra: dict):
        """The scoring forward, run once for scoring and the loss; TRL gets detached log-probs."""
        training = trainer.model.training
        if training and not self.keep_graph_in_training:
            self._kept = None
            return forward(model, input_ids, attention_mask, logits_to_keep, batch_size, **extra)
        with torch.enable_grad() if training else contextlib.nullcontext():
            logps, entropies, aux = forward(model, input_ids, attention_mask, logits_to_keep, batch_size,
                                            compute_entropy=True, **extra)
        self._kept = (input_ids, attention_mask, logits_to_keep, logps, entropies)
        return logps.detach(), None, aux

    def take(self, input_ids, attention_mask, logits_to_keep):
        """The kept log-probs and entropies in the rows of ``input_ids``, or None when they are not the kept batch."""
        kept, self._kept = self._kept, None
        if kept is None:
            return None
        kept_ids, kept_mask, kept_keep, logps, entropies = kept
        if kept_keep != logits_to_keep or kept_ids.shape != input_ids.shape:
            return None
        order = matching_rows(torch.cat([kept_ids, kept_mask], 1), torch.cat([input_ids, attention_mask], 1))
        if order is None:
            return None
        self.reused += 1
        return logps[order], entropies[order], None


def matching_rows(kept: torch.Tensor, wanted: torch.Tensor) -> Optional[torch.Tensor]:
    """Indices ``order`` with ``kept[order] == wanted`` (each kept row used once), or None when there are none."""
    free: dict[bytes, list[int]] = {}
    for index, row in enumerate(kept.cpu()):
        free.setdefault(row.numpy().tobytes(), []).append(index)
    order = []
    for row in wanted.cpu():
        candidates = free.get(row.numpy().tobytes())
        if not candidates:
            return None
        order.append(candidates.pop(0))
    return torch.tensor(order, dtype=torch.long, device=kept.device)
