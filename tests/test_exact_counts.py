"""Every accuracy is a count of pairs, printed as the count (12/13 = 0.923), with its cap and reference said.

Fast checks of the pieces; the DPO, reward-model and RLOO runs that use them are tested end to end in
test_dpo_training.py and test_rlhf_rloo.py.
"""
from __future__ import annotations

import pytest

from core.pairs import EncodedPairs, PairData
from core.reporting import fraction_text, pairs_correct, pool_batch_means
from core.log import log_line
from dpo.trainer import SHOWN_KEYS as DPO_SHOWN
from evaluation.report import metrics_table, summary_table
from rlhf.rloo_training import SHOWN_KEYS as RLOO_SHOWN


def test_batch_means_are_weighted_by_pairs():
    # 13 held-out pairs in batches of 8 and 5, 7 and 5 right: TRL logs (7/8 + 5/5) / 2 = 0.9375.
    metrics = {"rewards/accuracies": [7 / 8, 1.0], "rewards/margins": [0.8, 0.5], "entropy": [3.0, 4.0]}
    assert pairs_correct(metrics["rewards/accuracies"], [8, 5]) == 12
    assert pool_batch_means(metrics, [8, 5], ("rewards/accuracies", "rewards/margins")) == 13
    assert metrics["rewards/accuracies"] == [pytest.approx(12 / 13)]
    assert metrics["rewards/margins"] == [pytest.approx((0.8 * 8 + 0.5 * 5) / 13)]
    assert metrics["entropy"] == [3.0, 4.0]  # a per-token mean: not touched
    assert fraction_text(12, 13) == "12/13 = 0.923" and fraction_text(None, 13) == "n/a"


def test_log_lines_print_the_count_and_only_the_shown_keys():
    dpo_eval = {"eval_loss": 0.56, "eval_entropy": 5.98, "eval_num_tokens": 0, "eval_logits/chosen": 0.005,
                "eval_mean_token_accuracy": 0.02, "eval_rewards/accuracies": 12 / 13, "eval_rewards/margins": 0.28,
                "eval_logps/chosen": -112.9, "eval_pairs": 13, "eval_pairs_correct": 12, "eval_runtime": 0.1}
    line = log_line(6, 6, dpo_eval, DPO_SHOWN)
    assert line == "step 6/6 held-out: loss 0.56, reward accuracy 12/13 = 0.923, reward margin 0.28"
    rloo_train = {"loss": 2e-08, "grad_norm": 37.1, "learning_rate": 0.01, "num_tokens": 1420.0, "kl": 0.027,
                  "completions/mean_length": 8.0, "completions/clipped_ratio": 1.0, "rewards/reward_model/mean": 2.15,
                  "rewards/reward_model/std": 2.0, "reward": 1.65, "reward_std": 2.0, "entropy": 4.6,
                  "clip_ratio/low_mean": 0.0, "step_time": 0.7, "completions/stop_rate": 0.0, "epoch": 0.4}
    line = log_line(2, 2, rloo_train, RLOO_SHOWN)
    assert line == ("step 2/2 (epoch 0.40): reward 1.65, RM score 2.15, KL 2.70e-02, length 8, stop rate 0, "
                    "grad_norm 37.1, lr 1.00e-02")
    assert log_line(2, 2, {"loss": 1.0, "entropy": 3.0}) == "step 2/2: loss 1, entropy 3"  # no filter: every key


def test_a_held_out_line_where_every_reward_is_0_says_every_pair_ties_as_the_summary_does():
    from dpo.training import accuracy_text

    step0 = {"eval_loss": 0.6931, "eval_rewards/accuracies": 0.0, "eval_rewards/margins": 0.0, "eval_rewards/chosen": 0.0,
             "eval_rewards/rejected": 0.0, "eval_pairs": 10, "eval_pairs_correct": 0}
    line = log_line(0, 24, step0, DPO_SHOWN)
    assert "reward accuracy n/a (every pair ties)," in line and "0/10" not in line
    metrics = {"val_pairs_correct_before": None, "val_pairs": 10, "val_reward_chosen_before": 0.0,
               "val_reward_rejected_before": 0.0, "val_pairs_correct_after": 9, "val_reward_chosen_after": 0.02,
               "val_reward_rejected_after": -0.01}
    assert accuracy_text(metrics, "before") == "n/a (every pair ties)" and accuracy_text(metrics, "after") == "9/10 = 0.900"
    moved = {**step0, "eval_rewards/chosen": 0.001, "eval_pairs_correct": 7}
    assert "reward accuracy 7/10 = 0.700," in log_line(4, 24, moved, DPO_SHOWN)  # rewards not all 0: the count


def test_a_cap_on_the_pairs_is_said():
    val = EncodedPairs(features=[{}] * 10, pairs=10)
    data = PairData(EncodedPairs(features=[{}] * 8, pairs=8), val, train_file_pairs=8, val_file_pairs=13, val_cap=10)
    assert data.summary().startswith("train 8 pairs -> 8 used (0 dropped")
    assert "val 13 pairs, first 10 used (--max_eval_samples 10; 0 dropped: prompt fills max_length" in data.summary()
    dropped = EncodedPairs(features=[{}] * 9, pairs=10, dropped_prompt_too_long=1)
    assert dropped.summary(13, "--max_eval_samples 10", how="10 sampled with seed 42").startswith(
        "13 pairs, 10 sampled with seed 42 taken -> 9 used (--max_eval_samples 10; 1 dropped")


def test_eval_tables_name_the_reference_and_show_the_count():
    metrics = {"base": {"pref_accuracy": None, "pref_correct": None, "pref_pairs": 13, "logp_accuracy": 7 / 13,
                        "logp_correct": 7},
               "dpo": {"pref_accuracy": 12 / 13, "pref_correct": 12, "pref_pairs": 13, "logp_accuracy": 0.5,
                       "logp_correct": None}}
    table = metrics_table(metrics)
    assert "pref acc (vs base)" in table and "92% (12/13)" in table and "54% (7/13)" in table
    assert "| pref acc (vs base) | - | 92% (12/13) |" in summary_table(metrics, [])


def test_a_kl_estimate_prints_in_scientific_notation_and_never_as_minus_zero():
    from core.log import kl_text

    assert kl_text(-7.126e-05) == "-7.13e-05" and kl_text(0.027) == "2.70e-02"  # a tiny negative estimate stays visible
    assert kl_text(-0.0) == "0.00e+00" and kl_text(0.0, sign=True) == "0.00e+00" and kl_text(1.2e-3, sign=True) == "+1.20e-03"
    assert kl_text(None) == "n/a"
    assert log_line(2, 2, {"kl": -7.126e-05, "reward": 0.1}, RLOO_SHOWN) == "step 2/2: reward 0.1, KL -7.13e-05"
    assert log_line(0, 2, {"eval_kl": -0.0}, RLOO_SHOWN) == "step 0/2 held-out: KL 0.00e+00"
