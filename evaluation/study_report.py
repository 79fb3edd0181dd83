"""The study's answer at the top of ``report.md``: what each stage changed, with intervals and p-values.

``evaluation/report.py`` calls :func:`study_section` whenever an evaluation has at least two columns
and an IF benchmark. It gathers the per-item data of the run (per prompt pass/fail and length, per
validation example its loss, per preference pair its outcome) into ``evaluation.comparisons.StudyInputs``,
computes the ``comparisons`` section of ``metrics.json`` and returns the report lines: a paragraph made
from the numbers, the headline table with intervals, the paired differences, the forest plot, the
confounds (length, stops, cuts), the RLOO reward-hacking monitor, the per-instruction-type deltas and
the method.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from evaluation import comparisons as cmp
from evaluation import rloo_monitor
from evaluation import seed_report
from evaluation.anchor import anchor_lines, study_anchor
from evaluation.repetition import LOOP_DEFINITION, has_repetition_loop
from evaluation.seeds import parse_contrasts
from evaluation.report_notes import BENCHMARK_NAMES, budget_sentence, training_budget, truncation_warnings
from evaluation.number_text import interval, p_clause, p_text, plain, signed
from evaluation.stats import DEFAULT_RESAMPLES
from evaluation.study_charts import write_study_charts


# --------------------------------------------------------------------------- inputs


def benchmark_items(run) -> dict[str, list[cmp.PromptItem]]:
    """Per column, one PromptItem per prompt of a ``BenchmarkRun`` (scores and generations in prompt order)."""
    out = {}
    for label, scores in run.scores.items():
        items = []
        for outcome, gen in zip(scores.prompts, run.generations[label]):
            scored = outcome.scored
            instructions = tuple((i.instruction_id, bool(i.strict), bool(i.loose)) for i in outcome.instructions) if scored else ()
            items.append(cmp.PromptItem(str(outcome.key), outcome.strict if scored else None, outcome.loose if scored else None,
                                        instructions, gen.num_tokens, bool(gen.stopped_with_eos), has_repetition_loop(gen.text)))
        out[label] = items
    return out


def study_inputs(settings: Mapping, results: Sequence, if_runs: Sequence, pairs: Mapping | None,
                 items: Mapping | None = None) -> cmp.StudyInputs:
    """The plain data of a finished evaluation (its columns, ``ColumnResult``s, ``BenchmarkRun``s, per-pair outcomes);
    ``items``: the runs' ``benchmark_items`` when already made."""
    stages = {column["label"]: cmp.column_stage(column) for column in settings["columns"]}
    val_loss = {r.spec.label: list(r.loss.per_example) for r in results if r.loss is not None and r.loss.per_example}
    benchmarks = dict(comparisons_items(if_runs, items))
    return cmp.StudyInputs(stages=stages, benchmarks=benchmarks,
                           max_new_tokens=settings.get("if_max_new_tokens"), val_loss=val_loss,
                           pairs={label: dict(v) for label, v in (pairs or {}).items() if v})


def comparisons_items(if_runs: Sequence, items: Mapping | None) -> Mapping:
    """Per benchmark, per column, the PromptItems (``items`` when already made)."""
    return items if items is not None else {run.name: benchmark_items(run) for run in if_runs}


def rloo_monitors(comparisons: Mapping, settings: Mapping, metrics: Mapping) -> dict[str, tuple[dict, list]]:
    """Per RLOO column whose run saved a log history: (monitor result, log history)."""
    out = {}
    columns = {column["label"]: column for column in settings["columns"]}
    bench = "ifeval" if any("ifeval" in p["benchmarks"] for p in comparisons["pairs"]) else None
    for pair in comparisons["pairs"]:
        label = pair["after"]
        if comparisons["stages"].get(label) != "rloo" or pair["kind"] != "sequential":
            continue
        run_dir = columns[label].get("adapter_dir", "")
        history = rloo_monitor.read_log_history(run_dir) or []
        name = bench or next(iter(pair["benchmarks"]), None)
        change = pair["benchmarks"].get(name, {}).get("prompt_strict") if name else None
        before, after = metrics.get(pair["before"], {}), metrics.get(label, {})
        rewards = {"before": before.get("reward_model_mean"), "after": after.get("reward_model_mean"),
                   "before_std": before.get("reward_model_std"), "after_std": after.get("reward_model_std"),
                   "n": settings.get("reward_model_prompts")}
        passes, unreadable = rloo_monitor.read_per_prompt(run_dir)
        if history or passes or rewards["after"] is not None:
            result = rloo_monitor.monitor(history, passes, change, rewards, BENCHMARK_NAMES.get(name, name or "IF"), unreadable,
                                          comparisons["method"]["resamples"], comparisons["method"]["seed"])
            out[label] = (result | {"before": pair["before"]}, history)
    return out


