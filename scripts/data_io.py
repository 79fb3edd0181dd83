"""File helpers shared by the data-preparation scripts (SFT now, DPO later).

Everything here turns a user-fixable problem (missing file, malformed JSON, failed download) into a
:class:`core.cli.UserError` with one line naming the file and, where there is one, the position of the
problem, so entry points never show a traceback for bad input.

Outputs are written atomically (a temporary file in the same folder, then ``os.replace``), so a
failed or interrupted run never leaves a half-written file where the previous good one was.
"""
from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterable, Sequence, TextIO

from core.cli import UserError

# ----------------------------------------------------------------------------- text and identity


def normalise_whitespace(text: str) -> str:
    """Collapse every run of whitespace to one space and strip the ends (for comparing, not storing)."""
    return " ".join(text.split())


def content_id(prefix: str, *parts: str, length: int = 12) -> str:
    """``<prefix>-<hex>``: a hash of the parts, so an id follows its content, not its position.

    Parts are joined with a separator that does not occur in normal text, so ("ab", "c") and
    ("a", "bc") get different ids.
    """
    digest = hashlib.sha1("\x1f".join(parts).encode("utf-8")).hexdigest()
    return f"{prefix}-{digest[:length]}"


# ----------------------------------------------------------------------------- reading


def read_text(path: str | os.PathLike) -> str:
    """The file decoded as UTF-8 (a BOM is tolerated; ``.gz`` is decompressed), or a one-line UserError."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise UserError(f"{path}: not a valid gzip file ({exc})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise UserError(f"{path}: not UTF-8 text at line {line}, column {column} (byte {exc.start})") from None


def read_data_text(path: str | os.PathLike) -> str:
    """:func:`read_text` of a data file, which must hold something: an empty (or whitespace-only) file is
    "<path> is empty", not "not valid JSON at line 1" nor "no usable records"."""
    text = read_text(path)
    if not text.strip():
        raise UserError(f"{path} is empty")
    return text


def _position(text: str, offset: int) -> tuple[int, int]:
    """1-based (line, column) of a character offset."""
    line = text.count("\n", 0, offset) + 1
    column = offset - (text.rfind("\n", 0, offset) + 1) + 1
    return line, column


def _json_type_name(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def load_json_records(path: str | os.PathLike) -> list:
    """Load a JSON file whose top level must be a list (of records); the records are not checked.

    Errors name the file and the line/column of the problem, e.g.
    ``data/raw/alpaca_data.json: not valid JSON at line 3, column 17: Expecting ',' delimiter``.
    """
    path = Path(path)
    text = read_data_text(path)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except RecursionError:
        raise UserError(f"{path}: JSON nested too deeply to read") from None
    if not isinstance(value, list):
        line, column = _position(text, len(text) - len(text.lstrip()))
        raise UserError(
            f"{path}: top level is {_json_type_name(value)} at line {line}, column {column}; "
            "expected a list of records ([{...}, ...])"
        )
    return value


def load_jsonl_records(path: str | os.PathLike) -> list:
    """Load a JSON Lines file (``.jsonl`` or ``.jsonl.gz``): one JSON value per line, blank lines skipped.

    Errors name the file, line and column of the first bad line.
    """
    path = Path(path)
    records = []
    for line_number, line in enumerate(read_data_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: not valid JSON at line {line_number}, column {exc.colno}: {exc.msg}") from None
    return records


def sha256_of_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- writing


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` via a temporary file in the same folder and a rename.

    The rename is atomic on one filesystem, so readers see either the old file or the new one,
    never a partial write. Parent folders are created. A failed write (e.g. disk full) leaves the
    old file and no temporary behind, and becomes a one-line UserError.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create folder {path.parent}: {exc.strerror or exc}") from None
    # Same folder as the target: os.replace is only atomic within one filesystem. Opened normally
    # (not mkstemp) so the file gets the user's usual permissions rather than 0600.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as exc:  # read-only folder, disk full: the user can fix these
        temporary.unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


_JSONL_ENCODER = json.JSONEncoder(ensure_ascii=False)


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    """Write rows as JSON Lines (UTF-8, not ASCII-escaped, key order kept), atomically; returns the row count."""
    encode = _JSONL_ENCODER.encode  # one encoder for all rows: json.dumps would build one per call
    lines = [encode(row) + "\n" for row in rows]
    write_text_atomic(path, "".join(lines))
    return len(lines)


def write_json_atomic(path: str | os.PathLike, value: Any, indent: int | None = 2) -> None:
    """Write one JSON document (UTF-8, key order kept, trailing newline), atomically."""
    write_text_atomic(path, json.dumps(value, ensure_ascii=False, indent=indent) + "\n")


# ----------------------------------------------------------------------------- downloading


def download_file(url: str, dest: str | os.PathLike, expected_sha256: str | None = None, timeout: float = 60) -> str:
    """Fetch ``url`` over HTTPS into ``dest`` and return the file's SHA-256 (hex).

    The body goes to a temporary file first and is renamed into place only once complete and, when
    ``expected_sha256`` is given, only if its checksum matches; otherwise nothing is left behind.
    Network failures become a one-line UserError.
    """
    dest = Path(dest)
    if not url.startswith("https://"):
        raise UserError(f"refusing to download {url}: only https:// URLs are fetched")
    dest.parent.mkdir(parents=True, exist_ok=True)
    temporary = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(temporary, "wb") as handle:
            for block in iter(lambda: response.read(1 << 20), b""):
                digest.update(block)
                handle.write(block)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        temporary.unlink(missing_ok=True)
        reason = getattr(exc, "reason", None) or exc
        raise UserError(f"could not download {url}: {reason} (no network? fetch it by hand into {dest.parent})") from None
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    actual = digest.hexdigest()
    if expected_sha256 is not None and actual != expected_sha256.lower():
        temporary.unlink(missing_ok=True)
        raise UserError(f"{url}: SHA-256 mismatch (got {actual}, expected {expected_sha256}); not saved to {dest}")
    os.replace(temporary, dest)
    return actual


# ----------------------------------------------------------------------------- summaries


def _format_cell(value: Any) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.3f}"
    return str(value)


def format_table(header: Sequence[Any], rows: Sequence[Sequence[Any]]) -> str:
    """An aligned plain-text table: first column left-aligned (labels), the others right-aligned (figures).

    Integers get thousands separators. Rows shorter than the header are padded with blanks.
    """
    cells = [[_format_cell(value) for value in header]]
    cells += [[_format_cell(value) for value in row] + [""] * (len(header) - len(row)) for row in rows]
    widths = [max(len(row[column]) for row in cells) for column in range(len(header))]

    def render(row: list[str]) -> str:
        parts = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([render(cells[0]), rule] + [render(row) for row in cells[1:]])


def print_summary_table(
    header: Sequence[Any], rows: Sequence[Sequence[Any]], title: str | None = None, file: TextIO | None = None
) -> None:
    """Print :func:`format_table` (with an optional title line) to ``file`` (default stdout)."""
    out = file or sys.stdout
    if title:
        print(title, file=out)
    print(format_table(header, rows), file=out)
