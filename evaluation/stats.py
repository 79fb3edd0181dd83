"""The statistics behind every interval and p-value in an evaluation report (numpy only, no torch).

* :func:`bootstrap_ratio` / :func:`bootstrap_mean`: a seeded percentile bootstrap 95% interval over
  items (prompts, validation examples, preference pairs). The statistic is a ratio of sums, so a
  mean (denominator 1 per item), a token-weighted loss (nll sum / tokens per example) and an
  instruction-level accuracy clustered by prompt (passes / instructions per prompt) are all the
  same computation, resampled by item.
* :func:`paired_difference`: the bootstrap interval of ``after - before`` for two columns measured
  on the same items; both columns are resampled with the *same* draws (a paired bootstrap).
* :func:`mcnemar_exact`: the exact two-sided McNemar test for paired pass/fail outcomes (a binomial
  test on the discordant pairs; no discordant pair gives p = 1).
* :func:`sign_flip_test`: a paired permutation (sign-flip) test for non-binary per-item
  differences (instructions passed per prompt, loss per example, reward margins): exact over all
  sign patterns when there are few non-zero differences, Monte Carlo (seeded) otherwise.

Every function is deterministic given its ``seed``: the same seed and item count give the same
resamples, whichever statistic is computed from them.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

DEFAULT_RESAMPLES = 10_000
DEFAULT_SEED = 0
CONFIDENCE = 0.95
_CHUNK = 1_000  # resamples drawn per block: bounds memory (block x items weights), fixed so results never depend on it
EXACT_SIGN_FLIP_MAX = 16  # up to 2**16 sign patterns are enumerated exactly


@dataclass(frozen=True)
class Estimate:
    """A statistic with its percentile bootstrap interval over ``n`` items."""

    value: float | None
    low: float | None
    high: float | None
    n: int

    @property
    def spans_zero(self) -> bool:
        return self.low is None or (self.low <= 0.0 <= self.high)

    def scaled(self, factor: float) -> Estimate:
        """The same estimate in other units (e.g. x100 for percentage points)."""
        def scale(v):
            return None if v is None else v * factor
        return Estimate(scale(self.value), scale(self.low), scale(self.high), self.n)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class McNemar:
    """Exact McNemar test: ``b`` items passed before and failed after, ``c`` the reverse."""

    b: int
    c: int
    p: float

    def to_dict(self) -> dict:
        return {"test": "exact McNemar (two-sided binomial on discordant pairs)", **asdict(self)}


@dataclass(frozen=True)
class SignFlip:
    """Paired sign-flip test of the summed differences: ``nonzero`` items differ, ``exact`` if all patterns were counted."""

    p: float
    nonzero: int
    exact: bool
    resamples: int

    def to_dict(self) -> dict:
        return {"test": "paired sign-flip permutation test" + (" (exact)" if self.exact else " (Monte Carlo)"), **asdict(self)}


def method(resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> dict:
    """What a report states about how its intervals and p-values were made."""
    return {"interval": f"{100 * CONFIDENCE:.0f}% percentile bootstrap over items", "resamples": resamples, "seed": seed,
            "generator": f"numpy.random.default_rng (PCG64), numpy {np.__version__}",
            "paired": "both columns resampled with the same draws; interval of the difference after - before",
            "binary_test": "exact McNemar: two-sided binomial test on the discordant pairs (b + c = 0 gives p = 1)",
            "other_test": (f"paired sign-flip permutation test of the summed differences (exact up to "
                           f"{EXACT_SIGN_FLIP_MAX} non-zero differences, else {resamples} seeded random sign patterns)")}


# --------------------------------------------------------------------------- bootstrap


def resampled_sums(table: np.ndarray, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> np.ndarray:
    """Column sums of ``table`` (items x columns) over ``resamples`` bootstrap draws of its rows: (resamples, columns).

    A draw picks n rows with replacement; it is stored as how often each row was picked, so every
    column (and any statistic built from column sums) sees the same draw. The draws depend only on
    ``seed``, ``resamples`` and the number of rows.
    """
    table = np.asarray(table, dtype=np.float64)
    if table.ndim == 1:
        table = table[:, None]
    n = table.shape[0]
    if n == 0:
        raise ValueError("cannot bootstrap zero items")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    rng = np.random.default_rng(seed)
    out = np.empty((resamples, table.shape[1]))
    for start, rows in chunks(resamples):
        out[start:start + rows] = draw_counts(rng, rows, n) @ table
    return out


def chunks(resamples: int) -> list[tuple[int, int]]:
    """(first resample, how many) per block of at most ``_CHUNK`` resamples."""
    return [(start, min(_CHUNK, resamples - start)) for start in range(0, resamples, _CHUNK)]


def draw_counts(rng: np.random.Generator, rows: int, n: int) -> np.ndarray:
    """``rows`` bootstrap draws of n items with replacement, each as how often every item was picked: (rows, n)."""
    picks = rng.integers(0, n, size=(rows, n))
    return np.bincount((picks + n * np.arange(rows)[:, None]).ravel(), minlength=rows * n).reshape(rows, n)


def percentile_interval(values: np.ndarray) -> tuple[float, float]:
    """The central ``CONFIDENCE`` percentile interval of bootstrap statistics (non-finite ones ignored)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    tail = (1.0 - CONFIDENCE) / 2
    low, high = np.quantile(values, [tail, 1.0 - tail])
    return float(low), float(high)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return numerator / denominator


