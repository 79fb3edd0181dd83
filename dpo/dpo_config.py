"""The one configuration for every DPO run, with ``mac`` and ``cuda`` presets (shaped like ``sft/sft_config.py``).

Every key a run uses is a field below, with its default and meaning. Names follow the SFT config
(and Hugging Face ``TrainingArguments``) wherever one exists; DPO's own keys (``beta``,
``loss_type``, ``max_length``) follow TRL's ``DPOConfig``.

Priority, lowest first: defaults < preset (picked by the entry point) < ``--config run.yaml``
< command-line flags. ``--help`` lists every key.

    python -m dpo.train_dpo_mac --help
    python -m dpo.train_dpo_mac --sft_adapter_dir models/sft_output --max_steps 200 --beta 0.1
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from core.config import ConfigError, check_training_keys, key
from core.keys import LoraKeys, PairStageKeys, StageConfig, TrainingKeys, stage_presets
from core.prompting import PromptTemplate
from core.runs import RUN_CONFIG_FILES

CONFIG_FILENAME = RUN_CONFIG_FILES["dpo"]

# The losses of TRL's DPOTrainer that need nothing but (prompt, chosen, rejected) and beta.
LOSS_TYPES = ["sigmoid", "hinge", "ipo", "robust", "bco_pair", "sppo_hard", "nca_pair", "apo_zero", "apo_down",
              "sigmoid_norm"]

# A DPO batch is two sequences per pair, and the reference forward runs too: the device presets as they are.
PRESETS = stage_presets()


@dataclass
class DPOConfig(StageConfig, PairStageKeys, LoraKeys, TrainingKeys):
    # core.keys.StageConfig: its name in core/stages.py, the printed config's title, its device presets
    STAGE, TITLE, PRESETS = "dpo", "resolved DPO config", PRESETS
    # allow_foreign_pairs: a permission checked before training; reference_cache: where the same numbers come from
    RESUME_FREE = frozenset({"allow_foreign_pairs", "reference_cache"})

    # --- where to start and data: core/keys.py PairStageKeys ---------------------------------------
    init: str = key("sft", "sft: policy starts from the SFT adapter, reference = frozen SFT model; "
                           "base: a fresh adapter on the base model, reference = the base model", choices=["sft", "base"])
    # Pairs sampled from another SFT run have another model's answers as "rejected": DPO would push this
    # model away from text it never wrote, and eval refuses to score them for it. Refused unless asked for.
    allow_foreign_pairs: bool = key(False, "train on pairs that prefs_stats.json says were sampled from another SFT "
                                           "run than --sft_adapter_dir (refused by default)")

    # --- DPO ---------------------------------------------------------------------------------
    beta: float = key(0.1, "strength of the pull towards the reference (higher = stay closer)")
    loss_type: str = key("sigmoid", "TRL DPO loss (sigmoid = the DPO paper's loss)", choices=LOSS_TYPES)
    label_smoothing: float = key(0.0, "assumed share of flipped labels (robust / conservative DPO); 0 = plain DPO")
    reference_cache: bool = key(True, "compute each pair's reference log-probs once, at its first use, and reuse them "
                                      "(every held-out evaluation after the first, later epochs, --resume via the "
                                      "checkpoint's reference_logps.json); false: TRL's reference forward at every "
                                      "step and evaluation (same numbers, more time; dpo/reference_cache.py)")

    # --- LoRA: a fresh adapter's keys (core/keys.py) apply to --init base only; with --init sft ----
    # --- the SFT adapter's own LoRA config is continued. ------------------------------------------
    lora_dropout: float = key(0.05, "dropout on the LoRA branch (TRL switches dropout off for DPO by default)")

    # --- shared training keys (core/keys.py) with DPO's defaults ------------------------------------
    # DPO moves a model that already follows instructions: a tenth of the SFT learning rate.
    learning_rate: float = key(2e-5, "peak learning rate")
    warmup_ratio: float = key(0.1, "fraction of steps spent warming the learning rate up")
    eval_steps: int = key(50, "evaluate on the held-out pairs every N optimizer steps (and once before training)")
    output_dir: str = key("models/dpo_output", "where the adapter, config, metrics and checkpoints go")

    def validate(self) -> None:
        """Reject combinations that would fail late or train nothing useful."""
        check_training_keys(self, length_key="max_length")
        if self.beta <= 0:
            raise ConfigError(f"beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")

    def reference_description(self) -> str:
        """One line naming the reference model, for the log and the saved config."""
        if self.init == "sft":
            return f"frozen SFT model (base + SFT adapter from {self.sft_adapter_dir})"
        return "base model (TRL's frozen copy of the fresh adapter, which adds exactly zero)"


parse_dpo_config = DPOConfig.parse


def save_dpo_config(config: DPOConfig, output_dir: str | Path, template: PromptTemplate, preset: str = "",
                    base_model: str | None = None, extra: dict | None = None) -> Path:
    """Save the resolved config, the template and the reference used (``core.runs`` format).

    ``template`` is the SFT run's (or ``--template``), so evaluation prompts the DPO adapter
    exactly as it was trained.
    """
    return config.save(output_dir, template, preset=preset, base_model=base_model,
                       extra={"reference": config.reference_description(), **(extra or {})})
