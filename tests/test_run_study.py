"""scripts/run_study.py's bookkeeping: relative paths (a study folder moves and resumes), --redo_from,
the thread plan handed to every stage, and the offline error that names the study's flags.

The stages' own work is covered by tests/test_study.py's end-to-end run; here the training stages
are stood in for by a recorder that writes what each stage's last step writes, so the
orchestration (what runs, where, with what) is checked in a second. The prepare stage is real.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

import tiny_assets
from core import threads
from core.cli import UserError
from scripts import run_study
from scripts.study_presets import preset_steps
from test_study import IFEVAL_ROWS

REAL_STAGE = run_study.run_stage


@pytest.fixture()
def study_inputs(tmp_path) -> dict[str, Path]:
    raw = tmp_path / "raw"
    raw.mkdir()
    records = [{"instruction": f"{inst} (variant {n})", "input": inp, "output": out}
               for n in range(6) for inst, inp, out in tiny_assets.INSTRUCTIONS]
    (raw / "alpaca_data.json").write_text(json.dumps(records))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")  # what the study's up-front check looks for in a model folder
    return {"raw": raw, "model": model, "ifeval": tiny_assets.write_jsonl(tmp_path / "ifeval.jsonl", IFEVAL_ROWS)}


def study_argv(inputs: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["--quick", "--offline", "--trainer", "mac", "--out_dir", str(out), "--model_name_or_path", str(inputs["model"]),
            "--raw_dir", str(inputs["raw"]), "--sources", "alpaca_data.json", "--ifeval_data", str(inputs["ifeval"]), *extra]


class Recorder:
    """Stands in for run_stage: the real one for `prepare`, else writes the stage's outputs and its done file."""

    def __init__(self):
        self.ran: list[str] = []
        self.envs: dict[str, dict] = {}

    def __call__(self, stage: run_study.Stage, out: Path, env: dict) -> float:
        self.ran.append(stage.name)
        self.envs[stage.name] = env
        if stage.name == "prepare":
            return REAL_STAGE(stage, out, env)
        for rel in stage.outputs:
            (out / rel).mkdir(parents=True, exist_ok=True) if "." not in Path(rel).name else (out / rel).touch()
        stage.done_file.parent.mkdir(parents=True, exist_ok=True)
        stage.done_file.write_text(json.dumps({"stage": stage.name, "command": stage.command}))
        return 0.1


@pytest.fixture()
def recorder(monkeypatch) -> Recorder:
    rec = Recorder()
    monkeypatch.setattr(run_study, "run_stage", rec)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # no measuring here (tests of the plan below)
    return rec


def test_stage_commands_and_the_record_name_study_files_relative_to_the_study(study_inputs, tmp_path, recorder):
    study = tmp_path / "study"
    assert run_study.main(study_argv(study_inputs, study)) == 0
    assert recorder.ran == preset_steps("quick")
    record = json.loads((study / run_study.STUDY_FILE).read_text())
    words = [w for info in record["stages"].values() for w in info["command"]]
    assert not [w for w in words if str(study) in w]  # no absolute path into the study folder
    sft = record["stages"]["sft"]["command"]
    assert sft[sft.index("--train_file") + 1] == "data/sft_train.jsonl" and sft[sft.index("--output_dir") + 1] == "sft"
    assert (study / "data" / "sft_train.jsonl").is_file()  # the real prepare stage ran inside the study folder
    assert not (Path(run_study.REPO_ROOT) / "data" / "sft_train.jsonl").exists()


def test_a_moved_study_folder_resumes(study_inputs, tmp_path, recorder, capsys):
    first = tmp_path / "study"
    assert run_study.main(study_argv(study_inputs, first)) == 0
    moved = tmp_path / "elsewhere" / "study_copy"
    moved.parent.mkdir()
    shutil.move(str(first), str(moved))
    recorder.ran.clear()
    assert run_study.main(study_argv(study_inputs, moved, "--resume")) == 0  # the same commands: nothing to redo
    assert recorder.ran == []
    record = json.loads((moved / run_study.STUDY_FILE).read_text())
    assert {info["status"] for info in record["stages"].values()} == {"skipped"}
    # the time each stage took and the commit it ran at survive the resume (the study's cost is read from them)
    assert all(info["seconds"] is not None and info["git_commit"] for info in record["stages"].values())


