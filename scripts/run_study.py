"""The whole study in one command: prepare -> SFT -> DPO pairs [-> IF prompts -> checker-judged pairs] -> DPO [-> DPO on
the judged pairs] [-> reward model -> RLOO] [-> RLVR] -> report.

Run from the repository root:

    python scripts/run_study.py --quick               # laptop CPU, minutes: a data sample, few steps, every arm at toy size
    python scripts/run_study.py --preset study --estimate   # what the study would cost here, stage by stage; runs nothing
    python scripts/run_study.py --preset study        # issue 30's design: seeded arms from one SFT run, matched tokens
    python scripts/run_study.py --preset small        # SmolLM2-135M-Instruct through SFT, DPO, reward model, RLOO; all of IFEval
    python scripts/run_study.py                       # the full preset, for a GPU: TinyLlama, all data, all of IFEval
    python scripts/run_study.py --quick --resume      # continue a study that stopped (finished stages are skipped)

    # an offline machine: local paths for the model, the raw data and the benchmark
    python scripts/run_study.py --quick --offline --model_name_or_path /models/stories260K \\
        --raw_dir /data --sources alpaca_data.json --ifeval_data /data/ifeval_input_data.jsonl

The presets (stages and flags) are in ``scripts/study_presets.py``. Each stage is the project's own
command, run as a subprocess with the flags the preset gives, where ``--sft_args``, ``--eval_args`` (both
evaluation stages: ``eval_sft`` and ``report``), ``--pairs_args``, ``--dpo_args``, ``--reward_args`` and
``--rloo_args`` add flags or replace the preset's value of one (``--dpo_args`` reach both DPO runs, ``dpo``
and ``dpo_if``, and ``--rloo_args`` both RLOO runs, ``rloo`` and ``rlvr``: the arms share a recipe),
as do ``--if_prompts_args``, ``--if_pairs_args``, ``--dpo_if_args`` and ``--rlvr_args`` for one step
each (``--help`` says which step each reaches); each flag appears once in the command,
which is printed before it runs, exactly as it runs. ``--ifeval_limit N`` scores the first N IFEval
prompts (``--ifbench_limit N``: IFBench) wherever the study scores them. Before the first stage runs,
every stage's flags are checked by that stage's own parser and every input path (model, raw data,
benchmark files, pairs file, a tokenizer) is checked (``scripts/study_checks.py``): a typo is one line
naming the flag, and nothing is written. Ctrl-C stops the running stage and prints the command that
continues the study (``--resume``); the stages:
``scripts/prepare_sft_data.py`` (with ``--download`` unless ``--offline``), ``sft.train_sft_mac``
(``_cuda`` on a CUDA machine), ``sft.eval_sft`` (base vs SFT; quick and full presets),
``scripts/prepare_dpo_data.py --from_sft_model`` (or ``--pairs_file``), ``dpo.train_dpo_mac``, in the
quick preset ``scripts/prepare_if_prompts.py`` (``data/if/``: constrained prompts from the SFT data,
decontaminated against the local benchmark files), ``scripts/prepare_dpo_data.py --judge checker``
(``data/if_pairs/``), ``dpo.train_dpo_mac`` on those pairs (``dpo_if/``) and ``rlhf.train_rloo_mac
--reward checker`` (RLVR, ``rlvr/``), in the small preset ``rlhf.train_reward_mac`` and
``rlhf.train_rloo_mac``, and ``sft.eval_sft`` again over every model with IFEval (IFBench where its
data is reachable; the IF validation sets of ``data/if/`` with ``--if_sets``), preference accuracy and,
with a reward model, its scores: ``<out_dir>/report/report.md``, which opens with the answer (paired differences between
adjacent stages with intervals and p-values). A model or benchmark named by hub id is downloaded by the
stage that needs it (``--offline`` forbids that).

The ``study`` preset (and ``quick`` at toy size) trains its arms from the one SFT run, each once per seed
(``--seeds S``: 3 in ``study``, 2 in ``quick``) in ``<arm>_s<k>/`` with ``--seed k``: DPO on the checker-judged
pairs, the matched-compute control (SFT continued on their chosen answers for as many tokens as that
seed's DPO run trained), a reward model and RLOO with it (RLHF), and RLOO with the checker (RLVR); the
report scores them all (``scripts/study_arms.py``; ``--control_args`` and ``--rlhf_args`` reach one arm
each). ``--estimate`` prints each stage's counted tokens and estimated seconds and the assumptions
behind them, and runs nothing (``scripts/study_estimate.py``; ``--gflops G`` prices at a given rate).

``<out_dir>`` (default ``runs/study_<preset>``) holds ``data/``, a folder per training run (``sft/``,
``dpo/``, ``dpo_if/``, ``reward/``, ``rloo/``, ``rlvr/``), ``eval_sft/``, ``report/``, ``logs/<stage>.log`` and ``study.json``
(preset, model, the stage commands, status and wall times, seeds, the machine and the package
versions). A study resumes only with the preset and model that started it. A directory holding anything else is refused unless ``--resume`` is given; ``--resume`` skips
the finished stages and refuses a study whose finished stages ran other commands (flags of the stage
that failed may change): no run is ever overwritten silently. ``--redo_from STAGE`` (implies
``--resume``) runs that stage and every later one again: their earlier outputs are moved to
``<out_dir>/previous/<time>/``, and their flags may change.

Stages run inside ``<out_dir>`` and name its files relative to it (``data/sft_train.jsonl``, ``sft``), in
their commands, in ``study.json`` and in each run's saved config, so a study folder can be copied or
moved and resumed there. Inputs outside it (``--raw_dir``, a local model, benchmark files) are recorded
by absolute path and must stay where they are.

The CPU threads are planned once for the whole study (core/threads.py): if other processes hold CPUs
when it starts, one note says so and every stage uses the CPUs left free; ``OMP_NUM_THREADS`` wins.

    python scripts/run_study.py --quick --resume --redo_from dpo --dpo_args "--beta 0.2"   # DPO and the report again
"""
from __future__ import annotations

