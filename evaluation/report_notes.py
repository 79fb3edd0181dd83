"""What the report's answer must say beside the scores: answers cut at the token limit, and each column's budget.

* :func:`truncation_warnings`: a column whose answers mostly hit ``max_new_tokens`` (or never stop with EOS)
  has IF scores that measure truncated text; the answer says so first, from the confounds' counts.
* :func:`training_budget`: what a trained column cost, read from its saved run (``core.runs``: the config
  file, and ``metrics.json``): optimizer steps, epochs over how many examples / pairs / prompts, the
  effective batch, tokens trained where recorded, and the learning rate. A study that trained 60 steps
  is not a study that trained an epoch: the report states it beside the verdicts.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

from core.cli import UserError
from core.runs import read_run
from evaluation.if_sets import IF_SET_NAMES

MOSTLY_CUT_SHARE = 0.5  # more than this share of a column's answers cut at max_new_tokens: its scores get a warning
BENCHMARK_NAMES = {"ifeval": "IFEval", "ifbench": "IFBench", **IF_SET_NAMES}  # how sentences name a benchmark


def truncation_warnings(comparisons: Mapping, name_of) -> list[str]:
    """One warning per column whose answers were mostly cut at the token limit or never stopped with EOS, naming
    each benchmark where that happened (one line a column: a quick study scores four sets per column).

    ``name_of(label)``: how a column is named in sentences ("SFT").
    """
    out = []
    for label, column in comparisons["columns"].items():
        hit = []
        for bench, e in column.get("confounds", {}).items():
            n, cut, stopped = e["responses"], e["cut_at_max_new_tokens"], e["stopped"]
            if n and (cut > MOSTLY_CUT_SHARE * n or stopped == 0):
                hit.append((BENCHMARK_NAMES.get(bench, bench), n, cut, stopped, e["max_new_tokens"]))
        if len(hit) == 1:
            name, n, cut, stopped, limit = hit[0]
            out.append(f"Warning: {cut}/{n} of {name_of(label)}'s {name} answers were cut at {limit} tokens "
                       f"({stopped} stopped with EOS): its {name} scores measure truncated text.")
        elif hit:
            parts = "; ".join(f"{name} {cut}/{n} cut at {limit} tokens, {stopped} stopped with EOS"
                              for name, n, cut, stopped, limit in hit)
            out.append(f"Warning: {name_of(label)}'s answers were mostly cut at the token limit ({parts}): "
                       f"its scores there measure truncated text.")
    return out


def _metrics(run_dir: Path) -> dict:
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return metrics if isinstance(metrics, dict) else {}


def _trained_on(stage: str, metrics: Mapping) -> tuple[int | None, str]:
    """(how many training items, what they are) as the stage's metrics.json records them."""
    train = (metrics.get("data") or {}).get("train") or {}
    if stage == "sft":
        return train.get("emitted"), "examples"
    if "used" in train:
        return train.get("used"), "pairs"
    return (metrics.get("prompts") or {}).get("train"), "prompts"


def training_budget(run_dir: str | Path | None) -> dict | None:
    """A trained column's budget from its saved run; None where ``run_dir`` holds no finished run."""
    if not run_dir:
        return None
    try:
        run = read_run(run_dir)
    except UserError:
        return None
    metrics, config = _metrics(Path(run_dir)), run.config
    items, unit = _trained_on(run.stage, metrics)
    batch = [config.get(k) for k in ("per_device_train_batch_size", "gradient_accumulation_steps")]
    tokens_key = "tokens_sampled_and_prompted" if "tokens_sampled_and_prompted" in metrics else "train_tokens_seen"
    return {"stage": run.stage, "steps": metrics.get("global_step"), "max_steps": config.get("max_steps"),
            "epochs": metrics.get("epoch"), "items": items, "unit": unit,
            "effective_batch": batch[0] * batch[1] * int(metrics.get("world_size") or 1) if all(batch) else None,
            "tokens": metrics.get(tokens_key), "tokens_kind": "sampled and prompted" if tokens_key.startswith("tokens_s")
            else "trained", "learning_rate": config.get("learning_rate")}


def budget_text(budget: Mapping) -> str:
    """``60 optimizer steps (0.25 epochs of 1,926 examples, effective batch 8), 108,937 tokens trained, lr 0.0002``."""
    steps = budget.get("steps")
    parts = [f"{steps if steps is not None else 'n/a'} optimizer steps"]
    over = []
    if budget.get("epochs") is not None and budget.get("items") is not None:
        over.append(f"{budget['epochs']:.2f} epochs of {budget['items']:,} {budget['unit']}")
    elif budget.get("items") is not None:
        over.append(f"{budget['items']:,} {budget['unit']}")
    if budget.get("effective_batch"):
        over.append(f"effective batch {budget['effective_batch']}")
    if over:
        parts[0] += f" ({', '.join(over)})"
    if budget.get("tokens") is not None:
        parts.append(f"{int(budget['tokens']):,} tokens {budget['tokens_kind']}")
    if budget.get("learning_rate") is not None:
        parts.append(f"lr {budget['learning_rate']:g}")
    return ", ".join(parts)


def budget_sentence(budgets: Mapping[str, Mapping], name_of) -> str | None:
    """``Training budgets (from each run's saved config and metrics): SFT: ...; DPO: ...``; None without a trained column."""
    if not budgets:
        return None
    return ("Training budgets (from each run's saved config and metrics): "
            + "; ".join(f"{name_of(label)}: {budget_text(b)}" for label, b in budgets.items()) + ".")
