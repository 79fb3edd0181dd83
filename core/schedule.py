"""The learning-rate schedule: a warm-up whose first step already trains, and ``--resume`` with another
``--max_steps``.

Warm-up (:class:`WarmupFromFirstStep`, every run). Hugging Face's warm-ups rise as ``step / W`` from 0, and the
optimizer step ``k`` trains at the schedule's step ``k - 1``: the first step trained at learning rate 0 (a wasted
step; a quick run's log said ``lr 0.00e+00``). Here the warm-up rises as ``(step + 1) / (W + 1)`` (W = warm-up
steps) and meets the peak at step W as before; every later step is the Trainer's own schedule. A schedule that
does not start at 0 (``constant``) is left as it is.

``--resume`` with another ``--max_steps``.

Extending a finished run (``--resume --max_steps 120`` on a 100-step run) re-plans the schedule over
the new total, as if the run had been planned for 120 steps from its start: the Trainer builds its
schedule from the new ``max_steps`` and restores only the step count. This stays exactly
resumable: the plan depends on the config alone, so an extension that is interrupted and resumed
ends where an uninterrupted one does.

Two things the Trainer does not do, done here (:class:`ReplannedSchedule`):

* the first step after the checkpoint would train at the learning rate the checkpoint saved (0 at
  the end of a linear or cosine decay); it gets the re-planned one;
* nothing is said: one line gives the plan and the learning rates the new steps train at. Near the
  end of a decay those are small (a 100-step cosine run extended to 120 resumes at a few % of the
  peak): for a fresh warm-up and decay, start a new run from the trained weights instead.
"""
from __future__ import annotations

from transformers import TrainerCallback


def _scheduler_name(args) -> str:
    kind = args.lr_scheduler_type
    return getattr(kind, "value", str(kind))


def replanned_rates(lr_scheduler, step: int) -> list[float] | None:
    """The learning rates (one per parameter group) the schedule gives the step after ``step``; None when
    the scheduler is not a per-step ``LambdaLR`` (then its restored state is left as it is)."""
    from torch.optim.lr_scheduler import LambdaLR

    if not isinstance(lr_scheduler, LambdaLR):
        return None
    return [base * schedule(step) for base, schedule in zip(lr_scheduler.base_lrs, lr_scheduler.lr_lambdas)]


def extension_line(args, planned: int, step: int, max_steps: int, first: float, last: float, peak: float) -> str:
    """One line: what the new steps train at, and what to do for a fresh schedule."""
    change = "extending" if max_steps > planned else "shortening"
    return (f"note: {change} a run planned for {planned} steps to {max_steps}: its {_scheduler_name(args)} schedule "
            f"(peak {peak:.2e}) is re-planned over {max_steps} steps, so steps {step + 1}-{max_steps} train at "
            f"{first:.2e} -> {last:.2e} ({100 * first / peak:.0f}% of the peak at first); for a fresh warm-up and "
            "decay, start a new run from the trained weights (SFT: scripts/merge_adapter.py, then --model_name_or_path)")


def _write(message: str) -> None:
    """Print once per launch, above the progress bar (rank 0 only)."""
    from tqdm.auto import tqdm

    from core.log import is_main_process

    if is_main_process():
        tqdm.write(message)


class ReplannedSchedule(TrainerCallback):
    """On a resume whose ``max_steps`` differs from the checkpoint's plan: the re-planned learning rate
    from the first step on, and one line saying so. A resume with the same plan is left untouched."""

    def __init__(self, planned_steps: int, log=_write):
        self.planned_steps = planned_steps
        self.log = log

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        step, total = state.global_step, state.max_steps
        if step == 0 or total == self.planned_steps or optimizer is None or lr_scheduler is None:
            return
        lr_scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate's wrapper holds the real one
        rates = replanned_rates(lr_scheduler, step)
        if rates is None:
            self.log(f"note: the run's plan changed from {self.planned_steps} to {total} steps; its "
                     f"{_scheduler_name(args)} schedule is restored as saved")
            return
        for group, rate in zip(optimizer.param_groups, rates):
            group["lr"] = rate
        lr_scheduler._last_lr = list(rates)  # what the Trainer logs as the step's learning rate
        last = replanned_rates(lr_scheduler, max(step, total - 1))[0]
        self.log(extension_line(args, self.planned_steps, step, total, rates[0], last, lr_scheduler.base_lrs[0]))


def warm_from_first_step(factor, warmup_steps: int):
    """``factor`` (a per-step ``LambdaLR`` multiplier that is 0 at step 0) with a warm-up that is not: steps
    ``0 .. W-1`` get ``factor(W) * (step + 1) / (W + 1)``, later steps ``factor(step)``."""
    def warmed(step: int) -> float:
        if step < warmup_steps:
            return factor(warmup_steps) * (step + 1) / (warmup_steps + 1)
        return factor(step)

    warmed.warms_from_first_step = True  # a function, not an object: LambdaLR's checkpoint state stays as it was
    return warmed


class WarmupFromFirstStep(TrainerCallback):
    """The Trainer's warm-up, moved off 0 at the first step (module docstring); installed before training, and
    again (the same way) on every resume, so a resumed run trains at the rates of an uninterrupted one."""

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        from torch.optim.lr_scheduler import LambdaLR

        scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate's wrapper holds the real one
        warmup = args.get_warmup_steps(state.max_steps) if state.max_steps > 0 else 0
        if optimizer is None or not isinstance(scheduler, LambdaLR) or warmup <= 0:
            return
        factors = scheduler.lr_lambdas
        for i, factor in enumerate(factors):
            if not getattr(factor, "warms_from_first_step", False) and factor(0) == 0:
                factors[i] = warm_from_first_step(factor, warmup)
        step = scheduler.last_epoch  # the schedule's step the next optimizer step trains at (restored on resume)
        rates = [base * factor(step) for base, factor in zip(scheduler.base_lrs, factors)]
        for group, rate in zip(optimizer.param_groups, rates):
            group["lr"] = rate
        scheduler._last_lr = list(rates)
