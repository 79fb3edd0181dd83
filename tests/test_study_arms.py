"""The study's instruction-following arms (issue 28): if_prompts, if_pairs, dpo_if (a run of the dpo stage) and rlvr
(a run of the rloo stage with --reward checker), their commands, the flags that reach them, --redo_from, and the small
preset that gains them by listing them. The stages are stood in for by tests/test_run_study.py's recorder; the real
run of every step is tests/test_study.py's slow quick study.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.cli import UserError
from scripts import run_study
from scripts.study_presets import PRESETS, PRIMARY_CONTRASTS, QUICK_HELD_OUT, build_stages, preset_steps
from test_run_study import recorder, study_argv, study_inputs  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parents[1]
NEW_STEPS = ("if_prompts", "if_pairs", "dpo_if_s0", "rlvr_s0")
QUICK_ARMS = [f"{arm}_s{seed}" for seed in (0, 1) for arm in ("dpo_if", "control", "reward_if", "rlhf", "rlvr")]


def commands_of(study: Path) -> dict[str, list[str]]:
    return {name: info["command"] for name, info in json.loads((study / run_study.STUDY_FILE).read_text())["stages"].items()}


def value(command: list[str], flag: str, count: int = 1):
    index = command.index(flag)
    return command[index + 1] if count == 1 else command[index + 1:index + 1 + count]


def test_the_quick_study_runs_every_arm_on_the_files_the_earlier_steps_write(study_inputs, tmp_path, recorder):
    study = tmp_path / "study"
    assert run_study.main(study_argv(study_inputs, study)) == 0
    assert recorder.ran == preset_steps("quick") and set(NEW_STEPS) <= set(recorder.ran)
    commands = commands_of(study)
    if_prompts, if_pairs, dpo_if, rlvr, report = (commands[name] for name in (*NEW_STEPS, "report"))
    assert if_prompts[0] == "scripts.prepare_if_prompts" and value(if_prompts, "--sft_file") == "data/sft_train.jsonl"
    assert value(if_prompts, "--out_dir") == "data/if" and value(if_prompts, "--num_train") == "200"
    assert value(if_prompts, "--decontaminate") == str(study_inputs["ifeval"])  # the IFEval file the study scores
    assert if_pairs[0] == "scripts.prepare_dpo_data" and value(if_pairs, "--judge") == "checker"
    assert (value(if_pairs, "--from_sft_model"), value(if_pairs, "--prompts"), value(if_pairs, "--out_dir")) == (
        "sft", "data/if/if_train.jsonl", "data/if_pairs")
    # dpo_if: the registered dpo stage's own module, in its own folder, on the judged pairs, with DPO's recipe
    assert dpo_if[0] == "dpo.train_dpo_mac" and value(dpo_if, "--output_dir") == "dpo_if_s0" and value(dpo_if, "--seed") == "0"
    assert value(dpo_if, "--train_file") == "data/if_pairs/prefs_train.jsonl" and value(dpo_if, "--val_file") == "data/if_pairs/prefs_val.jsonl"
    assert value(dpo_if, "--per_device_train_batch_size") == value(commands["dpo"], "--per_device_train_batch_size")
    assert value(dpo_if, "--max_steps") == "8" and value(dpo_if, "--max_length") == "512"  # the preset's dpo_if flags win
    assert value(if_prompts, "--held_out") == QUICK_HELD_OUT and value(if_pairs, "--num_pairs") == "96"
    assert rlvr[0] == "rlhf.train_rloo_mac" and value(rlvr, "--output_dir") == "rlvr_s0" and value(rlvr, "--reward") == "checker"
    assert value(rlvr, "--prompt_file") == "data/if/if_train.jsonl" and "--reward_model_dir" not in rlvr
    assert value(rlvr, "--monitor_files", 2) == ["data/if/if_val_seen.jsonl", "data/if/if_val_heldout.jsonl"]
    # the report: a column per policy the study trained (each arm's seeds together), the IF sets beside IFEval, the first
    # seed's reward model to score with
    assert value(report, "--adapter_dir", 10) == ["sft", "dpo", "control_s0", "control_s1", "dpo_if_s0", "dpo_if_s1",
                                                  "rlhf_s0", "rlhf_s1", "rlvr_s0", "rlvr_s1"]
    assert value(report, "--if_sets") == "data/if" and value(report, "--reward_model") == "reward_if_s0"
    assert "--if_sets" not in commands["eval_sft"] and value(report, "--primary_contrasts") == PRIMARY_CONTRASTS.split()[1]


def test_a_run_folder_is_not_its_stage_but_its_config_file_is_the_stages(study_inputs, tmp_path):
    args = run_study.parse_args(study_argv(study_inputs, tmp_path / "study"))
    stages = {stage.name: stage for stage in build_stages(args, tmp_path / "study", "cuda")}
    assert stages["dpo_if_s0"].run_config == tmp_path / "study" / "dpo_if_s0" / "dpo_config.json"
    assert stages["rlvr_s1"].run_config == tmp_path / "study" / "rlvr_s1" / "rloo_config.json"
    assert stages["control_s1"].run_config == tmp_path / "study" / "control_s1" / "sft_config.json"
    assert stages["rlvr_s0"].done_file == tmp_path / "study" / "rlvr_s0" / "metrics.json" and stages["rlvr_s0"].outputs == ("rlvr_s0",)
    assert stages["dpo_if_s0"].command[0] == "dpo.train_dpo_cuda" and stages["rlvr_s0"].command[0] == "rlhf.train_rloo_cuda"
    assert stages["if_prompts"].outputs == ("data/if",) and stages["if_pairs"].outputs == ("data/if_pairs",)


def test_flags_reach_every_run_of_a_stage_and_a_runs_own_flags_win(study_inputs, tmp_path, recorder):
    study = tmp_path / "study"
    assert run_study.main(study_argv(study_inputs, study, "--dpo_args", "--beta 0.3 --max_steps 5", "--dpo_if_args", "--beta 0.5",
                                     "--rloo_args", "--beta 0.01", "--rlvr_args", "--reward_shape binary",
                                     "--if_prompts_args", "--num_val 7", "--if_pairs_args", "--samples_per_prompt 3")) == 0
    commands = commands_of(study)
    assert value(commands["dpo"], "--beta") == "0.3" and value(commands["dpo_if_s1"], "--beta") == "0.5"
    assert value(commands["dpo_if_s1"], "--max_steps") == "5"  # the user's --dpo_args over the preset's dpo_if flags
    assert value(commands["rlvr_s1"], "--beta") == "0.01" and value(commands["rlvr_s1"], "--reward_shape") == "binary"
    assert value(commands["rlhf_s1"], "--beta") == "0.01" and "--reward_shape" not in commands["rlhf_s1"]
    assert value(commands["if_prompts"], "--num_val") == "7" and value(commands["if_pairs"], "--samples_per_prompt") == "3"
    for command in commands.values():
        flags = [w for w in command if w.startswith("--")]
        assert len(flags) == len(set(flags)), command


@pytest.mark.parametrize("extra, message", [
    (["--if_prompts_args", "--held_out made:up"],
     r"^--if_prompts_args \(stage if_prompts\): --held_out: unknown IFEval instruction type\(s\) made:up"),
    (["--if_pairs_args", "--samples_per_prompt 1"], r"^--if_pairs_args \(stage if_pairs\): --samples_per_prompt must be >= 2"),
    (["--dpo_if_args", "--betta 1"], r"^--dpo_args or --dpo_if_args \(stage dpo_if_s0\): unknown config key\(s\): --betta"),
    (["--rlvr_args", "--reward_shape square"], r"^--rloo_args or --rlvr_args \(stage rlvr_s0\): .*reward_shape"),
    (["--control_args", "--max_steps 5"], r"^--control_args \(stage control_s0\): match_tokens_of and max_steps each set"),
])
def test_a_bad_flag_of_a_new_step_fails_in_one_line_before_any_stage_runs(study_inputs, tmp_path, recorder, extra, message):
    study = tmp_path / "study"
    with pytest.raises(UserError, match=message):
        run_study.main(study_argv(study_inputs, study, *extra))
    assert recorder.ran == [] and not study.exists()


def test_redo_from_knows_the_new_steps_and_sets_their_outputs_aside(study_inputs, tmp_path, recorder, capsys):
    study = tmp_path / "study"
    argv = study_argv(study_inputs, study)
    assert run_study.main(argv) == 0
    recorder.ran.clear()
    assert run_study.main(argv + ["--redo_from", "if_prompts", "--if_prompts_args", "--num_train 50"]) == 0
    assert recorder.ran == ["if_prompts", "if_pairs", "dpo", *QUICK_ARMS, "report"]
    (previous,) = (study / run_study.PREVIOUS_DIR).iterdir()
    assert (previous / "data" / "if" / "if_stats.json").is_file() and (previous / "data" / "if_pairs").is_dir()
    assert f"--redo_from if_prompts: redoing if_prompts, if_pairs, dpo, {', '.join(QUICK_ARMS)}, report" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        run_study.parse_args(["--redo_from", "no_such_step"])


def test_the_help_says_which_steps_the_new_flags_reach(capsys):
    with pytest.raises(SystemExit):
        run_study.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--dpo_args FLAGS extra flags (one quoted string) for the stages dpo (dpo.train_dpo_*) and dpo_if" in text
    assert "--dpo_if_args FLAGS extra flags (one quoted string) for the stage dpo_if" in text and "after --dpo_args" in text
    assert "--rlvr_args FLAGS" in text and "after --rloo_args" in text and "if_prompts, if_pairs, dpo, dpo_if" in text


# --------------------------------------------------------------------------- the small preset: unchanged, and extensible


def test_the_preset_builds_the_commands_its_committed_study_ran():
    """results/smollm2-135m-instruct was made with the study preset: it must still resume (the same commands)."""
    record = json.loads((REPO / "results" / "smollm2-135m-instruct" / "study.json").read_text())
    args = run_study.parse_args(record["argv"])
    built = {stage.name: stage.command for stage in build_stages(args, Path("."), "mac")}
    recorded = {name: info["command"] for name, info in record["stages"].items()}
    built["prepare"] = [str(args.raw_dir) if w == str(args.raw_dir.resolve()) else w for w in built["prepare"]]
    # publishing rewrote the benchmark file's path (path/to/<name>): not a file here, so it is not passed on
    words = recorded["if_prompts"]
    if "--decontaminate" in words and "--decontaminate" not in built["if_prompts"]:
        at = words.index("--decontaminate")
        recorded["if_prompts"] = words[:at] + words[at + 2:]
    assert built == recorded


def test_the_small_preset_gains_the_arms_by_listing_them_and_a_finished_study_adds_them(study_inputs, tmp_path, recorder,
                                                                                          monkeypatch):
    study = tmp_path / "study"
    argv = [a for a in study_argv(study_inputs, study) if a != "--quick"] + ["--preset", "small", "--ifbench_data", "none"]
    assert run_study.main(argv) == 0
    listed = ("prepare", "sft", "dpo_pairs", "if_prompts", "if_pairs", "dpo", "dpo_if", "reward", "rloo", "rlvr", "report")
    monkeypatch.setitem(PRESETS["small"], "stages", listed)
    recorder.ran.clear()
    assert run_study.main(argv + ["--redo_from", "report"]) == 0  # the finished runs are kept; the arms run, then the report
    assert recorder.ran == ["if_prompts", "if_pairs", "dpo_if", "rlvr", "report"]
    commands = commands_of(study)
    assert value(commands["report"], "--adapter_dir", 5) == ["sft", "dpo", "dpo_if", "rloo", "rlvr"]
    assert value(commands["report"], "--reward_model") == "reward" and value(commands["report"], "--if_sets") == "data/if"
    assert value(commands["dpo_if"], "--beta") == value(commands["dpo"], "--beta") == "0.1"  # DPO's recipe
    assert value(commands["rlvr"], "--num_generations") == "4" and value(commands["if_pairs"], "--num_pairs") == "400"
