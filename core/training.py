"""Run scaffolding every training stage shares: device plans, TrainingArguments, data order, train-or-finish.

The stages (``sft/``, ``dpo/``, ``rlhf/``) each wire a Trainer with these pieces; they differ in
their loss and their data, not in how a run is started, ordered, checkpointed or resumed.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import Sampler
from transformers import TrainerCallback, TrainerState, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME

from core.cli import TrainingInterrupted, UserError
from core.log import say
from core.modeling import (load_4bit_model, load_base_model, mps_available, precision_reason, require_bitsandbytes,
                           torch_dtype)


# --------------------------------------------------------------------------- devices


@dataclass(frozen=True)
class DevicePlan:
    """What an entry point decided about the hardware: where the model runs and how the base is loaded."""

    device: torch.device
    precision: str  # fp32 | bf16 | fp16, already checked against the device
    load_in_4bit: bool = False
    device_map: Any = None
    description: str = ""
    precision_reason: str = "given"  # or auto's reason (on the CPU: the bf16 feature and measured matmul rates)

    def line(self) -> str:
        return f"device: {self.device} ({self.precision}){' - ' + self.description if self.description else ''}"


def adapter_kind(config) -> str:
    """How the run's model is adapted, for the log: QLoRA on a 4-bit base or plain LoRA."""
    return f"QLoRA ({config.bnb_4bit_quant_type} 4-bit base)" if config.load_in_4bit else "LoRA"


def plan_mac(config, cuda_command: str) -> DevicePlan:
    """MPS if present, else the CPU (said in one line); the base in full precision."""
    from core.modeling import resolve_precision

    if config.load_in_4bit:
        raise UserError(f"load_in_4bit needs bitsandbytes on a CUDA GPU: use {cuda_command}")
    if mps_available():
        device = torch.device("mps")
    else:
        if sys.platform == "darwin":  # a Mac without MPS is a surprise worth a line; elsewhere the CPU is the plan
            say("MPS not available: training on CPU")
        device = torch.device("cpu")
    return DevicePlan(device, resolve_precision(config.precision, device), description="LoRA",
                      precision_reason=precision_reason(config.precision, device))


def plan_cuda(config, mac_command: str) -> DevicePlan:
    """This process's GPU (LOCAL_RANK under torchrun/accelerate); one-line errors without CUDA/bitsandbytes."""
    from core.modeling import resolve_precision

    if not torch.cuda.is_available():
        raise UserError(f"no CUDA GPU found: on a Mac or a CPU-only machine use {mac_command}", exit_code=2)
    if config.load_in_4bit:
        require_bitsandbytes()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank)
    return DevicePlan(device, resolve_precision(config.precision, device), load_in_4bit=config.load_in_4bit,
                      device_map={"": local_rank}, description=adapter_kind(config),
                      precision_reason=precision_reason(config.precision, device))


def load_base_for(config, model_name_or_path: str, plan: DevicePlan):
    """The frozen base model as the plan says: 4-bit (QLoRA) or full precision, on the plan's device map."""
    dtype = torch_dtype(plan.precision)
    if plan.load_in_4bit:
        return load_4bit_model(model_name_or_path, compute_dtype=dtype, device_map=plan.device_map,
                               quant_type=config.bnb_4bit_quant_type, double_quant=config.bnb_4bit_use_double_quant,
                               trust_remote_code=config.trust_remote_code)
    return load_base_model(model_name_or_path, dtype=dtype, device_map=plan.device_map,
                           trust_remote_code=config.trust_remote_code)


# --------------------------------------------------------------------------- arguments


def effective_optim(optim: str, device: torch.device) -> str:
    """``adamw_torch`` runs fused on a CUDA GPU: the same AdamW update in one kernel launch instead
    of one per LoRA tensor (~150 small tensors in a 22-layer model). Other names are kept as given."""
    return "adamw_torch_fused" if optim == "adamw_torch" and torch.device(device).type == "cuda" else optim


def training_arguments(config, plan: DevicePlan, *, resuming: bool, has_eval: bool,
                       args_class: type = TrainingArguments, **extra: Any) -> TrainingArguments:
    """TrainingArguments from the config (names match one-to-one where they exist).

    DPO passes TRL's DPOConfig (a TrainingArguments) as ``args_class`` and its own keys in ``extra``;
    a key in ``extra`` also overrides a shared default below (RLOO counts its own tokens, for one).
    """
    shared: dict[str, Any] = dict(
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
        optim=effective_optim(config.optim, plan.device),
        torch_compile=bool(getattr(config, "torch_compile", False)),
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
        eval_on_start=has_eval and not resuming,  # validation before training (kept in the log history)
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=None,  # rotation happens after a checkpoint is marked complete (core/checkpoints.py)
        report_to=config.report_to or "none",
        include_num_input_tokens_seen="non_padding",
        label_names=["labels"],
        dataloader_num_workers=0,
        dataloader_pin_memory=plan.device.type == "cuda",
        ddp_find_unused_parameters=False,  # every LoRA weight gets a gradient in every step
        disable_tqdm=False,
        # The NaN/inf filter reads the loss on the host after every forward (a device sync per
        # micro-batch); without it a NaN shows in the logged loss instead of being averaged away.
        logging_nan_inf_filter=False,
    )
    return args_class(**{**shared, **extra})


