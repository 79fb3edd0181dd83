"""The one place where SFT training is wired: Trainer, loss, samplers, resume, outputs.

``python -m sft.train_sft_mac`` and ``python -m sft.train_sft_cuda`` both call :func:`run_sft`; they
differ only in the :class:`ModelPlan` they pass (where the model runs and how it is loaded).

What happens, in order:

1. the config is resolved and printed; the entry point checks its hardware (one-line errors);
2. data files and the output dir are checked before anything heavy is loaded: an output dir
   holding another run is refused unless ``--resume`` or ``--overwrite_output_dir``;
3. the config is saved to ``<output_dir>/sft_config.json`` at the start of the run;
4. tokenizer, datasets and model (LoRA adapter created right after seeding) are loaded;
5. a Hugging Face ``Trainer`` trains with the shared collator, a length-grouped sampler whose order
   depends only on (seed, epoch), response-token loss computed only where there are labels,
   periodic validation, TensorBoard logs and crash-safe checkpoints (see ``sft/checkpoints.py``);
6. ``output_dir`` receives the adapter, tokenizer, ``trainer_state.json``, ``metrics.json``,
   ``loss_curve.png`` and a model-card ``README.md``.

Speed: batches are padded per batch (not to max_seq_length), similar lengths are batched together,
and the LM head and cross-entropy run only at positions whose next token carries a label
(``logits_to_keep`` with a boolean mask), which skips the prompt and the padding.
"""
from __future__ import annotations

import dataclasses
import inspect
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler
from transformers import Trainer, TrainerCallback, TrainerState, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import EvalLoopOutput

from sft import checkpoints
from sft.cli import UserError
from sft.modeling import (attach_lora, load_4bit_model, load_base_model, load_tokenizer, resolve_model_source,
                          trainable_parameter_summary)
from sft.reporting import PeakMemory, format_table, loss_points, plot_loss_curve, write_metrics, write_model_card
from sft.sft_config import CONFIG_FILENAME, SFTConfig, describe, parse_sft_config, save_sft_config

IGNORE_INDEX = -100
METRICS_FILENAME = "metrics.json"
LOSS_CURVE_FILENAME = "loss_curve.png"
# Keys that may change between a run and its --resume: they affect logging, evaluation and
# checkpointing, never the optimisation itself, so the resumed run still ends where the original would.
RESUME_FREE_KEYS = frozenset({
    "resume", "overwrite_output_dir", "output_dir", "logging_steps", "eval_steps", "save_steps",
    "save_total_limit", "report_to", "preprocessing_num_workers", "max_eval_samples", "per_device_eval_batch_size",
    "pad_to_multiple_of",  # padding is masked: it changes tensor shapes, not what is learned
})


def is_main_process() -> bool:
    """Rank 0 of a torchrun/accelerate launch (or a plain single process); valid before torch.distributed starts."""
    return int(os.environ.get("RANK", "0")) == 0


def say(message: str) -> None:
    """Print once per launch (rank 0 only), so multi-process logs are not doubled."""
    if is_main_process():
        print(message, flush=True)


# --------------------------------------------------------------------------- model plans


@dataclass
class ModelPlan:
    """What an entry point decided about the hardware, and how to load the model for it."""

    device: torch.device
    precision: str  # fp32 | bf16 | fp16, already checked against the device
    load: Callable[[SFTConfig], Any]  # returns the model with fresh LoRA adapters
    description: str = ""


def build_lora_model(config: SFTConfig, *, dtype: torch.dtype, device_map: Any = None, load_in_4bit: bool = False):
    """Base model (full precision or 4-bit) plus fresh LoRA adapters, as the config describes."""
    if load_in_4bit:
        base = load_4bit_model(config.model_name_or_path, compute_dtype=dtype, device_map=device_map,
                               quant_type=config.bnb_4bit_quant_type, double_quant=config.bnb_4bit_use_double_quant,
                               trust_remote_code=config.trust_remote_code)
    else:
        base = load_base_model(config.model_name_or_path, dtype=dtype, device_map=device_map,
                               trust_remote_code=config.trust_remote_code)
    return attach_lora(base, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                       target_modules=config.lora_target_modules, seed=config.seed,
                       trainable_tokens=eos_output_rows(base) if config.train_eos_embedding else None)


