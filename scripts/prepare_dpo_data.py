"""Build the DPO preference pairs: ``prefs_train.jsonl`` and ``prefs_val.jsonl``.

Run from the repository root, with one of two sources:

    # The original study's construction: chosen = the gold response of an SFT training example,
    # rejected = a response sampled from the SFT model for the same prompt.
    python scripts/prepare_dpo_data.py --from_sft_model models/sft_output --num_pairs 5000 \\
        --temperature 1.0 --top_p 0.9 --max_new_tokens 128 --seed 42

    # Checker-judged on-policy pairs (scripts/judged_pairs.py): K samples per constrained prompt,
    # chosen = the one following most constraints, rejected = the one following fewest.
    python scripts/prepare_dpo_data.py --from_sft_model models/sft_output --judge checker \\
        --prompts data/if/if_train.jsonl --samples_per_prompt 4 --num_pairs 2000 --max_new_tokens 192

    # Existing pairs: {prompt|instruction[,input], chosen, rejected} rows, or Anthropic HH-RLHF.
    python scripts/prepare_dpo_data.py --from_file my_pairs.jsonl --format pairs
    python scripts/prepare_dpo_data.py --from_file hh_rlhf_harmless_base_test.jsonl.gz --format hh-rlhf

Every row is template-free, ``{"id", "source", "instruction", "input", "chosen", "rejected"}``:
DPO (and the reward model, and eval) render it with the SFT run's template at tokenization, so
they see prompts exactly as SFT trained on them.

How each source becomes (instruction, input, chosen, rejected):

- ``--from_sft_model``: ``--num_pairs`` distinct prompts drawn (with ``--seed``) from the SFT run's
  training file, among those short enough that prompt + ``--max_new_tokens`` fit the SFT run's
  ``max_seq_length`` (how many are too long is printed); one sample each, generated in batches with
  the given temperature/top-p and seed. A pair whose sample is empty or equals the gold response
  (ignoring whitespace) is dropped. Samples cut at ``--max_new_tokens`` are kept, and counted.
- ``--format pairs`` (``.jsonl``, ``.jsonl.gz`` or a ``.json`` list): a row with ``instruction``
  (and optional ``input``) is taken as it is. A row with only a rendered ``prompt``: a prompt in
  Alpaca layout (``### Instruction:`` / ``### Input:`` / ``### Response:``, with or without the
  preamble) is parsed back into instruction and input, so pairs made with a variant of the template
  still match SFT; any other prompt text becomes the instruction. The counts of each case are printed.
- ``--format hh-rlhf``: ``chosen``/``rejected`` are whole dialogues
  (``\\n\\nHuman: ...\\n\\nAssistant: ...``). The prompt is their shared prefix up to the last
  ``\\n\\nAssistant:``; chosen/rejected are only the final assistant replies. The dialogue prefix
  becomes: instruction = the last Human turn (the request the reply answers);
  input = the earlier turns, one ``Human: ...`` / ``Assistant: ...`` line each (the conversation so
  far, i.e. context). A single-turn dialogue uses the no-input variant.

Nothing is dropped silently: each dropped row is counted by reason in the summary table and written
with its reason to ``prefs_rejected.jsonl``; a line that is not valid JSON is such a row too.
Exact duplicate pairs are kept once. Pairs are split by prompt (all pairs of one prompt go to the
same split), so no validation prompt is in training. Outputs are written atomically, after every
input has been read; the same inputs and seed give byte-identical files (for ``--from_sft_model``
on the same hardware and library versions). Also written: ``prefs_stats.json`` (the table's figures).
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from typing import Any, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a file: make `sft`, `dpo` and `scripts` importable
    sys.path.insert(0, str(REPO_ROOT))

from scripts.data_io import (  # noqa: E402
    normalise_whitespace,
    print_summary_table,
    sha256_of_file,
    write_json_atomic,
    write_jsonl_atomic,
)
from scripts.prepare_sft_data import split_by_prompt  # noqa: E402
from core.cli import UserError, make_parser, parse_raising, run_cli  # noqa: E402
from core.engines import ENGINE_HELP, ENGINES  # noqa: E402
from core.prompting import PromptTemplate, load_template  # noqa: E402
from scripts.prefs_checks import check_out_dir, format_hint  # noqa: E402
from scripts.sft_sampling import pick_fitting, sample_from_run  # noqa: E402,F401 - pick_fitting: used by tests through this module
from scripts.pair_sources import (  # noqa: E402
    Collected, add_pair, collect_from_file, read_records,
)

DEFAULT_OUT_DIR = REPO_ROOT / "data" / "processed"
OUTPUT_FILES = {"train": "prefs_train.jsonl", "val": "prefs_val.jsonl",
                "rejected": "prefs_rejected.jsonl", "stats": "prefs_stats.json"}
FORMATS = ("pairs", "hh-rlhf")

SAMPLE_REASONS = ("empty_sample", "sample_equals_gold", "duplicate")

# ----------------------------------------------------------------------------- source: the SFT model


def load_sft_examples(path: Path) -> list[dict]:
    """SFT rows ({instruction, input, output, ...}) that can be a DPO prompt with a gold answer."""
    if not path.is_file():
        raise UserError(f"{path}: SFT training file not found (pass --sft_train_file)")
    records = read_records(path)
    usable = [{**record, "output": gold_answer(record)} for _, record in records if is_usable_sft_row(record)]
    if not usable:
        raise UserError(f"{path}: no rows with a non-empty instruction and response (is it an SFT file from prepare_sft_data.py?)")
    if len(usable) < len(records):
        print(f"note: {len(records) - len(usable):,} of {len(records):,} rows of {path} have no usable instruction/response; not drawn from")
    return usable


def gold_answer(record: dict):
    """The SFT row's answer: ``output`` (template-free rows), or ``response`` (rows prepared before)."""
    return record.get("output", record.get("response"))