def study_section(out_dir: Path, settings: Mapping, metrics: Mapping, results: Sequence, if_runs: Sequence,
                  pairs: Mapping | None = None, resamples: int = DEFAULT_RESAMPLES,
                  items: Mapping | None = None) -> tuple[dict | None, list[str], list[Path]]:
    """(the ``comparisons`` section, the report lines, the charts written); (None, [], []) below two columns or without IF."""
    if len(settings.get("columns", ())) < 2 or not if_runs:
        return None, [], []
    items = comparisons_items(if_runs, items)
    comparisons = cmp.build_comparisons(study_inputs(settings, results, if_runs, pairs, items), resamples,
                                        int(settings.get("seed", 0)), parse_contrasts(settings.get("primary_contrasts")))
    anchor = study_anchor(str(settings.get("base_model", "")), comparisons["stages"], items.get("ifeval", {}))
    if anchor:
        comparisons["anchor"] = anchor
    budgets = {column["label"]: training_budget(column.get("adapter_dir")) for column in settings["columns"]}
    comparisons["budgets"] = {label: budget for label, budget in budgets.items() if budget}
    monitors = rloo_monitors(comparisons, settings, metrics)
    if monitors:
        comparisons["rloo_monitor"] = {label: result for label, (result, _) in monitors.items()}
    charts = write_study_charts(comparisons, Path(out_dir) / "charts", {label: h for label, (_, h) in monitors.items()})
    comparisons["charts"] = {name: path.name for name, path in charts.items()}  # report_lines' input, kept for verify_study
    return comparisons, report_lines(comparisons, comparisons["charts"]), list(charts.values())


# --------------------------------------------------------------------------- numbers as text


def _pair_title(pair: Mapping, stages: Mapping) -> str:
    return f"{cmp.stage_name(pair['after'], stages)} vs {cmp.stage_name(pair['before'], stages)}"


# --------------------------------------------------------------------------- the answer


def answer_paragraph(comparisons: Mapping) -> str:
    """Sentences made from the numbers: per stage pair and benchmark, prompt-level strict and loose; the confounds; the flag."""
    stages = comparisons["stages"]
    sentences = []
    for pair in comparisons["pairs"]:
        after, before = cmp.stage_name(pair["after"], stages), cmp.stage_name(pair["before"], stages)
        for bench, data in pair["benchmarks"].items():
            if not data.get("n"):
                continue
            strict, loose = data["prompt_strict"], data["prompt_loose"]
            name = BENCHMARK_NAMES.get(bench, bench)
            verb = f"{after} (vs {before}) changed {name}" if pair["kind"] == "sequential" else f"{after} differs from {before} on {name}"
            k = data["left_out"]
            left_out = f"; {k} prompt{'s' if k != 1 else ''} unscored in a column left out" if k else ""
            sentences.append(
                f"{verb} prompt-level strict by {signed(strict['difference']['value'])} points {interval(strict['difference'])} "
                f"({p_clause(strict['p'])}, exploratory (uncorrected), n = {data['n']}{left_out}): {strict['verdict']}; "
                f"prompt-level loose by {signed(loose['difference']['value'])} points {interval(loose['difference'])} "
                f"({p_clause(loose['p'])}, exploratory (uncorrected)): "
                f"{loose['verdict']}.")
    sentences += _confound_sentences(comparisons)
    for label, result in (comparisons.get("rloo_monitor") or {}).items():
        sentences.append(rloo_monitor.flag_sentence(result, cmp.stage_name(label, stages),
                                                    cmp.stage_name(result["before"], stages)))
    return " ".join(sentences)


