"""scripts/verify_study.py: a tiny report re-derived from its per-prompt file passes; a planted mismatch fails."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from evaluation import comparisons as cmp
from evaluation.per_prompt import PER_PROMPT_FILE, per_prompt_rows, read_per_prompt, write_per_prompt
from evaluation.study_report import report_lines
from scripts.verify_study import main as verify_main

RESAMPLES = 500
STAGES = {"base": "base", "sft": "sft", "control_s0": "sft", "control_s1": "sft", "dpo_if_s0": "dpo", "dpo_if_s1": "dpo"}


def _items(rng, n: int) -> list[cmp.PromptItem]:
    out = []
    for i in range(n):
        passes = [bool(x) for x in rng.random(2) < 0.5]
        instructions = (("a", passes[0], True), ("b", passes[1], passes[1] or i % 2 == 0))
        strict = None if i == n - 1 and rng.random() < 0.5 else all(passes)
        loose = None if strict is None else all(x[2] for x in instructions)
        out.append(cmp.PromptItem(f"k{i}", strict, loose, instructions if strict is not None else (), int(rng.integers(5, 13)),
                                  bool(rng.random() < 0.6), bool(rng.random() < 0.2)))
    return out


def write_tiny_report(folder: Path) -> Path:
    """What the eval stage leaves for the study sections: metrics.json, per_prompt.jsonl.gz, report.md."""
    rng = np.random.default_rng(7)
    benchmarks = {bench: {label: _items(rng, 24) for label in STAGES} for bench in ("ifeval", "if_val_seen")}
    settings = {"seed": 3, "if_max_new_tokens": 12, "primary_contrasts": "sft:base,control:sft,dpo_if:control",
                "columns": [{"label": label, "kind": "base" if stage == "base" else f"{stage} adapter"}
                            for label, stage in STAGES.items()]}
    inputs = cmp.StudyInputs(stages=dict(STAGES), benchmarks=benchmarks, max_new_tokens=12)
    comparisons = cmp.build_comparisons(inputs, RESAMPLES, 3, [("sft", "base"), ("control", "sft"), ("dpo_if", "control")])
    comparisons["columns"]["sft"]["val_loss"] = {"value": 2.5, "low": 2.4, "high": 2.6, "n": 3, "tokens": 30}  # recorded only
    comparisons["charts"] = {}
    folder.mkdir(parents=True, exist_ok=True)
    models = {label: {} for label in STAGES}
    for bench, by_label in benchmarks.items():
        for label, items in by_label.items():
            scored = [i for i in items if i.scored]
            inst = [x for i in scored for x in i.instructions]
            models[label].update({f"{bench}_prompt_strict": sum(i.strict for i in scored) / len(scored),
                                  f"{bench}_prompt_loose": sum(i.loose for i in scored) / len(scored),
                                  f"{bench}_instruction_strict": sum(x[1] for x in inst) / len(inst),
                                  f"{bench}_instruction_loose": sum(x[2] for x in inst) / len(inst),
                                  f"{bench}_prompts_scored": len(scored),
                                  f"{bench}_stop_rate": sum(i.stopped for i in items) / len(items)})
    document = {"settings": settings, "models": models, "comparisons": comparisons}
    (folder / "metrics.json").write_text(json.dumps(document), encoding="utf-8")
    write_per_prompt(folder / PER_PROMPT_FILE, per_prompt_rows(benchmarks, 12))
    lines = report_lines(comparisons, {})
    (folder / "report.md").write_text("\n".join(["# Evaluation: base vs fine-tuned", "", *lines, "## Summary", ""]), encoding="utf-8")
    return folder


@pytest.fixture()
def tiny_report(tmp_path) -> Path:
    return write_tiny_report(tmp_path / "study" / "report")


def test_an_untouched_report_passes_with_a_one_line_summary(tiny_report, capsys):
    assert verify_main([str(tiny_report.parent)]) == 0  # a study folder: its report/ is found
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("checked ") and ": all match;" in out[0]
    assert "taken as recorded" in out[0]


def test_a_count_edited_in_report_md_fails_naming_the_line(tiny_report, capsys):
    report = tiny_report / "report.md"
    lines = report.read_text(encoding="utf-8").split("\n")
    index = next(i for i, line in enumerate(lines) if line.startswith("| dpo_if vs control |"))
    passed, n = lines[index].split(" (")[1].split(",")[0].split("/")  # the arm's first seed: "12/24"
    lines[index] = lines[index].replace(f"({passed}/{n}", f"({int(passed) + 1}/{n}", 1)
    report.write_text("\n".join(lines), encoding="utf-8")
    assert verify_main([str(tiny_report)]) == 1
    out = capsys.readouterr().out
    assert f"mismatch: report.md line {index + 1}: shows " in out and "1 mismatch(es)" in out


def test_a_verdict_flipped_in_per_prompt_fails(tiny_report, capsys):
    path = tiny_report / PER_PROMPT_FILE
    rows = read_per_prompt(path)
    row = next(r for r in rows if r["column"] == "dpo_if_s1" and r["benchmark"] == "ifeval" and r["prompt_strict"] is False)
    for instruction in row["instructions"]:  # a consistent edit: the row agrees with itself, the numbers do not
        instruction[1] = instruction[2] = True
    row["prompt_strict"] = row["prompt_loose"] = True
    row["instruction_strict"] = row["instruction_loose"] = [len(row["instructions"])] * 2
    write_per_prompt(path, rows)
    assert verify_main([str(tiny_report)]) == 1
    out = capsys.readouterr().out
    assert "mismatch: columns.dpo_if_s1.benchmarks.ifeval.prompt_strict.passed: metrics.json has " in out
    assert "mismatch: report.md line" in out  # the primary table's counts and p move too


def test_a_row_that_contradicts_itself_is_listed(tiny_report, capsys):
    path = tiny_report / PER_PROMPT_FILE
    rows = read_per_prompt(path)
    row = next(r for r in rows if r["prompt_strict"] is False)
    row["prompt_strict"] = True  # its instructions still say one failed
    write_per_prompt(path, rows)
    assert verify_main([str(tiny_report)]) == 1
    assert "prompt_strict is True but its instructions say False" in capsys.readouterr().out


def test_a_report_without_per_prompt_verdicts_is_a_one_line_error(tiny_report, capsys):
    from core.cli import run_cli

    (tiny_report / PER_PROMPT_FILE).unlink()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(verify_main, [str(tiny_report)])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"has no {PER_PROMPT_FILE}" in err[0]


def test_a_models_number_edited_in_metrics_json_fails(tiny_report, capsys):
    path = tiny_report / "metrics.json"
    document = json.loads(path.read_text(encoding="utf-8"))
    document["models"]["sft"]["if_val_seen_prompts_scored"] += 1
    path.write_text(json.dumps(document), encoding="utf-8")
    assert verify_main([str(tiny_report)]) == 1
    assert "mismatch: models.sft.if_val_seen_prompts_scored: metrics.json has " in capsys.readouterr().out
