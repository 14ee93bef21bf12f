"""The prepared set on disk, written a chunk of examples at a time, in bounded memory.

prepare-data appends each tokenized chunk to a spool (an Arrow IPC file in its temporary output
folder) and keeps only 8 bytes a row in memory (each example's length and the data_path entry it
came from: what the statistics and the source weights need). `Spool.save` then writes the
`datasets` layout that `datasets.load_from_disk` reads, the very bytes `Dataset.save_to_disk`
writes for the same examples: the same shard count and rows per shard, the same record batches,
written by `datasets`' own ArrowWriter. Only state.json's `_fingerprint` differs: `datasets` hashes
the whole in-memory table for it, and a streamed set carries sftkit's own fingerprint there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sftkit.data.columns import ARROW_TOKENS, Columns, arrow_lists, cuts
from sftkit.data.render import IGNORE_INDEX

SPOOL = "examples.spool.arrow"


def features():
    import datasets

    return datasets.Features({
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "labels": datasets.Sequence(datasets.Value("int32")),
        "length": datasets.Value("int32"),  # for batching without reading every example
    })


def table(cols: Columns):
    """The examples as an Arrow table of the saved layout (list<int32> ids and labels, int32 length)."""
    import pyarrow as pa

    return pa.table({"input_ids": arrow_lists(cols.ids, cols.offsets), "labels": arrow_lists(cols.labels, cols.offsets),
                     "length": pa.array(cols.lengths.astype("int32"), pa.int32())})


@dataclass
class Saved:
    """What was written: the examples' lengths in saved order, their tokens and supervised tokens."""

    lengths: np.ndarray
    tokens: int
    supervised: int


