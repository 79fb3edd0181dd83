"""Crash-safe checkpoints: a checkpoint counts only once it is completely on disk.

transformers writes ``checkpoint-N/`` in place (adapter, optimizer, scheduler, RNG state, trainer
state, one file after another), so a run killed mid-save leaves a directory that looks like a
checkpoint but is not one. :class:`CheckpointCompletionCallback` therefore runs after the Trainer
has written everything, flushes the files to disk (fsync) and only then writes a small marker,
``checkpoint_complete.json``, atomically. Resuming considers only marked checkpoints; unmarked
ones are removed with a one-line notice. Rotation (``save_total_limit``) is done here too, after
marking, and removes a checkpoint's marker before its files, so a kill at any moment leaves at
least one intact, marked checkpoint once the first has been written.

Shared by SFT and DPO.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from transformers import TrainerCallback

CHECKPOINT_PREFIX = "checkpoint-"
COMPLETE_MARKER = "checkpoint_complete.json"


def checkpoint_step(path: Path) -> int | None:
    """The step number of a ``checkpoint-N`` directory, or None for anything else."""
    name = Path(path).name
    if not name.startswith(CHECKPOINT_PREFIX):
        return None
    suffix = name[len(CHECKPOINT_PREFIX):]
    return int(suffix) if suffix.isdigit() else None


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Every ``checkpoint-N`` directory in ``output_dir``, oldest step first (complete or not)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def read_marker(checkpoint: str | Path) -> dict[str, Any] | None:
    """The marker's contents, or None when the checkpoint is incomplete (no or unreadable marker)."""
    marker = Path(checkpoint) / COMPLETE_MARKER
    try:
        return json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_complete(checkpoint: str | Path) -> bool:
    return read_marker(checkpoint) is not None


def latest_complete_checkpoint(output_dir: str | Path) -> Path | None:
    complete = [p for p in list_checkpoints(output_dir) if is_complete(p)]
    return complete[-1] if complete else None


def incomplete_checkpoints(output_dir: str | Path) -> list[Path]:
    return [p for p in list_checkpoints(output_dir) if not is_complete(p)]


def _fsync_path(path: Path) -> None:
    # Directories are opened read-only to fsync their entries (the renames and new files in them).
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories; the data files matter most
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for directory, _, files in os.walk(root):
        for name in files:
            _fsync_path(Path(directory) / name)
        _fsync_path(Path(directory))


def mark_complete(checkpoint: str | Path, info: dict[str, Any]) -> Path:
    """Flush every file of ``checkpoint`` to disk, then write its marker atomically."""
    checkpoint = Path(checkpoint)
    _fsync_tree(checkpoint)
    marker = checkpoint / COMPLETE_MARKER
    tmp = checkpoint / f".{COMPLETE_MARKER}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(info, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(marker)
    _fsync_path(checkpoint)
    return marker


def remove_checkpoint(checkpoint: str | Path) -> None:
    """Delete a checkpoint, marker first: a deletion cut short never looks like a complete checkpoint."""
    checkpoint = Path(checkpoint)
    (checkpoint / COMPLETE_MARKER).unlink(missing_ok=True)
    shutil.rmtree(checkpoint, ignore_errors=True)


def rotate_checkpoints(output_dir: str | Path, keep: int | None) -> list[Path]:
    """Keep the newest ``keep`` complete checkpoints (None = all); also drop stale incomplete ones.

    An incomplete checkpoint older than the newest complete one is debris of an earlier crash.
    """
    checkpoints = list_checkpoints(output_dir)
    complete = [p for p in checkpoints if is_complete(p)]
    if not complete:
        return []
    newest = checkpoint_step(complete[-1])
    doomed = [p for p in checkpoints if not is_complete(p) and checkpoint_step(p) < newest]
    if keep is not None and len(complete) > keep:
        doomed += complete[: len(complete) - keep]
    for path in doomed:
        remove_checkpoint(path)
    return doomed


def remove_incomplete_checkpoints(output_dir: str | Path, log: Callable[[str], None] = print) -> list[Path]:
    """Delete unmarked checkpoint directories (left by a kill mid-save), saying so in one line."""
    doomed = incomplete_checkpoints(output_dir)
    if doomed:
        names = ", ".join(p.name for p in doomed)
        log(f"removing {len(doomed)} incomplete checkpoint(s) left by an interrupted save: {names}")
    for path in doomed:
        remove_checkpoint(path)
    return doomed


class CheckpointCompletionCallback(TrainerCallback):
    """After each Trainer save: wait for all processes, flush, mark complete, rotate.

    ``progress`` returns extra numbers to keep in the marker (e.g. tokens seen) so a resumed run
    continues its counters from exactly this checkpoint.
    """

    def __init__(self, keep: int | None, progress: Callable[[], dict[str, Any]] | None = None):
        self.keep = keep
        self.progress = progress or dict

    def on_save(self, args, state, control, **kwargs):
        _barrier()  # every rank has written its RNG state before the checkpoint is declared whole
        if state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}{state.global_step}"
            mark_complete(checkpoint, {"global_step": state.global_step, **self.progress()})
            rotate_checkpoints(args.output_dir, self.keep)
        _barrier()  # nobody races ahead to a save that rotation could still be touching
        return control


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
