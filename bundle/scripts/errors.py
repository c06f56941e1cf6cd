"""Errors a user causes (a path, a size, a preset, a stale checkpoint): one clear message and a non-zero exit."""

from __future__ import annotations


class UsageError(SystemExit):
    """A problem the user can fix, with the fix in its message.

    A ``SystemExit``, so that Python prints only the message and exits with status 1: MONAI's bundle runner wraps
    every ordinary exception of a config expression in "Failed to instantiate component ..." and a traceback of
    60 lines, which would bury the one line that matters.
    """

    def __init__(self, message: str) -> None:
        super().__init__(f"Error: {message}")
