"""sft/dataset.py: token-exact boundaries, label masks, truncation, the cache and the collator.

Real tokenizers built in temp dirs and loaded with ``from_pretrained`` (no mocks, no network):
the Llama-style SentencePiece BPE and GPT-2-style byte-level BPE fixtures, plus a byte tokenizer
defined here whose ids are known literally (id = 3 + byte value).
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoTokenizer

import tiny_assets
from core.cli import UserError
from core.tokenization import IGNORE_INDEX, PaddingCollator, encode_examples, encode_prompt, ensure_pad_token, tokenize_example
from sft.dataset import check_data_files, load_sft_datasets, tokenizer_fingerprint
from core.prompting import load_template
from sft.sft_config import parse_sft_config

BOS, EOS = 1, 2
PROMPT = load_template().render("What is the capital of France?")
RESPONSE = "The capital of France is Paris."


# --------------------------------------------------------------------------- tokenizers


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the ByteLevel pre-tokenizer's alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def _save_byte_tokenizer(out_dir, with_bos=True, with_specials=True):
    """One token per byte, id = 3 + byte value, no merges: every count below is literal."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": BOS, "</s>": EOS, **{char: 3 + byte for byte, char in _bytes_to_unicode().items()}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    if with_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"} if with_specials else {}
    PreTrainedTokenizerFast(tokenizer_object=tok, **specials).save_pretrained(out_dir)
    return out_dir


def byte_ids(text: str) -> list[int]:
    return [3 + b for b in text.encode("utf-8")]


@pytest.fixture(scope="module")
def byte_tok(tmp_path_factory):
    return AutoTokenizer.from_pretrained(_save_byte_tokenizer(tmp_path_factory.mktemp("byte_tok")))


@pytest.fixture(scope="module")
def sp_tok(sp_tokenizer_dir):
    return AutoTokenizer.from_pretrained(sp_tokenizer_dir)


@pytest.fixture(scope="module")
def bl_tok(bytelevel_tokenizer_dir):
    return AutoTokenizer.from_pretrained(bytelevel_tokenizer_dir)


@pytest.fixture(params=["sentencepiece", "byte_level"])
def real_tok(request, sp_tok, bl_tok):
    return sp_tok if request.param == "sentencepiece" else bl_tok


# --------------------------------------------------------------------------- labels on literal examples


def test_literal_example_masks_prompt_and_supervises_response_and_eos(byte_tok):
    example = tokenize_example("Q: hi\nA:", " ok", byte_tok, max_seq_length=64)
    assert example["input_ids"] == [BOS] + byte_ids("Q: hi\nA:") + byte_ids(" ok") + [EOS]
    assert example["labels"] == [IGNORE_INDEX] * 9 + byte_ids(" ok") + [EOS]
    assert example["attention_mask"] == [1] * 13


def test_train_on_inputs_supervises_every_token(byte_tok):
    example = tokenize_example("Q: hi\nA:", " ok", byte_tok, max_seq_length=64, train_on_inputs=True)
    assert example["labels"] == example["input_ids"] == [BOS] + byte_ids("Q: hi\nA: ok") + [EOS]


def test_empty_response_still_teaches_to_stop(byte_tok):
    example = tokenize_example("Q:", "", byte_tok, max_seq_length=64)
    assert example["labels"] == [IGNORE_INDEX] * 3 + [EOS]


