"""core/modeling.py: model sources, devices, precision, LoRA seeding, adapters; real from_pretrained."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from core.cli import UserError
from core.modeling import (ModelSource, attach_lora, base_model_of, bnb_4bit_config, linear_module_names,
                          load_adapter_model, load_base_model, load_tokenizer, pick_device, resolve_model_source,
                          resolve_precision, torch_dtype)




# --------------------------------------------------------------------------- sources


def test_local_directory_hub_id_and_gguf_file(tmp_path):
    assert resolve_model_source(str(tmp_path)) == ModelSource(str(tmp_path))
    assert resolve_model_source("TinyLlama/TinyLlama_v1.1") == ModelSource("TinyLlama/TinyLlama_v1.1")
    assert resolve_model_source("gpt2") == ModelSource("gpt2")
    gguf = tmp_path / "SmolLM2-135M.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")
    source = resolve_model_source(str(gguf))
    assert source == ModelSource(str(tmp_path), "SmolLM2-135M.Q4_1.gguf")
    assert source.kwargs() == {"gguf_file": "SmolLM2-135M.Q4_1.gguf"} and str(source) == str(gguf)
    assert ModelSource("gpt2").kwargs() == {}


@pytest.mark.parametrize("path, message", [
    ("./models/missing", "model path not found"),
    ("/no/such/dir", "model path not found"),
    ("models/a/b", "model path not found"),
    ("missing.gguf", "GGUF file not found"),
])
def test_missing_local_sources_are_one_line_errors(path, message):
    with pytest.raises(UserError, match=message):
        resolve_model_source(path)


def test_a_plain_file_is_not_a_model(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(UserError, match="is a file"):
        resolve_model_source(str(tmp_path / "weights.bin"))


def test_loads_model_and_tokenizer_from_a_directory(tiny_llama_dir):
    tokenizer = load_tokenizer(str(tiny_llama_dir))
    model = load_base_model(str(tiny_llama_dir), dtype=torch.bfloat16)
    assert tokenizer.eos_token_id == 2 and model.dtype == torch.bfloat16
    assert model.config.vocab_size == len(tokenizer)


def test_separate_tokenizer_source(tiny_llama_dir, bytelevel_tokenizer_dir):
    tokenizer = load_tokenizer(str(tiny_llama_dir), tokenizer_name_or_path=str(bytelevel_tokenizer_dir))
    assert tokenizer.eos_token == "<|endoftext|>"


def write_llama_gguf(model_dir: Path, sp_model: Path, path: Path) -> Path:
    """Write a Llama checkpoint as an fp32 GGUF file, laid out as llama.cpp's converter does."""
    import gguf
    import numpy as np
    import sentencepiece as spm
    from safetensors.torch import load_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("llama")
    pieces = range(sp.get_piece_size())
    writer.add_token_list([sp.id_to_piece(i).encode() for i in pieces])
    writer.add_token_scores([sp.get_score(i) for i in pieces])
    # GGUF token types: 1 normal, 2 unknown, 3 control, 6 byte
    writer.add_token_types([2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1 for i in pieces])
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_unk_token_id(0)

    def interleave_rotary_halves(w, heads):  # llama.cpp's q/k layout; transformers undoes it on load
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for layer in range(config.num_hidden_layers):
        names.update({f"model.layers.{layer}.{hf}.weight": f"blk.{layer}.{gg}.weight" for hf, gg in per_layer.items()})
    weights = load_file(model_dir / "model.safetensors")
    for hf_name, gguf_name in names.items():
        w = weights[hf_name].float().numpy()
        if gguf_name.endswith("attn_q.weight"):
            w = interleave_rotary_halves(w, config.num_attention_heads)
        elif gguf_name.endswith("attn_k.weight"):
            w = interleave_rotary_halves(w, config.num_key_value_heads)
        writer.add_tensor(gguf_name, np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_llama_dir, sp_tokenizer_dir) -> Path:
    pytest.importorskip("gguf")
    return write_llama_gguf(tiny_llama_dir, sp_tokenizer_dir / "tokenizer.model",
                            tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf")


def test_gguf_file_loads_the_same_model_and_tokenizer(tiny_gguf, tiny_llama_dir):
    text = "Below is an instruction.\n\n### Response:\nThe capital of France is Paris."
    expected_ids = AutoTokenizer.from_pretrained(tiny_llama_dir)(text)["input_ids"]
    assert load_tokenizer(str(tiny_gguf))(text)["input_ids"] == expected_ids
    ids = torch.tensor([expected_ids])
    model = load_base_model(str(tiny_gguf))
    assert not model.is_quantized  # dequantised on load: trainable and savable like any model
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        expected = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)(input_ids=ids).logits
    assert torch.allclose(logits, expected, atol=1e-5)


def test_unloadable_directory_is_a_one_line_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="cannot load model from"):
        load_base_model(str(tmp_path))
    with pytest.raises(UserError, match="cannot load tokenizer from"):
        load_tokenizer(str(tmp_path))


