"""Thread count for CPU work that adapts to the CPUs other processes are using now.

PyTorch starts one thread per core. When another process already keeps cores busy, those threads
contend with it (and with each other at every parallel region's barrier): a tiny-model training step
or a batch of sampling was seen to slow down ~100x, while one thread ran at full speed beside the
other process. So once an entry point has parsed its arguments and imported torch,
:func:`apply_thread_guard` measures how much CPU time *other* processes used while this one started
(at least :data:`WINDOW_S` seconds, the CPUs' busy time in ``/proc/stat`` minus this process tree's
own) and uses at most the CPUs they left free, saying so in one line.

What is measured, and why:

- CPU time actually used over the last seconds, not the load average: a 1-minute load average still
  holds the stage that finished a moment ago, and counts runnable threads rather than busy CPUs.
- This process tree is not "other": the process itself, its descendants and its ancestors (the shell,
  ``run_study`` waiting for its stage, a bench driver) are left out.
- Only the CPUs this process may run on (its affinity mask) are counted.

An explicit ``OMP_NUM_THREADS`` always wins. ``scripts/run_study.py`` measures once for the whole study
and passes the free CPUs to its stages in ``THREAD_GUARD_FREE_CPUS``, so a stage neither measures
again nor prints the note a second time. Linux only: where ``/proc`` is missing (macOS) the guard
does nothing and torch keeps its own count; set ``OMP_NUM_THREADS`` there on a busy machine.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

# Shortest window measured: ~30 clock ticks per CPU at the usual 100 Hz, enough to tell a busy
# process (30 ticks) from an idle one (0-2). An entry point measures over its own start-up (parsing,
# importing torch: several seconds), so it rarely waits for this.
WINDOW_S = 0.3
MAX_AGE_S = 10.0  # a start sample older than this says little about now: measure afresh
# Others "hold" a CPU once they use at least half of one: a thread that loses half its core to
# another process stalls every parallel region's barrier for the threads that still run.
HELD_SHARE = 0.5
FREE_CPUS_ENV = "THREAD_GUARD_FREE_CPUS"  # set by run_study for its stages: measured once, used by all

_start_sample: Optional["CpuSample"] = None


@dataclass(frozen=True)
class CpuSample:
    """A reading of the CPU clock ticks at one moment (``/proc``; ticks are 1/100 s on Linux)."""

    when: float  # time.monotonic()
    busy: int  # ticks the counted CPUs spent running anything, since boot
    total: int  # all ticks of the counted CPUs (busy, idle, iowait, steal), since boot
    cpus: int  # how many CPUs were counted
    own: dict[int, int]  # pid -> ticks of this process tree (self, descendants, ancestors)


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a container's share), else every CPU."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _affinity() -> Optional[set[int]]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def _cpu_ticks(proc: Path, allowed: Optional[set[int]]) -> Optional[tuple[int, int, int]]:
    """(busy, total, cpus counted) from the per-CPU lines of ``/proc/stat``; None off Linux."""
    try:
        lines = (proc / "stat").read_text().splitlines()
    except OSError:
        return None
    busy = total = counted = 0
    for line in lines:
        name, *values = line.split()
        if not (name.startswith("cpu") and name[3:].isdigit()):
            continue
        if allowed is not None and int(name[3:]) not in allowed:
            continue
        # user nice system idle iowait irq softirq steal (guest time is already inside user)
        ticks = [int(v) for v in values[:8]]
        busy += ticks[0] + ticks[1] + ticks[2] + ticks[5] + ticks[6]
        total += sum(ticks)
        counted += 1
    return (busy, total, counted) if counted else None


def _process_table(proc: Path) -> dict[int, tuple[int, int, int]]:
    """pid -> (parent pid, own CPU ticks, CPU ticks of its waited-for children) for every process."""
    table = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:  # exited meanwhile, or not ours to read
            continue
        fields = text.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        table[int(entry.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14]))
    return table


def own_tree_ticks(table: dict[int, tuple[int, int, int]], pid: int) -> dict[int, int]:
    """CPU ticks of ``pid``'s tree: itself and its descendants (with their finished children's time,
    so a child that exits mid-window still counts), and its ancestors (their own time only: a
    sibling that exits is not ours)."""
    children: dict[int, list[int]] = {}
    for child, (parent, _, _) in table.items():
        children.setdefault(parent, []).append(child)
    ticks: dict[int, int] = {}
    stack = [pid]
    while stack:
        current = stack.pop()
        if current in table and current not in ticks:
            ticks[current] = table[current][1] + table[current][2]
            stack.extend(children.get(current, ()))
    parent = table.get(pid, (0, 0, 0))[0]
    while parent in table and parent not in ticks:
        ticks[parent] = table[parent][1]
        parent = table[parent][0]
    return ticks


def sample(proc: Path = Path("/proc")) -> Optional[CpuSample]:
    """Read the CPU ticks now; None where ``/proc`` is missing (macOS, Windows)."""
    when = time.monotonic()
    cpu = _cpu_ticks(proc, _affinity())
    if cpu is None:
        return None
    try:
        own = own_tree_ticks(_process_table(proc), os.getpid())
    except OSError:
        return None
    return CpuSample(when, cpu[0], cpu[1], cpu[2], own)


def others_busy(before: CpuSample, after: CpuSample) -> float:
    """CPUs' worth of time other processes used between two samples (1.0 = one CPU kept busy)."""
    total = after.total - before.total
    if total <= 0:
        return 0.0
    own = sum(after.own.values()) - sum(before.own.values())  # a descendant that exited moved into its parent's count
    return max(0.0, (after.busy - before.busy - own) / total * after.cpus)


