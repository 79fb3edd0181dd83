"""IFEval inside the eval stage, the charts, and the one-command study (scripts/run_study.py), on CPU, offline.

A tiny Llama and adapters trained in the test; IFEval prompts hand-written in the release format.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import tiny_assets
from core.cli import UserError
from evaluation.charts import write_charts
from evaluation.score_if import SCORES_FILE, main as score_main
from scripts import run_study
from sft.eval_sft import main as eval_main
from test_eval_sft import NO_PREFS, train_adapter

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
IFEVAL_ROWS = [  # release format; instruction types a tiny model passes or fails by chance
    {"key": 1, "prompt": "Write a short note. Do not use any commas.", "instruction_id_list": ["punctuation:no_comma"],
     "kwargs": [{}]},
    {"key": 2, "prompt": "Answer in lowercase only.", "instruction_id_list": ["change_case:english_lowercase"],
     "kwargs": [{}]},
    {"key": 3, "prompt": "Write fewer than 5 words, no commas.",
     "instruction_id_list": ["length_constraints:number_words", "punctuation:no_comma"],
     "kwargs": [{"relation": "less than", "num_words": 5}, {}]},
    {"key": 4, "prompt": "Not evaluated: beyond --ifeval_limit.", "instruction_id_list": ["punctuation:no_comma"],
     "kwargs": [{}]},
]


@pytest.fixture(scope="module")
def ifeval_file(tmp_path_factory) -> Path:
    return tiny_assets.write_jsonl(tmp_path_factory.mktemp("ifeval") / "ifeval.jsonl", IFEVAL_ROWS)


@pytest.fixture(scope="module")
def if_eval_run(tiny_llama_dir, ifeval_file, tmp_path_factory):
    """One eval of base | sft with IFEval limited to 3 prompts."""
    root = tmp_path_factory.mktemp("if_runs")
    val = tiny_assets.write_jsonl(root / "sft_val.jsonl", tiny_assets.sft_rows()[:4])
    adapter = train_adapter(root / "sft_output", tiny_llama_dir, val, seed=0, steps=5)
    out_dir = root / "eval"
    eval_main(NO_PREFS + ["--adapter_dir", str(adapter), "--num_examples", "1", "--builtin_prompts", "false",
                          "--max_new_tokens", "6", "--max_eval_samples", "3", "--out_dir", str(out_dir),
                          "--ifeval", str(ifeval_file), "--ifeval_limit", "3", "--if_max_new_tokens", "10"])
    return out_dir, json.loads((out_dir / "metrics.json").read_text())


def test_ifeval_adds_the_four_numbers_per_model_and_a_per_type_breakdown(if_eval_run):
    out_dir, metrics = if_eval_run
    for label in ("base", "sft"):
        values = metrics["models"][label]
        for key in ("prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose"):
            assert 0.0 <= values[f"ifeval_{key}"] <= 1.0
        assert values["ifeval_prompts_scored"] == 3  # the limit: the 4th prompt is not evaluated
    ifeval = metrics["instruction_following"]["ifeval"]
    assert ifeval["prompts"] == 3 and ifeval["limit"] == 3
    per_type = ifeval["models"]["sft"]["per_type"]
    assert set(per_type) == {"punctuation:no_comma", "change_case:english_lowercase", "length_constraints:number_words"}
    assert per_type["punctuation:no_comma"]["count"] == 2
    report = (out_dir / "report.md").read_text(encoding="utf-8")
    assert report.index("## Summary") < report.index("## Settings") < report.index("## Instruction following")
    assert "| ifeval prompt-level strict (%) |" in report and "punctuation:no_comma" in report


def test_if_generations_are_saved_and_rescore_to_the_same_numbers(if_eval_run, ifeval_file, tmp_path, capsys):
    out_dir, metrics = if_eval_run
    rows = [json.loads(line) for line in (out_dir / "if_ifeval_generations.jsonl").read_text().splitlines()]
    assert [(r["key"], r["model"]) for r in rows] == [(k, m) for k in (1, 2, 3) for m in ("base", "sft")]
    assert all(isinstance(r["response"], str) for r in rows)
    with pytest.raises(UserError, match="several models"):
        score_main(["--responses", str(out_dir / "if_ifeval_generations.jsonl"), "--data", str(ifeval_file)])
    score_main(["--responses", str(out_dir / "if_ifeval_generations.jsonl"), "--model", "sft", "--data", str(ifeval_file),
                "--limit", "3", "--out", str(tmp_path)])
    rescored = json.loads((tmp_path / SCORES_FILE).read_text())
    for key in ("prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose"):
        assert rescored[key] == metrics["models"]["sft"][f"ifeval_{key}"]


def test_eval_charts_are_pngs_and_embedded_in_the_report(if_eval_run):
    out_dir, _ = if_eval_run
    report = (out_dir / "report.md").read_text(encoding="utf-8")
    for name in ("if_accuracy.png", "if_per_type_ifeval.png", "val_loss.png", "stop_rate.png"):
        path = out_dir / "charts" / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE and path.stat().st_size > 1000
        assert f"(charts/{name})" in report
    assert not (out_dir / "charts" / "pref_accuracy.png").exists()  # no pairs, no chart


def test_charts_only_for_data_that_exist(tmp_path):
    models = {"base": {"val_loss": 2.0, "stop_rate": 0.1, "logp_accuracy": 0.5, "pref_accuracy": None},
              "dpo": {"val_loss": 1.5, "stop_rate": 0.6, "logp_accuracy": 0.7, "pref_accuracy": 0.8}}
    charts = dict(write_charts({"models": models}, tmp_path))
    assert set(charts) == {"Validation loss", "Stop rate", "Preference accuracy"}
    assert all(path.read_bytes()[:8] == PNG_SIGNATURE for path in charts.values())
    assert write_charts({"models": {"base": {}}}, tmp_path / "empty") == []


def test_percent_labels_round_half_away_from_zero():
    from evaluation.charts import percent_text
    from evaluation.report import metrics_table

    assert [percent_text(v) for v in (0.125, 0.075, 0.5, 1 / 3, 0.0, 1.0, 0.005)] == ["13", "8", "50", "33", "0", "100", "1"]
    assert percent_text(0.125, 1) == "12.5"
    assert "13%" in metrics_table({"sft": {"stop_rate": 0.125}})


def _per_type_benchmark(types: int, passed: int, models=("base", "sft", "dpo", "rloo")) -> dict:
    """A benchmark's metrics where only the first ``passed`` instruction types are ever passed."""
    per_type = {f"type_{i:02d}": {"count": 4, "strict_pass": int(i < passed), "loose_pass": int(i < passed),
                                  "strict": 0.25 * (i < passed), "loose": 0.25 * (i < passed)} for i in range(types)}
    return {"source": "x", "limit": None, "prompts": 4 * types, "models": {
        m: {"prompt_strict": 0.1, "prompt_loose": 0.1, "instruction_strict": 0.1, "instruction_loose": 0.1,
            "per_type": per_type, "unscored": []} for m in models}}


