"""Errors a user can cause or fix.

Every layer raises a `SpecrunError` subclass for problems that are not bugs:
the CLI prints it as one line (plus an optional hint) and exits non-zero,
never with a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno

NO_ROOM = (errno.ENOSPC, errno.EDQUOT)  # a full disk, or a full quota on it


class SpecrunError(Exception):
    """A problem the user can act on: `message` says what, `hint` says how."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(SpecrunError):
    """Bad arguments or input (empty prompt, prompt longer than the context)."""

    exit_code = 2


class CatalogError(SpecrunError):
    """The catalog is malformed or does not know a name."""


class NotPulledError(SpecrunError):
    """A catalog model whose file is not in the store yet."""


class PullError(SpecrunError):
    """Every source failed, or a download did not verify."""


class DiskFullError(SpecrunError):
    """No room where a pull writes. Not a PullError: the next source would need the same room."""

    def __init__(self, where: object) -> None:
        super().__init__(f"the disk is full: no space left for {where}",
                         hint="free some space there (or point SPECRUN_HOME, or HF_HOME for hub pulls, at a roomier "
                              "disk) and pull again")


class ModelFileError(SpecrunError):
    """A file that is not a usable GGUF model (wrong magic, truncated, unreadable)."""


class EngineError(SpecrunError):
    """The inference engine refused the model or a request."""