import json
import os
import shlex
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a file: make `core` and `evaluation` importable
    sys.path.insert(0, str(REPO_ROOT))

from core.cli import UserError, run_cli  # noqa: E402
from core.config import write_json_atomic  # noqa: E402
from core.engine_verdicts import VERDICT_FILE_ENV  # noqa: E402
from core.log import FinalRedraws  # noqa: E402
from scripts.study_checks import check_benchmarks, check_inputs, check_limits  # noqa: E402
from scripts import study_cli  # noqa: E402
from scripts.study_cli import PREVIOUS_DIR  # noqa: E402
from scripts.study_presets import (PRESETS, Stage, build_stages, flag_groups, local, merge_flags, preset_name,  # noqa: E402
                                   seed_count)

STUDY_FILE = "study.json"
ENGINE_VERDICTS = "engine_verdicts.json"  # core/engine_verdicts.py: a model vLLM cannot run is tried once per study
STOP_WAIT_S = 10.0  # how long a stage has to stop after Ctrl-C before it is stopped


def parse_args(argv: Sequence[str] | None):
    return study_cli.parse_args(argv, __doc__.split("\n\n")[0])


def _cuda_available() -> bool:
    if not (Path("/proc/driver/nvidia").exists() or shutil.which("nvidia-smi")):
        return False  # no NVIDIA driver, no CUDA: not worth a torch import before the checks
    import torch

    return torch.cuda.is_available()


def redone_stages(stages: Sequence[Stage], redo_from: str | None) -> list[Stage]:
    """``redo_from`` and every stage after it (none without ``--redo_from``)."""
    names = [s.name for s in stages]
    return list(stages[names.index(redo_from):]) if redo_from else []


def check_same_study(record: dict, preset: str | None, model: str | None) -> None:
    """``--resume`` continues the study it finds only with the preset and base model that started it."""
    before = {"preset": record.get("preset"), "model": record.get("model")}
    for what, now in (("preset", preset), ("model", model)):
        if None not in (before[what], now) and before[what] != now:
            raise UserError(f"--resume: this study was made with {what} {before[what]!r}, not {now!r}: resume with "
                            f"--{'preset' if what == 'preset' else 'model_name_or_path'} {before[what]} or choose another --out_dir")


