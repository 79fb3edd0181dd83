"""TRL's DPOTrainer as this project runs it: pre-tokenised pairs, and reward accuracy counted over pairs.

TRL logs ``rewards/accuracies`` (and the mean rewards and margins) as the average of per-batch
means: 13 held-out pairs in batches of 8 and 5 with 7/8 and 5/5 right logged 0.9375, though
12/13 = 0.923 were right. Here every batch's pair count is kept, the batch means are weighted by
it (``core.reporting.pool_batch_means``), and the log gets the counts themselves: ``pairs`` and
``pairs_correct`` (``eval_pairs`` and ``eval_pairs_correct`` on the held-out pairs).
"""
from __future__ import annotations

from pathlib import Path

from core.reporting import pairs_correct, pool_batch_means

# TRL's per-batch means that are means over pairs (entropy and logits are means over tokens: left as TRL logs them)
PAIR_MEANS = ("rewards/accuracies", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
              "logps/rejected")
# What a printed log line shows (the JSON log and TensorBoard keep every key TRL logs)
SHOWN_KEYS = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "grad_norm",
              "learning_rate", "num_input_tokens_seen", "train_tokens_per_second", "tokens_per_second")


def dpo_trainer_class():
    from trl import DPOTrainer

    class PretokenizedDPOTrainer(DPOTrainer):
        """TRL's DPOTrainer fed with pairs tokenised by ``core.pairs`` (SFT's tokenisation) instead of its
        own, whose pair metrics are exact over pairs, and whose reference log-probs are computed once per pair
        when ``reference_cache`` is set (``dpo/reference_cache.py``)."""

        reference_cache = None  # a dpo.reference_cache.ReferenceCache, set by use_reference_cache()

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):  # pinned: tests/test_trainer_hooks.py
            if "prompt_ids" in dataset.column_names:
                return dataset
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            import torch

            # chosen rows then rejected rows: half the batch is the number of pairs (all processes together,
            # as TRL gathers them for its means)
            pairs = torch.tensor(inputs["input_ids"].shape[0] // 2, device=self.accelerator.device)
            self._batch_pairs()[_mode(self)].append(int(self.accelerator.gather(pairs).sum().item()))
            if self.reference_cache is not None:
                inputs = self.reference_cache.fill(self, inputs, _mode(self))
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        def _save_checkpoint(self, model, trial):  # a private Trainer hook, pinned by tests/test_trainer_hooks.py
            super()._save_checkpoint(model, trial)
            if self.reference_cache is not None and self.is_world_process_zero():  # before the checkpoint is marked
                from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

                checkpoint = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
                self.reference_cache.save(checkpoint)

        def _batch_pairs(self) -> dict[str, list[int]]:
            if not hasattr(self, "_pairs_per_batch"):
                self._pairs_per_batch = {"train": [], "eval": []}
            return self._pairs_per_batch

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            mode = _mode(self)
            sizes, metrics = self._batch_pairs()[mode], self._metrics[mode]
            accuracies = list(metrics.get("rewards/accuracies", []))
            if sizes and len(accuracies) == len(sizes):
                prefix = "eval_" if mode == "eval" else ""
                logs[f"{prefix}pairs_correct"] = pairs_correct(accuracies, sizes)
                logs[f"{prefix}pairs"] = pool_batch_means(metrics, sizes, PAIR_MEANS)
            self._batch_pairs()[mode] = []
            super().log(logs, start_time)

    return PretokenizedDPOTrainer


def _mode(trainer) -> str:
    return "train" if trainer.model.training else "eval"


CLOCK_ATTRIBUTE = "phase_clock"  # set on the policy model: the clock its reference forwards are charged to


def time_reference_forwards(trainer, clock) -> None:
    """Charge TRL's reference forwards to ``clock``'s reference phase. TRL 1.16 runs them inline in
    ``DPOTrainer._compute_loss`` inside ``use_adapter(model, "ref" | None)`` (no method of their own to
    wrap), so that context manager, as the DPO trainer module holds it, is replaced once by one that opens
    the phase of the clock on the model it is given (none on another model: it runs as before)."""
    from contextlib import contextmanager, nullcontext

    import trl.trainer.dpo_trainer as dpo_module

    from core.phases import REFERENCE

    setattr(trainer.accelerator.unwrap_model(trainer.model), CLOCK_ATTRIBUTE, clock)
    if hasattr(dpo_module.use_adapter, "untimed"):
        return  # replaced already (another run in this process)
    original = dpo_module.use_adapter

    @contextmanager
    def use_adapter(model, *args, **kwargs):
        phase_clock = getattr(model, CLOCK_ATTRIBUTE, None)
        with phase_clock.phase(REFERENCE) if phase_clock is not None else nullcontext(), original(model, *args, **kwargs):
            yield

    use_adapter.untimed = original
    dpo_module.use_adapter = use_adapter


def use_reference_cache(trainer, cache) -> None:
    """From now on ``trainer`` takes each pair's reference log-probs from ``cache`` (computed at the pair's first
    use): TRL's loss reads them from the batch, as it does its own precomputed ones."""
    if not hasattr(trainer, "precompute_ref_logps") or not callable(getattr(trainer, "compute_ref_log_probs", None)):
        raise RuntimeError("TRL's DPOTrainer has no precompute_ref_logps / compute_ref_log_probs to feed cached "
                           "reference log-probs through (TRL version change?): run with --reference_cache false")
    trainer.reference_cache = cache
    trainer.precompute_ref_logps = True  # TRL's _compute_loss: take ref_chosen_logps / ref_rejected_logps from the batch