def test_per_type_chart_leaves_out_all_zero_types_and_stays_short(tmp_path):
    from PIL import Image

    from evaluation.charts import shown_types

    data = _per_type_benchmark(types=25, passed=3)
    assert shown_types(data) == (["type_00", "type_01", "type_02"], [f"type_{i:02d}" for i in range(3, 25)])
    notes: list[str] = []
    charts = dict(write_charts({"models": {}, "instruction_following": {"ifeval": data}}, tmp_path, notes))
    height = Image.open(charts["ifeval per instruction type"]).size[1]
    assert height < 600  # 3 types x 4 models; all 25 types were 2,552 px tall
    every_type = dict(write_charts({"instruction_following": {"ifeval": _per_type_benchmark(25, 25)}}, tmp_path / "all"))
    assert Image.open(every_type["ifeval per instruction type"]).size[1] <= 990  # bounded (9 in at 110 dpi)
    nothing = dict(write_charts({"instruction_following": {"ifeval": _per_type_benchmark(5, 0)}}, tmp_path / "none", notes))
    assert "ifeval per instruction type" not in nothing and any("per-type chart" in n for n in notes)


def test_an_all_zero_stop_rate_chart_is_not_drawn_and_the_report_says_why(tmp_path):
    from evaluation.report import report_markdown

    notes: list[str] = []
    models = {"base": {"val_loss": 2.0, "stop_rate": 0.0}, "sft": {"val_loss": 1.5, "stop_rate": 0.0}}
    charts = dict(write_charts({"models": models}, tmp_path, notes))
    assert set(charts) == {"Validation loss"} and not (tmp_path / "stop_rate.png").exists()
    assert notes == ["No stop-rate chart: no generation of any model ended with EOS (0% everywhere; every one was cut "
                     "at max_new_tokens)."]
    settings = {"templates": {}, "val_loss_examples": "1", "max_new_tokens": 4, "if_max_new_tokens": 4}
    assert notes[0] in report_markdown(settings, models, [], [], charts=list(charts.items()), chart_notes=notes)
    models["sft"]["stop_rate"] = 0.25
    assert "Stop rate" in dict(write_charts({"models": models}, tmp_path / "some"))