def check_out_dir(out: Path, stages: Sequence[Stage], resume: bool, redo: Sequence[Stage] = (),
                  preset: str | None = None, model: str | None = None) -> dict:
    """The study record to continue (``--resume``), or a fresh one; refuses to mix two studies."""
    record_path = out / STUDY_FILE
    commands = {s.name: s.command for s in stages}
    if resume:
        if not record_path.is_file():
            raise UserError(f"--resume: {out} holds no {STUDY_FILE}; drop --resume to start a study there")
        record = json.loads(record_path.read_text(encoding="utf-8"))
        check_same_study(record, preset, model)
        # A finished stage must not change under the stages built on it; an unfinished one (or one
        # being redone) may, e.g. new flags for the stage that failed, and runs with its new command.
        changed = [s.name for s in stages if s not in redo and s.done_file.is_file()
                   and merged(record["stages"].get(s.name, {}).get("command")) != s.command]
        if changed:
            raise UserError(f"--resume: the commands of {', '.join(changed)} differ from the finished stages in {out} "
                            f"(see its {STUDY_FILE}); resume with the same flags, redo from the first of them "
                            f"(--redo_from {changed[0]}), or choose another --out_dir")
        for name, command in commands.items():
            record["stages"].setdefault(name, {"status": "pending"})["command"] = command
        return record
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} is not empty (an earlier study?): pass --resume to continue it, or choose another --out_dir")
    return {"stages": {name: {"command": command, "status": "pending"} for name, command in commands.items()}}


def merged(command: list[str] | None) -> list[str] | None:
    """A recorded command as this version builds it (each flag once): a study started before flags were
    merged resumes."""
    return command and [command[0], *merge_flags(command[1:])]


def set_aside(out: Path, redo: Sequence[Stage], log=print) -> Path | None:
    """Move the outputs (and logs) of the stages to redo into ``previous/<time>/``: nothing is deleted."""
    present = [rel for stage in redo for rel in (*stage.outputs, f"logs/{stage.name}.log") if (out / rel).exists()]
    log(f"--redo_from {redo[0].name}: redoing {', '.join(s.name for s in redo)}")
    if not present:
        return None
    target = out / PREVIOUS_DIR / time.strftime("%Y%m%d-%H%M%S")
    while target.exists():  # two redos in one second
        target = target.with_name(target.name + "+")
    for rel in present:
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(out / rel), str(target / rel))
    log(f"their earlier outputs ({', '.join(present)}) moved to {target.relative_to(out)}/ in {out}")
    return target


