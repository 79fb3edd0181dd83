"""The study's presets and the stage commands they give (used by ``scripts/run_study.py``).

A preset names the base model, the data, the stages it runs and each stage's flags. Three exist:

- ``quick``: a laptop CPU in a few minutes (2,000 Alpaca rows, 60 SFT steps, 40 IFEval prompts):
  shows that the pipeline works, not what training reaches;
- ``small``: the study on a real small instruct model (SmolLM2-135M-Instruct, its chat template
  throughout): SFT, DPO, a reward model and RLOO, then every IFEval prompt (541) and IFBench for
  base | SFT | DPO | RLOO, with intervals and paired tests in the report. Sized for a 2-core CPU in
  about three hours with the vLLM engine (README: "The study on a real model");
- ``full``: the original study's scale for one GPU (TinyLlama, all data, one epoch each).

Paths inside the study folder are relative to it (the stages run there), so the folder can move.
Each command names every flag once (:func:`merge_flags`): the preset's value, or the user's where the user
gives one, so the printed command is the one that runs.
"""
from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from core.cli import UserError
from core.stages import stage_info
from scripts.prepare_dpo_data import OUTPUT_FILES as PAIR_FILES
from scripts.prepare_sft_data import OUTPUT_FILES as SFT_DATA_FILES

# Every stage a preset may run, in pipeline order.
ALL_STAGES = ("prepare", "sft", "eval_sft", "dpo_pairs", "dpo", "reward", "rloo", "report")
# --<name>_args: the stages whose commands the user's extra flags are added to (and what runs them).
EXTRA_ARGS = {"sft": ("sft",), "eval": ("eval_sft", "report"), "pairs": ("dpo_pairs",), "dpo": ("dpo",),
              "reward": ("reward",), "rloo": ("rloo",)}

PRESETS: dict[str, dict] = {
    "quick": {
        "model": "HuggingFaceTB/SmolLM2-135M", "sources": ["alpaca_data.json"], "ifbench": None,
        "stages": ("prepare", "sft", "eval_sft", "dpo_pairs", "dpo", "report"),
        "sft": "--max_steps 60 --max_train_samples 2000 --max_eval_samples 100 --max_seq_length 256 "
               "--per_device_train_batch_size 4 --gradient_accumulation_steps 2 --logging_steps 5 --eval_steps 30 "
               "--save_steps 30 --report_to none",
        "eval": "--num_examples 8 --max_eval_samples 100 --max_new_tokens 96 --batch_size 16",
        "pairs": "--num_pairs 96 --max_new_tokens 96 --batch_size 16",
        "dpo": "--max_steps 24 --max_eval_samples 40 --max_length 256 --per_device_train_batch_size 4 "
               "--gradient_accumulation_steps 1 --logging_steps 4 --eval_steps 12 --save_steps 12 --report_to none",
        "if": "--ifeval_limit 40 --ifbench_limit 40 --if_max_new_tokens 192",
    },
    # A real instruct model through every stage on a CPU. The step counts are what a 2-core CPU does in
    # a few hours; the answer's intervals say how much such a run can show.
    "small": {
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct", "sources": ["alpaca_data.json"], "ifbench": "allenai/IFBench_test",
        "stages": ("prepare", "sft", "dpo_pairs", "dpo", "reward", "rloo", "report"),
        "sft": "--template chat --max_steps 150 --max_train_samples 6000 --max_eval_samples 200 --max_seq_length 512 "
               "--per_device_train_batch_size 8 --gradient_accumulation_steps 1 --learning_rate 1e-4 --logging_steps 10 "
               "--eval_steps 50 --save_steps 50 --report_to none",
        "eval": "--num_examples 20 --max_eval_samples 200 --batch_size 16 --engine auto",
        "pairs": "--num_pairs 400 --val_ratio 0.2 --max_new_tokens 192 --batch_size 16 --engine auto",
        "dpo": "--max_steps 50 --max_eval_samples 80 --max_length 512 --per_device_train_batch_size 4 "
               "--gradient_accumulation_steps 1 --learning_rate 5e-5 --beta 0.1 --logging_steps 5 --eval_steps 25 "
               "--save_steps 25 --report_to none",
        "reward": "--max_steps 50 --max_eval_samples 80 --max_length 512 --per_device_train_batch_size 4 "
                  "--gradient_accumulation_steps 1 --logging_steps 5 --eval_steps 25 --save_steps 25 --report_to none",
        "rloo": "--max_steps 20 --num_generations 4 --max_new_tokens 128 --per_device_train_batch_size 8 "
                "--gradient_accumulation_steps 1 --learning_rate 1e-5 --beta 0.05 --monitor_prompts 16 --eval_steps 5 "
                "--save_steps 10 --report_to none --engine auto",
        "if": "--if_max_new_tokens 256",
    },
    "full": {
        "model": "TinyLlama/TinyLlama_v1.1", "sources": None, "ifbench": "allenai/IFBench_test",
        "stages": ("prepare", "sft", "eval_sft", "dpo_pairs", "dpo", "report"),
        "sft": "--num_train_epochs 1", "eval": "--num_examples 20", "pairs": "--num_pairs 5000 --max_new_tokens 128",
        "dpo": "--num_train_epochs 1", "if": "--if_max_new_tokens 1024",
    },
}