class Spool:
    """Examples appended in order to an Arrow file; then saved, in any order, as a `datasets` set."""

    def __init__(self, path: Path):
        import pyarrow as pa

        self.path = path
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = pa.ipc.new_file(self._sink, table(Columns.empty()).schema)
        self._starts = [0]  # the first row of each record batch, and one past the last row
        self._lengths: list[np.ndarray] = []
        self._origins: list[np.ndarray] = []
        self._images: list[list[str]] = []  # per example, its images' sha256 (only in a set with images)

    def __len__(self) -> int:
        return self._starts[-1]

    def add(self, cols: Columns, origins, images: list[list[str]] | None = None) -> None:
        """Append these examples, each with the data_path entry it came from (and its images' sha256,
        in a set with images)."""
        if not len(cols):
            return
        if images is not None or self._images:
            self._images.extend([[]] * (len(self) - len(self._images)))  # the text examples before
            self._images.extend(images or [[]] * len(cols))
        for batch in table(cols).to_batches():
            self._writer.write_batch(batch)
            self._starts.append(self._starts[-1] + batch.num_rows)
        self._lengths.append(cols.lengths.astype(np.int32))
        self._origins.append(np.asarray(origins, dtype=np.int32))

    @property
    def lengths(self) -> np.ndarray:
        return np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int32)

    @property
    def origins(self) -> np.ndarray:
        return np.concatenate(self._origins) if self._origins else np.zeros(0, np.int32)

    @property
    def has_images(self) -> bool:
        """Whether a kept example holds an image."""
        return any(self._images)

    def save_images(self, path: Path, order: np.ndarray | None = None) -> dict:
        """Write each saved example's images (the examples at `order`, else all) as an Arrow file of
        one list<string> column; returns the counts and a digest of the whole list."""
        import hashlib

        import pyarrow as pa

        keys = self._images + [[]] * (len(self) - len(self._images))
        saved = keys if order is None else [keys[i] for i in order.tolist()]
        h = hashlib.sha256()
        for names in saved:
            h.update((",".join(names) + "\n").encode())
        column = pa.array(saved, pa.list_(pa.string()))
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, pa.schema([("images", column.type)])) as w:
            w.write_table(pa.table({"images": column}))
        return {"examples": sum(1 for n in saved if n), "images": sum(map(len, saved)), "digest": h.hexdigest()}

    def close(self) -> None:
        if not self._sink.closed:
            self._writer.close()
            self._sink.close()

    def save(self, path: Path, fingerprint: str, order: np.ndarray | None = None,
             max_shard_size: int | str | None = None) -> Saved:
        """Write the examples (those at `order`, repeats allowed, else all in order) to `path` as
        `Dataset.save_to_disk` does, then remove the spool. `fingerprint`: state.json's."""
        import pyarrow as pa
        from datasets import config
        from datasets.arrow_writer import ArrowWriter, get_writer_batch_size_from_data_size
        from datasets.utils.py_utils import convert_file_size_to_int

        self.close()
        lengths = self.lengths if order is None else self.lengths[order]
        rows = len(lengths)
        nbytes = table_nbytes(lengths)
        shards = min(rows, int(nbytes / convert_file_size_to_int(max_shard_size or config.MAX_SHARD_SIZE)) + 1)
        batch_rows = min(config.DEFAULT_MAX_BATCH_SIZE, get_writer_batch_size_from_data_size(rows, nbytes))
        path.mkdir(parents=True)
        names = [f"data-{i:05d}-of-{shards:05d}.arrow" for i in range(shards)]
        offsets = np.zeros(rows + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        chunk_starts = set(cuts(offsets, ARROW_TOKENS)[:-1])  # where the in-memory set's Arrow chunks begin
        del offsets
        order = np.arange(rows) if order is None else order
        supervised = 0
        with pa.OSFile(str(self.path), "rb") as source:
            reader = _Rows(pa.ipc.open_file(source), self._starts)
            div, mod = divmod(rows, shards)
            for i, name in enumerate(names):  # contiguous shards, as Dataset.shard(contiguous=True) cuts them
                start = div * i + min(i, mod)
                end = start + div + (1 if i < mod else 0)
                writer = ArrowWriter(features=features(), path=str(path / name), embed_local_files=True)
                for lo in range(start, end, batch_rows):
                    hi = min(lo + batch_rows, end)
                    within = not any(c in chunk_starts for c in range(lo + 1, hi))
                    more = within and hi < rows and hi not in chunk_starts  # the next example follows in its array
                    cols = reader.columns(order[lo:hi + 1] if more else order[lo:hi])
                    supervised += int(np.count_nonzero(cols.labels[:cols.offsets[hi - lo]] != IGNORE_INDEX))
                    writer.write_table(as_written(cols, hi - lo, sliced=within and lo not in chunk_starts, more=more))
                writer.finalize()
                writer.close()
        self.path.unlink()
        _write_state(path, names, fingerprint)
        return Saved(lengths, int(lengths.sum()), supervised)


def as_written(cols: Columns, n: int, sliced: bool, more: bool):
    """The first n examples of `cols` as the table save_to_disk hands its writer for the same rows:
    a slice of the whole set's arrays, whose bytes Arrow's IPC writer copies as they lie there. It
    writes a sliced buffer rounded up to 8 bytes, so after an odd count come the next example's
    bytes (its length, its first token, its end offset), and a list's offsets rebased where they do
    not start at 0. `sliced`: the rows start past the first of those arrays; `more`: the next
    example follows them there (cols holds it as its last)."""
    import pyarrow as pa

    lead = 1 if sliced else 0  # a row before: the arrays are a slice, as there
    tail = 16 if more else 0  # filler past the next example: a buffer longer than the slice needs is cut
    extra = 1 if more else 0

    def pad(values: np.ndarray) -> np.ndarray:
        return np.concatenate([np.zeros(lead, np.int32), values, np.zeros(tail, np.int32)])

    def lists(values: np.ndarray):
        vals = pad(values[:cols.offsets[n + extra]])
        offs = np.concatenate([np.zeros(lead), lead + cols.offsets[:n + 1 + extra], np.full(tail, len(vals))])
        return pa.ListArray.from_arrays(pa.array(offs.astype(np.int32)), pa.array(vals)).slice(lead, n)

    return pa.table({"input_ids": lists(cols.ids), "labels": lists(cols.labels),
                     "length": pa.array(pad(cols.lengths[:n + extra].astype(np.int32))).slice(lead, n)})


class _Rows:
    """Examples of the spool by index, a record batch read at a time (the last few kept): the
    order of a weighted mix runs through each source's examples in rising order."""

    KEPT = 4

    def __init__(self, reader, starts: list[int]):
        self.reader, self.starts, self.cache = reader, np.asarray(starts), {}

    def batch(self, i: int):
        if i not in self.cache:
            if len(self.cache) >= self.KEPT:
                self.cache.pop(next(iter(self.cache)))
            self.cache[i] = self.reader.get_batch(i)
        return self.cache[i]

    def columns(self, rows: np.ndarray) -> Columns:
        """The examples at these rows, in this order."""
        import pyarrow as pa

        which = np.searchsorted(self.starts, rows, side="right") - 1
        pieces = []
        # runs of consecutive rows in one batch become one slice
        breaks = np.flatnonzero((np.diff(rows) != 1) | (np.diff(which) != 0)) + 1
        for run in np.split(np.arange(len(rows)), breaks):
            b, first = int(which[run[0]]), int(rows[run[0]])
            pieces.append(self.batch(b).slice(first - int(self.starts[b]), len(run)))
        part = pa.Table.from_batches(pieces).combine_chunks()
        ids, labels = (part.column(c).chunk(0) for c in ("input_ids", "labels"))
        offsets = ids.offsets.to_numpy().astype(np.int64)
        lo, hi = offsets[0], offsets[-1]
        return Columns(ids.values.to_numpy()[lo:hi], labels.values.to_numpy()[lo:hi], offsets - lo)


def table_nbytes(lengths: np.ndarray) -> int:
    """The bytes of the in-memory table of examples of these lengths (what `datasets` sizes its
    shards and batches by): each list column's int32 offsets, one more than the rows of each chunk
    of at most ARROW_TOKENS tokens (columns.arrow_lists), and its int32 values; the int32 lengths."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    chunks = len(cuts(offsets, ARROW_TOKENS)) - 1
    lists = 4 * (len(lengths) + chunks) + 4 * int(offsets[-1])
    return 2 * lists + 4 * len(lengths)


def _write_state(path: Path, names: list[str], fingerprint: str) -> None:
    """state.json and dataset_info.json, as save_to_disk writes them for a Dataset built from a
    table with our features (read off such a Dataset, with no rows)."""
    import datasets
    from datasets.utils.py_utils import asdict

    empty = datasets.Dataset(table(Columns.empty()), info=datasets.DatasetInfo(features=features()))
    state = {key: empty.__dict__[key] for key in
             ("_format_columns", "_format_kwargs", "_format_type", "_output_all_columns")}
    state["_fingerprint"] = fingerprint[:16]
    state["_split"] = str(empty.split) if empty.split is not None else empty.split
    state["_data_files"] = [{"filename": name} for name in names]
    with open(path / datasets.config.DATASET_STATE_JSON_FILENAME, "w", encoding="utf-8") as f:
        json.dump(state, f, indent=2, sort_keys=True)
    info = asdict(empty._info)  # datasets' own asdict, which leaves out unset fields
    with open(path / datasets.config.DATASET_INFO_FILENAME, "w", encoding="utf-8") as f:
        json.dump({key: info[key] for key in sorted(info)}, f, indent=2)


def percentiles(lengths: np.ndarray) -> dict[str, int]:
    if not len(lengths):
        return {}
    s = np.sort(lengths)
    n = len(s)
    return {f"p{q}": int(s[min(n - 1, int(q / 100 * n))]) for q in (50, 90, 99)} | {"max": int(s[-1]), "min": int(s[0])}


def plot_lengths(path: Path, lengths: np.ndarray, max_length: int) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure registry

    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    # one filled outline, not ax.hist's 50 bar patches: the same picture, drawn faster
    counts, edges = np.histogram(lengths, bins=min(50, max(5, len(np.unique(lengths)))))
    ax.stairs(counts, edges, fill=True, color="#4477aa")
    ax.axvline(max_length, color="#cc3311", linestyle="--", label=f"max_length {max_length}")
    ax.set_xlabel("tokens per example")
    ax.set_ylabel("examples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)

