"""Re-derive a report's study numbers from its committed files, and list every one that does not match.

From ``per_prompt.jsonl.gz`` (every prompt's verdicts) and ``metrics.json`` (the columns, the seed and resample
count the report used, its ``comparisons`` section), :func:`verify_report` recomputes the ``comparisons``
section with the same code the report was made with (``evaluation/comparisons.py``, ``evaluation/seeds.py``)
and checks (1) every number of the stored section, and each model's IF numbers in ``models`` (the Summary and
Metrics tables), against the recomputation, and (2) that ``report.md``'s
study sections (from the primary metric to "How the intervals and p-values were made") are, line for
line, the text the recomputed numbers give. The numbers whose per-item data the files do not hold
(validation loss per example, preference pairs, reward margins, training budgets, the RLOO monitor)
are taken as recorded and counted apart. No weights are read.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from core.cli import UserError
from evaluation.anchor import study_anchor
from evaluation import comparisons as cmp
from evaluation.per_prompt import PER_PROMPT_FILE, items_from_rows, read_per_prompt, row_problems
from evaluation.seeds import parse_contrasts
from evaluation.study_report import report_lines

RECORDED_ITEM_KEYS = ("val_loss", "pref_accuracy", "logp_accuracy", "reward_margin")  # per column and per pair
RECORDED_TOP_KEYS = ("budgets", "rloo_monitor", "charts")
REPORT_HEAD = 2  # report.md's title and a blank line come before the study sections
NUMBER = re.compile(r"\d+(?:[.,]\d+)*")


@dataclass
class Verification:
    json_numbers: int = 0
    report_numbers: int = 0
    recorded_numbers: int = 0
    mismatches: list[str] = field(default_factory=list)

    def summary(self) -> str:
        checked = self.json_numbers + self.report_numbers
        head = (f"checked {checked:,} numbers ({self.json_numbers:,} in metrics.json's comparisons and models, {self.report_numbers:,} "
                f"printed in report.md's study sections)")
        tail = (f"; {self.recorded_numbers:,} taken as recorded (validation loss, preference pairs, budgets, RLOO monitor: "
                f"their per-item data is not in {PER_PROMPT_FILE})")
        return (f"{head}: all match{tail}" if not self.mismatches else f"{head}: {len(self.mismatches)} mismatch(es){tail}")


def report_dir(path: str | Path) -> Path:
    """The folder holding report.md, metrics.json and per_prompt.jsonl.gz: ``path`` itself or its ``report/``."""
    path = Path(path)
    for candidate in (path, path / "report"):
        if (candidate / "report.md").is_file() and (candidate / "metrics.json").is_file():
            if not (candidate / PER_PROMPT_FILE).is_file():
                raise UserError(f"{candidate} has no {PER_PROMPT_FILE}: its report was made before per-prompt verdicts "
                                "were kept; re-run the report step to re-check it")
            return candidate
    raise UserError(f"{path}: no report.md with metrics.json here or in {path / 'report'}")


def _count_numbers(value: Any) -> int:
    if isinstance(value, Mapping):
        return sum(_count_numbers(v) for v in value.values())
    if isinstance(value, list):
        return sum(_count_numbers(v) for v in value)
    return int(isinstance(value, (int, float)) and not isinstance(value, bool))


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        if a is None or b is None or isinstance(a, bool) or isinstance(b, bool):
            return False
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) or (math.isnan(a) and math.isnan(b))
    return a == b


def compare(stored: Any, recomputed: Any, path: str, out: Verification, skip: tuple[str, ...] = ()) -> None:
    """Every leaf of ``stored`` against ``recomputed``, by key path; keys in ``skip`` are counted as recorded."""
    if isinstance(stored, Mapping) and isinstance(recomputed, Mapping):
        for key in sorted(set(stored) | set(recomputed)):
            if key in skip:
                out.recorded_numbers += _count_numbers(stored.get(key))
            elif key not in stored or key not in recomputed:
                out.mismatches.append(f"{path}.{key}: {'absent' if key not in stored else 'present'} in metrics.json, "
                                      f"{'absent' if key not in recomputed else 'present'} when recomputed")
            else:
                compare(stored[key], recomputed[key], f"{path}.{key}", out, ())
        return
    if isinstance(stored, list) and isinstance(recomputed, list) and len(stored) == len(recomputed):
        for index, (a, b) in enumerate(zip(stored, recomputed)):
            compare(a, b, f"{path}[{index}]", out, skip)
        return
    out.json_numbers += _count_numbers(stored)
    if not _same(stored, recomputed):
        out.mismatches.append(f"{path}: metrics.json has {stored!r}, recomputed {recomputed!r}")


def compare_comparisons(stored: Mapping, recomputed: Mapping, out: Verification) -> None:
    """The section, key by key; per-item keys without per-item data and the top-level records are skipped."""
    for key in sorted(set(stored) | set(recomputed)):
        if key in RECORDED_TOP_KEYS:
            out.recorded_numbers += _count_numbers(stored.get(key))
        elif key == "columns" and isinstance(stored.get(key), Mapping) and isinstance(recomputed.get(key), Mapping):
            for label in sorted(set(stored[key]) | set(recomputed[key])):
                compare(stored[key].get(label), recomputed[key].get(label), f"columns.{label}", out, RECORDED_ITEM_KEYS)
        elif key == "pairs":  # a list: each pair is compared with the per-item keys skipped
            compare(stored.get(key), recomputed.get(key), key, out, RECORDED_ITEM_KEYS)
        else:
            compare(stored.get(key), recomputed.get(key), key, out)


def with_recorded(recomputed: dict, stored: Mapping) -> dict:
    """The recomputed section with the recorded-only parts copied in: what report.md was written from."""
    for label, column in recomputed["columns"].items():
        column.update({k: v for k, v in stored.get("columns", {}).get(label, {}).items() if k in RECORDED_ITEM_KEYS})
    by_pair = {(p["before"], p["after"], p["kind"]): p for p in stored.get("pairs", [])}
    for pair in recomputed["pairs"]:
        pair.update({k: v for k, v in by_pair.get((pair["before"], pair["after"], pair["kind"]), {}).items()
                     if k in RECORDED_ITEM_KEYS})
    recomputed.update({k: stored[k] for k in RECORDED_TOP_KEYS if k in stored})
    return recomputed


def compare_report(report: Path, lines: list[str], out: Verification) -> None:
    """report.md's study sections against the lines the recomputed numbers give, line for line."""
    shown = report.read_text(encoding="utf-8").split("\n")[REPORT_HEAD:REPORT_HEAD + len(lines)]
    for number, (have, want) in enumerate(zip(shown + [""] * (len(lines) - len(shown)), lines), start=REPORT_HEAD + 1):
        out.report_numbers += len(NUMBER.findall(want))
        if have != want:
            out.mismatches.append(f"report.md line {number}: shows {have!r}; the recomputed numbers give {want!r}")