def eos_output_rows(model) -> dict[str, list[int]]:
    """{module name: EOS id(s)} for the matrix whose EOS row decides when the model stops.

    That is the output embedding (the EOS logit); an input-embedding row of EOS gets no gradient,
    since nothing after the final EOS carries a label. With tied embeddings the two are one matrix,
    and PEFT trains the row through the input embedding.
    """
    eos = model.config.eos_token_id
    ids = [] if eos is None else sorted({eos} if isinstance(eos, int) else set(eos))
    tied = getattr(model.config, "tie_word_embeddings", False)
    target = model.get_input_embeddings() if tied else model.get_output_embeddings()
    name = next(name for name, module in model.named_modules() if module is target)
    return {name.split(".")[-1]: ids}


# --------------------------------------------------------------------------- loss


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


def response_token_loss_sum(model, batch: dict[str, torch.Tensor], logits_mask: bool = True) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropy over labelled positions, number of those positions).

    Position t predicts token t+1, so the logits needed are those at positions whose *next* label
    is not -100. With ``logits_mask`` only those rows go through the LM head (prompt and padding
    positions are skipped); otherwise full logits are computed and the same rows selected.
    """
    labels = batch["labels"]
    target_mask = labels[:, 1:] != IGNORE_INDEX
    targets = labels[:, 1:][target_mask]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if logits_mask:
        position_mask = F.pad(target_mask, (0, 1), value=False)
        logits = model(**inputs, logits_to_keep=position_mask).logits  # (num_targets, vocab)
    else:
        logits = model(**inputs).logits[:, :-1][target_mask]
    # fp32 cross-entropy: bf16/fp16 log-softmax over a large vocabulary loses too much precision.
    loss_sum = F.cross_entropy(logits.float(), targets, reduction="sum")
    return loss_sum, int(targets.numel())


# --------------------------------------------------------------------------- samplers


def length_grouped_indices(lengths: Sequence[int], group_size: int, generator: torch.Generator,
                           megabatch_groups: int = 50) -> list[int]:
    """An epoch's order in which every ``group_size`` consecutive examples have similar lengths.

    As in Hugging Face's grouping, examples are shuffled, cut into mega-batches of up to 50 groups
    and sorted by length inside each. Unlike it, the groups are then shuffled: sorted mega-batches
    alone feed the optimizer long-to-short cycles (a saw-tooth loss curve and a length curriculum
    every 50 steps). The group holding the longest example goes first, so an out-of-memory shows
    at once; the one incomplete group goes last, so every other batch stays aligned to a group.
    """
    n = len(lengths)
    megabatch = group_size * max(1, min(n // (group_size * 4), megabatch_groups))
    shuffled = torch.randperm(n, generator=generator).tolist()
    groups: list[list[int]] = []
    for start in range(0, n, megabatch):
        ranked = sorted(shuffled[start:start + megabatch], key=lambda i: -lengths[i])
        groups += [ranked[k:k + group_size] for k in range(0, len(ranked), group_size)]
    partial = [g for g in groups if len(g) < group_size]
    full = [g for g in groups if len(g) == group_size]
    full = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
    ordered = full + partial
    longest = max(range(len(ordered)), key=lambda k: max(lengths[i] for i in ordered[k]))
    ordered.insert(0, ordered.pop(longest))
    return [i for group in ordered for i in group]


class SeededLengthGroupedSampler(Sampler[int]):
    """Length-grouped (or plain shuffled) order fixed by (seed, epoch) alone.

    The stock sampler draws from the global RNG, so a resumed run would see another order; here
    the same epoch always yields the same order, in any process, after any restart.
    """

    def __init__(self, lengths: Sequence[int], group_size: int, seed: int, group_by_length: bool = True):
        self.lengths = list(lengths)
        self.group_size = group_size
        self.seed = seed
        self.group_by_length = group_by_length
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        if not self.group_by_length:
            return iter(torch.randperm(len(self.lengths), generator=generator).tolist())
        return iter(length_grouped_indices(self.lengths, self.group_size, generator))


def longest_first(lengths: Sequence[int]) -> list[int]:
    """Evaluation order: the least padding per batch, and a summed loss does not depend on order."""
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])


# --------------------------------------------------------------------------- trainer


@dataclass
class RunProgress:
    """Counters that survive a resume (stored in each checkpoint's completion marker)."""

    supervised_tokens_seen: int = 0
    train_seconds: float = 0.0  # forward/backward/optimizer time, without evaluation and checkpoint saving
    eval_seconds: float = 0.0
    save_seconds: float = 0.0
    session_start: float | None = field(default=None, repr=False)
    seconds_before_session: float = 0.0

    def current_train_seconds(self) -> float:
        if self.session_start is None:
            return self.seconds_before_session
        elapsed = time.perf_counter() - self.session_start - self.eval_seconds - self.save_seconds
        return self.seconds_before_session + elapsed

    def to_marker(self) -> dict[str, Any]:
        return {"supervised_tokens_seen": self.supervised_tokens_seen, "train_seconds": self.current_train_seconds()}

    def restore(self, marker: dict[str, Any]) -> None:
        self.supervised_tokens_seen = int(marker.get("supervised_tokens_seen", 0))
        self.seconds_before_session = float(marker.get("train_seconds", 0.0))


class _ClockCallback(TrainerCallback):
    def __init__(self, progress: RunProgress, memory: PeakMemory):
        self.progress = progress
        self.memory = memory

    def on_train_begin(self, args, state, control, **kwargs):
        self.progress.session_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.memory.sample()


class SFTTrainer(Trainer):
    """``Trainer`` with response-token loss on labelled positions only and resume-exact data order."""

    def __init__(self, *args, train_lengths: Sequence[int], eval_lengths: Sequence[int] | None = None,
                 group_by_length: bool = True, memory: PeakMemory | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.train_lengths = list(train_lengths)
        self.eval_lengths = list(eval_lengths or [])
        self.group_by_length = group_by_length
        self.progress = RunProgress()
        self.memory = memory or PeakMemory(self.args.device)
        self.logits_mask = supports_logits_mask(self.model)
        # Our compute_loss normalises by num_items_in_batch itself, so make the Trainer always count
        # it (over labels[..., 1:], as a causal LM's shifted loss needs), for any model.
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True
        self.add_callback(_ClockCallback(self.progress, self.memory))

    # --- data order -----------------------------------------------------------------------
    def _get_train_sampler(self, train_dataset=None):
        group = self.args.train_batch_size * self.args.gradient_accumulation_steps
        return SeededLengthGroupedSampler(self.train_lengths, group, self.args.seed, self.group_by_length)

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

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if num_items is not None:  # global count of labelled tokens for this optimizer step
            self.progress.supervised_tokens_seen += int(num_items)
        return batches, num_items

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

    def restore_final_checkpoint(self, checkpoint: Path) -> None:
        """Adapter weights and trainer state of a run's last checkpoint, for writing its outputs."""
        self._load_from_checkpoint(str(checkpoint))
        self.state = TrainerState.load_from_json(str(Path(checkpoint) / TRAINER_STATE_NAME))

    def _save_checkpoint(self, model, trial):
        started = time.perf_counter()
        super()._save_checkpoint(model, trial)
        self.progress.save_seconds += time.perf_counter() - started


# --------------------------------------------------------------------------- output dir and resume


def _holds_run(output_dir: Path, config_filename: str = CONFIG_FILENAME) -> bool:
    return ((output_dir / config_filename).is_file() or (output_dir / "adapter_config.json").is_file()
            or bool(checkpoints.list_checkpoints(output_dir)))


def _config_differences(config, saved: dict[str, Any]) -> list[str]:
    current = dataclasses.asdict(config)
    return [f"{key} (run: {saved.get(key)!r}, now: {value!r})" for key, value in current.items()
            if key not in RESUME_FREE_KEYS and saved.get(key) != value]


def _saved_config(output_dir: Path, config_filename: str = CONFIG_FILENAME) -> dict[str, Any] | None:
    import json

    path = output_dir / config_filename
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))["config"]
    except (ValueError, KeyError):
        raise UserError(f"{path} is unreadable: cannot check what run {output_dir} holds") from None


