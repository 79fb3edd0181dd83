"""SFT data: read the prepared rows, tokenise them once (cached) with the run's template.

The training and evaluation entry points use this module; it has no command of its own. The
exact prompt/response encoder and the padding collator live in ``core/tokenization.py``.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

from core.cli import UserError
from core.prompting import prompt_format, record_problem
from core.tokenization import STATUS_DROPPED, STATUS_TRUNCATED, encode_records, read_jsonl_objects

# Above this many rows, tokenise in several processes unless the config says how many.
_PARALLEL_THRESHOLD = 20_000
_MAX_AUTO_WORKERS = 4
_CACHE_DIRNAME = ".cache"
_STATS_FILENAME = "sft_token_stats.json"

PREPARE_HINT = "run `python scripts/prepare_sft_data.py` first"

# --------------------------------------------------------------------------- data files


def read_sft_rows(path: Path, response_key: str = "output") -> list[dict]:
    """The template-free records of a JSONL file (instruction/input/output or messages), or a one-line UserError.

    Rows of files prepared before templates moved to training (``prompt`` + ``response`` next to
    ``instruction`` and ``input``) still work: the rendered ``prompt`` is ignored. ``response_key``
    ``chosen`` reads a preference file (scripts/prepare_dpo_data.py) as SFT data: its prompt and chosen
    answer (the rejected one is not read), which is rejection-sampling fine-tuning on judged pairs.
    """
    rows = []
    for line, row in enumerate(read_jsonl_objects(path), start=1):
        problem = record_problem(row)
        if problem is None and response_key == "chosen":
            output = row.get("chosen")
            problem = None if isinstance(output, str) else "needs a 'chosen' answer (--response_key chosen reads pairs)"
        elif problem is None and "messages" not in row:
            output = row.get("output", row.get("response"))
            problem = None if isinstance(output, str) else "needs an 'output' (the response to learn)"
        if problem is None and "messages" not in row:
            row = {"instruction": row["instruction"], "input": row.get("input") or "", "output": output}
        elif problem is None:
            row = {"messages": row["messages"]}
        if problem is not None:
            raise UserError(f"{path}: row {line}: {problem}")
        rows.append(row)
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
        read_sft_rows(path, config.response_key)


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
    identity = [type(tokenizer).__name__, vocab, probe, tokenizer.bos_token_id, tokenizer.eos_token_id,
                getattr(tokenizer, "chat_template", None)]
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _code_version() -> str:
    # The source of this very module: any change to the tokenisation logic invalidates every cache.
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def _tokenization_code_version() -> str:
    # The encoder and the templates live in core/: a change there must invalidate the cache too.
    core = Path(__file__).resolve().parents[1] / "core"
    return hashlib.sha256(b"".join((core / name).read_bytes() for name in ("tokenization.py", "prompting.py"))).hexdigest()


def _cache_key(path: Path, tokenizer_id: str, config, max_samples: int | None) -> str:
    status = path.stat()
    parts = {
        "file": str(path.resolve()), "size": status.st_size, "mtime_ns": status.st_mtime_ns,
        "tokenizer": tokenizer_id, "max_seq_length": config.max_seq_length,
        "train_on_inputs": config.train_on_inputs, "max_samples": max_samples, "code": _code_version(),
        "response_key": config.response_key,
        "template": config.prompt_template().to_dict(), "tokenization_code": _tokenization_code_version(),
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

    fmt = prompt_format(config.prompt_template(), tokenizer)

    def encode_batch(batch: dict[str, list]) -> dict[str, list]:
        records = [json.loads(text) for text in batch["record"]]
        encoded = encode_records(records, fmt, config.max_seq_length, config.train_on_inputs)
        return {
            "input_ids": [e.input_ids for e in encoded], "attention_mask": [[1] * len(e.input_ids) for e in encoded],
            "labels": [e.labels for e in encoded], "length": [len(e.input_ids) for e in encoded],
            "status": [e.status for e in encoded], "boundary_merge": [e.boundary_merge for e in encoded],
            "round_trip_exact": [e.round_trip_exact for e in encoded],
        }

    # One JSON string per record: instruction rows and conversations cannot share an Arrow schema.
    raw = Dataset.from_dict({"record": [json.dumps(row, ensure_ascii=False) for row in rows]})
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
    rows = read_sft_rows(path, config.response_key)
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
        rows = f"{s['rows_used']} rows"
        if s.get("rows_read", 0) > s["rows_used"]:  # a --max_*_samples cap: said, with the flag
            flag = "--max_train_samples" if split == "train" else "--max_eval_samples"
            rows = f"{s['rows_read']} rows, first {s['rows_used']} used ({flag} {s['rows_used']})"
        parts.append(f"{split}: {rows} -> {s['emitted']} examples ({source}; "
                     f"{s['truncated']} truncated, {s['dropped_prompt_too_long']} dropped: prompt too long"
                     + (f", {s['round_trip_inexact']} whose tokens do not decode back to the exact text, e.g. characters "
                        "the tokenizer cannot represent: trained as tokenized" if s["round_trip_inexact"] else "") + ")")
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


