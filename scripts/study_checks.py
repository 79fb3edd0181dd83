"""What ``scripts/run_study.py`` checks before its first stage runs, so that a typo costs a second, not a stage.

- every stage's flags, as merged from the preset and the user's ``--<stage>_args``, parsed and checked by
  that stage's own parser (``main.check_argv`` of its module: the same strict config or argparse the
  stage uses; nothing heavy is imported);
- every input the user named: the base model (a directory holding ``config.json``, a ``.gguf`` file, or a
  hub id, which offline must be in the hub cache), a tokenizer or model given inside ``--<stage>_args``,
  the raw SFT data (``--raw_dir``/``--sources``, unless the prepare stage may download them) and the
  preference pairs (``--pairs_file``), and the IF benchmarks' prompts (:func:`check_benchmarks`).

Paths that earlier stages produce (the SFT run, the pairs) are not checked: they do not exist yet.
Each problem is one line naming the flag (and the stage): ``--dpo_args (stage dpo): unknown config
key(s): --betta (did you mean --beta?)``.
"""
from __future__ import annotations

import argparse
import importlib
from pathlib import Path
from typing import Sequence

from core.cli import UserError, parse_raising
from core.model_source import check_model_source
from scripts import prepare_sft_data
from scripts.raw_sources import raw_files_to_fetch
from scripts.study_arms import arm_of
from scripts.study_presets import EXTRA_ARGS, PRESETS, Stage, preset_name

# Flags of a stage's command that name a model or tokenizer the user gave (in --<stage>_args).
MODEL_FLAGS = {"--model_name_or_path": "config.json", "--base_model": "config.json",
               "--tokenizer_name_or_path": "tokenizer_config.json"}


def user_flag(stage: str) -> str:
    """How the user reaches a step's flags: ``--dpo_args (stage dpo)``, ``--dpo_args or --dpo_if_args (stage
    dpo_if)`` where two flags reach it, or ``stage prepare`` where none does."""
    names = [f"--{name}_args" for name, stages in EXTRA_ARGS.items() if arm_of(stage) in stages]
    return f"{' or '.join(names)} (stage {stage})" if names else f"stage {stage}"


def flag_value(command: Sequence[str], flag: str) -> str | None:
    """The value a (merged) command gives ``flag`` (``--flag value`` or ``--flag=value``), else None."""
    for index, word in enumerate(command):
        if word == flag and index + 1 < len(command):
            return command[index + 1]
        if word.startswith(flag + "="):
            return word.split("=", 1)[1]
    return None


def check_stage_flags(stages: Sequence[Stage]) -> None:
    """Parse every stage's command with the stage's own parser; the first bad flag is a UserError naming it."""
    for stage in stages:
        module, *argv = stage.command
        try:
            importlib.import_module(module).main.check_argv(argv)
        except UserError as exc:
            raise UserError(f"{user_flag(stage.name)}: {exc}") from None


def check_models(stages: Sequence[Stage], model_flag: str, offline: bool) -> None:
    """The base model (``model_flag``: how the user named it) and any model or tokenizer in a stage's flags."""
    checked = set()
    for stage in stages:
        for flag, marker in MODEL_FLAGS.items():
            value = flag_value(stage.command[1:], flag)
            if value is None or value.lower() == "none" or (value, marker) in checked:
                continue
            checked.add((value, marker))
            try:
                check_model_source(value, offline, marker)
            except UserError as exc:
                where = model_flag if stage.name == "sft" and flag == "--model_name_or_path" else f"{user_flag(stage.name)} {flag}"
                raise UserError(f"{where}: {exc}") from None


def check_raw_data(prepare: Stage) -> None:
    """The raw files the prepare stage reads are there, or it may download them (it runs with ``--download``
    unless the study is ``--offline``)."""
    args = parse_raising(prepare_sft_data.build_parser(), prepare.command[1:])
    try:
        raw_files_to_fetch(args.raw_dir, args.sources, args.download, how_to_download="run the study without --offline")
    except UserError as exc:
        raise UserError(f"--raw_dir/--sources: {exc}") from None


def check_inputs(stages: Sequence[Stage], *, pairs_file: Path | None, offline: bool) -> None:
    """Every stage's flags and every input path the study was given (see the module docstring)."""
    check_stage_flags(stages)
    check_models(stages, "--model_name_or_path", offline)
    for stage in stages:
        if stage.name == "prepare":
            check_raw_data(stage)
    if pairs_file is not None and not pairs_file.is_file():
        raise UserError(f"--pairs_file: {pairs_file}: file not found")


def check_benchmarks(stages: Sequence[Stage], offline: bool) -> None:
    """Load each IF benchmark's first prompt now: a missing file or an unreachable hub fails before any training."""
    from evaluation.instruction_following import load_benchmark

    named = {(name, flag_value(stage.command, f"--{name}")) for stage in stages for name in ("ifeval", "ifbench")}
    for name, source in sorted((name, source) for name, source in named if source not in (None, "none")):
        if offline and not Path(source).exists():
            raise UserError(f"--offline but the {name} data {source!r} is not a local file: pass --{name}_data PATH or none")
        try:
            load_benchmark(name, source, limit=1)
        except UserError as exc:
            if Path(source).exists():
                raise
            # The study's own flags, not eval's: what to type to run without the hub.
            raise UserError(f"{exc}. For this study: --{name}_data PATH (a local JSONL) or --{name}_data none to skip "
                            f"{name}; on a machine without network add --offline with local paths for "
                            "--model_name_or_path and --raw_dir (see the README's offline command)") from None


def check_limits(args: argparse.Namespace, stages: Sequence[Stage]) -> None:
    """``--ifeval_limit`` / ``--ifbench_limit`` need a stage that scores that benchmark, and ``--<name>_args``
    a stage to reach (``--rloo_args`` in a preset without RLOO would be ignored), and ``--seeds`` seeded arms."""
    names = [s.name for s in stages]
    if args.seeds is not None and not PRESETS[preset_name(args)].get("arms"):
        raise UserError(f"--seeds: the {preset_name(args)} preset has no seeded arms (presets with them: "
                        f"{', '.join(name for name, preset in PRESETS.items() if preset.get('arms'))})")
    for name, reached in EXTRA_ARGS.items():
        if getattr(args, f"{name}_args").strip() and not set(reached) & {arm_of(step) for step in names}:
            raise UserError(f"--{name}_args: this preset has no {' or '.join(reached)} stage (its stages: {', '.join(names)})")
    for name in ("ifeval", "ifbench"):
        if getattr(args, f"{name}_limit") is not None and not any(f"--{name}" in s.command for s in stages):
            raise UserError(f"--{name}_limit: no stage scores {name} in this study (--{name}_data PATH names its prompts)")
