"""Tiny, real assets built in a second, so tests run offline on a CPU.

- a Llama-style SentencePiece BPE tokenizer with byte fallback (the shape of the real Llama-2 /
  TinyLlama tokenizer, including its leading-space behaviour at a prompt/response boundary);
- a GPT-2-style byte-level BPE tokenizer (no BOS, EOS used as pad by convention);
- a 2-layer ``LlamaForCausalLM`` saved with ``save_pretrained`` and loaded back with
  ``from_pretrained`` by the code under test;
- small SFT JSONL files in the prepare script's output format.
"""
from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Iterator

from core.prompting import load_template

INSTRUCTIONS = [
    ("Give three tips for staying healthy.", "", "1. Eat well.\n2. Sleep eight hours.\n3. Walk every day."),
    ("What is the capital of France?", "", "The capital of France is Paris."),
    ("Translate the sentence into French.", "I like apples.", "J'aime les pommes."),
    ("Write a Python function that adds two numbers.", "", "def add(a, b):\n    return a + b"),
    ("Summarize the text in one sentence.", "Lily found a ball in the park and played all day.", "Lily played with a ball she found."),
    ("Name a primary colour.", "", "Red."),
    ("Classify the sentiment.", "I love this movie!", "Positive"),
    ("Explain what a noun is.", "", "A noun is a word that names a person, place or thing."),
    ("Reverse the list.", "[1, 2, 3]", "[3, 2, 1]"),
    ("Describe the sky on a clear day.", "", "The sky is bright blue, with the sun shining and no clouds."),
    ("List two prime numbers.", "", "2 and 3."),
    ("Correct the spelling.", "Teh cat sat on teh mat.", "The cat sat on the mat."),
]


def _corpus() -> list[str]:
    template = load_template()
    lines = [template.prompt_input, template.prompt_no_input]
    for instruction, inp, out in INSTRUCTIONS:
        lines += [instruction, inp, out, template.render(instruction, inp) + out]
    lines += ["Once upon a time there was a little girl named Lily. She liked to play outside in the sun."] * 3
    return [line for line in lines if line] * 4


def build_sentencepiece_tokenizer(out_dir: Path, vocab_size: int = 400) -> Path:
    """A Llama-family tokenizer: SentencePiece BPE, byte fallback, BOS=1, EOS=2, no pad token."""
    import sentencepiece as spm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = out_dir / "_sp"
    work.mkdir(exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_prefix=str(work / "sp"), vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, split_digits=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )
    shutil.copy(work / "sp.model", out_dir / "tokenizer.model")
    shutil.rmtree(work)
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": False, "model_max_length": 2048,
    }))
    # Round-trip through transformers so the directory holds a ready tokenizer.json.
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(out_dir).save_pretrained(out_dir)
    return out_dir


def build_byte_level_tokenizer(out_dir: Path, vocab_size: int = 400) -> Path:
    """A GPT-2-style byte-level BPE tokenizer: no BOS, ``<|endoftext|>`` as EOS, no pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", model_max_length=2048)
    fast.save_pretrained(out_dir)
    return out_dir


def build_tiny_llama(out_dir: Path, tokenizer_dir: Path, hidden_size: int = 32, layers: int = 2, seed: int = 0,
                     initializer_range: float = 0.02, heads: int = 4) -> Path:
    """A randomly initialised 2-layer Llama saved with its tokenizer, loadable with from_pretrained.

    A larger ``initializer_range`` gives peaked (far from uniform) next-token distributions, which
    a few RL steps can visibly move. vLLM's CPU attention needs a head size of at least 32
    (``hidden_size / heads``), e.g. ``hidden_size=64, heads=2``.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
        initializer_range=initializer_range,
    )
    model = LlamaForCausalLM(config)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def sft_rows(repeat: int = 1) -> list[dict]:
    """Rows in the format scripts/prepare_sft_data.py writes (template-free)."""
    rows = []
    for r in range(repeat):
        for i, (instruction, inp, out) in enumerate(INSTRUCTIONS):
            rows.append({"id": f"tiny-{r}-{i}", "source": "tiny", "instruction": instruction, "input": inp, "output": out})
    return rows


def rendered_rows(repeat: int = 1) -> list[dict]:
    """``sft_rows`` plus ``prompt`` (rendered with the Alpaca template) and ``response``: the encoder's inputs."""
    template = load_template()
    return [{**row, "prompt": template.render(row["instruction"], row["input"]), "response": row["output"]}
            for row in sft_rows(repeat)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@contextlib.contextmanager
def recorded_stdout(path: Path) -> Iterator[None]:
    """Write what a run prints (its log lines included) to ``path`` as well, for tests that read it later.

    For module-scoped fixtures, where a test's ``capsys`` cannot see the output.
    """
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        path.write_text(buffer.getvalue(), encoding="utf-8")
        sys.stdout.write(buffer.getvalue())


LOG_LINE = re.compile(r"step \d+(/\d+)?( \(epoch [\d.]+\))?( held-out)?: .*")


def log_lines(path: Path) -> list[str]:
    """The Trainer log lines among what a run printed (``step N/M ...: ...``, progress-bar debris cut off),
    and any raw dict print (``{'loss': '3.58', ...}``) the Trainer made instead."""
    lines = path.read_text(encoding="utf-8").replace("\r", "\n").splitlines()
    readable = [m.group(0) for line in lines if (m := LOG_LINE.search(line))]
    raw = [line[line.index("{'"):] for line in lines if any(f"{{'{key}" in line for key in ("loss'", "eval_", "train_runtime'"))]
    return readable + raw
