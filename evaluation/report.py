"""How an evaluation is shown: the side-by-side view, the metrics table, report.md and generations.jsonl."""
from __future__ import annotations

import json
import math
import re
import textwrap
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from core.config import write_json_atomic
from evaluation.charts import percent_text, write_charts
from evaluation.data import EvalPrompt, rouge_l
from evaluation.instruction_eval import HEADLINE, BenchmarkRun, report_section, write_benchmark_files
from evaluation.if_sets import type_group_section
from evaluation.stats import DEFAULT_RESAMPLES
from evaluation.per_prompt import PER_PROMPT_FILE, per_prompt_rows, write_per_prompt
from evaluation.study_report import benchmark_items, study_section

if TYPE_CHECKING:
    from evaluation.models import ColumnResult


def _fmt(value, digits: int = 3, percent: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if percent:
        return f"{percent_text(value)}%"  # half away from zero: 12.5% shows 13%, not 12%
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


METRIC_COLUMNS = [  # (header, key, formatter)
    ("val loss", "val_loss", lambda v: _fmt(v, 4)),
    ("val ppl", "val_perplexity", lambda v: _fmt(v, 2)),
    ("stop rate (EOS)", "stop_rate", lambda v: _fmt(v, percent=True)),
    ("empty", "empty_rate", lambda v: _fmt(v, percent=True)),
    ("mean tokens", "mean_output_tokens", lambda v: _fmt(v, 1)),
    ("ROUGE-L F1", "rouge_l_f1", lambda v: _fmt(v, 3)),
    # the implicit reward's reference is the base model here; DPO's own held-out accuracy is vs its reference (SFT)
    ("pref acc (vs base)", "pref_accuracy", lambda v: _fmt(v, percent=True)),  # evaluation/preference.py
    ("reward margin", "reward_margin", lambda v: _fmt(v, 3)),
    ("chosen likelier", "logp_accuracy", lambda v: _fmt(v, percent=True)),
    ("reward (RM)", "reward_model_mean", lambda v: _fmt(v, 3)),  # evaluation/reward.py
]
# A share of pairs is shown with its count: "92% (12/13)".
COUNTS = {"pref_accuracy": ("pref_correct", "pref_pairs"), "logp_accuracy": ("logp_correct", "pref_pairs")}


def _cell(values: dict, key: str, fmt) -> str:
    text = fmt(values.get(key))
    correct, total = (values.get(name) for name in COUNTS.get(key, ("", "")))
    return f"{text} ({correct}/{total})" if text != "-" and isinstance(correct, int) and total else text


def metrics_table(metrics: dict[str, dict], markdown: bool = False) -> str:
    """One row per model, one column per metric that was measured (e.g. no preference columns without pairs)."""
    measured = [(h, key, fmt) for h, key, fmt in METRIC_COLUMNS if any(key in values for values in metrics.values())]
    header = ["model"] + [h for h, _, _ in measured]
    rows = [[label] + [_cell(values, key, fmt) for _, key, fmt in measured] for label, values in metrics.items()]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header] + rows)


def _pairs_used(settings: dict) -> str:
    """``the 10 pairs used`` or ``10 of the 13 pairs (sampled with seed 42, --max_eval_samples 10)``."""
    used, in_file, taken = settings["prefs_used"], settings.get("prefs_in_file"), settings.get("prefs_pairs")
    if in_file and taken is not None and in_file > taken:
        return (f"{used} of the {in_file} pairs (sampled with seed {settings.get('seed')}, --max_eval_samples {taken}"
                + (f"; {taken - used} dropped" if taken > used else "") + ")")
    return f"the {used} pairs" + (f" ({in_file - used} dropped: prompt fills max_length)" if in_file and in_file > used else "")


def summary_rows(metrics: dict[str, dict], benchmarks: Sequence[str]) -> list[tuple[str, str, object]]:
    """(row title, key, formatter) of the study table: the headline metrics, IF numbers in %, those measured."""
    rows = [(h, key, fmt) for h, key, fmt in METRIC_COLUMNS if key in ("val_loss", "stop_rate", "rouge_l_f1")]
    for name in benchmarks:
        rows += [(f"{name} {title} (%)", f"{name}_{key}", lambda v: _fmt(v * 100 if v is not None else None, 1))
                 for key, title in HEADLINE]
    rows += [(h, key, fmt) for h, key, fmt in METRIC_COLUMNS if key in ("pref_accuracy", "reward_margin", "reward_model_mean")]
    return [row for row in rows if any(_fmt(values.get(row[1])) != "-" for values in metrics.values())]


