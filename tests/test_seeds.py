"""Arms over seeds, primary contrasts with Holm, and the repetition-loop confound (synthetic per-prompt data, no model)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from core.cli import UserError
from evaluation import comparisons as cmp
from evaluation import seeds, stats
from evaluation.config import parse_eval_config
from evaluation.repetition import has_repetition_loop
from evaluation.study_report import report_lines

RESAMPLES = 2000


def prompt(i: int, strict: bool, loop: bool = False) -> cmp.PromptItem:
    return cmp.PromptItem(f"k{i}", strict, strict, (("t", strict, strict),), 12, True, loop)


def column(passes: list[bool]) -> list[cmp.PromptItem]:
    return [prompt(i, p) for i, p in enumerate(passes)]


def test_repetition_loop_is_an_eight_word_run_three_times():
    run = "one two three four five six seven eight "
    assert has_repetition_loop(run * 3)
    assert not has_repetition_loop(run * 2 + "nine ten")  # twice is not a loop
    assert has_repetition_loop("Yes " * 10)  # overlapping runs count: a one-word loop
    assert not has_repetition_loop("a b c d e f g")  # shorter than a run
    assert not has_repetition_loop(None) and not has_repetition_loop("")
    assert has_repetition_loop((run.upper() + "x ") + (run + "y ") + run)  # case-insensitive, apart from each other
    assert not has_repetition_loop(" ".join(f"w{i}" for i in range(100)))


def test_arm_names_and_contrast_parsing():
    assert seeds.arm_of("dpo_if_s2") == ("dpo_if", 2) and seeds.arm_of("sft") == ("sft", None)
    assert seeds.arm_of("sft_2") == ("sft_2", None)
    assert seeds.arm_columns(["base", "dpo_s1", "sft", "dpo_s0"]) == {"base": ["base"], "dpo": ["dpo_s0", "dpo_s1"],
                                                                     "sft": ["sft"]}
    assert seeds.parse_contrasts("sft:base, dpo_if:control") == [("sft", "base"), ("dpo_if", "control")]
    for bad in ("sft", "sft:", "sft:sft", "a:b,a:b", "a:b:c"):
        with pytest.raises(ValueError):
            seeds.parse_contrasts(bad)
    with pytest.raises(UserError, match=r"^--primary_contrasts: arm\(s\) rlvr not in this study; its arms: base, sft$"):
        seeds.check_contrasts([("sft", "base"), ("rlvr", "sft")], ["base", "sft"])


def test_the_flag_is_checked_up_front():
    config = parse_eval_config(["--primary_contrasts", "sft:base", "--ifeval", "x.jsonl"])
    assert config.primary_contrasts == "sft:base"
    from core.config import ConfigError

    with pytest.raises((ConfigError, SystemExit)):
        parse_eval_config(["--primary_contrasts", "sft:base"])  # no IFEval: no primary metric
    with pytest.raises((ConfigError, SystemExit)):
        parse_eval_config(["--primary_contrasts", "sft", "--ifeval", "x.jsonl"])


def test_holm_step_down():
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert stats.holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])
    assert stats.holm([0.04, 0.03]) == pytest.approx([0.06, 0.06])  # never below the one before it
    assert stats.holm([0.9, 0.8]) == [1.0, 1.0]  # capped at 1
    assert stats.holm([]) == []


def test_two_single_seed_arms_reduce_to_mcnemar_and_the_paired_difference():
    base = [True] * 6 + [False] * 14
    sft = [True] * 5 + [False] + [True] * 9 + [False] * 5
    arms = seeds.build_arms({"ifeval": {"base": column(base), "sft": column(sft)}}, ["base", "sft"], [("sft", "base")],
                            RESAMPLES, 3)
    row = next(r for r in arms["comparisons"] if r["primary"])
    mcnemar = stats.mcnemar_exact(base, sft)
    assert row["p"] == mcnemar.p and (row["test"]["b"], row["test"]["c"]) == (1, 9)
    assert row["holm_p"] == row["p"]  # one contrast: Holm changes nothing
    assert row["difference"]["value"] == pytest.approx(100 * (14 - 6) / 20)
    assert row["difference"]["low"] < row["difference"]["value"] < row["difference"]["high"]
    assert row["verdict"].startswith("an increase significant after Holm")


def test_seed_means_per_seed_counts_spread_and_a_two_level_interval():
    rng = np.random.default_rng(0)
    cols = {f"dpo_s{k}": column(list(rng.random(40) < p)) for k, p in enumerate((0.2, 0.5, 0.35))}
    cols["sft"] = column(list(rng.random(40) < 0.3))
    arms = seeds.build_arms({"ifeval": cols}, list(cols), [("dpo", "sft")], RESAMPLES, 1)
    dpo = arms["by_benchmark"]["ifeval"]["prompt_strict"]["dpo"]
    counts = [sum(i.strict for i in cols[f"dpo_s{k}"]) for k in range(3)]
    assert [s["passed"] for s in dpo["per_seed"]] == counts and {s["n"] for s in dpo["per_seed"]} == {40}
    assert dpo["value"] == pytest.approx(100 * np.mean(counts) / 40)
    assert dpo["spread"] == pytest.approx(100 * (max(counts) - min(counts)) / 40)
    single = seeds.arm_summary(*seeds.metric_table(cols, ["dpo_s0"], "prompt_strict"), ["dpo_s0"], RESAMPLES, 1)
    assert dpo["high"] - dpo["low"] > single["high"] - single["low"]  # the seeds' spread widens the interval
    row = arms["comparisons"][0]
    assert row["test"]["test"].startswith("paired sign-flip")  # several seeds: sign-flip over prompts, not McNemar
    averaged = np.mean([[float(i.strict) for i in cols[f"dpo_s{k}"]] for k in range(3)], axis=0)
    expected = stats.sign_flip_test(averaged - np.array([float(i.strict) for i in cols["sft"]]), RESAMPLES, 1)
    assert row["p"] == expected.p
    again = seeds.build_arms({"ifeval": cols}, list(cols), [("dpo", "sft")], RESAMPLES, 1)
    assert json.dumps(again) == json.dumps(arms)  # fixed seed: the same numbers


def test_holm_runs_over_the_primary_contrasts_only_and_the_rest_is_exploratory():
    rng = np.random.default_rng(4)
    cols = {label: column(list(rng.random(50) < 0.4)) for label in ("base", "sft", "control_s0", "control_s1")}
    bench = {"ifeval": cols, "ifbench": cols}
    arms = seeds.build_arms(bench, list(cols), [("sft", "base"), ("control", "sft")], RESAMPLES, 0)
    primary = [r for r in arms["comparisons"] if r["primary"]]
    assert [(r["arm"], r["reference"]) for r in primary] == [("sft", "base"), ("control", "sft")]
    assert [r["holm_p"] for r in primary] == stats.holm([r["p"] for r in primary])
    others = [r for r in arms["comparisons"] if not r["primary"]]
    assert len(others) == 2 * 4 - 2 + 2 * 4 and all("holm_p" not in r for r in others)


def test_a_seeded_study_reports_the_declaration_first_the_primary_table_and_the_seed_spread():
    rng = np.random.default_rng(2)
    stages = {"base": "base", "sft": "sft", "control_s0": "sft", "control_s1": "sft", "dpo_if_s0": "dpo", "dpo_if_s1": "dpo"}
    bench = {"ifeval": {label: [prompt(i, bool(p), loop=i % 7 == 0) for i, p in enumerate(rng.random(30) < 0.4)]
                        for label in stages}}
    study = cmp.build_comparisons(cmp.StudyInputs(stages=stages, benchmarks=bench, max_new_tokens=12), RESAMPLES, 0,
                                  [("sft", "base"), ("control", "sft"), ("dpo_if", "control")])
    lines = report_lines(study, {})
    text = "\n".join(lines)
    assert lines[0] == "## Primary metric and contrasts"
    assert "Holm-adjusted over exactly these 3 contrasts" in lines[2] and "exploratory (uncorrected)" in lines[2]
    assert text.index("## Primary metric and contrasts") < text.index("## Primary contrasts: IFEval prompt-level strict (Holm "
                                                                      "over 3)") < text.index("## Arms over seeds") < text.index("## The answer")
    counts = [sum(i.strict for i in bench["ifeval"][f"dpo_if_s{k}"]) for k in range(2)]
    assert f"| dpo_if | 2 | {counts[0]}/30, {counts[1]}/30 |" in text
    assert "| dpo_if vs control | 30 |" in text and "two-level bootstrap" in text
    assert "## The same contrasts on the other metrics, exploratory (uncorrected)" in text
    # the column-by-column pairs use each arm's first seed only; every column keeps its confounds
    assert {(p["before"], p["after"]) for p in study["pairs"]} == {("base", "sft"), ("base", "control_s0"), ("sft", "dpo_if_s0")}
    assert study["columns"]["dpo_if_s1"]["confounds"]["ifeval"]["loops"] == 5
    assert "| ifeval | DPO (dpo_if_s1) | 30 |" in text and "| 5/30 (16.7%) |" in text