def prepare_output_dir(config: SFTConfig, log: Callable[[str], None] = say,
                       config_filename: str = CONFIG_FILENAME) -> Path | None:
    """Refuse to mix runs; return the checkpoint to resume from (None = start fresh).

    Only rank 0 checks and deletes; every rank picks the same checkpoint, because only marked
    (complete) checkpoints are ever chosen and rank 0 deletes only unmarked ones.
    """
    output_dir = Path(config.output_dir)
    if not is_main_process():
        # Rank 0 judges the directory (other ranks would see the config it has just written and
        # take it for another run); if it refuses, the launcher stops every process.
        return checkpoints.latest_complete_checkpoint(output_dir) if config.resume else None
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"output_dir {output_dir} is a file")
    holds_run = output_dir.is_dir() and _holds_run(output_dir, config_filename)
    if config.resume:
        return _resume_point(config, output_dir, holds_run, log, config_filename)
    if holds_run and not config.overwrite_output_dir:
        raise UserError(f"{output_dir} already holds a training run: pass --resume to continue it, "
                        "--overwrite_output_dir to start over, or choose another --output_dir")
    if holds_run:
        old = checkpoints.list_checkpoints(output_dir)
        if old:
            log(f"--overwrite_output_dir: removing {len(old)} checkpoint(s) of the previous run in {output_dir}")
        for path in old:
            checkpoints.remove_checkpoint(path)
    return None