def summary_table(metrics: dict[str, dict], benchmarks: Sequence[str]) -> str:
    """The study's table in markdown: one row per metric, one column per model (base, SFT, DPO, ...)."""
    labels = list(metrics)
    lines = ["| metric | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for title, key, fmt in summary_rows(metrics, benchmarks):
        lines.append(f"| {title} | " + " | ".join(_cell(metrics[label], key, fmt) for label in labels) + " |")
    return "\n".join(lines)


def _printable(text: str) -> str:
    """One line of text a terminal shows as is: whitespace runs become one space, control bytes '�'."""
    flat = " ".join(text.split())
    return "".join(c if not unicodedata.category(c).startswith("C") else "\ufffd" for c in flat)


def side_by_side(prompt: EvalPrompt, outputs: dict[str, str], width: int, max_lines: int = 6) -> str:
    """The instruction, then each model's output (and the reference) in columns, a few lines each."""
    columns = dict(outputs)
    if prompt.reference is not None:
        columns["reference"] = prompt.reference
    col_width = max(12, (width - 3 * (len(columns) - 1)) // len(columns))
    wrapped = {}
    for label, text in columns.items():
        lines = textwrap.wrap(_printable(text) or "(empty)", col_width) or ["(empty)"]
        if len(lines) > max_lines:
            lines = lines[: max_lines - 1] + [lines[max_lines - 1][: col_width - 1] + "…"]
        wrapped[label] = lines
    title = _printable(prompt.instruction)
    if prompt.input:
        title += f"  [input: {_printable(prompt.input)}]"
    out = [f"── {prompt.prompt_id}: {textwrap.shorten(title, max(20, width - len(prompt.prompt_id) - 5))}"]
    out.append(" | ".join(label[:col_width].ljust(col_width) for label in wrapped).rstrip())
    for i in range(max(len(lines) for lines in wrapped.values())):
        out.append(" | ".join((lines[i] if i < len(lines) else "").ljust(col_width) for lines in wrapped.values()).rstrip())
    return "\n".join(out)


def generation_rows(prompts: Sequence[EvalPrompt], results: Sequence[ColumnResult]) -> list[dict]:
    """One row per (prompt, model), prompts in order, models in column order."""
    rows = []
    for i, prompt in enumerate(prompts):
        for result in results:
            gen = result.generations[i]
            rows.append({
                "prompt_id": prompt.prompt_id, "source": prompt.source, "model": result.spec.label,
                "instruction": prompt.instruction, "input": prompt.input, "prompt": result.prompts[i],
                "output": gen.text, "reference": prompt.reference, "num_tokens": gen.num_tokens,
                "stopped_with_eos": gen.stopped_with_eos, "rouge_l_f1": rouge_l(prompt.reference, gen.text),
            })
    return rows


def _fenced(text: str) -> list[str]:
    """A code block that survives backticks inside the text (the fence is longer than any run of them)."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence + "text", text, fence]


def report_markdown(settings: dict, metrics: dict[str, dict], prompts: Sequence[EvalPrompt], results: Sequence[ColumnResult],
                    benchmarks: dict[str, dict] | None = None, charts: Sequence[tuple[str, Path]] = (),
                    chart_notes: Sequence[str] = (), study: Sequence[str] = ()) -> str:
    """The report; ``study``: the stage comparisons' lines (evaluation/study_report.py), shown first."""
    benchmarks = benchmarks or {}
    lines = ["# Evaluation: base vs fine-tuned", "", *study, "## Summary", "", summary_table(metrics, list(benchmarks)), ""]
    for title, path in charts:
        lines += [f"![{title}](charts/{path.name})", ""]
    lines += [f"{note}" for note in chart_notes] + ([""] if chart_notes else [])
    lines += ["## Settings", ""]
    lines += [f"- {key}: `{value}`" for key, value in settings.items() if not isinstance(value, (dict, list))]
    lines += ["", "## Metrics", "", metrics_table(metrics, markdown=True), ""]
    templates = settings["templates"]
    lines += [f"Validation loss: response tokens + EOS, teacher-forced, over {settings['val_loss_examples']}. "
              f"Generation metrics over {len(prompts)} prompts (greedy, at most {settings['max_new_tokens']} new tokens); "
              "ROUGE-L only where a reference exists.", ""]
    cut = [f"{label}: {v['val_truncated']} cut at max_seq_length (scored on what fits), {v['val_dropped']} left out "
           "(prompt alone too long)" for label, v in metrics.items() if v.get("val_truncated") or v.get("val_dropped")]
    if cut:
        lines += ["Validation examples not scored whole: " + "; ".join(cut) + ".", ""]
    if "prefs_file" in settings:
        lines += [f"Preference metrics over {_pairs_used(settings)} of `{settings['prefs_file']}`: pref acc (vs base) = "
                  f"share where the implicit reward {settings['prefs_beta']} x (log p_model - log p_base) of the response "
                  "ranks chosen above rejected, the base model as reference (undefined for the base model itself; DPO's "
                  "own held-out accuracy in its metrics.json is measured against its reference, the SFT model with "
                  "--init sft, so the two differ); reward margin = its mean chosen - rejected difference; "
                  "chosen likelier = share where the model alone gives chosen the higher log-prob.", ""]
    if "reward_model" in settings:
        lines += [f"reward (RM): mean score of the reward model `{settings['reward_model']}` on each model's generations "
                  f"(prompts rendered with its template `{settings['reward_model_template']}`).", ""]
    shared: dict[str, tuple[dict, list[str]]] = {}  # columns with the same template are listed together
    for label, template in templates.items():
        shared.setdefault(json.dumps(template, sort_keys=True), (template, []))[1].append(label)
    for template, labels in shared.values():  # the exact text the models were prompted with
        lines += [f"Prompt template for {', '.join(labels)} (`{template['name']}`, from its run's saved config):", ""]
        if template.get("kind") == "chat":  # the tokenizer's chat template: show the first prompt as rendered
            example = next((r.prompts[0] for r in results if r.spec.label in labels and r.prompts), "")
            lines += ["the tokenizer's own chat template; the first prompt as the models saw it:", ""]
            lines += _fenced(example) + [""]
        else:
            lines += _fenced(template["prompt_no_input"]) + [""]
    if benchmarks:
        lines += report_section(benchmarks, settings["if_max_new_tokens"])
    lines += ["## Generations", ""]
    for i, prompt in enumerate(prompts):
        lines += [f"### {i + 1}. `{prompt.prompt_id}` ({prompt.source})", "", f"**Instruction:** {prompt.instruction}"]
        if prompt.input:
            lines += ["", f"**Input:** {prompt.input}"]
        for result in results:
            gen = result.generations[i]
            ending = "EOS" if gen.stopped_with_eos else "cut at max_new_tokens"
            lines += ["", f"**{result.spec.label}** ({gen.num_tokens} tokens, {ending}):", ""] + _fenced(gen.text.strip() or "(empty)")
        if prompt.reference is not None:
            lines += ["", "**reference:**", ""] + _fenced(prompt.reference.strip())
        lines.append("")
    return "\n".join(lines)


def write_outputs(out_dir: Path, settings: dict, metrics: dict, prompts: Sequence[EvalPrompt], results: Sequence[ColumnResult],
                  if_runs: Sequence[BenchmarkRun] = (), pairs: dict | None = None, phases: dict | None = None) -> list[Path]:
    """Everything an evaluation leaves: generations, metrics.json, IF files, charts, then report.md. Returns the paths.

    ``pairs``: per column, the per-pair preference outcomes (for the intervals of the stage comparisons).
    ``phases``: where the evaluation's time went (``core.phases.PhaseClock.report``), kept in metrics.json.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = generation_rows(prompts, results)
    tmp = out_dir / ".generations.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(out_dir / "generations.jsonl")
    written = [out_dir / "report.md", out_dir / "generations.jsonl", out_dir / "metrics.json"]
    for run in if_runs:
        written += write_benchmark_files(out_dir, run)
    benchmarks = {run.name: run.to_dict() for run in if_runs}
    document = {"settings": settings, "models": metrics, **({"instruction_following": benchmarks} if benchmarks else {})}
    items = {run.name: benchmark_items(run) for run in if_runs}
    if items:  # every verdict behind the report's numbers, small enough for git (scripts/verify_study.py reads it)
        written.append(write_per_prompt(out_dir / PER_PROMPT_FILE, per_prompt_rows(items, settings.get("if_max_new_tokens"))))
    comparisons, study_lines, study_charts = study_section(out_dir, settings, metrics, results, if_runs, pairs, items=items)
    if comparisons is not None:
        document["comparisons"] = comparisons
    groups, group_lines = type_group_section(if_runs, settings, DEFAULT_RESAMPLES, benchmark_items)  # evaluation/if_sets.py
    if groups is not None:
        document["ifeval_by_type_group"] = groups
    if phases is not None:
        document["phases"] = phases
    write_json_atomic(out_dir / "metrics.json", document)
    notes: list[str] = []
    charts = write_charts(document, out_dir / "charts", notes)
    tmp = out_dir / ".report.md.tmp"
    tmp.write_text(report_markdown(settings, metrics, prompts, results, benchmarks, charts, notes, study_lines + group_lines),
                   encoding="utf-8")
    tmp.replace(out_dir / "report.md")
    return written + [path for _, path in charts] + study_charts