# --------------------------------------------------------------------------- data order


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


# --------------------------------------------------------------------------- clocks


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


class ClockCallback(TrainerCallback):
    """Starts the run's training clock and samples peak memory after each step."""

    def __init__(self, memory, progress: RunProgress | None = None):
        self.progress = progress
        self.memory = memory

    def on_train_begin(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.session_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.memory.sample()


def watch_run(trainer, plan: DevicePlan, save_total_limit: int | None) -> None:
    """A TRL-based stage's trainer gets what ours has built in: peak memory sampled each step, and
    crash-safe checkpoints (marked complete, then rotated to ``save_total_limit``)."""
    from core import checkpoints
    from core.reporting import PeakMemory

    trainer.memory = PeakMemory(plan.device)
    trainer.add_callback(ClockCallback(trainer.memory))
    trainer.add_callback(checkpoints.CheckpointCompletionCallback(save_total_limit))


# --------------------------------------------------------------------------- train or finish


def run_facts(trainer, plan: DevicePlan, *, resumed_from: Path | None, session_seconds: float) -> dict[str, Any]:
    """What every stage's metrics.json records about how the run ran (time, memory, device, resume)."""
    return {
        "wall_time_seconds_this_session": session_seconds,
        **trainer.memory.report(),
        "device": str(plan.device),
        "precision": plan.precision,
        "precision_reason": plan.precision_reason,
        "world_size": trainer.args.world_size,
        "resumed_from": resumed_from.name if resumed_from else None,
    }


def checkpoint_state(checkpoint: Path) -> TrainerState:
    return TrainerState.load_from_json(str(Path(checkpoint) / TRAINER_STATE_NAME))


def checkpoint_is_final(checkpoint: Path, max_steps: int | None = None) -> bool:
    """True when a checkpoint was written at the run's last optimizer step.

    ``max_steps`` (the config's, when > 0) wins over the one the checkpoint was trained towards,
    so ``--resume --max_steps 120`` continues a finished 100-step run.
    """
    state = checkpoint_state(checkpoint)
    target = max_steps if max_steps and max_steps > 0 else state.max_steps
    return target > 0 and state.global_step >= target


def restore_final_checkpoint(trainer, checkpoint: Path) -> None:
    """Adapter weights and trainer state of a run's last checkpoint, for writing its outputs."""
    trainer._load_from_checkpoint(str(checkpoint))
    trainer.state = checkpoint_state(checkpoint)


def train_or_finish(trainer, resume_from: Path | None) -> None:
    """Train (from ``resume_from`` if given), or only restore a checkpoint that is already the last
    step, then evaluate the final step."""
    if resume_from is not None and checkpoint_is_final(resume_from, trainer.args.max_steps):
        # transformers would run one step past max_steps when resuming here; the run is done.
        say(f"{resume_from.name} is the run's last step: writing its outputs without training further")
        restore_final_checkpoint(trainer, resume_from)
    else:
        from core.schedule import ReplannedSchedule, WarmupFromFirstStep

        trainer.add_callback(WarmupFromFirstStep())  # the first step trains at lr > 0 (before a re-plan reads the rates)
        if resume_from is not None:  # --max_steps changed on --resume: the schedule is re-planned (core/schedule.py)
            trainer.add_callback(ReplannedSchedule(checkpoint_state(resume_from).max_steps))
        try:
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        except KeyboardInterrupt:
            # Ctrl-C: say which checkpoint survived (core.cli.run_cli prints how to continue from it)
            from core.checkpoints import latest_complete_checkpoint

            output_dir = trainer.args.output_dir
            raise TrainingInterrupted(output_dir, latest_complete_checkpoint(output_dir)) from None
    _evaluate_final_step(trainer)


def _evaluate_final_step(trainer) -> None:
    """Make sure the log ends with a validation loss at the final step (eval_steps may not divide it)."""
    from core.reporting import loss_points

    if trainer.eval_dataset is None:
        return
    evaluated = {step for step, _ in loss_points(trainer.state.log_history, "eval_loss")}
    if trainer.state.global_step not in evaluated:
        trainer.evaluate()
