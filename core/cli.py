"""What every command-line entry point shares: one-line errors instead of tracebacks, and a Ctrl-C
that says how to continue."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Callable, Sequence


class UserError(Exception):
    """A problem the user can fix (bad flag, missing file, malformed data).

    Entry points print it as one line and exit with status 2; anything else is a bug and keeps its
    traceback.
    """

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


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
    the newest complete checkpoint and the exact command that continues from it. The thread guard
    (core/threads.py) applies where torch is already imported, as in every training and evaluation
    entry point; a data script that never touches torch does not pay its ~2 s import for it (one
    that imports torch later calls ``apply_thread_guard`` itself).
    """
    from core.quiet import quiet_third_party
    from core.threads import apply_thread_guard

    quiet_third_party()
    if "torch" in sys.modules:
        apply_thread_guard()
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