def is_usable_sft_row(record: Any) -> bool:
    return (isinstance(record, dict) and isinstance(record.get("instruction"), str) and isinstance(gold_answer(record), str)
            and bool(record["instruction"].strip()) and bool(gold_answer(record).strip())
            and isinstance(record.get("input") or "", str))


def distinct_prompts(examples: list[dict]) -> list[dict]:
    """The first example of each distinct (instruction, input), in file order."""
    by_prompt: dict[tuple[str, str], dict] = {}
    for example in examples:
        key = (normalise_whitespace(example["instruction"]), normalise_whitespace(example.get("input") or ""))
        by_prompt.setdefault(key, example)
    return list(by_prompt.values())


def render_example(example: dict, fmt) -> str:
    """The prompt exactly as the SFT run renders it (its template, its tokenizer's chat template)."""
    return fmt.prompt({"instruction": example["instruction"].strip(), "input": (example.get("input") or "").strip()})


def collect_from_sft_model(args: argparse.Namespace) -> tuple[Collected, PromptTemplate, dict]:
    """Sample one response per picked training prompt from the SFT model; gold = chosen, sample = rejected."""
    from core.engines import choose_engine
    from core.generation import encode_prompts
    from core.modeling import load_tokenizer, pick_device
    from core.prompting import prompt_format
    from core.runs import read_run
    from core.threads import apply_thread_guard

    if args.template:
        raise UserError("--template does not apply to --from_sft_model: the SFT run's own template renders the prompts")
    run = read_run(args.from_sft_model, expect="sft")
    check_out_dir(args.out_dir, OUTPUT_FILES, {"sft_model": str(args.from_sft_model)}, args.overwrite)  # before sampling
    # vllm asked for but not usable (here, or for this model): one line, before any work
    choice = choose_engine(args.engine, pick_device("auto"), run.base_model)
    template, max_seq_length = run.template, run.config["max_seq_length"]
    limit = max_seq_length - args.max_new_tokens
    if limit <= 0:
        raise UserError(f"--max_new_tokens {args.max_new_tokens} leaves no room for a prompt within the SFT run's "
                        f"max_seq_length {max_seq_length}")
    train_file = Path(args.sft_train_file or run.local_path(run.config["train_file"]))
    candidates = distinct_prompts(load_sft_examples(train_file))
    apply_thread_guard()  # sampling is torch work; this script imports torch only here
    tokenizer = load_tokenizer(run.base_model, run.tokenizer_source, trust_remote_code=run.trust_remote_code)
    fmt = prompt_format(template, tokenizer)
    picked, too_long = pick_fitting(candidates, encode_prompts(tokenizer, [render_example(e, fmt) for e in candidates]),
                                    limit, args.num_pairs, args.seed)
    print(f"{train_file}: {len(candidates):,} distinct prompts, {too_long:,} longer than {limit} tokens (max_seq_length "
          f"{max_seq_length} - max_new_tokens {args.max_new_tokens}) not drawn; sampling {len(picked):,}")
    samples, engine_name = sample_from_run(args, run, choice, tokenizer, [ids for _, ids in picked], fmt.stop_ids,
                                           "sampling from the SFT model")
    collected = Collected(source="sft-sample", reasons=SAMPLE_REASONS, read=len(picked))
    for index, ((example, _), sample) in enumerate(zip(picked, samples)):
        record = {"id": example.get("id"), "prompt": render_example(example, fmt), "gold": example["output"], "sample": sample.text}
        reason = sample_problem(example["output"], sample.text)
        if reason:
            collected.drop(index, reason, record)
            continue
        pair = (example["instruction"].strip(), (example.get("input") or "").strip(), example["output"].strip(), sample.text.strip())
        # A sample cut by max_new_tokens is kept (an unfinished answer is a fair "rejected"), but counted.
        add_pair(collected, index, record, pair, None if sample.stopped_with_eos else "sample_cut_at_max_new_tokens")
    # base model and tokenizer: evaluation uses these pairs by default only for the same model
    provenance = {"sft_model": str(args.from_sft_model), "base_model": run.base_model,
                  "tokenizer": run.config.get("tokenizer_name_or_path") or run.base_model,
                  "sft_train_file": str(train_file),
                  "distinct_prompts": len(candidates), "prompts_too_long_not_drawn": too_long,
                  "sampling": {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
                               "max_new_tokens": args.max_new_tokens, "seed": args.seed, "engine": engine_name}}
    return collected, template, provenance


