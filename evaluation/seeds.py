"""Arms over training seeds, and the primary contrasts between arms (Holm-adjusted).

A column named ``<arm>_s<k>`` (``control_s0``, ``dpo_if_s2``) is seed k of arm <arm>; any other column
(``base``, ``sft``) is a single-seed arm named by its label. Per benchmark and IF metric:

* an arm's value is the mean over its seeds of each seed's rate (passed / scored); its interval is a
  two-level bootstrap: each resample draws the arm's seeds with replacement, then the prompts with
  replacement (one prompt draw shared by every seed of the resample), and averages the drawn seeds'
  rates over the drawn prompts;
* a contrast ``arm:reference`` compares, prompt by prompt, the seed-averaged result of the arm with that
  of the reference over the prompts scored in every seed of both: the difference of the two arm values,
  its interval from the same two-level bootstrap (the prompts drawn once for both arms, each arm's seeds
  drawn on their own), and a paired sign-flip permutation test over prompts of the per-prompt
  differences (exact up to 16 non-zero differences, else seeded Monte Carlo); between two single-seed
  arms on a pass/fail metric it is today's exact McNemar test;
* the primary metric is IFEval prompt-level strict; Holm's step-down adjustment runs over exactly the
  declared primary contrasts on it. Every other test is exploratory (uncorrected).
"""
from __future__ import annotations

import re
from typing import Mapping, Sequence

import numpy as np

from core.cli import UserError
from evaluation import stats
from evaluation.number_text import signed

SEED_LABEL = re.compile(r"^(.+)_s(\d+)$")
PRIMARY = ("ifeval", "prompt_strict")
PRIMARY_TEXT = "IFEval prompt-level strict"
METRICS = ("prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose")  # comparisons' order
LEVEL = 0.05


def arm_of(label: str) -> tuple[str, int | None]:
    """``dpo_if_s2`` -> ("dpo_if", 2); ``sft`` -> ("sft", None)."""
    match = SEED_LABEL.match(label)
    return (match.group(1), int(match.group(2))) if match else (label, None)


def arm_columns(labels: Sequence[str]) -> dict[str, list[str]]:
    """Arm -> its column labels, seeds in increasing order; arms in the order their first column appears."""
    out: dict[str, list[str]] = {}
    for label in labels:
        out.setdefault(arm_of(label)[0], []).append(label)
    return {arm: sorted(cols, key=lambda c: arm_of(c)[1] or 0) for arm, cols in out.items()}


def has_seeds(labels: Sequence[str]) -> bool:
    return any(arm_of(label)[1] is not None for label in labels)


def parse_contrasts(text: str | None) -> list[tuple[str, str]]:
    """``"sft:base,dpo_if:control"`` -> [("sft", "base"), ("dpo_if", "control")]; a malformed entry is a ValueError."""
    if not text:
        return []
    out = []
    for entry in text.split(","):
        parts = [part.strip() for part in entry.split(":")]
        if len(parts) != 2 or not all(parts) or parts[0] == parts[1]:
            raise ValueError(f"{entry.strip()!r} is not arm:reference (two different arm names)")
        out.append((parts[0], parts[1]))
    if len(set(out)) != len(out):
        raise ValueError("a contrast is named twice")
    return out


def check_contrasts(contrasts: Sequence[tuple[str, str]], labels: Sequence[str]) -> None:
    """A contrast naming an arm the study lacks: one line, before anything is loaded."""
    arms = arm_columns(labels)
    missing = sorted({arm for pair in contrasts for arm in pair if arm not in arms})
    if missing:
        raise UserError(f"--primary_contrasts: arm(s) {', '.join(missing)} not in this study; its arms: {', '.join(arms)}")


# --------------------------------------------------------------------------- per-prompt tables


