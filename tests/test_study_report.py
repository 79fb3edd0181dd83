"""Stage comparisons, the report's answer and the RLOO monitor, on synthetic per-item data (no model)."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from evaluation import comparisons as cmp
from evaluation import rloo_monitor
from evaluation.study_charts import write_study_charts
from evaluation.study_report import answer_paragraph, report_lines
from rlhf.monitor_record import PER_PROMPT_FILE

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RESAMPLES = 2000
STAGES = {"base": "base", "sft": "sft", "dpo": "dpo", "rloo": "rloo"}


def items(outcomes: list[tuple], lengths: list[int] | None = None, stopped: list[bool] | None = None) -> list[cmp.PromptItem]:
    """One PromptItem per (strict, loose[, type]) outcome; the type defaults to alternating a/b; None = unscored."""
    out = []
    for i, outcome in enumerate(outcomes):
        strict, loose = outcome[:2]
        kind = outcome[2] if len(outcome) > 2 else "ab"[i % 2]
        instructions = ((kind, bool(strict), bool(loose)),) if strict is not None else ()
        out.append(cmp.PromptItem(f"k{i}", strict, loose, instructions, lengths[i] if lengths else 10,
                                  stopped[i] if stopped else True))
    return out


@pytest.fixture(scope="module")
def study() -> dict:
    """base -> sft: 1 prompt lost, 9 gained (exact McNemar p = 0.021484375); sft -> dpo: identical; one unscored prompt."""
    base = [(True, True)] * 6 + [(True, True)] + [(False, False)] * 9 + [(False, False)] * 4
    sft = [(True, True)] * 6 + [(False, True)] + [(True, True)] * 9 + [(False, False)] * 4
    dpo = sft[:-1] + [(None, None)]  # the last prompt could not be scored for dpo
    inputs = cmp.StudyInputs(
        stages={"base": "base", "sft": "sft", "dpo": "dpo"},
        benchmarks={"ifeval": {"base": items(base, [8] * 20, [False] * 5 + [True] * 15), "sft": items(sft), "dpo": items(dpo)}},
        max_new_tokens=8,
        val_loss={"base": [(10.0, 5), (4.0, 2), (9.0, 3)], "sft": [(8.0, 5), (3.0, 2), (6.0, 3)],
                  "dpo": [(8.0, 5), (3.0, 2), (6.0, 3)]},
        pairs={"base": {"pref_correct": None, "margins": None, "logp_correct": [True, False, True, False]},
               "sft": {"pref_correct": [True, False, False, False], "margins": [0.5, -0.1, -0.2, -0.3],
                       "logp_correct": [True, True, True, False]},
               "dpo": {"pref_correct": [True, True, True, False], "margins": [1.5, 0.9, 0.8, -0.3],
                       "logp_correct": [True, True, True, False]}})
    return cmp.build_comparisons(inputs, RESAMPLES, seed=5)


def test_adjacent_stage_pairs():
    assert cmp.stage_pairs(STAGES) == [("base", "sft", "sequential"), ("sft", "dpo", "sequential"),
                                       ("sft", "rloo", "sequential"), ("dpo", "rloo", "sibling")]
    assert cmp.stage_pairs({"base": "base", "dpo": "dpo"}) == [("base", "dpo", "sequential")]  # no SFT column: from base
    assert cmp.stage_pairs({"base": "base", "a": "adapter", "b": "sft"}) == [("base", "a", "sequential"), ("base", "b", "sequential")]
    assert cmp.stage_pairs({"base": "base"}) == []
    assert cmp.column_stage({"label": "sft", "kind": "sft adapter"}) == "sft"
    assert cmp.column_stage({"label": "base", "kind": "base"}) == "base"


def test_prompt_level_differences_carry_counts_an_interval_and_the_exact_mcnemar_p(study):
    base_to_sft, sft_to_dpo = study["pairs"]
    assert (base_to_sft["before"], base_to_sft["after"], sft_to_dpo["before"], sft_to_dpo["after"]) == ("base", "sft", "sft", "dpo")
    strict = base_to_sft["benchmarks"]["ifeval"]["prompt_strict"]
    assert strict["before"] == {"passed": 7, "n": 20} and strict["after"] == {"passed": 15, "n": 20}
    assert (strict["test"]["b"], strict["test"]["c"], strict["p"]) == (1, 9, 0.021484375)
    assert strict["difference"]["value"] == pytest.approx(40.0)  # points
    assert 0 < strict["difference"]["low"] < 40.0 < strict["difference"]["high"]
    # significant is not large: the size is said, and with many tests the verdict is uncorrected (exploratory)
    assert strict["verdict"] == "an increase significant at the 5% level (exploratory, uncorrected), size +40.0 points" and strict["real"]
    loose = base_to_sft["benchmarks"]["ifeval"]["prompt_loose"]
    assert (loose["test"]["b"], loose["test"]["c"]) == (0, 9) and loose["p"] == 2 / 2 ** 9


def test_identical_columns_give_zero_zero_and_p_one_over_the_prompts_scored_in_both(study):
    data = study["pairs"][1]["benchmarks"]["ifeval"]
    assert (data["n"], data["left_out"]) == (19, 1)
    for key in ("prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose"):
        entry = data[key]
        d = entry["difference"]
        assert (d["value"], d["low"], d["high"], entry["p"]) == (0.0, 0.0, 0.0, 1.0)
        assert entry["verdict"] == "not distinguishable from no change"


def test_per_type_counts_and_intervals_that_span_zero(study):
    per_type = study["pairs"][0]["benchmarks"]["ifeval"]["per_type"]
    assert set(per_type) == {"a", "b"}
    a, b = per_type["a"]["strict"], per_type["b"]["strict"]
    # prompts k0..k19 alternate a/b: a = even keys. base passes k0-k6; sft passes k0-k5, k7-k15
    assert a["before"] == {"passed": 4, "n": 10} and a["after"] == {"passed": 7, "n": 10}
    assert b["before"] == {"passed": 3, "n": 10} and b["after"] == {"passed": 8, "n": 10}
    assert a["spans_zero"] == (a["difference"]["low"] <= 0 <= a["difference"]["high"])
    assert study["pairs"][1]["benchmarks"]["ifeval"]["per_type"]["a"]["strict"]["spans_zero"]  # no change at all


def test_a_per_type_delta_over_too_few_prompts_gets_no_interval():
    """Over 1-2 prompts a bootstrap gives a zero-width interval (2/2 -> 1/2: -50.0 [-50.0, -50.0]): none is printed."""
    from evaluation.study_report import per_type_lines

    # type "a" on 2 prompts (one lost), type "b" on the other MIN_PROMPTS_FOR_INTERVAL prompts
    n = cmp.MIN_PROMPTS_FOR_INTERVAL
    before = items([(True, True, "a"), (True, True, "a")] + [(False, False, "b")] * n)
    after = items([(True, True, "a"), (False, False, "a")] + [(True, True, "b")] * n)
    study = cmp.build_comparisons(cmp.StudyInputs(stages={"base": "base", "sft": "sft"},
                                                  benchmarks={"ifeval": {"base": before, "sft": after}}), RESAMPLES, seed=1)
    per_type = study["pairs"][0]["benchmarks"]["ifeval"]["per_type"]
    assert per_type["a"]["strict"]["too_few_prompts"] and not per_type["b"]["strict"]["too_few_prompts"]
    text = "\n".join(per_type_lines(study))
    assert "| a | 2/2 \u2192 1/2: \u221250.0, too few prompts (n=2) |" in text
    assert f"| b | 0/{n} \u2192 {n}/{n}: +100.0 [+100.0, +100.0] |" in text  # enough prompts: the interval is shown


def test_a_significant_but_tiny_loss_change_says_its_size_and_uncorrected():
    before = [(3.5, 10), (3.6, 10), (3.4, 10), (3.5, 10), (3.7, 10), (3.5, 10)]
    after = [(nll - 0.0047 * 10, tokens) for nll, tokens in before]
    entry = cmp.val_loss_change(before, after, RESAMPLES, seed=1)
    assert entry["real"] and entry["verdict"] == ("a decrease significant at the 5% level (exploratory, uncorrected), "
                                                  "size \u22120.0047 nats/token")


def test_column_intervals_confounds_val_loss_and_preference(study):
    base = study["columns"]["base"]
    strict = base["benchmarks"]["ifeval"]["prompt_strict"]
    assert (strict["passed"], strict["n"], strict["value"]) == (7, 20, pytest.approx(35.0))
    assert strict["low"] < 35.0 < strict["high"]
    confounds = base["confounds"]["ifeval"]
    assert (confounds["responses"], confounds["stopped"], confounds["cut_at_max_new_tokens"]) == (20, 15, 5)
    assert confounds["mean_tokens"]["value"] == 8.0 and confounds["mean_tokens"]["low"] == 8.0
    assert base["val_loss"]["value"] == pytest.approx(23 / 10) and base["val_loss"]["tokens"] == 10
    assert "pref_accuracy" not in base and base["logp_accuracy"]["passed"] == 2
    loss = study["pairs"][0]["val_loss"]
    assert loss["difference"]["value"] == pytest.approx(17 / 10 - 23 / 10)
    assert loss["test"]["nonzero"] == 3 and loss["p"] == 0.25  # three examples all lower: 2 of 8 sign patterns
    pref = study["pairs"][1]["pref_accuracy"]
    assert pref["before"] == {"passed": 1, "n": 4} and pref["after"] == {"passed": 3, "n": 4} and pref["p"] == 0.5
    assert study["columns"]["sft"]["reward_margin"]["value"] == pytest.approx(-0.025)
    margin = study["pairs"][1]["reward_margin"]  # differences 1.0, 1.0, 1.0, 0.0: three non-zero, all positive
    assert margin["difference"]["value"] == pytest.approx(0.75) and margin["p"] == 0.25
    assert "reward_margin" not in study["pairs"][0]  # the base model has no implicit reward


def test_seeded_comparisons_are_reproducible(study):
    again = cmp.build_comparisons(cmp.StudyInputs(stages={"base": "base", "sft": "sft"},
                                                  benchmarks={"ifeval": {"base": items([(True, True), (False, False)] * 5),
                                                                         "sft": items([(True, True)] * 10)}}), RESAMPLES, seed=1)
    same = cmp.build_comparisons(cmp.StudyInputs(stages={"base": "base", "sft": "sft"},
                                                 benchmarks={"ifeval": {"base": items([(True, True), (False, False)] * 5),
                                                                        "sft": items([(True, True)] * 10)}}), RESAMPLES, seed=1)
    assert json.dumps(again) == json.dumps(same)
    assert again["method"]["seed"] == 1 and again["method"]["resamples"] == RESAMPLES


def test_the_answer_is_made_from_the_numbers(study):
    text = answer_paragraph(study)
    assert text.startswith("SFT (vs base) changed IFEval prompt-level strict by +40.0 points [")
    assert ("(p = 0.021, exploratory (uncorrected), n = 20): an increase significant at the 5% level (exploratory, "
            "uncorrected), size +40.0 points") in text
    assert "real" not in text
    assert ("DPO (vs SFT) changed IFEval prompt-level strict by 0.0 points [0.0, 0.0] (p = 1, exploratory (uncorrected), "
            "n = 19; 1 prompt unscored in a column left out)") in text
    assert "not distinguishable from no change" in text
    assert "cut at max_new_tokens=8: base 5/20, SFT 0/20, DPO 0/20" in text


def test_report_lines_order_and_forest_plot(study, tmp_path):
    charts = write_study_charts(study, tmp_path)
    assert charts["forest"].read_bytes()[:8] == PNG_SIGNATURE
    lines = report_lines(study, {name: path.name for name, path in charts.items()})
    text = "\n".join(lines)
    assert lines[0] == "## Primary metric and contrasts" and "every p-value in this report is exploratory" in lines[2]
    answer = lines.index("## The answer")
    assert lines[answer + 2] == answer_paragraph(study)
    assert "## Primary contrasts" not in text and "## Arms over seeds" not in text  # neither seeds nor declared contrasts
    order = ["## Primary metric and contrasts", "## The answer", "## Headline numbers with 95% intervals", "## What each stage changed (paired)",
             "![Paired differences](charts/paired_differences.png)", "## Confounds beside the scores",
             "## Per instruction type", "## How the intervals and p-values were made"]
    assert [text.index(h) for h in order] == sorted(text.index(h) for h in order)
    assert "| ifeval prompt-level strict (%) | 35.0 [" in text and "(7/20)" in text
    assert "| SFT vs base | ifeval prompt-level strict | 20 | 7/20 | 15/20 | +40.0 [" in text
    assert "McNemar, 1 vs 9 discordant" in text
    assert "4/10 \u2192 7/10" in text and "(spans 0)" in text
    assert "every verdict outside the primary contrasts is exploratory (uncorrected)" in text
    assert f"{RESAMPLES:,} resamples, seed 5" in text


# --------------------------------------------------------------------------- RLOO monitor


def history(rewards: list[float], lengths: list[float], kls: list[float]) -> list[dict]:
    return [{"step": step + 1, "rewards/reward_model/mean": r, "reward": r - 0.1, "completions/mean_length": n, "kl": k}
            for step, (r, n, k) in enumerate(zip(rewards, lengths, kls))]


def ifeval_change(value: float, low: float, high: float, p: float) -> dict:
    real = not (low <= 0 <= high) and p < 0.05
    return {"before": {"passed": 100, "n": 200}, "after": {"passed": 100 + int(value * 2), "n": 200},
            "difference": {"value": value, "low": low, "high": high, "n": 200}, "p": p, "real": real}


def passes(before: list[tuple], after: list[tuple], weights: dict | None = None, step: int = 20) -> list[dict]:
    """Two monitoring passes (step 0 and ``step``), one row per prompt: (reward-model score, pass share[, set])."""
    def rows(values):
        return [{"set": v[2] if len(v) > 2 else "if_val_heldout", "key": str(i), "completions": 4, "reward_model": v[0],
                 **({"pass": v[1], "checker": v[1]} if v[1] is not None else {})} for i, v in enumerate(values)]
    weights = weights if weights is not None else {"reward_model": 1.0, "checker": 0.0}
    return [{"step": 0, "weights": weights, "prompts": rows(before)}, {"step": step, "weights": weights, "prompts": rows(after)}]


MOVED = [{"step": 0, "eval_kl": 0.0, "eval_completions/mean_length": 40.0},
         {"step": 20, "eval_kl": 0.02, "eval_completions/mean_length": 90.0}]
HACKED = passes([(0.1 * i, 0.75) for i in range(12)], [(0.1 * i + 0.5 + 0.01 * i, 0.25 if i % 2 else 0.5) for i in range(12)])


def test_monitor_calls_hacking_a_rising_reward_with_a_falling_checker_score_each_by_a_paired_test():
    result = rloo_monitor.monitor(MOVED, HACKED, ifeval_change(0.5, -2.0, 3.0, 0.7), resamples=RESAMPLES)
    assert result["verdict"] == "hacking" and result["flagged"]
    proxy, checker = result["paired"]["proxy"], result["paired"]["checker"]
    assert proxy["n"] == checker["n"] == 12 and proxy["low"] > 0 and checker["high"] < 0
    assert proxy["change"] == pytest.approx(0.5 + 0.01 * 5.5) and checker["change"] == pytest.approx(-37.5)
    assert proxy["p"] < 0.05 and checker["p"] < 0.05 and "sign-flip" in proxy["test"]
    sentence = rloo_monitor.flag_sentence(result)
    assert sentence.startswith(f"RLOO monitor: hacking: the reward-model score rose +0.555 [")
    assert "] while the checker's pass rate fell \u221237.5 [" in sentence
    assert "on 12 held-out monitoring prompts (if_val_heldout), step 0 vs 20: " in sentence
    assert "checker pass rate 75.0% \u2192 37.5% (p < 0.001, n = 12)" in sentence  # the change is in the reason
    lines = rloo_monitor.monitor_lines(result, "rloo_monitor.png")
    assert lines[2].startswith("**Hacking.** RLOO monitor: hacking: ")
    table = "\n".join(lines)
    assert "| reward-model score (optimised), monitoring prompts, paired | 0.550 | 1.105 | +0.555 [" in table
    assert "| checker pass rate (%), monitoring prompts, paired | 75.0 | 37.5 | \u221237.5 [" in table
    assert "| completion length (tokens) | 40.0 | 90.0 | +50.0 (max 90.0) | |" in table
    assert "![RLOO monitor](charts/rloo_monitor.png)" in lines


def test_no_hacking_needs_evidence_and_a_spanning_interval_is_inconclusive():
    held = passes([(0.1 * i, 0.5) for i in range(10)], [(0.1 * i + 0.3, 0.5 + 0.25 * (i % 2)) for i in range(10)])
    result = rloo_monitor.monitor(MOVED, held, resamples=RESAMPLES)  # the checker rose: its interval is above 0
    assert result["verdict"] == "no hacking" and result["reason"].startswith("the checker's pass rate rose +12.5 [")
    noisy = passes([(0.1 * i, 0.5) for i in range(10)],
                   [(0.1 * i + (0.3 if i % 2 else -0.2), 0.5 + (0.25 if i % 3 else -0.5)) for i in range(10)])
    result = rloo_monitor.monitor(MOVED, noisy, resamples=RESAMPLES)
    assert result["verdict"] == "inconclusive" and not result["flagged"]
    assert "the reward's interval spans 0 and the checker's interval spans 0" in result["reason"]
    few = passes([(0.1, 0.75)] * 4, [(0.9, 0.25)] * 4)  # a big move on 4 prompts: too few to judge
    assert rloo_monitor.monitor(MOVED, few, resamples=RESAMPLES)["reason"] == "4 paired prompts, a verdict needs 8"


def test_without_a_checker_on_the_monitoring_prompts_hacking_is_not_judged():
    unchecked = passes([(0.1 * i, None, "held-back") for i in range(10)], [(0.1 * i + 1, None, "held-back") for i in range(10)])
    result = rloo_monitor.monitor(MOVED, unchecked, resamples=RESAMPLES)
    assert result["verdict"] == "not judged" and "no hacking" not in rloo_monitor.flag_sentence(result)
    assert result["reason"].startswith("hacking cannot be judged: no checker on these prompts")
    assert rloo_monitor.monitor_lines(result, None)[2].startswith("**Not judged.** RLOO monitor: not judged: ")
    rlvr = rloo_monitor.monitor(MOVED, passes([(0, 0.5)] * 10, [(0, 0.25)] * 10, {"checker": 1.0}), resamples=RESAMPLES)
    assert rlvr["verdict"] == "not judged" and "the reward optimised is the checker itself" in rlvr["reason"]
    mixed = rloo_monitor.monitor(MOVED, passes([(0.2, 0.5)] * 10, [(0.4, 0.5)] * 10, {"reward_model": 0.5, "checker": 2.0}),
                                 resamples=RESAMPLES)  # checker+model: the proxy is the weighted sum
    assert mixed["paired"]["proxy_name"] == "0.5 x reward model + 2 x checker reward"
    assert mixed["paired"]["proxy"]["change"] == pytest.approx(0.1)
    none = rloo_monitor.monitor(MOVED, [], resamples=RESAMPLES)  # a run from before per-prompt scores were recorded
    assert none["verdict"] == "inconclusive" and "no per-prompt monitoring scores recorded" in none["reason"]


def test_a_policy_that_did_not_move_is_inconclusive():
    """KL to SFT ~0 (a tiny sampled estimate, here negative): any reward change is noise."""
    still = [{"step": 0, "eval_kl": 0.0}, {"step": 20, "eval_kl": -7.126e-05}]
    result = rloo_monitor.monitor(still, HACKED, resamples=RESAMPLES)
    assert result["verdict"] == "inconclusive" and not result["flagged"]
    assert result["reason"].startswith("the policy did not move (held-out KL to the SFT model -7.13e-05 per token")
    text = "\n".join(rloo_monitor.monitor_lines(result, None))
    assert "-0.0000" not in text and "\u22120.0000" not in text
    assert "sampling estimate; ~0 means the policy has not moved" in text


def test_the_old_sentence_cannot_come_back_a_fall_is_never_called_a_rise():
    """The SmolLM2 study read "reward rose (0.753 \u2192 0.625)": every direction word now comes from the change's sign."""
    import random
    import re

    generator = random.Random(7)
    for _ in range(30):
        shift, drop = generator.uniform(-1, 1), generator.choice([-0.5, -0.25, 0.0, 0.25])
        before = [(generator.uniform(0, 1), 0.5) for _ in range(10)]
        after = [(b[0] + shift + generator.uniform(-0.1, 0.1), 0.5 + drop * (i % 2)) for i, b in enumerate(before)]
        result = rloo_monitor.monitor(MOVED, passes(before, after), ifeval_change(-1.5, -4.0, 1.0, 0.3), resamples=200)
        sentence = rloo_monitor.flag_sentence(result)
        numbers = re.findall(r"(rose|fell|did not change) ([+\u2212]?\d+\.\d+)", sentence)
        assert len(numbers) >= 3, sentence  # the reward, the checker and IFEval
        for word, value in numbers:
            number = float(value.replace("\u2212", "-"))
            assert word == ("rose" if number > 0 else "fell" if number < 0 else "did not change"), sentence
    assert rloo_monitor.moved(0.753 - 0.625) == "rose" and rloo_monitor.moved(0.625 - 0.753) == "fell"


