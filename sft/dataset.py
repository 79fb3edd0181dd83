"""SFT examples: token-exact prompt/response tokenisation, cached datasets, a padding collator.

The training and evaluation entry points use this module; it has no command of its own. To look at
what it produces on real data, run the benchmark:

    python bench/token_stats.py --tokenizer /path/to/tokenizer --data data/processed/sft_train.jsonl

Three guarantees, each tested (tests/test_dataset.py):

- The first tokens of an example are exactly ``encode_prompt(prompt)``, what the model sees at
  generation time; the response is tokenised *in context* after them. Llama-style SentencePiece
  tokenizers insert a spurious ``▁`` when the response is tokenised on its own, and any BPE can
  merge tokens across the prompt/response boundary when the two are joined: both are handled, and
  every example is checked to decode back to exactly ``prompt + response``.
- Labels are -100 on the prompt (unless ``train_on_inputs``) and equal the input ids on the response
  and on a final EOS, which is appended whenever the whole response fits. A too-long response loses
  its tail (and gets no EOS: the text did not end there); an example whose prompt alone fills
  ``max_seq_length`` has nothing to learn from and is dropped. Both are counted and reported.
- Padding happens per batch in :class:`SFTDataCollator`, on the right, with the attention mask built
  from sequence lengths, never from ``input_ids == pad_token_id`` (the pad token is often EOS).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Sequence

from sft.cli import UserError

IGNORE_INDEX = -100  # the label value PyTorch's cross-entropy (and every HF model) skips
STATUS_OK, STATUS_TRUNCATED, STATUS_DROPPED = "ok", "truncated", "dropped"

# Fallback for a boundary merge: tokenise the response after a short prefix that ends a token, then
# strip the prefix's tokens. Several are tried because a prefix can itself merge with some
# responses (a byte-level BPE merges "\n" + "\n...", for instance).
_CONTINUATION_PREFIXES = ("\n", "x", "\n\n§", " ")
# Text used to find which special tokens a tokenizer wraps around text (BOS before, EOS after, ...).
_FRAMING_PROBE = "Hello world"
# Above this many rows, tokenise in several processes unless the config says how many.
_PARALLEL_THRESHOLD = 20_000
_MAX_AUTO_WORKERS = 4
_CACHE_DIRNAME = ".cache"
_STATS_FILENAME = "sft_token_stats.json"

PREPARE_HINT = "run `python scripts/prepare_sft_data.py` first"


# --------------------------------------------------------------------------- tokenizer setup


def ensure_pad_token(tokenizer) -> None:
    """Give a tokenizer without a pad token one, without adding a token where an existing one will do.

    Reusing ``unk`` (when distinct from EOS) or else EOS needs no new embedding row. It cannot
    break EOS learning here, because padding is masked by *position* (collator and labels), never
    by id. Only a tokenizer with neither gets a new ``<pad>`` token; the caller must then resize
    the model's embeddings (``len(tokenizer)`` exceeds the embedding count). Padding side is left
    alone: the collator pads on the right itself, and generation code sets left padding itself.
    """
    if tokenizer.pad_token is not None:
        return
    if tokenizer.unk_token is not None and tokenizer.unk_token_id != tokenizer.eos_token_id:
        tokenizer.pad_token = tokenizer.unk_token
    elif tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    else:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})


@dataclass(frozen=True)
class _Framing:
    """The special tokens a tokenizer puts around text: e.g. Llama ([BOS], []), GPT-2 ([], [])."""

    prefix: list[int]
    suffix: list[int]


def _framing(tokenizer) -> _Framing:
    with_special = tokenizer(_FRAMING_PROBE, add_special_tokens=True)["input_ids"]
    plain = tokenizer(_FRAMING_PROBE, add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start:start + len(plain)] == plain:
            return _Framing(with_special[:start], with_special[start + len(plain):])
    raise ValueError(f"cannot tell which special tokens {type(tokenizer).__name__} adds around text")


def _strip_framing(ids: list[int], framing: _Framing) -> list[int]:
    """Text tokens only: drop the tokenizer's added prefix (one or more times) and suffix."""
    n = len(framing.prefix)
    # A prompt that itself starts with "<s>" would otherwise give two BOS.
    while n and ids[:n] == framing.prefix:
        ids = ids[n:]
    if framing.suffix and ids[-len(framing.suffix):] == framing.suffix:
        ids = ids[:-len(framing.suffix)]
    return ids