def test_remote_code_stays_off_by_default():
    import inspect

    for function in (load_tokenizer, load_base_model, load_adapter_model):
        assert inspect.signature(function).parameters["trust_remote_code"].default is False


# --------------------------------------------------------------------------- device and precision


def test_device_picking_on_this_machine():
    assert pick_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert pick_device("auto").type == expected
    with pytest.raises(UserError, match="unknown device"):
        pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="not available"):
            pick_device("cuda")


def test_precision_rules_on_cpu():
    """auto and bf16 on the CPU depend on its instructions: tests/test_precision.py."""
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32"
    with pytest.raises(UserError, match="fp16 needs a GPU"):
        resolve_precision("fp16", cpu)
    assert torch_dtype("bf16") == torch.bfloat16 and torch_dtype("fp16") == torch.float16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_precision_on_cuda_prefers_bf16():
    device = torch.device("cuda")
    assert resolve_precision("auto", device) == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")


def test_missing_bitsandbytes_says_how_to_install_it(monkeypatch):
    import sys

    from core.modeling import require_bitsandbytes

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail, as on macOS
    with pytest.raises(UserError, match="pip install bitsandbytes"):
        require_bitsandbytes()
    with pytest.raises(UserError, match="pip install bitsandbytes"):
        bnb_4bit_config(torch.bfloat16)


def test_4bit_config_is_nf4_double_quant():
    pytest.importorskip("bitsandbytes")
    config = bnb_4bit_config(torch.bfloat16)
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_use_double_quant and config.bnb_4bit_compute_dtype == torch.bfloat16


# --------------------------------------------------------------------------- LoRA


def _lora(model_dir, seed, targets=("q_proj", "v_proj")):
    return attach_lora(load_base_model(str(model_dir)), r=4, alpha=8, dropout=0.0, target_modules=list(targets), seed=seed)


def _lora_a(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}


def test_same_seed_same_adapter_other_seed_other_adapter(tiny_llama_dir):
    torch.manual_seed(1)  # whatever happened before must not matter
    first = _lora_a(_lora(tiny_llama_dir, seed=7))
    torch.manual_seed(2)
    second = _lora_a(_lora(tiny_llama_dir, seed=7))
    third = _lora_a(_lora(tiny_llama_dir, seed=8))
    assert first and all(torch.equal(first[n], second[n]) for n in first)
    assert not all(torch.equal(first[n], third[n]) for n in first)


def test_only_lora_weights_train(tiny_llama_dir):
    model = _lora(tiny_llama_dir, seed=0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert model.config.use_cache is False


def test_lora_weights_stay_fp32_on_a_half_precision_base(tiny_llama_dir):
    """fp16 training needs fp32 master weights for the GradScaler; bf16 keeps small updates."""
    model = attach_lora(load_base_model(str(tiny_llama_dir), dtype=torch.bfloat16), r=4, alpha=8, dropout=0.0,
                        target_modules=["q_proj"], seed=0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.bfloat16


def test_unknown_target_modules_list_the_real_ones(tiny_llama_dir):
    with pytest.raises(UserError, match=r"match no layer.*q_proj.*v_proj"):
        _lora(tiny_llama_dir, seed=0, targets=("query_key_value",))
    names = linear_module_names(load_base_model(str(tiny_llama_dir)))
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"} <= set(names)


# --------------------------------------------------------------------------- trained adapters


def _saved_adapter(tmp_path: Path, model_dir: Path) -> Path:
    model = _lora(model_dir, seed=0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    out = tmp_path / "adapter"
    model.save_pretrained(out)
    return out


def test_base_model_comes_from_run_config_then_adapter_config(tmp_path, tiny_llama_dir):
    adapter = _saved_adapter(tmp_path, tiny_llama_dir)
    assert base_model_of(adapter) == json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    (adapter / "sft_config.json").write_text(json.dumps({"config": {"model_name_or_path": "/models/base.gguf"}}))
    assert base_model_of(adapter) == "/models/base.gguf"  # the user's exact source wins
    with pytest.raises(UserError, match="adapter_config.json"):
        base_model_of(tmp_path / "empty")


def test_adapter_loads_in_full_precision_with_the_saved_weights(tmp_path, tiny_llama_dir):
    adapter = _saved_adapter(tmp_path, tiny_llama_dir)
    ids = torch.tensor([[1, 5, 9, 17, 33]])
    expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), str(adapter))(input_ids=ids).logits
    model = load_adapter_model(adapter, base_model=str(tiny_llama_dir))
    assert not any(p.requires_grad for p in model.parameters())  # loaded for inference
    assert torch.allclose(model(input_ids=ids).logits, expected, atol=1e-6)
    with pytest.raises(UserError, match="no LoRA adapter"):
        load_adapter_model(tmp_path)
