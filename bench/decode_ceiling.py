"""How fast this machine could generate with a model at best: the matmul-only ceiling of a decode step.

A decode step multiplies one new token per running row through every linear layer of the model and
the LM head. Timing exactly those matrix products with plain ``torch.nn.functional.linear`` (this
machine's BLAS, the bench's threads and precision, the model's own weight shapes) and nothing else
(no attention, norms, sampling, cache, Python) gives a rate no engine can beat on this hardware:

    tokens/s ceiling at M rows = M / (sum over the model's linear layers of the time of one [M, in] x [in, out])

``bench.bench_generate`` prints it beside each engine's measured rate, so its table says how close
each engine is to the hardware, not only how far one is ahead of the other.
"""
from __future__ import annotations

import time
from collections import Counter


def linear_shapes(model) -> Counter:
    """(in_features, out_features) -> how many of the model's linear layers have it; a LoRA adapter's own small
    layers are left out (the engines merge them or add little), the LM head is in."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    shapes: Counter = Counter()
    for name, module in base.named_modules():
        if isinstance(module, torch.nn.Linear) and "lora_" not in name:
            shapes[(module.in_features, module.out_features)] += 1
    return shapes


def _seconds(fn, repeats: int, rounds: int = 10) -> float:
    """The fastest of ``rounds`` rounds of ``repeats`` calls, per call: a ceiling is the best the machine did
    (other work and frequency dips only ever slow a round down; measured spread between single rounds: ~30%)."""
    for _ in range(2):  # warm-up: allocator, BLAS packing buffers
        fn()
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - started) / repeats)
    return best


def decode_ceiling(shapes: Counter, rows: int, *, device: str = "cpu", dtype=None, repeats: int = 10) -> dict:
    """The matmul-only time of one decode step at ``rows`` running rows, and the tokens/s and FLOP/s it allows."""
    import torch

    dtype = dtype or torch.float32
    torch.manual_seed(0)
    step = 0.0
    for (fan_in, fan_out), count in shapes.items():
        x = torch.randn(rows, fan_in, device=device, dtype=dtype)
        weight = torch.randn(fan_out, fan_in, device=device, dtype=dtype)

        def one():
            torch.nn.functional.linear(x, weight)
            if device == "cuda":
                torch.cuda.synchronize()

        step += count * _seconds(one, repeats)
    flops = 2 * rows * sum(i * o * c for (i, o), c in shapes.items())
    return {"rows": rows, "step_seconds": step, "tokens_per_s": rows / step, "gflop_per_s": flops / step / 1e9}