def encode_prompt(prompt: str, tokenizer) -> list[int]:
    """The prompt's token ids as the model sees them at generation time.

    The tokenizer's own encoding, with exactly one BOS where the tokenizer adds one and without a
    trailing EOS (from tokenizers configured with ``add_eos_token``): generation continues the
    prompt, it does not start after an end of text.
    """
    framing = _framing(tokenizer)
    return framing.prefix + _strip_framing(tokenizer(prompt, add_special_tokens=True)["input_ids"], framing)


# --------------------------------------------------------------------------- one example


@dataclass
class EncodedExample:
    """One example with what happened to it, so the loader can count rather than guess."""

    input_ids: list[int]
    labels: list[int]
    status: str  # ok | truncated (response tail cut, no EOS) | dropped (prompt alone too long)
    boundary_merge: bool = False  # joining prompt + response merged tokens across the boundary
    round_trip_exact: bool = True  # decode(text tokens) == prompt + response

    def as_features(self) -> dict[str, list[int]]:
        return {"input_ids": self.input_ids, "attention_mask": [1] * len(self.input_ids), "labels": self.labels}


def _decodes_to(tokenizer, ids: list[int], text: str) -> bool:
    # No skip_special_tokens: text tokens only are passed, and a literal "</s>" in the data must
    # survive. No clean-up: it rewrites " ." to "." and would hide (or fake) differences.
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False) == text


def _response_after_prefix(tokenizer, response: str) -> list[int] | None:
    """Response ids as they come after a token boundary, or None if no prefix separates cleanly."""
    for prefix in _CONTINUATION_PREFIXES:
        prefix_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
        ids = tokenizer(prefix + response, add_special_tokens=False)["input_ids"]
        if ids[:len(prefix_ids)] == prefix_ids:
            return ids[len(prefix_ids):]
    return None


def _response_ids(tokenizer, prompt: str, response: str, prompt_text_ids: list[int],
                  joined_text_ids: list[int]) -> tuple[list[int], bool, bool]:
    """(response ids, boundary merged?, round trip exact?) for a response following the prompt.

    Preferred: the tail of the joined text's encoding, i.e. exactly how the tokenizer reads the
    response in context. When the joined encoding does not start with the prompt's own tokens
    (a merge across the boundary), the prompt tokens win (they are what generation sees) and the
    response is encoded after a separating prefix instead. Every candidate is verified by decoding.
    """
    text = prompt + response
    merged = joined_text_ids[:len(prompt_text_ids)] != prompt_text_ids

    def candidates():  # lazily: the first one almost always succeeds
        if not merged:
            yield joined_text_ids[len(prompt_text_ids):]
        after_prefix = _response_after_prefix(tokenizer, response)
        if after_prefix is not None:
            yield after_prefix
        yield tokenizer(response, add_special_tokens=False)["input_ids"]

    first = None
    for ids in candidates():
        if _decodes_to(tokenizer, prompt_text_ids + ids, text):
            return ids, merged, True
        first = ids if first is None else first
    return first, merged, False


def _assemble(prompt_ids: list[int], response_ids: list[int], eos_id: int, max_seq_length: int,
              train_on_inputs: bool) -> tuple[list[int], list[int], str]:
    room = max_seq_length - len(prompt_ids)
    if room <= 0:
        return [], [], STATUS_DROPPED
    if len(response_ids) + 1 <= room:
        target, status = response_ids + [eos_id], STATUS_OK
    else:
        target, status = response_ids[:room], STATUS_TRUNCATED
    input_ids = prompt_ids + target
    labels = list(input_ids) if train_on_inputs else [IGNORE_INDEX] * len(prompt_ids) + target
    return input_ids, labels, status


