"""SFT's Trainer: response-token loss on labelled positions only, resume-exact data order, counters without syncs.

``sft/training.py`` builds it (:func:`sft.training.build_trainer`) and runs it. What it changes in the
Hugging Face ``Trainer``:

- data order: a length-grouped sampler fixed by (seed, epoch) (``core.training``), or packed rows
  (``--packing``, ``core/packing.py``); evaluation is this process's share, longest first;
- loss: the summed response-token loss over the accumulated batch's labelled tokens, computed only
  where there are labels and a chunk of rows at a time (``core/losses.py``); evaluation reports the
  same loss per token;
- counters: input and supervised tokens are summed on the device and read (one sync) only where the
  Trainer logs, evaluates or saves (:class:`FlushCounters`), and kept in each checkpoint's marker.

Three private ``Trainer`` hooks are overridden where no public one exists; tests/test_trainer_hooks.py
pins their signatures.
"""
from __future__ import annotations

import time
from typing import Sequence

import torch
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import EvalLoopOutput

from core.cli import UserError
from core.log import say
from core.losses import response_token_loss_sum, supports_logits_mask
from core.packing import VARLEN_ATTENTION, PackedBatchSampler, PackedCollator, PackingError, check_packed_attention
from core.reporting import PeakMemory
from core.training import ClockCallback, RunProgress, SeededLengthGroupedSampler, longest_first


