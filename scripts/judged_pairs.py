"""Checker-judged on-policy preference pairs: K samples per constrained prompt, the checker picks.

    python scripts/prepare_dpo_data.py --from_sft_model models/sft_output --judge checker \\
        --prompts data/if/if_train.jsonl --samples_per_prompt 4 --num_pairs 2000 --max_new_tokens 192

``--num_pairs`` prompts are drawn (with ``--seed``) from ``--prompts`` (IFEval release format with
``instruction_id_list``/``kwargs``, e.g. from scripts/prepare_if_prompts.py), among those that fit
the SFT run's ``max_seq_length`` with ``--max_new_tokens``. Each is sampled K times from the SFT
model; each sample is scored by ``core.if_checker.judge_response`` (strict: the fraction of the
prompt's constraints followed; a constraint the checker cannot judge counts as not followed).
chosen = the best sample, rejected = the worst (the first in sample order among equals), kept only
when chosen scores higher. A tie, or fewer than two non-empty samples, is dropped with its reason
(``prefs_rejected.jsonl``). Each pair also carries ``instruction_id_list``, ``kwargs``,
``chosen_score`` and ``rejected_score``, so evaluation can split by constraint type.

Printed and written to the stats: the share of prompts with a usable pair, mean chosen/rejected
score and mean chosen/rejected length in tokens (a set where chosen is mostly the longer answer is
length-biased, and shows it here).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from core.cli import UserError
from core.if_checker import benchmark_knowing, checker_registry, judge_response
from core.release_format import numbered_rows, to_sample
from scripts.pair_sources import Collected, add_pair

JUDGED_REASONS = ("fewer_than_two_samples", "tie", "duplicate")


def load_constrained_prompts(path: Path) -> tuple[list[dict], str]:
    """(rows, benchmark) of a prompt file whose every row has constraints; otherwise a one-line error.

    The benchmark is the registry that knows every id: ``ifeval`` (training and seen/held-out files)
    or ``ifbench`` (the out-of-distribution file).
    """
    if not path.is_file():
        raise UserError(f"--prompts {path} not found")
    rows = []
    for where, row in numbered_rows(path, "IFEval"):
        if not isinstance(row, dict) or not row.get("instruction_id_list"):
            raise UserError(f"{where}: no constraints (instruction_id_list) to judge with --judge checker; "
                            f"make constrained prompts with scripts/prepare_if_prompts.py")
        to_sample("ifeval", row, where)  # the release format, checked row by row
        rows.append(row)
    if not rows:
        raise UserError(f"--prompts {path} holds no prompts")
    ids = {i for row in rows for i in row["instruction_id_list"]}
    benchmark = benchmark_knowing(ids)
    if benchmark is not None:
        return rows, benchmark
    raise UserError(f"--prompts {path}: instruction ids known to neither IFEval nor IFBench (or mixed): "
                    f"{', '.join(sorted(ids - set(checker_registry('ifeval')))[:5])}")


def prompt_record(row: dict) -> dict:
    """The (instruction, input) every stage renders; a release-format row without them is its ``prompt``."""
    if isinstance(row.get("instruction"), str) and row["instruction"].strip():
        return {"instruction": row["instruction"].strip(), "input": (row.get("input") or "").strip()}
    return {"instruction": row["prompt"].strip(), "input": ""}


def best_and_worst(scores: list[float]) -> tuple[int, int]:
    """Indices of the first best and the first worst score."""
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    worst = min(range(len(scores)), key=lambda i: (scores[i], i))
    return best, worst


def judge_prompt(collected: Collected, index: int, row: dict, benchmark: str, registry: dict, samples: list) -> dict | None:
    """The pair of one prompt (added to ``collected``) and its figures, or None when it has none (dropped with the reason)."""
    sample = to_sample(benchmark, row, f"prompt {index}")
    texts = [s.text.strip() for s in samples]
    usable = [i for i, text in enumerate(texts) if text]
    verdicts = {i: judge_response(benchmark, sample, texts[i], registry) for i in usable}
    record = {"key": row["key"], "prompt": row["prompt"],
              "samples": [{"text": texts[i], "score": verdicts[i].fraction if i in verdicts else None} for i in range(len(texts))]}
    if len(usable) < 2:
        collected.drop(index, "fewer_than_two_samples", record)
        return None
    best, worst = (usable[i] for i in best_and_worst([verdicts[i].fraction for i in usable]))
    if verdicts[best].fraction <= verdicts[worst].fraction:
        collected.drop(index, "tie", record)
        return None
    prompt = prompt_record(row)
    before = len(collected.rows)
    add_pair(collected, index, record, (prompt["instruction"], prompt["input"], texts[best], texts[worst]),
             None if samples[best].stopped_with_eos else "chosen_cut_at_max_new_tokens")
    if len(collected.rows) == before:
        return None  # a duplicate pair: dropped by add_pair, with its reason
    collected.rows[-1].update(instruction_id_list=list(row["instruction_id_list"]), kwargs=list(row["kwargs"]),
                              chosen_score=verdicts[best].fraction, rejected_score=verdicts[worst].fraction)
    return {"chosen_score": verdicts[best].fraction, "rejected_score": verdicts[worst].fraction,
            "chosen_tokens": samples[best].num_tokens, "rejected_tokens": samples[worst].num_tokens,
            "unchecked": sum(v.unchecked for v in verdicts.values())}


def judged_figures(prompts: int, figures: list[dict], unchecked_total: int) -> dict:
    def mean(name: str) -> float | None:
        return round(sum(f[name] for f in figures) / len(figures), 4) if figures else None
    return {"prompts": prompts, "prompts_with_pair": len(figures),
            "share_with_pair": round(len(figures) / prompts, 4) if prompts else 0.0,
            "mean_chosen_score": mean("chosen_score"), "mean_rejected_score": mean("rejected_score"),
            "mean_chosen_tokens": mean("chosen_tokens"), "mean_rejected_tokens": mean("rejected_tokens"),
            "chosen_longer": sum(f["chosen_tokens"] > f["rejected_tokens"] for f in figures),
            "constraints_unchecked_in_samples": unchecked_total}


def collect_judged_pairs(args: argparse.Namespace, output_files: dict[str, str]):
    """Sample ``--samples_per_prompt`` answers per drawn prompt from the SFT model and keep checker-judged pairs."""
    from core.engines import choose_engine
    from core.generation import encode_prompts
    from core.modeling import load_tokenizer, pick_device
    from core.prompting import prompt_format
    from core.runs import read_run
    from core.threads import apply_thread_guard
    from scripts.prefs_checks import check_out_dir
    from scripts.sft_sampling import pick_fitting, sample_from_run

    if args.template:
        raise UserError("--template does not apply to --from_sft_model: the SFT run's own template renders the prompts")
    rows, benchmark = load_constrained_prompts(args.prompts)  # before any model is loaded
    run = read_run(args.from_sft_model, expect="sft")
    check_out_dir(args.out_dir, output_files, {"sft_model": str(args.from_sft_model)}, args.overwrite)
    choice = choose_engine(args.engine, pick_device("auto"))
    limit = run.config["max_seq_length"] - args.max_new_tokens
    if limit <= 0:
        raise UserError(f"--max_new_tokens {args.max_new_tokens} leaves no room for a prompt within the SFT run's "
                        f"max_seq_length {run.config['max_seq_length']}")
    apply_thread_guard()
    tokenizer = load_tokenizer(run.base_model, run.tokenizer_source, trust_remote_code=run.trust_remote_code)
    fmt = prompt_format(run.template, tokenizer)
    picked, too_long = pick_fitting(rows, encode_prompts(tokenizer, [fmt.prompt(prompt_record(r)) for r in rows]),
                                    limit, args.num_pairs, args.seed)
    k = args.samples_per_prompt
    print(f"{args.prompts}: {len(rows):,} prompts ({benchmark}), {too_long:,} longer than {limit} tokens not drawn; "
          f"sampling {len(picked):,} x {k}")
    samples, engine_name = sample_from_run(args, run, choice, tokenizer, [ids for _, ids in picked for _ in range(k)],
                                           fmt.stop_ids, f"sampling {k} answers per prompt")
    registry = checker_registry(benchmark)
    collected = Collected(source="checker-judged", reasons=JUDGED_REASONS, read=len(picked))
    figures = []
    for index, (row, _) in enumerate(picked):
        result = judge_prompt(collected, index, row, benchmark, registry, samples[index * k:(index + 1) * k])
        if result:
            figures.append(result)
    judged = judged_figures(len(picked), figures, sum(f["unchecked"] for f in figures))
    print_judged(judged)
    provenance = {"sft_model": str(args.from_sft_model), "base_model": run.base_model,
                  "tokenizer": run.config.get("tokenizer_name_or_path") or run.base_model,
                  "prompts_file": Path(args.prompts).name, "benchmark": benchmark, "prompts_too_long_not_drawn": too_long,
                  "judge": {"name": "checker (strict fraction of constraints followed)", "samples_per_prompt": k, **judged},
                  "sampling": {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
                               "max_new_tokens": args.max_new_tokens, "seed": args.seed, "engine": engine_name}}
    return collected, run.template, provenance


def print_judged(judged: dict) -> None:
    print(f"checker-judged pairs: {judged['prompts_with_pair']:,} of {judged['prompts']:,} prompts have a usable pair "
          f"({judged['share_with_pair']:.1%}); mean score chosen {judged['mean_chosen_score']} vs rejected "
          f"{judged['mean_rejected_score']}; mean length chosen {judged['mean_chosen_tokens']} vs rejected "
          f"{judged['mean_rejected_tokens']} tokens; chosen longer in {judged['chosen_longer']:,} pairs")
