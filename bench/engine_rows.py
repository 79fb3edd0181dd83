"""The vllm row of ``bench.bench_generate``: load apart, warm-up, timed passes, peak memory of vLLM's processes.

The engine is built as ``sft.eval_sft --engine vllm`` builds it (``core.engines.EnginePool`` on the
base model + the adapter dir), and fed the very prompt token ids the hf rows get.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Sequence

from bench.common import median


class ChildMemory:
    """Peak resident memory (MiB) of this process's children, summed, sampled every ``interval`` s (psutil)."""

    def __init__(self, interval: float = 0.25):
        self.interval, self.peak_mb = interval, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        me = psutil.Process(os.getpid())
        while not self._stop.is_set():
            total = 0
            for child in me.children(recursive=True):
                try:
                    total += child.memory_info().rss
                except psutil.Error:
                    continue
            self.peak_mb = max(self.peak_mb, total / 2**20)
            self._stop.wait(self.interval)

    def __enter__(self) -> "ChildMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def vllm_row(args, tokenizer, base_model: str, adapter_dir: str, prompt_ids: Sequence[Sequence[int]], stop_ids,
             reference) -> dict:
    """Load (timed apart), warm up, then ``args.repeats`` timed passes over every prompt; the median pass is reported."""
    import torch

    from core.engines import EnginePool, VLLMSettings, Weights, choose_engine
    from core.modeling import torch_dtype

    choice = choose_engine("vllm", torch.device(args.device))
    settings = VLLMSettings(memory_share=args.vllm_memory_share, adapters=args.vllm_adapters)
    times = []
    load_before = os.getloadavg()[0]
    with ChildMemory() as memory, EnginePool(choice, tokenizer=tokenizer, dtype=torch_dtype(args.precision),
                                             settings=settings, seed=args.seed, adapter_dirs=[adapter_dir]) as pool:
        started = time.perf_counter()
        engine = pool.engine_for(Weights(base_model, adapter_dir, "adapter"))
        load_seconds = time.perf_counter() - started
        engine.generate(prompt_ids[:2], max_new_tokens=4, stop_ids=stop_ids, show_progress=False)  # warm-up
        for repetition in range(args.repeats):
            started = time.perf_counter()
            generations = engine.generate(prompt_ids, max_new_tokens=args.max_new_tokens, stop_ids=stop_ids,
                                          show_progress=False)
            times.append(time.perf_counter() - started)
            tokens = sum(g.num_tokens for g in generations)
            print(f"  repetition {repetition + 1}, vllm: {times[-1]:6.2f} s, {tokens / times[-1]:8.1f} tokens/s", flush=True)
    tokens = sum(g.num_tokens for g in generations)
    seconds = median(times)
    return {"seconds": seconds, "all_seconds": times, "generated_tokens": tokens, "tokens_per_s": tokens / seconds,
            "load_seconds": load_seconds, "peak_memory_mb": memory.peak_mb, "memory_of": "vLLM engine processes",
            "stopped_with_eos": sum(g.stopped_with_eos for g in generations),
            "same_as_one_at_a_time": sum(a.token_ids == b.token_ids for a, b in zip(generations, reference)),
            "differences": [i for i, (a, b) in enumerate(zip(generations, reference)) if a.token_ids != b.token_ids],
            "load_1min_before": load_before,  # vLLM's own processes would count as "others": the load before it started
            "engine": pool.record()}