def _as_items(values: Sequence[float] | np.ndarray) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError("expected one value per item")
    return array


def _as_table(values, n_rows: int | None = None) -> np.ndarray:
    """Items x statistics as a 2-D float array (a 1-D sequence is one statistic)."""
    table = np.asarray(values, dtype=np.float64)
    if table.ndim == 1:
        table = table[:, None]
    if table.ndim != 2 or (n_rows is not None and table.shape[0] != n_rows):
        raise ValueError("expected one row per item (and the same items in every column)")
    return table


def bootstrap_ratios(numerators, denominators=None, resamples: int = DEFAULT_RESAMPLES,
                     seed: int = DEFAULT_SEED) -> list[Estimate]:
    """Per column j: sum(numerators[:, j]) / sum(denominators[:, j]) with its bootstrap interval.

    Rows are items, resampled whole (every column sees the same draws); ``denominators=None`` means
    one per item: the means. A column whose denominators sum to 0 has no estimate (None).
    """
    num = _as_table(numerators)
    den = np.ones_like(num) if denominators is None else _as_table(denominators, num.shape[0])
    if den.shape != num.shape:
        raise ValueError(f"{num.shape} numerators but {den.shape} denominators")
    n, k = num.shape
    if n == 0:
        return [Estimate(None, None, None, 0)] * k
    sums = resampled_sums(np.hstack([num, den]), resamples, seed)
    ratios = _ratio(sums[:, :k], sums[:, k:])
    out = []
    for j in range(k):
        total = den[:, j].sum()
        if total == 0:
            out.append(Estimate(None, None, None, n))
            continue
        low, high = percentile_interval(ratios[:, j])
        out.append(Estimate(float(num[:, j].sum() / total), low, high, n))
    return out


