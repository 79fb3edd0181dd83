"""Thread count for CPU work that adapts to the CPUs actually free.

PyTorch starts one thread per core. When another process already keeps cores busy, those threads
contend with it (and with each other at every parallel region's barrier): a tiny-model training step
or a batch of sampling was seen to slow down ~100x, while one thread ran at full speed beside the
other process. So before an entry point starts, :func:`apply_thread_guard` counts the CPUs left free
by the 1-minute load average and uses at most that many threads, saying so in one line. An explicit
``OMP_NUM_THREADS`` (or ``--num_threads``, where a stage has it) always wins.
"""
from __future__ import annotations

import os
from typing import Optional


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a container's share), else every CPU."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def busy_cpus() -> float:
    """CPUs kept busy by running processes, from the 1-minute load average (0 where unknown)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def plan_threads(cpus: int, load: float, current: int, env: Optional[str]) -> tuple[int, Optional[str]]:
    """(threads to use, a note to print or None).

    ``env``: the user's OMP_NUM_THREADS (respected as set); ``current``: torch's thread count now.
    Free CPUs = cpus - load, rounded, at least 1; never more threads than torch would use anyway.
    """
    if env:
        return current, None
    free = max(1, min(cpus, int(cpus - load + 0.5)))
    if free >= current:
        return current, None
    return free, (f"note: {load:.1f} of {cpus} CPUs are busy with other processes: using {free} thread(s) instead "
                  f"of {current}, as contending threads slow training and sampling many times over "
                  f"(OMP_NUM_THREADS=N chooses the count)")


def apply_thread_guard(log=print) -> int:
    """Set torch's thread count from :func:`plan_threads`; returns the count in use."""
    import torch

    threads, note = plan_threads(available_cpus(), busy_cpus(), torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS"))
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    if note and os.environ.get("RANK", "0") == "0":  # once per launch
        log(note)
    return threads
