"""Read rows from local files, directories, globs or a Hugging Face dataset, each with its location.

JSON and JSON Lines (also gzip-compressed, .json.gz and .jsonl.gz) are parsed here, line by line
(a JSON array element by element), so an error can name its line; Parquet is read with pyarrow, CSV
with pandas, Hub datasets with `datasets`, and their rows are named by number. Every problem is one
line: a DataError for the file, or a row that formats turns into a RowError (which --skip_bad_rows
skips and counts).

A file's bytes are read once (`read`): the rows are parsed from the very bytes that are hashed, so
a file replaced while it is read can never have its rows saved under the other file's key.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sftkit.data import formats, registry
from sftkit.errors import DataError

SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".json.gz", ".jsonl.gz")
# Bytes of memory that reading one byte of JSON Lines takes at its peak (the file's bytes, its lines,
# the decoded rows): a floor, since shorter rows take more (bench/read_memory.py), so a file refused by
# this surely cannot be read. It is refused from its size, before any of it is read.
READ_MEMORY = 3
# A file with holes reads as zero bytes there, which no JSON, CSV or Parquet file holds; below 1 MiB
# a file's blocks say little (ext4 and btrfs keep a file of a few KB inline, in 0 blocks).
SPARSE_FROM = 1 << 20


def file_type(path: str | Path) -> str:
    """A file's type as read here: its last suffix, or its last two when that is '.gz' ('.jsonl.gz')."""
    suffixes = [x.lower() for x in Path(path).suffixes]
    return "".join(suffixes[-2:]) if suffixes[-1:] == [".gz"] else "".join(suffixes[-1:])


@dataclass(frozen=True)
class Source:
    """One file, or one Hugging Face dataset (name, config, split)."""

    path: str
    hub: bool = False
    config: str | None = None
    split: str = "train"
    format_type: str | None = None          # set by a dataset_info.json entry
    field_map: tuple[tuple[str, str], ...] = ()  # the entry's columns and tags
    digest: str | None = None  # the data's hash once known: a file's sha256, a Hub dataset's fingerprint

    def fingerprint(self) -> str:
        """The data's hash, and how an entry of a dataset registry says to read it."""
        how = f"|{self.format_type}|{json.dumps(self.field_map)}" if self.format_type else ""
        return (self.digest or self.hashed().digest) + how

    def hashed(self) -> Source:
        """This source with its digest: the sha256 of the file's bytes (read 1 MiB at a time, so
        hashing takes no memory), or the fingerprint `datasets` gives a Hub dataset."""
        if self.hub:
            return dataclasses.replace(self, digest=_load_hub(self)._fingerprint)
        h = hashlib.sha256()
        try:
            with open(self.path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        except OSError as err:
            raise _cannot_read(self.path, err) from None
        return dataclasses.replace(self, digest=h.hexdigest())


@dataclass
class Reading:
    """A source's rows, parsed from the bytes whose hash `source.digest` is (for a file read as
    its rows are taken, known once they all are)."""

    source: Source
    rows: Iterator[tuple[str, Any]]


# A JSON Lines file is read this many bytes at a time, as its rows are taken
BLOCK = 1 << 22
STREAMED = (".jsonl", ".jsonl.gz", ".json", ".json.gz")
"""File types read as their rows are taken when they hold JSON Lines (the rest are read whole)."""


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
        if file_type(p) not in SUFFIXES:
            raise DataError(spec, "", None, f"unsupported file type '{file_type(p)}'; use one of {', '.join(SUFFIXES)}")
        return [_local(str(p))]
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob("*") if f.is_file() and file_type(f) in SUFFIXES)
        if not files:
            raise DataError(spec, "", None, f"the directory holds no {', '.join(SUFFIXES)} files")
        return [_local(f) for f in files]
    if any(ch in spec for ch in "*?["):
        files = sorted(f for f in glob.glob(spec, recursive=True) if file_type(f) in SUFFIXES)
        if not files:
            raise DataError(spec, "", None, "the pattern matches no data files")
        return [_local(f) for f in files]
    looks_local = spec.startswith((".", "/", "~")) or file_type(spec) in SUFFIXES or spec.count("/") > 1
    if looks_local:
        raise DataError(spec, "", None, "no such file or directory")
    return [Source(spec, hub=True, config=config, split=split)]


