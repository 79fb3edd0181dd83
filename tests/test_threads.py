"""The thread guard (core/threads.py): threads follow the CPUs other processes use *now*.

Exact assertions go through the pure pieces (the plan, the tick arithmetic, the process tree) with
injected numbers; the real /proc tests only assert what holds on any machine, however loaded: a busy
process of ours is counted as ours, one outside our tree as someone else's.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from core import threads
from core.threads import CpuSample, own_tree_ticks, others_busy, plan_threads

LINUX = Path("/proc/stat").is_file()
BUSY_LOOP = "import time\nend = time.time() + 60\nwhile time.time() < end:\n    pass\n"


# --------------------------------------------------------------------------- the plan, with injected measurements


def test_an_idle_machine_keeps_every_thread_and_says_nothing():
    assert plan_threads(cpus=2, others=0.1, current=2, env=None, window_s=0.3) == (2, None)
    assert plan_threads(cpus=2, others=0.4, current=2, env=None, window_s=0.3) == (2, None)  # under half a CPU


def test_another_process_on_a_cpu_costs_one_thread_and_the_note_says_what_was_measured():
    threads_, note = plan_threads(cpus=2, others=1.4, current=2, env=None, window_s=0.3)
    assert threads_ == 1
    assert note.startswith("note: other processes used 1.4 of 2 CPUs over the last 0.3 s: using 1 thread(s) instead of 2")
    assert "OMP_NUM_THREADS=N" in note
    assert plan_threads(cpus=2, others=0.6, current=2, env=None, window_s=1.0)[0] == 1  # half a CPU counts as held


def test_never_below_one_thread_nor_above_what_torch_chose():
    assert plan_threads(cpus=4, others=9.0, current=4, env=None)[0] == 1
    assert plan_threads(cpus=8, others=1.0, current=4, env=None) == (4, None)  # 7 free: torch's 4 stay


def test_omp_num_threads_wins_and_no_measurement_changes_nothing():
    assert plan_threads(cpus=2, others=1.4, current=2, env="2") == (2, None)
    assert plan_threads(cpus=2, others=None, current=2, env=None) == (2, None)  # macOS: nothing measured


def _sample(busy: int, total: int, own: dict[int, int], cpus: int = 2) -> CpuSample:
    return CpuSample(when=0.0, busy=busy, total=total, cpus=cpus, own=own)


def test_others_are_the_busy_ticks_minus_this_process_tree():
    before = _sample(busy=1000, total=2000, own={10: 50})
    after = _sample(busy=1180, total=2200, own={10: 130})  # 180 busy ticks of 200, 80 of them ours
    assert others_busy(before, after) == pytest.approx((180 - 80) / 200 * 2)


def test_a_child_that_exits_mid_window_still_counts_as_ours():
    # pid 11 (our child) had 30 ticks, ran 20 more and exited: its 50 moved into our waited-for children's ticks.
    before = _sample(busy=0, total=1000, own={10: 100, 11: 30})
    after = _sample(busy=60, total=1200, own={10: 100 + 10 + 50})  # we ran 10 ticks ourselves
    assert others_busy(before, after) == pytest.approx((60 - 30) / 200 * 2)


def test_the_tree_is_self_descendants_and_ancestors_never_siblings_or_strangers():
    table = {  # pid: (parent, own ticks, waited-for children's ticks)
        1: (0, 5, 900), 50: (1, 7, 800),  # init, the shell (or run_study): ancestors
        100: (50, 40, 3),  # this process
        200: (100, 60, 1), 300: (200, 9, 0),  # a child, a grandchild
        150: (50, 500, 0),  # a sibling: another command of the same shell
        400: (1, 700, 0),  # another user's job
    }
    ticks = own_tree_ticks(table, 100)
    assert set(ticks) == {100, 200, 300, 50, 1}
    assert ticks[100] == 43 and ticks[200] == 61  # ours: their own time and their finished children's
    assert ticks[50] == 7 and ticks[1] == 5  # ancestors: their own time only (a sibling's exit is not ours)


# --------------------------------------------------------------------------- apply_thread_guard, measurement injected


@pytest.fixture()
def two_threads(monkeypatch):
    """torch at 2 threads on a 2-CPU machine with no user choice; back to the suite's 1 thread after."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv(threads.FREE_CPUS_ENV, raising=False)
    monkeypatch.setattr(threads, "available_cpus", lambda: 2)
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(1)


