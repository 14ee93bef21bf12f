"""LLaMA-Factory's dataset registry (dataset_info.json): a named entry -> where its rows are, their
format, and the field map of its columns and tags. Pure reading; sources.resolve builds the Sources.

An entry looks like
    "glaive": {"file_name": "glaive.json", "formatting": "sharegpt",
               "columns": {"messages": "conversations", "tools": "tools"},
               "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human"}}
`file_name` is relative to the registry's folder; `hf_hub_url` (with `subset`, `split`) names a
Hugging Face dataset instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sftkit.data import formats
from sftkit.errors import DataError

FORMATTING = {"alpaca": "alpaca", "sharegpt": "sharegpt", "openai": "messages"}
_LOCATIONS = ("hf_hub_url", "file_name")
_ELSEWHERE = ("ms_hub_url", "om_hub_url", "script_url", "cloudfile_name")
_KNOWN = set(formats.COLUMNS) | set(formats.TAGS) | set(formats.ALIASES)


@dataclass(frozen=True)
class Entry:
    """One registry entry, in sftkit's terms."""

    location: str                           # a local file or folder, or a Hugging Face dataset name
    hub: bool
    subset: str | None
    split: str
    format_type: str                        # alpaca, sharegpt or messages
    field_map: tuple[tuple[str, str], ...]  # (our name, theirs), from the entry's columns and tags


def split_spec(spec: str, registry: str | None = None) -> tuple[str, str] | None:
    """(registry path, entry name) for 'REGISTRY.json:NAME', or for NAME when `registry` (the
    --dataset_info option, REGISTRY.json or REGISTRY.json:NAME) is set and NAME is not a path;
    None otherwise."""
    path, sep, name = spec.rpartition(":")
    if sep and name and path.lower().endswith(".json") and Path(path).is_file() and not Path(spec).exists():
        return path, name
    if registry and "/" not in spec and not Path(spec).exists():
        path = (split_spec(registry) or (registry,))[0]
        if Path(spec).suffix == "" or spec in entries(path):  # 'data.jsonl' that is missing is a file
            return path, spec
    return None


def is_registry(value: Any) -> bool:
    """Whether a JSON value looks like a dataset_info.json: an object of objects that name files."""
    return (isinstance(value, dict) and bool(value) and all(isinstance(v, dict) for v in value.values())
            and any(k in v for v in value.values() for k in _LOCATIONS + _ELSEWHERE))


def entries(path: str) -> dict[str, Any]:
    """The registry's entries; a DataError when the file is not one."""
    try:
        info = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise DataError(path, "", None, f"cannot read the dataset registry ({err.strerror or err})") from None
    except (ValueError, RecursionError) as err:
        raise DataError(path, "", None, f"the dataset registry is not valid JSON ({err})") from None
    if not is_registry(info):
        raise DataError(path, "", None, "is not a LLaMA-Factory dataset_info.json (an object of named entries, "
                        "each with file_name or hf_hub_url)")
    return info


def read_entry(path: str, name: str) -> Entry:
    """The entry `name` of the registry at `path`, checked: one line naming the entry and key if wrong."""
    info = entries(path)
    if name not in info:
        names = ", ".join(sorted(info)[:12]) + (", ..." if len(info) > 12 else "")
        raise DataError(path, "", None, f"no entry {formats._show(name)}; the entries are {names}")
    entry = info[name]
    if entry.get("ranking"):
        raise DataError(path, "", f"{name}.ranking", "preference data (chosen/rejected) is not supervised "
                        "fine-tuning data; sftkit trains on SFT entries only")
    if entry.get("num_samples") is not None:
        raise DataError(path, "", f"{name}.num_samples", "is not supported; use --data_weights to take a "
                        "share of a source")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in FORMATTING:
        raise DataError(path, "", f"{name}.formatting", f"expected one of {', '.join(FORMATTING)}, got "
                        f"{formats._show(formatting)}")
    return Entry(*_location(path, name, entry), FORMATTING[formatting], _field_map(path, name, entry))


def _location(path: str, name: str, entry: dict[str, Any]) -> tuple[str, bool, str | None, str]:
    if entry.get("hf_hub_url"):
        if entry.get("folder"):
            raise DataError(path, "", f"{name}.folder", "is not supported; download the folder and give its "
                            "path as file_name")
        return str(entry["hf_hub_url"]), True, entry.get("subset"), entry.get("split") or "train"
    if entry.get("file_name"):
        return str(Path(path).parent / entry["file_name"]), False, None, "train"
    other = next((k for k in _ELSEWHERE if entry.get(k)), None)
    if other:
        raise DataError(path, "", f"{name}.{other}", "is not supported; download the data and give its "
                        "file_name, or an hf_hub_url")
    raise DataError(path, "", name, "names no data: give file_name or hf_hub_url")


def _field_map(path: str, name: str, entry: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """The entry's columns and tags as field-map pairs; a column sftkit cannot use is named."""
    pairs: dict[str, str] = {}
    for group in ("columns", "tags"):
        values = entry.get(group) or {}
        if not isinstance(values, dict):
            raise DataError(path, "", f"{name}.{group}", f"expected an object, got {formats._kind(values)}")
        for key, value in values.items():
            if key == "tool_calls_tag" and value == "tool_calls":
                continue  # the key sftkit reads an assistant turn's tool calls from anyway
            if key not in _KNOWN:
                raise DataError(path, "", f"{name}.{group}.{key}", "is not supported (sftkit reads text "
                                f"conversations: {', '.join(formats.COLUMNS)} and the role/content tags)")
            if not isinstance(value, str) or not value:
                raise DataError(path, "", f"{name}.{group}.{key}", f"expected a name, got {formats._kind(value)}")
            pairs[formats.ALIASES.get(key, key)] = value
    return tuple(sorted(pairs.items()))