def encode_examples(prompts: Sequence[str], responses: Sequence[str], tokenizer, max_seq_length: int,
                    train_on_inputs: bool = False) -> list[EncodedExample]:
    """Tokenise a batch of (prompt, response) pairs; the batch encodes run in the fast tokenizer's threads."""
    if tokenizer.eos_token_id is None:
        raise UserError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no EOS token: the model could never learn to stop")
    framing = _framing(tokenizer)
    prompt_batch = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    joined_batch = tokenizer([p + r for p, r in zip(prompts, responses)], add_special_tokens=True)["input_ids"]
    examples = []
    for prompt, response, prompt_full, joined_full in zip(prompts, responses, prompt_batch, joined_batch):
        prompt_text_ids = _strip_framing(prompt_full, framing)
        response_ids, merged, exact = _response_ids(
            tokenizer, prompt, response, prompt_text_ids, _strip_framing(joined_full, framing))
        input_ids, labels, status = _assemble(
            framing.prefix + prompt_text_ids, response_ids, tokenizer.eos_token_id, max_seq_length, train_on_inputs)
        examples.append(EncodedExample(input_ids, labels, status, merged, exact))
    return examples


def tokenize_example(prompt: str, response: str, tokenizer, max_seq_length: int,
                     train_on_inputs: bool = False) -> dict[str, list[int]]:
    """``input_ids``, ``attention_mask`` and ``labels`` (lists of ints) for one SFT example.

    Empty lists when the prompt alone fills ``max_seq_length`` (no supervised token would be left);
    use :func:`encode_examples` to also learn whether the example was truncated or dropped.
    """
    return encode_examples([prompt], [response], tokenizer, max_seq_length, train_on_inputs)[0].as_features()


# --------------------------------------------------------------------------- data files


def read_jsonl_objects(path: Path, string_fields: Sequence[str] = ()) -> list[dict]:
    """The JSON objects of a JSONL file (blank lines skipped), each with ``string_fields`` as strings.

    Any problem is a one-line UserError naming the file and line. Shared by SFT rows, DPO pairs and
    the eval script's prompt files.
    """
    path = Path(path)
    rows = []
    with path.open(encoding="utf-8-sig") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{line_number}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{line_number}: expected a JSON object, got {type(row).__name__}")
            for key in string_fields:
                if not isinstance(row.get(key), str):
                    problem = "is missing" if key not in row else f"is {type(row[key]).__name__}, not a string"
                    raise UserError(f"{path}:{line_number}: field {key!r} {problem}")
            rows.append(row)
    return rows


def read_sft_rows(path: Path) -> list[dict[str, str]]:
    """The (prompt, response) pairs of a JSONL file, or a UserError naming the file and line."""
    rows = [{"prompt": row["prompt"], "response": row["response"]}
            for row in read_jsonl_objects(path, ("prompt", "response"))]
    if not rows:
        raise UserError(f"{path} holds no rows; {PREPARE_HINT}")
    return rows


def _data_files(config) -> dict[str, Path]:
    return {"train": Path(config.train_file), "val": Path(config.val_file)}


def check_data_files(config) -> None:
    """Fail fast, before any model is loaded: both files exist, hold rows, and every row is usable."""
    for split, path in _data_files(config).items():
        if not path.is_file():
            raise UserError(f"{split} file {path} not found; {PREPARE_HINT} (or set --{split}_file)")
        read_sft_rows(path)


# --------------------------------------------------------------------------- datasets + cache


class SFTDatasets(NamedTuple):
    train: Any  # datasets.Dataset: input_ids, attention_mask, labels, length
    val: Any
    stats: dict  # per split: rows read/used, emitted, truncated, dropped, boundary merges, ...


