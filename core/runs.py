"""A run directory: the config file every stage saves, how a later stage reads it, and the output-dir rules.

Each stage writes ``<output_dir>/<stage>_config.json`` when it starts::

    {"stage": "sft", "preset": "mac", "config": {...every key...}, "template": {...},
     "base_model": "...", "tokenizer_source": "..." | null, ...stage extras}

Later stages (DPO pairs and training, the reward model, RLOO, evaluation) read a run with
:func:`read_run` and never import the stage that wrote it: the template a run trained with is
the template everything after it uses, by construction. Which stages exist, and their config file
names, come from the registry (``core/stages.py``).

A run records paths as they were given (``data/sft_train.jsonl``), and ``paths_relative_to``: the
folder they are relative to (where the command ran), as a path from the run's own folder (``..``
for a run in a study folder). A reader anywhere resolves them with :meth:`RunRecord.local_path`,
and the run's folder, with its neighbours, stays movable.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from core.cli import UserError
from core.config import write_json_atomic
from core.prompting import PromptTemplate, template_from_dict
from core.stages import registered_stages, stage_info



class _ConfigFiles(Mapping):
    """stage -> config file name, read from the registry each time (a stage registered later is in it);
    the order is the pipeline's."""

    def __getitem__(self, stage: str) -> str:
        return stage_info(stage).config_file

    def __iter__(self) -> Iterator[str]:
        return iter([info.name for info in registered_stages()])

    def __len__(self) -> int:
        return len(registered_stages())


RUN_CONFIG_FILES: Mapping[str, str] = _ConfigFiles()
PATHS_KEY = "paths_relative_to"  # in a run's config file: where its relative paths start, seen from the run
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model")
# Keys that may change between a run and its --resume: they affect logging, evaluation and
# checkpointing, never the optimisation itself, so the resumed run still ends where the original would.
# A stage adds its own in its config class (``core.keys.StageConfig.RESUME_FREE``).
RESUME_FREE_KEYS = frozenset({
    "resume", "overwrite_output_dir", "output_dir", "logging_steps", "eval_steps", "save_steps",
    "save_total_limit", "report_to", "preprocessing_num_workers", "max_eval_samples", "per_device_eval_batch_size",
    "pad_to_multiple_of",  # padding is masked: it changes tensor shapes, not what is learned
    "max_steps", "num_train_epochs",  # extending a finished run: the schedule is re-derived, see core.training
})


@dataclass(frozen=True)
class RunRecord:
    """What a later stage needs from a saved run."""

    stage: str
    run_dir: Path
    config: dict[str, Any]
    template: PromptTemplate
    base_model: str
    tokenizer_source: str | None  # the run's saved tokenizer dir, else the one it was configured with
    trust_remote_code: bool
    payload: dict[str, Any]
    paths_base: Path | None = None  # where the run's relative paths start, from here (None: a run saved before they were)

    @property
    def has_adapter(self) -> bool:
        return (self.run_dir / "adapter_config.json").is_file()

    def local_path(self, recorded: str | None) -> str | None:
        """A path the run recorded (its ``val_file``), as a path from here."""
        return resolve_recorded(recorded, self.paths_base)

    def start_run_path(self, key: str) -> str | None:
        """A path recorded by the run this run started from (``sft_run``: the SFT run's ``val_file``), from here."""
        start = self.payload.get("sft_run") or {}
        start_dir = self.local_path(self.payload.get("sft_run_dir"))
        base = _paths_base(Path(start_dir), start) if start_dir else None
        return resolve_recorded((start.get("config") or {}).get(key), base)


def resolve_recorded(recorded: str | None, base: Path | None) -> str | None:
    """``recorded`` as a path from here: a relative one joined to ``base`` (unchanged without a base, or
    when absolute or empty)."""
    if not recorded or base is None or Path(recorded).is_absolute():
        return recorded
    return os.path.normpath(base / recorded)


def _local_if_there(recorded: str | None, base: Path | None) -> str | None:
    """A model or tokenizer source: the recorded local folder from here when it is one, else as
    recorded (a hub id, or a folder that is not there)."""
    local = resolve_recorded(recorded, base)
    return local if local and Path(local).exists() else recorded


def _paths_base(run_dir: Path, payload: dict) -> Path | None:
    relative_to = payload.get(PATHS_KEY)
    return Path(os.path.normpath(run_dir / relative_to)) if isinstance(relative_to, str) else None


def _relative_to_run(output_dir: str | Path) -> str:
    """This process's folder as seen from ``output_dir`` (both made absolute first)."""
    try:
        return os.path.relpath(os.getcwd(), os.path.abspath(output_dir))
    except ValueError:  # another drive (Windows): no relative path exists
        return os.getcwd()


def save_run_config(stage: str, config: Any, output_dir: str | Path, template: PromptTemplate, *,
                    preset: str = "", base_model: str | None = None, extra: dict | None = None) -> Path:
    """Save the resolved config *and* the exact template text next to the run's outputs."""
    values = dataclasses.asdict(config)
    payload = {
        "stage": stage,
        "preset": preset,
        "config": values,
        "template": template.to_dict(),
        "base_model": base_model or values.get("model_name_or_path"),
        **(extra or {}),
        PATHS_KEY: _relative_to_run(output_dir),
    }
    path = Path(output_dir) / RUN_CONFIG_FILES[stage]
    write_json_atomic(path, payload)
    return path