def metric_table(items_by_label: Mapping[str, Sequence], labels: Sequence[str], metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(numerators, denominators), each seeds x prompts, of one IF metric; an unscored prompt has 0 / 0."""
    j = METRICS.index(metric)
    rows_num, rows_den = [], []
    for label in labels:
        num, den = [], []
        for item in items_by_label[label]:
            if not item.scored:
                num.append(0.0), den.append(0.0)
                continue
            count = len(item.instructions)
            values = (float(item.strict), float(item.loose), sum(i[1] for i in item.instructions), sum(i[2] for i in item.instructions))
            num.append(float(values[j])), den.append(1.0 if j < 2 else float(count))
        rows_num.append(num), rows_den.append(den)
    return np.array(rows_num, dtype=np.float64), np.array(rows_den, dtype=np.float64)


def _mean_seed_rates(counts: np.ndarray, num: np.ndarray, den: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """Per resample: the mean over its drawn seeds of each drawn seed's rate over its drawn prompts."""
    with np.errstate(divide="ignore", invalid="ignore"):
        rates = (counts @ num.T) / (counts @ den.T)  # resamples x seeds
    return np.take_along_axis(rates, seeds, axis=1).mean(axis=1)


def _interval(values: np.ndarray) -> tuple[float | None, float | None]:
    finite = values[np.isfinite(values)]
    return stats.percentile_interval(finite) if len(finite) else (None, None)


def arm_summary(num: np.ndarray, den: np.ndarray, labels: Sequence[str], resamples: int, seed: int) -> dict:
    """One arm on one metric: per-seed counts, the mean of the seed rates (points) with its two-level interval, the spread."""
    per_seed = [{"column": label, "seed": arm_of(label)[1], "passed": int(n.sum()), "n": int(d.sum())}
                for label, n, d in zip(labels, num, den)]
    rates = [s["passed"] / s["n"] for s in per_seed if s["n"]]
    if len(rates) < len(per_seed) or not rates:
        return {"per_seed": per_seed, "value": None, "low": None, "high": None, "spread": None}
    rng = np.random.default_rng(seed)
    values = np.empty(resamples)
    for start, rows in stats.chunks(resamples):
        counts = stats.draw_counts(rng, rows, num.shape[1])
        picks = rng.integers(0, len(labels), size=(rows, len(labels)))
        values[start:start + rows] = _mean_seed_rates(counts, num, den, picks)
    low, high = _interval(values)
    return {"per_seed": per_seed, "value": 100 * float(np.mean(rates)), "low": None if low is None else 100 * low,
            "high": None if high is None else 100 * high, "spread": 100 * (max(rates) - min(rates)) if len(rates) > 1 else None}


def contrast(arm: tuple[np.ndarray, np.ndarray], reference: tuple[np.ndarray, np.ndarray], binary: bool, resamples: int,
             seed: int) -> dict:
    """Arm minus reference over the prompts scored in every seed of both (points): interval, test, p."""
    (num_a, den_a), (num_b, den_b) = arm, reference
    both = (den_a > 0).all(axis=0) & (den_b > 0).all(axis=0)
    num_a, den_a, num_b, den_b = num_a[:, both], den_a[:, both], num_b[:, both], den_b[:, both]
    n = int(both.sum())
    out: dict = {"n": n, "left_out": int(len(both) - n)}
    if not n:
        return out | {"difference": stats.Estimate(None, None, None, 0).to_dict(), "p": None, "test": None}
    value = float((num_a.sum(axis=1) / den_a.sum(axis=1)).mean() - (num_b.sum(axis=1) / den_b.sum(axis=1)).mean())
    rng = np.random.default_rng(seed)
    values = np.empty(resamples)
    for start, rows in stats.chunks(resamples):
        counts = stats.draw_counts(rng, rows, n)
        picks_a = rng.integers(0, len(num_a), size=(rows, len(num_a)))
        picks_b = rng.integers(0, len(num_b), size=(rows, len(num_b)))
        values[start:start + rows] = (_mean_seed_rates(counts, num_a, den_a, picks_a)
                                      - _mean_seed_rates(counts, num_b, den_b, picks_b))
    low, high = _interval(values)
    if binary and len(num_a) == 1 and len(num_b) == 1:
        test = stats.mcnemar_exact([bool(x) for x in num_b[0]], [bool(y) for y in num_a[0]])
    else:
        test = stats.sign_flip_test(num_a.mean(axis=0) - num_b.mean(axis=0), resamples, seed)
    difference = stats.Estimate(100 * value, None if low is None else 100 * low, None if high is None else 100 * high, n)
    return out | {"difference": difference.to_dict(), "p": test.p, "test": test.to_dict()}


# --------------------------------------------------------------------------- everything


def build_arms(benchmarks: Mapping[str, Mapping[str, Sequence]], labels: Sequence[str], contrasts: Sequence[tuple[str, str]],
               resamples: int, seed: int) -> dict:
    """The ``arms`` section: per benchmark and metric each arm's seeds and mean; every contrast on every metric;
    Holm over the primary ones (IFEval prompt-level strict)."""
    arms = arm_columns(labels)
    summaries: dict = {}
    tables: dict = {}
    for bench, by_label in benchmarks.items():
        for metric in METRICS:
            for arm, columns in arms.items():
                if all(c in by_label for c in columns):
                    tables[bench, metric, arm] = metric_table(by_label, columns, metric)
                    summary = arm_summary(*tables[bench, metric, arm], columns, resamples, seed)
                    summaries.setdefault(bench, {}).setdefault(metric, {})[arm] = summary
    rows = []
    for arm, reference in contrasts:
        for bench in benchmarks:
            for metric in METRICS:
                if (bench, metric, arm) in tables and (bench, metric, reference) in tables:
                    result = contrast(tables[bench, metric, arm], tables[bench, metric, reference], metric.startswith("prompt"),
                                      resamples, seed)
                    rows.append({"arm": arm, "reference": reference, "benchmark": bench, "metric": metric,
                                 "primary": (bench, metric) == PRIMARY, **result})
    primary = [row for row in rows if row["primary"] and row["p"] is not None]
    for row, adjusted in zip(primary, stats.holm([row["p"] for row in primary])):
        row["holm_p"] = adjusted
    for row in rows:
        row["verdict"] = contrast_verdict(row)
    return {"primary_metric": PRIMARY_TEXT, "contrasts": [f"{a}:{b}" for a, b in contrasts],
            "arms": {arm: columns for arm, columns in arms.items()}, "by_benchmark": summaries, "comparisons": rows}


def contrast_verdict(row: Mapping) -> str:
    """Primary: by the Holm-adjusted p; any other: the report's exploratory rule (interval excludes 0 and p < 0.05)."""
    d = row["difference"]
    if row["primary"]:
        p = row.get("holm_p")
        real = p is not None and p < LEVEL
        label = "significant after Holm (family-wise 5%)"
    else:
        real = stats.is_real_change(stats.Estimate(d["value"], d["low"], d["high"], d["n"]), row["p"], LEVEL)
        label = "significant at the 5% level (exploratory, uncorrected)"
    if not real or d["value"] is None:
        return "not distinguishable from no change"
    return f"{'an increase' if d['value'] > 0 else 'a decrease'} {label}, size {signed(d['value'])} points"