def _resume_point(config: SFTConfig, output_dir: Path, holds_run: bool, log: Callable[[str], None],
                  config_filename: str = CONFIG_FILENAME) -> Path | None:
    if not holds_run:
        raise UserError(f"--resume: {output_dir} holds no run to resume (drop --resume to start one)")
    saved = _saved_config(output_dir, config_filename)
    if saved is not None:
        differences = _config_differences(config, saved)
        if differences:
            raise UserError("--resume with a config that differs from the run's: " + "; ".join(differences)
                            + " (resume with the same settings, or start over with --overwrite_output_dir)")
    checkpoints.remove_incomplete_checkpoints(output_dir, log=log)
    latest = checkpoints.latest_complete_checkpoint(output_dir)
    if latest is None:
        log(f"--resume: no complete checkpoint in {output_dir} yet: training from the start")
    else:
        log(f"resuming from {latest}")
    return latest


# --------------------------------------------------------------------------- trainer construction


def training_arguments(config: SFTConfig, plan: ModelPlan, *, resuming: bool, has_eval: bool,
                       args_class: type = TrainingArguments, **extra: Any) -> TrainingArguments:
    """TrainingArguments from the config (names match one-to-one where they exist)."""
    return args_class(  # DPO passes TRL's DPOConfig (a TrainingArguments) and its own keys in extra
        output_dir=config.output_dir,
        per_device_train_batch_size=config.per_device_train_batch_size,
        per_device_eval_batch_size=config.per_device_eval_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        num_train_epochs=config.num_train_epochs,
        max_steps=config.max_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler_type,
        warmup_steps=config.warmup_ratio,  # a float below 1 is a fraction of the total steps
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        optim=config.optim,
        seed=config.seed,
        data_seed=config.seed,
        bf16=plan.precision == "bf16",
        fp16=plan.precision == "fp16",  # GradScaler; LoRA weights stay fp32 master copies
        use_cpu=plan.device.type == "cpu",
        # Non-reentrant checkpointing needs no "inputs require grad" hack with frozen embeddings.
        activation_checkpointing=config.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if config.gradient_checkpointing else None,
        logging_steps=config.logging_steps,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=config.eval_steps,
        eval_on_start=has_eval and not resuming,  # validation loss before training (kept in the log history)
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=None,  # rotation happens after a checkpoint is marked complete (sft/checkpoints.py)
        report_to=config.report_to or "none",
        include_num_input_tokens_seen="non_padding",
        label_names=["labels"],
        dataloader_num_workers=0,
        dataloader_pin_memory=plan.device.type == "cuda",
        ddp_find_unused_parameters=False,  # every LoRA weight gets a gradient in every step
        disable_tqdm=False,
        **extra,
    )