def skipped(spec: str) -> list[str]:
    """'name (why)' for each file a directory holds but resolve does not read, so that none is
    skipped silently."""
    p = Path(spec)
    if not p.is_dir():
        return []
    return [f"{f.relative_to(p)} (type '{file_type(f) or 'none'}' is not read)"
            for f in sorted(p.rglob("*")) if f.is_file() and file_type(f) not in SUFFIXES]


def _local(path: str) -> Source:
    """A file as a source, once its size says it can be read: see check_size."""
    try:
        st = os.stat(path)
    except OSError as err:
        raise _cannot_read(path, err) from None
    # a JSON Lines file takes a block of memory, whatever its size: read() checks the others
    check_size(path, st, None if file_type(path) in STREAMED else available_memory())
    return Source(path)


def check_size(path: str, st: os.stat_result, available: int | None) -> None:
    """Refuse, from its size alone, a sparse file or one too big to read in `available` bytes of
    memory (None: unknown, not checked). Without it a sparse file is read whole before it is
    refused, as not valid UTF-8."""
    on_disk = getattr(st, "st_blocks", None)
    if on_disk is not None and st.st_size >= SPARSE_FROM and on_disk * 512 < st.st_size // 2 and _has_hole(path, st):
        raise DataError(path, "", None, f"is a sparse file: {_size(st.st_size)} long but {_size(on_disk * 512)} "
                        "on disk, the rest holes that read as zero bytes, which no data file holds; it was cut "
                        "short or not fully written (copy or download it again)")
    if available is not None and st.st_size * READ_MEMORY > available:
        raise DataError(path, "", None, f"is {_size(st.st_size)}, and reading it takes about {READ_MEMORY}x that "
                        f"in memory, more than the {_size(available)} available (MemAvailable); split it into "
                        "files of a smaller total, or free memory")


def _has_hole(path: str, st: os.stat_result) -> bool:
    """Whether the file has a hole before its end. Blocks alone can mislead: a compressing file
    system (btrfs, ZFS) stores 1 GB of JSON in far fewer blocks, with no hole."""
    if not hasattr(os, "SEEK_HOLE"):
        return True
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            return os.lseek(fd, 0, os.SEEK_HOLE) < st.st_size
        finally:
            os.close(fd)
    except OSError:
        return True  # the blocks say holes, and the file system cannot say otherwise


