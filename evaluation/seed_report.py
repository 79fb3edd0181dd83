"""The report's first sections: the primary metric declared, the primary contrasts (Holm), the arms over seeds.

Made from the ``arms`` section of ``comparisons`` (``evaluation/seeds.py``); ``evaluation/study_report.py``
puts these lines before any other result. Every other p-value of the report is exploratory (uncorrected).
"""
from __future__ import annotations

from typing import Mapping

from evaluation.number_text import interval, p_text, plain, signed
from evaluation.report_notes import BENCHMARK_NAMES
from evaluation.seeds import PRIMARY_TEXT

METRIC_TITLES = {"prompt_strict": "prompt-level strict", "prompt_loose": "prompt-level loose",
                 "instruction_strict": "instruction-level strict", "instruction_loose": "instruction-level loose"}
EXPLORATORY = "exploratory (uncorrected)"


def declaration_lines(comparisons: Mapping) -> list[str]:
    """What was decided before any result: the primary metric, the primary contrasts and how they are corrected."""
    arms = comparisons.get("arms") or {}
    contrasts = arms.get("contrasts") or []
    if not contrasts:
        text = (f"Primary metric: {PRIMARY_TEXT}. No primary contrasts were declared (`--primary_contrasts`): "
                f"every p-value in this report is {EXPLORATORY}.")
    else:
        named = ", ".join(f"{a} vs {b}" for a, b in (c.split(":") for c in contrasts))
        text = (f"Primary metric (declared before the run): {PRIMARY_TEXT}, the share of IFEval prompts whose every "
                f"instruction passes the strict checker. Primary contrasts ({len(contrasts)}, from `--primary_contrasts "
                f"{','.join(contrasts)}`): {named}. Their p-values are Holm-adjusted over exactly these {len(contrasts)} "
                f"contrasts (family-wise error 5%); every other p-value in this report is {EXPLORATORY}.")
    return ["## Primary metric and contrasts", "", text, ""]


def _seed_counts(summary: Mapping) -> str:
    return ", ".join(f"{s['passed']}/{s['n']}" for s in summary["per_seed"])


def _arm_cell(summary: Mapping | None) -> str:
    """``24.0 (141/541, 150/541, 138/541)``: the mean of the seed rates and each seed's count."""
    if not summary:
        return "-"
    return f"{plain(summary['value'])} ({_seed_counts(summary)})"


def primary_lines(comparisons: Mapping) -> list[str]:
    """The primary contrasts: one row each, Holm-adjusted."""
    arms = comparisons.get("arms") or {}
    rows = [row for row in arms.get("comparisons", []) if row["primary"]]
    if not rows:
        return []
    summaries = arms["by_benchmark"].get("ifeval", {}).get("prompt_strict", {})
    lines = [f"## Primary contrasts: {PRIMARY_TEXT} (Holm over {len(rows)})", "",
             "| contrast | n | arm: % (per seed) | reference: % (per seed) | difference [95% CI] | p (test) | Holm p | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['arm']} vs {row['reference']} | {row['n']} | {_arm_cell(summaries.get(row['arm']))} | "
                     f"{_arm_cell(summaries.get(row['reference']))} | {_difference(row)} | {_p_cell(row)} | "
                     f"{p_text(row.get('holm_p'))} | {row['verdict']} |")
    left = [f"{row['arm']} vs {row['reference']} {row['left_out']}" for row in rows if row["left_out"]]
    if left:
        lines += ["", "Prompts left out (unscored in some seed of either arm): " + "; ".join(left) + "."]
    return lines + ["", f"How: {contrast_method(comparisons['method'])}", ""]


def contrast_method(method: Mapping) -> str:
    """How a contrast between arms is measured and tested: said under its table and in the method section."""
    return ("Each arm's value is the mean over its seeds of the pass rate; the difference is arm minus reference over "
            "the prompts scored in every seed of both. Interval: 95% two-level bootstrap "
            f"({method['resamples']:,} resamples, seed {method['seed']}): the prompts are drawn with replacement once for "
            "both arms, each arm's seeds are drawn with replacement on their own. Test: a paired sign-flip permutation "
            "test over prompts of the per-prompt difference of the seed-averaged passes (exact up to 16 non-zero "
            f"differences, else {method['resamples']:,} random sign patterns, seed {method['seed']}); between two "
            "single-seed arms on a pass/fail metric, the exact McNemar test. Holm's step-down adjustment over the primary "
            "contrasts only.")


def _difference(row: Mapping) -> str:
    return f"{signed(row['difference']['value'])} {interval(row['difference'])} points"


def _p_cell(row: Mapping) -> str:
    test = row.get("test") or {}
    if "b" in test:
        name = f"McNemar, {test['b']} vs {test['c']} discordant"
    elif test:
        name = f"sign-flip{' exact' if test['exact'] else ''}, {test['nonzero']} differ"
    else:
        return "n/a"
    return f"{p_text(row['p'])} ({name})"


def arms_lines(comparisons: Mapping) -> list[str]:
    """Each arm's prompt-level strict per benchmark: every seed's count, the mean of the seeds with its interval, the spread."""
    arms = comparisons.get("arms")
    if not arms:
        return []
    method = comparisons["method"]
    lines = ["## Arms over seeds", "",
             f"An arm's value is the mean over its seeds of each seed's pass rate (passed/scored). Interval: a two-level "
             f"bootstrap, {method['resamples']:,} resamples, seed {method['seed']}: each resample draws the arm's seeds with "
             "replacement, then the prompts with replacement (one draw shared by the seeds), and averages the drawn seeds' "
             "rates. Spread: the highest seed's rate minus the lowest, in points. A column `<arm>_s<k>` is seed k of <arm>.", ""]
    for bench, by_metric in arms["by_benchmark"].items():
        summaries = by_metric.get("prompt_strict") or {}
        title = f"{BENCHMARK_NAMES.get(bench, bench)} prompt-level strict" + (", primary" if bench == "ifeval" else "")
        lines += [f"| arm: {title} | seeds | passed per seed | mean % [95% CI] | spread |", "|---|---|---|---|---|"]
        for arm, s in summaries.items():
            cell = "n/a" if s["value"] is None else f"{plain(s['value'])} [{plain(s['low'])}, {plain(s['high'])}]"
            spread = "n/a (one seed)" if s["spread"] is None else plain(s["spread"])
            lines.append(f"| {arm} | {len(s['per_seed'])} | {_seed_counts(s)} | {cell} | {spread} |")
        lines.append("")
    return lines


def exploratory_lines(comparisons: Mapping) -> list[str]:
    """The declared contrasts on every other benchmark and metric: labelled exploratory, uncorrected."""
    rows = [row for row in (comparisons.get("arms") or {}).get("comparisons", []) if not row["primary"]]
    if not rows:
        return []
    lines = [f"## The same contrasts on the other metrics, {EXPLORATORY}", "",
             "Seed-averaged, as the primary contrasts; no correction for the many tests: read them as description.", "",
             "| contrast | metric | n | difference [95% CI] | p (test), exploratory | verdict |", "|---|---|---|---|---|---|"]
    for row in rows:
        metric = f"{BENCHMARK_NAMES.get(row['benchmark'], row['benchmark'])} {METRIC_TITLES[row['metric']]}"
        lines.append(f"| {row['arm']} vs {row['reference']} | {metric} | {row['n']} | {_difference(row)} | {_p_cell(row)} | "
                     f"{row['verdict']} |")
    return lines + [""]
