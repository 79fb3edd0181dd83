"""The learning-rate schedule when ``--resume`` changes how many steps a run has (``--max_steps``).

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
