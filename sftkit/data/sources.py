"""Read rows from local files, directories, globs or a Hugging Face dataset, each with its location.

JSON and JSON Lines are parsed here, line by line (a JSON array element by element), so an error
can name its line; Parquet is read with pyarrow, CSV with pandas, Hub datasets with `datasets`, and
their rows are named by number. Every problem is one line: a DataError for the file, or a row that
formats turns into a RowError (which --skip_bad_rows skips and counts).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sftkit.data import formats, registry
from sftkit.errors import DataError

SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")


@dataclass(frozen=True)
class Source:
    """One file, or one Hugging Face dataset (name, config, split)."""

    path: str
    hub: bool = False
    config: str | None = None
    split: str = "train"
    format_type: str | None = None          # set by a dataset_info.json entry
    field_map: tuple[tuple[str, str], ...] = ()  # the entry's columns and tags

    def fingerprint(self) -> str:
        """The data's hash, and how an entry of a dataset registry says to read it."""
        how = f"|{self.format_type}|{json.dumps(self.field_map)}" if self.format_type else ""
        if not self.hub:
            h = hashlib.sha256()
            try:
                with open(self.path, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
            except OSError as err:
                raise _cannot_read(self.path, err) from None
            return h.hexdigest() + how
        return _load_hub(self)._fingerprint + how


def resolve(spec: str, config: str | None = None, split: str = "train", dataset_info: str | None = None
            ) -> list[Source]:
    """A file, a directory of data files, a glob, a Hugging Face dataset name, or an entry of a
    LLaMA-Factory dataset_info.json (REGISTRY.json:NAME, or NAME with `dataset_info`) -> sources."""
    named = registry.split_spec(spec, dataset_info)
    if named:
        entry = registry.read_entry(*named)
        found = resolve(entry.location, entry.subset, entry.split) if not entry.hub else \
            [Source(entry.location, hub=True, config=entry.subset, split=entry.split)]
        return [dataclasses.replace(s, format_type=entry.format_type, field_map=entry.field_map) for s in found]
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


def skipped(spec: str) -> list[str]:
    """'name (why)' for each file a directory holds but resolve does not read, so that none is
    skipped silently (a folder of a.jsonl, b.jsonl.gz and c.tsv prepared a.jsonl's rows alone)."""
    p = Path(spec)
    if not p.is_dir():
        return []
    return [f"{f.relative_to(p)} (type '{''.join(f.suffixes[-2:]) or 'none'}' is not read)"
            for f in sorted(p.rglob("*")) if f.is_file() and f.suffix.lower() not in SUFFIXES]


def read_rows(src: Source) -> Iterator[tuple[str, Any]]:
    """(location, row) pairs; location is 'line N' for JSON Lines, 'row N (line L)' for a JSON array
    and 'row N' otherwise (1-based; a CSV's row 1 is the first after the header).

    A JSON Lines line that cannot be read (not UTF-8, not JSON) comes as a formats.Unreadable row, so
    that --skip_bad_rows can skip and count it; a fault of the whole file raises DataError."""
    if src.hub:
        yield from ((f"row {i + 1}", formats.TableRow(row, src.path)) for i, row in enumerate(_load_hub(src)))
        return
    suffix = Path(src.path).suffix.lower()
    if suffix in (".json", ".jsonl"):
        yield from _read_json(src.path)
    elif suffix == ".parquet":
        yield from _read_parquet(src.path)
    else:
        rows = _read_csv(src.path)
        yield from ((f"row {i + 1}", formats.TableRow(row, src.path)) for i, row in enumerate(rows))


_BOM = b"\xef\xbb\xbf"
_WS = re.compile(r"[ \t\n\r]*")  # JSON's whitespace


def _raw(path: str) -> bytes:
    """The file's bytes without a UTF-8 byte-order mark; DataError for an empty or UTF-16 file."""
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise _cannot_read(path, err) from None
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(path, "", None, "the file is UTF-16 encoded; re-save it as UTF-8")
    raw = raw.removeprefix(_BOM)  # as some Windows editors write
    if not raw.strip():
        raise DataError(path, "", None, "the file is empty" if not raw else "the file holds only whitespace")
    return raw


def _utf8_problem(data: bytes, err: UnicodeDecodeError) -> tuple[int, str]:
    """(line, problem) for bytes that are not UTF-8."""
    line_start = data.rfind(b"\n", 0, err.start) + 1
    column = len(data[line_start:err.start].decode("utf-8", "replace")) + 1
    return (data.count(b"\n", 0, err.start) + 1,
            f"not valid UTF-8 (byte 0x{data[err.start]:02x}, column {column}); re-save the file as UTF-8")


def _decode(path: str, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line, problem = _utf8_problem(raw, err)
        raise DataError(path, f"line {line}", None, problem) from None


def _json_problem(err: Exception, text: str) -> str:
    """What is wrong with a piece of JSON, in one line."""
    if isinstance(err, json.JSONDecodeError):
        cut = "; the JSON is cut short" if err.pos >= len(text.rstrip()) else ""
        return f"not valid JSON ({err.msg}, column {err.colno}{cut})"
    if isinstance(err, RecursionError):
        return "cannot read the JSON (nested too deeply)"
    if "digits" in str(err):  # Python refuses to convert integers of more than 4300 digits
        return "cannot read the JSON (an integer with too many digits)"
    return f"not valid JSON ({_first_line(err)})"


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as err:  # JSONDecodeError is a ValueError
        return formats.Unreadable(_json_problem(err, text))


def _read_json(path: str) -> Iterator[tuple[str, Any]]:
    raw = _raw(path)
    first = raw.lstrip()[:1]
    if first == b"[" and not _lines_of_arrays(raw.lstrip()):
        yield from _read_json_array(path, _decode(path, raw))
        return
    lines = raw.split(b"\n")
    checked = False
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = _loads(line.decode("utf-8"))
        except UnicodeDecodeError as err:
            row = formats.Unreadable(_utf8_problem(line, err)[1])
        if not checked and isinstance(row, formats.Unreadable) and first == b"{":
            whole = _one_object(path, raw, raw.rstrip().count(b"\n") + 1)  # the first line alone is not JSON
            if whole is not None:
                yield "row 1 (line 1)", whole
                return
        if not checked:
            _refuse_registry(path, row)
        checked = True
        if isinstance(row, list):
            row = formats.Unreadable(_LIST_LINE)
        yield f"line {n}", row


_LIST_LINE = ("the line holds a JSON list, not an object; JSON Lines holds one row object per line, e.g. "
              '{"messages": [...]} (a list of rows belongs in a .json file, as one array)')


def _refuse_registry(path: str, value: Any) -> None:
    if registry.is_registry(value):
        names = ", ".join(sorted(value)[:5]) + (", ..." if len(value) > 5 else "")
        raise DataError(path, "", None, f"is a LLaMA-Factory dataset_info.json; name one of its entries ({names}): "
                        f"--data_path {path}:NAME")


def _lines_of_arrays(data: bytes) -> bool:
    """Whether `data`, which starts with '[', is JSON Lines rather than one array: its first line is
    a whole JSON value, and more lines follow."""
    end = data.find(b"\n")
    if end == -1 or not data[end:].strip():
        return False
    try:
        json.loads(data[:end])
    except (ValueError, RecursionError):
        return False
    return True


def _one_object(path: str, raw: bytes, n_lines: int) -> dict | None:
    """A file of one JSON object over several lines: one row when it is a conversation (axolotl's
    fixtures are such files); refused with advice when it is not, e.g. {"data": [...]}. None when
    the file is not one object (JSON Lines, or broken: read line by line, which names the line)."""
    try:
        whole = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    if not isinstance(whole, dict):
        return None
    _refuse_registry(path, whole)
    if _fits(whole):
        return whole
    wrapped = [k for k, v in whole.items() if isinstance(v, list) and v and all(map(_fits, v))]
    if len(wrapped) != 1:
        return whole  # one row, which formats checks and names what is wrong with
    raise DataError(path, "", None, f"holds one JSON object over {n_lines} lines whose key "
                    f"{formats._show(wrapped[0])} holds {len(whole[wrapped[0]])} rows; save that list alone "
                    "as the file ([{...}, {...}]), or the rows as JSON Lines (one object per line)")


def _fits(value: Any) -> bool:
    """Whether a value is a row of some format (detect_format accepts it)."""
    if type(value) is not dict:
        return False
    try:
        formats.detect_format(value)
    except formats.RowError:
        return False
    return True


def _read_json_array(path: str, text: str) -> Iterator[tuple[str, Any]]:
    """The elements of a JSON array, one by one, each with its index and the line it starts on.
    A syntax error stops the file: after it, nothing can be read reliably."""
    decoder = json.JSONDecoder()

    def fail(err: Exception, pos: int):
        line = err.lineno if isinstance(err, json.JSONDecodeError) else text.count("\n", 0, pos) + 1
        return DataError(path, f"line {line}", None, _json_problem(err, text))

    pos = _WS.match(text, text.index("[") + 1).end()
    line, counted = 1, 0
    n = 0
    if text.startswith("]", pos):
        pos += 1
    else:
        while True:
            line += text.count("\n", counted, pos)
            counted = pos
            try:
                row, pos = decoder.raw_decode(text, pos)
            except (ValueError, RecursionError) as err:
                raise fail(err, pos) from None
            n += 1
            yield f"row {n} (line {line})", row
            pos = _WS.match(text, pos).end()
            if text.startswith(",", pos):
                pos = _WS.match(text, pos + 1).end()
                continue
            if text.startswith("]", pos):
                pos += 1
                break
            msg = "Expecting ',' delimiter" if pos < len(text) else "Expecting ',' or ']'"
            raise fail(json.JSONDecodeError(msg, text, pos), pos) from None
    pos = _WS.match(text, pos).end()
    if pos < len(text):
        raise fail(json.JSONDecodeError("Extra data after the array", text, pos), pos) from None


def _read_parquet(path: str) -> Iterator[tuple[str, Any]]:
    """Rows of a Parquet file, a batch at a time; a file pyarrow cannot read is a DataError."""
    import pyarrow.parquet as pq

    _raw_size_check(path)
    n = 0
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
    except Exception as err:  # pyarrow raises many types for a broken file
        raise DataError(path, "", None, f"cannot read as parquet: {_first_line(err)}") from None
    while True:
        try:
            batch = next(batches, None)
            rows = [] if batch is None else batch.to_pylist()
        except Exception as err:
            where = f"row {n + 1}" if n else ""
            raise DataError(path, where, None, f"cannot read as parquet: {_first_line(err)}") from None
        if batch is None:
            return
        for row in rows:
            n += 1
            yield f"row {n}", formats.TableRow(row, path)


def _raw_size_check(path: str) -> None:
    try:
        size = Path(path).stat().st_size
    except OSError as err:
        raise _cannot_read(path, err) from None
    if size == 0:
        raise DataError(path, "", None, "the file is empty")


def _read_csv(path: str) -> list[dict[str, Any]]:
    import io

    import pandas  # a dependency of datasets

    text = _decode(path, _raw(path))
    try:
        # Every cell is text: '5' must stay the string '5', and an empty cell an empty string.
        frame = pandas.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except Exception as err:  # pandas raises several types for a malformed file
        raise DataError(path, "", None, f"cannot read as csv: {_first_line(err)}") from None
    return frame.to_dict("records")  # a row with fewer cells than the header gets empty ones


def _cannot_read(path: str, err: OSError) -> DataError:
    return DataError(path, "", None, f"cannot read the file ({err.strerror or err})")


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def _load_hub(src: Source):
    import datasets

    try:
        return datasets.load_dataset(src.path, src.config, split=src.split)
    except Exception as err:
        raise DataError(src.path, "", None, "not a local path, and loading it as a Hugging Face dataset failed "
                        f"({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''})") from None