def build_trainer(config: SFTConfig, model, tokenizer, datasets, plan: ModelPlan, *,
                  resuming: bool = False, callbacks: Sequence[TrainerCallback] = ()) -> SFTTrainer:
    from sft.dataset import SFTDataCollator

    has_eval = datasets.val is not None and len(datasets.val) > 0
    args = training_arguments(config, plan, resuming=resuming, has_eval=has_eval)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=datasets.train,
        eval_dataset=datasets.val if has_eval else None,
        data_collator=SFTDataCollator(tokenizer.pad_token_id, pad_to_multiple_of=config.pad_to_multiple_of),
        processing_class=tokenizer,
        train_lengths=datasets.train["length"],
        eval_lengths=datasets.val["length"] if has_eval else None,
        group_by_length=config.group_by_length,
        memory=PeakMemory(plan.device),
        callbacks=list(callbacks),
    )
    trainer.add_callback(checkpoints.CheckpointCompletionCallback(config.save_total_limit, trainer.progress.to_marker))
    return trainer


# --------------------------------------------------------------------------- the run


def run_sft(argv: Sequence[str] | None, *, preset: str, plan_model: Callable[[SFTConfig], ModelPlan],
            prog: str, description: str, entry_point: str = "",
            callbacks: Sequence[TrainerCallback] = ()) -> int:
    """Everything both entry points do; ``plan_model`` is the only part that differs."""
    session_start = time.perf_counter()
    from sft.dataset import check_data_files, ensure_pad_token, load_sft_datasets

    config = parse_sft_config(argv, preset=preset, prog=prog, description=description)
    plan = plan_model(config)
    check_data_files(config)
    resume_from = prepare_output_dir(config)
    say(describe(config))
    say(f"device: {plan.device} ({plan.precision}){' - ' + plan.description if plan.description else ''}")
    if is_main_process():
        save_sft_config(config, config.output_dir, preset=preset,
                        extra={"entry_point": entry_point or prog, "world_size": int(os.environ.get("WORLD_SIZE", "1"))})

    tokenizer = load_tokenizer(config.model_name_or_path, config.tokenizer_name_or_path, config.trust_remote_code)
    ensure_pad_token(tokenizer)
    datasets = load_sft_datasets(config, tokenizer, log=say)  # prints its own one-line summary
    model = plan.load(config)
    say(trainable_parameter_summary(model))

    trainer = build_trainer(config, model, tokenizer, datasets, plan, resuming=resume_from is not None,
                            callbacks=callbacks)
    if resume_from is not None:
        trainer.progress.restore(checkpoints.read_marker(resume_from) or {})
    train_or_finish(trainer, resume_from)
    finish_run(config, trainer, datasets.stats, plan, preset=preset, resumed_from=resume_from,
               session_seconds=time.perf_counter() - session_start)
    return 0


def checkpoint_is_final(checkpoint: Path) -> bool:
    """True when a checkpoint was written at the run's last optimizer step."""
    state = TrainerState.load_from_json(str(Path(checkpoint) / TRAINER_STATE_NAME))
    return state.max_steps > 0 and state.global_step >= state.max_steps


def train_or_finish(trainer, resume_from: Path | None) -> None:
    """Train (from ``resume_from`` if given), or only restore a checkpoint that is already the last
    step, then evaluate the final step; shared by the SFT and DPO runs."""
    if resume_from is not None and checkpoint_is_final(resume_from):
        # transformers would run one step past max_steps when resuming here; the run is done.
        say(f"{resume_from.name} is the run's last step: writing its outputs without training further")
        trainer.restore_final_checkpoint(resume_from)
    else:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    _evaluate_final_step(trainer)


def _evaluate_final_step(trainer) -> None:
    """Make sure the log ends with a validation loss at the final step (eval_steps may not divide it)."""
    if trainer.eval_dataset is None:
        return
    evaluated = {step for step, _ in loss_points(trainer.state.log_history, "eval_loss")}
    if trainer.state.global_step not in evaluated:
        trainer.evaluate()


