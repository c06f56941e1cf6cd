"""Errors a user causes (a path, a size, a preset, a stale checkpoint): one clear message and a non-zero exit."""

from __future__ import annotations

import sys
import traceback
from types import TracebackType


class UsageError(ValueError):
    """A problem the user can fix (a bad path, size, setting or file); its message names it and the fix.

    Uncaught, it is reported as that message alone (:func:`report_user_errors`), not as the 60-line traceback of
    MONAI's bundle runner, which wraps every error of a config item in "Failed to instantiate component ...".
    """


def user_error(error: BaseException | None) -> UsageError | None:
    """The :class:`UsageError` behind ``error``, following the chain of exceptions that wrapped it."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, UsageError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _report(kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
    found = user_error(error)
    if found is None or "--debug" in sys.argv:
        traceback.print_exception(kind, error, tb)
        return
    print(f"Error: {found}\n(add --debug true to the command for the full traceback)", file=sys.stderr)


def report_user_errors() -> None:
    """Report an uncaught :class:`UsageError` as its message alone (exit status 1); ``--debug`` on the command line
    shows the traceback. Other errors keep their traceback."""
    sys.excepthook = _report
