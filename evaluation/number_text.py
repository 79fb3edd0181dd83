"""Numbers as the report writes them: signed differences with a true minus sign, intervals, p-values."""
from __future__ import annotations

from typing import Mapping

MINUS = "\u2212"


def signed(value: float | None, digits: int = 1) -> str:
    """+2.1, −0.6, and 0.0 for anything that rounds to zero."""
    if value is None:
        return "n/a"
    text = f"{value:+.{digits}f}"
    return f"{0:.{digits}f}" if float(text) == 0 else text.replace("-", MINUS)


def interval(d: Mapping, digits: int = 1) -> str:
    """[low, high] of an estimate dict, signed."""
    return f"[{signed(d['low'], digits)}, {signed(d['high'], digits)}]"


def plain(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}".replace("-", MINUS)


def p_text(p: float | None) -> str:
    """0.13, 0.021, 1, < 0.001."""
    if p is None:
        return "n/a"
    return "< 0.001" if p < 0.001 else f"{p:.2g}"


def p_clause(p: float | None) -> str:
    """p = 0.13, p < 0.001."""
    text = p_text(p)
    return f"p {text}" if text.startswith("<") else f"p = {text}"
