"""What each bar of an evaluation's charts draws: value, 95% interval and n, from the entries the report prints.

``evaluation/charts.py`` draws these numbers and nothing else, so a chart cannot disagree with the report:

* IF accuracy (the four numbers): the ``comparisons`` section's per-column entry, the one the report's
  headline table prints with its interval (percentile bootstrap over prompts; instruction-level
  clustered by prompt); without that section (one column), prompt-level shares get the same bootstrap
  over the prompt count and instruction-level ones no interval;
* per instruction type: the type's count and passes of the per-type table, bootstrap over its
  instructions (one per prompt in IFEval, so over prompts);
* validation loss, preference accuracies: the ``comparisons`` entries (per-example and per-pair
  bootstrap); stop rates: the stopped count over the generations (the confounds table's count for
  IF prompts), bootstrap over generations.

An estimate is ``{"value", "low", "high", "n"}`` in the chart's units (percent for shares); ``low`` and
``high`` are None where no interval can be made, and the chart says so.
"""
from __future__ import annotations

from typing import Mapping

from evaluation import stats

IF_KEYS = ("prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose")


def method(document: Mapping) -> tuple[int, int]:
    """(resamples, seed) of the document's comparisons, else the defaults with the evaluation's seed."""
    m = (document.get("comparisons") or {}).get("method") or {}
    seed = m.get("seed", (document.get("settings") or {}).get("seed", stats.DEFAULT_SEED))
    return int(m.get("resamples", stats.DEFAULT_RESAMPLES)), int(seed)


def share_from_count(k: int | None, n: int | None, resamples: int, seed: int) -> dict | None:
    """k of n items (in %) with the percentile bootstrap interval over the n items; None without a count."""
    if k is None or not n:
        return None
    estimate = stats.bootstrap_mean([1.0] * int(k) + [0.0] * (int(n) - int(k)), resamples, seed).scaled(100.0)
    return {"value": estimate.value, "low": estimate.low, "high": estimate.high, "n": int(n)}


def _entry(entry: Mapping | None, n_key: str = "n") -> dict | None:
    if not entry or entry.get("value") is None:
        return None
    return {"value": entry["value"], "low": entry.get("low"), "high": entry.get("high"), "n": entry.get(n_key)}


def _column(document: Mapping, label: str) -> Mapping:
    return ((document.get("comparisons") or {}).get("columns") or {}).get(label) or {}


def if_estimate(document: Mapping, bench: str, label: str, key: str) -> dict | None:
    """One of the four IF numbers of a column (in %)."""
    printed = _entry((_column(document, label).get("benchmarks") or {}).get(bench, {}).get(key))
    if printed is not None:
        return printed
    data = document["instruction_following"][bench]
    summary = data["models"][label]
    share = summary.get(key)
    if share is None:
        return None
    scored = data["prompts"] - summary.get("prompts_unscored", 0)
    if key.startswith("prompt"):
        return share_from_count(round(share * scored), scored, *method(document))
    return bare(100 * share)


def per_type_estimate(document: Mapping, bench: str, label: str, kind: str) -> dict | None:
    """Instruction-level strict accuracy of one type for one column (in %), from its count and passes."""
    entry = document["instruction_following"][bench]["models"][label]["per_type"].get(kind)
    if not entry:
        return None
    return share_from_count(entry["strict_pass"], entry["count"], *method(document))


def bare(value: float | None) -> dict | None:
    """A value without the items to make its interval (the chart names its column as having none)."""
    return None if value is None else {"value": value, "low": None, "high": None, "n": None}


def model_estimate(document: Mapping, label: str, key: str) -> dict | None:
    """A per-model bar: ``val_loss``, ``stop_rate``, ``<bench>_stop_rate``, ``pref_accuracy``, ``logp_accuracy``."""
    metrics = (document.get("models") or {}).get(label) or {}
    column = _column(document, label)
    value = metrics.get(key)
    if key == "val_loss":
        return _entry(column.get("val_loss")) or bare(value)
    share = None if value is None else 100 * value
    if key in ("pref_accuracy", "logp_accuracy"):
        counted = metrics.get(key.replace("_accuracy", "_correct"))
        return (_entry(column.get(key)) or share_from_count(counted, metrics.get("pref_pairs") if counted is not None else None,
                                                            *method(document)) or bare(share))
    if key == "stop_rate":
        n = metrics.get("num_generated")
        return (share_from_count(round(value * n), n, *method(document)) if value is not None and n else None) or bare(share)
    bench = key.removesuffix("_stop_rate")
    confounds = (column.get("confounds") or {}).get(bench)
    if confounds:
        return share_from_count(confounds["stopped"], confounds["responses"], *method(document))
    n = (document.get("instruction_following") or {}).get(bench, {}).get("prompts")
    return (share_from_count(round(value * n), n, *method(document)) if value is not None and n else None) or bare(share)
