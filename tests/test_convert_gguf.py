"""scripts/convert_gguf.py: a GGUF file becomes a plain model folder with the same logits and tokenizer."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from core.cli import UserError, run_cli
from core.modeling import load_base_model
from scripts.convert_gguf import convert_gguf, main


def test_the_folder_gives_the_gguf_models_logits_and_tokens(tmp_path, tiny_llama_dir, sp_tokenizer_dir):
    pytest.importorskip("gguf")
    from test_modeling import write_llama_gguf

    gguf_file = write_llama_gguf(tiny_llama_dir, sp_tokenizer_dir / "tokenizer.model", tmp_path / "tiny.gguf")
    out = tmp_path / "tiny"
    difference = convert_gguf(gguf_file, out)
    assert difference < 1e-5 and (out / "model.safetensors").is_file()
    ids = torch.tensor([[1, 5, 9, 23, 42]])
    with torch.no_grad():
        from_folder = AutoModelForCausalLM.from_pretrained(out)(input_ids=ids).logits  # no gguf_file= needed any more
        from_gguf = load_base_model(str(gguf_file))(input_ids=ids).logits
    assert torch.allclose(from_folder, from_gguf, atol=1e-6)
    text = "Once upon a time"
    assert AutoTokenizer.from_pretrained(out)(text)["input_ids"] == \
        AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")(text)["input_ids"]
    with pytest.raises(UserError, match="--overwrite"):  # never over a folder silently
        convert_gguf(gguf_file, out)


def test_a_missing_gguf_file_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, ["--gguf", str(tmp_path / "missing.gguf"), "--out_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err == f"error: GGUF file not found: {tmp_path / 'missing.gguf'}"