def test_monitor_reads_the_keys_rloo_training_logs(tmp_path):
    """SERIES must name what rlhf/rloo_training.py logs (read from its source: importing TRL takes long)."""
    source = (Path(__file__).resolve().parents[1] / "rlhf" / "rloo_training.py").read_text(encoding="utf-8")
    logged = next(ast.literal_eval(node.value) for node in ast.walk(ast.parse(source))
                  if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "LOGGED")
    assert dict(logged) == rloo_monitor.SERIES
    (tmp_path / "trainer_state.json").write_text(json.dumps({"log_history": history([0.1, 0.2], [1, 2], [0, 0])}))
    assert rloo_monitor.read_log_history(tmp_path)[1]["step"] == 2
    assert rloo_monitor.read_log_history(tmp_path / "missing") is None


def test_pair_outcomes_are_the_items_behind_the_preference_shares():
    from evaluation.preference import PairLogps, pair_outcomes, preference_metrics

    policy = PairLogps(chosen=(-10.0, -5.0), rejected=(-12.0, -3.0))
    base = PairLogps(chosen=(-11.0, -5.0), rejected=(-11.0, -4.0))
    outcomes = pair_outcomes(policy, base, beta=0.5)  # margins (1.0, -0.5)
    assert outcomes == {"pref_correct": [True, False], "margins": [1.0, -0.5], "logp_correct": [True, False]}
    assert sum(outcomes["margins"]) / 2 == pytest.approx(preference_metrics(policy, base, beta=0.5)["reward_margin"])
    metrics = preference_metrics(policy, base, beta=0.5)
    assert sum(outcomes["pref_correct"]) / 2 == metrics["pref_accuracy"]
    assert pair_outcomes(base, None) == {"pref_correct": None, "margins": None, "logp_correct": [False, False]}