def test_redo_from_reruns_that_stage_and_the_later_ones_and_keeps_the_old_outputs(study_inputs, tmp_path, recorder, capsys):
    study = tmp_path / "study"
    argv = study_argv(study_inputs, study)
    assert run_study.main(argv) == 0
    (study / "dpo" / "adapter_model.safetensors").write_bytes(b"old dpo")
    new_dpo = ["--dpo_args", "--beta 0.2"]
    # --dpo_args reach both DPO runs (gold pairs and checker-judged pairs); a finished stage never changes silently
    with pytest.raises(UserError, match=r"commands of dpo, dpo_if_s0, dpo_if_s1 differ.*--redo_from dpo"):
        run_study.main(argv + new_dpo + ["--resume"])
    recorder.ran.clear()
    capsys.readouterr()
    assert run_study.main(argv + new_dpo + ["--resume", "--redo_from", "dpo"]) == 0
    later = preset_steps("quick")[preset_steps("quick").index("dpo"):]
    assert recorder.ran == later and later[-1] == "report"  # the data steps before dpo are kept
    printed = capsys.readouterr().out
    assert f"--redo_from dpo: redoing {', '.join(later)}" in printed
    (previous,) = (study / run_study.PREVIOUS_DIR).iterdir()
    assert (previous / "dpo" / "adapter_model.safetensors").read_bytes() == b"old dpo"  # moved, not deleted
    assert (previous / "report" / "report.md").is_file()
    record = json.loads((study / run_study.STUDY_FILE).read_text())
    assert {name: info["status"] for name, info in record["stages"].items()} == {
        "prepare": "skipped", "sft": "skipped", "eval_sft": "skipped", "dpo_pairs": "skipped", "if_prompts": "skipped",
        "if_pairs": "skipped", **{name: "ran" for name in later}}
    assert "0.2" in record["stages"]["dpo"]["command"] and "0.2" in record["stages"]["dpo_if_s1"]["command"]


def test_redo_from_needs_a_study_to_redo(study_inputs, tmp_path, recorder):
    with pytest.raises(UserError, match="holds no study.json"):
        run_study.main(study_argv(study_inputs, tmp_path / "empty", "--redo_from", "sft"))


def test_the_threads_are_planned_once_and_handed_to_every_stage(study_inputs, tmp_path, recorder, monkeypatch, capsys):
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.delenv(threads.FREE_CPUS_ENV, raising=False)
    monkeypatch.setattr(threads, "available_cpus", lambda: 2)
    calls = []
    monkeypatch.setattr(threads, "measure_others", lambda: calls.append(1) or (1.3, 3.0))
    assert run_study.main(study_argv(study_inputs, tmp_path / "study")) == 0
    assert len(calls) == 1
    assert {name: env.get(threads.FREE_CPUS_ENV) for name, env in recorder.envs.items()} == {
        name: "1" for name in preset_steps("quick")}
    assert capsys.readouterr().out.count("other processes used 1.3 of 2 CPUs") == 1


def test_without_network_the_study_error_names_its_own_flags():
    """The first README command on an offline machine ended with "pass a local JSONL", naming no flag."""
    stage = run_study.Stage("report", ["sft.eval_sft", "--ifeval", "google/IFEval"], Path("report.md"))
    with pytest.raises(UserError) as error:  # HF_HUB_OFFLINE=1 in tests: the hub load fails at once
        run_study.check_benchmarks([stage], offline=False)
    assert "--ifeval_data PATH" in str(error.value) and "--ifeval_data none" in str(error.value)
    assert "--offline" in str(error.value)


# --------------------------------------------------------------------------- the small preset (issue: the study on a real model)


def test_the_small_preset_runs_sft_dpo_reward_model_and_rloo_then_compares_all_four(study_inputs, tmp_path, recorder):
    study = tmp_path / "study"
    argv = [a for a in study_argv(study_inputs, study) if a != "--quick"] + ["--preset", "small", "--ifbench_data", "none"]
    assert run_study.main(argv) == 0
    assert recorder.ran == ["prepare", "sft", "dpo_pairs", "dpo", "reward", "rloo", "report"]
    record = json.loads((study / run_study.STUDY_FILE).read_text())
    commands = {name: info["command"] for name, info in record["stages"].items()}
    assert commands["sft"][0] == "sft.train_sft_mac" and "chat" == commands["sft"][commands["sft"].index("--template") + 1]
    reward, rloo, report = commands["reward"], commands["rloo"], commands["report"]
    assert reward[0] == "rlhf.train_reward_mac" and reward[reward.index("--train_file") + 1] == "data/prefs_train.jsonl"
    assert rloo[rloo.index("--reward_model_dir") + 1] == "reward" and rloo[rloo.index("--sft_adapter_dir") + 1] == "sft"
    adapters = report[report.index("--adapter_dir") + 1:report.index("--prefs_file")]
    assert adapters == ["sft", "dpo", "rloo"] and report[report.index("--reward_model") + 1] == "reward"
    assert "--ifeval_limit" not in report  # every IFEval prompt
    # what a committed result needs to be reproduced: preset, model, seeds, machine and versions
    assert record["preset"] == "small" and record["model"] == str(study_inputs["model"])
    assert set(record["seeds"]) == set(commands) and record["seeds"]["sft"] == "42 (default)"
    environment = record["environment"]
    assert environment["cpu"] and environment["cpu_count"] >= 1 and environment["packages"]["torch"]


