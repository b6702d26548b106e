"""Errors that reach users. Each carries one line that says what was wrong and what is allowed."""

from __future__ import annotations


class GradscopeError(Exception):
    """Base class of every error gradscope raises on purpose."""


class ConfigError(GradscopeError, ValueError):
    """Bad input from a user: an unknown name, an impossible size, a combination that makes no
    sense. The CLI prints the message as one line and exits with code 2."""


class StoreError(GradscopeError):
    """The results store could not be written (disk full, I/O error) or is held by another
    sweep. Finished runs are kept; the CLI prints one line and exits with code 1."""


class OutputError(GradscopeError):
    """An output file could not be written (disk full, permissions). Whatever was there before
    is unchanged; the CLI prints one line and exits with code 1."""
