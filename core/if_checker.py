"""The constraint checkers (IFEval/IFBench, from if-verifiable): the registry, and one instruction checked the same way every time.

It sits in ``core/`` because data preparation, RL rewards and evaluation all judge responses with it.

Some of if-verifiable's checkers draw an argument from Python's global ``random`` when the prompt's
own argument is missing or invalid: IFEval prompt 1122 asks for at least four ``#``, and the
letter-frequency checker, finding ``#`` is not a letter, draws a random letter to count instead.
Unseeded, the same response then passes on one scoring and fails on the next.

Here each instruction is checked alone, inside :func:`seeded_random`, with a seed derived from the
benchmark, the prompt key, the instruction's index and its id (:func:`instruction_seed`): whatever
the checker draws is the same in every process, in any order of scoring, however often. The global
``random`` state is restored afterwards, so scoring never disturbs the caller's random numbers.
Whether the checker drew at all is recorded, so a report can say which instructions were checked
with a drawn argument instead of the prompt's.
"""
from __future__ import annotations

import hashlib
import random
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Iterator

from core.cli import UserError
from core.punkt_offline import ensure_punkt_english


@dataclass
class InstructionOutcome:
    """One instruction of one prompt: pass/fail (strict, loose), or None with the reason.

    ``drew_at_random``: the checker used random numbers (an argument missing or invalid in the
    prompt was drawn); the seed makes the draw the same on every scoring.
    """

    instruction_id: str
    strict: bool | None
    loose: bool | None
    unscored_reason: str | None = None
    drew_at_random: bool = False


def instruction_seed(benchmark: str, key, index: int, instruction_id: str) -> int:
    """A seed fixed by (benchmark, prompt key, instruction index, instruction id) alone.

    sha256, not ``hash()``: Python salts string hashes per process, which would make the seed, and
    so the score, change between runs.
    """
    text = "\x1f".join((benchmark, str(key), str(index), instruction_id))
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


@contextmanager
def seeded_random(seed: int) -> Iterator[None]:
    """Python's global ``random`` seeded with ``seed`` inside, and put back as it was afterwards."""
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


def check_instruction(benchmark: str, sample, index: int, response: str) -> InstructionOutcome:
    """Instruction ``index`` of ``sample`` checked on ``response`` by if-verifiable, deterministically.

    An empty response (after removing any ``<think>`` block) fails, as if-verifiable's own scores
    say. A checker that raises leaves the instruction unscored with the reason (``LookupError``:
    NLTK data missing here).
    """
    from if_verifiable import evaluate_output_for_sample

    instruction_id = sample.instruction_id_list[index]
    single = type(sample)(key=sample.key, prompt=sample.prompt, instruction_id_list=[instruction_id],
                          kwargs=[sample.kwargs[index]])
    with seeded_random(instruction_seed(benchmark, sample.key, index, instruction_id)):
        before = random.getstate()
        try:
            results, _ = evaluate_output_for_sample(benchmark, single, response)
        except LookupError as exc:
            return InstructionOutcome(instruction_id, None, None, f"NLTK data missing: {_resource_name(exc)}")
        except Exception as exc:  # noqa: BLE001 - a checker bug or an argument it cannot use: reported, not fatal
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            return InstructionOutcome(instruction_id, None, None, f"checker raised {type(exc).__name__}: {message}"[:300])
        drew = random.getstate() != before
    result = results[0] if results else None  # no result: the response is empty, every instruction fails
    return InstructionOutcome(instruction_id, bool(result and result.strict_pass), bool(result and result.loose_pass),
                              drew_at_random=drew)


def _resource_name(exc: LookupError) -> str:
    text = str(exc)
    for line in text.splitlines():
        line = line.strip()
        if "Resource" in line and "not found" in line:
            return line
        if line.startswith(">>> nltk.download("):
            return line.removeprefix(">>> ")
    return text.strip().splitlines()[0] if text.strip() else "LookupError"


#: Benchmark name -> hub dataset id (the split with the prompts is the only one each has).
BENCHMARKS: dict[str, str] = {"ifeval": "google/IFEval", "ifbench": "allenai/IFBench_test"}
CHECKER_LIBRARY = "if-verifiable"


def package_version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def checker_registry(benchmark: str) -> dict[str, Any]:
    """The library's ``instruction id -> checker class`` table for ``benchmark``.

    Importing if-verifiable's IFBench module calls ``nltk.download`` for its NLTK data at import
    time; here that call is suppressed (no network is touched), and checkers that need data that
    is absent raise ``LookupError`` when used, which scoring reports as unscored with the reason.
    """
    check_benchmark_name(benchmark)
    ensure_punkt_english()
    _seed_langdetect()
    if benchmark == "ifeval":
        from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT
        return dict(INSTRUCTION_DICT)
    import nltk

    real_download = nltk.download
    nltk.download = lambda *args, **kwargs: False
    try:
        from if_verifiable.ifbench.instructions_registry import INSTRUCTION_DICT
    finally:
        nltk.download = real_download
    return dict(INSTRUCTION_DICT)


def _seed_langdetect() -> None:
    # langdetect is random unless seeded; the "response language" checkers use it. A fixed seed
    # makes the same response score the same on every run.
    try:
        from langdetect import DetectorFactory
    except ImportError:  # pragma: no cover - a dependency of if-verifiable
        return
    DetectorFactory.seed = 0


def check_benchmark_name(benchmark: str) -> None:
    if benchmark not in BENCHMARKS:
        raise UserError(f"unknown benchmark {benchmark!r}; choose one of: {', '.join(BENCHMARKS)}")


def benchmark_knowing(instruction_ids) -> str | None:
    """The benchmark whose checker registry knows every one of ``instruction_ids`` (IFEval first), or None.

    A constrained prompt file is judged by one registry: IFEval's for training and seen/held-out files,
    IFBench's for the out-of-distribution file.
    """
    ids = set(instruction_ids)
    return next((b for b in ("ifeval", "ifbench") if ids <= set(checker_registry(b))), None)


@dataclass(frozen=True)
class ConstraintVerdict:
    """How many of one prompt's constraints a response followed (strict), for rewards and judged pairs.

    ``unchecked``: constraints the checker could not judge (unknown id, checker raised); they count as
    not followed, so a response is never rewarded for what nobody verified.
    """

    followed: int
    total: int
    unchecked: int

    @property
    def fraction(self) -> float:
        return self.followed / self.total if self.total else 0.0

    @property
    def all_followed(self) -> bool:
        return self.total > 0 and self.followed == self.total


def judge_response(benchmark: str, sample, response: str, registry: dict | None = None) -> ConstraintVerdict:
    """``response`` checked against every constraint of ``sample`` (strict), each with its own seed.

    The one verdict behind checker-judged preference pairs and RL with verifiable rewards, so the
    two (and evaluation, which checks the same way) can never disagree on what "followed" means.
    """
    registry = registry if registry is not None else checker_registry(benchmark)
    followed = unchecked = 0
    for index, instruction_id in enumerate(sample.instruction_id_list):
        if instruction_id not in registry:
            unchecked += 1
            continue
        outcome = check_instruction(benchmark, sample, index, response)
        if outcome.strict is None:
            unchecked += 1
        followed += bool(outcome.strict)
    return ConstraintVerdict(followed, len(sample.instruction_id_list), unchecked)