def available_memory() -> int | None:
    """Bytes of memory free for a new read: MemAvailable of /proc/meminfo, or less where a cgroup
    limit (a container's) leaves less; None where neither can be read."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            found += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def _size(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} KB"


def read(src: Source, head: int | None = None) -> Reading:
    """The source's bytes, read now and once, hashed, and their rows, parsed as they are taken:
    (location, row) pairs; location is 'line N' for JSON Lines, 'row N (line L)' for a JSON array
    and 'row N' otherwise (1-based; a CSV's row 1 is the first after the header).

    A source whose digest is already known (the cache key was computed from it) is refused when
    the bytes read now hash otherwise: the file changed between the two reads. A JSON Lines file
    is read as its rows are taken (_json_lines): its refusal comes after its last row.
    A JSON Lines line that cannot be read (not UTF-8, not JSON) comes as a formats.Unreadable row, so
    that --skip_bad_rows can skip and count it; a fault of the whole file raises DataError.

    `head` (the checks before the imports, which take the first rows): a JSON Lines file whose
    first line is an object is read only that many lines far, and not hashed (its digest stays
    unknown): the check costs those lines, and the real read, later, hashes the whole file."""
    if head is not None and not src.hub and file_type(src.path) == ".jsonl":
        data = _head_lines(src.path, head)
        if data is not None:
            return Reading(src, _read_json(src.path, data))
    if src.hub:
        ds = _load_hub(src)
        got = dataclasses.replace(src, digest=ds._fingerprint)
        return Reading(got, ((f"row {i + 1}", formats.TableRow(row, src.path)) for i, row in enumerate(ds)))
    if file_type(src.path) in STREAMED:
        streamed = _json_lines(src)
        if streamed is not None:
            return streamed
        check_size(src.path, _stat(src.path), available_memory())  # read whole, as what it is
    try:
        data = Path(src.path).read_bytes()
    except OSError as err:
        raise _cannot_read(src.path, err) from None
    got = dataclasses.replace(src, digest=hashlib.sha256(data).hexdigest())
    if src.digest is not None and got.digest != src.digest:
        raise changed(src.path)
    kind = file_type(src.path)
    if kind.endswith(".gz"):
        data = _gunzip(src.path, data, available_memory())
    if kind.startswith(".json"):
        return Reading(got, _read_json(src.path, data))
    if kind == ".parquet":
        return Reading(got, _read_parquet(src.path, data))
    return Reading(got, ((f"row {i + 1}", formats.TableRow(row, src.path))
                         for i, row in enumerate(_read_csv(src.path, data))))


def _stat(path: str) -> os.stat_result:
    try:
        return os.stat(path)
    except OSError as err:
        raise _cannot_read(path, err) from None


class _Hashed:
    """A file read through, its bytes hashed as they pass."""

    def __init__(self, f):
        self.f, self.sha = f, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.sha.update(data)
        return data

    def digest(self) -> str:
        """The hash of every byte of the file (what is left is read now)."""
        while self.read(BLOCK):
            pass
        return self.sha.hexdigest()


def _json_lines(src: Source) -> Reading | None:
    """A JSON Lines file (gzip-compressed or not) whose rows are parsed as they are taken, a block
    of BLOCK bytes at a time, its bytes hashed as they pass: memory holds a block, whatever the
    file's size. None where its first line is not a JSON object (an array, a pretty-printed object,
    an empty or broken file), for read() to read it whole, which tells those apart."""
    import gzip

    try:
        f = open(src.path, "rb")  # noqa: SIM115 (closed by the rows' generator, or below)
    except OSError as err:
        raise _cannot_read(src.path, err) from None
    hashed = _Hashed(f)
    stream = gzip.GzipFile(fileobj=hashed, mode="rb") if file_type(src.path).endswith(".gz") else hashed
    try:
        head = b""
        while b"\n" not in head and (block := _block(src.path, stream)):
            head += block
        first = head.removeprefix(_BOM).split(b"\n", 1)[0].strip()
        lines = first.startswith(b"{") and isinstance(_loads(first.decode("utf-8")), dict)
    except (DataError, UnicodeDecodeError):
        lines = False
    if not lines:
        f.close()
        return None
    reading = Reading(src, iter(()))

    def rows() -> Iterator[tuple[str, Any]]:
        try:
            n, rest = 0, head.removeprefix(_BOM)
            while True:
                *whole, rest = rest.split(b"\n")
                for line in whole:
                    n += 1
                    if line.strip():
                        yield f"line {n}", _json_line(src.path, line, first=n == 1)
                block = _block(src.path, stream)
                if not block:
                    break
                rest += block
            if rest.strip():
                yield f"line {n + 1}", _json_line(src.path, rest, first=n == 0)
            digest = hashed.digest()
            if src.digest is not None and digest != src.digest:
                raise changed(src.path)
            reading.source = dataclasses.replace(src, digest=digest)
        except OSError as err:
            raise _cannot_read(src.path, err) from None
        finally:
            f.close()

    reading.rows = rows()
    return reading


def _block(path: str, stream) -> bytes:
    """The next block of a file's (uncompressed) bytes; one line for a corrupt gzip file."""
    import zlib

    try:
        return stream.read(BLOCK)
    except (EOFError, zlib.error, OSError) as err:  # gzip.BadGzipFile is an OSError
        if not path.lower().endswith(".gz"):
            raise _cannot_read(path, err) from None
        raise DataError(path, "", None, f"is not a valid gzip file ({_first_line(err)}); compress it again "
                        "with gzip, or pass it uncompressed") from None


def _head_lines(path: str, lines: int) -> bytes | None:
    """The first `lines` lines of a file, read by blocks of 1 MiB; None where its first line is not
    a JSON object (a pretty-printed object or an array, which only the whole file shows)."""
    parts, newlines = [], 0
    try:
        with open(path, "rb") as f:
            while newlines < lines and (block := f.read(1 << 20)):
                parts.append(block)
                newlines += block.count(b"\n")
    except OSError as err:
        raise _cannot_read(path, err) from None
    data = b"".join(parts)
    cut = -1
    for _ in range(lines):
        cut = data.find(b"\n", cut + 1)
        if cut < 0:
            break
    data = data if cut < 0 else data[:cut + 1]
    first = data.split(b"\n", 1)[0].strip()
    try:
        return data if first.startswith(b"{") and isinstance(_loads(first.decode("utf-8")), dict) else None
    except UnicodeDecodeError:  # _loads itself turns a JSON error into an Unreadable row
        return None