def remember_start() -> None:
    """Sample now, at the start of an entry point (core.cli.run_cli), so the guard can later measure
    the whole start-up instead of waiting for a window of its own."""
    global _start_sample
    _start_sample = sample()


def measure_others(window_s: float = WINDOW_S) -> Optional[tuple[float, float]]:
    """(CPUs' worth of time other processes used, seconds measured), since the remembered start if
    it is recent, else over a fresh window of ``window_s``; None where it cannot be measured."""
    start = _start_sample
    if start is None or time.monotonic() - start.when > MAX_AGE_S:
        start = sample()
    if start is None:
        return None
    time.sleep(max(0.0, window_s - (time.monotonic() - start.when)))
    end = sample()
    if end is None:
        return None
    return others_busy(start, end), end.when - start.when


def plan_threads(cpus: int, others: Optional[float], current: int, env: Optional[str],
                 window_s: float = 0.0) -> tuple[int, Optional[str]]:
    """(threads to use, a note to print or None).

    ``others``: CPUs' worth of time other processes used over the last ``window_s`` seconds (None:
    not measured); ``env``: the user's OMP_NUM_THREADS (respected as set); ``current``: torch's thread
    count now. Others hold a CPU from :data:`HELD_SHARE` of one up; never fewer than one thread,
    never more than torch would use anyway.
    """
    if env or others is None:
        return current, None
    held = int(others + 1 - HELD_SHARE)
    free = max(1, min(cpus, cpus - held))
    if free >= current:
        return current, None
    return free, thread_note(others, cpus, window_s, f"using {free} thread(s) instead of {current}")


def thread_note(others: float, cpus: int, window_s: float, decision: str) -> str:
    return (f"note: other processes used {others:.1f} of {cpus} CPUs over the last {window_s:.1f} s: {decision}, as "
            f"contending threads slow training and sampling many times over (OMP_NUM_THREADS=N chooses the count)")


def plan_for_stages(log=print) -> dict[str, str]:
    """For a driver that runs stages one after another (scripts/run_study.py): measure once, say the
    note once, and return the environment that hands the free CPUs to every stage (empty where
    ``OMP_NUM_THREADS`` is set or nothing can be measured)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return {}
    measured = measure_others()
    if measured is None:
        return {}
    cpus = available_cpus()
    free, note = plan_threads(cpus, measured[0], cpus, None, measured[1])
    if note:
        log(thread_note(measured[0], cpus, measured[1], f"every stage uses at most {free} thread(s)"))
    return {FREE_CPUS_ENV: str(free)}


def apply_thread_guard(log=print) -> int:
    """Set torch's thread count from :func:`plan_threads`; returns the count in use.

    Call it once torch is imported and the arguments are parsed (so ``--help`` never waits for it).
    """
    import torch

    current = torch.get_num_threads()
    threads, note = current, None
    if os.environ.get("OMP_NUM_THREADS"):
        pass  # the user's choice
    elif os.environ.get(FREE_CPUS_ENV, "").isdigit():  # run_study measured (and said so) for the whole study
        threads = max(1, min(current, int(os.environ[FREE_CPUS_ENV])))
    elif current > 1:  # with one thread there is nothing to take away, and nothing to wait for
        measured = measure_others()
        others, window = measured if measured else (None, 0.0)
        threads, note = plan_threads(available_cpus(), others, current, None, window)
    if threads != current:
        torch.set_num_threads(threads)
    if note and os.environ.get("RANK", "0") == "0":  # once per launch
        log(note)
    return threads