def headline_numbers(items: list[cmp.PromptItem]) -> dict[str, float | int | None]:
    """The flat per-model IF numbers of metrics.json's ``models`` table (the Summary and Metrics tables), from the items."""
    scored = [item for item in items if item.scored]
    instructions = [i for item in scored for i in item.instructions]

    def share(passed: int, total: int) -> float | None:
        return passed / total if total else None

    return {"prompt_strict": share(sum(bool(i.strict) for i in scored), len(scored)),
            "prompt_loose": share(sum(bool(i.loose) for i in scored), len(scored)),
            "instruction_strict": share(sum(bool(i[1]) for i in instructions), len(instructions)),
            "instruction_loose": share(sum(bool(i[2]) for i in instructions), len(instructions)),
            "prompts_scored": len(scored), "stop_rate": share(sum(i.stopped for i in items), len(items))}


def compare_models(models: Mapping, benchmarks: Mapping, out: Verification) -> None:
    """metrics.json's per-model IF numbers against the per-prompt verdicts."""
    for bench, by_label in benchmarks.items():
        for label, items in by_label.items():
            recorded = models.get(label, {})
            for key, value in headline_numbers(items).items():
                compare(recorded.get(f"{bench}_{key}"), value, f"models.{label}.{bench}_{key}", out)


def verify_report(path: str | Path) -> Verification:
    folder = report_dir(path)
    try:
        document = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
        settings, stored = document["settings"], document["comparisons"]
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{folder / 'metrics.json'}: no settings / comparisons section to check ({exc})") from None
    rows = read_per_prompt(folder / PER_PROMPT_FILE)
    out = Verification(mismatches=row_problems(rows, settings.get("if_max_new_tokens")))
    inputs = cmp.StudyInputs(stages={c["label"]: cmp.column_stage(c) for c in settings["columns"]},
                             benchmarks=items_from_rows(rows), max_new_tokens=settings.get("if_max_new_tokens"))
    method = stored["method"]
    recomputed = cmp.build_comparisons(inputs, int(method["resamples"]), int(method["seed"]),
                                       parse_contrasts(settings.get("primary_contrasts")))
    anchor = study_anchor(str(settings.get("base_model", "")), inputs.stages, inputs.benchmarks.get("ifeval", {}))
    if anchor:
        recomputed["anchor"] = anchor
    compare_comparisons(stored, recomputed, out)
    compare_models(document.get("models") or {}, inputs.benchmarks, out)
    full = with_recorded(recomputed, stored)
    compare_report(folder / "report.md", report_lines(full, full.get("charts") or {}), out)
    return out
