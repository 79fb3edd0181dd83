"""What every training entry point does (``python -m sft.train_sft_mac`` and the seven others), written once.

An entry module holds its docstring (its commands), its preset and::

    def load_run():
        from sft.training import run_sft  # torch and transformers load here, once the arguments are parsed

        return run_sft


    main, plan_mac = training_entry("sft", PRESET, parse_sft_config, load_run, __doc__)

``main`` parses the config first (``main.check_argv`` does only that: every stage module's ``main`` has one), so ``--help`` and a misspelled flag answer before torch loads;
then ``load_run`` imports the stage, the thread guard plans the CPU threads (``core/threads.py``) and
the stage runs with the preset's device plan. ``plan_mac`` (MPS, else the CPU) and ``plan_cuda`` (this
process's GPU) name the other preset's command (from ``core/stages.py``) in their one-line errors.
Light on purpose: nothing heavy is imported before ``main`` runs the stage.
"""
from __future__ import annotations

from typing import Callable, Sequence

from core.stages import stage_info

PLAN_DOCS = {"mac": "MPS if present, else the CPU (said in one line); the base model in full precision.",
             "cuda": "This process's GPU (LOCAL_RANK under torchrun/accelerate); 4-bit loading on it where the config asks."}


def device_plan(preset: str, other_command: str) -> Callable:
    """The ``plan_mac`` / ``plan_cuda`` of an entry point: config -> ``core.training.DevicePlan``."""

    def plan(config):
        from core import training  # torch: imported once the arguments are parsed

        if preset == "mac":
            return training.plan_mac(config, cuda_command=other_command)
        return training.plan_cuda(config, mac_command=other_command)

    plan.__name__ = plan.__qualname__ = f"plan_{preset}"
    plan.__doc__ = PLAN_DOCS[preset]
    return plan


def training_entry(stage: str, preset: str, parse: Callable, load_run: Callable[[], Callable[..., int]],
                   doc: str | None) -> tuple[Callable[[Sequence[str] | None], int], Callable]:
    """(``main``, ``plan_<preset>``) of the entry module that trains ``stage`` on ``preset`` (``core/stages.py``)."""
    info = stage_info(stage)
    module = info.entry_module(preset)
    prog = f"python -m {module}"
    plan = device_plan(preset, info.command("cuda" if preset == "mac" else "mac"))

    def main(argv: Sequence[str] | None = None) -> int:
        # The arguments first: --help and a misspelled flag answer before torch and transformers load.
        config = parse(argv, preset=preset, prog=prog, description=doc)
        run_stage = load_run()
        from core.threads import apply_thread_guard

        apply_thread_guard()
        return run_stage(argv, config=config, preset=preset, plan_model=plan, prog=prog, description=doc,
                         entry_point=module)

    def check_argv(argv: Sequence[str]) -> None:
        """Parse and check the flags as ``main`` would, and stop there (scripts/run_study.py, before its first stage)."""
        parse(argv, preset=preset, prog=prog, description=doc)

    main.check_argv = check_argv
    main.__module__ = plan.__module__ = module  # what the Ctrl-C note's continue command names (core.cli)
    main.__doc__ = f"Train {info.title} with the {preset} preset ({prog})."
    return main, plan