def changed(path: str) -> DataError:
    return DataError(path, "", None, "changed while it was read (its bytes differ from those the cache key was "
                     "computed from); run again")


def _gunzip(path: str, data: bytes, available: int | None) -> bytes:
    """A gzip file's contents; one line for a corrupt file, or one too big to unpack in memory
    (a 1 MB gzip can hold 1 GB of zeros)."""
    import gzip
    import zlib

    cap = -1 if available is None else available // READ_MEMORY + 1
    try:
        out = gzip.GzipFile(fileobj=io.BytesIO(data)).read(cap)
    except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        raise DataError(path, "", None, f"is not a valid gzip file ({_first_line(err)}); compress it again "
                        "with gzip, or pass it uncompressed") from None
    if cap != -1 and len(out) >= cap:
        raise DataError(path, "", None, f"unpacks to more than {_size(cap - 1)}, and reading that takes about "
                        f"{READ_MEMORY}x that in memory, more than the {_size(available)} available (MemAvailable); "
                        "split it into files of a smaller total, or free memory")
    return out


_BOM = b"\xef\xbb\xbf"
_WS = re.compile(r"[ \t\n\r]*")  # JSON's whitespace


def _text(path: str, raw: bytes) -> bytes:
    """The file's bytes without a UTF-8 byte-order mark; DataError for an empty or UTF-16 file."""
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


def _read_json(path: str, raw: bytes) -> Iterator[tuple[str, Any]]:
    raw = _text(path, raw)
    first = raw.lstrip()[:1]
    if first == b"[" and not _lines_of_arrays(raw.lstrip()):
        yield from _read_json_array(path, _decode(path, raw))
        return
    lines = raw.split(b"\n")
    checked = False
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        row = _json_value(line)
        if not checked and isinstance(row, formats.Unreadable) and first == b"{":
            whole = _one_object(path, raw, raw.rstrip().count(b"\n") + 1)  # the first line alone is not JSON
            if whole is not None:
                yield "row 1 (line 1)", whole
                return
        yield f"line {n}", _json_line(path, line, first=not checked, value=row)
        checked = True


def _json_value(line: bytes) -> Any:
    """A line's JSON value, or an Unreadable row saying why there is none."""
    try:
        return _loads(line.decode("utf-8"))
    except UnicodeDecodeError as err:
        return formats.Unreadable(_utf8_problem(line, err)[1])


def _json_line(path: str, line: bytes, first: bool, value: Any = None) -> Any:
    """A JSON Lines line as a row: a list is no row, and a first line may not be a dataset registry."""
    row = _json_value(line) if value is None else value
    if first:
        _refuse_registry(path, row)
    return formats.Unreadable(_LIST_LINE) if isinstance(row, list) else row


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


def _read_parquet(path: str, data: bytes) -> Iterator[tuple[str, Any]]:
    """Rows of a Parquet file's bytes, a batch at a time; a file pyarrow cannot read is a DataError."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not data:
        raise DataError(path, "", None, "the file is empty")
    n = 0
    try:
        batches = pq.ParquetFile(pa.BufferReader(pa.py_buffer(data))).iter_batches(batch_size=1024)
    except Exception as err:  # noqa: BLE001 -- pyarrow raises many types for a broken file
        raise DataError(path, "", None, f"cannot read as parquet: {_first_line(err)}") from None
    while True:
        try:
            batch = next(batches, None)
            rows = [] if batch is None else batch.to_pylist()
        except Exception as err:  # noqa: BLE001 -- as above
            where = f"row {n + 1}" if n else ""
            raise DataError(path, where, None, f"cannot read as parquet: {_first_line(err)}") from None
        if batch is None:
            return
        for row in rows:
            n += 1
            yield f"row {n}", formats.TableRow(row, path)


def _read_csv(path: str, raw: bytes) -> list[dict[str, Any]]:
    import pandas  # a dependency of datasets

    text = _decode(path, _text(path, raw))
    try:
        # Every cell is text: '5' must stay the string '5', and an empty cell an empty string.
        frame = pandas.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except Exception as err:  # noqa: BLE001 -- pandas raises several types for a malformed file
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
    except Exception as err:  # noqa: BLE001 -- any failure: said in the one line below
        raise DataError(src.path, "", None, "not a local path, and loading it as a Hugging Face dataset failed "
                        f"({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''})") from None
