"""What the report's answer says beside the scores: truncated answers and each trained column's budget (no model)."""
from __future__ import annotations

import json

from core.prompting import load_template
from core.runs import RUN_CONFIG_FILES
from evaluation import comparisons as cmp
from evaluation.report_notes import MOSTLY_CUT_SHARE, budget_sentence, training_budget, truncation_warnings
from evaluation.study_report import report_lines
from test_study_report import RESAMPLES, items


def _study(cut_sft: int, n: int = 40) -> dict:
    """base stops on every prompt; SFT is cut at max_new_tokens on ``cut_sft`` of ``n`` prompts and stops on the rest."""
    base = items([(True, True)] * n, [12] * n, [True] * n)
    sft = items([(False, False)] * n, [192] * cut_sft + [20] * (n - cut_sft), [False] * cut_sft + [True] * (n - cut_sft))
    return cmp.build_comparisons(cmp.StudyInputs(stages={"base": "base", "sft": "sft"},
                                                 benchmarks={"ifeval": {"base": base, "sft": sft}}, max_new_tokens=192),
                                 RESAMPLES, seed=1)


def _name(label: str) -> str:
    return cmp.stage_name(label, {"base": "base", "sft": "sft"})


def test_a_column_whose_answers_were_all_cut_is_warned_about_first():
    study = _study(cut_sft=40)
    assert truncation_warnings(study, _name) == [
        "Warning: 40/40 of SFT's IFEval answers were cut at 192 tokens (0 stopped with EOS): "
        "its IFEval scores measure truncated text."]
    lines = report_lines(study, {})
    answer = lines.index("## The answer")  # after the declared primary metric, the answer opens with the warning
    assert lines[0] == "## Primary metric and contrasts" and lines[answer + 2].startswith("Warning: 40/40 of SFT's IFEval")


def test_one_warning_a_column_names_every_benchmark_it_was_cut_on():
    study = _study(cut_sft=40)
    study["columns"]["sft"]["confounds"]["if_val_seen"] = {"responses": 20, "cut_at_max_new_tokens": 20, "stopped": 0,
                                                           "max_new_tokens": 192}
    assert truncation_warnings(study, _name) == [
        "Warning: SFT's answers were mostly cut at the token limit (IFEval 40/40 cut at 192 tokens, 0 stopped with EOS; "
        "IF val, seen types 20/20 cut at 192 tokens, 0 stopped with EOS): its scores there measure truncated text."]


def test_no_warning_while_most_answers_stop():
    mostly_stopped = int(MOSTLY_CUT_SHARE * 40)  # exactly half cut: not "mostly"
    assert truncation_warnings(_study(cut_sft=mostly_stopped), _name) == []
    assert len(truncation_warnings(_study(cut_sft=mostly_stopped + 1), _name)) == 1


def _saved_run(run_dir, stage: str, config: dict, metrics: dict):
    run_dir.mkdir()
    payload = {"stage": stage, "config": config, "template": load_template("alpaca").to_dict(), "base_model": "tiny"}
    (run_dir / RUN_CONFIG_FILES[stage]).write_text(json.dumps(payload))
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    return run_dir


def test_each_trained_columns_budget_is_read_from_its_saved_run(tmp_path):
    config = {"max_steps": 60, "learning_rate": 2e-4, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2}
    sft = _saved_run(tmp_path / "sft", "sft", config, {"global_step": 60, "epoch": 0.248963, "train_tokens_seen": 108937,
                                                       "world_size": 1, "data": {"train": {"emitted": 1926}}})
    dpo = _saved_run(tmp_path / "dpo", "dpo", {**config, "max_steps": 24, "learning_rate": 2e-5},
                     {"global_step": 24, "epoch": 1.090909, "train_tokens_seen": 42370, "world_size": 1,
                      "data": {"train": {"used": 86}}})
    budgets = {"sft": training_budget(sft), "dpo": training_budget(dpo)}
    assert budgets["sft"]["steps"] == 60 and budgets["sft"]["items"] == 1926 and budgets["sft"]["effective_batch"] == 8
    assert budget_sentence(budgets, lambda label: label.upper()) == (
        "Training budgets (from each run's saved config and metrics): SFT: 60 optimizer steps (0.25 epochs of 1,926 "
        "examples, effective batch 8), 108,937 tokens trained, lr 0.0002; DPO: 24 optimizer steps (1.09 epochs of 86 "
        "pairs, effective batch 8), 42,370 tokens trained, lr 2e-05.")
    assert training_budget(tmp_path / "missing") is None and training_budget(None) is None
    study = _study(cut_sft=0) | {"budgets": {"sft": budgets["sft"]}}
    text = "\n".join(report_lines(study, {}))
    assert text.index("Training budgets (from each run's saved config and metrics): SFT: 60 optimizer steps") < text.index(
        "## Headline numbers")
