"""RLOO's rollouts through the vllm engine: the policy's weights pushed to it whenever the step changed.

Why not TRL's own ``use_vllm`` (colocate mode; judged from its code, not tried): TRL 1.16 starts vLLM
with ``distributed_executor_backend="external_launcher"`` and writes weights through
``llm.llm_engine.model_executor.driver_worker``, i.e. it expects the engine inside the training
process under torch.distributed; vLLM's CPU backend runs its worker in a process of its own, pinned
to a core (see docs/engines.md). So RLOO keeps TRL's trainer and replaces only its
sampling step (``_generate_single_turn``) with :class:`VLLMRollouts`:

- the engine starts on a plain copy of the policy (base + folded token rows + LoRA merged), written
  once to a temporary folder;
- before sampling at a new optimizer step, every weight of the policy with its LoRA merged in (computed
  beside the weights, ``core.vllm_engine.merged_weights``) replaces the engine's, in place;
- each completion gets its own seed from (run seed, step, call, index), so a resumed run samples what
  an uninterrupted one does (same step, same weights, same seeds), independent of batching;
- completions end at the same stop ids as on the hf path (TRL's ``eos_token_ids``) and carry the stop
  token at the end, as TRL's own path returns them.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

from core.engines import EngineChoice, VLLMSettings
from core.generation import SamplingSettings


def completion_seed(seed: int, step: int, call: int, index: int, evaluating: bool) -> int:
    """A per-completion seed: distinct across steps, calls within a step, completions and train/monitoring."""
    return (seed * 1_000_003 + step * 100_003 + call * 10_007 + index + (7_919_000 if evaluating else 0)) % (2**31 - 1)


class VLLMRollouts:
    """Samples RLOO's completions with the vllm engine on the current policy weights."""

    def __init__(self, model, tokenizer, *, sampling: SamplingSettings, max_new_tokens: int, max_length: int,
                 stop_ids: Sequence[int], seed: int, settings: VLLMSettings, choice: EngineChoice, dtype):
        from core.vllm_engine import VLLMEngine, WorkDir, merged_weights, save_plain_model

        self.model, self.sampling, self.max_new_tokens, self.seed = model, sampling, max_new_tokens, seed
        self.stop_ids = list(stop_ids)
        self._work = WorkDir(prefix="rloo_policy_")
        model_dir = save_plain_model(merged_weights(model), model.config, self._work.path / "policy")
        try:
            self.engine = VLLMEngine(model_dir, tokenizer, dtype=dtype, settings=settings, device=choice.device,
                                     max_model_len=max_length, seed=seed)
        except BaseException:
            self._work.close()
            raise
        self._synced_step: int | None = None  # the first call always pushes (a resumed run's weights load later)
        self._calls: dict = defaultdict(int)
        self.sync_count = 0

    def sync(self, step: int) -> None:
        from core.vllm_engine import merged_weights

        if step != self._synced_step:
            self.engine.load_weights(merged_weights(self.model), self.model.config)
            self._synced_step, self.sync_count = step, self.sync_count + 1

    def generate(self, prompt_ids: Sequence[Sequence[int]], step: int, evaluating: bool) -> list[list[int]]:
        """Completion token ids, each ending with its stop token when it stopped (as TRL's hf path returns them)."""
        self.sync(step)
        call = self._calls[(step, evaluating)]
        self._calls[(step, evaluating)] += 1
        seeds = [completion_seed(self.seed, step, call, i, evaluating) for i in range(len(prompt_ids))]
        generations = self.engine.generate(prompt_ids, max_new_tokens=self.max_new_tokens, sampling=self.sampling,
                                           stop_ids=self.stop_ids, seeds=seeds, show_progress=False)
        return [list(g.token_ids) + ([g.stop_id] if g.stopped_with_eos else []) for g in generations]

    def close(self) -> None:
        self.engine.close()
        self._work.close()
