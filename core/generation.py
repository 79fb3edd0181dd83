"""Batched, left-padded generation for evaluation (greedy) and DPO data (sampling).

Prompts are tokenized once, sorted by length so each batch holds prompts of similar length (little
padding), left-padded so every prompt ends where its continuation starts, generated, and returned
in the caller's order. Only the new tokens are decoded, cut at the first EOS.

Greedy batched output equals greedy one-at-a-time output: ``generate`` derives position ids from
the attention mask, so left padding shifts nothing (``tests/test_generation.py`` checks it).

    from core.generation import generate_texts
    outs = generate_texts(model, tokenizer, prompts, max_new_tokens=128, batch_size=8)
    outs[0].text, outs[0].stopped_with_eos, outs[0].num_tokens
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm


@dataclass(frozen=True)
class SamplingSettings:
    """How the next token is picked. The default is greedy; ``do_sample=True`` samples.

    ``top_k=0`` and ``top_p=1.0`` switch those filters off, so a model's shipped
    ``generation_config`` (often top_k=50, temperature 0.6) never changes results silently.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature} (use do_sample=False for greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")

    def generate_kwargs(self) -> dict:
        if not self.do_sample:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}


GREEDY = SamplingSettings()


@dataclass(frozen=True)
class Generation:
    """One prompt's continuation: the text before the first stop token (EOS or end-of-turn) and how generation ended."""

    text: str
    token_ids: tuple[int, ...]  # generated tokens before EOS (EOS itself not included)
    stopped_with_eos: bool  # stopped with EOS or the end-of-turn token; False: cut off by max_new_tokens
    stop_id: int | None = None  # the stop token that ended it (EOS or end-of-turn), None when cut off

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


def special_token_ids(tokenizer) -> tuple[int, int]:
    """(pad id, eos id) for generation, without changing the tokenizer.

    Llama-family tokenizers ship without a pad token; padding with EOS is safe here because the
    attention mask hides the padding and outputs are cut at the first EOS anyway.
    """
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("the tokenizer has no EOS token, so generation could never stop; set tokenizer.eos_token")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    return pad_id, eos_id


def encode_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt exactly as training encodes a prompt (``core.tokenization.encode_prompt``).

    One BOS where the tokenizer adds one and no trailing EOS, unpadded: the model continues the
    prompt from the same tokens it was trained on.
    """
    from core.tokenization import encode_prompt

    return [encode_prompt(prompt, tokenizer) for prompt in prompts]


def _left_pad(batch: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        if ids:
            input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids):] = 1
    return input_ids.to(device), attention_mask.to(device)


def _cut_at_stop(new_tokens: list[int], stop_ids: Sequence[int]) -> tuple[list[int], bool]:
    """Tokens before the first stop token (EOS, or a chat template's end-of-turn), and whether one came."""
    for position, token in enumerate(new_tokens):
        if token in stop_ids:
            return new_tokens[:position], True
    return new_tokens, False


def finish_generation(tokenizer, new_tokens: Sequence[int], stop_ids: Sequence[int]) -> Generation:
    """A :class:`Generation` from the raw new tokens: cut at the first stop id, decoded without special tokens.

    Every engine ends here, so text, token counts and ``stopped_with_eos`` mean the same on all.
    """
    kept, stopped = _cut_at_stop(list(new_tokens), stop_ids)
    stop_id = int(new_tokens[len(kept)]) if stopped else None
    return Generation(tokenizer.decode(kept, skip_special_tokens=True), tuple(kept), stopped, stop_id)


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


_SAID_PAST_CONTEXT: set = set()


def note_past_context(model, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    """Say (once per process for the same numbers) how many prompts may generate past the model's positions.

    Hugging Face generates on past ``max_position_embeddings`` with one vague warning (silenced in
    core/quiet.py); this line counts the prompts instead (vLLM refuses them: ``--vllm_max_model_len``)."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(limit, int):
        return
    past = sum(len(ids) + max_new_tokens > limit for ids in prompt_ids)
    said = (limit, max_new_tokens, past, len(prompt_ids))
    if past and said not in _SAID_PAST_CONTEXT:
        _SAID_PAST_CONTEXT.add(said)
        print(f"note: {past} of {len(prompt_ids)} prompts + max_new_tokens {max_new_tokens} exceed the model's "
              f"{limit} positions (max_position_embeddings): an answer running past them may degrade", flush=True)


def generate_from_ids(model, tokenizer, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int = 128,
                      batch_size: int = 8, sampling: SamplingSettings = GREEDY, show_progress: bool = True,
                      desc: str = "generating", stop_ids: Sequence[int] | None = None) -> list[Generation]:
    """Continue already-tokenized prompts; results come back in the order given.

    ``stop_ids`` end a generation (default: EOS); a chat format adds its end-of-turn token
    (``PromptFormat.stop_ids``), and ``stopped_with_eos`` then counts either.
    """
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    pad_id, eos_id = special_token_ids(tokenizer)
    stop_ids = list(stop_ids) if stop_ids else [eos_id]
    device = _model_device(model)
    note_past_context(model, prompt_ids, max_new_tokens)
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    # Longest first: a memory problem shows in the first batch, and the bar's estimate is pessimistic.
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]), reverse=True)
    results: list[Generation | None] = [None] * len(prompt_ids)
    was_training = model.training
    model.eval()
    with torch.inference_mode(), tqdm(total=len(order), desc=desc, unit="prompt", disable=not show_progress) as bar:
        for start in range(0, len(order), batch_size):
            batch_index = order[start:start + batch_size]
            input_ids, attention_mask = _left_pad([list(prompt_ids[i]) for i in batch_index], pad_id, device)
            output = model.generate(
                input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                pad_token_id=pad_id, eos_token_id=stop_ids, **sampling.generate_kwargs(),
            )
            new_tokens = output[:, input_ids.shape[1]:].tolist()
            for i, tokens in zip(batch_index, new_tokens):
                results[i] = finish_generation(tokenizer, tokens, stop_ids)
            bar.update(len(batch_index))
    model.train(was_training)
    return results  # type: ignore[return-value]


def generate_texts(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 128, batch_size: int = 8,
                   sampling: SamplingSettings = GREEDY, show_progress: bool = True,
                   desc: str = "generating") -> list[Generation]:
    """Continue each prompt (already rendered with the training template); results in input order."""
    return generate_from_ids(model, tokenizer, encode_prompts(tokenizer, prompts), max_new_tokens=max_new_tokens,
                             batch_size=batch_size, sampling=sampling, show_progress=show_progress, desc=desc)