def test_score_if_out_ending_in_json_is_the_file(if_eval_run, ifeval_file, tmp_path):
    out_dir, _ = if_eval_run
    argv = ["--responses", str(out_dir / "if_ifeval_generations.jsonl"), "--model", "sft", "--data", str(ifeval_file)]
    score_main(argv + ["--out", str(tmp_path / "scores" / "sft.json")])
    assert (tmp_path / "scores" / "sft.json").is_file()
    assert json.loads((tmp_path / "scores" / "sft.json").read_text())["prompts_total"] == len(IFEVAL_ROWS)
    score_main(argv + ["--out", str(tmp_path / "folder")])
    assert (tmp_path / "folder" / SCORES_FILE).is_file()


def test_a_bad_ifeval_file_is_a_one_line_error_before_any_model_is_loaded(if_eval_run, tmp_path, monkeypatch):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"key": 1, "prompt": "no instruction list"}\n')
    import evaluation.run

    monkeypatch.setattr(evaluation.run, "build_shared_model", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(UserError, match="release format"):
        eval_main(NO_PREFS + ["--adapter_dir", str(if_eval_run[0].parent / "sft_output"), "--ifeval", str(bad)])
    with pytest.raises(UserError, match="release format"):
        run_study.check_benchmarks([run_study.Stage("report", ["sft.eval_sft", "--ifeval", str(bad)], bad)], offline=True)


# --------------------------------------------------------------------------- the one-command study


# The IFEval types the study's IF prompts train on: the ones a random tiny model passes or fails by chance (a comma,
# an upper-case letter, a letter's count), so that its samples differ and the checker finds pairs. The rest are held out.
SEEN_TYPES = ("punctuation:no_comma", "change_case:english_lowercase", "keywords:letter_frequency")


def _study_argv(tmp_path: Path, tiny_llama_dir: Path, ifeval_file: Path) -> list[str]:
    from core.if_checker import checker_registry

    raw = tmp_path / "raw"
    raw.mkdir()
    records = [{"instruction": f"{inst} (variant {n})", "input": inp, "output": out}
               for n in range(6) for inst, inp, out in tiny_assets.INSTRUCTIONS]
    (raw / "alpaca_data.json").write_text(json.dumps(records))
    held_out = ",".join(t for t in sorted(checker_registry("ifeval")) if t not in SEEN_TYPES)
    # max_seq_length 384: the constrained prompts are long in the tiny tokenizer's 400 pieces
    return ["--quick", "--offline", "--out_dir", str(tmp_path / "study"), "--model_name_or_path", str(tiny_llama_dir),
            "--raw_dir", str(raw), "--sources", "alpaca_data.json", "--ifeval_data", str(ifeval_file),
            "--sft_args", "--max_steps 2 --max_train_samples 16 --max_eval_samples 4 --max_seq_length 384 "
                          "--eval_steps 1 --save_steps 2 --per_device_train_batch_size 2 --gradient_accumulation_steps 1",
            "--pairs_args", "--num_pairs 8 --max_new_tokens 8 --batch_size 8",
            "--dpo_args", "--max_steps 2 --max_eval_samples 4 --max_length 384 --eval_steps 1 --save_steps 2 "
                          "--per_device_train_batch_size 2",
            "--eval_args", "--num_examples 2 --max_new_tokens 8 --max_eval_samples 4 --if_max_new_tokens 8 --ifeval_limit 3 "
                           "--if_sets_limit 3",
            "--if_prompts_args", f"--num_train 32 --num_val 4 --held_out {held_out}",
            "--if_pairs_args", "--num_pairs 32 --samples_per_prompt 4 --max_new_tokens 32 --batch_size 16 --val_ratio 0.3",
            "--reward_args", "--max_steps 2 --max_eval_samples 4 --max_length 384 --eval_steps 1 --save_steps 2 "
                             "--per_device_train_batch_size 1",  # not --dpo_args' words: the test below changes those alone
            "--control_args", "--max_eval_samples 4 --max_seq_length 384 --eval_steps 1 --save_steps 2 "
                              "--per_device_train_batch_size 2",
            "--rloo_args", "--max_steps 2 --max_new_tokens 8 --max_length 384 --per_device_train_batch_size 2 "
                           "--per_device_eval_batch_size 2 --monitor_prompts 2 --eval_steps 1 --save_steps 2"]


SEEDED = tuple(f"{arm}_s{k}" for k in (0, 1) for arm in ("dpo_if", "control", "reward_if", "rlhf", "rlvr"))
STUDY_STEPS = ("prepare", "sft", "eval_sft", "dpo_pairs", "if_prompts", "if_pairs", "dpo", *SEEDED, "report")
COLUMNS = ["base", "sft", "dpo", *(f"{arm}_s{k}" for arm in ("control", "dpo_if", "rlhf", "rlvr") for k in (0, 1))]


@pytest.mark.slow
def test_quick_study_runs_every_stage_and_writes_the_report(tiny_llama_dir, ifeval_file, tmp_path, capsys):
    argv = _study_argv(tmp_path, tiny_llama_dir, ifeval_file)
    assert run_study.main(argv) == 0
    study = tmp_path / "study"
    record = json.loads((study / run_study.STUDY_FILE).read_text())
    assert [(name, info["status"]) for name, info in record["stages"].items()] == [(name, "ran") for name in STUDY_STEPS]
    metrics = json.loads((study / "report" / "metrics.json").read_text())
    assert list(metrics["models"]) == COLUMNS
    assert metrics["models"]["dpo"]["pref_accuracy"] is not None
    assert metrics["instruction_following"]["ifeval"]["prompts"] == 3  # --eval_args came last and won
    report = (study / "report" / "report.md").read_text(encoding="utf-8")
    assert f"| metric | {' | '.join(COLUMNS)} |" in report and "![IF accuracy per model](charts/if_accuracy.png)" in report
    assert report.splitlines()[2] == "## Primary metric and contrasts" and "## The answer" in report
    assert "SFT (vs base) changed IFEval prompt-level strict by" in report
    pairs = [(p["before"], p["after"]) for p in metrics["comparisons"]["pairs"]]
    # every arm against the SFT run it started from (core/stages.py: starts_from), named by its stage and folder
    # a seeded arm's column-by-column pairs come from its first seed (seeds are compared as arms, in the primary table)
    assert pairs[:2] == [("base", "sft"), ("sft", "dpo")] and {("sft", "dpo_if_s0"), ("sft", "rlvr_s0")} <= set(pairs)
    assert not {pair for pair in pairs if pair[1].endswith("_s1")}
    assert "DPO (dpo_if_s0) (vs SFT) changed IFEval" in report and "RLOO (rlvr_s0) (vs SFT) changed IFEval" in report
    assert "| dpo_if vs control |" in report and "| rlvr vs control |" in report  # the declared contrasts, Holm-adjusted
    assert "pref_accuracy" in metrics["comparisons"]["pairs"][1]  # SFT -> DPO on the held-out pairs
    assert (study / "report" / "charts" / "pref_accuracy.png").read_bytes()[:8] == PNG_SIGNATURE
    # the IF validation sets beside IFEval, each scored on its first 3 prompts, and IFEval split by seen/held-out types
    for name in ("if_val_seen", "if_val_heldout", "if_val_ood"):
        assert metrics["instruction_following"][name]["prompts"] == 3
        assert f"| {name} prompt-level strict (%) |" in report
    assert "IF val, held-out types" in report and "held-out types" in report and "types training saw" in report
    # the steps were given what they were meant to read
    commands = {name: info["command"] for name, info in record["stages"].items()}
    rlvr, dpo_if = commands["rlvr_s1"], commands["dpo_if_s0"]
    assert rlvr[rlvr.index("--reward") + 1] == "checker" and rlvr[rlvr.index("--prompt_file") + 1] == "data/if/if_train.jsonl"
    assert rlvr[rlvr.index("--monitor_files") + 1:rlvr.index("--monitor_files") + 3] == [
        "data/if/if_val_seen.jsonl", "data/if/if_val_heldout.jsonl"]
    assert dpo_if[dpo_if.index("--train_file") + 1] == "data/if_pairs/prefs_train.jsonl"
    assert json.loads((study / "dpo_if_s0" / "dpo_config.json").read_text())["config"]["train_file"] == "data/if_pairs/prefs_train.jsonl"
    # the control: SFT continued on the judged pairs' chosen answers for its seed's DPO tokens (sft/budget.py)
    for seed in (0, 1):
        control = json.loads((study / f"control_s{seed}" / "metrics.json").read_text())
        dpo_tokens = json.loads((study / f"dpo_if_s{seed}" / "metrics.json").read_text())["train_tokens_seen"]
        assert control["token_budget"] == dpo_tokens and control["train_tokens_seen"] >= dpo_tokens
    judged = json.loads((study / "data" / "if_pairs" / "prefs_stats.json").read_text())
    assert judged["sft_model"] == "sft" and judged["judge"]["prompts_with_pair"] >= 2
    stats = json.loads((study / "data" / "if" / "if_stats.json").read_text())
    assert stats["seen_types"] == sorted(SEEN_TYPES) and list(stats["decontamination"]["test_files"]) == ["ifeval.jsonl"]
    printed = capsys.readouterr().out
    assert "=== study summary" in printed and "| ifeval prompt-level strict (%) |" in printed
    assert "DPO (vs SFT) changed IFEval prompt-level strict by" in printed  # the answer, in the console too

    with pytest.raises(UserError, match="not empty"):  # never over another study silently
        run_study.main(argv)
    changed = [a if a != "--max_steps 2 --max_eval_samples 4 --max_length 384 --eval_steps 1 --save_steps 2 "
               "--per_device_train_batch_size 2" else "--max_steps 3" for a in argv]
    with pytest.raises(UserError, match="commands of dpo, dpo_if_s0, dpo_if_s1 differ"):
        run_study.main(changed + ["--resume"])
    assert run_study.main(argv + ["--resume"]) == 0  # everything done: all skipped
    record = json.loads((study / run_study.STUDY_FILE).read_text())
    assert {info["status"] for info in record["stages"].values()} == {"skipped"}

    # Moved elsewhere, the study's runs still find each other: the report is made again from them.
    moved = tmp_path / "moved" / "study"
    moved.parent.mkdir()
    shutil.move(str(study), str(moved))
    assert run_study.main([str(moved) if a == str(study) else a for a in argv] + ["--redo_from", "report"]) == 0
    record = json.loads((moved / run_study.STUDY_FILE).read_text())
    assert [info["status"] for info in record["stages"].values()] == ["skipped"] * (len(STUDY_STEPS) - 1) + ["ran"]
    assert list(json.loads((moved / "report" / "metrics.json").read_text())["models"]) == COLUMNS