def stage_env(offline: bool, threads_env: dict[str, str]) -> dict[str, str]:
    """The environment every stage runs in: unbuffered output, this repository importable from the
    study folder, the study's thread plan, and no hub access with ``--offline``."""
    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONUNBUFFERED="1",  # a stage's output shows as it happens, not at exit
                PYTHONPATH=python_path, **threads_env,
                **({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"} if offline else {}))


def run_stage(stage: Stage, out: Path, env: dict) -> float:
    """Run one stage's command inside the study folder, its output shown and kept in logs/<stage>.log;
    returns the wall time."""
    command = [sys.executable, "-m", *stage.command]
    if stage.run_config is not None and stage.run_config.is_file():
        command += ["--resume", "true"]  # an interrupted training run continues from its last checkpoint
    print(f"\n=== {stage.name} (in {out}): {shlex.join(['python', '-m', *command[2:]])}", flush=True)
    log_path = out / "logs" / f"{stage.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    to_log, to_console = FinalRedraws(), None if sys.stdout.isatty() else FinalRedraws()  # a file: bars' last state
    with log_path.open("wb") as log, subprocess.Popen(command, cwd=out, env=env, stdout=subprocess.PIPE,
                                                       stderr=subprocess.STDOUT) as proc:
        try:
            copy_output(proc, log, (to_console, to_log))
        except KeyboardInterrupt:
            let_it_stop(proc, log, (to_console, to_log))
            log.write(to_log.finish())
            raise
        code = proc.wait()
        log.write(to_log.finish())
        sys.stdout.buffer.write(to_console.finish() if to_console else b"")
    seconds = time.perf_counter() - started
    if code != 0:
        raise StageFailed(f"stage {stage.name} failed (exit code {code}) after {seconds:.0f} s; its output is in {log_path}. "
                          "Fix the cause and rerun with --resume to continue from this stage (--redo_from STAGE to "
                          "redo an earlier one too)", round(seconds, 1))
    return seconds


class StageFailed(UserError):
    """A stage that exited with an error, after ``seconds``."""

    def __init__(self, message: str, seconds: float):
        super().__init__(message)
        self.seconds = seconds


def copy_output(proc: subprocess.Popen, log, reducers: tuple, until: float | None = None) -> None:
    """Show the stage's output and keep it in its log, until it closes it (or ``until``, a time.monotonic()).

    ``reducers``: (console, log) ``FinalRedraws`` or None; a file keeps each progress bar's last state only."""
    to_console, to_log = reducers
    fd = proc.stdout.fileno()
    while until is None or select.select([fd], [], [], max(0.0, until - time.monotonic()))[0]:
        chunk = os.read(fd, 65536)  # chunks, not lines: progress bars stay live
        if not chunk:
            return
        sys.stdout.buffer.write(to_console.feed(chunk) if to_console else chunk)
        sys.stdout.flush()
        log.write(to_log.feed(chunk) if to_log else chunk)
        log.flush()  # `tail -f logs/<stage>.log` shows it as it happens


def let_it_stop(proc: subprocess.Popen, log, reducers: tuple) -> None:
    """Ctrl-C: the terminal sent it to the stage too; let the stage say where it stopped (a training run names
    its last checkpoint). A stage the signal did not reach (sent to this process alone) gets it now."""
    copy_output(proc, log, reducers, until=time.monotonic() + STOP_WAIT_S)
    for stop in (lambda: proc.send_signal(signal.SIGINT), proc.kill):
        try:
            proc.wait(timeout=1.0)
            return
        except subprocess.TimeoutExpired:  # still running: the signal did not reach it (or it hangs)
            stop()
            copy_output(proc, log, reducers, until=time.monotonic() + STOP_WAIT_S)


def summary(record: dict, out: Path) -> str:
    lines = ["", "=== study summary", f"{'stage':10} {'status':8} {'wall time':>10}"]
    for name, info in record["stages"].items():
        seconds = info.get("seconds")
        lines.append(f"{name:10} {info['status']:8} {'unknown' if seconds is None else f'{seconds:9.1f}s':>10}")
    unknown = any(info.get("seconds") is None for info in record["stages"].values())
    lines.append(f"{'total':10} {'':8} {record['total_seconds']:9.1f}s (this run; a skipped stage shows the time it took "
                 f"when it ran{', unknown where no time was recorded' if unknown else ''})")
    metrics_path = out / "report" / "metrics.json"
    if metrics_path.is_file():
        from evaluation.report import summary_table

        metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
        lines += ["", summary_table(metrics["models"], list(metrics.get("instruction_following") or {})), ""]
        if metrics.get("comparisons"):  # the study's answer, with its intervals and p-values
            from evaluation.study_report import answer_lines

            lines += answer_lines(metrics["comparisons"])
        lines.append(f"report: {out / 'report' / 'report.md'} (charts in {out / 'report' / 'charts'})")
    return "\n".join(lines)


def stage_seeds(stages: Sequence[Stage]) -> dict[str, str]:
    """Each stage's seed as its command sets it (the last --seed wins), else its config's default (42)."""
    seeds = {}
    for stage in stages:
        given = [stage.command[i + 1] for i, word in enumerate(stage.command[:-1]) if word == "--seed"]
        seeds[stage.name] = given[-1] if given else "42 (default)"
    return seeds


def run_stages(stages: Sequence[Stage], record: dict, out: Path, env: dict, commit: str | None) -> None:
    """Run the stages not yet done, in order, keeping each one's status and wall time in study.json."""
    for stage in stages:
        info = record["stages"][stage.name]
        if stage.done_file.is_file():
            # The time and commit of the run that did it stay (from the earlier study.json); none if never recorded.
            info.update(status="skipped", seconds=info.get("seconds"))
            print(f"\n=== {stage.name}: already done ({stage.done_file} exists), skipped")
        else:
            info.update(status="running", seconds=None)  # still so after a crash: scripts/publish_study.py says it
            write_json_atomic(out / STUDY_FILE, record)
            try:
                seconds = run_stage(stage, out, env)
            except BaseException as stopped:  # its time, where it ran to the end: a resume that finds it done shows it
                info.update(status="interrupted" if isinstance(stopped, KeyboardInterrupt) else "failed",
                            seconds=getattr(stopped, "seconds", None))
                write_json_atomic(out / STUDY_FILE, record)
                raise
            info.update(status="ran", seconds=round(seconds, 1), git_commit=commit)
            print(f"=== {stage.name}: done in {info['seconds']:.1f} s", flush=True)
        write_json_atomic(out / STUDY_FILE, record)


def resume_command(argv: Sequence[str], out_dir: str | Path | None = None) -> str:
    """The command that continues the study ``argv`` started: its flags with ``--resume`` and without
    ``--redo_from`` (what it redid is continued, not set aside again); ``out_dir`` replaces its ``--out_dir``."""
    groups = flag_groups(argv)
    groups.pop("--redo_from", None)
    if out_dir is not None:
        groups["--out_dir"] = ["--out_dir", str(out_dir)]
    groups["--resume"] = ["--resume"]
    return shlex.join(["python", "scripts/run_study.py", *(word for group in groups.values() for word in group)])


def main(argv: Sequence[str] | None = None) -> int:
    from core.environment import git_commit, machine_facts
    from core.threads import plan_for_stages

    args = parse_args(argv)
    try:
        preset = preset_name(args)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    out = (args.out_dir or REPO_ROOT / "runs" / f"study_{preset}").resolve()
    trainer = args.trainer if args.trainer != "auto" else ("cuda" if _cuda_available() else "mac")
    stages = build_stages(args, out, trainer)
    if args.redo_from and args.redo_from not in [s.name for s in stages]:
        raise UserError(f"--redo_from {args.redo_from}: the {preset} preset has no such stage (its stages: "
                        f"{', '.join(s.name for s in stages)})")
    redo = redone_stages(stages, args.redo_from)
    model = local(args.model_name_or_path or PRESETS[preset]["model"])
    if args.gflops is not None and not args.estimate:
        raise UserError("--gflops prices the study for --estimate: add --estimate (a study runs at the machine's own speed)")
    if args.estimate:  # before anything is checked or written: what the study would cost here
        from scripts.study_estimate import print_estimate

        print_estimate(stages, model, preset, seed_count(args, PRESETS[preset]), args.gflops)
        return 0
    record = check_out_dir(out, stages, args.resume or bool(redo), redo, preset, model)
    if not args.offline:
        from core.hub import go_offline_if_unreachable

        go_offline_if_unreachable()  # no network: the stages work from the local cache (os.environ reaches them)
    from core.hub import offline_mode

    check_limits(args, stages)
    check_inputs(stages, pairs_file=args.pairs_file, offline=args.offline or offline_mode())
    check_benchmarks(stages, args.offline)
    env = stage_env(args.offline, plan_for_stages())  # threads planned once: chained stages do not measure each other
    env[VERDICT_FILE_ENV] = str((out / ENGINE_VERDICTS).resolve())  # what vLLM refuses, decided by the first stage that asks
    out.mkdir(parents=True, exist_ok=True)
    if redo:
        set_aside(out, redo)
    commit = git_commit(REPO_ROOT)
    record.update(preset=preset, model=model, argv=list(sys.argv[1:] if argv is None else argv),
                  seeds=stage_seeds(stages), environment={**machine_facts(), "git_commit": commit})
    started = time.perf_counter()
    try:
        run_stages(stages, record, out, env, commit)
    except KeyboardInterrupt:
        print(f"\ninterrupted; the finished stages are kept (their status is in {out / STUDY_FILE}). Continue the "
              f"study with:\n  {resume_command(record['argv'])}", file=sys.stderr)
        return 130
    record["total_seconds"] = round(time.perf_counter() - started, 1)
    write_json_atomic(out / STUDY_FILE, record)
    print(summary(record, out))
    return 0


if __name__ == "__main__":
    run_cli(main)