def sample_problem(gold: str, sample: str) -> str | None:
    if not sample.strip():
        return "empty_sample"
    if normalise_whitespace(sample) == normalise_whitespace(gold):
        return "sample_equals_gold"  # no preference to learn between two identical answers
    return None


# ----------------------------------------------------------------------------- statistics and output


def limit_pairs(rows: list[dict], num_pairs: int | None, seed: int) -> tuple[list[dict], int]:
    """At most ``num_pairs`` rows (a seeded random subset, in original order); also the number left out."""
    if num_pairs is None or len(rows) <= num_pairs:
        return rows, 0
    keep = set(random.Random(seed).sample(range(len(rows)), num_pairs))
    return [row for i, row in enumerate(rows) if i in keep], len(rows) - num_pairs


def build_stats(args, template: PromptTemplate, collected: Collected, left_out: int, train, val, split,
                provenance: dict) -> dict:
    """Everything the summary shows, plus provenance; no times or absolute paths (byte-identical reruns)."""
    return {
        "seed": args.seed,
        "val_ratio": args.val_ratio,
        "template": template.name,  # of the SFT model sampled; --from_file: the one rendered prompts were parsed with
        "format": "template-free rows (instruction, input, chosen, rejected): the DPO run renders them",
        "source": collected.source,
        **provenance,
        "read": collected.read,
        "dropped": collected.dropped_counts(),
        "kept": len(collected.rows),
        "left_out_over_num_pairs": left_out,
        "notes": dict(sorted(collected.notes.items())),
        "train": len(train),
        "val": len(val),
        "split": split,
        "outputs": dict(OUTPUT_FILES),
    }