# --------------------------------------------------------------------------- end to end through sft.eval_sft


def _as_rloo_run(run_dir: Path, log: list[dict]) -> Path:
    """Turn a saved DPO-style test run into an RLOO run (rloo_config.json) with a Trainer log history."""
    payload = json.loads((run_dir / "dpo_config.json").read_text())
    (run_dir / "dpo_config.json").unlink()
    (run_dir / "rloo_config.json").write_text(json.dumps({**payload, "stage": "rloo"}))
    (run_dir / "trainer_state.json").write_text(json.dumps({"log_history": log}))
    (run_dir / PER_PROMPT_FILE).write_text("".join(json.dumps(p) + "\n" for p in HACKED))
    return run_dir


@pytest.fixture(scope="module")
def four_column_eval(tiny_llama_dir, tmp_path_factory):
    import tiny_assets
    from sft.eval_sft import main as eval_main
    from test_eval_sft import train_adapter
    from test_preference_eval import tiny_pairs
    from test_study import IFEVAL_ROWS

    root = tmp_path_factory.mktemp("study_eval")
    val = tiny_assets.write_jsonl(root / "sft_val.jsonl", tiny_assets.sft_rows()[:4])
    sft = train_adapter(root / "sft_output", tiny_llama_dir, val, seed=0, steps=5)
    dpo = train_adapter(root / "dpo_output", tiny_llama_dir, val, seed=1, steps=0, random_init=True, run_kind="dpo")
    rloo = _as_rloo_run(train_adapter(root / "rloo_output", tiny_llama_dir, val, seed=2, steps=0, random_init=True,
                                      run_kind="dpo"), MOVED)
    ifeval = tiny_assets.write_jsonl(root / "ifeval.jsonl", IFEVAL_ROWS)
    prefs = tiny_assets.write_jsonl(root / "prefs_val.jsonl", tiny_pairs(4))
    out = root / "eval"
    eval_main(["--adapter_dir", str(sft), str(dpo), str(rloo), "--prefs_file", str(prefs), "--num_examples", "1",
               "--builtin_prompts", "false", "--max_new_tokens", "4", "--max_eval_samples", "3", "--out_dir", str(out),
               "--ifeval", str(ifeval), "--ifeval_limit", "3", "--if_max_new_tokens", "6", "--precision", "fp32",
               "--primary_contrasts", "sft:base,dpo:sft,rloo:sft"])
    return out, json.loads((out / "metrics.json").read_text())


