"""An SFT run that continues another's adapter, for a budget in tokens: the study's matched-compute control.

The control arm (``scripts/study_presets.py``, preset ``study``) is SFT continued from the SFT run's
adapter (``--init_adapter_dir``) on the checker-judged pairs' chosen answers (``--response_key chosen``)
for as many tokens as the DPO arm trained (``--match_tokens_of RUN``, or ``--max_train_tokens N``).

The rule, stated once: a run's trained tokens are the non-padding tokens its training forwards took
(``metrics.json`` ``train_tokens_seen``: prompt and response; for DPO the chosen and the rejected
sequence of each pair, as its policy forwards both every step). The budget sets ``max_steps`` from the
data's mean example length (so the learning-rate schedule ends where the budget does) and stops the
run at the first optimizer step that reaches it; ``metrics.json`` records the budget beside the count.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from transformers import TrainerCallback

from core.cli import UserError
from core.runs import read_run, run_stage


def check_init_adapter(config) -> None:
    """``--init_adapter_dir`` names a finished SFT run on the same base model, trained with the same template."""
    source = Path(config.init_adapter_dir)
    if run_stage(source) != "sft" or not read_run(source, expect="sft").has_adapter:
        raise UserError(f"--init_adapter_dir {source}: no finished SFT run there (adapter_config.json and sft_config.json)")
    run = read_run(source, expect="sft")
    if str(run.base_model) != str(config.model_name_or_path):
        raise UserError(f"--init_adapter_dir {source} was trained on {run.base_model}, not --model_name_or_path "
                        f"{config.model_name_or_path}: pass the same base model")
    if run.template.to_dict() != config.prompt_template().to_dict():
        raise UserError(f"--init_adapter_dir {source} trained with the template {run.template.name!r}: continue it with "
                        f"the same --template (and --system_prompt)")


def tokens_to_train(config) -> int | None:
    """The tokens the run may train on: ``--max_train_tokens``, or the ``train_tokens_seen`` of ``--match_tokens_of``."""
    if config.match_tokens_of is None:
        return config.max_train_tokens
    path = Path(config.match_tokens_of) / "metrics.json"
    try:
        seen = json.loads(path.read_text(encoding="utf-8")).get("train_tokens_seen")
    except (OSError, ValueError):
        raise UserError(f"--match_tokens_of {config.match_tokens_of}: no readable metrics.json there (a finished run's)") from None
    if not isinstance(seen, int) or seen < 1:
        raise UserError(f"--match_tokens_of {config.match_tokens_of}: its metrics.json records no train_tokens_seen")
    return seen


def steps_for_budget(budget: int, lengths, per_step_examples: int) -> int:
    """Optimizer steps whose examples, at the data's mean length, hold ``budget`` tokens (at least one)."""
    mean = sum(lengths) / max(1, len(lengths))
    return max(1, math.ceil(budget / max(1e-9, mean * per_step_examples)))


class StopAtTokenBudget(TrainerCallback):
    """Stops training (with a checkpoint) at the first optimizer step whose tokens seen reach the budget."""

    def __init__(self, budget: int):
        self.budget = budget

    def on_step_end(self, args, state, control, **kwargs):
        if state.num_input_tokens_seen >= self.budget:
            control.should_training_stop = True
            control.should_save = True
        return control


def budget_metrics(budget: int | None, config, planned_steps: int | None) -> dict:
    """What metrics.json says of the budget (nothing without one)."""
    if budget is None:
        return {}
    return {"token_budget": budget, "token_budget_from": config.match_tokens_of or "--max_train_tokens",
            "max_steps_for_budget": planned_steps,
            "token_budget_note": "train_tokens_seen reaches token_budget at the step the run stopped (it may pass it by "
                                 "less than one step's tokens), or falls short where max_steps_for_budget (from the mean "
                                 "example length) ran out first"}
