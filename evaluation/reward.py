"""Each column's mean reward-model score on its own generations (``python -m sft.eval_sft --reward_model DIR``).

The reward model (``python -m rlhf.train_reward_mac``) scores prompt + generation + EOS (when the
generation stopped), the way it was trained on prompt + response + EOS. The prompt is rendered
with the reward model's own template and the generation's token ids are used as generated, so
nothing is re-tokenised. The reward model must share the evaluated base model and tokenizer
(one-line error otherwise). Generations cut at ``max_new_tokens`` are scored as they are.
"""
from __future__ import annotations

import gc
import statistics
from typing import TYPE_CHECKING, Sequence

import torch

from core.prompting import prompt_format
from core.generation import encode_prompts
from rlhf.reward_model import check_reward_compatible, load_reward_model, read_reward_run

if TYPE_CHECKING:
    from evaluation.data import EvalPrompt
    from evaluation.models import ColumnResult


def check_reward_model(reward_dir: str) -> None:
    """Fail before anything is generated when ``reward_dir`` holds no finished reward model."""
    read_reward_run(reward_dir)


def reward_columns(reward_dir: str, prompts: Sequence[EvalPrompt], results: Sequence[ColumnResult], base_model: str,
                   tokenizer, device: torch.device, dtype: torch.dtype, batch_size: int) -> tuple[dict, dict]:
    """({column label: {"reward_model_mean", "reward_model_std"}}, settings for the report)."""
    run = read_reward_run(reward_dir)
    check_reward_compatible(run, base_model, tokenizer, who="the evaluated models")
    reward = load_reward_model(reward_dir, device=device, dtype=dtype)
    fmt = prompt_format(run.template, tokenizer)
    prompt_ids = encode_prompts(tokenizer, [p.render(fmt) for p in prompts])
    finish = fmt.finish_ids  # a stopped generation ends as the reward model's training responses did
    columns = {}
    for result in results:
        sequences = [ids + list(g.token_ids) + (finish if g.stopped_with_eos else [])
                     for ids, g in zip(prompt_ids, result.generations)]
        scores = reward.score(sequences, batch_size, show_progress=True)
        columns[result.spec.label] = {"reward_model_mean": statistics.fmean(scores),
                                      "reward_model_std": statistics.pstdev(scores)}
    del reward
    gc.collect()
    settings = {"reward_model": str(reward_dir), "reward_model_template": run.template.name,
                "reward_model_prompts": len(prompts)}
    return columns, settings