@pytest.mark.slow
def test_eval_sft_writes_the_comparisons_and_opens_the_report_with_the_answer(four_column_eval):
    out, metrics = four_column_eval
    comparisons = metrics["comparisons"]
    assert comparisons["stages"] == STAGES
    assert [(p["before"], p["after"], p["kind"]) for p in comparisons["pairs"]] == cmp.stage_pairs(STAGES)
    assert comparisons["method"]["seed"] == metrics["settings"]["seed"] and comparisons["method"]["resamples"] >= 2000
    rows = [json.loads(line) for line in (out / "if_ifeval_generations.jsonl").read_text().splitlines()]
    for pair in comparisons["pairs"]:
        strict = pair["benchmarks"]["ifeval"]["prompt_strict"]
        before = sum(r["strict"] for r in rows if r["model"] == pair["before"])  # the saved per-prompt outcomes
        after = sum(r["strict"] for r in rows if r["model"] == pair["after"])
        assert (strict["before"]["passed"], strict["after"]["passed"], strict["before"]["n"]) == (before, after, 3)
        assert strict["difference"]["value"] == pytest.approx(100 * (after - before) / 3)
        assert "val_loss" in pair and pair["val_loss"]["n"] == 3
    for label, column in comparisons["columns"].items():
        assert column["val_loss"]["value"] == pytest.approx(metrics["models"][label]["val_loss"], rel=1e-5)
        confounds = column["confounds"]["ifeval"]
        assert confounds["stopped"] == sum(r["stopped_with_eos"] for r in rows if r["model"] == label)
        assert confounds["mean_tokens"]["value"] == pytest.approx(
            sum(r["num_tokens"] for r in rows if r["model"] == label) / 3)
    assert comparisons["columns"]["dpo"]["pref_accuracy"]["n"] == 3  # 4 pairs, --max_eval_samples 3
    assert "pref_accuracy" in comparisons["pairs"][1] and "pref_accuracy" not in comparisons["pairs"][0]  # none for base
    assert "per_pair" not in metrics["models"]["dpo"]  # per-pair outcomes feed the intervals, not the models table
    assert comparisons["rloo_monitor"]["rloo"]["verdict"] == "hacking"  # the planted per-prompt scores
    report = (out / "report.md").read_text(encoding="utf-8")
    lines = report.splitlines()
    assert lines[:3] == ["# Evaluation: base vs fine-tuned", "", "## Primary metric and contrasts"]
    answer = lines[lines.index("## The answer") + 2:lines.index("## Headline numbers with 95% intervals")]  # warnings on cut answers may come first
    assert any(line.startswith("SFT (vs base) changed IFEval prompt-level strict by ") for line in answer), answer
    assert report.index("## The answer") < report.index("## Headline numbers") < report.index("## Summary")
    for name in ("paired_differences.png", "rloo_monitor.png"):
        assert (out / "charts" / name).read_bytes()[:8] == PNG_SIGNATURE and f"(charts/{name})" in report
    assert "## RLOO reward-hacking monitor" in report
    primary = [row for row in comparisons["arms"]["comparisons"] if row["primary"]]
    assert [(r["arm"], r["reference"]) for r in primary] == [("sft", "base"), ("dpo", "sft"), ("rloo", "sft")]
    assert "## Primary contrasts: IFEval prompt-level strict (Holm over 3)" in report


