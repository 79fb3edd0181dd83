"""The study's presets and the stage commands they give (used by ``scripts/run_study.py``).

A preset names the base model, the data, the stages it runs and each stage's flags. Four exist:

- ``quick``: a laptop CPU in a few minutes (2,000 Alpaca rows, 60 SFT steps, 40 IFEval prompts), with
  the study preset's arms at toy size, 2 seeds, and DPO on gold pairs besides: shows that the pipeline
  works, not what training reaches;
- ``study``: issue 30's design, from the base SmolLM2-135M (offline: ``--model_name_or_path`` a local
  copy): SFT, checker-judged pairs, then per seed DPO, the matched-compute control, reward model + RLOO
  and RLVR (scripts/study_arms.py), every column scored on IFEval with answers up to 1,024 tokens, IFBench
  and the IF sets; ``--estimate`` prices it first (scripts/study_estimate.py);
- ``small``: the study on a real small instruct model (SmolLM2-135M-Instruct, its chat template
  throughout): SFT, DPO, a reward model and RLOO, then every IFEval prompt (541) and IFBench for
  base | SFT | DPO | RLOO, with intervals and paired tests in the report. Sized for a 2-core CPU in
  about three hours with the vLLM engine (README: "The study on a real model");
- ``full``: the original study's scale for one GPU (TinyLlama, all data, one epoch each).

A step of the study is a stage of ``core/stages.py`` run in a folder of its own: ``dpo_if`` is a run of the
``dpo`` stage (on the checker-judged pairs), ``rlvr`` one of ``rloo`` (with ``--reward checker``)
(:data:`RUN_STAGES`). ``--dpo_args`` reach every DPO run and ``--rloo_args`` every RLOO run, so the arms
share their recipe; ``--dpo_if_args`` / ``--rlvr_args`` add flags to one run (:data:`EXTRA_ARGS`).

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
from core.stages import find_stage, stage_info
from scripts.study_arms import ARM_STAGES, FROM_SFT, arm_command, arm_of, expand_steps, report_order
from scripts.prepare_dpo_data import OUTPUT_FILES as PAIR_FILES
from scripts.prepare_if_prompts import OUTPUT_FILES as IF_FILES
from scripts.prepare_sft_data import OUTPUT_FILES as SFT_DATA_FILES

# Every step a preset may run, in pipeline order (a preset lists the ones it runs in its "stages"; ARMS there stands
# for its seeded arms, each run once per seed as <arm>_s<k>: scripts/study_arms.py).
ARMS = "arms"
ALL_STAGES = ("prepare", "sft", "eval_sft", "dpo_pairs", "if_prompts", "if_pairs", "dpo", "dpo_if", "reward", "rloo",
              "rlvr", "control", "reward_if", "rlhf", "report")
# Training steps whose run folder is not the registered stage's name: step -> stage (core/stages.py).
RUN_STAGES = dict(ARM_STAGES)  # dpo_if and rlvr also run unseeded (the quick and small presets)
# --<name>_args: the steps whose commands the user's extra flags (and the preset's "<name>" flags) are added to, a
# stage's flags before a run's own (EXTRA_ARGS order), the preset's before the user's.
EXTRA_ARGS = {"sft": ("sft",), "eval": ("eval_sft", "report"), "pairs": ("dpo_pairs",), "dpo": ("dpo", "dpo_if"),
              "reward": ("reward", "reward_if"), "rloo": ("rloo", "rlvr", "rlhf"), "if_prompts": ("if_prompts",),
              "if_pairs": ("if_pairs",), "dpo_if": ("dpo_if",), "rlvr": ("rlvr",), "control": ("control",), "rlhf": ("rlhf",)}
# What each step does, for the help of --<name>_args.
STAGE_ROLES = {"sft": "sft.train_sft_*", "eval_sft": "base vs SFT, quick and full presets",
               "report": "every model, IFEval/IFBench and the IF sets", "dpo_pairs": "scripts/prepare_dpo_data.py",
               "dpo": "dpo.train_dpo_*", "reward": "rlhf.train_reward_*, small preset", "rloo": "rlhf.train_rloo_*, small preset",
               "if_prompts": "scripts/prepare_if_prompts.py, quick preset",
               "if_pairs": "scripts/prepare_dpo_data.py --judge checker, quick preset",
               "dpo_if": "DPO on the checker-judged pairs, quick preset",
               "rlvr": "rlhf.train_rloo_* --reward checker, quick preset",
               "control": "sft.train_sft_* continued on the judged pairs' chosen answers, study preset",
               "reward_if": "rlhf.train_reward_* on the judged pairs, study preset",
               "rlhf": "rlhf.train_rloo_* with the reward_if model, study preset"}

# The contrasts declared before the run (IFEval prompt-level strict, Holm over these): what instruction tuning did
# (sft vs base), what more training on the judged answers did (control vs sft), and what each preference method did
# beyond that matched-compute control.
PRIMARY_CONTRASTS = "--primary_contrasts sft:base,control:sft,dpo_if:control,rlhf:control,rlvr:control"

QUICK_HELD_OUT = ",".join(("change_case:english_capital", "combination:repeat_prompt", "detectable_content:postscript",
                           "detectable_format:title", "keywords:forbidden_words", "language:response_language",
                           "length_constraints:number_paragraphs", "startend:quotation"))

PRESETS: dict[str, dict] = {
    "quick": {
        "model": "HuggingFaceTB/SmolLM2-135M", "sources": ["alpaca_data.json"], "ifbench": None,
        "stages": ("prepare", "sft", "eval_sft", "dpo_pairs", "if_prompts", "if_pairs", "dpo", ARMS, "report"),
        # the study preset's arms at toy size, 2 seeds (gold-pair DPO kept: here the budget allows it)
        "arms": ("dpo_if", "control", "reward_if", "rlhf", "rlvr"), "seeds": 2,
        "sft": "--max_steps 60 --max_train_samples 2000 --max_eval_samples 100 --max_seq_length 512 "
               "--per_device_train_batch_size 4 --gradient_accumulation_steps 2 --logging_steps 5 --eval_steps 30 "
               "--save_steps 30 --report_to none",
        "eval": "--num_examples 8 --max_eval_samples 100 --max_new_tokens 96 --batch_size 16",
        "report": PRIMARY_CONTRASTS,  # the study's sections at toy size
        "pairs": "--num_pairs 96 --max_new_tokens 96 --batch_size 16",
        "dpo": "--max_steps 24 --max_eval_samples 40 --max_length 256 --per_device_train_batch_size 4 "
               "--gradient_accumulation_steps 1 --logging_steps 4 --eval_steps 12 --save_steps 12 --report_to none",
        "if": "--ifeval_limit 40 --ifbench_limit 40 --if_max_new_tokens 192",
        # The instruction-following arms at toy size: 200 constrained prompts (20 per validation file), 96 of them
        # sampled 4 times for checker-judged pairs, a few DPO, control and reward-model steps on those (after --dpo_args
        # and --reward_args), 3 RLOO steps with the reward model (rlhf) and with the checker (rlvr). SFT's
        # max_seq_length 512 (and the arms' max_length): a prompt with its constraints is long in a small vocabulary.
        # Held out: one type per category but punctuation, whose one type (no comma) is where a small model's
        # samples differ most often (stories260K: 32 prompts x 4 samples gave no pair with the default list; 64 x 2 gave 2
        # with this one, too few to split, hence 96 x 4).
        "if_prompts": f"--num_train 200 --num_val 20 --held_out {QUICK_HELD_OUT}",
        "if_pairs": "--num_pairs 96 --samples_per_prompt 4 --val_ratio 0.3 --max_new_tokens 96 --batch_size 16",
        "dpo_if": "--max_steps 8 --max_length 512 --eval_steps 4 --save_steps 4",
        "control": "--max_eval_samples 40 --max_seq_length 512 --per_device_train_batch_size 8 --gradient_accumulation_steps 1 "
                   "--logging_steps 4 --eval_steps 4 --save_steps 4 --report_to none",
        "reward": "--max_steps 8 --max_eval_samples 40 --max_length 512 --per_device_train_batch_size 4 "
                  "--gradient_accumulation_steps 1 --logging_steps 4 --eval_steps 4 --save_steps 4 --report_to none",
        "rloo": "--max_steps 3 --num_generations 2 --max_new_tokens 64 --max_length 512 --per_device_train_batch_size 4 "
                "--gradient_accumulation_steps 1 --per_device_eval_batch_size 4 --monitor_prompts 8 --logging_steps 1 "
                "--eval_steps 3 --save_steps 3 --report_to none",
    },
    # A real instruct model through every stage on a CPU. The step counts are what a 2-core CPU does in
    # a few hours; the answer's intervals say how much such a run can show. Its stages stay as the committed
    # study ran them (it must resume); listing "if_prompts", "if_pairs", "dpo_if" and "rlvr" adds those arms with
    # the flags below (dpo_if with the dpo recipe, rlvr with the rloo one).
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
        "if_prompts": "--num_train 2000 --num_val 100",
        "if_pairs": "--num_pairs 400 --samples_per_prompt 4 --val_ratio 0.2 --max_new_tokens 192 --batch_size 16 --engine auto",
    },
    # Issue 30's design: arms from one SFT run at matched training tokens, each trained once per seed
    # (scripts/study_arms.py), scored on IFEval with answers up to 1,024 new tokens. From the base model where the
    # hub is reachable; offline, --model_name_or_path names a local copy (the committed result starts from
    # SmolLM2-135M-Instruct). Sized to ONE sitting of a 2-core CPU (~2.5 h; a sitting's machine here keeps nothing
    # for the next): every arm shrunk alike (steps, prompts), never the seeds, the control or the answer budget.
    # Half the training steps of the first design (DPO/reward 30 -> 15, RLOO 12 -> 6), RLOO's monitor on 8 prompts of
    # each IF set at the start and the end (4 answers each), and every column on the first 40 IFEval prompts and the
    # first 20 of each IF set. Measured there (Xeon with AMX, bf16): SFT 630 s, the judged pairs 691 s, vLLM decoding
    # ~150-300 tokens/s, a report column ~100 s at 40 IFEval prompts alone (docs/study.md). On a GPU, --eval_args
    # "--ifeval_limit none --if_sets_limit none" and --dpo_args/--reward_args/--rloo_args "--max_steps N" scale it back up.
    "study": {
        "model": "HuggingFaceTB/SmolLM2-135M", "sources": ["alpaca_data.json"], "ifbench": "allenai/IFBench_test",
        "stages": ("prepare", "sft", "if_prompts", "if_pairs", ARMS, "report"),
        "arms": ("dpo_if", "control", "reward_if", "rlhf", "rlvr"), "seeds": 3,
        "sft": "--template chat --max_steps 150 --max_train_samples 6000 --max_eval_samples 200 --max_seq_length 512 "
               "--per_device_train_batch_size 8 --gradient_accumulation_steps 1 --learning_rate 1e-4 --logging_steps 10 "
               "--eval_steps 50 --save_steps 50 --report_to none",
        "eval": "--num_examples 20 --max_eval_samples 100 --batch_size 16 --engine auto",
        # The IF sets beside IFEval, the first 20 of each: a column answers every benchmark in one generate call, so
        # the answers that loop to 1,024 tokens decode alone once per column, not once per benchmark (~45 s each).
        "report": PRIMARY_CONTRASTS + " --if_sets_limit 20",
        "if": "--if_max_new_tokens 1024 --ifeval_limit 40 --ifbench_limit 40",
        "if_prompts": "--num_train 2000 --num_val 100",
        "if_pairs": "--num_pairs 300 --samples_per_prompt 4 --val_ratio 0.2 --max_new_tokens 256 --batch_size 16 --engine auto",
        # Every arm shrunk alike (the small preset's 50 DPO / 50 reward / 20 RLOO steps x 0.3; the same prompts for
        # every column); the seeds, the control and the 1,024-token answers are not shrunk.
        # DPO's recipe; the control continues SFT at SFT's learning rate, 8 sequences a step as DPO's 4 pairs are
        "dpo": "--max_steps 15 --max_eval_samples 60 --max_length 640 --per_device_train_batch_size 4 "
               "--gradient_accumulation_steps 1 --learning_rate 5e-5 --beta 0.1 --logging_steps 5 --eval_steps 15 "
               "--save_steps 15 --report_to none",
        "control": "--max_eval_samples 60 --max_seq_length 640 --per_device_train_batch_size 8 --gradient_accumulation_steps 1 "
                   "--learning_rate 1e-4 --logging_steps 5 --eval_steps 15 --save_steps 15 --report_to none",
        "reward": "--max_steps 15 --max_eval_samples 60 --max_length 640 --per_device_train_batch_size 4 "
                  "--gradient_accumulation_steps 1 --logging_steps 5 --eval_steps 15 --save_steps 15 --report_to none",
        # RLOO at DPO's LoRA learning rate: at 1e-5 the small study's 20 steps never moved the policy (KL 0.0008)
        "rloo": "--max_steps 6 --num_generations 4 --max_new_tokens 256 --max_length 768 --per_device_train_batch_size 8 "
                "--gradient_accumulation_steps 1 --learning_rate 5e-5 --beta 0.05 --monitor_prompts 8 --eval_steps 6 "
                "--save_steps 3 --report_to none --engine auto",
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


def extra_args_help(name: str) -> str:
    """The help of ``--<name>_args``: the steps it reaches, and the flag it comes after where another reaches them too."""
    steps = EXTRA_ARGS[name]
    reach = " and ".join(f"{step} ({STAGE_ROLES[step]})" for step in steps)
    before = [f"--{other}_args" for other, reached in EXTRA_ARGS.items() if other != name and set(steps) < set(reached)]
    return (f"extra flags (one quoted string) for the {'stages' if len(steps) > 1 else 'stage'} {reach}"
            f"{', after ' + ' and '.join(before) if before else ''}; where they name a flag the preset gives, their value "
            "replaces it")


def registered_stage(step: str) -> str:
    """The stage of ``core/stages.py`` a training step runs: ``dpo_if`` -> ``dpo``; ``control_s1`` -> ``sft``."""
    return RUN_STAGES.get(arm_of(step), arm_of(step))


def training_run(name: str, command: list[str], out: Path) -> Stage:
    """A training step: its run in the folder named after the step (``dpo``, ``dpo_if``), its config file as the
    registry names the step's stage (``core/stages.py``: ``dpo_config.json`` for both), finished once
    ``metrics.json`` is written."""
    run = out / name
    return Stage(name, command, run / "metrics.json", run / stage_info(registered_stage(name)).config_file, outputs=(name,))


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


def step_flags(step: str, preset: dict, user: dict[str, list[str]]) -> list[str]:
    """The flags a step gets from every ``--<name>_args`` that reaches it (:data:`EXTRA_ARGS`): the preset's, then
    the user's, so that the user's value of a flag wins; a stage's (``dpo``) before a run's own (``dpo_if``)."""
    names = [name for name, steps in EXTRA_ARGS.items() if arm_of(step) in steps]
    return [word for name in names for word in shlex.split(preset.get(name, ""))] + [word for name in names for word in user[name]]


def decontaminate_flags(args: argparse.Namespace, preset: dict) -> list[str]:
    """``--decontaminate`` with the benchmark files the study scores, where they are local files (a hub id is not
    read by scripts/prepare_if_prompts.py; its stats then name no test file)."""
    named = [none_word(args.ifeval_data), none_word(args.ifbench_data if args.ifbench_data is not None else preset["ifbench"])]
    files = [local(name) for name in named if name and Path(name).is_file()]
    return ["--decontaminate", *files] if files else []


def build_stages(args: argparse.Namespace, out: Path, trainer: str) -> list[Stage]:
    """The preset's steps with their commands; ``trainer``: ``mac`` or ``cuda`` (which entry points train)."""

    def entry(step: str) -> str:  # the module that trains a step's stage (core/stages.py)
        return stage_info(registered_stage(step)).entry_module(trainer)

    def flags(step: str) -> list[str]:
        return step_flags(step, preset, user)

    preset = PRESETS[preset_name(args)]
    steps = expand_steps(preset["stages"], preset.get("arms", ()), seed_count(args, preset), ARMS)
    model = local(args.model_name_or_path or preset["model"])
    sources = args.sources or preset["sources"]
    data, sft, if_dir, judged = "data", "sft", "data/if", "data/if_pairs"
    user = {name: user_flags(args, name) for name in EXTRA_ARGS}
    prepare = command("scripts.prepare_sft_data", ["--raw_dir", str(args.raw_dir.resolve()), "--out_dir", data],
                      ["--sources", *sources] if sources else [], [] if args.offline else ["--download"])
    # The user's --<name>_args go last: where they name a flag the preset gives, their value replaces it.
    train_sft = command(entry("sft"), ["--model_name_or_path", model, "--train_file", f"{data}/sft_train.jsonl",
                                       "--val_file", f"{data}/sft_val.jsonl", "--output_dir", sft], flags("sft"))
    mid_eval = command("sft.eval_sft", shlex.split(preset.get("eval", "")),
                       ["--adapter_dir", sft, "--prefs_file", "none", "--out_dir", "eval_sft"], user["eval"])
    source = ["--from_file", local(args.pairs_file)] if args.pairs_file else ["--from_sft_model", sft]
    pairs = command("scripts.prepare_dpo_data", source, ["--out_dir", data],
                    user["pairs"] if args.pairs_file else flags("dpo_pairs"))
    pair_files = ["--train_file", f"{data}/prefs_train.jsonl", "--val_file", f"{data}/prefs_val.jsonl"]
    if_prompts = command("scripts.prepare_if_prompts", ["--sft_file", f"{data}/sft_train.jsonl", "--out_dir", if_dir],
                         decontaminate_flags(args, preset), flags("if_prompts"))
    if_pairs = command("scripts.prepare_dpo_data", ["--from_sft_model", sft, "--judge", "checker", "--prompts",
                                                    f"{if_dir}/if_train.jsonl", "--out_dir", judged], flags("if_pairs"))
    judged_files = ["--train_file", f"{judged}/prefs_train.jsonl", "--val_file", f"{judged}/prefs_val.jsonl"]
    from_sft = [word for flag in FROM_SFT for word in flag_groups(train_sft[1:]).get(flag, [])]
    seeded = {step: arm_command(step, model, from_sft, entry, flags, command) for step in steps if arm_of(step) != step}
    commands = {
        "dpo": command(entry("dpo"), ["--sft_adapter_dir", sft, *pair_files, "--output_dir", "dpo"], flags("dpo")),
        "dpo_if": command(entry("dpo_if"), ["--sft_adapter_dir", sft, *judged_files, "--output_dir", "dpo_if"], flags("dpo_if")),
        "reward": command(entry("reward"), ["--sft_adapter_dir", sft, *pair_files, "--output_dir", "reward"], flags("reward")),
        "rloo": command(entry("rloo"), ["--sft_adapter_dir", sft, "--reward_model_dir", "reward", "--output_dir", "rloo"],
                        flags("rloo")),
        # RLVR: RLOO whose reward is the constraint checker, on the constrained prompts, monitored on both validation sets
        "rlvr": command(entry("rlvr"), ["--sft_adapter_dir", sft, "--reward", "checker", "--prompt_file", f"{if_dir}/if_train.jsonl",
                                        "--monitor_files", f"{if_dir}/if_val_seen.jsonl", f"{if_dir}/if_val_heldout.jsonl",
                                        "--output_dir", "rlvr"], flags("rlvr")),
        **seeded,
    }
    every = {
        "prepare": Stage("prepare", prepare, out / data / "stats.json", outputs=tuple(f"{data}/{n}" for n in SFT_DATA_FILES.values())),
        "sft": training_run("sft", train_sft, out),
        "eval_sft": Stage("eval_sft", mid_eval, out / "eval_sft" / "report.md", outputs=("eval_sft",)),
        "dpo_pairs": Stage("dpo_pairs", pairs, out / data / "prefs_stats.json", outputs=tuple(f"{data}/{n}" for n in PAIR_FILES.values())),
        "if_prompts": Stage("if_prompts", if_prompts, out / if_dir / IF_FILES["stats"], outputs=(if_dir,)),
        "if_pairs": Stage("if_pairs", if_pairs, out / judged / PAIR_FILES["stats"], outputs=(judged,)),
        **{step: training_run(step, words, out) for step, words in commands.items()},
        "report": Stage("report", report_command(args, preset, steps, user["eval"], if_dir), out / "report" / "report.md",
                        outputs=("report",)),
    }
    return [every[name] for name in steps]


