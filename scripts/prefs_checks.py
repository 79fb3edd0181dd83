"""Checks of scripts/prepare_dpo_data.py that are about the user's intent, not a row's content.

Where a set of preference pairs came from, so one source never silently replaces another's pairs:

``scripts/prepare_dpo_data.py`` writes the same ``prefs_*.jsonl`` names for every source (so DPO's
defaults find them); its ``prefs_stats.json`` records the origin. Before writing, the origin of
what the folder already holds is compared with the new one: a rerun of the same source replaces its
own pairs, another source is refused unless ``--overwrite`` (or another ``--out_dir``) is given.

And which ``--format`` a file needs, when the rows say so (HH-RLHF dialogues read as plain pairs).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from core.cli import UserError


def origin_of(provenance: dict) -> str:
    """One line naming a source: the SFT run sampled from, or the file and its format."""
    if provenance.get("sft_model"):
        return f"samples of the SFT run {Path(provenance['sft_model']).resolve()}"
    return f"{provenance.get('format', 'pairs')} file {provenance.get('from_file')}"


def existing_origin(out_dir: Path, names: dict[str, str]) -> str | None:
    """The origin of the pairs ``out_dir`` holds ("unknown" without a readable stats file), None if it holds none."""
    if not any((out_dir / names[split]).exists() for split in ("train", "val")):
        return None
    try:
        return origin_of(json.loads((out_dir / names["stats"]).read_text(encoding="utf-8")))
    except (OSError, ValueError, AttributeError):
        return "unknown (no readable " + names["stats"] + ")"


def check_out_dir(out_dir: Path, names: dict[str, str], provenance: dict, overwrite: bool) -> None:
    """Refuse to replace pairs of another origin unless ``overwrite``."""
    held = existing_origin(out_dir, names)
    if held is None or overwrite or held == origin_of(provenance):
        return
    raise UserError(f"{out_dir} already holds preference pairs from {held}; these would come from "
                    f"{origin_of(provenance)}: pass --overwrite to replace them, or --out_dir to keep both")


def looks_like_hh_rlhf(record: Any) -> bool:
    """A {chosen, rejected} record whose texts are whole Human/Assistant dialogues, with no prompt field."""
    return (isinstance(record, dict) and not ({"prompt", "instruction"} & set(record))
            and all(isinstance(record.get(k), str) and "\n\nHuman:" in record[k] and "\n\nAssistant:" in record[k]
                    for k in ("chosen", "rejected")))


def format_hint(args, collected) -> str | None:
    """With --format pairs, rows missing a prompt that are HH-RLHF dialogues: say which flag reads them."""
    if args.from_file is None or args.format != "pairs":
        return None
    shaped = sum(e["reason"] == "missing_field" and looks_like_hh_rlhf(e["record"]) for e in collected.rejected)
    if not shaped:
        return None
    return (f"{shaped:,} rows are Anthropic HH-RLHF dialogues ({{chosen, rejected}} with Human/Assistant turns, no prompt): "
            f"pass --format hh-rlhf to read them")
