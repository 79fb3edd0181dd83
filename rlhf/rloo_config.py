"""The one configuration for every RLOO run, with ``mac`` and ``cuda`` presets (shaped like ``dpo/dpo_config.py``).

RLOO (REINFORCE with a leave-one-out baseline): for each prompt the policy samples
``num_generations`` completions, the reward model scores them, and each completion's advantage is
its reward minus the mean reward of the other completions of the same prompt. The KL to the
frozen SFT model is subtracted from the reward, weighted by ``beta``. Sampling keys follow
Hugging Face ``generate``; the rest follows the SFT/DPO configs.

    python -m rlhf.train_rloo_mac --help
    python -m rlhf.train_rloo_mac --sft_adapter_dir models/sft_output --reward_model_dir models/reward_output --max_steps 100
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from core.config import MIN_SEQ_LENGTH, ConfigError, key
from core.keys import EngineKeys, StageConfig, TrainingKeys, check_engine_keys, stage_presets
from core.runs import RUN_CONFIG_FILES

CONFIG_FILENAME = RUN_CONFIG_FILES["rloo"]

# Sampling dominates RLOO's time; QLoRA keeps the policy, its reference copy and the reward model on one GPU.
PRESETS = stage_presets(mac={"per_device_train_batch_size": 8, "gradient_accumulation_steps": 2},
                        cuda={"per_device_train_batch_size": 16, "gradient_accumulation_steps": 2,
                              "per_device_eval_batch_size": 16})


@dataclass
class RLOOConfig(StageConfig, TrainingKeys, EngineKeys):
    # core.keys.StageConfig: its name in core/stages.py, the printed config's title, its device presets
    STAGE, TITLE, PRESETS = "rloo", "resolved RLOO config", PRESETS

    # --- where to start ----------------------------------------------------------------------
    sft_adapter_dir: str = key("models/sft_output", "the SFT run: the policy starts from its adapter, the reference is "
                                                    "the frozen SFT model, its training prompts are the default prompts")
    reward_model_dir: str = key("models/reward_output", "the trained reward model (python -m rlhf.train_reward_mac); "
                                                        "read only when --reward uses the model")
    trust_remote_code: bool = key(False, "allow model code from the hub (off unless you trust the repo)")

    # --- prompts -----------------------------------------------------------------------------
    prompt_file: Optional[str] = key(None, "prompts to train on: JSONL with 'instruction' [, 'input'] or a rendered "
                                           "'prompt', or text with one instruction per line (default: the SFT run's "
                                           "train_file; never its validation file)")
    template: Optional[str] = key(None, "prompt template: the SFT run's, which RLOO always uses (another one is "
                                        "refused; default: the one saved in the SFT run)")
    max_prompts: Optional[int] = key(None, "use only the first N prompts (quick runs)")
    monitor_prompts: int = key(16, "prompts held back from training to sample on before the first step and every "
                                   "eval_steps (0 = no held-out monitoring)")
    max_length: int = key(512, "longest prompt + completion in tokens; prompts longer than max_length - max_new_tokens "
                               "are left out (counted)")

    monitor_files: list[str] = key([], "prompt files with constraints (release format, e.g. if_val_seen.jsonl "
                                       "if_val_heldout.jsonl) to monitor on instead of held-back training prompts: "
                                       "--monitor_prompts of each (seeded), pass rates per file (none = off)")

    # --- reward (rlhf/rewards.py, rlhf/verifiable_reward.py) ----------------------------------
    reward: str = key("model", "what scores a completion: the trained reward model; the constraint checker "
                               "(RL with verifiable rewards, RLVR: prompts need instruction_id_list and kwargs); or both, "
                               "weighted by --reward_weights", choices=["model", "checker", "checker+model"])
    reward_shape: str = key("fraction", "the checker's reward: the fraction of a prompt's constraints followed, or 1/0 "
                                        "for all/not all", choices=["fraction", "binary"])
    reward_weights: list[float] = key([1.0, 1.0], "with --reward checker+model: the weights of the checker and of the "
                                                  "reward model (A B)")

    # --- sampling ----------------------------------------------------------------------------
    num_generations: int = key(4, "completions sampled per prompt (k; the baseline of each is the mean of the other k-1)")
    max_new_tokens: int = key(64, "longest completion, in tokens")
    temperature: float = key(1.0, "sampling temperature (1.0 = the policy's own distribution, which RLOO's gradient assumes)")
    top_p: float = key(1.0, "nucleus sampling threshold (1.0 = off)")
    top_k: int = key(0, "sample among the k likeliest tokens only (0 = off)")

    # --- RLOO --------------------------------------------------------------------------------
    beta: float = key(0.05, "KL coefficient: reward -= beta * sum over tokens of (log p_policy - log p_SFT)")
    missing_eos_penalty: float = key(0.0, "subtracted from the reward of a completion that did not stop with EOS "
                                          "within max_new_tokens (0 = off)")
    length_penalty: float = key(0.0, "subtracted from the reward per completion token (0 = off)")
    normalize_advantages: bool = key(False, "scale advantages to unit variance per batch")

    # --- shared training keys (core/keys.py) with RLOO's defaults ----------------------------------
    load_in_4bit: bool = key(False, "QLoRA: load the frozen base model (policy and reward model) in 4-bit")
    learning_rate: float = key(1e-5, "peak learning rate")
    per_device_train_batch_size: int = key(8, "completions per device per forward pass (a multiple of num_generations "
                                              "keeps each prompt's group in one pass)")
    per_device_eval_batch_size: int = key(8, "completions per device per monitoring pass (a multiple of num_generations)")
    gradient_accumulation_steps: int = key(2, "forward passes per optimizer step (completions are sampled once per step)")
    warmup_ratio: float = key(0.0, "fraction of steps spent warming the learning rate up")
    lr_scheduler_type: str = key("constant", "learning-rate schedule as in TrainingArguments")
    logging_steps: int = key(1, "log reward, KL, length and stop rate every N optimizer steps")
    eval_steps: int = key(25, "sample on the monitoring prompts every N optimizer steps (and once before training)")
    save_steps: int = key(50, "write a checkpoint every N optimizer steps")
    output_dir: str = key("models/rloo_output", "where the policy adapter, config, metrics and checkpoints go")

    @property
    def uses_model(self) -> bool:
        return self.reward in ("model", "checker+model")

    @property
    def uses_checker(self) -> bool:
        return self.reward in ("checker", "checker+model")

    def validate(self) -> None:
        """Reject combinations that would fail late or train nothing useful."""
        check_engine_keys(self)
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "logging_steps", "eval_steps", "save_steps", "max_new_tokens", "learning_rate", "temperature"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.num_generations < 2:
            raise ConfigError(f"num_generations must be >= 2 (the leave-one-out baseline needs another sample), got {self.num_generations}")
        generation_batch = self.per_device_train_batch_size * self.gradient_accumulation_steps
        if generation_batch % self.num_generations:
            raise ConfigError(f"per_device_train_batch_size x gradient_accumulation_steps ({generation_batch}) must be a "
                              f"multiple of num_generations ({self.num_generations}): every prompt's k completions in one step")
        if self.monitor_prompts and self.per_device_eval_batch_size % self.num_generations:
            raise ConfigError(f"per_device_eval_batch_size ({self.per_device_eval_batch_size}) must be a multiple of "
                              f"num_generations ({self.num_generations})")
        if self.max_length < MIN_SEQ_LENGTH or self.max_length <= self.max_new_tokens:
            raise ConfigError(f"max_length must be at least {MIN_SEQ_LENGTH} and leave room for a prompt after "
                              f"max_new_tokens={self.max_new_tokens}, got {self.max_length}")
        if not 0.0 < self.top_p <= 1.0 or self.top_k < 0:
            raise ConfigError(f"top_p must be in (0, 1] and top_k >= 0, got {self.top_p} and {self.top_k}")
        for name in ("beta", "missing_eos_penalty", "length_penalty", "monitor_prompts", "weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_steps == 0 or self.max_steps < -1 or (self.max_steps == -1 and self.num_train_epochs <= 0):
            raise ConfigError(f"max_steps must be -1 (use num_train_epochs > 0) or > 0, got {self.max_steps}")
        for name in ("max_prompts", "save_total_limit"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be > 0 or none, got {value}")
        if len(self.reward_weights) != 2 or any(w < 0 for w in self.reward_weights) or not any(self.reward_weights):
            raise ConfigError(f"reward_weights takes two weights >= 0, not both 0 (checker, reward model), got {self.reward_weights}")
        if self.resume and self.overwrite_output_dir:
            raise ConfigError("choose one of resume (continue the run in output_dir) and overwrite_output_dir (start over)")


parse_rloo_config = RLOOConfig.parse
