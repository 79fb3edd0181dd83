"""Token statistics of SFT data on a real tokenizer: exact round trips, the prompt/response boundary,
lengths, and how much of a training batch is real tokens rather than padding.

    python bench/token_stats.py --tokenizer path/to/tinyllama-tokenizer \\
        --data data/processed/sft_train.jsonl data/processed/sft_val.jsonl
    python bench/token_stats.py --tokenizer path/to/tinyllama-tokenizer \\
        --data path/to/alpaca_data.json --batch_size 8

``--data`` takes prepared ``.jsonl`` files (``prompt``/``response`` rows from
scripts/prepare_sft_data.py) or raw Alpaca ``.json`` lists (``instruction``/``input``/``output``,
rendered through the prompt template). Every example goes through ``core.tokenization.encode_examples``,
the code training uses, untruncated, and is checked independently:

- round trip: ``decode(input_ids, skip_special_tokens=True) == prompt + response`` (must be all);
- prompt prefix: the first tokens equal ``tokenizer(prompt)``, what generation sees (must be all);
- boundary problem: the naive ``tokenizer(prompt) + tokenizer(response)`` gives other tokens.

Padding efficiency (real tokens / tokens in padded batches) compares padding every example to
``--max_seq_length``, dynamic padding in random order, and dynamic padding over the batches of
transformers' ``LengthGroupedSampler`` (what the Trainer's ``group_by_length`` uses), each with and
without rounding the padded length up to ``--pad_to_multiple_of`` (the collator's default 8).
Results also go to ``bench/results/token_stats.json``.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # run as a file: make `bench` and `sft` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import command_line, format_table, machine_info, write_results  # noqa: E402
from core.cli import UserError, run_cli  # noqa: E402

CHUNK = 500  # examples per worker task: large enough to amortise pickling, small enough for a live bar
PARALLEL_THRESHOLD = 5_000
UNTRUNCATED = 10**9


# --------------------------------------------------------------------------- data


def read_examples(path: Path, template_name: str) -> list[tuple[str, str]]:
    """(prompt, response) pairs of a prepared .jsonl or a raw Alpaca .json file."""
    from sft.dataset import read_sft_rows
    from core.prompting import load_template

    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    if path.suffix == ".jsonl":  # template-free prepared rows, rendered here with the same template
        template = load_template(template_name)
        return [(template.render(row["instruction"], row["input"]), row["output"]) for row in read_sft_rows(path)
                if "messages" not in row]
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"cannot parse {path}: {exc}") from None
    if not isinstance(records, list):
        raise UserError(f"{path}: expected a JSON list of {{instruction, input, output}} records")
    template = load_template(template_name)
    pairs = [(template.render(r["instruction"], r.get("input") or ""), r["output"])
             for r in records if isinstance(r, dict) and isinstance(r.get("instruction"), str) and isinstance(r.get("output"), str)]
    if len(pairs) < len(records):
        print(f"{path}: skipped {len(records) - len(pairs)} records without string instruction/output")
    return pairs


# --------------------------------------------------------------------------- per-example checks


@dataclass
class Measured:
    length: int  # tokens incl. BOS and EOS, untruncated
    round_trip_exact: bool
    prompt_prefix_exact: bool
    naive_tokens_differ: bool
    naive_text_differs: bool
    boundary_merge: bool


_worker_tokenizer = None


def _init_worker(tokenizer_dir: str) -> None:
    global _worker_tokenizer
    from transformers import AutoTokenizer

    _worker_tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)


def _measure_chunk(pairs: list[tuple[str, str]]) -> list[Measured]:
    from core.tokenization import encode_examples

    tok = _worker_tokenizer
    prompts, responses = [p for p, _ in pairs], [r for _, r in pairs]
    encoded = encode_examples(prompts, responses, tok, max_seq_length=UNTRUNCATED)
    prompt_ids = tok(prompts)["input_ids"]
    response_ids = tok(responses, add_special_tokens=False)["input_ids"]
    results = []
    for prompt, response, example, p_ids, r_ids in zip(prompts, responses, encoded, prompt_ids, response_ids):
        naive = p_ids + r_ids
        results.append(Measured(
            length=len(example.input_ids),
            round_trip_exact=tok.decode(example.input_ids, skip_special_tokens=True) == prompt + response,
            prompt_prefix_exact=example.input_ids[:len(p_ids)] == p_ids,
            naive_tokens_differ=naive != example.input_ids[:-1],  # ours minus its final EOS
            naive_text_differs=tok.decode(naive, skip_special_tokens=True) != prompt + response,
            boundary_merge=example.boundary_merge,
        ))
    return results


def measure(pairs: list[tuple[str, str]], tokenizer_dir: str, num_proc: int) -> list[Measured]:
    from tqdm import tqdm

    chunks = [pairs[i:i + CHUNK] for i in range(0, len(pairs), CHUNK)]
    bar = tqdm(total=len(pairs), desc=f"tokenizing ({num_proc} process{'es' if num_proc > 1 else ''})", unit="ex")
    results: list[Measured] = []
    if num_proc == 1:
        _init_worker(tokenizer_dir)
        for chunk in chunks:
            results += _measure_chunk(chunk)
            bar.update(len(chunk))
    else:
        # Tokenizers are loaded in the workers, so the parent never starts the Rust thread pool
        # before forking (which would disable it in the children).
        with multiprocessing.get_context("fork").Pool(num_proc, _init_worker, (tokenizer_dir,)) as pool:
            for chunk_results in pool.imap(_measure_chunk, chunks):  # imap keeps the order
                results += chunk_results
                bar.update(len(chunk_results))
    bar.close()
    return results


# --------------------------------------------------------------------------- padding


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def padded_tokens(lengths: Sequence[int], order: Sequence[int], batch_size: int, multiple: int) -> int:
    """Tokens a batch-by-batch dynamic padder processes when batches follow ``order``."""
    total = 0
    for start in range(0, len(order), batch_size):
        batch = [lengths[i] for i in order[start:start + batch_size]]
        total += len(batch) * _round_up(max(batch), multiple)
    return total


def padding_efficiency(lengths: list[int], batch_size: int, max_seq_length: int, multiple: int, seed: int) -> dict:
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    real = sum(lengths)
    random_order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
    grouped_order = list(LengthGroupedSampler(batch_size, lengths=lengths, generator=torch.Generator().manual_seed(seed)))
    return {
        f"pad to {max_seq_length}": real / (len(lengths) * _round_up(max_seq_length, multiple)),
        "dynamic, random order": real / padded_tokens(lengths, random_order, batch_size, multiple),
        "dynamic, length-grouped": real / padded_tokens(lengths, grouped_order, batch_size, multiple),
    }


# --------------------------------------------------------------------------- report


def _percentile(sorted_values: list[int], q: float) -> float:
    import numpy as np

    return float(np.percentile(sorted_values, q))


def length_stats(lengths: list[int], max_seq_length: int) -> dict:
    import statistics

    ordered = sorted(lengths)
    return {
        "mean": statistics.fmean(ordered), "median": statistics.median(ordered),
        "p90": _percentile(ordered, 90), "p99": _percentile(ordered, 99), "max": ordered[-1],
        f"over_{max_seq_length}": sum(n > max_seq_length for n in ordered),
    }


def _share(count: int, total: int) -> str:
    return f"{count:,} / {total:,} ({100 * count / total:.2f}%)"


def report(measured: list[Measured], args) -> dict:
    n = len(measured)
    counts = {
        "examples": n,
        "round_trip_exact": sum(m.round_trip_exact for m in measured),
        "prompt_prefix_exact": sum(m.prompt_prefix_exact for m in measured),
        "naive_tokens_differ": sum(m.naive_tokens_differ for m in measured),
        "naive_text_differs": sum(m.naive_text_differs for m in measured),
        "boundary_merges": sum(m.boundary_merge for m in measured),
    }
    lengths = [m.length for m in measured]
    stats = length_stats(lengths, args.max_seq_length)
    truncated = [min(length, args.max_seq_length) for length in lengths]  # what training batches hold
    efficiency = {multiple: padding_efficiency(truncated, args.batch_size, args.max_seq_length, multiple, args.seed)
                  for multiple in sorted({1, args.pad_to_multiple_of})}

    print(f"\nexamples: {n:,}")
    print(f"exact decode round trip (decode(ids, skip_special_tokens) == prompt + response): {_share(counts['round_trip_exact'], n)}")
    print(f"prompt tokens identical to tokenizer(prompt): {_share(counts['prompt_prefix_exact'], n)}")
    print(f"naive enc(prompt) + enc(response) gives other tokens: {_share(counts['naive_tokens_differ'], n)}; "
          f"of these, decoding to other text: {counts['naive_text_differs']:,}")
    print(f"tokens merged across the prompt/response boundary (handled by the fallback): {counts['boundary_merges']:,}")
    print("\ntoken lengths (BOS + prompt + response + EOS, untruncated):")
    print(format_table(["mean", "median", "p90", "p99", "max", f"> {args.max_seq_length}"],
                       [[stats["mean"], stats["median"], stats["p90"], stats["p99"], stats["max"], stats[f"over_{args.max_seq_length}"]]]))
    print(f"\npadding efficiency at batch size {args.batch_size} (real tokens / padded tokens; lengths capped at {args.max_seq_length}):")
    rows = [[name] + [efficiency[m][name] for m in efficiency] for name in efficiency[1]]
    print(format_table(["batches"] + [("exact length" if m == 1 else f"rounded up to x{m}") for m in efficiency], rows))
    if counts["round_trip_exact"] < n or counts["prompt_prefix_exact"] < n:
        print("\nWARNING: some examples do not round-trip exactly or change the prompt's tokens")
    return {"counts": counts, "lengths": stats,
            "padding_efficiency": {f"multiple_{m}": values for m, values in efficiency.items()}}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/token_stats.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="tokenizer directory (e.g. path/to/tinyllama-tokenizer)")
    parser.add_argument("--data", required=True, nargs="+", type=Path, help="prepared .jsonl or raw Alpaca .json files")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_seq_length", type=int, default=512)
    parser.add_argument("--pad_to_multiple_of", type=int, default=8)
    parser.add_argument("--template", default="alpaca", help="prompt template for raw .json files")
    parser.add_argument("--num_proc", type=int, default=None, help=f"worker processes (default: up to 4 above {PARALLEL_THRESHOLD:,} examples)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the random and length-grouped batch orders")
    parser.add_argument("--no_results_file", action="store_true", help="do not write bench/results/token_stats.json")
    args = parser.parse_args(argv)
    if args.batch_size <= 0 or args.max_seq_length <= 0 or args.pad_to_multiple_of <= 0:
        raise UserError("--batch_size, --max_seq_length and --pad_to_multiple_of must be > 0")
    if not Path(args.tokenizer).is_dir():
        raise UserError(f"tokenizer directory not found: {args.tokenizer}")
    return args


def full_data_padding(args: argparse.Namespace, data_path: Path, tokenizer_dir: Path) -> dict[str, Any] | None:
    """Padding efficiency at ``--batch_size`` over the whole training file, as a real run sees it.

    A benchmark run's 64 examples are too few for length grouping to find close neighbours
    (transformers' grouping sorts within megabatches of at most a quarter of the data), so this
    also measures what a user's epoch gets: our tokenization (load_sft_datasets, cached), our
    sampler (SeededLengthGroupedSampler) and our preset's padding rule, against random order and
    padding to max_seq_length. Only for prepared ``.jsonl`` data (the file users train on).
    """
    if data_path.suffix != ".jsonl":
        return None
    from core.tokenization import ensure_pad_token
    from sft.dataset import load_sft_datasets
    from core.modeling import load_tokenizer
    from sft.sft_config import parse_sft_config
    from core.training import SeededLengthGroupedSampler

    preset = "cuda" if args.device == "cuda" else "mac"
    val_file = data_path.with_name("sft_val.jsonl")
    config = parse_sft_config([f"--train_file={data_path}", f"--val_file={val_file if val_file.is_file() else data_path}",
                               f"--max_seq_length={args.max_seq_length}", f"--seed={args.seed}"], preset=preset)
    tokenizer = load_tokenizer(str(tokenizer_dir))
    ensure_pad_token(tokenizer)
    lengths = list(load_sft_datasets(config, tokenizer, log=lambda _: None).train["length"])
    real, multiple, batch = sum(lengths), config.pad_to_multiple_of, args.batch_size
    ours_order = list(SeededLengthGroupedSampler(lengths, batch, config.seed))
    random_order = list(SeededLengthGroupedSampler(lengths, batch, config.seed, group_by_length=False))
    return {
        "examples": len(lengths), "batch_size": batch, "pad_to_multiple_of": multiple,
        "ours (length-grouped, dynamic)": real / padded_tokens(lengths, ours_order, batch, multiple),
        "random order, dynamic (TRL default)": real / padded_tokens(lengths, random_order, batch, multiple),
        f"every row padded to {args.max_seq_length} (original)": real / (len(lengths) * args.max_seq_length),
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    pairs = [pair for path in args.data for pair in read_examples(path, args.template)]
    if not pairs:
        raise UserError("no examples in the data files")
    num_proc = args.num_proc or (min(os.cpu_count() or 1, 4) if len(pairs) > PARALLEL_THRESHOLD else 1)
    print(f"tokenizer {args.tokenizer}; data {', '.join(map(str, args.data))}")
    results = report(measure(pairs, args.tokenizer, num_proc), args)
    if not args.no_results_file:
        path = write_results("token_stats", {
            "command": command_line("bench.token_stats", argv), "machine": machine_info(),
            "tokenizer": args.tokenizer, "data": [str(p) for p in args.data], "batch_size": args.batch_size,
            "max_seq_length": args.max_seq_length, "seed": args.seed, **results,
        })
        print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    run_cli(main)