def run_metrics(trainer: SFTTrainer, data_stats: dict, plan: ModelPlan, *, resumed_from: Path | None,
                session_seconds: float) -> dict[str, Any]:
    state, progress = trainer.state, trainer.progress
    train = loss_points(state.log_history, "loss")
    evals = loss_points(state.log_history, "eval_loss")
    seconds = progress.current_train_seconds()
    return {
        "global_step": state.global_step,
        "epoch": state.epoch,
        "val_loss_before": evals[0][1] if evals and evals[0][0] == 0 else None,
        "val_loss_after": evals[-1][1] if evals else None,
        "train_loss_first_logged": train[0][1] if train else None,
        "train_loss_last_logged": train[-1][1] if train else None,
        "train_tokens_seen": int(state.num_input_tokens_seen),
        "supervised_tokens_seen": progress.supervised_tokens_seen,
        "train_seconds": seconds,
        "train_tokens_per_second": state.num_input_tokens_seen / seconds if seconds > 0 else None,
        "supervised_tokens_per_second": progress.supervised_tokens_seen / seconds if seconds > 0 else None,
        "eval_seconds_this_session": progress.eval_seconds,
        "checkpoint_seconds_this_session": progress.save_seconds,
        "wall_time_seconds_this_session": session_seconds,
        **trainer.memory.report(),
        "device": str(plan.device),
        "precision": plan.precision,
        "world_size": trainer.args.world_size,
        "logits_only_at_labelled_positions": trainer.logits_mask,
        "resumed_from": resumed_from.name if resumed_from else None,
        "tokens_note": ("train_tokens_seen counts non-padding tokens (prompt + response) of all processes; "
                        "supervised_tokens_seen counts tokens that carry a loss; per-second figures divide by "
                        "train_seconds, which excludes evaluation and checkpoint writing"),
        "data": data_stats,
    }


def finish_run(config: SFTConfig, trainer: SFTTrainer, data_stats: dict, plan: ModelPlan, *, preset: str,
               resumed_from: Path | None, session_seconds: float) -> dict[str, Any]:
    """Write the adapter, tokenizer, trainer_state.json, metrics.json, loss_curve.png and README.md."""
    output_dir = Path(config.output_dir)
    trainer.save_model(str(output_dir))  # adapter (safetensors) + tokenizer; rank 0 only
    trainer.save_state()
    metrics = run_metrics(trainer, data_stats, plan, resumed_from=resumed_from, session_seconds=session_seconds)
    if trainer.is_world_process_zero():
        write_metrics(output_dir / METRICS_FILENAME, metrics)
        plot_loss_curve(trainer.state.log_history, output_dir / LOSS_CURVE_FILENAME,
                        title=f"SFT of {Path(config.model_name_or_path).name}")
        write_model_card(output_dir / "README.md", f"LoRA SFT adapter for {config.model_name_or_path}",
                         model_card_sections(config, metrics, preset, output_dir))
        say(summary_line(metrics, output_dir))
    return metrics


def summary_line(metrics: dict[str, Any], output_dir: Path) -> str:
    def fmt(value, spec=".4f"):
        return format(value, spec) if isinstance(value, (int, float)) else "n/a"

    return (f"done: {metrics['global_step']} steps, val loss {fmt(metrics['val_loss_before'])} -> "
            f"{fmt(metrics['val_loss_after'])}, {fmt(metrics['train_tokens_per_second'], '.0f')} tokens/s, "
            f"peak memory {metrics['peak_memory_mb']} MiB; outputs in {output_dir}")


def _from_pretrained_args(model_name_or_path: str) -> str:
    """How a user's own code loads this base: a GGUF file needs its directory plus ``gguf_file=``."""
    source = resolve_model_source(model_name_or_path)
    return f"{source.path!r}, gguf_file={source.gguf_file!r}" if source.gguf_file else repr(source.path)


