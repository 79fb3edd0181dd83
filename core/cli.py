"""What every command-line entry point shares: one-line errors instead of tracebacks."""
from __future__ import annotations

import sys
from typing import Callable, Sequence


class UserError(Exception):
    """A problem the user can fix (bad flag, missing file, malformed data).

    Entry points print it as one line and exit with status 2; anything else is a bug and keeps its
    traceback.
    """

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def run_cli(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> None:
    """Run ``main(argv)``; a :class:`UserError` becomes ``error: <message>`` on stderr and its exit code."""
    try:
        result = main(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(result if isinstance(result, int) else 0)