def test_a_study_resumes_only_with_its_own_preset_and_model(study_inputs, tmp_path, recorder):
    study = tmp_path / "study"
    argv = study_argv(study_inputs, study)
    assert run_study.main(argv) == 0
    other_model = tmp_path / "other_model"
    other_model.mkdir()
    (other_model / "config.json").write_text("{}")
    moved = [str(other_model) if a == str(study_inputs["model"]) else a for a in argv]
    with pytest.raises(UserError, match=r"made with model .*model'.*--model_name_or_path"):
        run_study.main(moved + ["--resume"])
    small = [a for a in argv if a != "--quick"] + ["--preset", "small", "--ifbench_data", "none", "--resume"]
    with pytest.raises(UserError, match="made with preset 'quick', not 'small'"):
        run_study.main(small)
    with pytest.raises(UserError, match="name two presets"):
        run_study.main(argv + ["--preset", "small"])


# --------------------------------------------------------------------------- Ctrl-C, resumed times (issue 27, item 5)


def test_ctrl_c_prints_the_exact_resume_command_and_that_command_finishes_the_study(study_inputs, tmp_path, recorder,
                                                                                    monkeypatch, capsys):
    study = tmp_path / "study"
    argv = study_argv(study_inputs, study, "--dpo_args", "--beta 0.2")

    def interrupted_in_sft(stage, out, env):
        if stage.name == "sft":
            raise KeyboardInterrupt
        return recorder(stage, out, env)

    monkeypatch.setattr(run_study, "run_stage", interrupted_in_sft)
    assert run_study.main(argv) == 130
    err = capsys.readouterr().err
    command = err.strip().splitlines()[-1].strip()
    assert command.startswith("python scripts/run_study.py --quick") and command.endswith("--resume")
    record = json.loads((study / run_study.STUDY_FILE).read_text())
    assert record["stages"]["sft"]["status"] == "interrupted" and record["stages"]["prepare"]["status"] == "ran"
    monkeypatch.setattr(run_study, "run_stage", recorder)
    recorder.ran.clear()
    assert run_study.main(shlex.split(command)[2:]) == 0  # the printed command, as typed
    assert recorder.ran == preset_steps("quick")[1:]


def test_a_stage_stops_on_ctrl_c_and_its_output_is_kept(tmp_path, monkeypatch):
    """Ctrl-C sent to run_study alone (not its process group): the stage gets it too, and says so in its log."""
    (tmp_path / "slow_stage.py").write_text(
        "import sys, time\nprint('started', flush=True)\ntry:\n    time.sleep(60)\n"
        "except KeyboardInterrupt:\n    print('stage stopped cleanly', flush=True)\n    sys.exit(130)\n")
    monkeypatch.setattr(run_study, "STOP_WAIT_S", 0.5)
    log = tmp_path / "logs" / "slow.log"

    def interrupt_once_started():
        while "started" not in (log.read_text() if log.is_file() else ""):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_once_started, daemon=True).start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_study.run_stage(run_study.Stage("slow", ["slow_stage"], tmp_path / "done"), tmp_path,
                            {**run_study.stage_env(False, {}), "PYTHONPATH": str(tmp_path)})
    assert "stage stopped cleanly" in log.read_text() and time.monotonic() - started < 30


def test_resume_command_keeps_the_flags_drops_redo_from_and_names_the_folder():
    argv = ["--quick", "--out_dir", "runs/a", "--dpo_args", "--beta 0.2", "--redo_from", "dpo"]
    assert run_study.resume_command(argv) == ("python scripts/run_study.py --quick --out_dir runs/a --dpo_args "
                                              "'--beta 0.2' --resume")
    assert run_study.resume_command(argv + ["--resume"], "/x/study").endswith("--out_dir /x/study --dpo_args '--beta 0.2' --resume")


def test_a_resumed_study_shows_each_skipped_stages_earlier_time_and_unknown_where_none_was_kept(
        study_inputs, tmp_path, recorder, capsys):
    study, argv = tmp_path / "study", study_argv(study_inputs, tmp_path / "study")
    assert run_study.main(argv) == 0
    record = json.loads((study / run_study.STUDY_FILE).read_text())
    earlier = {name: info["seconds"] for name, info in record["stages"].items()}
    record["stages"]["dpo"]["seconds"] = None  # e.g. a stage whose output was made outside the study
    (study / run_study.STUDY_FILE).write_text(json.dumps(record))
    capsys.readouterr()
    assert run_study.main(argv + ["--resume"]) == 0
    printed = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in printed.split("=== study summary")[1].splitlines()[2:2 + len(earlier)]}
    assert rows["prepare"] == ["skipped", f"{earlier['prepare']:.1f}s"] and rows["dpo"] == ["skipped", "unknown"]
    assert "a skipped stage shows the time it took when it ran, unknown where no time was recorded" in printed
    resumed = json.loads((study / run_study.STUDY_FILE).read_text())["stages"]
    assert resumed["sft"]["seconds"] == earlier["sft"] and resumed["dpo"]["seconds"] is None