def test_masked_count_equals_prompt_tokens_on_real_tokenizers(real_tok):
    example = tokenize_example(PROMPT, RESPONSE, real_tok, max_seq_length=512)
    n_prompt = len(real_tok(PROMPT)["input_ids"])
    assert example["labels"].count(IGNORE_INDEX) == n_prompt
    assert example["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert example["labels"][n_prompt:] == example["input_ids"][n_prompt:]
    assert example["labels"][-1] == real_tok.eos_token_id  # EOS is the last supervised label
    assert example["input_ids"].count(real_tok.eos_token_id) == 1


# --------------------------------------------------------------------------- token-exact boundary


def test_naive_concatenation_is_wrong_on_the_llama_shaped_tokenizer(sp_tok):
    """The problem the module exists for: a separately encoded response gains a spurious space."""
    naive = sp_tok(PROMPT)["input_ids"] + sp_tok(RESPONSE, add_special_tokens=False)["input_ids"]
    assert sp_tok.decode(naive, skip_special_tokens=True) != PROMPT + RESPONSE
    ours = tokenize_example(PROMPT, RESPONSE, sp_tok, max_seq_length=512)["input_ids"][:-1]
    assert ours != naive


@pytest.mark.parametrize("row", tiny_assets.rendered_rows(), ids=lambda row: row["id"])
def test_prompt_prefix_and_exact_round_trip(real_tok, row):
    example = tokenize_example(row["prompt"], row["response"], real_tok, max_seq_length=512)
    prompt_ids = real_tok(row["prompt"])["input_ids"]
    assert example["input_ids"][:len(prompt_ids)] == prompt_ids  # what generation will see
    assert real_tok.decode(example["input_ids"], skip_special_tokens=True) == row["prompt"] + row["response"]


@pytest.mark.parametrize("response", [" leading space", "\nleading newline", "  two spaces", "\n\n1. item", "x"])
def test_awkward_response_starts_round_trip(real_tok, response):
    encoded = encode_examples([PROMPT], [response], real_tok, max_seq_length=512)[0]
    assert encoded.round_trip_exact
    assert encoded.input_ids[:len(real_tok(PROMPT)["input_ids"])] == real_tok(PROMPT)["input_ids"]
    assert real_tok.decode(encoded.input_ids, skip_special_tokens=True) == PROMPT + response


def test_merge_across_the_boundary_keeps_prompt_tokens(real_tok):
    """Cut inside a word: the joined text merges "Resp"+"onse", the prompt's own tokens must win."""
    prompt, response = PROMPT[:-len("onse:\n")], "onse:\nParis."
    encoded = encode_examples([prompt], [response], real_tok, max_seq_length=512)[0]
    assert encoded.boundary_merge  # the fallback path really ran
    assert encoded.round_trip_exact
    prompt_ids = real_tok(prompt)["input_ids"]
    assert encoded.input_ids[:len(prompt_ids)] == prompt_ids
    assert real_tok.decode(encoded.input_ids, skip_special_tokens=True) == prompt + response
    assert encoded.labels[-1] == real_tok.eos_token_id


def test_exactly_one_bos(sp_tok, bl_tok):
    example = tokenize_example(PROMPT, RESPONSE, sp_tok, max_seq_length=512)
    assert example["input_ids"][0] == sp_tok.bos_token_id
    assert example["input_ids"].count(sp_tok.bos_token_id) == 1
    assert encode_prompt("<s>" + PROMPT, sp_tok).count(sp_tok.bos_token_id) == 1
    # The byte-level tokenizer adds no BOS: nothing may be prepended.
    assert tokenize_example(PROMPT, RESPONSE, bl_tok, max_seq_length=512)["input_ids"][:3] == bl_tok(PROMPT)["input_ids"][:3]


def test_no_padding_inside_an_example(sp_tok):
    tok = AutoTokenizer.from_pretrained(sp_tok.name_or_path)
    ensure_pad_token(tok)
    example = tokenize_example(PROMPT, RESPONSE, tok, max_seq_length=512)
    assert tok.pad_token_id not in example["input_ids"]


# --------------------------------------------------------------------------- truncation and dropping


def test_truncation_cuts_the_response_tail_without_eos(byte_tok):
    encoded = encode_examples(["Q: "], ["abcdef"], byte_tok, max_seq_length=7)[0]  # BOS + 3 prompt + 3 of 6
    assert encoded.status == "truncated"
    assert encoded.input_ids == [BOS] + byte_ids("Q: abc")
    assert encoded.labels == [IGNORE_INDEX] * 4 + byte_ids("abc")
    assert EOS not in encoded.input_ids


def test_response_that_fits_but_not_its_eos_is_truncated(byte_tok):
    encoded = encode_examples(["Q:"], ["abc"], byte_tok, max_seq_length=6)[0]
    assert (encoded.status, encoded.input_ids[-1]) == ("truncated", byte_ids("c")[0])
    exact_fit = encode_examples(["Q:"], ["abc"], byte_tok, max_seq_length=7)[0]
    assert (exact_fit.status, exact_fit.input_ids[-1]) == ("ok", EOS)


def test_prompt_alone_too_long_is_dropped(byte_tok):
    encoded = encode_examples(["Q: long"], ["a"], byte_tok, max_seq_length=8)[0]  # BOS + 7 prompt bytes
    assert encoded.status == "dropped"
    assert tokenize_example("Q: long", "a", byte_tok, max_seq_length=8) == {"input_ids": [], "attention_mask": [], "labels": []}


# --------------------------------------------------------------------------- pad token


def test_pad_token_reuses_unk_when_distinct_from_eos(sp_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(sp_tokenizer_dir)
    size = len(tok)
    ensure_pad_token(tok)
    assert tok.pad_token_id == tok.unk_token_id != tok.eos_token_id
    assert len(tok) == size


def test_pad_token_falls_back_to_eos(bytelevel_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(bytelevel_tokenizer_dir)  # unk is eos there
    size = len(tok)
    ensure_pad_token(tok)
    assert tok.pad_token_id == tok.eos_token_id
    assert len(tok) == size


def test_existing_pad_token_is_kept(bytelevel_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(bytelevel_tokenizer_dir)
    tok.add_special_tokens({"pad_token": "<pad>"})
    pad_id = tok.pad_token_id
    ensure_pad_token(tok)
    assert tok.pad_token_id == pad_id


def test_tokenizer_without_unk_or_eos_gets_a_new_pad(tmp_path):
    tok = AutoTokenizer.from_pretrained(_save_byte_tokenizer(tmp_path, with_specials=False))
    size = len(tok)
    ensure_pad_token(tok)
    assert tok.pad_token == "<pad>" and len(tok) == size + 1


# --------------------------------------------------------------------------- collator


FEATURES = [
    {"input_ids": [1, 5, 6, 2], "attention_mask": [1, 1, 1, 1], "labels": [-100, -100, 6, 2], "length": 4},
    {"input_ids": [1, 7, 2, 8, 9, 2], "attention_mask": [1] * 6, "labels": [-100, 7, 2, 8, 9, 2], "length": 6},
]


def test_collator_pads_right_to_a_multiple_with_literal_output():
    batch = PaddingCollator(pad_token_id=2, pad_to_multiple_of=4)(FEATURES)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert torch.equal(batch["input_ids"], torch.tensor([[1, 5, 6, 2, 2, 2, 2, 2], [1, 7, 2, 8, 9, 2, 2, 2]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0, 0]]))
    assert torch.equal(batch["labels"], torch.tensor([[-100, -100, 6, 2, -100, -100, -100, -100],
                                                      [-100, 7, 2, 8, 9, 2, -100, -100]]))
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long


def test_collator_pads_only_to_the_longest_in_the_batch():
    batch = PaddingCollator(pad_token_id=0, pad_to_multiple_of=None)(FEATURES)
    assert batch["input_ids"].shape == (2, 6)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6]
    assert PaddingCollator(pad_token_id=0)(FEATURES[:1])["input_ids"].shape == (1, 8)  # default multiple of 8


# --------------------------------------------------------------------------- data files


def _config(train, val, *extra: str):
    return parse_sft_config(["--train_file", str(train), "--val_file", str(val), *extra])


def test_check_data_files_accepts_good_files(sft_data):
    check_data_files(_config(*sft_data))


def test_missing_file_says_how_to_make_it(tmp_path, sft_data):
    train, _ = sft_data
    with pytest.raises(UserError, match="val file .*missing.jsonl not found.*scripts/prepare_sft_data.py"):
        check_data_files(_config(train, tmp_path / "missing.jsonl"))


def test_empty_file_is_an_error(tmp_path, sft_data):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(UserError, match="empty.jsonl holds no rows"):
        check_data_files(_config(empty, sft_data[1]))


@pytest.mark.parametrize("bad_line, message", [
    ({"instruction": "p"}, "row 3: needs an 'output'"),
    ({"instruction": 3, "output": "r"}, "row 3: needs 'instruction'"),
    ({"prompt": "p", "response": "r"}, "row 3: the row holds a rendered 'prompt' and no 'instruction'.*rerun the prepare script"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "row 3: each message needs a role"),
    ("not json", ":3: not valid JSON"),
])
def test_bad_row_names_file_and_line(tmp_path, sft_data, bad_line, message):
    rows = [json.dumps(r) for r in tiny_assets.rendered_rows()[:2]]
    rows.append(bad_line if isinstance(bad_line, str) else json.dumps(bad_line))
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(rows) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=f"bad.jsonl:? ?{message}"):
        check_data_files(_config(bad, sft_data[1]))


# --------------------------------------------------------------------------- datasets and cache


def _expected_counts(rows, tok, max_seq_length):
    """Truncation/drop counts computed straight from the tokenizer, independently of the module."""
    truncated = dropped = 0
    for row in rows:
        n_prompt = len(tok(row["prompt"])["input_ids"])
        n_total = len(tok(row["prompt"] + row["response"])["input_ids"]) + 1  # + EOS
        dropped += n_prompt >= max_seq_length
        truncated += n_prompt < max_seq_length < n_total
    return truncated, dropped


def test_load_counts_truncated_and_dropped_examples(sft_data, sp_tok):
    train, val = sft_data
    rows = tiny_assets.rendered_rows(repeat=2)
    prompt_lengths = sorted(len(sp_tok(r["prompt"])["input_ids"]) for r in rows)
    max_len = prompt_lengths[len(prompt_lengths) // 2] + 3  # drops some, truncates some, keeps some
    truncated, dropped = _expected_counts(rows, sp_tok, max_len)
    assert truncated > 0 and dropped > 0
    config = _config(train, val)
    config.max_seq_length = max_len  # below the config's minimum on purpose: the tiny prompts are short
    data = load_sft_datasets(config, sp_tok, use_cache=False, log=lambda line: None)
    stats = data.stats["train"]
    assert (stats["rows_read"], stats["truncated"], stats["dropped_prompt_too_long"]) == (len(rows), truncated, dropped)
    assert stats["emitted"] == len(data.train) == len(rows) - dropped
    assert data.train.column_names == ["input_ids", "attention_mask", "labels", "length"]
    for example in data.train:
        assert example["length"] == len(example["input_ids"]) <= max_len
        assert any(label != IGNORE_INDEX for label in example["labels"])


def test_loaded_examples_equal_tokenize_example(sft_data, sp_tok):
    data = load_sft_datasets(_config(*sft_data, "--max_train_samples", "5"), sp_tok, use_cache=False, log=lambda line: None)
    assert data.stats["train"]["rows_used"] == len(data.train) == 5
    for row, example in zip(tiny_assets.rendered_rows()[:5], data.train):
        expected = tokenize_example(row["prompt"], row["response"], sp_tok, max_seq_length=512)
        assert {k: example[k] for k in expected} == expected


def test_summary_line_reports_counts(sft_data, sp_tok):
    lines = []
    load_sft_datasets(_config(*sft_data), sp_tok, use_cache=False, log=lines.append)
    assert len(lines) == 1 and "train: 24 rows -> 24 examples" in lines[0] and "val: 6 rows" in lines[0]
    lines.clear()
    load_sft_datasets(_config(*sft_data, "--max_eval_samples", "4"), sp_tok, use_cache=False, log=lines.append)
    assert "val: 6 rows, first 4 used (--max_eval_samples 4) -> 4 examples" in lines[0]  # a cap is said


def _load(config, tok):
    return load_sft_datasets(config, tok, log=lambda line: None)


def test_cache_is_reused_and_never_stale(sft_data, sp_tok, bl_tok):
    train, val = sft_data
    first = _load(_config(train, val), sp_tok)
    assert not first.stats["train"]["from_cache"]
    again = _load(_config(train, val), sp_tok)
    assert again.stats["train"]["from_cache"] and again.stats["val"]["from_cache"]
    assert again.train["input_ids"] == first.train["input_ids"]

    for changed_config, tok in [
        (_config(train, val), bl_tok),  # another tokenizer
        (_config(train, val, "--max_seq_length", "80"), sp_tok),
        (_config(train, val, "--train_on_inputs"), sp_tok),
        (_config(train, val, "--max_train_samples", "3"), sp_tok),
    ]:
        assert not _load(changed_config, tok).stats["train"]["from_cache"]

    # Same path, new content (and a new mtime): must be re-read, never served from the old cache.
    old_mtime = os.stat(train).st_mtime_ns
    tiny_assets.write_jsonl(train, tiny_assets.rendered_rows(repeat=1)[:4])
    os.utime(train, ns=(old_mtime + 10**9, old_mtime + 10**9))  # as a later edit would, whatever the clock resolution
    reloaded = _load(_config(train, val), sp_tok)
    assert not reloaded.stats["train"]["from_cache"] and len(reloaded.train) == 4
    assert reloaded.stats["val"]["from_cache"]  # the unchanged split still is


def test_tokenizer_fingerprint_sees_special_token_changes(sp_tokenizer_dir):
    plain = AutoTokenizer.from_pretrained(sp_tokenizer_dir)
    extended = AutoTokenizer.from_pretrained(sp_tokenizer_dir)
    extended.add_special_tokens({"additional_special_tokens": ["<|new|>"]})
    assert tokenizer_fingerprint(plain) == tokenizer_fingerprint(AutoTokenizer.from_pretrained(sp_tokenizer_dir))
    assert tokenizer_fingerprint(plain) != tokenizer_fingerprint(extended)


def test_tokenizer_fingerprint_ignores_per_call_padding_state(sp_tokenizer_dir):
    """TinyLlama's tokenizer.json ships with padding/truncation to 512, which the first call resets."""
    fresh = AutoTokenizer.from_pretrained(sp_tokenizer_dir)
    fresh.backend_tokenizer.enable_truncation(512)
    fresh.backend_tokenizer.enable_padding(length=512, pad_id=0)
    used = AutoTokenizer.from_pretrained(sp_tokenizer_dir)
    tokenize_example(PROMPT, RESPONSE, used, max_seq_length=512)
    assert tokenizer_fingerprint(fresh) == tokenizer_fingerprint(used)


def test_several_workers_give_the_same_dataset(sft_data, sp_tok):
    one = load_sft_datasets(_config(*sft_data), sp_tok, use_cache=False, log=lambda line: None)
    two = load_sft_datasets(_config(*sft_data, "--preprocessing_num_workers", "2"), sp_tok, use_cache=False,
                            log=lambda line: None)
    assert one.train.to_dict() == two.train.to_dict()
    assert one.stats == two.stats


# --------------------------------------------------------------------------- bench/token_stats.py


def test_padded_tokens_on_literal_lengths():
    from bench.token_stats import padded_tokens

    lengths = [3, 9, 4, 10]
    assert padded_tokens(lengths, [0, 1, 2, 3], batch_size=2, multiple=1) == 2 * 9 + 2 * 10
    assert padded_tokens(lengths, [0, 2, 1, 3], batch_size=2, multiple=1) == 2 * 4 + 2 * 10
    assert padded_tokens(lengths, [0, 2, 1, 3], batch_size=2, multiple=8) == 2 * 8 + 2 * 16


def test_token_stats_runs_on_prepared_and_raw_files(tmp_path, sp_tokenizer_dir, sft_data, capsys):
    from bench.token_stats import main

    raw = tmp_path / "alpaca_data.json"
    raw.write_text(json.dumps([{"instruction": i, "input": x, "output": o} for i, x, o in tiny_assets.INSTRUCTIONS]))
    assert main(["--tokenizer", str(sp_tokenizer_dir), "--data", str(sft_data[0]), str(raw), "--no_results_file"]) == 0
    out = capsys.readouterr().out
    n = 24 + len(tiny_assets.INSTRUCTIONS)
    assert f"examples: {n}" in out
    assert f"round trip (decode(ids, skip_special_tokens) == prompt + response): {n} / {n} (100.00%)" in out
    assert f"naive enc(prompt) + enc(response) gives other tokens: {n} / {n}" in out  # every response gains a space
    assert "dynamic, length-grouped" in out and "WARNING" not in out