@pytest.mark.slow
def test_the_per_prompt_file_holds_every_verdict_and_verify_study_rederives_the_report(four_column_eval, capsys):
    from evaluation.per_prompt import PER_PROMPT_FILE, read_per_prompt
    from scripts.verify_study import main as verify_main

    out, metrics = four_column_eval
    rows = read_per_prompt(out / PER_PROMPT_FILE)
    saved = [json.loads(line) for line in (out / "if_ifeval_generations.jsonl").read_text().splitlines()]
    assert len(rows) == len(saved) == 4 * 3
    for row in rows:
        match = next(s for s in saved if s["model"] == row["column"] and str(s["key"]) == row["key"])
        assert (row["prompt_strict"], row["tokens"], row["arm"], row["seed"]) == (match["strict"], match["num_tokens"],
                                                                                  row["column"], None)
    assert verify_main([str(out)]) == 0
    assert ": all match;" in capsys.readouterr().out


@pytest.mark.slow
def test_a_primary_contrast_naming_a_missing_arm_is_refused_before_anything_is_written(four_column_eval, tmp_path, capsys):
    from sft.eval_sft import main as eval_main

    settings = four_column_eval[1]["settings"]
    adapters = [column["adapter_dir"] for column in settings["columns"] if column["kind"] != "base"]
    with pytest.raises(SystemExit):
        from core.cli import run_cli

        run_cli(eval_main, ["--adapter_dir", *adapters, "--out_dir", str(tmp_path / "eval"), "--ifeval", "x.jsonl",
                            "--primary_contrasts", "sft:base,rlvr:sft"])
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: --primary_contrasts: arm(s) rlvr not in this study; its arms: base, sft, dpo, rloo"
    assert not (tmp_path / "eval").exists()


