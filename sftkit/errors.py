"""User-facing errors: each prints as one line and exits with code 2, no traceback."""

from __future__ import annotations

import reprlib
from typing import Any

QUOTE_LIMIT = 200  # characters of a user's value an error quotes: a value may be megabytes long


def quote(value: Any) -> str:
    """A user's value as an error quotes it: its repr, at most QUOTE_LIMIT characters. reprlib
    stops at depth 3 and 6 items a level, so quoting costs the same for any size of value (a YAML
    alias bomb expands to 10^9 items); the cut to QUOTE_LIMIT is then exact."""
    short = reprlib.Repr()  # python 3.11's takes no arguments
    short.maxlevel, short.maxlong = 3, 60
    short.maxlist = short.maxdict = short.maxtuple = short.maxset = 6
    short.maxstring = short.maxother = QUOTE_LIMIT
    return clip(short.repr(value))


def clip(text: str) -> str:
    """Text from elsewhere (a library's message) cut to QUOTE_LIMIT characters for an error line."""
    text = " ".join(text.split())
    return text if len(text) <= QUOTE_LIMIT else text[:QUOTE_LIMIT - 1] + "…"


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