def summary_rows(stats: dict) -> tuple[list[str], list[list]]:
    rows: list[list] = [["read", stats["read"]]]
    rows += [[f"dropped: {reason}", count] for reason, count in stats["dropped"].items()]
    rows.append(["kept", stats["kept"]])
    if stats["left_out_over_num_pairs"]:
        rows.append(["left out (over --num_pairs)", stats["left_out_over_num_pairs"]])
    rows += [[f"note: {name}", count] for name, count in stats["notes"].items()]
    rows += [["train", stats["train"]], ["val", stats["val"]]]
    return ["", stats["source"]], rows


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(description="Build DPO preference pairs (prefs_train.jsonl, prefs_val.jsonl).")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--from_sft_model", type=Path, metavar="DIR",
                        help="SFT output dir: chosen = gold training response, rejected = a sample from this model")
    source.add_argument("--from_file", type=Path, metavar="FILE", help="existing pairs (.jsonl, .jsonl.gz or .json)")
    parser.add_argument("--format", choices=FORMATS, default="pairs",
                        help="layout of --from_file: pairs ({prompt|instruction[,input], chosen, rejected}) or "
                             "hh-rlhf (Anthropic dialogues) (default: pairs)")
    parser.add_argument("--template", default=None,
                        help="--from_file with rendered 'prompt' rows: the text template they were rendered with, to parse "
                             "them back into instruction/input (default: alpaca)")
    parser.add_argument("--out_dir", type=Path, default=DEFAULT_OUT_DIR, help="output folder (default: data/processed)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace pairs of another source in --out_dir (a rerun of the same source needs no flag)")
    parser.add_argument("--val_ratio", type=float, default=0.1, help="share of pairs held out for validation (default: 0.1)")
    parser.add_argument("--seed", type=int, default=42, help="seed for choosing, sampling and splitting (default: 42)")
    parser.add_argument("--num_pairs", type=int, default=None,
                        help="pairs to make (--from_sft_model; default 5000) or at most to keep (--from_file; default all)")
    parser.add_argument("--judge", choices=("gold", "checker"), default="gold",
                        help="--from_sft_model: gold (chosen = the gold answer, rejected = a sample) or checker (K samples "
                             "per --prompts row, the constraint checker picks best and worst; scripts/judged_pairs.py)")
    parser.add_argument("--prompts", type=Path, default=None, metavar="FILE",
                        help="--judge checker: constrained prompts (if_train.jsonl from scripts/prepare_if_prompts.py)")
    parser.add_argument("--samples_per_prompt", type=int, default=4, help="--judge checker: samples per prompt (default: 4)")
    sampling = parser.add_argument_group("sampling (--from_sft_model)")
    sampling.add_argument("--sft_train_file", type=Path, default=None,
                          help="SFT rows to draw prompts and gold responses from (default: the SFT run's train_file)")
    sampling.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: 1.0)")
    sampling.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling threshold, 1 = off (default: 0.9)")
    sampling.add_argument("--top_k", type=int, default=0, help="top-k filter, 0 = off (default: 0)")
    sampling.add_argument("--max_new_tokens", type=int, default=128, help="longest sample in tokens (default: 128)")
    sampling.add_argument("--batch_size", type=int, default=16, help="prompts per generation batch, hf engine (default: 16)")
    sampling.add_argument("--engine", choices=ENGINES, default="auto",
                          help=ENGINE_HELP + " (default: auto). hf draws from one seeded RNG; vllm seeds each prompt "
                               "(--seed + its index), so the same seed gives other samples on the two engines")
    sampling.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                          help="weights the samples are drawn with; auto: bf16 on a CPU with AMX-BF16/AVX512_BF16 where its "
                               "matmul measures faster, fp32 on other CPUs, bf16/fp16 on CUDA (default: auto, as evaluation)")
    sampling.add_argument("--vllm_memory_share", type=float, default=0.2,
                          help="vllm: share of memory (on a CPU: of the RAM) its engine reserves (default: 0.2)")
    sampling.add_argument("--vllm_max_model_len", type=int, default=None,
                          help="vllm: longest prompt + sample in tokens (default: the model's, at most 4096)")
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    if not 0 < args.val_ratio < 1:
        raise UserError(f"--val_ratio must be between 0 and 1 (exclusive), got {args.val_ratio}")
    if args.num_pairs is not None and args.num_pairs <= 0:
        raise UserError(f"--num_pairs must be > 0, got {args.num_pairs}")
    if args.judge == "checker" and (args.from_sft_model is None or args.prompts is None):
        raise UserError("--judge checker needs --from_sft_model RUN and --prompts FILE (constrained prompts)")
    if args.judge != "checker" and args.prompts is not None:
        raise UserError("--prompts is for --judge checker; the gold pairs draw prompts from the SFT run's training file")
    if args.samples_per_prompt < 2:
        raise UserError(f"--samples_per_prompt must be >= 2 (a pair needs two samples), got {args.samples_per_prompt}")
    if args.from_sft_model is not None:
        if args.num_pairs is None:
            args.num_pairs = 5000
        if args.temperature <= 0:
            raise UserError(f"--temperature must be > 0, got {args.temperature}")
        if not 0 < args.top_p <= 1:
            raise UserError(f"--top_p must be in (0, 1], got {args.top_p}")
        if args.top_k < 0 or args.max_new_tokens <= 0 or args.batch_size <= 0:
            raise UserError("--top_k must be >= 0, --max_new_tokens and --batch_size > 0")
        if not 0 < args.vllm_memory_share <= 1:
            raise UserError(f"--vllm_memory_share must be in (0, 1], got {args.vllm_memory_share}")


