"""scripts/merge_adapter.py: a merged model that loads with AutoModelForCausalLM alone."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from core.training import DevicePlan
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import tiny_assets
from scripts.merge_adapter import main
from core.cli import run_cli
from core.modeling import attach_lora, load_base_model
from sft.sft_config import SFTConfig, save_sft_config
from sft.training import build_lora_model

IDS = torch.tensor([[1, 7, 42, 99, 3, 15, 200]])




def _perturb_and_save(model, tokenizer_dir: Path, out: Path, base: str) -> Path:
    """Give LoRA B non-zero values (a trained adapter changes the model) and save it like a run does."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    save_sft_config(SFTConfig(model_name_or_path=base), out, preset="mac")
    return out


@pytest.fixture()
def adapter_dir(tmp_path, tiny_llama_dir) -> Path:
    model = attach_lora(load_base_model(str(tiny_llama_dir)), r=4, alpha=8, dropout=0.0,
                        target_modules=["q_proj", "v_proj", "gate_proj"], seed=0)
    return _perturb_and_save(model, tiny_llama_dir, tmp_path / "run", str(tiny_llama_dir))


def _adapter_logits(adapter: Path, base: Path) -> torch.Tensor:
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter)).eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_merged_model_loads_alone_and_matches_base_plus_adapter(tmp_path, adapter_dir, tiny_llama_dir, capsys):
    out = tmp_path / "merged"
    assert main(["--adapter_dir", str(adapter_dir), "--out_dir", str(out)]) == 0
    assert "max |logit difference|" in capsys.readouterr().out
    assert not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert AutoTokenizer.from_pretrained(out).eos_token_id == 2
    with torch.no_grad():
        logits = merged(input_ids=IDS).logits
    assert torch.allclose(logits, _adapter_logits(adapter_dir, tiny_llama_dir), atol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert not torch.allclose(logits, base(input_ids=IDS).logits, atol=1e-3)  # the adapter is in there


def test_bf16_merge_writes_bf16_weights(tmp_path, adapter_dir):
    out = tmp_path / "merged"
    main(["--adapter_dir", str(adapter_dir), "--out_dir", str(out), "--dtype", "bf16"])
    weights = load_file(out / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}


def test_qlora_adapter_merges_into_a_full_precision_base(tmp_path, sp_tokenizer_dir):
    pytest.importorskip("bitsandbytes")
    base_dir = tiny_assets.build_tiny_llama(tmp_path / "llama64", sp_tokenizer_dir, hidden_size=64)
    config = SFTConfig(model_name_or_path=str(base_dir), load_in_4bit=True, lora_r=4,
                       lora_target_modules=["q_proj", "v_proj"])
    model = build_lora_model(config, DevicePlan(torch.device("cpu"), "fp32", load_in_4bit=True, device_map="cpu"))
    adapter = _perturb_and_save(model, base_dir, tmp_path / "qlora_run", str(base_dir))
    out = tmp_path / "merged"
    main(["--adapter_dir", str(adapter), "--out_dir", str(out)])
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    weights = load_file(out / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in weights.values())
    with torch.no_grad():
        merged_logits = AutoModelForCausalLM.from_pretrained(out)(input_ids=IDS).logits
    assert torch.allclose(merged_logits, _adapter_logits(adapter, base_dir), atol=1e-5)


def test_adapter_on_a_gguf_base_merges_from_the_gguf_file(tmp_path, tiny_llama_dir, sp_tokenizer_dir):
    pytest.importorskip("gguf")
    from test_modeling import write_llama_gguf

    gguf_file = write_llama_gguf(tiny_llama_dir, sp_tokenizer_dir / "tokenizer.model", tmp_path / "base.gguf")
    model = attach_lora(load_base_model(str(gguf_file)), r=4, alpha=8, dropout=0.0, target_modules=["q_proj"], seed=0)
    adapter = _perturb_and_save(model, tiny_llama_dir, tmp_path / "run", str(gguf_file))
    out = tmp_path / "merged"
    main(["--adapter_dir", str(adapter), "--out_dir", str(out)])  # base found via the run's sft_config.json
    with torch.no_grad():
        merged_logits = AutoModelForCausalLM.from_pretrained(out)(input_ids=IDS).logits
    assert torch.allclose(merged_logits, _adapter_logits(adapter, tiny_llama_dir), atol=1e-5)


def test_base_model_override(tmp_path, adapter_dir, tiny_llama_dir):
    (adapter_dir / "sft_config.json").unlink()  # only adapter_config.json names the base now
    out = tmp_path / "merged"
    main(["--adapter_dir", str(adapter_dir), "--out_dir", str(out), "--base_model", str(tiny_llama_dir)])
    assert (out / "model.safetensors").is_file()


def _error(capsys, argv) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, argv)
    return exit_info.value.code, capsys.readouterr().err.strip()


def test_refuses_a_non_empty_out_dir_unless_overwrite(tmp_path, adapter_dir, capsys):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, err = _error(capsys, ["--adapter_dir", str(adapter_dir), "--out_dir", str(out)])
    assert code == 2 and "--overwrite" in err and (out / "keep.txt").exists()
    main(["--adapter_dir", str(adapter_dir), "--out_dir", str(out), "--overwrite"])
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


@pytest.mark.parametrize("problem", ["no_adapter", "same_dir", "missing_flag"])
def test_bad_input_is_one_line(tmp_path, adapter_dir, capsys, problem):
    argv = {
        "no_adapter": ["--adapter_dir", str(tmp_path), "--out_dir", str(tmp_path / "m")],
        "same_dir": ["--adapter_dir", str(adapter_dir), "--out_dir", str(adapter_dir)],
        "missing_flag": ["--adapter_dir", str(adapter_dir)],
    }[problem]
    code, err = _error(capsys, argv)
    assert code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1
