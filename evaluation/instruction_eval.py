"""IFEval and IFBench inside the eval stage: every column answers every benchmark prompt, then is scored.

    python -m sft.eval_sft --adapter_dir models/sft_output models/dpo_output \\
        --ifeval data/raw/ifeval_input_data.jsonl --ifeval_limit 100 --if_max_new_tokens 1024
    python -m sft.eval_sft --ifeval google/IFEval --ifbench allenai/IFBench_test     # from the hub

Each column (base, each adapter) is prompted through its run's template (:func:`if_prompt_ids`, the
one place a benchmark prompt becomes model input), generates greedily through the eval's engine
(``--engine``: hf batches or vLLM, ``core/engines.py``), and is scored by
``evaluation.instruction_following`` (the pinned if-verifiable checkers). Written next to the eval's
other outputs: ``if_<benchmark>_generations.jsonl`` (one ``{key, model, prompt, response, ...}`` row
per prompt and model: re-score one model with ``python -m evaluation.score_if --responses FILE
--model LABEL --benchmark ifeval --data DATA``) and ``if_<benchmark>_scores.json`` (per model: the four
numbers, the per-instruction-type breakdown and every unscored prompt with its reason).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from core.generation import Generation, encode_prompts
from core.prompting import prompt_format
from evaluation.if_sets import checker_benchmark
from evaluation.instruction_following import IFScores, load_benchmark, score_responses

HEADLINE = (("prompt_strict", "prompt-level strict"), ("prompt_loose", "prompt-level loose"),
            ("instruction_strict", "instruction-level strict"), ("instruction_loose", "instruction-level loose"))


def if_prompt_ids(settings, tokenizer, prompts: Sequence[str]) -> tuple[list[list[int]], list[int]]:
    """Token ids of the benchmark prompts as this column's model is prompted, and its stop tokens.

    The benchmark prompt is the instruction (one user turn), rendered by the run's format (a text
    template, or the tokenizer's chat template): the model sees exactly what it was trained to answer.
    """
    fmt = prompt_format(settings.template, tokenizer)
    return encode_prompts(tokenizer, [fmt.prompt({"instruction": prompt, "input": ""}) for prompt in prompts]), fmt.stop_ids


@dataclass
class BenchmarkRun:
    """One benchmark over every column: the samples, each column's generations and scores."""

    name: str
    source: str
    limit: int | None
    samples: list
    generations: dict[str, list[Generation]]
    scores: dict[str, IFScores]

    def metrics(self, label: str) -> dict:
        """Flat per-model numbers for metrics.json's ``models`` table (``ifeval_prompt_strict``, ...)."""
        scores, gens = self.scores[label], self.generations[label]
        out = {f"{self.name}_{key}": getattr(scores, key) for key, _ in HEADLINE}
        out[f"{self.name}_prompts_scored"] = scores.prompts_scored
        out[f"{self.name}_stop_rate"] = sum(g.stopped_with_eos for g in gens) / len(gens) if gens else None
        return out

    def to_dict(self) -> dict:
        return {"source": self.source, "limit": self.limit, "prompts": len(self.samples),
                "models": {label: s.to_dict(with_prompts=False) for label, s in self.scores.items()}}


def requested_benchmarks(config) -> list[tuple[str, str, int | None]]:
    """(name, source, limit) for each benchmark the config names."""
    wanted = [("ifeval", config.ifeval, config.ifeval_limit), ("ifbench", config.ifbench, config.ifbench_limit)]
    return [(name, source, limit) for name, source, limit in wanted if source]


def load_requested(config) -> list[tuple[str, str, int | None, list]]:
    """Load every requested benchmark up front, so a bad file fails before any model is loaded."""
    return [(name, source, limit, load_benchmark(name, source, limit)) for name, source, limit in requested_benchmarks(config)]


def column_generations(benchmarks: Sequence[tuple[str, list]], spec, tokenizer, engine, max_new_tokens: int,
                       cache: dict) -> dict[str, list[Generation]]:
    """One column's greedy answers to every benchmark's prompts (its weights already active): ``{name: answers}``.

    Every benchmark in ONE engine call, not one call each: a call lasts as long as its longest answer, and on a
    CPU the answers that loop to the token limit decode alone at the end of a call (~45 s at 1,024 tokens, a
    batch of one), so separate calls paid that tail once per benchmark and column. What shares the batch can
    still change a greedy answer in bf16 (matmuls are not batch-invariant): measured, 7 of the base model's 40
    IFEval answers changed length between a batch of 40 and one of 100 (docs/study.md, "What it costs").
    """
    if spec.settings not in cache:  # columns trained with the same template share the tokenization
        prompts = [sample.prompt for _, samples in benchmarks for sample in samples]
        cache[spec.settings] = if_prompt_ids(spec.settings, tokenizer, prompts)
    prompt_ids, stop_ids = cache[spec.settings]
    names = " + ".join(name for name, _ in benchmarks)
    answers = engine.generate(prompt_ids, max_new_tokens=max_new_tokens, stop_ids=stop_ids, desc=f"{spec.label}: {names}")
    split, start = {}, 0
    for name, samples in benchmarks:
        split[name], start = answers[start:start + len(samples)], start + len(samples)
    return split


