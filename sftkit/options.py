"""Typed option groups: the machinery shared by every options dataclass (SFTConfig's groups, the
data package's DataOptions, eval's and merge-lora's options).

One table says, for each field type, how a YAML or Python value is checked and coerced and which
type the command line parses it as. The docstring under each field documents it: its first
paragraph is the `--help` text, the whole docstring its entry in docs/CONFIG.md.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import math
from dataclasses import dataclass
from functools import cache
from typing import Any, Optional

from sftkit.errors import ConfigError, quote

EVAL = {"eval": True}  # field metadata: `sftkit eval` takes this option too
PREPARE = {"prepare": True}  # field metadata: `sftkit prepare-data` takes this option of another group
# field metadata: the option changes how a run is carried out or how long it is, not what one of
# its steps computes, so a checkpoint resumes under any value of it (see SFTConfig.identity)
NOT_IDENTITY = {"identity": False}


@dataclass(frozen=True)
class Range:
    """The values a numeric option takes, written beside its default (field metadata `range`),
    checked with its type before anything loads, and shown in --help and docs/CONFIG.md."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False      # lo itself is excluded
    hi_open: bool = False      # hi itself is excluded
    off: int | None = None     # one value outside the range with a meaning of its own (max_steps -1)
    off_means: str = "off"     # what that value means, as --help says it
    unless: str | None = None  # the range holds only while this other option is not positive

    def allows(self, value: float) -> bool:
        if value == self.off:
            return True
        if isinstance(value, float) and not math.isfinite(value):
            return False
        above = self.lo is None or (value > self.lo if self.lo_open else value >= self.lo)
        below = self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)
        return above and below

    def text(self) -> str:
        """As an error says it: `in [0, 1)`, `at least 1, or -1 (off)`."""
        return self.bounds(words=True)

    def bounds(self, words: bool = False) -> str:
        """As --help and docs/CONFIG.md show it: `[0, 1)`, `>= 1, or -1 (off)`."""
        if self.lo is not None and self.hi is not None:
            said = f"{'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}{')' if self.hi_open else ']'}"
            said = f"in {said}" if words else said
        else:
            strict, end = (self.lo_open, self.lo) if self.lo is not None else (self.hi_open, self.hi)
            sign = (">" if strict else ">=") if self.lo is not None else ("<" if strict else "<=")
            if words:
                sign = {">": "above", ">=": "at least", "<": "below", "<=": "at most"}[sign]
            said = f"{sign} {_num(end)}"
        return said + (f", or {self.off} ({self.off_means})" if self.off is not None else "")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def between(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> dict:
    """Field metadata: lo <= value <= hi (an open end excludes it)."""
    return {"range": Range(lo, hi, lo_open, hi_open)}


def at_least(lo: float, *, off: int | None = None, off_means: str = "off", unless: str | None = None) -> dict:
    """Field metadata: value >= lo, or `off`, one value with a meaning of its own (`off_means`)."""
    return {"range": Range(lo, off=off, off_means=off_means, unless=unless)}


def above(lo: float, *, unless: str | None = None) -> dict:
    """Field metadata: value > lo."""
    return {"range": Range(lo, lo_open=True, unless=unless)}


def check_ranges(obj) -> None:
    """Every field with a `range` in its metadata holds a value in it (each item, for a list)."""
    for f in dataclasses.fields(obj):
        rng, value = f.metadata.get("range"), getattr(obj, f.name)
        if rng is None or value is None or (rng.unless and (getattr(obj, rng.unless, 0) or 0) > 0):
            continue
        for v in value if isinstance(value, list) else [value]:
            if not rng.allows(v):
                but = f" (while {rng.unless} is not set)" if rng.unless else ""
                raise ConfigError(f"{f.name} must be {rng.text()}{but}, got {quote(v)}")


def _plain(value: Any, kind: type) -> bool:
    return isinstance(value, kind) and not isinstance(value, bool)


def _as_float(value: Any) -> Any:
    if isinstance(value, str):  # PyYAML reads 1e-5 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            return value
    return float(value) if _plain(value, (int, float)) else value


def _as_list(value: Any, item: type) -> Any:
    if _plain(value, (str, int, float)):
        value = [value]  # a single value where a list is expected: `data_path: one.json`
    if isinstance(value, (list, tuple)) and all(_plain(v, item) for v in value):
        return [float(v) if item is not str else v for v in value]
    return value


AUTO = -1  # an IntOrAuto field's value for "auto"
IntOrAuto = int  # a field's annotation: an int, or the word auto (stored as AUTO)


def _as_int_or_auto(value: Any) -> Any:
    if isinstance(value, str):
        text = value.strip().lower()
        return AUTO if text == "auto" else int(text) if text.lstrip("-").isdigit() else value
    return value


# field type -> (what the command line parses, coerce a YAML/Python value, test the result, name in errors)
TYPES: dict[str, tuple[type, Any, Any, str]] = {
    "str": (str, lambda v: v, lambda v: isinstance(v, str), "str"),
    "int": (int, lambda v: v, lambda v: _plain(v, int), "int"),
    "IntOrAuto": (str, _as_int_or_auto, lambda v: _plain(v, int), "int or auto"),
    "float": (float, _as_float, lambda v: _plain(v, (int, float)), "float"),
    "bool": (bool, lambda v: v, lambda v: isinstance(v, bool), "bool"),
    "list[str]": (list[str], lambda v: _as_list(v, str), lambda v: isinstance(v, list), "list of strings"),
    "list[float]": (list[float], lambda v: _as_list(v, (int, float)), lambda v: isinstance(v, list),
                    "list of numbers"),
}


def field_kind(f: dataclasses.Field) -> tuple[str, bool]:
    """('int', optional?) from the annotation text `int | None`."""
    text = f.type if isinstance(f.type, str) else str(f.type)
    optional = text.endswith("| None")
    return text.replace(" | None", ""), optional


def cli_type(f: dataclasses.Field):
    """The command line's type for a field: always Optional, so an unset flag stays None and a
    YAML value or the dataclass default survives."""
    return Optional[TYPES[field_kind(f)[0]][0]]


def default_of(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def check_types(obj) -> None:
    """YAML and the Python API give values of any type: coerce the harmless, reject the rest;
    then every value must lie in its field's range."""
    for f in dataclasses.fields(obj):
        kind, optional = field_kind(f)
        value = getattr(obj, f.name)
        if value is None and optional:
            continue
        _, coerce, ok, name = TYPES[kind]
        value = coerce(value)
        if not ok(value):
            raise ConfigError(f"{f.name}: expected {name}, got {quote(value)}")
        setattr(obj, f.name, value)
    check_ranges(obj)


def check_choice(obj, name: str, allowed: tuple[str, ...]) -> None:
    value = getattr(obj, name)
    if value not in allowed:
        raise ConfigError(f"{name}: {quote(value)} is not one of {', '.join(allowed)}")


@cache
def _paragraphs(cls: type) -> dict[str, list[str]]:
    """The docstring written under each field of `cls` and of its dataclass bases, as paragraphs
    (split at blank lines), each on one line."""
    docs: dict[str, list[str]] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(inspect.getsource(klass)).body[0].body
        for node, nxt in itertools.pairwise(body):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                text = inspect.cleandoc(str(nxt.value.value))
                docs[node.target.id] = [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]
    return docs


def field_docs(cls: type) -> dict[str, str]:
    """Each field's whole docstring on one line: its entry in docs/CONFIG.md."""
    return {name: " ".join(paras) for name, paras in _paragraphs(cls).items()}


def field_help(cls: type) -> dict[str, str]:
    """Each field's first paragraph: its `--help` text, two short lines at most (the rest of the
    docstring is detail for docs/CONFIG.md)."""
    return {name: paras[0] if paras else "" for name, paras in _paragraphs(cls).items()}


def declared_in(cls: type) -> list[dataclasses.Field]:
    """The fields `cls` itself declares (a group), not those of its bases."""
    inherited = {f.name for base in cls.__bases__ if dataclasses.is_dataclass(base) for f in dataclasses.fields(base)}
    return [f for f in dataclasses.fields(cls) if f.name not in inherited]


def values_of(cls: type, source) -> dict[str, Any]:
    """The values `source` (an object with those attributes) holds for the fields of `cls`."""
    return {f.name: getattr(source, f.name) for f in dataclasses.fields(cls)}