def run_stage(run_dir: str | Path) -> str | None:
    """The stage whose config file ``run_dir`` holds (None when it holds none)."""
    return next((stage for stage, name in RUN_CONFIG_FILES.items() if (Path(run_dir) / name).is_file()), None)


def read_run(run_dir: str | Path, expect: str | None = None) -> RunRecord:
    """Read any stage's saved run; a one-line UserError when ``run_dir`` is not one (or not of ``expect``)."""
    run_dir = Path(run_dir)
    stage = run_stage(run_dir)
    if stage is None or (expect and stage != expect):
        wanted = RUN_CONFIG_FILES[expect] if expect else " or ".join(RUN_CONFIG_FILES.values())
        raise UserError(f"{run_dir} holds no {wanted}: is it the output_dir of a "
                        f"{expect.upper() + ' ' if expect else ''}training run?")
    path = run_dir / RUN_CONFIG_FILES[stage]
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        config, template = payload["config"], template_from_dict(payload["template"])
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{path} is unreadable or incomplete") from None
    paths_base = _paths_base(run_dir, payload)
    base = _local_if_there(payload.get("base_model") or config.get("model_name_or_path"), paths_base)
    saved_tokenizer = any((run_dir / name).is_file() for name in TOKENIZER_FILES)
    tokenizer = str(run_dir) if saved_tokenizer else _local_if_there(config.get("tokenizer_name_or_path"), paths_base)
    return RunRecord(stage, run_dir, config, template, base, tokenizer, bool(config.get("trust_remote_code")), payload,
                     paths_base)


# --------------------------------------------------------------------------- output dir and resume


def _holds_run(output_dir: Path, config_filename: str) -> bool:
    """True once a run has trained something here (a checkpoint or an adapter).

    A config file alone does not count: it is written at start, so a run that failed before
    training (a wrong model path, no hub access) must not block the corrected rerun.
    """
    from core import checkpoints  # transformers: imported once a run starts, never for --help

    return (output_dir / "adapter_config.json").is_file() or bool(checkpoints.list_checkpoints(output_dir))


def _config_differences(config, saved: dict[str, Any]) -> list[str]:
    current = dataclasses.asdict(config)
    free = RESUME_FREE_KEYS | getattr(config, "RESUME_FREE", frozenset())
    return [f"{key} (run: {saved.get(key)!r}, now: {value!r})" for key, value in current.items()
            if key not in free and saved.get(key) != value]


def _saved_config(output_dir: Path, config_filename: str) -> dict[str, Any] | None:
    path = output_dir / config_filename
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))["config"]
    except (ValueError, KeyError):
        raise UserError(f"{path} is unreadable: cannot check what run {output_dir} holds") from None


def prepare_output_dir(config, config_filename: str, log: Callable[[str], None], is_main: bool = True) -> Path | None:
    """Refuse to mix runs; return the checkpoint to resume from (None = start fresh).

    Only rank 0 checks and deletes; every rank picks the same checkpoint, because only marked
    (complete) checkpoints are ever chosen and rank 0 deletes only unmarked ones.
    """
    from core import checkpoints  # transformers: imported once a run starts, never for --help

    output_dir = Path(config.output_dir)
    if not is_main:
        # Rank 0 judges the directory (other ranks would see the config it has just written and
        # take it for another run); if it refuses, the launcher stops every process.
        return checkpoints.latest_complete_checkpoint(output_dir) if config.resume else None
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"output_dir {output_dir} is a file")
    holds_run = output_dir.is_dir() and _holds_run(output_dir, config_filename)
    if config.resume:
        return _resume_point(config, output_dir, holds_run, log, config_filename)
    if holds_run and not config.overwrite_output_dir:
        raise UserError(f"{output_dir} already holds a training run: pass --resume to continue it, "
                        "--overwrite_output_dir to start over, or choose another --output_dir")
    if holds_run:
        old = checkpoints.list_checkpoints(output_dir)
        if old:
            log(f"--overwrite_output_dir: removing {len(old)} checkpoint(s) of the previous run in {output_dir}")
        for path in old:
            checkpoints.remove_checkpoint(path)
    return None


def _resume_point(config, output_dir: Path, holds_run: bool, log: Callable[[str], None],
                  config_filename: str) -> Path | None:
    if not holds_run:
        raise UserError(f"--resume: {output_dir} holds no run to resume (drop --resume to start one)")
    saved = _saved_config(output_dir, config_filename)
    if saved is not None:
        differences = _config_differences(config, saved)
        if differences:
            raise UserError("--resume with a config that differs from the run's: " + "; ".join(differences)
                            + " (resume with the same settings, or start over with --overwrite_output_dir)")
    from core import checkpoints  # transformers: imported once a run starts, never for --help

    checkpoints.remove_incomplete_checkpoints(output_dir, log=log)
    latest = checkpoints.latest_complete_checkpoint(output_dir)
    if latest is None:
        log(f"--resume: no complete checkpoint in {output_dir} yet: training from the start")
    else:
        log(f"resuming from {latest}")
    return latest
