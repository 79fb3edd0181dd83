"""The one configuration for every reward-model run, with ``mac`` and ``cuda`` presets (shaped like ``dpo/dpo_config.py``).

Every key a run uses is a field below, with its default and meaning. Names follow the SFT and DPO
configs (and Hugging Face ``TrainingArguments``) wherever one exists.

Priority, lowest first: defaults < preset (picked by the entry point) < ``--config run.yaml``
< command-line flags. ``--help`` lists every key.

    python -m rlhf.train_reward_mac --help
    python -m rlhf.train_reward_mac --sft_adapter_dir models/sft_output --max_steps 200
"""
from __future__ import annotations

from dataclasses import dataclass

from core.config import ConfigError, check_training_keys, key
from core.keys import LoraKeys, PairStageKeys, StageConfig, TrainingKeys, stage_presets
from core.runs import RUN_CONFIG_FILES

CONFIG_FILENAME = RUN_CONFIG_FILES["reward"]

# Each pair is two sequences and there is no reference forward: the device presets fit as they are.
PRESETS = stage_presets()


@dataclass
class RewardConfig(StageConfig, PairStageKeys, LoraKeys, TrainingKeys):
    # core.keys.StageConfig: its name in core/stages.py, the printed config's title, its device presets
    STAGE, TITLE, PRESETS = "reward", "resolved reward-model config", PRESETS

    # --- where to start and data: core/keys.py PairStageKeys ---------------------------------------
    init: str = key("sft", "sft: the reward model's body starts as the SFT model (the SFT adapter, trained further); "
                           "base: a fresh LoRA adapter on the base model", choices=["sft", "base"])

    # --- reward model ------------------------------------------------------------------------
    center_rewards_coefficient: float = key(0.0, "weight of a penalty on the squared mean reward, keeping scores "
                                                 "centred on 0 (0 = off; 0.01 as in the InstructGPT-style recipes)")

    # --- LoRA: a fresh adapter's keys (core/keys.py) apply to --init base only ----------------------
    lora_dropout: float = key(0.05, "dropout on the LoRA branch (TRL switches dropout off for reward training)")

    # --- shared training keys (core/keys.py) with the reward model's defaults -----------------------
    learning_rate: float = key(1e-4, "peak learning rate (the score head starts random, so higher than DPO's)")
    eval_steps: int = key(50, "evaluate on the held-out pairs every N optimizer steps (and once before training)")
    output_dir: str = key("models/reward_output", "where the adapter + score head, config, metrics and checkpoints go")

    def validate(self) -> None:
        """Reject combinations that would fail late or train nothing useful."""
        check_training_keys(self, length_key="max_length")
        if self.center_rewards_coefficient < 0:
            raise ConfigError(f"center_rewards_coefficient must be >= 0, got {self.center_rewards_coefficient}")


parse_reward_config = RewardConfig.parse
