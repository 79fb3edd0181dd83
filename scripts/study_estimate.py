"""What a study will cost before it runs: ``python scripts/run_study.py --preset study --estimate``.

Each stage's work is counted from its command (steps, batch, pairs, prompts, token budgets) and the
lengths assumed below, split into the kinds of work ``bench/stage_floors.py`` prices:

- trained tokens: ~4N FLOPs each (LoRA), forwarded tokens (references, reward models, evaluation
  losses, prompts): 2N, at this machine's best matmul FLOP/s over the model's linear shapes
  (``bench/profile_study.py``, 512 rows), divided by the share of that floor a stage reaches;
- generated tokens: 2N FLOPs each at the same matmul rate, times the share of it an engine's decoding
  reaches (small batches of rows and the engine's own work cost most of it);
- a fixed cost per stage (process start, model load) and per RLOO step (engine weight push, monitoring).

The shares and lengths are assumptions, printed with the table: the defaults come from the committed
small study and issue 29's measurements on a 2-core EPYC (:data:`DEFAULT_SHARES`). ``--gflops G`` prices
at a given matmul rate instead of measuring one (a busy machine measures far less than it can do).
N is the model's matmul weights (its config, read without weights: a local folder or the hub cache).
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from core.cli import UserError
from evaluation.if_sets import IF_SET_FILES
from scripts.study_arms import arm_of
from scripts.study_checks import flag_value
from scripts.study_presets import Stage, registered_stage

# Shares of the floor (training, forwards) or of the decode ceiling (generation) a stage reaches, and fixed costs.
DEFAULT_SHARES = {"train": 0.5, "forward": 0.5, "decode_vllm": 0.45, "decode_hf": 0.1}
SHARE_SOURCES = ("train/forward 0.5: the small study's SFT (1,981 s) and DPO (1,453 s) at ~55-70% of their floors at 166 "
                 "GFLOP/s, rounded down; decode 0.45 with vLLM: issue 29, SmolLM2-135M fp32 272 tok/s on a 2-core EPYC "
                 "whose fp32 matmul does 166 GFLOP/s (0.44 of 166e9 / 2N tokens/s); 0.1 with hf generate (4.25x slower)")
STAGE_START_S = 20.0  # python start, imports, model load: the profile's "process start" + model_load, SmolLM2 on 2 cores
RLOO_STEP_FIXED_S = 80.0  # per RLOO step beyond its arithmetic (weight push, monitoring): the small study measured ~100 s a step, ~20 s of it priced here
# Token lengths (SmolLM2's tokenizer, chat template): assumptions, printed.
LENGTHS = {"alpaca_example": 200, "alpaca_prompt": 60, "if_prompt": 110, "answer_share": 0.6}
LENGTH_SOURCES = ("an Alpaca example with the chat template ~200 tokens (prompt ~60); a constrained IF prompt ~110; answers "
                  "fill 60% of their max_new_tokens on average (the small study cut 39-57% at 256; the base model "
                  "ran to 1,024 on 93 of 150 IFEval prompts)")
IFBENCH_PROMPTS, IFEVAL_PROMPTS = 300, 541


@dataclass
class Work:
    """One stage's counted work."""

    stage: str
    trained: float = 0.0  # tokens through forward + backward
    forwarded: float = 0.0  # tokens through a forward only
    generated: float = 0.0  # tokens decoded
    fixed_s: float = STAGE_START_S
    notes: list[str] = field(default_factory=list)


def number(command: Sequence[str], flag: str, default: float) -> float:
    value = flag_value(command, flag)
    return float(value) if value not in (None, "none") else default


def answer(max_new: float) -> float:
    return max_new * LENGTHS["answer_share"]