def score_benchmark(name: str, source: str, limit: int | None, samples: list,
                    generations: dict[str, list[Generation]]) -> BenchmarkRun:
    """Score every column's responses (columns in the order of ``generations``)."""
    checkers = checker_benchmark(name)  # an IF set (evaluation/if_sets.py) is judged by IFEval's or IFBench's checkers
    scores = {label: score_responses(checkers, samples, [g.text for g in gens]) for label, gens in generations.items()}
    return BenchmarkRun(name, str(source), limit, samples, generations, scores)


def write_benchmark_files(out_dir: Path, run: BenchmarkRun) -> list[Path]:
    """``if_<name>_generations.jsonl`` (prompt-major, models in column order) and ``if_<name>_scores.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, sample in enumerate(run.samples):
        for label, gens in run.generations.items():
            outcome = run.scores[label].prompts[i]
            rows.append({"key": sample.key, "model": label, "prompt": sample.prompt, "response": gens[i].text,
                         "num_tokens": gens[i].num_tokens, "stopped_with_eos": gens[i].stopped_with_eos,
                         "instruction_id_list": list(sample.instruction_id_list),
                         "strict": outcome.strict, "loose": outcome.loose})
    gen_path, score_path = out_dir / f"if_{run.name}_generations.jsonl", out_dir / f"if_{run.name}_scores.json"
    tmp = gen_path.with_name(f".{gen_path.name}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(gen_path)
    detail = {"source": run.source, "limit": run.limit,
              "models": {label: s.to_dict(with_prompts=True) for label, s in run.scores.items()}}
    tmp = score_path.with_name(f".{score_path.name}.tmp")
    tmp.write_text(json.dumps(detail, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(score_path)
    return [gen_path, score_path]


# --------------------------------------------------------------------------- tables


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _table(header: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header] + rows)


def headline_table(run: BenchmarkRun | dict, markdown: bool = False) -> str:
    """Models as rows: the four numbers (in %) and how many prompts were scored."""
    models = _models(run)
    header = ["model"] + [title for _, title in HEADLINE] + ["prompts scored"]
    rows = [[label] + [_pct(s.get(key)) for key, _ in HEADLINE] + [f"{s['prompts_scored']}/{s['prompts_total']}"]
            for label, s in models.items()]
    return _table(header, rows, markdown)


def per_type_table(run: BenchmarkRun | dict, markdown: bool = False) -> str:
    """Instruction types as rows, one column per model: strict / loose instruction accuracy (%), n."""
    models = _models(run)
    types = sorted({t for s in models.values() for t in s["per_type"]})
    header = ["instruction type", "n"] + [f"{label} strict/loose" for label in models]
    rows = []
    for t in types:
        counts = {s["per_type"][t]["count"] for s in models.values() if t in s["per_type"]}
        cells = [f"{_pct(s['per_type'][t]['strict'])} / {_pct(s['per_type'][t]['loose'])}" if t in s["per_type"] else "-"
                 for s in models.values()]
        rows.append([t, "/".join(str(c) for c in sorted(counts))] + cells)
    return _table(header, rows, markdown)


def _models(run: BenchmarkRun | dict) -> dict[str, dict]:
    """Per model: the summary dict with ``per_type`` (from a live run or from metrics.json)."""
    if isinstance(run, BenchmarkRun):
        return {label: s.to_dict(with_prompts=False) for label, s in run.scores.items()}
    return run["models"]


def report_section(benchmarks: dict[str, dict], max_new_tokens: int) -> list[str]:
    """The report.md lines for every benchmark: the four numbers, the per-type table, what was unscored."""
    lines = ["## Instruction following (verifiable)", "",
             f"Greedy responses of at most {max_new_tokens} new tokens, each benchmark prompt given as the "
             "instruction in the column's template; checked by the pinned if-verifiable checkers. Prompt-level: share "
             "of prompts whose instructions all pass; instruction-level: share of instructions that pass; loose also "
             "accepts the response with its first/last line or markdown emphasis removed. Numbers in %.", ""]
    for name, data in benchmarks.items():
        first = next(iter(data["models"].values()))
        lines += [f"### {name} (`{data['source']}`, {data['prompts']} prompts"
                  + (f", the first {data['limit']}" if data.get("limit") else "") + ")", "",
                  headline_table(data, markdown=True), "",
                  f"Checkers: {first['library']}; sentence splitter: {first['sentence_splitter'] or 'unavailable'}. "
                  f"Responses: `if_{name}_generations.jsonl`; per-prompt detail: `if_{name}_scores.json`.", ""]
        drawn = sorted({(str(d["key"]), d["instruction_id"]) for s in data["models"].values()
                        for d in s.get("drawn_at_random", [])})
        if drawn:
            lines += [f"{len(drawn)} instruction(s) lack a valid argument in the benchmark (e.g. a letter count of "
                      "'#'); the checker drew one at random, seeded by prompt key and instruction, so a response gets "
                      "the same score on every scoring: " + ", ".join(f"{k} {i}" for k, i in drawn[:5])
                      + (" ..." if len(drawn) > 5 else "") + ".", ""]
        for label, s in data["models"].items():
            if s["unscored"]:
                reasons = sorted({u["reason"] for u in s["unscored"]})
                lines += [f"- {label}: {len(s['unscored'])} prompts unscored ({'; '.join(reasons)})"]
        if lines[-1]:  # after the unscored list
            lines.append("")
        lines += ["Per instruction type (instruction-level accuracy, strict / loose):", "",
                  per_type_table(data, markdown=True), ""]
    return lines


