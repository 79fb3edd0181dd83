"""Batched left-padded generation (core/generation.py) on tiny real models, CPU only."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import tiny_assets
from core.tokenization import IGNORE_INDEX, PaddingCollator, tokenize_example
from core.generation import SamplingSettings, encode_prompts, generate_texts

PROMPTS = [row["prompt"] for row in tiny_assets.rendered_rows()]  # 12 prompts of different lengths




def _load(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def trained_llama_dir(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama fine-tuned (all weights, 40 steps) to answer and stop: some prompts end with EOS, some don't."""
    torch.set_num_threads(1)
    model, tokenizer = _load(tiny_llama_dir)
    rows = tiny_assets.rendered_rows()
    batch = PaddingCollator(pad_token_id=0)([tokenize_example(r["prompt"], r["response"], tokenizer, 128) for r in rows])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(40):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    out = tmp_path_factory.mktemp("trained_llama")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def bytelevel_llama_dir(bytelevel_tokenizer_dir, tmp_path_factory):
    return tiny_assets.build_tiny_llama(tmp_path_factory.mktemp("bl_llama"), bytelevel_tokenizer_dir)


def _one_at_a_time(model, tokenizer, prompts, max_new_tokens):
    return [generate_texts(model, tokenizer, [p], max_new_tokens=max_new_tokens, show_progress=False)[0] for p in prompts]


@pytest.mark.parametrize("model_fixture", ["tiny_llama_dir", "trained_llama_dir", "bytelevel_llama_dir"])
def test_batched_greedy_equals_one_at_a_time(model_fixture, request):
    model, tokenizer = _load(request.getfixturevalue(model_fixture))
    # Batch 5 over 12 prompts: uneven last batch, and every batch mixes prompt lengths (left padding).
    batched = generate_texts(model, tokenizer, PROMPTS, max_new_tokens=24, batch_size=5, show_progress=False)
    single = _one_at_a_time(model, tokenizer, PROMPTS, max_new_tokens=24)
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]
    assert batched == single


def test_trained_model_stops_at_eos_and_text_is_cut_there(trained_llama_dir):
    model, tokenizer = _load(trained_llama_dir)
    outs = generate_texts(model, tokenizer, PROMPTS, max_new_tokens=24, batch_size=12, show_progress=False)
    stopped = [g for g in outs if g.stopped_with_eos]
    running = [g for g in outs if not g.stopped_with_eos]
    assert stopped and running, "the fixture should give a batch where some rows end early and others run on"
    for g in stopped:
        assert tokenizer.eos_token_id not in g.token_ids
        assert g.num_tokens < 24
        assert g.text == tokenizer.decode(list(g.token_ids), skip_special_tokens=True)
    assert all(g.num_tokens == 24 for g in running)


def _constant_next_token_model(model_dir, token_id):
    """The tiny Llama with its head replaced so every step predicts ``token_id`` (a real generate run)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[token_id] = 10.0
    model.lm_head = head
    return model


def test_immediate_eos_gives_empty_output(tiny_llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = _constant_next_token_model(tiny_llama_dir, tokenizer.eos_token_id)
    outs = generate_texts(model, tokenizer, PROMPTS[:3], max_new_tokens=10, batch_size=2, show_progress=False)
    assert all(g.stopped_with_eos and g.num_tokens == 0 and g.text == "" for g in outs)


def test_no_eos_runs_to_max_new_tokens(tiny_llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    token = tokenizer.convert_tokens_to_ids("a") if "a" in tokenizer.get_vocab() else 10
    model = _constant_next_token_model(tiny_llama_dir, token)
    outs = generate_texts(model, tokenizer, PROMPTS[:3], max_new_tokens=7, batch_size=3, show_progress=False)
    assert all(not g.stopped_with_eos and g.token_ids == (token,) * 7 for g in outs)


def test_prompt_tokens_are_the_training_prompt_tokens(sp_tokenizer_dir, bytelevel_tokenizer_dir):
    for tokenizer_dir in (sp_tokenizer_dir, bytelevel_tokenizer_dir):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        for row in tiny_assets.rendered_rows()[:4]:
            (prompt_ids,) = encode_prompts(tokenizer, [row["prompt"]])
            feature = tokenize_example(row["prompt"], row["response"], tokenizer, 256)
            n = len(prompt_ids)
            assert feature["input_ids"][:n] == prompt_ids
            assert feature["labels"][:n] == [IGNORE_INDEX] * n and feature["labels"][n] != IGNORE_INDEX


def test_tokenizer_is_left_as_it_was(tiny_llama_dir):
    model, tokenizer = _load(tiny_llama_dir)
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    generate_texts(model, tokenizer, PROMPTS[:4], max_new_tokens=3, batch_size=4, show_progress=False)
    assert (tokenizer.padding_side, tokenizer.pad_token) == (side, pad)


def test_sampling_is_reproducible_with_a_seed(tiny_llama_dir):
    model, tokenizer = _load(tiny_llama_dir)

    def sample(seed):
        settings = SamplingSettings(do_sample=True, temperature=1.5, top_p=0.95, seed=seed)
        return generate_texts(model, tokenizer, PROMPTS[:4], max_new_tokens=12, batch_size=4, sampling=settings,
                              show_progress=False)

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)
    greedy = generate_texts(model, tokenizer, PROMPTS[:4], max_new_tokens=12, batch_size=4, show_progress=False)
    assert sample(1) != greedy


def test_bad_sampling_settings_are_rejected():
    with pytest.raises(ValueError, match="temperature"):
        SamplingSettings(do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingSettings(do_sample=True, top_p=0.0)
