"""The application's user-facing error.

`UserError` carries one line that says what is wrong, naming the file (and line) or the setting, and what
to do about it. The CLI prints that line alone (exit status 2) instead of a traceback; anything else that
escapes is a bug and keeps its traceback.
"""
from __future__ import annotations

__all__ = ["Interrupted", "UserError"]


class UserError(Exception):
    """A problem with the user's input, files or environment, described in one line."""

    def __init__(self, message: str) -> None:
        message = " ".join(str(message).split())  # one line, whatever the caller's formatting
        super().__init__(message)
        self.message = message


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with one line saying what the command had written and kept (the CLI prints it, exit status 130)."""

    def __init__(self, kept: str) -> None:
        kept = " ".join(str(kept).split())
        super().__init__(kept)
        self.kept = kept