class SFTTrainer(Trainer):
    """``Trainer`` with response-token loss on labelled positions only and resume-exact data order."""

    def __init__(self, *args, train_lengths: Sequence[int], eval_lengths: Sequence[int] | None = None,
                 group_by_length: bool = True, memory: PeakMemory | None = None,
                 packing_tokens: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.train_lengths = list(train_lengths)
        self.eval_lengths = list(eval_lengths or [])
        self.group_by_length = group_by_length
        self.packing_tokens = packing_tokens  # None = unpacked; else the token budget of a packed row
        self._pending: dict[str, torch.Tensor] = {}  # token counts summed on the device, see _flush_counters
        self._flops_per_token: int | None = None
        self.progress = RunProgress()
        self.memory = memory or PeakMemory(self.args.device)
        self.logits_mask = supports_logits_mask(self.model)
        # Our compute_loss normalises by num_items_in_batch itself, so make the Trainer always count
        # it (over labels[..., 1:], as a causal LM's shifted loss needs), for any model.
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True
        self.add_callback(ClockCallback(self.memory, self.progress))
        self.add_callback(FlushCounters(self))

    # --- data order (a private Trainer hook: pinned by tests/test_trainer_hooks.py) ------------
    def _get_train_sampler(self, train_dataset=None):
        group = self.args.train_batch_size * self.args.gradient_accumulation_steps
        return SeededLengthGroupedSampler(self.train_lengths, group, self.args.seed, self.group_by_length)

    def get_train_dataloader(self):
        """Unpacked: the Trainer's loader with our sampler. Packed: one pack of examples per batch
        (a ``(1, N)`` row, no padding), packs fixed by the seed, their order by (seed, epoch)."""
        if self.packing_tokens is None:
            return super().get_train_dataloader()
        try:
            attention = check_packed_attention(self.model)
        except PackingError as exc:
            raise UserError(f"--packing: {exc}") from None
        sampler = PackedBatchSampler(self.train_lengths, self.packing_tokens, self.args.seed)
        say(f"packing: {len(self.train_lengths)} examples in {len(sampler)} rows of at most {self.packing_tokens} "
            f"tokens ({sampler.fill_ratio():.1%} full), {attention} attention confined to each example")
        collator = PackedCollator(self.processing_class.pad_token_id,
                                  flash_attention_kwargs=attention in VARLEN_ATTENTION)
        loader = DataLoader(self.train_dataset, batch_sampler=sampler, collate_fn=collator, num_workers=0,
                            pin_memory=self.args.dataloader_pin_memory)
        return self.accelerator.prepare(loader)

    def get_eval_dataloader(self, eval_dataset=None):
        """This process's disjoint share of the validation set, longest examples first.

        Not sharded by accelerate: that pads uneven shards with repeated examples, which would
        count them twice in a token-weighted loss. Sums are reduced across processes instead.
        """
        dataset = self.eval_dataset if eval_dataset is None or isinstance(eval_dataset, str) else eval_dataset
        lengths = self.eval_lengths if len(self.eval_lengths) == len(dataset) else [len(x) for x in dataset["input_ids"]]
        order = longest_first(lengths)[self.args.process_index::self.args.world_size]
        return DataLoader(dataset, batch_size=self.args.eval_batch_size, sampler=order,
                          collate_fn=self.data_collator, num_workers=0)

    # --- loss -----------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss_sum, count = response_token_loss_sum(model, inputs, self.logits_mask)
        if num_items_in_batch is None:
            loss = loss_sum / max(count, 1)
        else:
            # Token-level mean over the whole accumulated (and, with DDP, global) batch; DDP then
            # averages gradients over processes, which the factor below undoes.
            loss = loss_sum / num_items_in_batch
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes
        return (loss, {"loss": loss}) if return_outputs else loss

    # --- counters without a device sync per step ----------------------------------------
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if num_items is not None:  # global count of labelled tokens for this optimizer step
            self._add_pending("supervised", num_items)
        return batches, num_items

    def _track_num_input_tokens(self, inputs):
        """Non-padding tokens, summed on the device (the Trainer's version, a private hook pinned by
        tests/test_trainer_hooks.py, calls ``.item()`` on every micro-batch). A packed row has no padding and no attention mask: all its tokens count (the
        Trainer would count tokens != pad_token_id, missing every EOS where pad == EOS)."""
        if self.args.include_num_input_tokens_seen == "no":
            return
        mask = inputs.get("attention_mask")
        self._add_pending("input", mask.sum() if mask is not None else inputs["input_ids"].numel())

    def _add_pending(self, name: str, count) -> None:
        if name not in self._pending:
            self._pending[name] = torch.zeros((), dtype=torch.int64, device=self.args.device)
        if isinstance(count, torch.Tensor) and count.is_floating_point():
            count = count.round().long()  # num_items_in_batch comes back divided by the (1) parallel size
        self._pending[name] += count

    def _flush_counters(self) -> None:
        """Move the device-side counts into the trainer state and the run's progress (one sync), before
        the Trainer reads them (:class:`FlushCounters`). Called on every process at the same points (the
        Trainer's control flags agree across processes), so the gather below is collective."""
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        if "input" in pending:
            self.state.num_input_tokens_seen += int(self.accelerator.gather(pending["input"].reshape(1)).sum())
        if "supervised" in pending:  # already a global count (see _get_num_items_in_batch)
            self.progress.supervised_tokens_seen += int(pending["supervised"])

    def floating_point_ops(self, inputs) -> int:
        """The Trainer's 6 x tokens x parameters estimate, with the parameter count computed once
        (the Trainer walks every parameter on every micro-batch)."""
        if self._flops_per_token is None:
            count = getattr(self.model, "num_parameters", None)
            self._flops_per_token = 6 * count(exclude_embeddings=True) if count else 0
        return self._flops_per_token * inputs["input_ids"].numel() if "input_ids" in inputs else 0

    # --- evaluation: the same response-token loss, averaged over tokens, not batches ------
    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        started = time.perf_counter()
        model = self.model
        was_training = model.training
        model.eval()
        self.callback_handler.eval_dataloader = dataloader
        totals = torch.zeros(3, dtype=torch.float64, device=self.args.device)  # loss sum, tokens, examples
        with torch.no_grad():
            for batch in dataloader:
                batch = self._prepare_inputs(batch)
                with self.compute_loss_context_manager():
                    loss_sum, count = response_token_loss_sum(model, batch, self.logits_mask)
                totals += torch.tensor([loss_sum.item(), count, batch["input_ids"].shape[0]],
                                       dtype=torch.float64, device=totals.device)
                self.control = self.callback_handler.on_prediction_step(self.args, self.state, self.control)
        totals = self.accelerator.reduce(totals, reduction="sum")
        model.train(was_training)
        loss_total, tokens, examples = totals.tolist()
        metrics = {f"{metric_key_prefix}_loss": loss_total / max(tokens, 1), f"{metric_key_prefix}_tokens": int(tokens)}
        self.progress.eval_seconds += time.perf_counter() - started
        return EvalLoopOutput(predictions=None, label_ids=None, metrics=metrics, num_samples=int(examples))

    def _save_checkpoint(self, model, trial):  # a private Trainer hook, pinned by tests/test_trainer_hooks.py
        self._flush_counters()  # the checkpoint's state and completion marker hold the exact counts
        started = time.perf_counter()
        super()._save_checkpoint(model, trial)
        self.progress.save_seconds += time.perf_counter() - started


class FlushCounters(TrainerCallback):
    """Flushes the trainer's device-side token counts where the Trainer reads them: after an optimizer step
    that logs, evaluates, saves or stops, and at the end of each epoch (so the end of training finds none
    pending). Added in ``SFTTrainer.__init__``, after the Trainer's flow callback and the ``callbacks``
    given, so ``on_step_end`` sees the flags they set for this step."""

    def __init__(self, trainer: SFTTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_log or control.should_save or control.should_evaluate or control.should_training_stop:
            self.trainer._flush_counters()

    def on_epoch_end(self, args, state, control, **kwargs):
        self.trainer._flush_counters()