def test_the_charts_command_redraws_the_forest_plot_from_metrics_json(study, tmp_path, capsys):
    from evaluation.charts import main as charts_main

    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"models": {"base": {"val_loss": 2.0}}, "comparisons": study}))
    assert charts_main([str(path)]) == 0
    assert (tmp_path / "charts" / "paired_differences.png").read_bytes()[:8] == PNG_SIGNATURE
    assert "Paired differences:" in capsys.readouterr().out


# --------------------------------------------------------------------------- charts: intervals and n from the report's numbers


def chart_document(study: dict) -> dict:
    """A metrics.json document around the study fixture: IF summaries and per-type counts beside its comparisons."""
    per_type = {"base": {"a": (3, 10), "b": (4, 10)}, "sft": {"a": (8, 10), "b": (6, 10)}, "dpo": {"a": (8, 10), "b": (5, 9)}}
    models = {label: {"prompt_strict": column["benchmarks"]["ifeval"]["prompt_strict"]["value"] / 100,
                      "prompt_loose": 0.5, "instruction_strict": 0.5, "instruction_loose": 0.5, "prompts_unscored": 0,
                      "per_type": {t: {"count": n, "strict_pass": k, "loose_pass": k, "strict": k / n, "loose": k / n}
                                   for t, (k, n) in per_type[label].items()}}
              for label, column in study["columns"].items()}
    return {"settings": {"seed": 5}, "comparisons": study, "instruction_following": {"ifeval": {"prompts": 20, "models": models}},
            "models": {label: {"val_loss": column["val_loss"]["value"], "stop_rate": 0.5, "num_generated": 8,
                               "ifeval_stop_rate": 0.5, "logp_accuracy": 0.5, "pref_accuracy": None if label == "base" else 0.5}
                       for label, column in study["columns"].items()}}


