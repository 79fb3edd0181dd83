"""Verifiable instruction following: IFEval and IFBench prompts, and the scoring of responses.

The checkers are not ours: every instruction is checked by the pinned ``if-verifiable`` package
(its ``evaluate_output_for_sample``, which carries Google's IFEval and AllenAI's IFBench checker
code). This module adds what a study needs around it:

* ``load_benchmark``: the prompts, from a local JSONL in the original release format
  (``key, prompt, instruction_id_list, kwargs``) or from the hub id for a user with network;
* offline sentence splitting for IFEval's sentence-count checks (core/punkt_offline.py);
* ``score_responses``: the four IFEval numbers (prompt-level and instruction-level accuracy, strict
  and loose), a per-instruction-type breakdown, and every prompt that could not be scored with the
  reason (no response, an instruction id the library does not know, NLTK data that is missing
  here, a checker that raised). An unscored prompt is left out of all the numbers, never counted
  as a pass or a fail, and always listed;
* the same score for the same response every time: each instruction is checked with its own
  seeded RNG (``core/if_checker.py``), since some checkers draw a missing argument at random.

Everything returned is plain dataclasses whose ``to_dict()`` is JSON-serialisable.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from core.cli import UserError
from core.if_checker import (BENCHMARKS, CHECKER_LIBRARY, InstructionOutcome, check_benchmark_name, package_version,
                             check_instruction, checker_registry)
from core.punkt_offline import sentence_splitter_source
from core.release_format import checked_samples, numbered_rows

# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

def load_benchmark(name: str, source: str | os.PathLike | None = None, limit: int | None = None) -> list:
    """The prompts of ``name`` (``ifeval`` or ``ifbench``) as if-verifiable sample dataclasses.

    ``source``: a local JSONL in the original release format (one ``{key, prompt,
    instruction_id_list, kwargs}`` object a line); None or a hub id (``google/IFEval``,
    ``allenai/IFBench_test``) loads the hub dataset with ``datasets`` (needs network). ``limit``:
    keep the first N prompts. A missing or malformed file, or a hub load that fails, is a one-line
    ``UserError``.
    """
    check_benchmark_name(name)
    if limit is not None and limit < 1:
        raise UserError(f"limit must be a positive number of prompts, got {limit}")
    if source is None or _looks_like_hub_id(source):
        hub_id = str(source) if source is not None else BENCHMARKS[name]
        rows = _load_hub(name, hub_id)
        samples = checked_samples(name, ((f"{hub_id} row {index}", row) for index, row in enumerate(rows, start=1)))
    else:
        path = Path(source)
        if not path.is_file():
            raise UserError(f"{name} data file not found: {path}")
        samples = checked_samples(name, numbered_rows(path, name))
    if not samples:
        raise UserError(f"{source or BENCHMARKS[name]} holds no {name} prompts")
    return samples[:limit] if limit is not None else samples


def _looks_like_hub_id(source: str | os.PathLike) -> bool:
    text = str(source)
    return (not Path(text).exists() and text.count("/") == 1 and not text.startswith((".", "/"))
            and not text.endswith((".jsonl", ".json")))


def _load_hub(name: str, hub_id: str) -> list[dict]:
    try:
        import datasets

        dataset = datasets.load_dataset(hub_id)
    except Exception as exc:  # network, auth, unknown id: all things the user fixes
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"could not load {name} from the hub id {hub_id!r} ({first}); "
                        f"pass a local JSONL in the release format instead") from None
    split = next((dataset[s] for s in ("train", "test") if s in dataset), None)
    if split is None:
        split = dataset[list(dataset.keys())[0]]
    return [dict(row) for row in split]


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------

@dataclass
class PromptOutcome:
    """One prompt: its instructions, all-pass (strict, loose), or None with the reason."""

    key: Any
    prompt: str
    response: str | None
    instructions: list[InstructionOutcome]
    strict: bool | None
    loose: bool | None
    unscored_reason: str | None = None

    @property
    def scored(self) -> bool:
        return self.unscored_reason is None


@dataclass
class TypeScore:
    """Accuracy on one instruction type over the scored prompts."""

    count: int
    strict_pass: int
    loose_pass: int
    strict: float
    loose: float


@dataclass
class IFScores:
    """The four IFEval numbers, the per-type breakdown and what could not be scored.

    ``prompt_*``: share of scored prompts whose instructions all pass; ``instruction_*``: share of
    the instructions of scored prompts that pass. None when nothing could be scored.
    """

    benchmark: str
    library: str
    sentence_splitter: str | None
    prompts_total: int
    prompts_scored: int
    instructions_total: int
    instructions_scored: int
    prompt_strict: float | None
    prompt_loose: float | None
    instruction_strict: float | None
    instruction_loose: float | None
    per_type: dict[str, TypeScore]
    unscored: list[dict]
    prompts: list[PromptOutcome] = field(repr=False)
    # instructions whose checker drew an argument (missing or invalid in the prompt) from a seeded RNG
    drawn_at_random: list[dict] = field(default_factory=list)

    @property
    def prompts_unscored(self) -> int:
        return self.prompts_total - self.prompts_scored

    def summary(self) -> dict[str, Any]:
        """The headline numbers alone (no per-prompt detail)."""
        keys = ("benchmark", "library", "sentence_splitter", "prompts_total", "prompts_scored",
                "instructions_total", "instructions_scored", "prompt_strict", "prompt_loose",
                "instruction_strict", "instruction_loose")
        return {k: getattr(self, k) for k in keys}

    def per_type_dict(self) -> dict[str, dict[str, float | int]]:
        """``{instruction type: {count, strict_pass, loose_pass, strict, loose}}``, for tables and charts."""
        return {k: asdict(v) for k, v in self.per_type.items()}

    def to_dict(self, with_prompts: bool = True) -> dict[str, Any]:
        out = self.summary()
        out["prompts_unscored"] = self.prompts_unscored
        out["per_type"] = self.per_type_dict()
        out["unscored"] = list(self.unscored)
        out["drawn_at_random"] = list(self.drawn_at_random)
        if with_prompts:
            out["prompts"] = [asdict(p) for p in self.prompts]
        return out


def score_responses(benchmark: str, samples: Sequence, responses: Sequence[str | None]) -> IFScores:
    """Score ``responses[i]`` against ``samples[i]`` with if-verifiable's checkers.

    A None response means the prompt has no response: it is unscored ("no response"). A prompt is
    also unscored when one of its instructions is unknown to the library (if-verifiable itself
    would skip it silently) or cannot be checked here (its checker raised, e.g. ``LookupError`` for
    NLTK data that is not installed); the reason is kept per instruction. Each instruction is checked
    with its own seeded RNG (``core/if_checker.py``): the same response always gets the same score.
    """
    check_benchmark_name(benchmark)
    if len(samples) != len(responses):
        raise ValueError(f"{len(samples)} prompts but {len(responses)} responses")
    registry = checker_registry(benchmark)
    outcomes = [_score_one(benchmark, registry, s, r) for s, r in zip(samples, responses)]
    return _aggregate(benchmark, outcomes)


def _score_one(benchmark: str, registry: dict, sample, response: str | None) -> PromptOutcome:
    ids = list(sample.instruction_id_list)

    def unscored(reason: str, per_instruction: list[InstructionOutcome] | None = None) -> PromptOutcome:
        rows = per_instruction or [InstructionOutcome(i, None, None, reason) for i in ids]
        return PromptOutcome(sample.key, sample.prompt, response, rows, None, None, reason)

    if response is None:
        return unscored("no response")
    if not ids:
        return unscored("the prompt has no instructions")
    unknown = [i for i in ids if i not in registry]
    if unknown:
        return unscored(f"instruction id unknown to {CHECKER_LIBRARY} {package_version(CHECKER_LIBRARY)}: "
                        + ", ".join(sorted(set(unknown))))
    # One instruction at a time, each with its own seed (core/if_checker.py): a checker that
    # draws a missing argument draws the same one on every scoring.
    rows = [check_instruction(benchmark, sample, index, response) for index in range(len(ids))]
    reasons = sorted({r.unscored_reason for r in rows if r.unscored_reason})
    if reasons:
        return unscored("; ".join(reasons), rows)
    return PromptOutcome(sample.key, sample.prompt, response, rows,
                         all(r.strict for r in rows), all(r.loose for r in rows))


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def _aggregate(benchmark: str, outcomes: list[PromptOutcome]) -> IFScores:
    scored = [p for p in outcomes if p.scored]
    instructions = [i for p in scored for i in p.instructions]
    per_type: dict[str, list[int]] = {}
    for item in instructions:
        counts = per_type.setdefault(item.instruction_id, [0, 0, 0])
        counts[0] += 1
        counts[1] += bool(item.strict)
        counts[2] += bool(item.loose)
    unscored = []
    for p in outcomes:
        if p.scored:
            continue
        unscored.append({"key": p.key, "reason": p.unscored_reason,
                         "instructions": [{"instruction_id": i.instruction_id, "reason": i.unscored_reason}
                                          for i in p.instructions if i.unscored_reason]})
    return IFScores(
        benchmark=benchmark,
        library=f"{CHECKER_LIBRARY} {package_version(CHECKER_LIBRARY)}",
        sentence_splitter=sentence_splitter_source(),
        prompts_total=len(outcomes),
        prompts_scored=len(scored),
        instructions_total=sum(len(p.instructions) for p in outcomes),
        instructions_scored=len(instructions),
        prompt_strict=_ratio(sum(bool(p.strict) for p in scored), len(scored)),
        prompt_loose=_ratio(sum(bool(p.loose) for p in scored), len(scored)),
        instruction_strict=_ratio(sum(bool(i.strict) for i in instructions), len(instructions)),
        instruction_loose=_ratio(sum(bool(i.loose) for i in instructions), len(instructions)),
        per_type=OrderedDict((k, TypeScore(c[0], c[1], c[2], c[1] / c[0], c[2] / c[0]))
                             for k, c in sorted(per_type.items())),
        unscored=unscored,
        prompts=outcomes,
        drawn_at_random=[{"key": p.key, "instruction_id": i.instruction_id}
                         for p in scored for i in p.instructions if i.drew_at_random],
    )


def format_table(scores: IFScores) -> str:
    """The four numbers, then one line per instruction type: plain text for a terminal or a log."""
    def pct(value: float | None) -> str:
        return "   n/a" if value is None else f"{100 * value:6.1f}"

    lines = [
        f"{scores.benchmark}: {scores.prompts_scored}/{scores.prompts_total} prompts and "
        f"{scores.instructions_scored}/{scores.instructions_total} instructions scored "
        f"({scores.library}; sentence splitter: {scores.sentence_splitter or 'unavailable'})",
        f"{'':38} {'strict':>6} {'loose':>6}",
        f"{'prompt-level accuracy (%)':38} {pct(scores.prompt_strict)} {pct(scores.prompt_loose)}",
        f"{'instruction-level accuracy (%)':38} {pct(scores.instruction_strict)} {pct(scores.instruction_loose)}",
    ]
    if scores.per_type:
        lines += ["", f"{'instruction type':38} {'n':>4} {'strict':>6} {'loose':>6}"]
        for name, t in scores.per_type.items():
            lines.append(f"{name[:38]:38} {t.count:4d} {pct(t.strict)} {pct(t.loose)}")
    if scores.drawn_at_random:
        shown = ", ".join(f"{d['key']} {d['instruction_id']}" for d in scores.drawn_at_random[:5])
        more = f" and {len(scores.drawn_at_random) - 5} more" if len(scores.drawn_at_random) > 5 else ""
        lines += ["", f"note: {len(scores.drawn_at_random)} instruction(s) lack a valid argument and their checker drew one "
                      f"at random, seeded by prompt key and instruction, so every scoring agrees: {shown}{more}"]
    if scores.unscored:
        lines += ["", f"unscored prompts: {len(scores.unscored)}"]
        reasons: dict[str, int] = {}
        for item in scores.unscored:
            reasons[item["reason"]] = reasons.get(item["reason"], 0) + 1
        lines += [f"  {n:4d} x {reason}" for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1])]
    return "\n".join(lines)
