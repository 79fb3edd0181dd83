"""The command line of ``scripts/run_study.py`` (its flags; the module docstring there says what they do)."""
from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Sequence

from core.cli import make_parser
from core.model_source import MODEL_SOURCE_HELP
from scripts.study_arms import arm_of
from scripts.study_presets import ALL_STAGES, EXTRA_ARGS, PRESETS, extra_args_help, flag_groups

REPO_ROOT = Path(__file__).resolve().parents[1]
PREVIOUS_DIR = "previous"  # where --redo_from moves the outputs it replaces
PRESET_HELP = ("quick: a laptop CPU in minutes; small: SmolLM2-135M-Instruct through SFT, DPO, reward model and RLOO, all of "
               "IFEval (a CPU in hours); study: arms from one SFT run at matched tokens, seeded (issue 30: hours, several "
               "sittings; --estimate first); full: the original study's scale for a GPU (default)")


def parse_args(argv: Sequence[str] | None, description: str) -> argparse.Namespace:
    p = make_parser(description=description)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help=PRESET_HELP)
    p.add_argument("--quick", action="store_true", help="the same as --preset quick")
    p.add_argument("--out_dir", type=Path, default=None, help="study folder (default: runs/study_<preset>)")
    p.add_argument("--resume", action="store_true", help="continue the study in --out_dir, skipping finished stages")
    p.add_argument("--redo_from", type=step_name, default=None, metavar="STAGE",
                   help=f"continue the study (implies --resume), running STAGE and every later one again, moving their earlier outputs to "
                        f"<out_dir>/{PREVIOUS_DIR}/<time>/ (one of the preset's: {', '.join(ALL_STAGES)}; a seeded run as <arm>_s<k>)")
    p.add_argument("--seeds", type=positive_int, default=None, metavar="S",
                   help="train each seeded arm with seeds 0..S-1 (presets with seeded arms: " + seeded_presets() + ")")
    p.add_argument("--estimate", action="store_true",
                   help="print the study's estimated cost per stage and in total, and its assumptions; run nothing")
    p.add_argument("--gflops", type=positive_float, default=None, metavar="G",
                   help="with --estimate: price at G GFLOP/s of fp32 matmul instead of measuring this machine's")
    p.add_argument("--offline", action="store_true", help="never download: local paths only (HF_HUB_OFFLINE=1)")
    p.add_argument("--model_name_or_path", default=None, help=f"base model: {MODEL_SOURCE_HELP} (default: the preset's)")
    p.add_argument("--raw_dir", type=Path, default=REPO_ROOT / "data" / "raw", help="raw SFT data folder (default: data/raw)")
    p.add_argument("--sources", nargs="+", default=None, help="raw files to use (default: the preset's; see prepare_sft_data)")
    p.add_argument("--ifeval_data", default="google/IFEval", help="IFEval: local JSONL or hub id (none = skip)")
    p.add_argument("--ifbench_data", default=None, help="IFBench: local JSONL or hub id (default: the preset's; none = skip)")
    for name, title in (("ifeval", "IFEval"), ("ifbench", "IFBench")):
        p.add_argument(f"--{name}_limit", type=positive_int, default=None, metavar="N",
                       help=f"score only the first N {title} prompts, in every stage that scores {title} (the report); "
                            f"default: the preset's ({preset_limits(name)})")
    p.add_argument("--pairs_file", type=Path, default=None,
                   help="existing preference pairs (prepare_dpo_data --from_file) instead of sampling from the SFT model")
    p.add_argument("--trainer", choices=["auto", "mac", "cuda"], default="auto",
                   help="training entry point: mac (MPS/CPU, full precision) or cuda (QLoRA); auto = cuda when available")
    for name in EXTRA_ARGS:
        p.add_argument(f"--{name}_args", default="", metavar="FLAGS", help=extra_args_help(name))
    return p.parse_args(argv)


def preset_limits(name: str) -> str:
    """``quick: 40; small: all; full: all``: each preset's ``--<name>_limit``."""
    limits = {preset: flag_groups(shlex.split(flags["if"])).get(f"--{name}_limit", [None, "all"])[1]
              for preset, flags in PRESETS.items()}
    return "; ".join(f"{preset}: {limit}" for preset, limit in limits.items())


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value




def seeded_presets() -> str:
    """``quick: 2 seeds; study: 3 seeds``: each preset with seeded arms and its default seed count."""
    return "; ".join(f"{name}: {preset['seeds']} seeds" for name, preset in PRESETS.items() if preset.get("arms"))


def positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def step_name(text: str) -> str:
    """A step any preset may run (:data:`ALL_STAGES`), or a seeded run of an arm (``dpo_if_s0``)."""
    if text in ALL_STAGES or arm_of(text) != text:
        return text
    raise argparse.ArgumentTypeError(f"no step named {text!r} (steps: {', '.join(ALL_STAGES)}; a seeded run: <arm>_s<k>)")