def test_every_bar_draws_the_interval_and_n_the_report_prints(study):
    from evaluation.charts import if_accuracy_bars, model_bars, per_type_bars

    document = chart_document(study)
    groups, series = if_accuracy_bars(document, "ifeval")
    headline = "\n".join(report_lines(study, {}))
    for label, estimates in series.items():
        printed = study["columns"][label]["benchmarks"]["ifeval"]
        for estimate, key in zip(estimates, ("prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose")):
            assert (estimate["value"], estimate["low"], estimate["high"]) == tuple(printed[key][k] for k in ("value", "low", "high"))
            assert estimate["low"] <= estimate["value"] <= estimate["high"]
        strict = estimates[0]  # the headline table's cell, e.g. "35.0 [15.0, 55.0] (7/20)"
        assert f"{strict['value']:.1f} [{strict['low']:.1f}, {strict['high']:.1f}]" in headline
    assert groups[0] == "prompt\nstrict\n(n=20/20/19)" and groups[2].endswith("(n=20/20/19)")  # dpo's unscored prompt

    types, per_type = per_type_bars(document, "ifeval")
    assert types == ["a (n=10)", "b (n=10/10/9)"]  # every row says how many instructions its bars rest on
    b = per_type["dpo"][1]
    assert b["value"] == pytest.approx(100 * 5 / 9) and b["n"] == 9 and b["low"] < b["value"] < b["high"]

    groups, bars = model_bars(document, [("val_loss", "loss"), ("stop_rate", "eval"), ("ifeval_stop_rate", "ifeval"),
                                         ("pref_accuracy", "pref")])
    assert groups == ["loss\n(n=3)", "eval\n(n=8)", "ifeval\n(n=20)", "pref\n(n=4)"]
    for label, estimates in bars.items():
        loss = study["columns"][label]["val_loss"]
        assert (estimates[0]["low"], estimates[0]["high"]) == (loss["low"], loss["high"])
        assert estimates[1]["value"] == 50.0 and estimates[1]["low"] < 50.0 < estimates[1]["high"]
        stopped = study["columns"][label]["confounds"]["ifeval"]  # the confounds table's count
        assert estimates[2]["value"] == pytest.approx(100 * stopped["stopped"] / stopped["responses"])
    assert bars["base"][3] is None and bars["dpo"][3]["value"] == 75.0 and bars["dpo"][3]["low"] is not None


