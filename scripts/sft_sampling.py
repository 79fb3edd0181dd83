"""Sampling from an SFT run for preference pairs: which prompts fit, and the engine that samples them.

Shared by the gold-vs-sample pairs (scripts/prepare_dpo_data.py) and the checker-judged pairs
(scripts/judged_pairs.py), so both draw prompts and sample the same way (vLLM where installed,
HF ``generate`` otherwise; core/engines.py).
"""
from __future__ import annotations

import argparse
import random
from typing import Sequence


def pick_fitting(candidates: list, prompt_ids: list[list[int]], limit: int, num_pairs: int,
                 seed: int) -> tuple[list[tuple[object, list[int]]], int]:
    """``num_pairs`` (example, prompt ids) drawn with ``seed`` among prompts of at most ``limit`` tokens; also how many were too long.

    A longer prompt would have the sample run past the length SFT trained on (and DPO would cut it).
    """
    fitting = [(example, ids) for example, ids in zip(candidates, prompt_ids) if len(ids) <= limit]
    return random.Random(seed).sample(fitting, min(num_pairs, len(fitting))), len(candidates) - len(fitting)


def sample_from_run(args: argparse.Namespace, run, choice, tokenizer, prompt_ids: Sequence[list[int]], stop_ids,
                    desc: str) -> tuple[list, str]:
    """One sample per entry of ``prompt_ids`` from the SFT run, with the sampling flags of ``args``.

    ``choice``: ``core.engines.choose_engine``'s answer, asked before any work (an unusable vLLM is a
    one-line error then). Returns (generations, engine name). vLLM seeds each prompt (``--seed`` + its
    index), so a prompt repeated K times gets K different samples.
    """
    import torch

    from core.engines import EnginePool, VLLMSettings, Weights
    from core.generation import SamplingSettings
    from core.modeling import resolve_precision, torch_dtype
    from core.policy import load_policy_for_sampling

    sampling = SamplingSettings(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    precision = resolve_precision(args.precision, torch.device(choice.device))  # as evaluation samples: bf16 where the CPU runs it fast
    print(f"sampling precision: {precision}")
    dtype = torch_dtype(precision)
    pool = EnginePool(choice, tokenizer=tokenizer, dtype=dtype,
                      model_loader=lambda: load_policy_for_sampling(args.from_sft_model, dtype=dtype)[0], batch_size=args.batch_size,
                      settings=VLLMSettings(memory_share=args.vllm_memory_share, max_model_len=args.vllm_max_model_len),
                      seed=args.seed, trust_remote_code=run.trust_remote_code, adapter_dirs=[str(run.run_dir)])
    print(pool.choice.line())
    with pool:
        engine = pool.engine_for(Weights(run.base_model, str(run.run_dir), "sft"))
        samples = engine.generate(list(prompt_ids), max_new_tokens=args.max_new_tokens, sampling=sampling,
                                  desc=desc, stop_ids=stop_ids)
    return samples, pool.choice.name