@dataclass
class Stage:
    name: str
    command: list[str]  # module and flags, run as `python -m <command>` inside the study folder
    done_file: Path  # the file the stage writes last: present = finished
    run_config: Path | None = None  # a training run's config file: present = resume the run from its checkpoints
    outputs: tuple[str, ...] = ()  # what the stage writes, relative to the study folder (moved aside by --redo_from)


def training_run(name: str, command: list[str], out: Path) -> Stage:
    """A training stage's step: its run in the folder named after it, its config file as the registry names it
    (``core/stages.py``), finished once ``metrics.json`` is written."""
    run = out / name
    return Stage(name, command, run / "metrics.json", run / stage_info(name).config_file, outputs=(name,))


def none_word(value: str | None) -> str | None:
    return None if value is None or value.lower() in ("none", "") else value


def local(value: str | Path) -> str:
    """An existing path made absolute (stages run inside the study folder); anything else (a hub id) as given."""
    return str(Path(value).resolve()) if Path(value).exists() else str(value)


def flag_groups(words: Sequence[str]) -> dict[str, list[str]]:
    """``words`` (flags, each followed by its values) as {flag: its words}, each flag once: where it first
    appears, with the words of its last appearance. ``--key=value`` is the flag ``--key``; a word with a
    space is a value (``--dpo_args "--beta 0.2"``), as argparse reads it; words before the first flag are
    under ``""``."""
    groups: dict[str, list[str]] = {}
    flag = ""
    for word in words:
        if word.startswith("--") and len(word) > 2 and " " not in word:
            flag = word.split("=", 1)[0]
            groups[flag] = [word]  # a later one replaces the values, in the first one's place
        else:
            groups.setdefault(flag, []).append(word)
    return groups


def merge_flags(words: Sequence[str]) -> list[str]:
    """``words`` with each flag once, its last value winning (:func:`flag_groups`): the user's
    ``--<stage>_args`` come last, so they replace the preset's value of a flag."""
    return [word for group in flag_groups(words).values() for word in group]


def command(module: str, *flags: Sequence[str]) -> list[str]:
    """A stage's command: its module and the flags, merged (:func:`merge_flags`)."""
    return [module, *merge_flags([word for part in flags for word in part])]


def preset_name(args: argparse.Namespace) -> str:
    """``--quick`` is ``--preset quick``; without either, the full preset."""
    if args.quick and args.preset not in (None, "quick"):
        raise ValueError(f"--quick and --preset {args.preset} name two presets: give one")
    return "quick" if args.quick else (args.preset or "full")


def if_flags(args: argparse.Namespace, preset: dict) -> list[str]:
    ifeval = none_word(args.ifeval_data)
    ifbench = none_word(args.ifbench_data if args.ifbench_data is not None else preset["ifbench"])
    flags = (["--ifeval", local(ifeval)] if ifeval else []) + (["--ifbench", local(ifbench)] if ifbench else [])
    limits = []  # run_study's --ifeval_limit / --ifbench_limit, over the preset's
    for name, used in (("ifeval", ifeval), ("ifbench", ifbench)):
        limit = getattr(args, f"{name}_limit", None)
        if used and limit is not None:
            limits += [f"--{name}_limit", str(limit)]
    return merge_flags(flags + shlex.split(preset["if"]) + limits) if flags else []


