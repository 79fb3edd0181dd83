"""core/phases.py: each second of a run charged to the innermost open phase (a fake clock: nothing is timed)."""
from __future__ import annotations

import pytest

from core.phases import EVALUATION, GENERATION, OTHER, TRAINING, PhaseClock


class FakeTime:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def test_nested_phases_charge_the_innermost_and_add_up_to_the_wall_time():
    now = FakeTime()
    clock = PhaseClock(now=now)
    now.advance(1)                      # before any phase: other
    with clock.phase(TRAINING):
        now.advance(2)
        with clock.phase(EVALUATION):
            now.advance(3)
            with clock.phase(GENERATION):
                now.advance(4)
            now.advance(5)
        now.advance(6)
    now.advance(7)                      # after: other
    report = clock.report()
    assert report["seconds"] == {TRAINING: 8, GENERATION: 4, EVALUATION: 8, OTHER: 8}
    assert report["wall_seconds"] == 28 and sum(report["seconds"].values()) == 28
    assert report["peak_rss_mb"] > 0


def test_a_phase_open_at_report_time_counts_up_to_now_and_repeats_add():
    now = FakeTime()
    clock = PhaseClock(started=now() - 1, now=now)
    for _ in range(3):
        with clock.phase(EVALUATION):
            now.advance(2)
    with clock.phase(TRAINING):
        now.advance(5)
        assert clock.report()["seconds"] == {TRAINING: 5, EVALUATION: 6, OTHER: 1}


def test_wrapped_methods_are_charged_and_return_and_raise_as_before():
    now = FakeTime()
    clock = PhaseClock(now=now)

    class Trainer:
        def evaluate(self, seconds):
            now.advance(seconds)
            return "metrics"

        def log(self, logs):
            raise ValueError(logs)

    trainer = Trainer()
    assert clock.wrap_trainer(trainer) == ["evaluate", "log"]  # methods it lacks are skipped
    assert trainer.evaluate(4) == "metrics"
    with pytest.raises(ValueError):
        trainer.log("boom")
    assert clock.report()["seconds"][EVALUATION] == 4
    assert not clock.wrap(trainer, "no_such_method", TRAINING)