def training_work(stage: Stage, matched: dict[str, float]) -> Work:
    """A training run's tokens, from its steps and batch (the control: its DPO run's trained tokens)."""
    command, kind = stage.command, registered_stage(stage.name)
    work = Work(stage.name)
    steps = number(command, "--max_steps", 0)
    batch = number(command, "--per_device_train_batch_size", 4) * number(command, "--gradient_accumulation_steps", 1)
    evals = 1 + (steps // number(command, "--eval_steps", 100) if steps else 1)
    held_out = number(command, "--max_eval_samples", 80)
    if kind == "sft":
        match = flag_value(command, "--match_tokens_of")
        if match:
            work.trained = matched.get(match, 0.0)
            steps = work.trained / (batch * LENGTHS["alpaca_example"])
            evals = 1 + steps // number(command, "--eval_steps", 100)
            work.notes.append(f"{work.trained:,.0f} tokens: {match}'s")
        else:
            work.trained = steps * batch * LENGTHS["alpaca_example"]
        work.forwarded = evals * held_out * LENGTHS["alpaca_example"]
    elif kind in ("dpo", "reward"):
        pair = 2 * (LENGTHS["if_prompt"] + answer(256))  # chosen + rejected, judged pairs sampled at 256 new tokens
        work.trained = steps * batch * pair
        # DPO: the reference's forward of every trained pair, and policy + reference over the held-out pairs per evaluation
        work.forwarded = (work.trained + 2 * evals * held_out * pair) if kind == "dpo" else evals * held_out * pair
        matched[stage.name] = work.trained
    elif kind == "rloo":
        new = answer(number(command, "--max_new_tokens", 128))
        completions = steps * batch
        scored = completions * (LENGTHS["if_prompt"] + new)
        work.trained = scored
        work.forwarded = scored * (2 if flag_value(command, "--reward_model_dir") else 1)  # reference (+ reward model)
        monitor = number(command, "--monitor_prompts", 16) * len(_values(command, "--monitor_files") or [""])
        work.generated = completions * new + evals * monitor * new
        work.fixed_s += steps * RLOO_STEP_FIXED_S
    return work


def _values(command: Sequence[str], flag: str) -> list[str]:
    if flag not in command:
        return []
    rest = command[command.index(flag) + 1:]
    return list(_until_flag(rest))


def _until_flag(words: Sequence[str]):
    for word in words:
        if word.startswith("--"):
            return
        yield word


def data_work(stage: Stage, counts: dict[str, float]) -> Work:
    """A data or evaluation step's tokens: sampling pairs, and the reports' answers."""
    command, work = stage.command, Work(stage.name)
    if stage.name in ("prepare", "if_prompts"):
        work.fixed_s = 10.0
    elif stage.name in ("dpo_pairs", "if_pairs"):
        prompts = number(command, "--num_pairs", 1000)
        samples = number(command, "--samples_per_prompt", 1)
        work.generated = prompts * samples * answer(number(command, "--max_new_tokens", 256))
        work.forwarded = prompts * LENGTHS["if_prompt"]
    elif stage.name in ("eval_sft", "report"):
        columns = 1 + len(_values(command, "--adapter_dir"))
        prompts = _benchmark_prompts(command, counts)
        per_column = prompts * answer(number(command, "--if_max_new_tokens", 256))
        per_column += number(command, "--num_examples", 8) * answer(number(command, "--max_new_tokens", 256))
        work.generated = columns * per_column
        work.forwarded = columns * number(command, "--max_eval_samples", 200) * LENGTHS["alpaca_example"]
        work.fixed_s = STAGE_START_S * columns  # a model load per column
        work.notes.append(f"{columns} columns x {prompts:,.0f} IF prompts")
    return work


def _benchmark_prompts(command: Sequence[str], counts: dict[str, float]) -> float:
    """IFEval (its file's lines where local), IFBench and the three IF validation sets, as the command limits them."""
    total = 0.0
    for name, default in (("ifeval", IFEVAL_PROMPTS), ("ifbench", IFBENCH_PROMPTS)):
        source = flag_value(command, f"--{name}")
        if source in (None, "none"):
            continue
        known = sum(1 for _ in Path(source).open(encoding="utf-8")) if Path(source).is_file() else default
        total += min(known, number(command, f"--{name}_limit", known))
    if flag_value(command, "--if_sets") not in (None, "none"):
        per_set = counts.get("if_val", 100)  # each IF validation file holds --num_val prompts
        total += len(IF_SET_FILES) * min(per_set, number(command, "--if_sets_limit", per_set))
    return total


def count_work(stages: Sequence[Stage]) -> list[Work]:
    """Every stage's work, in order (a control after the DPO run it matches)."""
    matched: dict[str, float] = {}
    counts = {"if_val": next((number(s.command, "--num_val", 100) for s in stages if s.name == "if_prompts"), 100)}
    return [training_work(s, matched) if s.run_config is not None else data_work(s, counts) for s in stages]


@dataclass(frozen=True)
class Rates:
    """What the machine does: matmul FLOP/s, the shares of it reached, N."""

    flop_per_s: float
    measured: bool  # False: given with --gflops
    shares: dict
    matmul_weights: int
    engine: str  # "vllm" or "hf": which decode share applies

    def seconds(self, work: Work) -> dict[str, float]:
        n = self.matmul_weights
        return {"train": work.trained * 4 * n / self.flop_per_s / self.shares["train"],
                "forward": work.forwarded * 2 * n / self.flop_per_s / self.shares["forward"],
                "generate": work.generated * 2 * n / self.flop_per_s / self.shares[f"decode_{self.engine}"],
                "fixed": work.fixed_s}


def estimate_table(stages: Sequence[Stage], rates: Rates) -> tuple[str, float]:
    """The table (per stage: tokens and seconds by kind, total) and the study's total seconds."""
    from bench.common import format_table

    rows, total = [], 0.0
    for work in count_work(stages):
        seconds = rates.seconds(work)
        stage_total = sum(seconds.values())
        total += stage_total
        rows.append([work.stage, _k(work.trained), _k(work.forwarded), _k(work.generated),
                     *(f"{seconds[kind]:,.0f}" for kind in ("train", "forward", "generate", "fixed")),
                     f"{stage_total:,.0f}", f"{stage_total / 3600:.2f}", "; ".join(work.notes)])
    rows.append(["total", "", "", "", "", "", "", "", f"{total:,.0f}", f"{total / 3600:.2f}", ""])
    headers = ["stage", "trained tok", "forward tok", "generated tok", "train s", "forward s", "generate s", "fixed s",
               "total s", "hours", "note"]
    return format_table(headers, rows), total


def _k(tokens: float) -> str:
    return f"{tokens / 1000:,.0f}k" if tokens else "-"


def assumptions(rates: Rates, model: str, shares_from: str) -> list[str]:
    return [f"model {model}: N = {rates.matmul_weights:,} matmul weights (4N FLOPs per trained token, 2N per forwarded one)",
            f"matmul: {rates.flop_per_s / 1e9:,.1f} GFLOP/s " + ("(this machine's best fp32 over the model's linear shapes, "
                                                                 "512 rows)" if rates.measured else "(given: --gflops)"),
            f"shares reached: {', '.join(f'{k} {v:.2f}' for k, v in rates.shares.items())} ({shares_from}); engine {rates.engine}",
            f"lengths: {LENGTH_SOURCES}",
            f"fixed: {STAGE_START_S:.0f} s a stage (and a model load per report column), {RLOO_STEP_FIXED_S:.0f} s an RLOO step",
            "the CPU is shared: a busy machine measures less than it can do, and every stage takes longer than this"]


def command_line(stage: Stage) -> str:
    return shlex.join(["python", "-m", *stage.command])


def measure_rates(model: str, engine: str, gflops: float | None = None) -> Rates:
    """This machine's matmul FLOP/s over the model's own linear shapes (its config only), or ``gflops`` given."""
    from bench.ceiling import matmul_parameters
    from bench.profile_study import measured_flop_per_s, meta_model

    meta = meta_model(model, Path.cwd())
    if meta is None:
        raise UserError(f"--estimate: no config for the model {model!r} here (a local folder, or the hub cache): "
                        "pass --model_name_or_path PATH")
    flop_per_s = gflops * 1e9 if gflops else measured_flop_per_s(meta, "fp32", 512)[0]
    return Rates(flop_per_s, not gflops, dict(DEFAULT_SHARES), sum(matmul_parameters(meta)), engine)


def print_estimate(stages: Sequence[Stage], model: str, preset: str, seeds: int, gflops: float | None = None,
                   log=print) -> float:
    """The study's cost, stage by stage, and what it assumes; returns the total seconds."""
    from core.engines import installed_vllm

    rates = measure_rates(model, "vllm" if installed_vllm() else "hf", gflops)
    table, total = estimate_table(stages, rates)
    arms = sorted({arm_of(s.name) for s in stages if arm_of(s.name) != s.name})
    log(f"estimated cost of the {preset} study ({len(stages)} stages; {seeds} seeds of {', '.join(arms) or 'no seeded arm'}): "
        f"{total / 3600:.1f} h on this machine")
    log(table)
    log("assumptions:")
    for line in assumptions(rates, model, SHARE_SOURCES):
        log(f"- {line}")
    return total
