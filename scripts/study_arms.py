"""The seeded arms of a study (preset ``study``, and ``quick`` at toy size): what each trains, from where, on what.

Every arm starts from the one SFT run and is trained once per seed ``k`` (``--seeds S``: k = 0..S-1) in
its own folder ``<arm>_s<k>`` (the report groups columns by that name), with ``--seed k`` and otherwise
the same command; the data steps and SFT run once. Per seed, in this order:

- ``dpo_if``: DPO on the checker-judged pairs (``data/if_pairs``);
- ``control``: the matched-compute control: SFT continued from the SFT adapter (``--init_adapter_dir``)
  on the judged pairs' chosen answers (``--response_key chosen``: rejection-sampling fine-tuning) for as
  many tokens as that seed's DPO run trained (``--match_tokens_of dpo_if_s<k>``: non-padding tokens through
  the policy, chosen and rejected sequences both; sft/budget.py), so a DPO effect can be told from "more
  training on these prompts and answers";
- ``reward_if`` then ``rlhf``: a reward model on the judged pairs, then RLOO with it on the constrained
  training prompts, monitored on both IF validation sets;
- ``rlvr``: RLOO whose reward is the constraint checker, on the same prompts, monitored the same way.

The control takes its template and tokenizer from the SFT command (it continues that run, which
``--init_adapter_dir`` checks) and its other flags from the preset's ``control`` flags and ``--control_args``.
"""
from __future__ import annotations

import re
from typing import Callable, Sequence

IF_DIR, JUDGED_DIR, SFT_DIR = "data/if", "data/if_pairs", "sft"
# What the control takes from the SFT run's command: how it renders and tokenizes (it continues that adapter).
FROM_SFT = ("--template", "--system_prompt", "--tokenizer_name_or_path", "--trust_remote_code")
# The arms a preset may seed: arm -> the stage of core/stages.py it runs.
ARM_STAGES = {"dpo_if": "dpo", "control": "sft", "reward_if": "reward", "rlhf": "rloo", "rlvr": "rloo"}
SEEDED_STEP = re.compile(r"^(.+)_s(\d+)$")  # a seeded arm's run: <arm>_s<k> (the report groups columns by it)
# The report's column order: each arm beside the one it is compared with (control, then what it controls for).
REPORT_ORDER = ("control", "dpo_if", "reward_if", "rlhf", "rlvr")


def arm_of(step: str) -> str:
    """The arm a step runs: ``dpo_if_s2`` -> ``dpo_if``; an unseeded step is its own arm."""
    seeded = SEEDED_STEP.match(step)
    return seeded.group(1) if seeded and seeded.group(1) in ARM_STAGES else step


def seeded_steps(arms: Sequence[str], seeds: int) -> list[str]:
    """``<arm>_s<k>`` for every seed, seed by seed: a study stopped after seed 0 already holds every arm once."""
    return [f"{arm}_s{seed}" for seed in range(seeds) for arm in arms]


def expand_steps(stages: Sequence[str], arms: Sequence[str], seeds: int, marker: str) -> list[str]:
    """A preset's stages with ``marker`` replaced by its seeded steps."""
    return [step for stage in stages for step in (seeded_steps(arms, seeds) if stage == marker else [stage])]


def seed_of(step: str) -> int:
    return int(SEEDED_STEP.match(step).group(2))


def arm_command(step: str, model: str, from_sft: Sequence[str], entry: Callable[[str], str],
                flags: Callable[[str], list[str]], command: Callable) -> list[str]:
    """The command of one seeded run (``dpo_if_s1``): its arm's inputs, its folder, ``--seed k``, the arm's flags.
    ``from_sft``: the SFT command's words for :data:`FROM_SFT`."""
    arm, seed = arm_of(step), str(seed_of(step))
    judged = ["--train_file", f"{JUDGED_DIR}/prefs_train.jsonl", "--val_file", f"{JUDGED_DIR}/prefs_val.jsonl"]
    monitored = ["--prompt_file", f"{IF_DIR}/if_train.jsonl",
                 "--monitor_files", f"{IF_DIR}/if_val_seen.jsonl", f"{IF_DIR}/if_val_heldout.jsonl"]
    inputs = {
        "dpo_if": ["--sft_adapter_dir", SFT_DIR, *judged],
        "control": ["--model_name_or_path", model, *from_sft, "--init_adapter_dir", SFT_DIR,
                    "--response_key", "chosen", *judged, "--match_tokens_of", f"dpo_if_s{seed}"],
        "reward_if": ["--sft_adapter_dir", SFT_DIR, *judged],
        "rlhf": ["--sft_adapter_dir", SFT_DIR, "--reward_model_dir", f"reward_if_s{seed}", *monitored],
        "rlvr": ["--sft_adapter_dir", SFT_DIR, "--reward", "checker", *monitored],
    }[arm]
    return command(entry(step), inputs, ["--output_dir", step], flags(step), ["--seed", seed])


def report_order(policies: Sequence[str]) -> list[str]:
    """The report's columns: the unseeded policies (sft) first, then each arm's seeds together (:data:`REPORT_ORDER`)."""
    def key(step: str) -> tuple[int, int]:
        return (REPORT_ORDER.index(arm_of(step)), seed_of(step)) if step != arm_of(step) else (-1, 0)

    return sorted(policies, key=key)