def user_flags(args: argparse.Namespace, name: str) -> list[str]:
    """The words of ``--<name>_args``."""
    try:
        return shlex.split(getattr(args, f"{name}_args"))
    except ValueError as exc:  # an unclosed quote
        raise UserError(f"--{name}_args: {exc}") from None


def build_stages(args: argparse.Namespace, out: Path, trainer: str) -> list[Stage]:
    """The preset's stages with their commands; ``trainer``: ``mac`` or ``cuda`` (which entry points train)."""

    def entry(stage: str) -> str:  # the module that trains a stage (core/stages.py)
        return stage_info(stage).entry_module(trainer)

    preset = PRESETS[preset_name(args)]
    model = local(args.model_name_or_path or preset["model"])
    sources = args.sources or preset["sources"]
    data, sft, dpo, reward, rloo = "data", "sft", "dpo", "reward", "rloo"
    extra = {s: user_flags(args, s) for s in EXTRA_ARGS}
    flags = {s: shlex.split(preset.get(s, "")) for s in EXTRA_ARGS}
    prepare = command("scripts.prepare_sft_data", ["--raw_dir", str(args.raw_dir.resolve()), "--out_dir", data],
                      ["--sources", *sources] if sources else [], [] if args.offline else ["--download"])
    # The user's --<stage>_args go last: where they name a flag the preset gives, their value replaces it.
    train_sft = command(entry("sft"), ["--model_name_or_path", model, "--train_file", f"{data}/sft_train.jsonl",
                                       "--val_file", f"{data}/sft_val.jsonl", "--output_dir", sft], flags["sft"], extra["sft"])
    mid_eval = command("sft.eval_sft", flags["eval"], ["--adapter_dir", sft, "--prefs_file", "none", "--out_dir", "eval_sft"],
                       extra["eval"])
    source = ["--from_file", local(args.pairs_file)] if args.pairs_file else ["--from_sft_model", sft]
    pairs = command("scripts.prepare_dpo_data", source, ["--out_dir", data], [] if args.pairs_file else flags["pairs"],
                    extra["pairs"])
    pair_files = ["--train_file", f"{data}/prefs_train.jsonl", "--val_file", f"{data}/prefs_val.jsonl"]
    train_dpo = command(entry("dpo"), ["--sft_adapter_dir", sft, *pair_files, "--output_dir", dpo], flags["dpo"], extra["dpo"])
    train_reward = command(entry("reward"), ["--sft_adapter_dir", sft, *pair_files, "--output_dir", reward], flags["reward"],
                           extra["reward"])
    train_rloo = command(entry("rloo"), ["--sft_adapter_dir", sft, "--reward_model_dir", reward, "--output_dir", rloo],
                         flags["rloo"], extra["rloo"])
    runs = "rloo" in preset["stages"]
    report = command("sft.eval_sft", flags["eval"], ["--adapter_dir", sft, dpo, *([rloo] if runs else []),
                                                     "--prefs_file", f"{data}/prefs_val.jsonl"],
                     ["--reward_model", reward] if runs else [], ["--out_dir", "report"], if_flags(args, preset), extra["eval"])
    every = {
        "prepare": Stage("prepare", prepare, out / data / "stats.json", outputs=tuple(f"{data}/{n}" for n in SFT_DATA_FILES.values())),
        "sft": training_run("sft", train_sft, out),
        "eval_sft": Stage("eval_sft", mid_eval, out / "eval_sft" / "report.md", outputs=("eval_sft",)),
        "dpo_pairs": Stage("dpo_pairs", pairs, out / data / "prefs_stats.json", outputs=tuple(f"{data}/{n}" for n in PAIR_FILES.values())),
        "dpo": training_run("dpo", train_dpo, out),
        "reward": training_run("reward", train_reward, out),
        "rloo": training_run("rloo", train_rloo, out),
        "report": Stage("report", report, out / "report" / "report.md", outputs=("report",)),
    }
    return [every[name] for name in preset["stages"]]