def test_the_guard_keeps_every_thread_when_others_are_idle(two_threads, monkeypatch):
    monkeypatch.setattr(threads, "measure_others", lambda: (0.05, 2.8))
    said = []
    assert threads.apply_thread_guard(log=said.append) == 2
    assert torch.get_num_threads() == 2 and said == []


def test_the_guard_drops_a_thread_and_says_why_when_another_process_holds_a_cpu(two_threads, monkeypatch):
    monkeypatch.setattr(threads, "measure_others", lambda: (1.02, 2.8))
    said = []
    assert threads.apply_thread_guard(log=said.append) == 1
    assert torch.get_num_threads() == 1
    assert said and said[0].startswith("note: other processes used 1.0 of 2 CPUs over the last 2.8 s: using 1 thread(s)")


def test_the_guard_does_not_measure_where_the_user_or_run_study_decided(two_threads, monkeypatch):
    monkeypatch.setattr(threads, "measure_others", lambda: pytest.fail("measured although the count was given"))
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads.apply_thread_guard(log=lambda line: pytest.fail(line)) == 2
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setenv(threads.FREE_CPUS_ENV, "1")  # run_study measured once and said so
    assert threads.apply_thread_guard(log=lambda line: pytest.fail(line)) == 1 and torch.get_num_threads() == 1


def test_run_study_measures_once_and_hands_the_free_cpus_to_its_stages(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "available_cpus", lambda: 2)
    monkeypatch.setattr(threads, "measure_others", lambda: (1.3, 3.0))
    said = []
    assert threads.plan_for_stages(log=said.append) == {threads.FREE_CPUS_ENV: "1"}
    assert len(said) == 1 and "used 1.3 of 2 CPUs" in said[0] and "every stage uses at most 1 thread(s)" in said[0]
    monkeypatch.setattr(threads, "measure_others", lambda: (0.0, 3.0))
    assert threads.plan_for_stages(log=lambda line: pytest.fail(line)) == {threads.FREE_CPUS_ENV: "2"}
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads.plan_for_stages(log=lambda line: pytest.fail(line)) == {}


# --------------------------------------------------------------------------- real processes (Linux /proc)


def _start_outside_our_tree() -> int:
    """A busy loop whose parent exits at once: it is reparented away from this process tree."""
    launcher = ("import subprocess, sys\n"
                f"p = subprocess.Popen([sys.executable, '-c', {BUSY_LOOP!r}], start_new_session=True,\n"
                "                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
                "print(p.pid)\n")
    return int(subprocess.run([sys.executable, "-c", launcher], capture_output=True, text=True, check=True).stdout)


def _stop(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.skipif(not LINUX, reason="/proc is Linux's")
def test_a_busy_child_is_ours_not_another_process(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", BUSY_LOOP])
    try:
        time.sleep(0.2)
        before = threads.sample()
        time.sleep(0.5)
        after = threads.sample()
    finally:
        child.kill()
        child.wait()
    assert child.pid in before.own and child.pid in after.own
    ours = sum(after.own.values()) - sum(before.own.values())
    assert ours >= 10  # >= 0.1 s of CPU in 0.5 s: the busy child, left out of "others"


@pytest.mark.skipif(not LINUX, reason="/proc is Linux's")
def test_the_parent_is_ours_too():
    code = "import os\nfrom core.threads import sample\ns = sample()\nprint(os.getppid() in s.own, os.getpid() in s.own)\n"
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo, check=True).stdout
    assert out.split() == ["True", "True"]


@pytest.mark.skipif(not LINUX or threads.available_cpus() < 2, reason="needs /proc and two CPUs")
def test_a_real_competing_process_gets_the_note_and_a_thread_less(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv(threads.FREE_CPUS_ENV, raising=False)
    monkeypatch.setattr(threads, "_start_sample", None)  # measure a fresh window, now
    cpus = threads.available_cpus()
    pid = _start_outside_our_tree()
    try:
        assert pid not in threads.sample().own
        time.sleep(0.2)  # past its interpreter's start
        torch.set_num_threads(cpus)
        said = []
        used = threads.apply_thread_guard(log=said.append)
    finally:
        _stop(pid)
        torch.set_num_threads(1)
    assert used <= cpus - 1  # the busy loop holds a CPU whatever else runs
    assert said and "other processes used" in said[0] and f"of {cpus} CPUs" in said[0]
