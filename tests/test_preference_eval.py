"""core/pairs.py and evaluation/preference.py: tokenisation like SFT, log-probs, accuracy and margin."""
from __future__ import annotations

import pytest
import torch

import tiny_assets
from core.pairs import encode_pairs, read_pairs
from evaluation.preference import PairLogps, pair_logps, preference_metrics
from core.cli import UserError
from core.prompting import load_template, prompt_format
from core.tokenization import encode_prompt


def tiny_pairs(n: int = 6) -> list[dict]:
    """Template-free pairs, plus the Alpaca-rendered ``prompt`` the assertions compare with."""
    rows = tiny_assets.rendered_rows(1)[:n]
    return [{"instruction": r["instruction"], "input": r["input"], "prompt": r["prompt"], "chosen": r["output"],
             "rejected": "No idea, sorry."} for r in rows]


def alpaca(tokenizer):
    return prompt_format(load_template("alpaca"), tokenizer)


@pytest.fixture(scope="module")
def tiny_model_and_tokenizer(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    model.eval()
    return model, AutoTokenizer.from_pretrained(tiny_llama_dir)


def test_pairs_are_tokenised_like_sft_prompt_then_response_and_eos(tiny_model_and_tokenizer):
    _, tokenizer = tiny_model_and_tokenizer
    rows = tiny_pairs()
    encoded = encode_pairs(rows, alpaca(tokenizer), max_length=512)
    assert encoded.counts() == {"pairs": 6, "used": 6, "dropped_prompt_too_long": 0, "chosen_truncated": 0,
                                "rejected_truncated": 0, "round_trip_inexact": 0}
    for row, feature in zip(rows, encoded.features):
        assert feature["prompt_ids"] == encode_prompt(row["prompt"], tokenizer)  # exactly what generation sees
        for key in ("chosen", "rejected"):
            ids = feature[f"{key}_ids"]
            assert ids[-1] == tokenizer.eos_token_id
            text = tokenizer.decode(feature["prompt_ids"][1:] + ids[:-1], skip_special_tokens=False)
            assert text == row["prompt"] + row[key]  # no spurious space at the boundary


def test_too_long_pairs_are_truncated_or_dropped_and_counted(tiny_model_and_tokenizer):
    _, tokenizer = tiny_model_and_tokenizer
    rows = tiny_pairs()
    prompt_lengths = [len(encode_prompt(r["prompt"], tokenizer)) for r in rows]
    limit = sorted(prompt_lengths)[2] + 2  # some prompts leave 2 tokens of room, longer ones none
    encoded = encode_pairs(rows, alpaca(tokenizer), max_length=limit)
    dropped = sum(length >= limit for length in prompt_lengths)
    assert encoded.dropped_prompt_too_long == dropped > 0
    assert len(encoded.features) == len(rows) - dropped
    assert encoded.chosen_truncated > 0 and encoded.rejected_truncated > 0
    assert all(len(f["prompt_ids"]) + len(f["chosen_ids"]) <= limit for f in encoded.features)


def _one_at_a_time_logp(model, prompt_ids: list[int], response_ids: list[int]) -> float:
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
    targets = ids[0, 1:]
    per_token = logprobs[torch.arange(len(targets)), targets]
    return per_token[len(prompt_ids) - 1:].sum().item()  # only positions predicting response tokens


def test_batched_pair_logps_equal_one_sequence_at_a_time(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    features = encode_pairs(tiny_pairs(), alpaca(tokenizer), 512).features
    logps = pair_logps(model, features, pad_token_id=tokenizer.eos_token_id, batch_size=4, show_progress=False)
    for i, feature in enumerate(features):
        assert logps.chosen[i] == pytest.approx(_one_at_a_time_logp(model, feature["prompt_ids"], feature["chosen_ids"]), abs=1e-4)
        assert logps.rejected[i] == pytest.approx(_one_at_a_time_logp(model, feature["prompt_ids"], feature["rejected_ids"]), abs=1e-4)
    assert all(value < 0 for value in logps.chosen + logps.rejected)


def test_accuracy_and_margin_of_the_implicit_reward():
    policy = PairLogps(chosen=(-10.0, -5.0), rejected=(-12.0, -3.0))
    base = PairLogps(chosen=(-11.0, -5.0), rejected=(-11.0, -4.0))
    # rewards (beta 0.5): chosen (0.5, 0.0), rejected (-0.5, 0.5) -> margins (1.0, -0.5)
    metrics = preference_metrics(policy, base, beta=0.5)
    assert metrics["pref_accuracy"] == 0.5
    assert metrics["reward_margin"] == pytest.approx(0.25)
    assert metrics["reward_chosen"] == pytest.approx(0.25) and metrics["reward_rejected"] == pytest.approx(0.0)
    assert metrics["logp_accuracy"] == 0.5  # -10 > -12, but -5 < -3
    own = preference_metrics(base, None)
    assert own["pref_accuracy"] is None and own["reward_margin"] is None
    assert own["logp_accuracy"] == 0.0  # -11 vs -11 is a tie (counts as wrong), -5 < -4


def test_pair_files_are_checked_line_by_line(tmp_path):
    bad = tmp_path / "prefs.jsonl"
    bad.write_text('{"instruction": "p", "chosen": "c", "rejected": "r"}\n{"instruction": "p", "chosen": 3, "rejected": "r"}\n')
    with pytest.raises(UserError, match=r"prefs.jsonl:2: field 'chosen' is int"):
        read_pairs(bad)
    old = tmp_path / "old.jsonl"  # pairs prepared before templates moved to training
    old.write_text('{"prompt": "### Instruction:\\np\\n\\n### Response:\\n", "chosen": "c", "rejected": "r"}\n')
    with pytest.raises(UserError, match=r"old.jsonl: row 1: .*rendered 'prompt'.*rerun the prepare script"):
        read_pairs(old)
    with pytest.raises(UserError, match="prepare_dpo_data"):
        read_pairs(tmp_path / "missing.jsonl")


def test_chunked_encoding_equals_one_batch(tiny_model_and_tokenizer):
    _, tokenizer = tiny_model_and_tokenizer
    rows = tiny_pairs(6)
    rows[3] = {**rows[3], "instruction": rows[3]["instruction"] * 40}  # dropped: the prompt alone fills max_length
    whole = encode_pairs(rows, alpaca(tokenizer), 256)
    chunked = encode_pairs(rows, alpaca(tokenizer), 256, chunk_size=4)
    assert chunked.features == whole.features and chunked.counts() == whole.counts()
    assert chunked.kept_rows == whole.kept_rows == [0, 1, 2, 4, 5]