def _features():
    from datasets import Features, Sequence as Seq, Value

    # int32 / int8 rather than the default int64: a quarter to half the cache on disk.
    return Features({
        "input_ids": Seq(Value("int32")), "attention_mask": Seq(Value("int8")),
        "labels": Seq(Value("int32")), "length": Value("int32"),
        "status": Value("string"), "boundary_merge": Value("bool"), "round_trip_exact": Value("bool"),
    })


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash that changes whenever the tokenizer would tokenise differently."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = json.loads(backend.to_str())
        # Per-call state, not identity: transformers resets both on every call, and some shipped
        # tokenizer.json files (TinyLlama's) bake in padding/truncation to 512 until the first call.
        definition.pop("truncation", None)
        definition.pop("padding", None)
        vocab = json.dumps(definition, sort_keys=True)
    else:
        vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    probe = tokenizer("Below is a probe.\n### Response:\n  x</s>", add_special_tokens=True)["input_ids"]
    identity = [type(tokenizer).__name__, vocab, probe, tokenizer.bos_token_id, tokenizer.eos_token_id]
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _code_version() -> str:
    # The source of this very module: any change to the tokenisation logic invalidates every cache.
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def _cache_key(path: Path, tokenizer_id: str, config, max_samples: int | None) -> str:
    status = path.stat()
    parts = {
        "file": str(path.resolve()), "size": status.st_size, "mtime_ns": status.st_mtime_ns,
        "tokenizer": tokenizer_id, "max_seq_length": config.max_seq_length,
        "train_on_inputs": config.train_on_inputs, "max_samples": max_samples, "code": _code_version(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def _num_workers(config, n_rows: int) -> int | None:
    if config.preprocessing_num_workers:
        return config.preprocessing_num_workers if n_rows > 1 else None
    if n_rows > _PARALLEL_THRESHOLD:
        return min(os.cpu_count() or 1, _MAX_AUTO_WORKERS)
    return None


def _tokenize_split(rows: list[dict], tokenizer, config, split: str, cache_key: str):
    """Tokenise rows into a Dataset (dropped rows removed) and count what happened."""
    from datasets import Dataset

    def encode_batch(batch: dict[str, list]) -> dict[str, list]:
        encoded = encode_examples(batch["prompt"], batch["response"], tokenizer, config.max_seq_length,
                                  config.train_on_inputs)
        return {
            "input_ids": [e.input_ids for e in encoded], "attention_mask": [[1] * len(e.input_ids) for e in encoded],
            "labels": [e.labels for e in encoded], "length": [len(e.input_ids) for e in encoded],
            "status": [e.status for e in encoded], "boundary_merge": [e.boundary_merge for e in encoded],
            "round_trip_exact": [e.round_trip_exact for e in encoded],
        }

    raw = Dataset.from_list(rows)
    # An explicit fingerprint spares datasets from hashing the tokenizer inside the closure; this
    # module keeps its own cache (see _cache_key), the in-memory map writes none.
    tokenized = raw.map(encode_batch, batched=True, batch_size=256, remove_columns=raw.column_names,
                        features=_features(), num_proc=_num_workers(config, len(rows)),
                        new_fingerprint=f"sft-{split}-{cache_key}", desc=f"tokenizing {split}")
    # One Arrow read into plain lists: iterating dataset columns goes row by row and is slow.
    columns = tokenized.select_columns(["status", "boundary_merge", "round_trip_exact", "length"]).to_dict()
    statuses = columns["status"]
    counts = {
        "emitted": len(statuses) - statuses.count(STATUS_DROPPED),
        "truncated": statuses.count(STATUS_TRUNCATED),
        "dropped_prompt_too_long": statuses.count(STATUS_DROPPED),
        "boundary_merges": sum(columns["boundary_merge"]),
        "round_trip_inexact": len(statuses) - sum(columns["round_trip_exact"]),
        "tokens": sum(columns["length"]),
    }
    kept_rows = [i for i, status in enumerate(statuses) if status != STATUS_DROPPED]
    kept = tokenized.select(kept_rows) if len(kept_rows) < len(statuses) else tokenized
    return kept.remove_columns(["status", "boundary_merge", "round_trip_exact"]), counts


@contextmanager
def _quiet_progress():
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _save_cache(dataset, stats: dict, cache_path: Path) -> None:
    """Write via a temporary folder and rename, so a crash or a parallel run never leaves half a cache."""
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache_path.name}.", dir=cache_path.parent))
    try:
        with _quiet_progress():  # a save of a few MB needs no progress bar
            dataset.save_to_disk(str(tmp))
        (tmp / _STATS_FILENAME).write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
        tmp.chmod(0o755)  # mkdtemp makes it private; a cache is as readable as the data beside it
        tmp.rename(cache_path)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another run got there first, or the disk is read-only


def _load_cache(cache_path: Path):
    from datasets import load_from_disk

    stats_file = cache_path / _STATS_FILENAME
    if not stats_file.is_file():
        return None
    try:
        return load_from_disk(str(cache_path)), json.loads(stats_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # unreadable cache: tokenise again rather than fail


def _load_split(split: str, path: Path, max_samples: int | None, tokenizer, tokenizer_id: str, config,
                use_cache: bool):
    cache_path = path.parent / _CACHE_DIRNAME / f"sft-{split}-{_cache_key(path, tokenizer_id, config, max_samples)}"
    cached = _load_cache(cache_path) if use_cache else None
    if cached is not None:
        dataset, stats = cached
        return dataset, {**stats, "from_cache": True, "cache_path": str(cache_path)}
    rows = read_sft_rows(path)
    used = rows[:max_samples] if max_samples else rows
    key = cache_path.name.rsplit("-", 1)[-1]
    dataset, counts = _tokenize_split(used, tokenizer, config, split, key)
    stats = {"file": str(path), "rows_read": len(rows), "rows_used": len(used), **counts}
    if use_cache:
        _save_cache(dataset, stats, cache_path)
    return dataset, {**stats, "from_cache": False, "cache_path": str(cache_path) if use_cache else None}


def _summary_line(stats: dict) -> str:
    parts = []
    for split in ("train", "val"):
        s = stats[split]
        source = "cached" if s["from_cache"] else "tokenized"
        parts.append(f"{split}: {s['rows_used']} rows -> {s['emitted']} examples ({source}; "
                     f"{s['truncated']} truncated, {s['dropped_prompt_too_long']} dropped: prompt too long"
                     + (f", {s['round_trip_inexact']} NOT round-tripping" if s["round_trip_inexact"] else "") + ")")
    return "data: " + " | ".join(parts)


def load_sft_datasets(config, tokenizer, use_cache: bool = True, log=print) -> SFTDatasets:
    """Tokenised train/val datasets for ``config`` (an SFTConfig), cached next to the data files.

    The cache (``<data dir>/.cache/``, safe to delete) is keyed by the data file's path, size and
    mtime, the tokenizer's fingerprint, max_seq_length, train_on_inputs, the sample limit and this
    module's source, so a changed tokenizer, setting or code never reuses a stale cache.
    """
    files = _data_files(config)
    for split, path in files.items():
        if not path.is_file():
            raise UserError(f"{split} file {path} not found; {PREPARE_HINT} (or set --{split}_file)")
    tokenizer_id = tokenizer_fingerprint(tokenizer)
    limits = {"train": config.max_train_samples, "val": config.max_eval_samples}
    datasets, stats = {}, {}
    for split, path in files.items():
        datasets[split], stats[split] = _load_split(split, path, limits[split], tokenizer, tokenizer_id, config, use_cache)
    stats["max_seq_length"] = config.max_seq_length
    stats["train_on_inputs"] = config.train_on_inputs
    log(_summary_line(stats))
    return SFTDatasets(datasets["train"], datasets["val"], stats)


# --------------------------------------------------------------------------- collator


@dataclass
class SFTDataCollator:
    """Pads a list of features per batch, on the right, to the longest (rounded up to a multiple).

    Labels are padded with -100 and the attention mask comes from each sequence's length, so a pad
    id equal to EOS never hides a real EOS. Extra keys (``length``) are ignored.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = 8

    def _padded_length(self, longest: int) -> int:
        multiple = self.pad_to_multiple_of or 1
        return -(-longest // multiple) * multiple

    def __call__(self, features: list[dict]) -> dict:
        import torch

        lengths = [len(f["input_ids"]) for f in features]
        width = self._padded_length(max(lengths))
        input_ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, (feature, length) in enumerate(zip(features, lengths)):
            input_ids[row, :length] = torch.as_tensor(feature["input_ids"], dtype=torch.long)
            labels[row, :length] = torch.as_tensor(feature["labels"], dtype=torch.long)
            attention_mask[row, :length] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
