"""Read rows from local files, directories, globs or a Hugging Face dataset, each with its location.

JSON and JSON Lines are parsed here, line by line, so an error can name its line; Parquet, CSV and
Hub datasets are read through the `datasets` library and named by row.
"""

from __future__ import annotations

import glob
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from sftkit.errors import DataError

SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")


@dataclass(frozen=True)
class Source:
    """One file, or one Hugging Face dataset (name, config, split)."""

    path: str
    hub: bool = False
    config: str | None = None
    split: str = "train"

    def fingerprint(self) -> str:
        if not self.hub:
            h = hashlib.sha256()
            with open(self.path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            return h.hexdigest()
        return _load_hub(self)._fingerprint


def resolve(spec: str, config: str | None = None, split: str = "train") -> list[Source]:
    """A file, a directory of data files, a glob, or a Hugging Face dataset name -> sources."""
    p = Path(spec)
    if p.is_file():
        if p.suffix.lower() not in SUFFIXES:
            raise DataError(spec, "", None, f"unsupported file type '{p.suffix}'; use one of {', '.join(SUFFIXES)}")
        return [Source(str(p))]
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES)
        if not files:
            raise DataError(spec, "", None, f"the directory holds no {', '.join(SUFFIXES)} files")
        return [Source(f) for f in files]
    if any(ch in spec for ch in "*?["):
        files = sorted(f for f in glob.glob(spec, recursive=True) if Path(f).suffix.lower() in SUFFIXES)
        if not files:
            raise DataError(spec, "", None, "the pattern matches no data files")
        return [Source(f) for f in files]
    looks_local = spec.startswith((".", "/", "~")) or Path(spec).suffix.lower() in SUFFIXES or spec.count("/") > 1
    if looks_local:
        raise DataError(spec, "", None, "no such file or directory")
    return [Source(spec, hub=True, config=config, split=split)]


def read_rows(src: Source) -> Iterator[tuple[str, Any]]:
    """(location, row) pairs; location is 'line N' for JSON Lines, 'row N' otherwise (1-based)."""
    if src.hub:
        yield from ((f"row {i + 1}", row) for i, row in enumerate(_load_hub(src)))
        return
    suffix = Path(src.path).suffix.lower()
    if suffix in (".json", ".jsonl"):
        yield from _read_json(src.path)
    else:
        yield from ((f"row {i + 1}", row) for i, row in enumerate(_load_table(src.path, suffix)))


def _read_json(path: str) -> Iterator[tuple[str, Any]]:
    raw = Path(path).read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # a UTF-8 byte-order mark, as some Windows editors write
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(path, f"line {line}", None, f"not valid UTF-8 (byte 0x{raw[err.start]:02x}); "
                        "re-save the file as UTF-8") from None
    if not text.strip():
        raise DataError(path, "", None, "the file is empty")
    if text.lstrip()[0] == "[":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(path, f"line {err.lineno}", None, f"not valid JSON ({err.msg}, column {err.colno})") from None
        yield from ((f"row {i + 1}", row) for i, row in enumerate(rows))
        return
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield f"line {n}", json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(path, f"line {n}", None, f"not valid JSON ({err.msg}, column {err.colno})") from None


def _load_table(path: str, suffix: str):
    import datasets

    datasets.disable_progress_bars()
    try:
        if suffix == ".parquet":
            return datasets.Dataset.from_parquet(path)
        import pandas  # a dependency of datasets

        # Every cell is text: '5' must stay the string '5', and an empty cell an empty string.
        return pandas.read_csv(path, dtype=str, keep_default_na=False).to_dict("records")
    except Exception as err:  # pyarrow raises many types for a broken file
        raise DataError(path, "", None, f"cannot read as {suffix[1:]}: {str(err).splitlines()[0][:200]}") from None


def _load_hub(src: Source):
    import datasets

    try:
        return datasets.load_dataset(src.path, src.config, split=src.split)
    except Exception as err:
        raise DataError(src.path, "", None, "not a local path, and loading it as a Hugging Face dataset failed "
                        f"({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''})") from None