def preset_steps(name: str, seeds: int | None = None) -> list[str]:
    """A preset's steps, its seeded arms expanded (``seeds``: the preset's default where None)."""
    preset = PRESETS[name]
    return expand_steps(preset["stages"], preset.get("arms", ()), seed_count(argparse.Namespace(seeds=seeds), preset), ARMS)


def seed_count(args: argparse.Namespace, preset: dict) -> int:
    """How many seeds each seeded arm runs: ``--seeds``, else the preset's (none without seeded arms)."""
    if not preset.get("arms"):
        return 0
    return getattr(args, "seeds", None) or preset["seeds"]


def report_command(args: argparse.Namespace, preset: dict, steps: Sequence[str], user_eval: list[str], if_dir: str) -> list[str]:
    """The report: base and every policy the study trains (in its order: sft, dpo, dpo_if, rloo, rlvr; seeded arms
    grouped by arm, seed by seed), the reward model's scores where the study trains one (the first seed's reward_if
    model in a seeded study), IFEval/IFBench, with ``if_prompts`` the IF validation sets, and the preset's report flags."""
    policies = report_order([step for step in steps if find_stage(registered_stage(step)) is not None
                             and stage_info(registered_stage(step)).policy])
    rewards = [step for step in steps if registered_stage(step) == "reward"]
    prefs = "data/prefs_val.jsonl" if "dpo_pairs" in steps else "data/if_pairs/prefs_val.jsonl"
    return command("sft.eval_sft", shlex.split(preset.get("eval", "")), ["--adapter_dir", *policies, "--prefs_file", prefs],
                   ["--reward_model", rewards[0]] if rewards else [], ["--out_dir", "report"], if_flags(args, preset),
                   ["--if_sets", if_dir] if "if_prompts" in steps else [], shlex.split(preset.get("report", "")), user_eval)