def answer_lines(comparisons: Mapping) -> list[str]:
    """The answer section's paragraphs (each followed by a blank line): a warning per column whose answers were mostly
    cut at the token limit, the answer, and each trained column's budget."""
    def name_of(label: str) -> str:
        return cmp.stage_name(label, comparisons["stages"])

    budget = budget_sentence(comparisons.get("budgets") or {}, name_of)
    paragraphs = [*truncation_warnings(comparisons, name_of), answer_paragraph(comparisons), *([budget] if budget else [])]
    return [line for paragraph in paragraphs for line in (paragraph, "")]


def _confound_sentences(comparisons: Mapping) -> list[str]:
    stages, columns = comparisons["stages"], comparisons["columns"]
    benches = sorted({b for c in columns.values() for b in c["confounds"]}, key=lambda b: (b != "ifeval", b))
    out = []
    for bench in benches:
        entries = [(label, c["confounds"][bench]) for label, c in columns.items() if bench in c["confounds"]]
        limit = entries[0][1]["max_new_tokens"]
        cuts = ", ".join(f"{cmp.stage_name(label, stages)} {e['cut_at_max_new_tokens']}/{e['responses']}" for label, e in entries)
        lengths = ", ".join(plain((e["mean_tokens"] or {}).get("value")) for _, e in entries)
        out.append(f"Beside the scores ({BENCHMARK_NAMES.get(bench, bench)}): responses cut at max_new_tokens={limit}: {cuts}; "
                   f"mean length {lengths} tokens (see Confounds).")
    return out


# --------------------------------------------------------------------------- tables


