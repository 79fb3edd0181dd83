"""Where each raw data file comes from: the one table of public URLs and pinned checksums.

``--download`` fetches from here and checks the SHA-256 before the file is used, where one is
pinned; messages say "checked" only then (:func:`checksum_claim`).

About the checksums: they could not be computed when this table was written (the machine had no
network, and the local copies available for testing are reconstructions, not byte-identical to
the published files). Rather than pin a guessed value, an unknown checksum is ``None``: the
download then prints the SHA-256 it computed and says it could not be verified. Once you have
fetched a file you trust, paste that value here to pin it.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from core.cli import UserError
from scripts.data_io import download_file


@dataclass(frozen=True)
class RawFile:
    url: str
    sha256: str | None  # None: not known for certain, so not pinned (see module docstring)
    expected_records: int
    licence: str


RAW_FILES: dict[str, RawFile] = {
    "alpaca_data.json": RawFile(
        url="https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json",
        sha256=None,
        expected_records=52_002,
        licence="CC BY-NC 4.0",
    ),
    "code_alpaca_20k.json": RawFile(
        url="https://raw.githubusercontent.com/sahil280114/codealpaca/master/data/code_alpaca_20k.json",
        sha256=None,
        expected_records=20_022,
        licence="CC BY-NC 4.0",
    ),
}

# Files the pipeline derives from a raw file instead of downloading: derived name -> raw file name.
DERIVED_FILES: dict[str, str] = {
    "cleaned_data.json": "code_alpaca_20k.json",
}


def checksum_claim(names) -> str:
    """What ``--download`` does about checksums for these files (derived files: their raw file), truthfully."""
    raw = [RAW_FILES.get(DERIVED_FILES.get(name, name)) for name in names]
    if raw and all(r is not None and r.sha256 for r in raw):
        return "SHA-256 checked against the pinned value"
    return "no SHA-256 is pinned for them yet: the download prints the SHA-256 it got, for you to compare"


def raw_files_to_fetch(raw_dir: Path, sources: Sequence[str], download: bool,
                       how_to_download: str = "rerun with --download") -> list[str]:
    """The raw files to download for the sources missing from ``raw_dir`` (none when all are there); a
    UserError when one is missing and cannot be downloaded (``download`` off, or no known source)."""
    missing = [name for name in sources if not (raw_dir / name).is_file()]
    to_fetch = sorted({DERIVED_FILES.get(name, name) for name in missing})
    to_fetch = [name for name in to_fetch if not (raw_dir / name).is_file()]
    for name in to_fetch:
        if name not in RAW_FILES:
            raise UserError(f"{raw_dir / name} is missing and has no known download source; check --sources and --raw_dir")
    if to_fetch and not download:
        raise UserError(missing_files_message(raw_dir, missing, how_to_download))
    return to_fetch


def missing_files_message(raw_dir: Path, missing: Sequence[str], how_to_download: str = "rerun with --download") -> str:
    """One line: which files are missing, where each comes from, and how to fetch them."""
    parts = []
    for name in missing:
        base = DERIVED_FILES.get(name)
        if base and (raw_dir / base).is_file():
            continue  # buildable from what is there; not a problem by itself
        if base:
            parts.append(f"{name} (built from {base}, also missing; {base} is at {source_hint(base)})")
        else:
            parts.append(f"{name} (at {source_hint(name)})")
    return (
        f"missing raw data in {raw_dir}: " + "; ".join(parts)
        + f". Put the files there, or {how_to_download} to fetch them over HTTPS ({checksum_claim(missing)})"
    )


def source_hint(name: str) -> str:
    raw = RAW_FILES.get(name)
    return raw.url if raw else "no known public source; check --sources and --raw_dir"


def fetch_raw_file(raw_dir: Path, name: str) -> str:
    """Download one raw file and check it against its pinned SHA-256 (when one is pinned)."""
    raw = RAW_FILES.get(name)
    if raw is None:
        raise UserError(f"{raw_dir / name} is missing and has no known download source; check --sources and --raw_dir")
    print(f"downloading {raw.url} -> {raw_dir / name}")
    sha256 = download_file(raw.url, raw_dir / name, expected_sha256=raw.sha256)
    if raw.sha256 is None:
        print(
            f"warning: {name}: SHA-256 {sha256} could not be verified: no checksum is pinned for it "
            "(scripts/raw_sources.py); pin this value once you trust the file",
            file=sys.stderr,
        )
    else:
        print(f"{name}: SHA-256 verified ({sha256})")
    return sha256
