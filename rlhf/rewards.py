"""What scores RLOO's completions: the reward model, the constraint checker (RLVR), and the penalties.

``--reward model`` (the default): the trained reward model (``rlhf/reward_model.py``); ``--reward
checker``: the fraction of the prompt's constraints followed (``rlhf/verifiable_reward.py``);
``--reward checker+model``: both, weighted by ``--reward_weights``. Each function carries its
``weight`` in TRL's weighted sum (``reward_weights`` of TRL's RLOOConfig); the penalties weigh 1. With
monitoring files that carry constraints, a ``--reward model`` run also counts the checker's verdicts
(weight 0: logged, never optimised), so RLHF and RLVR runs are read on the same pass rates.
"""
from __future__ import annotations

from typing import Sequence

from core.modeling import torch_dtype
from core.prompting import prompt_format
from core.tokenization import encode_prompt
from core.training import DevicePlan
from rlhf.monitor_record import PerPromptScores
from rlhf.reward_model import RewardModel, load_reward_model
from rlhf.rloo_config import RLOOConfig
from rlhf.verifiable_reward import VerifiableReward


class RewardModelScore:
    """The trained reward model as a TRL reward function: scores the token ids the policy produced."""

    __name__ = "reward_model"

    def __init__(self, reward: RewardModel, tokenizer, batch_size: int, weight: float = 1.0,
                 per_prompt: PerPromptScores | None = None):
        self.reward, self.tokenizer, self.batch_size, self.weight = reward, tokenizer, batch_size, weight
        self.per_prompt = per_prompt

    def __call__(self, prompts, completions, completion_ids, **kwargs) -> list[float]:
        # completion_ids end with EOS when the completion stopped, as the reward model's training responses do.
        sequences = [encode_prompt(p, self.tokenizer) + list(c) for p, c in zip(prompts, completion_ids)]
        scores = self.reward.score(sequences, self.batch_size)
        if self.per_prompt is not None:  # monitoring rows: each prompt's score, for the monitor's paired test
            self.per_prompt.add(self.__name__, prompts, kwargs, scores, self.weight)
        return scores


class MissingEOSPenalty:
    __name__ = "missing_eos_penalty"

    def __init__(self, penalty: float, eos_ids: Sequence[int]):
        self.penalty, self.eos_ids = penalty, set(eos_ids)

    def __call__(self, prompts, completions, completion_ids, **kwargs) -> list[float]:
        return [0.0 if ids and ids[-1] in self.eos_ids else -self.penalty for ids in completion_ids]


class LengthPenalty:
    __name__ = "length_penalty"

    def __init__(self, penalty: float):
        self.penalty = penalty

    def __call__(self, prompts, completions, completion_ids, **kwargs) -> list[float]:
        return [-self.penalty * len(ids) for ids in completion_ids]


def reward_functions(config: RLOOConfig, reward: RewardModel | None, tokenizer, fmt, monitor_sets: Sequence[str] = ()) -> list:
    """The reward functions in TRL's order, each with its ``weight``; ``fmt``: the run's prompt format (stop ids);
    ``monitor_sets``: the monitoring sets whose rows carry constraints (their pass counts are logged)."""
    functions: list = []
    per_prompt = PerPromptScores()  # shared: one line per monitoring pass with every function's per-prompt means
    if config.uses_model:
        functions.append(RewardModelScore(reward, tokenizer, config.per_device_train_batch_size,
                                          weight=config.reward_weights[1] if config.uses_checker else 1.0,
                                          per_prompt=per_prompt))
    if config.uses_checker or monitor_sets:
        weight = (config.reward_weights[0] if config.uses_model else 1.0) if config.uses_checker else 0.0
        functions.append(VerifiableReward(tokenizer, fmt.stop_ids, config.reward_shape, weight, monitor_sets,
                                          per_prompt=per_prompt))
    if config.missing_eos_penalty:
        stop_ids = prompt_format(reward.template, tokenizer).stop_ids if reward is not None else fmt.stop_ids
        functions.append(MissingEOSPenalty(config.missing_eos_penalty, stop_ids))
    if config.length_penalty:
        functions.append(LengthPenalty(config.length_penalty))
    return functions


def reward_phrase(config: RLOOConfig) -> str:
    """What the reward is, in words: for the intro line and the model card."""
    shape = ("the fraction of the prompt's constraints followed" if config.reward_shape == "fraction" else
             "1 when the completion follows all the prompt's constraints, else 0")
    checker = f"the constraint checker ({shape}; RLVR)"
    model = f"the reward model in `{config.reward_model_dir}`"
    if config.reward == "checker":
        return checker
    if config.reward == "model":
        return model
    a, b = config.reward_weights
    return f"{a} x {checker} + {b} x {model}"


def reward_weights(functions: Sequence) -> list[float]:
    return [float(getattr(function, "weight", 1.0)) for function in functions]


def load_reward(config: RLOOConfig, plan: DevicePlan) -> RewardModel:
    quantization = ({"quant_type": config.bnb_4bit_quant_type, "double_quant": config.bnb_4bit_use_double_quant}
                    if plan.load_in_4bit else None)
    return load_reward_model(config.reward_model_dir, device=plan.device, dtype=torch_dtype(plan.precision),
                             quantization=quantization)