def model_card_sections(config: SFTConfig, metrics: dict[str, Any], preset: str, output_dir: Path) -> dict[str, str]:
    quant = f"4-bit {config.bnb_4bit_quant_type} base (QLoRA)" if config.load_in_4bit else "full-precision base"
    how = (f"Supervised fine-tuning of `{config.model_name_or_path}` with LoRA (r={config.lora_r}, "
           f"alpha={config.lora_alpha}, dropout={config.lora_dropout}) on {', '.join(config.lora_target_modules)}; "
           f"{quant}, {metrics['precision']} compute on {metrics['device']} (preset `{preset}`). "
           f"Data: `{config.train_file}` (validation `{config.val_file}`), prompt template `{config.template}`, "
           f"loss on {'prompt and response' if config.train_on_inputs else 'response tokens only'}, "
           f"max_seq_length {config.max_seq_length}. {metrics['global_step']} optimizer steps, learning rate "
           f"{config.learning_rate} ({config.lr_scheduler_type}), effective batch "
           f"{config.per_device_train_batch_size * config.gradient_accumulation_steps * metrics['world_size']}, "
           f"seed {config.seed}. The full config is in `sft_config.json`.")
    results = format_table({
        "validation loss before": metrics["val_loss_before"], "validation loss after": metrics["val_loss_after"],
        "tokens seen (non-padding)": metrics["train_tokens_seen"], "supervised tokens": metrics["supervised_tokens_seen"],
        "tokens/s": metrics["train_tokens_per_second"], "peak memory (MiB)": metrics["peak_memory_mb"],
    })
    load = ("```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f"base = AutoModelForCausalLM.from_pretrained({_from_pretrained_args(config.model_name_or_path)})\n"
            f"model = PeftModel.from_pretrained(base, {str(output_dir)!r})\n"
            f"tokenizer = AutoTokenizer.from_pretrained({str(output_dir)!r})\n```\n\n"
            "Prompt with the template saved in `sft_config.json`. To get a standalone model:\n"
            f"`python scripts/merge_adapter.py --adapter_dir {output_dir} --out_dir MERGED_DIR`.")
    files = ("`adapter_model.safetensors` + `adapter_config.json` (LoRA adapter), tokenizer files, "
             "`sft_config.json` (resolved config and template), `trainer_state.json` (log history), "
             "`metrics.json`, `loss_curve.png`, `runs/` (TensorBoard), `checkpoint-*/` (resumable checkpoints).")
    return {"How it was trained": how, "Results": results, "How to load it": load, "Files": files}


def mac_device(config, cuda_command: str) -> torch.device:
    """MPS if present, else the CPU (said in one line); shared by the SFT and DPO Mac entry points."""
    from sft.modeling import mps_available

    if config.load_in_4bit:
        raise UserError(f"load_in_4bit needs bitsandbytes on a CUDA GPU: use {cuda_command}")
    if mps_available():
        return torch.device("mps")
    say("MPS not available: training on CPU")
    return torch.device("cpu")


def cuda_device(config, mac_command: str) -> tuple[torch.device, int]:
    """This process's GPU (LOCAL_RANK under torchrun/accelerate) and its index; one-line errors without CUDA/bitsandbytes."""
    from sft.modeling import require_bitsandbytes

    if not torch.cuda.is_available():
        raise UserError(f"no CUDA GPU found: on a Mac or a CPU-only machine use {mac_command}", exit_code=2)
    if config.load_in_4bit:
        require_bitsandbytes()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return torch.device("cuda", local_rank), local_rank


def adapter_kind(config) -> str:
    """How the run's model is adapted, for the log: QLoRA on a 4-bit base or plain LoRA."""
    return f"QLoRA ({config.bnb_4bit_quant_type} 4-bit base)" if config.load_in_4bit else "LoRA"


def lora_plan_for_device(device: torch.device, precision: str, *, load_in_4bit: bool = False,
                         device_map: Any = None, description: str = "") -> ModelPlan:
    """A plan that loads the base in ``precision`` (or 4-bit with that compute dtype) and adds LoRA."""
    from sft.modeling import torch_dtype

    dtype = torch_dtype(precision)

    def load(config: SFTConfig):
        return build_lora_model(config, dtype=dtype, device_map=device_map, load_in_4bit=load_in_4bit)

    return ModelPlan(device=device, precision=precision, load=load, description=description)
