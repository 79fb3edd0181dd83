"""The release format of IFEval/IFBench prompt files, checked row by row before anything else runs.

One JSON object a line with ``key`` (a number or a string, unique), ``prompt`` (a string),
``instruction_id_list`` (strings) and ``kwargs`` (one object per instruction), as Google and
AllenAI release them. A file that does not match gets a one-line error naming the first bad line
(``file:line: what is wrong``); the eval and the study load every requested benchmark before any
model is loaded, so a bad file costs nothing.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Iterator

from core.cli import UserError

RELEASE_FIELDS = ("key", "prompt", "instruction_id_list", "kwargs")


def numbered_rows(path: Path, name: str) -> Iterator[tuple[str, Any]]:
    """("file:line", parsed JSON) for each non-blank line, read lazily: the first bad line is the one reported."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise UserError(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start} of the line)") from None
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno}); the {name} release format is "
                                f"one {{{', '.join(RELEASE_FIELDS)}}} object per line") from None


def checked_samples(name: str, rows: Iterable[tuple[str, Any]]) -> list:
    """Samples of (where, row) pairs, in order; a one-line error at the first row that is not in the release format."""
    samples, first_seen = [], {}
    for where, row in rows:
        sample = to_sample(name, row, where)
        if str(sample.key) in first_seen:
            raise UserError(f"{where}: duplicate key {sample.key!r} (first at {first_seen[str(sample.key)]})")
        first_seen[str(sample.key)] = where
        samples.append(sample)
    return samples


def to_sample(name: str, row: Any, where: str):
    """One release-format row as an if-verifiable sample; ``where`` ("file:line") names it in the error."""
    from if_verifiable import IFBenchSample, IFEvalSample

    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object with {', '.join(RELEASE_FIELDS)}, got {type(row).__name__}")
    missing = [f for f in RELEASE_FIELDS if f not in row]
    if missing:
        raise UserError(f"{where}: not in the {name} release format (missing {', '.join(missing)})")
    ids, kwargs = row["instruction_id_list"], row["kwargs"]
    if isinstance(row["key"], bool) or not isinstance(row["key"], (int, str)):
        raise UserError(f"{where}: 'key' is {type(row['key']).__name__}, not a number or a string")
    if not isinstance(row["prompt"], str):
        raise UserError(f"{where}: 'prompt' is {type(row['prompt']).__name__}, not a string")
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise UserError(f"{where}: 'instruction_id_list' must be a list of strings")
    if not isinstance(kwargs, list) or not all(isinstance(k, dict) for k in kwargs) or len(kwargs) != len(ids):
        raise UserError(f"{where}: 'kwargs' must be a list of objects, one per instruction ({len(ids)})")
    cls = IFEvalSample if name == "ifeval" else IFBenchSample
    return cls(key=row["key"], prompt=row["prompt"], instruction_id_list=list(ids), kwargs=list(kwargs))