def bootstrap_ratio(numerators: Sequence[float], denominators: Sequence[float] | None = None,
                    resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> Estimate:
    """sum(numerators) / sum(denominators) with its bootstrap interval, resampling items (rows) together.

    ``denominators=None`` means one per item: the mean.
    """
    num = _as_items(numerators)
    den = None if denominators is None else _as_items(denominators)
    if den is not None and len(den) != len(num):
        raise ValueError(f"{len(num)} numerators but {len(den)} denominators")
    return bootstrap_ratios(num, den, resamples, seed)[0]


def bootstrap_mean(values: Sequence[float], resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> Estimate:
    return bootstrap_ratio(values, None, resamples, seed)


def paired_differences(before, after, before_den=None, after_den=None, resamples: int = DEFAULT_RESAMPLES,
                       seed: int = DEFAULT_SEED) -> list[Estimate]:
    """Per column j: ratio(after[:, j]) - ratio(before[:, j]) on the same items, with its paired bootstrap interval.

    Each ratio is sum(values) / sum(denominators) (the mean when the denominators are None;
    ``after_den`` defaults to ``before_den``). An item is resampled with all of its columns, before
    and after, so every interval is of a paired difference and all come from the same draws.
    """
    a = _as_table(before)
    n, k = a.shape
    b = _as_table(after, n)
    da = np.ones_like(a) if before_den is None else _as_table(before_den, n)
    db = da if after_den is None else _as_table(after_den, n)
    if not a.shape == b.shape == da.shape == db.shape:
        raise ValueError("paired columns need one value (and denominator) per item in each column")
    if n == 0:
        return [Estimate(None, None, None, 0)] * k
    sums = resampled_sums(np.hstack([a, da, b, db]), resamples, seed)
    differences = _ratio(sums[:, 2 * k:3 * k], sums[:, 3 * k:]) - _ratio(sums[:, :k], sums[:, k:2 * k])
    out = []
    for j in range(k):
        if da[:, j].sum() == 0 or db[:, j].sum() == 0:
            out.append(Estimate(None, None, None, n))
            continue
        low, high = percentile_interval(differences[:, j])
        out.append(Estimate(float(b[:, j].sum() / db[:, j].sum() - a[:, j].sum() / da[:, j].sum()), low, high, n))
    return out


def paired_difference(before: Sequence[float], after: Sequence[float], before_den: Sequence[float] | None = None,
                      after_den: Sequence[float] | None = None, resamples: int = DEFAULT_RESAMPLES,
                      seed: int = DEFAULT_SEED) -> Estimate:
    """ratio(after) - ratio(before) on the same items, with its paired bootstrap interval (one statistic).

    Each column's statistic is sum(values) / sum(denominators) (the mean when the denominators are
    None; ``after_den`` defaults to ``before_den``); an item is resampled with both of its columns.
    """
    columns = [_as_items(before), _as_items(after)] + [_as_items(d) for d in (before_den, after_den) if d is not None]
    if len({len(c) for c in columns}) > 1:
        raise ValueError("paired columns need one value (and denominator) per item in each column")
    return paired_differences(before, after, before_den, after_den, resamples, seed)[0]


# --------------------------------------------------------------------------- tests


def binomial_two_sided(k: int, n: int) -> float:
    """Exact two-sided p of ``k`` successes in ``n`` fair coin flips: 2 x P(X <= min(k, n - k)), capped at 1."""
    if n == 0:
        return 1.0
    low = min(k, n - k)
    tail = sum(math.comb(n, i) for i in range(low + 1))  # integers: exact for any n
    return min(1.0, 2 * tail / 2 ** n)


def mcnemar_exact(before: Sequence[bool], after: Sequence[bool]) -> McNemar:
    """Exact McNemar test of paired pass/fail outcomes (item i passed before / after)."""
    if len(before) != len(after):
        raise ValueError(f"{len(before)} outcomes before but {len(after)} after")
    b = sum(bool(x) and not bool(y) for x, y in zip(before, after))
    c = sum(not bool(x) and bool(y) for x, y in zip(before, after))
    return McNemar(b, c, binomial_two_sided(b, b + c))


def sign_flip_test(differences: Sequence[float], resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> SignFlip:
    """Two-sided paired permutation test of H0 "each difference is as likely + as -": p of |sum| at least as large.

    Zero differences do not change under a flip and are left out. Exact when at most
    ``EXACT_SIGN_FLIP_MAX`` differences are non-zero; otherwise ``resamples`` seeded random patterns
    with the observed one counted in (p = (1 + hits) / (1 + resamples)), so p is never 0.
    """
    d = _as_items(differences)
    d = d[d != 0]
    if len(d) == 0:
        return SignFlip(1.0, 0, True, 0)
    observed = abs(d.sum())
    tolerance = 1e-9 * max(1.0, float(np.abs(d).sum()))  # float sums of the same magnitudes: ties must count
    if len(d) <= EXACT_SIGN_FLIP_MAX:
        signs = 1.0 - 2.0 * ((np.arange(2 ** len(d))[:, None] >> np.arange(len(d))) & 1)  # every +/- pattern once
        hits = int((np.abs(signs @ d) >= observed - tolerance).sum())
        return SignFlip(hits / len(signs), len(d), True, len(signs))
    rng = np.random.default_rng(seed)
    hits = 0
    for _, rows in chunks(resamples):
        signs = rng.choice((-1.0, 1.0), size=(rows, len(d)))
        hits += int((np.abs(signs @ d) >= observed - tolerance).sum())
    return SignFlip((1 + hits) / (1 + resamples), len(d), False, resamples)


def is_real_change(estimate: Estimate, p: float | None, level: float = 0.05) -> bool:
    """The report's rule: the interval excludes 0 *and* p < level."""
    return estimate.low is not None and not estimate.spans_zero and p is not None and p < level


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input's order: the smallest p times m, the next times m - 1, ...,
    each at least the one before it, capped at 1 (family-wise error rate over exactly these tests)."""
    m = len(p_values)
    adjusted = [1.0] * m
    running = 0.0
    for rank, index in enumerate(sorted(range(m), key=lambda i: p_values[i])):
        running = max(running, min(1.0, (m - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted
