"""Stage-by-stage comparisons with their uncertainty: what each training stage changed, and whether it is real.

From plain per-item data (:class:`StudyInputs`: per prompt pass/fail and response length, per
validation example its loss, per preference pair whether it was ranked right), :func:`build_comparisons`
returns the ``comparisons`` section of an eval's ``metrics.json``:

* per column: every headline number with its 95% bootstrap interval over items (``evaluation/stats.py``);
* per pair of adjacent stages present (base -> SFT, SFT -> DPO, SFT -> RLOO, and DPO vs RLOO; a column of
  another kind is compared with the base model): the paired difference of IFEval/IFBench prompt-level
  strict and loose (paired bootstrap interval, exact McNemar p), of instruction-level strict and loose
  (bootstrap clustered by prompt, sign-flip test over prompts), per instruction type (the counts behind
  each delta, and whether its interval spans zero), of validation loss, preference accuracy and reward margin;
* the confounds beside the scores: response length (mean tokens with its interval), how many responses
  stopped, and how many were cut at ``max_new_tokens``.

Differences of accuracies are in percentage points; the wording rule of the report
(:func:`verdict`): an interval that excludes 0 *and* p < 0.05 is "an increase/decrease significant at the 5%
level (exploratory, uncorrected), size ..." (significant is not important: the size is said, and with many tests
and no correction every verdict here is exploratory; only the declared primary contrasts of ``evaluation/seeds.py``
are Holm-adjusted), anything else "not distinguishable from no change". A per-type
delta over fewer than :data:`MIN_PROMPTS_FOR_INTERVAL` prompts gets no interval (a bootstrap over 1-2
prompts gives a zero-width one). ``evaluation/study_report.py`` writes it up.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from core.stages import find_stage, registered_stages
from evaluation import seeds, stats
from evaluation.number_text import signed
from evaluation.stats import Estimate

PROMPT_METRICS = (("prompt_strict", "prompt-level strict"), ("prompt_loose", "prompt-level loose"))
INSTRUCTION_METRICS = (("instruction_strict", "instruction-level strict"), ("instruction_loose", "instruction-level loose"))
LEVEL = 0.05
# Below this many prompts a bootstrap interval says nothing (over 1-2 prompts it has zero width): none is printed
MIN_PROMPTS_FOR_INTERVAL = 5


@dataclass(frozen=True)
class PromptItem:
    """One benchmark prompt as one column answered it.

    ``strict``/``loose`` are None for a prompt that could not be scored; ``instructions`` holds
    ``(instruction type, strict pass, loose pass)`` for each instruction of a scored prompt.
    """

    key: str
    strict: bool | None
    loose: bool | None
    instructions: tuple[tuple[str, bool, bool], ...] = ()
    num_tokens: int = 0
    stopped: bool = True
    loop: bool = False  # the answer repeats an 8-word run 3+ times (evaluation/repetition.py)

    @property
    def scored(self) -> bool:
        return self.strict is not None and self.loose is not None


@dataclass
class StudyInputs:
    """Everything the comparisons need, as plain data, columns in report order."""

    stages: dict[str, str]  # column label -> stage (base, sft, dpo, rloo, or the adapter kind)
    benchmarks: dict[str, dict[str, list[PromptItem]]] = field(default_factory=dict)  # name -> label -> items
    max_new_tokens: int | None = None  # of the benchmark generations: a response this long without a stop was cut
    val_loss: dict[str, list[tuple[float, int]]] = field(default_factory=dict)  # label -> (nll sum, tokens) per example
    pairs: dict[str, dict[str, list | None]] = field(default_factory=dict)  # label -> {pref_correct, margins, logp_correct}


def column_stage(column: dict) -> str:
    """The stage of a column described by ``ModelSpec.describe()``: "base", or the kind of run ("sft adapter" -> "sft")."""
    kind = str(column.get("kind", "")).split()
    return kind[0] if kind else str(column.get("label", ""))


def stage_pairs(stages: dict[str, str]) -> list[tuple[str, str, str]]:
    """(before label, after label, "sequential" | "sibling") for every adjacent pair of stages present.

    A stage follows the one it starts from in the registry (``core/stages.py``: DPO and RLOO start from
    SFT), else the base model (when that stage has no column, or for SFT and any other kind of column);
    two stages that start from the same one are siblings (DPO vs RLOO), in registry order. With several
    columns of one stage, the first one is the predecessor.
    """
    first: dict[str, str] = {}
    for label, stage in stages.items():
        first.setdefault(stage, label)
    base = first.get("base", next(iter(stages), None))
    pairs = []
    for label, stage in stages.items():
        if label == base:
            continue
        parent = _starts_from(stage)
        before = first[parent] if parent in first else base
        if before is not None and before != label:
            pairs.append((before, label, "sequential"))
    order = [info.name for info in registered_stages()]
    for i, one in enumerate(order):
        for other in order[i + 1:]:
            if _starts_from(one) is not None and _starts_from(one) == _starts_from(other):
                pairs += [(a, b, "sibling") for a, s_a in stages.items() if s_a == one
                          for b, s_b in stages.items() if s_b == other]
    return pairs


def _starts_from(stage: str) -> str | None:
    info = find_stage(stage)
    return info.starts_from if info else None


def stage_name(label: str, stages: dict[str, str]) -> str:
    """How a column is named in sentences: its stage ("DPO"), with the label when they differ ("DPO (dpo_2)")."""
    stage = stages.get(label, label)
    info = find_stage(stage)
    name = info.title if info else stage
    return name if label == stage else f"{name} ({label})"


def verdict(difference: Estimate, p: float | None, digits: int = 1, unit: str = " points") -> tuple[str, bool]:
    """The report's wording and whether the change counts as real (interval excludes 0 and p < 0.05).

    Significant is not important: the wording carries the size, and "uncorrected" since many tests are run.
    """
    if stats.is_real_change(difference, p, LEVEL):
        direction = "an increase" if difference.value > 0 else "a decrease"
        return (f"{direction} significant at the 5% level (exploratory, uncorrected), size {signed(difference.value, digits)}{unit}",
                True)
    return "not distinguishable from no change", False


# --------------------------------------------------------------------------- per column


def _count(passed: int, n: int) -> dict:
    return {"passed": passed, "n": n}


def _points(estimate: Estimate) -> dict:
    return estimate.scaled(100.0).to_dict()


def _if_table(items: Sequence[PromptItem]) -> tuple[list[list[float]], list[list[float]]]:
    """Per scored prompt: numerators and denominators of the four IF numbers, in PROMPT_METRICS + INSTRUCTION_METRICS order.

    Prompt-level: passed (0/1) out of 1; instruction-level: instructions passed out of the prompt's
    instructions (a ratio of sums over prompts: the bootstrap resamples a prompt's instructions together).
    """
    numerators, denominators = [], []
    for item in items:
        count = len(item.instructions)
        numerators.append([float(item.strict), float(item.loose), sum(i[1] for i in item.instructions),
                           sum(i[2] for i in item.instructions)])
        denominators.append([1.0, 1.0, count, count])
    return numerators, denominators


def column_intervals(items: Sequence[PromptItem], resamples: int, seed: int) -> dict:
    """The four IF numbers of one column (in %) with bootstrap intervals over its scored prompts."""
    scored = [item for item in items if item.scored]
    out: dict = {"prompts_scored": len(scored), "prompts_total": len(items)}
    numerators, denominators = _if_table(scored)
    estimates = stats.bootstrap_ratios(numerators, denominators, resamples, seed) if scored else [Estimate(None, None, None, 0)] * 4
    for j, (key, _) in enumerate(PROMPT_METRICS + INSTRUCTION_METRICS):
        passed, total = (sum(row[j] for row in numerators), sum(row[j] for row in denominators))
        out[key] = {**_points(estimates[j]), **_count(int(passed), int(total))}
    return out


def confounds(items: Sequence[PromptItem], max_new_tokens: int | None, resamples: int, seed: int) -> dict:
    """Response length (mean tokens, interval over prompts), stopped, cut-at-max_new_tokens and repetition-loop counts."""
    n = len(items)
    stopped = sum(item.stopped for item in items)
    cut = sum(is_cut(item, max_new_tokens) for item in items)
    lengths = [item.num_tokens for item in items]
    return {"responses": n, "mean_tokens": stats.bootstrap_mean(lengths, resamples, seed).to_dict() if n else None,
            "stopped": stopped, "cut_at_max_new_tokens": cut, "other_unstopped": n - stopped - cut,
            "loops": sum(item.loop for item in items), "max_new_tokens": max_new_tokens}


def is_cut(item: PromptItem, max_new_tokens: int | None) -> bool:
    """The answer ran to the token limit without a stop: it was cut there."""
    return not item.stopped and max_new_tokens is not None and item.num_tokens >= max_new_tokens


def val_loss_interval(per_example: Sequence[tuple[float, int]], resamples: int, seed: int) -> dict:
    """Token-weighted validation loss (summed nll / tokens) with its interval, resampling examples."""
    nll, tokens = [e[0] for e in per_example], [e[1] for e in per_example]
    return {**stats.bootstrap_ratio(nll, tokens, resamples, seed).to_dict(), "tokens": int(sum(tokens))}


def flag_interval(flags: Sequence[bool] | None, resamples: int, seed: int) -> dict | None:
    """A share (in %) of items with its interval, and the count behind it; None when undefined."""
    if flags is None or not len(flags):
        return None
    return {**_points(stats.bootstrap_mean([bool(f) for f in flags], resamples, seed)), **_count(sum(map(bool, flags)), len(flags))}


# --------------------------------------------------------------------------- per pair of columns


def _change(before: int, after: int, total: int, difference: Estimate, test) -> dict:
    """One paired comparison: counts before and after, the difference in points with its interval, the test, the verdict."""
    difference = difference.scaled(100.0)
    words, real = verdict(difference, test.p)
    return {"before": _count(before, total), "after": _count(after, total), "difference": difference.to_dict(),
            "p": test.p, "test": test.to_dict(), "verdict": words, "real": real}


def binary_change(before: Sequence[bool], after: Sequence[bool], resamples: int, seed: int) -> dict:
    """Paired pass/fail outcomes: counts, the difference in points with its paired interval, exact McNemar."""
    difference = stats.paired_difference([float(bool(x)) for x in before], [float(bool(y)) for y in after],
                                         resamples=resamples, seed=seed)
    return _change(sum(map(bool, before)), sum(map(bool, after)), len(before), difference, stats.mcnemar_exact(before, after))


def per_type_changes(before: Sequence[PromptItem], after: Sequence[PromptItem], resamples: int, seed: int) -> dict:
    """Per instruction type, strict and loose: x/n -> y/n and the difference (points) with its interval.

    The interval resamples the prompts that carry the type (clustered: a type twice in one prompt
    moves together). No p-value here: the per-type rows are many, read them as description.
    """
    out = {}
    for name in sorted({inst[0] for item in before for inst in item.instructions}):
        rows = [(b, a) for b, a in zip(before, after) if any(inst[0] == name for inst in b.instructions)]
        counts = [[sum(inst[0] == name for inst in b.instructions)] * 2 for b, _ in rows]

        def passed(item: PromptItem) -> list[int]:
            return [sum(inst[level] for inst in item.instructions if inst[0] == name) for level in (1, 2)]

        passed_before, passed_after = [passed(b) for b, _ in rows], [passed(a) for _, a in rows]
        differences = stats.paired_differences(passed_before, passed_after, counts, resamples=resamples, seed=seed)
        total = sum(c[0] for c in counts)
        out[name] = {level: {"before": _count(sum(p[j] for p in passed_before), total),
                             "after": _count(sum(p[j] for p in passed_after), total),
                             "difference": differences[j].scaled(100.0).to_dict(),
                             "spans_zero": differences[j].spans_zero, "prompts": len(rows),
                             "too_few_prompts": len(rows) < MIN_PROMPTS_FOR_INTERVAL}
                     for j, level in enumerate(("strict", "loose"))}
    return out


def benchmark_change(before: Sequence[PromptItem], after: Sequence[PromptItem], resamples: int, seed: int) -> dict:
    """Every paired comparison on one benchmark, over the prompts scored in both columns.

    Prompt-level: exact McNemar on the pass/fail pairs; instruction-level: sign-flip test of the
    per-prompt differences in instructions passed (the prompt is the unit, as in the bootstrap).
    """
    if len(before) != len(after) or any(b.key != a.key for b, a in zip(before, after)):
        raise ValueError("the two columns answered different prompts: no paired comparison")
    both = [(b, a) for b, a in zip(before, after) if b.scored and a.scored]
    out: dict = {"n": len(both), "left_out": len(before) - len(both)}
    if not both:
        return out
    b_items, a_items = [b for b, _ in both], [a for _, a in both]
    (num_b, den), (num_a, _) = _if_table(b_items), _if_table(a_items)
    differences = stats.paired_differences(num_b, num_a, den, resamples=resamples, seed=seed)
    for j, (key, _) in enumerate(PROMPT_METRICS + INSTRUCTION_METRICS):
        column_b, column_a = [row[j] for row in num_b], [row[j] for row in num_a]
        test = (stats.mcnemar_exact([bool(x) for x in column_b], [bool(y) for y in column_a]) if j < 2 else
                stats.sign_flip_test([y - x for x, y in zip(column_b, column_a)], resamples, seed))
        out[key] = _change(int(sum(column_b)), int(sum(column_a)), int(sum(row[j] for row in den)), differences[j], test)
    out["instructions"] = int(sum(row[2] for row in den))
    out["per_type"] = per_type_changes(b_items, a_items, resamples, seed)
    return out


def val_loss_change(before: Sequence[tuple[float, int]], after: Sequence[tuple[float, int]], resamples: int,
                    seed: int) -> dict | None:
    """Paired difference of the token-weighted validation loss (nats/token), resampling examples."""
    if not before or len(before) != len(after):
        return None
    difference = stats.paired_difference([e[0] for e in before], [e[0] for e in after], [e[1] for e in before],
                                         [e[1] for e in after], resamples=resamples, seed=seed)
    same_tokens = all(b[1] == a[1] for b, a in zip(before, after))
    # With the same tokens per example the loss difference is sum(nll_after - nll_before) / tokens: a sign-flip
    # test of the per-example differences tests exactly it. Otherwise (other templates) there is no such test.
    test = stats.sign_flip_test([a[0] - b[0] for b, a in zip(before, after)], resamples, seed) if same_tokens else None
    p = test.p if test else None
    words, real = verdict(difference, p, 4, " nats/token")
    return {"n": len(before), "difference": difference.to_dict(), "p": p, "test": test.to_dict() if test else None,
            "verdict": words, "real": real}


def mean_change(before: Sequence[float] | None, after: Sequence[float] | None, resamples: int, seed: int) -> dict | None:
    """Paired difference of a per-item mean (e.g. the reward margin per preference pair), sign-flip test."""
    if before is None or after is None or not len(before) or len(before) != len(after):
        return None
    difference = stats.paired_difference(before, after, resamples=resamples, seed=seed)
    test = stats.sign_flip_test([a - b for b, a in zip(before, after)], resamples, seed)
    words, real = verdict(difference, test.p, 3, "")
    return {"n": len(before), "difference": difference.to_dict(), "p": test.p, "test": test.to_dict(),
            "verdict": words, "real": real}


def _pair_flags_change(before: Sequence | None, after: Sequence | None, resamples: int, seed: int) -> dict | None:
    if before is None or after is None or not len(before) or len(before) != len(after):
        return None
    return binary_change([bool(x) for x in before], [bool(y) for y in after], resamples, seed)


# --------------------------------------------------------------------------- everything


def build_comparisons(inputs: StudyInputs, resamples: int = stats.DEFAULT_RESAMPLES, seed: int = stats.DEFAULT_SEED,
                      contrasts: Sequence[tuple[str, str]] = ()) -> dict:
    """The ``comparisons`` section: method, per-column intervals and confounds, and every stage pair's differences;
    with seed columns (``<arm>_s<k>``) or declared primary contrasts, the arms over seeds (``evaluation/seeds.py``).

    With seed columns the column-by-column pairs are made between the first seed of each arm (exploratory).
    """
    columns: dict = {}
    for label in inputs.stages:
        entry: dict = {"stage": inputs.stages[label], "benchmarks": {}, "confounds": {}}
        for name, by_label in inputs.benchmarks.items():
            if label in by_label:
                entry["benchmarks"][name] = column_intervals(by_label[label], resamples, seed)
                entry["confounds"][name] = confounds(by_label[label], inputs.max_new_tokens, resamples, seed)
        if inputs.val_loss.get(label):
            entry["val_loss"] = val_loss_interval(inputs.val_loss[label], resamples, seed)
        pair_data = inputs.pairs.get(label) or {}
        for key in ("pref_correct", "logp_correct"):
            interval = flag_interval(pair_data.get(key), resamples, seed)
            if interval is not None:
                entry[key.replace("_correct", "_accuracy")] = interval
        if pair_data.get("margins"):
            entry["reward_margin"] = stats.bootstrap_mean(pair_data["margins"], resamples, seed).to_dict()
        columns[label] = entry
    pairs = []
    for before, after, kind in stage_pairs(first_seeds(inputs.stages)):
        pair: dict = {"before": before, "after": after, "kind": kind, "benchmarks": {}}
        for name, by_label in inputs.benchmarks.items():
            if before in by_label and after in by_label:
                pair["benchmarks"][name] = benchmark_change(by_label[before], by_label[after], resamples, seed)
        loss = val_loss_change(inputs.val_loss.get(before) or [], inputs.val_loss.get(after) or [], resamples, seed)
        if loss is not None:
            pair["val_loss"] = loss
        for key in ("pref_correct", "logp_correct"):
            change = _pair_flags_change((inputs.pairs.get(before) or {}).get(key), (inputs.pairs.get(after) or {}).get(key),
                                        resamples, seed)
            if change is not None:
                pair[key.replace("_correct", "_accuracy")] = change
        margin = mean_change((inputs.pairs.get(before) or {}).get("margins"), (inputs.pairs.get(after) or {}).get("margins"),
                             resamples, seed)
        if margin is not None:
            pair["reward_margin"] = margin
        pairs.append(pair)
    out = {"method": stats.method(resamples, seed), "stages": dict(inputs.stages), "columns": columns, "pairs": pairs}
    if contrasts or seeds.has_seeds(list(inputs.stages)):
        out["arms"] = seeds.build_arms(inputs.benchmarks, list(inputs.stages), contrasts, resamples, seed)
    return out


def first_seeds(stages: dict[str, str]) -> dict[str, str]:
    """The columns the column-by-column pairs are made from: every single-seed column and each arm's first seed."""
    keep = {columns[0] for columns in seeds.arm_columns(list(stages)).values()}
    return {label: stage for label, stage in stages.items() if label in keep}
