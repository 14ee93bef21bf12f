"""Typed option groups: the machinery shared by every options dataclass (SFTConfig's groups, the
data package's DataOptions, eval's and merge-lora's options).

One table says, for each field type, how a YAML or Python value is checked and coerced and which
type the command line parses it as; the docstring under each field is its help text.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
from functools import cache
from typing import Any, Optional

from sftkit.errors import ConfigError

EVAL = {"eval": True}  # field metadata: `sftkit eval` takes this option too
PREPARE = {"prepare": True}  # field metadata: `sftkit prepare-data` takes this option of another group
# field metadata: the option changes how a run is carried out or how long it is, not what one of
# its steps computes, so a checkpoint resumes under any value of it (see SFTConfig.identity)
NOT_IDENTITY = {"identity": False}

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


# field type -> (what the command line parses, coerce a YAML/Python value, test the result, name in errors)
TYPES: dict[str, tuple[type, Any, Any, str]] = {
    "str": (str, lambda v: v, lambda v: isinstance(v, str), "str"),
    "int": (int, lambda v: v, lambda v: _plain(v, int), "int"),
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
    """YAML and the Python API give values of any type: coerce the harmless, reject the rest."""
    for f in dataclasses.fields(obj):
        kind, optional = field_kind(f)
        value = getattr(obj, f.name)
        if value is None and optional:
            continue
        _, coerce, ok, name = TYPES[kind]
        value = coerce(value)
        if not ok(value):
            raise ConfigError(f"{f.name}: expected {name}, got {value!r}")
        setattr(obj, f.name, value)


def check_choice(obj, name: str, allowed: tuple[str, ...]) -> None:
    value = getattr(obj, name)
    if value not in allowed:
        raise ConfigError(f"{name}: '{value}' is not one of {', '.join(allowed)}")


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of `cls` and of its dataclass bases, one line each."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(inspect.getsource(klass)).body[0].body
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def declared_in(cls: type) -> list[dataclasses.Field]:
    """The fields `cls` itself declares (a group), not those of its bases."""
    inherited = {f.name for base in cls.__bases__ if dataclasses.is_dataclass(base) for f in dataclasses.fields(base)}
    return [f for f in dataclasses.fields(cls) if f.name not in inherited]


def values_of(cls: type, source) -> dict[str, Any]:
    """The values `source` (an object with those attributes) holds for the fields of `cls`."""
    return {f.name: getattr(source, f.name) for f in dataclasses.fields(cls)}
