"""What a run prints: one line per launch (:func:`say`, rank 0 only) and a readable line per Trainer log.

Light on purpose (no torch at import): entry points, the schedule note and every stage print through it.
"""
from __future__ import annotations

import os
import sys
from typing import Mapping, Sequence


def is_main_process() -> bool:
    """Rank 0 of a torchrun/accelerate launch (or a plain single process); valid before torch.distributed starts."""
    return int(os.environ.get("RANK", "0")) == 0


def say(message: str) -> None:
    """Print once per launch (rank 0 only), so multi-process logs are not doubled."""
    if is_main_process():
        print(message, flush=True)


# --------------------------------------------------------------------------- readable log lines


def _number(key: str, value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if key.endswith("learning_rate") or key == "lr":
        return f"{value:.2e}"
    if isinstance(value, int) or float(value).is_integer() and abs(value) >= 1000:
        return f"{int(value):,}"
    return f"{value:.4g}"


# Trainer log keys -> what the line says; the Trainer's tokens/s divides by wall time since the start,
# evaluation and checkpoint saving included (the run's final summary divides by training time only).
LOG_NAMES = {"learning_rate": "lr", "num_input_tokens_seen": "tokens seen",
             "tokens_per_second": "tokens/s (wall clock, incl. evaluation)",
             "train_tokens_per_second": "tokens/s (wall clock, incl. evaluation)",
             "rewards/accuracies": "reward accuracy", "rewards/margins": "reward margin",
             "rewards/chosen": "reward chosen", "rewards/rejected": "reward rejected"}
LOG_HIDDEN = ("total_flos", "epoch", "train_runtime", "step", "pairs", "pairs_correct")
# A share of pairs is printed as the count it is (12/13 = 0.923) where the log carries the counts.
PAIR_ACCURACY_KEYS = ("rewards/accuracies", "accuracy")
EVERY_PAIR_TIES = "n/a (every pair ties)"


def fraction_text(correct: int | None, total: int | None, digits: int = 3) -> str:
    """A share as the count it is: ``12/13 = 0.923`` ("n/a" without pairs)."""
    if correct is None or not total:
        return "n/a"
    return f"{correct}/{total} = {correct / total:.{digits}f}"


def pair_accuracy_text(correct: int | None, pairs: int | None, mean_chosen=None, mean_rejected=None) -> str | None:
    """A reward accuracy over pairs as every line prints it (a log line, a run's summary, its model card):
    "n/a (every pair ties)" where every reward is 0 (DPO before its first step: policy and reference are one
    model, and TRL would count each tie as wrong: 0/10), else ``12/13 = 0.923``; None without the counts."""
    if mean_chosen == 0 and mean_rejected == 0:
        return EVERY_PAIR_TIES
    if isinstance(correct, int) and isinstance(pairs, int) and pairs:
        return fraction_text(correct, pairs)
    return None


# RLOO's KL to the reference is TRL's per-token estimate over sampled tokens: sampling noise can make it slightly
# negative. Every line that prints it (log lines, the run's summary, the study report) goes through kl_text.
KL_NOTE = "sampling estimate; ~0 means the policy has not moved"


def kl_text(value, sign: bool = False) -> str:
    """A KL estimate in scientific notation, 3 significant digits: ``2.70e-02``, ``-7.13e-05``, ``0.00e+00``
    (never a "-0.0000" that a fixed 4 decimals make of a tiny negative estimate); ``sign``: ``+1.20e-03``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "n/a"
    value = float(value) + 0.0  # -0.0 -> 0.0
    return f"{value:+.2e}" if sign and value else f"{value:.2e}"


def _value(key: str, name: str, value, logs: dict, prefix: str) -> str:
    if name == "kl":
        return kl_text(value)
    if name in PAIR_ACCURACY_KEYS:
        text = pair_accuracy_text(logs.get(f"{prefix}pairs_correct"), logs.get(f"{prefix}pairs"),
                                  logs.get(f"{prefix}rewards/chosen"), logs.get(f"{prefix}rewards/rejected"))
        if text is not None:
            return text
    k, n = logs.get(f"{key}_k"), logs.get(f"{key}_n")  # a rate logged with its counts (RLVR's pass rates)
    if isinstance(k, int) and isinstance(n, int) and n:
        return f"{k}/{n} = {k / n:.3f}"
    return _number(key, value)


def _fields(logs: dict, prefix: str = "", shown: Sequence[str] | Mapping[str, str] | None = None) -> str:
    """``name value`` pairs of the log; ``shown``: only these keys (without ``eval_``), in this order
    (a mapping also gives each its name in the line)."""
    items = [(k, k.removeprefix(prefix), v) for k, v in logs.items()
             if k not in LOG_HIDDEN and k.removeprefix(prefix) not in LOG_HIDDEN and k.startswith(prefix)
             and not (prefix and k.endswith(("_per_second", "_runtime")))]
    if shown is not None:
        order = {name: i for i, name in enumerate(shown)}
        items = sorted((item for item in items if item[1] in order), key=lambda item: order[item[1]])
    names = {**LOG_NAMES, **(shown if isinstance(shown, Mapping) else {})}
    return ", ".join(f"{names.get(name, name)} {_value(k, name, v, logs, prefix)}" for k, name, v in items)


def log_line(step: int, max_steps: int, logs: dict, shown: Sequence[str] | Mapping[str, str] | None = None) -> str:
    """One readable line per Trainer log: ``step 10/100 (epoch 0.03): loss 3.58, lr 2.00e-04, ...``.

    ``shown``: the keys a stage prints (None: every key); the JSON log and TensorBoard keep them all.
    """
    where = f"step {step}/{max_steps}" if max_steps > 0 else f"step {step}"
    if "train_loss" in logs:  # the Trainer's end-of-run summary
        runtime = logs.get("train_runtime")
        wall = f" in {runtime:.1f} s wall clock (evaluation and checkpoint saving included)" if runtime else ""
        return f"{where}: trainer finished{wall}: {_fields(logs)}"
    if any(k.startswith("eval_") for k in logs):
        return f"{where} held-out: {_fields(logs, 'eval_', shown)}"
    epoch = f" (epoch {logs['epoch']:.2f})" if isinstance(logs.get("epoch"), (int, float)) else ""
    return f"{where}{epoch}: {_fields(logs, shown=shown)}"


LOG_FILE_BAR_INTERVAL_S = 30.0  # a training bar written to a file (not a terminal) is redrawn at most this often


def use_readable_log(trainer, shown: Sequence[str] | Mapping[str, str] | None = None) -> None:
    """Replace the Trainer's raw dict print (``{'loss': '3.58', ...}``) with :func:`log_line`
    (``shown``: the keys printed; None = all).

    Where the progress goes to a file or a pipe (``run_study``'s logs/), the evaluation bar nested
    under the training bar is left out (its cursor-up escapes, ``\x1b[A``, garble a log; the held-out
    line says the result) and the training bar is redrawn at most every 30 s.
    """
    from transformers.trainer_callback import ProgressCallback

    class ReadableProgressCallback(ProgressCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            super().on_train_begin(args, state, control, **kwargs)
            if self.training_bar is not None and not sys.stderr.isatty():
                self.training_bar.mininterval = LOG_FILE_BAR_INTERVAL_S

        def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
            if sys.stderr.isatty() or self.training_bar is None:  # alone (no training bar), a bar nests nothing
                super().on_prediction_step(args, state, control, eval_dataloader=eval_dataloader, **kwargs)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and self.training_bar is not None and logs:
                self.training_bar.write(log_line(state.global_step, state.max_steps, logs, shown))

    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(ReadableProgressCallback)