def headline_lines(comparisons: Mapping) -> list[str]:
    """Every headline number per column with its interval and the count behind it."""
    columns = comparisons["columns"]
    labels = list(columns)
    rows = []
    benches = list(dict.fromkeys(b for c in columns.values() for b in c["benchmarks"]))
    for bench in benches:
        for key, title in cmp.PROMPT_METRICS + cmp.INSTRUCTION_METRICS:
            rows.append((f"{bench} {title} (%)", [_share_cell(columns[label]["benchmarks"].get(bench, {}).get(key)) for label in labels]))
    rows.append(("val loss (nats/token)", [_loss_cell(columns[label].get("val_loss")) for label in labels]))
    for key, title in (("pref_accuracy", "pref acc (%)"), ("logp_accuracy", "chosen likelier (%)")):
        rows.append((title, [_share_cell(columns[label].get(key)) for label in labels]))
    rows.append(("reward margin", [_mean_cell(columns[label].get("reward_margin"), 3) for label in labels]))
    for bench in benches:
        rows.append((f"{bench} mean response tokens", [_length_cell(columns[label]["confounds"].get(bench)) for label in labels]))
    rows = [(title, cells) for title, cells in rows if any(cell != "-" for cell in cells)]
    lines = ["| metric | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    return lines + [f"| {title} | " + " | ".join(cells) + " |" for title, cells in rows]


def _share_cell(entry: Mapping | None) -> str:
    if not entry or entry.get("value") is None:
        return "-"
    return f"{plain(entry['value'])} [{plain(entry['low'])}, {plain(entry['high'])}] ({entry['passed']}/{entry['n']})"


def _loss_cell(entry: Mapping | None) -> str:
    return _mean_cell(entry, 4, " ex.")


def _mean_cell(entry: Mapping | None, digits: int, unit: str = "") -> str:
    if not entry or entry.get("value") is None:
        return "-"
    return f"{plain(entry['value'], digits)} [{plain(entry['low'], digits)}, {plain(entry['high'], digits)}] ({entry['n']}{unit})"


def _length_cell(entry: Mapping | None) -> str:
    if not entry or not entry.get("mean_tokens"):
        return "-"
    m = entry["mean_tokens"]
    return f"{plain(m['value'])} [{plain(m['low'])}, {plain(m['high'])}]"


def differences_lines(comparisons: Mapping) -> list[str]:
    """One row per stage pair and metric: before and after (counts), the difference with its interval, p, verdict."""
    stages, columns = comparisons["stages"], comparisons["columns"]
    lines = ["| comparison | metric | n | before | after | difference [95% CI] | p, exploratory (uncorrected) | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for pair in comparisons["pairs"]:
        title = _pair_title(pair, stages)
        for bench, data in pair["benchmarks"].items():
            for key, name in cmp.PROMPT_METRICS + cmp.INSTRUCTION_METRICS:
                entry = data.get(key)
                if entry:
                    lines.append(f"| {title} | {bench} {name} | {data['n']} | {_counts(entry['before'])} | {_counts(entry['after'])} "
                                 f"| {signed(entry['difference']['value'])} {interval(entry['difference'])} points "
                                 f"| {p_text(entry['p'])} ({_test_name(entry['test'])}) | {entry['verdict']} |")
        for key, name, digits in (("val_loss", "val loss (nats/token)", 4), ("reward_margin", "reward margin", 3)):
            entry = pair.get(key)
            if entry:
                before, after = columns[pair["before"]].get(key, {}), columns[pair["after"]].get(key, {})
                lines.append(f"| {title} | {name} | {entry['n']} | {plain(before.get('value'), digits)} | "
                             f"{plain(after.get('value'), digits)} | {signed(entry['difference']['value'], digits)} "
                             f"{interval(entry['difference'], digits)} | {p_text(entry['p'])}"
                             f"{' (' + _test_name(entry['test']) + ')' if entry['test'] else ''} | {entry['verdict']} |")
        for key, name in (("pref_accuracy", "pref acc"), ("logp_accuracy", "chosen likelier")):
            entry = pair.get(key)
            if entry:
                lines.append(f"| {title} | {name} | {entry['before']['n']} | {_counts(entry['before'])} | {_counts(entry['after'])} "
                             f"| {signed(entry['difference']['value'])} {interval(entry['difference'])} points "
                             f"| {p_text(entry['p'])} ({_test_name(entry['test'])}) | {entry['verdict']} |")
    return lines


def _counts(count: Mapping) -> str:
    return f"{count['passed']}/{count['n']}"


def _test_name(test: Mapping) -> str:
    if "b" in test:
        return f"McNemar, {test['b']} vs {test['c']} discordant"
    return f"sign-flip, {test['nonzero']} differ"


def confounds_lines(comparisons: Mapping) -> list[str]:
    stages = comparisons["stages"]
    lines = ["| benchmark | model | responses | mean tokens [95% CI] | stopped (EOS) | cut at max_new_tokens | other unstopped "
             "| repetition loop |", "|---|---|---|---|---|---|---|---|"]
    for label, column in comparisons["columns"].items():
        for bench, e in column["confounds"].items():
            n = e["responses"]
            lines.append(f"| {bench} | {cmp.stage_name(label, stages)} | {n} | {_length_cell(e)} | "
                         f"{_share(e['stopped'], n)} | {_share(e['cut_at_max_new_tokens'], n)} "
                         f"(max_new_tokens={e['max_new_tokens']}) | {e['other_unstopped']} | {_share(e.get('loops'), n)} |")
    return lines


def _share(count: int | None, n: int) -> str:
    """``12/40 (30.0%)``; ``-`` where not recorded."""
    if count is None:
        return "-"
    return f"{count}/{n}" + (f" ({plain(100 * count / n)}%)" if n else "")


def per_type_lines(comparisons: Mapping) -> list[str]:
    """Per benchmark: instruction types as rows, one column per stage pair: x/n -> y/n, difference, interval (strict)."""
    stages = comparisons["stages"]
    lines: list[str] = []
    benches = list(dict.fromkeys(b for p in comparisons["pairs"] for b in p["benchmarks"]))
    for bench in benches:
        pairs = [p for p in comparisons["pairs"] if p["benchmarks"].get(bench, {}).get("per_type")]
        if not pairs:
            continue
        types = sorted({t for p in pairs for t in p["benchmarks"][bench]["per_type"]})
        lines += [f"### {bench}", "", "| instruction type | " + " | ".join(_pair_title(p, stages) for p in pairs) + " |",
                  "|---|" + "---|" * len(pairs)]
        for name in types:
            cells = []
            for p in pairs:
                e = p["benchmarks"][bench]["per_type"].get(name, {}).get("strict")
                cells.append(_per_type_cell(e))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _per_type_cell(e: Mapping | None) -> str:
    """``2/6 → 5/6: +50.0 [+16.7, +83.3]``; no interval over fewer than MIN_PROMPTS_FOR_INTERVAL prompts."""
    if not e:
        return "-"
    change = f"{_counts(e['before'])} \u2192 {_counts(e['after'])}: {signed(e['difference']['value'])}"
    prompts = e.get("prompts", e["difference"].get("n"))
    if e.get("too_few_prompts"):
        return f"{change}, too few prompts (n={prompts})"
    return f"{change} {interval(e['difference'])}" + (" (spans 0)" if e["spans_zero"] else "")


def method_lines(method: Mapping, arms: bool = False) -> list[str]:
    return [f"- Intervals: {method['interval']} (prompts for the IF numbers, validation examples for the loss, preference "
            f"pairs for preference accuracy), {method['resamples']:,} resamples, seed {method['seed']} ({method['generator']}).",
            "- Ratios are resampled whole: the validation loss as summed nll / tokens over the resampled examples; "
            "instruction-level accuracy as passed / instructions over the resampled prompts (clustered by prompt).",
            f"- Paired differences: {method['paired']}, over the items scored in both columns; in percentage points for accuracies.",
            f"- p-values: prompt-level and preference accuracy: {method['binary_test']}; instruction-level, validation loss "
            f"and reward margin: "
            f"{method['other_test']}.",
            "- Wording: \"an increase/decrease significant at the 5% level (uncorrected), size ...\" when the interval excludes "
            "0 and p < 0.05; otherwise \"not distinguishable from no change\". Significant is not large: read the size. No "
            "correction for multiple comparisons (many tests are run): every verdict outside the primary contrasts is "
            "exploratory (uncorrected), and the per-type "
            f"deltas are description (no interval below {cmp.MIN_PROMPTS_FOR_INTERVAL} prompts).",
            *([f"- Arms over seeds and contrasts between arms: {seed_report.contrast_method(method)}"] if arms else []),
            ""]


def report_lines(comparisons: Mapping, charts: Mapping[str, str]) -> list[str]:
    """The report's opening sections, in order: answer, table, differences, forest plot, confounds, monitor, types, method."""
    lines = [*seed_report.declaration_lines(comparisons), *seed_report.primary_lines(comparisons),
             *seed_report.arms_lines(comparisons), "## The answer", "", *answer_lines(comparisons),
             *(anchor_lines(comparisons["anchor"]) if comparisons.get("anchor") else []),
             "## Headline numbers with 95% intervals", "", *headline_lines(comparisons), "",
             "## What each stage changed (paired)", "", *differences_lines(comparisons), ""]
    if "forest" in charts:
        lines += [f"![Paired differences](charts/{charts['forest']})", ""]
    lines += ["## Confounds beside the scores", "",
              "Longer or truncated answers move IF scores by themselves: response length, stops, cuts and repetition "
              f"loops ({LOOP_DEFINITION}) per model.", "",
              *confounds_lines(comparisons), ""]
    for index, (label, result) in enumerate((comparisons.get("rloo_monitor") or {}).items()):
        stages = comparisons["stages"]
        chart = charts.get("rloo_monitor" if index == 0 else f"rloo_monitor_{label}")
        lines += rloo_monitor.monitor_lines(result, chart, cmp.stage_name(label, stages), cmp.stage_name(result["before"], stages))
    lines += seed_report.exploratory_lines(comparisons)
    types = per_type_lines(comparisons)
    if types:
        lines += ["## Per instruction type (instruction-level strict, paired)", "",
                  "Instructions of each type passed before \u2192 after, the difference in points and its interval "
                  "(bootstrap over the prompts with that type); \"(spans 0)\" marks a delta whose interval includes zero; "
                  f"below {cmp.MIN_PROMPTS_FOR_INTERVAL} prompts no interval is given (\"too few prompts\").", "",
                  *types]
    lines += ["## How the intervals and p-values were made", "", *method_lines(comparisons["method"], "arms" in comparisons)]
    return lines