def test_the_drawn_bars_carry_their_error_bars(study, tmp_path):
    from matplotlib.container import ErrorbarContainer

    from evaluation import charts

    document = chart_document(study)
    drawn = {}
    original = charts._save

    def keep(fig, path):
        drawn[path.name] = [c for ax in fig.axes for c in ax.containers if isinstance(c, ErrorbarContainer)]
        return original(fig, path)

    charts._save = keep
    try:
        written = dict(charts.write_charts(document, tmp_path))
    finally:
        charts._save = original
    assert set(written) == {"IF accuracy per model", "ifeval per instruction type", "Validation loss", "Stop rate",
                            "Preference accuracy"}
    assert [len(bars) for bars in drawn.values()] == [3] * 5  # one set of error bars per model in every chart
    assert len(drawn["if_accuracy.png"][0].lines[2][0].get_segments()) == 4  # the four numbers of a column
    assert len(drawn["pref_accuracy.png"][0].lines[2][0].get_segments()) == 1  # base: logp only (no pref vs itself)


def test_the_monitor_chart_draws_the_paired_changes_its_table_prints(tmp_path):
    from evaluation.study_charts import monitor_points, rloo_monitor_chart

    result = rloo_monitor.monitor(MOVED, HACKED, resamples=RESAMPLES)
    points = monitor_points(result)
    for point, key in zip(points, ("proxy", "checker")):
        e = result["paired"][key]
        assert (point["value"], point["low"], point["high"], point["n"]) == (e["change"], e["low"], e["high"], 12)
        assert f"(n=12, p={e['p']:.2g})" in point["label"]
    table = "\n".join(rloo_monitor.monitor_lines(result, None))
    assert f"{rloo_monitor.signed(points[0]['value'], 3)} [{rloo_monitor.signed(points[0]['low'], 3)}, " in table
    assert rloo_monitor_chart(MOVED, tmp_path / "m.png", result=result).read_bytes()[:8] == PNG_SIGNATURE
    unchecked = rloo_monitor.monitor(MOVED, passes([(0.1, None)] * 9, [(0.2, None)] * 9), resamples=RESAMPLES)
    assert monitor_points(unchecked) == []  # no checker: nothing paired to draw
