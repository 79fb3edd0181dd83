"""What every command-line entry point shares: one-line errors instead of tracebacks, and a Ctrl-C
that says how to continue."""
from __future__ import annotations

import argparse
import difflib
import shlex
import sys
from pathlib import Path
from typing import Any, Callable, Sequence


class UserError(Exception):
    """A problem the user can fix (bad flag, missing file, malformed data).

    Entry points print it as one line and exit with status 2; anything else is a bug and keeps its
    traceback.
    """

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def near_miss_hint(unknown: Sequence[str], known_flags: Sequence[str]) -> str:
    """`` (did you mean --max_steps?)`` for flags that are a typo away from a known one, else ``""``."""
    guesses = []
    for word in unknown:
        if not word.startswith("-") or word in ("-", "--"):
            continue  # a value, not a flag
        flag = word.split("=", 1)[0]
        close = difflib.get_close_matches(flag, known_flags, n=1, cutoff=0.75)
        if close and close[0] not in guesses:
            guesses.append(close[0])
    return f" (did you mean {' or '.join(guesses)}?)" if guesses else ""


class SuggestingParser(argparse.ArgumentParser):
    """argparse that names the flag a misspelled one was probably meant to be.

    Abbreviations are off (``--max_step`` must not silently mean ``--max_steps``), and an unknown
    flag is reported first, with its nearest known spelling, before argparse would complain about a
    missing required argument that the typo was perhaps meant to give.
    """

    unknown_message = "unrecognized arguments"

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> argparse.Namespace:
        words = list(sys.argv[1:] if args is None else args)
        known = [option for action in self._actions for option in action.option_strings if option.startswith("--")]
        unknown = _unknown_flags(words, known)
        if unknown:
            self.error(f"{self.unknown_message}: {' '.join(unknown)}{near_miss_hint(unknown, known)}")
        parsed, extras = self.parse_known_args(words, namespace)
        if extras:
            self.error(f"{self.unknown_message}: {' '.join(extras)}{near_miss_hint(extras, known)}")
        return parsed


def _unknown_flags(words: Sequence[str], known: Sequence[str]) -> list[str]:
    """``--flags`` in ``words`` that the parser does not know (up to a bare ``--``). A word with a
    space is a value, as argparse reads it (``--sft_args "--max_steps 5"``)."""
    unknown = []
    for word in words:
        if word == "--":
            break
        if word.startswith("--") and " " not in word and word.split("=", 1)[0] not in known:
            unknown.append(word)
    return unknown


def make_parser(**kwargs: Any) -> SuggestingParser:
    """The argument parser every argparse-based script uses (see :class:`SuggestingParser`)."""
    kwargs.setdefault("allow_abbrev", False)
    return SuggestingParser(**kwargs)


def parse_raising(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """``parser.parse_args(argv)``, a bad flag raised as a :class:`UserError` instead of printed with the usage
    and exit 2: for checking a command's flags before it runs (``scripts/run_study.py``)."""

    def error(message: str):
        raise UserError(message)

    parser.error = error  # type: ignore[method-assign]
    return parser.parse_args(argv)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training: carries the run's output dir and its newest complete checkpoint."""

    def __init__(self, output_dir: str | Path, checkpoint: Path | None):
        super().__init__(str(output_dir))
        self.output_dir = Path(output_dir)
        self.checkpoint = checkpoint


def continue_command(main: Callable, argv: Sequence[str] | None) -> str:
    """The command that ran ``main``, with ``--resume`` added: what continues an interrupted run."""
    if argv is None:  # the real command line: reproduce it as typed (python -m module / python file.py)
        words = ["python", *getattr(sys, "orig_argv", sys.argv)[1:]]
    else:
        words = ["python", "-m", main.__module__, *argv]
    if "--resume" not in words and not any(w.startswith("--resume=") for w in words):
        words.append("--resume")
    return shlex.join(words)


def interrupted_message(exc: KeyboardInterrupt, main: Callable, argv: Sequence[str] | None) -> str:
    if not isinstance(exc, TrainingInterrupted):
        return "interrupted"
    if exc.checkpoint is None:
        return (f"interrupted before the first checkpoint of {exc.output_dir} was complete: nothing to continue from; "
                f"the same command starts again, or with --resume:\n  {continue_command(main, argv)}")
    return (f"interrupted: {exc.checkpoint} is complete; continue from it with:\n  {continue_command(main, argv)}")


def run_cli(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> None:
    """Run ``main(argv)``; a :class:`UserError` becomes ``error: <message>`` on stderr and its exit code.

    Harmless third-party notices are silenced first (core/quiet.py); Ctrl-C during training names
    the newest complete checkpoint and the exact command that continues from it. The CPU clock is
    read here, so an entry point's thread guard (core/threads.py, applied once its arguments are
    parsed and torch is imported) can measure other processes over its whole start-up.
    """
    from core.quiet import quiet_third_party
    from core.threads import remember_start

    quiet_third_party()
    remember_start()
    try:
        result = main(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt as exc:
        # on a line of its own: a progress bar may be mid-line
        print("\n" + interrupted_message(exc, main, argv), file=sys.stderr)
        sys.exit(130)
    sys.exit(result if isinstance(result, int) else 0)