def resolve_template(name: str | None) -> PromptTemplate:
    try:
        return load_template(name or "alpaca")
    except ValueError as exc:
        raise UserError(str(exc)) from None


def main(argv: Sequence[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    check_args(args)
    if args.judge == "checker":
        from scripts.judged_pairs import collect_judged_pairs
        collected, template, provenance = collect_judged_pairs(args, OUTPUT_FILES)
    elif args.from_sft_model is not None:
        collected, template, provenance = collect_from_sft_model(args)
    else:
        template = resolve_template(args.template)
        collected = collect_from_file(args.from_file, args.format, template)
        provenance = {"from_file": args.from_file.name, "format": args.format, "sha256": sha256_of_file(args.from_file)}
    rows, left_out = limit_pairs(collected.rows, None if args.from_sft_model else args.num_pairs, args.seed)
    hint = format_hint(args, collected)
    if not rows:
        dropped = ", ".join(f"{r} {n}" for r, n in collected.dropped_counts().items() if n) or "the source is empty"
        raise UserError(f"no usable pairs from {collected.source} (dropped: {dropped}){': ' + hint if hint else ''}")
    if hint:
        print(f"note: {hint}")
    check_out_dir(args.out_dir, OUTPUT_FILES, provenance, args.overwrite)
    train, val, split = split_by_prompt(rows, args.val_ratio, args.seed)
    stats = build_stats(args, template, collected, left_out, train, val, split, provenance)

    out = args.out_dir
    write_jsonl_atomic(out / OUTPUT_FILES["train"], train)
    write_jsonl_atomic(out / OUTPUT_FILES["val"], val)
    write_jsonl_atomic(out / OUTPUT_FILES["rejected"], collected.rejected)
    write_json_atomic(out / OUTPUT_FILES["stats"], stats)

    print_summary_table(*summary_rows(stats), title=f"DPO pairs (seed {args.seed}, val_ratio {args.val_ratio}, template {template.name}):")
    print(f"prompt groups: {split['prompt_groups']:,}; prompts in both splits: {split['prompts_in_both_splits']}")
    print(f"wrote {', '.join(str(out / name) for name in OUTPUT_FILES.values())} in {time.perf_counter() - started:.2f} s")
    return 0


def check_argv(argv: Sequence[str]) -> None:
    """Parse and check the flags, raising UserError, and stop there (scripts/run_study.py, before its first stage)."""
    check_args(parse_raising(build_parser(), argv))


main.check_argv = check_argv

if __name__ == "__main__":
    run_cli(main)
