"""The study preset (issue 30): seeded arms from one SFT run, the matched-compute control, --seeds, and --estimate.
The stages are stood in for by tests/test_run_study.py's recorder; the real runs are the quick study's (tests/test_study.py)."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from core.cli import UserError
from core.stages import registered_stages
from scripts import run_study
from scripts.study_arms import SEEDED_STEP, arm_of
from scripts.study_estimate import count_work
from scripts.study_presets import PRESETS, build_stages, flag_groups, preset_steps
from test_run_study import recorder, study_argv, study_inputs  # noqa: F401  (fixtures)

ARMS = ("dpo_if", "control", "reward_if", "rlhf", "rlvr")


def study_args(inputs: dict, out: Path, *extra: str):
    argv = [a for a in study_argv(inputs, out) if a != "--quick"] + ["--preset", "study", "--ifbench_data", "none", *extra]
    return run_study.parse_args(argv)


def stages_of(inputs: dict, out: Path, *extra: str) -> dict:
    return {stage.name: stage for stage in build_stages(study_args(inputs, out, *extra), out, "mac")}


def without_seed(command: list[str]) -> dict:
    groups = flag_groups(command[1:])
    for flag in ("--seed", "--output_dir", "--match_tokens_of", "--reward_model_dir"):  # what differs by seed, by design
        groups.pop(flag, None)
    return groups


def test_each_arm_runs_once_per_seed_with_that_seed_and_the_same_recipe(study_inputs, tmp_path):
    stages = stages_of(study_inputs, tmp_path / "study")
    seeded = [name for name in stages if SEEDED_STEP.match(name)]
    assert seeded == [f"{arm}_s{seed}" for seed in range(PRESETS["study"]["seeds"]) for arm in ARMS]
    assert [name for name in stages if name not in seeded] == ["prepare", "sft", "if_prompts", "if_pairs", "report"]
    for name in seeded:
        command, seed = stages[name].command, SEEDED_STEP.match(name).group(2)
        assert command[command.index("--seed") + 1] == seed and command[command.index("--output_dir") + 1] == name
        assert without_seed(command) == without_seed(stages[f"{arm_of(name)}_s0"].command)  # one recipe per arm
    assert "--seed" not in stages["sft"].command and "--seed" not in stages["if_pairs"].command  # one run each
    assert len(stages_of(study_inputs, tmp_path / "other", "--seeds", "2")) == 5 + 2 * len(ARMS)


def test_the_control_continues_sft_on_the_chosen_answers_for_its_dpo_runs_tokens(study_inputs, tmp_path):
    stages = stages_of(study_inputs, tmp_path / "study")
    names = list(stages)
    control, sft = stages["control_s1"].command, stages["sft"].command
    value = lambda command, flag: command[command.index(flag) + 1]  # noqa: E731
    assert control[0] == "sft.train_sft_mac" and value(control, "--init_adapter_dir") == "sft"
    assert value(control, "--response_key") == "chosen" and value(control, "--train_file") == "data/if_pairs/prefs_train.jsonl"
    assert value(control, "--match_tokens_of") == "dpo_if_s1" and names.index("dpo_if_s1") < names.index("control_s1")
    assert value(control, "--template") == value(sft, "--template") == "chat"
    assert value(control, "--model_name_or_path") == value(sft, "--model_name_or_path") and "--max_steps" not in control
    rlhf = stages["rlhf_s2"].command
    assert value(rlhf, "--reward_model_dir") == "reward_if_s2" and value(rlhf, "--prompt_file") == "data/if/if_train.jsonl"
    assert "--monitor_files" in rlhf and value(stages["rlvr_s2"].command, "--reward") == "checker"


def test_the_report_scores_every_seeded_policy_with_the_declared_contrasts_and_long_answers(study_inputs, tmp_path):
    report = stages_of(study_inputs, tmp_path / "study")["report"].command
    start = report.index("--adapter_dir") + 1
    columns = report[start:start + 1 + 4 * 3]
    assert columns == ["sft", *(f"{arm}_s{k}" for arm in ("control", "dpo_if", "rlhf", "rlvr") for k in range(3))]
    assert report[report.index("--primary_contrasts") + 1] == "sft:base,control:sft,dpo_if:control,rlhf:control,rlvr:control"
    assert report[report.index("--if_max_new_tokens") + 1] == "1024"
    assert report[report.index("--if_sets") + 1] == "data/if" and report[report.index("--if_sets_limit") + 1] == "20"  # sized to a sitting
    assert all(re.match(r"^(.+)_s(\d+)$", column) for column in columns[1:])  # the report groups columns by this name


def test_the_study_starts_from_the_base_model_unless_told_otherwise():
    assert PRESETS["study"]["model"] == "HuggingFaceTB/SmolLM2-135M" and "--template chat" in PRESETS["study"]["sft"]


@pytest.mark.parametrize("config_module, name", [("sft.sft_config", "SFTConfig"), ("dpo.dpo_config", "DPOConfig"),
                                                 ("rlhf.reward_config", "RewardConfig"), ("rlhf.rloo_config", "RLOOConfig")])
def test_every_training_stage_takes_a_seed(config_module, name):
    """Seeds reach every training stage as --seed (set before the adapter is drawn: core.modeling.attach_lora)."""
    import importlib

    config = getattr(importlib.import_module(config_module), name)
    assert "seed" in {field.name for field in dataclasses.fields(config)}
    assert config.STAGE in {info.name for info in registered_stages()}


def test_seeds_need_a_preset_with_seeded_arms(study_inputs, tmp_path, recorder):
    small = [a for a in study_argv(study_inputs, tmp_path / "s") if a != "--quick"] + ["--preset", "small", "--ifbench_data",
                                                                                       "none", "--seeds", "2"]
    with pytest.raises(UserError, match=r"^--seeds: the small preset has no seeded arms"):
        run_study.main(small)
    assert recorder.ran == [] and not (tmp_path / "s").exists()


def test_the_quick_preset_has_the_same_arms_at_toy_size():
    assert PRESETS["quick"]["arms"] == PRESETS["study"]["arms"] and PRESETS["quick"]["seeds"] == 2
    assert [step for step in preset_steps("quick") if SEEDED_STEP.match(step)] == [
        f"{arm}_s{k}" for k in range(2) for arm in ARMS]


# --------------------------------------------------------------------------- --estimate


def test_the_estimate_counts_the_controls_tokens_as_its_dpo_runs(study_inputs, tmp_path):
    works = {work.stage: work for work in count_work(list(stages_of(study_inputs, tmp_path / "study").values()))}
    for seed in range(3):
        assert works[f"control_s{seed}"].trained == works[f"dpo_if_s{seed}"].trained > 0
    assert works["report"].generated > works["if_pairs"].generated > 0 and works["rlvr_s0"].generated > 0
    assert works["rlhf_s0"].forwarded > works["rlvr_s0"].forwarded  # RLHF's reward model forwards what RLVR's checker reads
    longer = {w.stage: w for w in count_work(list(stages_of(study_inputs, tmp_path / "s", "--eval_args",
                                                            "--if_max_new_tokens 2048").values()))}
    assert longer["report"].generated > works["report"].generated


def test_the_estimate_counts_the_if_sets_the_report_scores(study_inputs, tmp_path):
    def report_tokens(*extra: str) -> float:
        work = next(w for w in count_work(list(stages_of(study_inputs, tmp_path / "s", *extra).values())) if w.stage == "report")
        return work.generated

    limited, unlimited = report_tokens(), report_tokens("--eval_args", "--if_sets_limit none")
    without = report_tokens("--eval_args", "--if_sets none")
    # three sets (seen, held-out, IFBench types) of --num_val 100 each, at the preset's limit of 20
    assert without < limited < unlimited and (unlimited - without) / (limited - without) == pytest.approx(100 / 20)


def test_estimate_prints_the_cost_per_stage_and_runs_nothing(study_inputs, tmp_path, recorder, capsys, tiny_llama_dir):
    out = tmp_path / "study"
    argv = [a for a in study_argv(study_inputs, out) if a != "--quick"] + ["--preset", "study", "--ifbench_data", "none",
                                                                           "--estimate", "--gflops", "100",
                                                                           "--model_name_or_path", str(tiny_llama_dir)]
    assert run_study.main(argv) == 0
    printed = capsys.readouterr().out
    assert recorder.ran == [] and not out.exists()
    rows = {line.split("|")[1].strip(): line for line in printed.splitlines() if line.startswith("| ")}
    assert set(preset_steps("study")) | {"total", "stage"} == set(rows)
    total = float(rows["total"].split("|")[9].replace(",", ""))
    stage_totals = [float(line.split("|")[9].replace(",", "")) for name, line in rows.items() if name not in ("total", "stage")]
    assert total == pytest.approx(sum(stage_totals), abs=len(stage_totals))
    assert "100.0 GFLOP/s (given: --gflops)" in printed and "assumptions:" in printed


def test_a_model_without_a_config_cannot_be_estimated(study_inputs, tmp_path, recorder):
    out = tmp_path / "study"
    with pytest.raises(UserError, match=r"^--estimate: no config for the model"):
        run_study.main(study_argv(study_inputs, out, "--estimate", "--gflops", "50"))  # its config.json is empty
    assert recorder.ran == [] and not out.exists()


def test_gflops_without_estimate_is_refused(study_inputs, tmp_path, recorder):
    with pytest.raises(UserError, match=r"^--gflops prices the study for --estimate"):
        run_study.main(study_argv(study_inputs, tmp_path / "study", "--gflops", "50"))
    assert recorder.ran == [] and not (tmp_path / "study").exists()
