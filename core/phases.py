"""Where a run's wall time went: a phase clock every stage run keeps, written into its ``metrics.json``.

Each second of the run is charged to exactly one phase, the innermost one open at the time
(an evaluation inside training is evaluation, not training; a generation inside an evaluation
is generation), so the phases add up to the run's wall time, with ``other`` for the time outside
any phase (imports, the config, the device plan, the plots and model card after the metrics)::

    clock = PhaseClock(started)
    with clock.phase(MODEL_LOAD):
        model = load()
    clock.wrap(trainer, "evaluate", EVALUATION)      # every call of trainer.evaluate is evaluation
    metrics["phases"] = clock.report()

``bench/profile_study.py`` reads these and puts each phase beside its floor. The clock reads
``time.perf_counter`` (or the ``now`` it is given) at phase boundaries only, and the wrapped methods
run unchanged: no arithmetic of the run depends on it. Phases are this session's (a resumed run's
report covers the resumed session).
"""
from __future__ import annotations

import functools
import resource
import sys
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

# The phases a stage run is split into (bench/profile_study.py knows which tokens each one processes)
DATA = "data"                      # the tokenizer and the stage's data (tokenising, caches)
MODEL_LOAD = "model_load"          # base model, adapters, the reference / reward models
TRAINER_BUILD = "trainer_build"    # the Trainer (TRL prepares its datasets here)
ENGINE_START = "engine_start"      # a generation engine started on the policy's weights
TRAINING = "training_compute"      # forward, backward, optimizer: what is left of training after the phases below
REFERENCE = "reference_forwards"   # reference log-probs (DPO; RLOO's rollout scoring around its reward)
REWARD = "reward_forwards"         # RLOO: the reward (model forwards or the checker)
GENERATION = "generation_decode"   # sampling completions (RLOO rollouts, monitor samples)
WEIGHT_PUSH = "weight_push"        # the policy's merged weights pushed to the engine
EVALUATION = "evaluation"          # held-out evaluation (its generation and reference forwards are their own)
CHECKPOINT = "checkpoint"          # checkpoint saving
LOGGING = "logging"                # the Trainer's log calls (metrics gathering, printing, TensorBoard)
OUTPUTS = "outputs"                # the final model, trainer state and metrics.json
OTHER = "other"                    # wall time outside every phase

PHASE_ORDER = (DATA, MODEL_LOAD, TRAINER_BUILD, ENGINE_START, TRAINING, REFERENCE, REWARD, GENERATION,
               WEIGHT_PUSH, EVALUATION, CHECKPOINT, LOGGING, OUTPUTS, OTHER)

# Trainer methods and the phase their calls are charged to; a method a trainer does not have is skipped
TRAINER_PHASES = (
    ("evaluate", EVALUATION),
    ("_save_checkpoint", CHECKPOINT),       # a private Trainer hook, pinned by tests/test_trainer_hooks.py
    ("log", LOGGING),
    ("compute_ref_log_probs", REFERENCE),   # TRL DPOTrainer: the reference's log-probs of a batch
    ("_generate_and_score_completions", REFERENCE),  # TRL RLOOTrainer: what is not generation or reward in a rollout
    ("_generate_single_turn", GENERATION),  # TRL RLOOTrainer: sampling (hf or the vllm rollouts)
    ("_calculate_rewards", REWARD),         # TRL RLOOTrainer: reward functions / reward model
)


def peak_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    """Peak resident set size so far, MiB (``RUSAGE_CHILDREN``: the largest child process waited for)."""
    rss = resource.getrusage(who).ru_maxrss
    return round((rss if sys.platform == "darwin" else rss * 1024) / 2**20, 1)  # Linux: KiB, macOS: bytes


class PhaseClock:
    """Wall time per phase, each second charged to the innermost open phase."""

    def __init__(self, started: float | None = None, now: Callable[[], float] = time.perf_counter):
        self._now = now
        self.started = now() if started is None else started
        self.seconds: dict[str, float] = {}
        self._open: list[list[Any]] = []  # [name, since]: the innermost last

    def _charge_innermost(self, until: float) -> None:
        if self._open:
            name, since = self._open[-1]
            self.seconds[name] = self.seconds.get(name, 0.0) + (until - since)
            self._open[-1][1] = until

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        entered = self._now()
        self._charge_innermost(entered)
        self._open.append([name, entered])
        try:
            yield
        finally:
            left = self._now()
            self._charge_innermost(left)
            self._open.pop()
            if self._open:  # the enclosing phase resumes now
                self._open[-1][1] = left

    def wrap(self, owner: Any, method: str, name: str) -> bool:
        """Charge every call of ``owner.method`` to phase ``name`` (an instance attribute over the bound
        method, so the owner's own calls through ``self`` are caught). False when there is no such method."""
        original = getattr(owner, method, None)
        if not callable(original):
            return False

        @functools.wraps(original)
        def timed(*args, **kwargs):
            with self.phase(name):
                return original(*args, **kwargs)

        setattr(owner, method, timed)
        return True

    def wrap_trainer(self, trainer) -> list[str]:
        """The phases of :data:`TRAINER_PHASES` on ``trainer``'s methods; returns the methods wrapped."""
        return [method for method, name in TRAINER_PHASES if self.wrap(trainer, method, name)]

    def report(self) -> dict[str, Any]:
        """``metrics.json``'s ``phases``: seconds per phase (open ones up to now), ``other``, the wall time
        and peak RSS of this process and of its largest finished child (an engine's worker, say)."""
        now = self._now()
        seconds = dict(self.seconds)
        if self._open:
            name, since = self._open[-1]
            seconds[name] = seconds.get(name, 0.0) + (now - since)
        wall = now - self.started
        seconds[OTHER] = max(0.0, wall - sum(seconds.values()))
        ordered = {name: round(seconds[name], 3) for name in PHASE_ORDER if name in seconds}
        ordered.update({name: round(value, 3) for name, value in seconds.items() if name not in ordered})
        return {"seconds": ordered, "wall_seconds": round(wall, 3), "peak_rss_mb": peak_rss_mb(),
                "peak_rss_children_mb": peak_rss_mb(resource.RUSAGE_CHILDREN),
                "note": "wall time per phase, each second charged to the innermost phase open (core/phases.py)"}
