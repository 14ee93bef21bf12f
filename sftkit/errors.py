"""User-facing errors: each prints as one line and exits with code 2, no traceback."""

from __future__ import annotations


class SftkitError(Exception):
    """A mistake the user can fix; the message says how."""


class ConfigError(SftkitError):
    """An option is unknown, malformed, or conflicts with another."""


class DataError(SftkitError):
    """A data row is malformed. Names the file, the line or row, and the field."""

    def __init__(self, source: str, where: str, field: str | None, problem: str):
        self.source, self.where, self.field, self.problem = source, where, field, problem
        at = f"{source}:{where}" if where else source
        super().__init__(f"{at}: field '{field}': {problem}" if field else f"{at}: {problem}")


class NothingToDo(Exception):
    """Not an error: the work asked for is already done (e.g. resuming a finished run). The CLI
    prints the message and exits 0."""
