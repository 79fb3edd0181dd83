"""What this machine's CPU offers for precision: bf16 instructions, and whether bf16 matmul is faster here.

PyTorch runs bf16 on any x86 CPU, but without bf16 instructions it converts every element through
fp32 in software: on a Zen-3 EPYC (no AVX512_BF16) bf16 generation ran 5x slower than fp32, while
on a Zen-4 EPYC with AVX512_BF16 a 2048x576 by 576x1536 matmul ran 408 GFLOP/s in bf16 against 166
in fp32. So ``auto`` on the CPU asks two things: does the CPU say it has AVX512_BF16 or AMX-BF16
(Linux's /proc/cpuinfo flags; elsewhere, macOS and ARM included, no claim is made), and does a quick
matmul of a small model's shape (well under half a second) run faster in bf16 than in fp32 here?
Both yes: bf16. Otherwise fp32. The decision is measured once per process.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path

# /proc/cpuinfo flag -> the name a user finds in a CPU's data sheet (AMX first: the faster one).
BF16_FLAGS = {"amx_bf16": "AMX-BF16", "avx512_bf16": "AVX512_BF16"}
# Rows x hidden by hidden x MLP width of a 135M model (SmolLM2): the matmuls training and decoding spend on.
PROBE_SHAPE = (1024, 576, 1536)


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The x86 feature flags the Linux kernel lists for the CPU; empty where there is no such list."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "flags":  # x86 only: ARM lists "Features", which makes no bf16 claim here
            return frozenset(value.split())
    return frozenset()


def cpu_bf16_feature(flags: frozenset[str] | None = None) -> str | None:
    """The CPU's bf16 instructions by their data-sheet name (AMX-BF16, AVX512_BF16), or None."""
    flags = cpu_flags() if flags is None else flags
    return next((name for flag, name in BF16_FLAGS.items() if flag in flags), None)


def missing_bf16_message() -> str:
    names = " or ".join(sorted(BF16_FLAGS.values()))
    return f"bf16 on the CPU needs {names}, which this CPU lacks (bf16 would run in slow software): use --precision fp32"


def matmul_gflops(dtypes: dict, shape: tuple[int, int, int] = PROBE_SHAPE, rounds: int = 5,
                  budget_s: float = 0.5) -> dict[str, float]:
    """GFLOP/s of an [m, k] x [k, n] matmul in each of ``dtypes`` (name -> torch dtype), the fastest of
    ``rounds`` after one warm-up (fewer once ``budget_s`` is spent: a busy CPU makes every round slow).
    The dtypes take turns round by round, so a burst of other work on a shared CPU slows both alike
    instead of deciding the comparison; the best round is what the machine can do."""
    import torch

    m, k, n = shape
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=generator), torch.randn(k, n, generator=generator)
    operands = {name: (a.to(dtype), b.to(dtype)) for name, dtype in dtypes.items()}
    best = dict.fromkeys(operands, float("inf"))
    began = time.perf_counter()
    for round_ in range(rounds + 1):
        for name, (x, y) in operands.items():
            started = time.perf_counter()
            torch.mm(x, y)
            if round_:  # round 0 warms up the allocator and BLAS packing buffers
                best[name] = min(best[name], time.perf_counter() - started)
        if round_ and time.perf_counter() - began > budget_s:
            break
    return {name: 2 * m * k * n / max(seconds, 1e-9) / 1e9 for name, seconds in best.items()}


@dataclass(frozen=True)
class CpuPrecision:
    """``auto``'s choice on this CPU and why: the bf16 feature found and the measured matmul rates."""

    precision: str
    feature: str | None
    gflops: dict[str, float] = field(default_factory=dict)  # fp32 / bf16 -> measured GFLOP/s

    def reason(self) -> str:
        if self.feature is None:
            return f"auto: CPU has no {' or '.join(sorted(BF16_FLAGS.values()))}"
        return (f"auto: CPU has {self.feature}; matmul {self.gflops['bf16']:.0f} vs {self.gflops['fp32']:.0f} "
                f"GFLOP/s fp32")

    def line(self) -> str:
        return f"precision: {self.precision} ({self.reason()})"


def choose_cpu_precision(feature: str | None, measure=matmul_gflops) -> CpuPrecision:
    """bf16 where the CPU has bf16 instructions and its bf16 matmul measures faster than fp32; else fp32."""
    import torch

    if feature is None:
        return CpuPrecision("fp32", None)
    gflops = measure({"fp32": torch.float32, "bf16": torch.bfloat16})
    return CpuPrecision("bf16" if gflops["bf16"] > gflops["fp32"] else "fp32", feature, gflops)


@functools.lru_cache(maxsize=1)
def auto_cpu_precision() -> CpuPrecision:
    """This process's ``auto`` choice on the CPU: measured on first need, then the same for every stage and engine."""
    return choose_cpu_precision(cpu_bf16_feature())
