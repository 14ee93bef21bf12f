"""Tokenized examples as flat int32 columns: how prepare-data holds them from the tokenizer to the
saved set, and the length policy applied to them as array operations.

In Python lists of ints a token costs a list slot (8 bytes) and an int object (28), in ids and
in labels, and the children's results would be unpickled into such lists. As columns a token
costs 8 bytes (its id and its label, int32), a chunk crosses the pipe as three buffers, and the
saved Arrow arrays are built from them without a copy per example.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from sftkit.data.render import IGNORE_INDEX, Refused

# Rows gathered at a time by `Columns.slices`: its index array is 8 bytes a token, so a block of
# rows bounds that temporary (4,096 rows of ~1,000 tokens: 33 MB; a whole set of 40M tokens: 320 MB).
BLOCK_ROWS = 4096
# Arrow's list offsets are int32: one array holds at most 2**31 - 1 tokens; a larger set is saved
# as several arrays (chunks) of at most this many tokens each.
ARROW_TOKENS = 2**30


@dataclass
class Columns:
    """Examples end to end: example i is ids[offsets[i]:offsets[i + 1]] (and its labels)."""

    ids: np.ndarray      # int32
    labels: np.ndarray   # int32, IGNORE_INDEX where the loss does not look
    offsets: np.ndarray  # int64, one more than there are examples, offsets[0] == 0
    refused: dict[int, Refused] = field(default_factory=dict)  # rows the template refused (empty here), by index
    unserved: int = 0  # supervised replies rendered otherwise than as served (render.unserved_replies)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @classmethod
    def empty(cls) -> Columns:
        return cls(np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(1, np.int64))

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def slices(self, starts: np.ndarray, ends: np.ndarray) -> Columns:
        """A new set of examples: ids[starts[k]:ends[k]] for each k (absolute positions)."""
        lengths = (ends - starts).astype(np.int64)
        offsets = _offsets(lengths)
        ids, labels = [], []
        for lo in range(0, len(lengths), BLOCK_ROWS):
            hi = min(lo + BLOCK_ROWS, len(lengths))
            n = lengths[lo:hi]
            # each output token's place in the source: its place in the output + its row's shift
            at = np.arange(offsets[lo], offsets[hi]) + np.repeat(starts[lo:hi] - offsets[lo:hi], n)
            ids.append(self.ids[at])
            labels.append(self.labels[at])
        return Columns(_join(ids), _join(labels), offsets)

    def take(self, rows) -> Columns:
        """The examples at `rows` (repeats allowed), in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        return self.slices(self.offsets[:-1][rows], self.offsets[1:][rows])

    def supervised(self) -> int:
        return int(np.count_nonzero(self.labels != IGNORE_INDEX))


def _offsets(lengths) -> np.ndarray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def _join(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


def pack(rendered: list) -> Columns:
    """One chunk's render_batch results ((ids, labels) or Refused per row) as columns; a refused
    row is an empty example, listed in `refused`."""
    refused = {i: r for i, r in enumerate(rendered) if isinstance(r, Refused)}
    made = [([], []) if isinstance(r, Refused) else r for r in rendered]
    offsets = _offsets([len(ids) for ids, _ in made])
    flat = itertools.chain.from_iterable  # each row's ints taken in C, not one generator step a token
    ids = np.fromiter(flat(r[0] for r in made), dtype=np.int32, count=int(offsets[-1]))
    labels = np.fromiter(flat(r[1] for r in made), dtype=np.int32, count=int(offsets[-1]))
    return Columns(ids, labels, offsets, refused)


def from_rendered(rendered, encoded: list) -> Columns:
    """A chunk's columns straight from render.Rendered and its encodings: what pack(rendered.assemble(
    encoded)) gives, without a pair of lists a row (each list of ints becomes int32 in one C loop)."""
    ids, labels, lengths, refused = rendered.flat(encoded)
    return Columns(np.array(ids, dtype=np.int32), np.array(labels, dtype=np.int32), _offsets(lengths), refused,
                   rendered.unserved)


def concat(parts: list[Columns]) -> Columns:
    """The chunks' columns as one set, in order; refused rows keep their index in the whole."""
    shift = np.cumsum([0] + [p.offsets[-1] for p in parts[:-1]], dtype=np.int64)
    first = np.cumsum([0] + [len(p) for p in parts[:-1]])
    offsets = np.concatenate([[0]] + [p.offsets[1:] + s for p, s in zip(parts, shift)]).astype(np.int64)
    refused = {int(f) + i: r for p, f in zip(parts, first) for i, r in p.refused.items()}
    return Columns(_join([p.ids for p in parts]), _join([p.labels for p in parts]), offsets, refused)


@dataclass
class Fitted:
    """What the length policy keeps: the examples, and per row of the input whether it was kept,
    cut to fit, or dropped and why."""

    columns: Columns
    kept: np.ndarray       # bool per input row
    truncated: int         # kept rows that --truncation cut to max_length
    too_long: int          # dropped: longer than max_length with --truncation drop
    no_supervised: int     # dropped: no supervised token after position 0 (what is left of it)


def fit_lengths(cols: Columns, max_length: int, truncation: str, whole: np.ndarray | None = None) -> Fitted:
    """Apply the truncation policy to every example; refused rows are neither kept nor counted here.
    `whole`: per row, whether it may not be cut (it holds images, whose tokens go whole or not at
    all): such a row longer than max_length is dropped as too long, whatever the truncation."""
    starts, ends = cols.offsets[:-1].copy(), cols.offsets[1:].copy()
    long = (ends - starts) > max_length
    if truncation == "left":
        starts[long] = ends[long] - max_length
    elif truncation == "right":
        ends[long] = starts[long] + max_length
    refused = np.zeros(len(cols), dtype=bool)
    refused[list(cols.refused)] = True
    too_long = long & ~refused if truncation == "drop" else np.zeros(len(cols), dtype=bool)
    if whole is not None:
        too_long |= long & whole & ~refused
    # supervised tokens of a window from its second token on: position 0 has no context to predict from
    counts = _offsets((cols.labels != IGNORE_INDEX).astype(np.int64))
    none = (counts[ends] - counts[np.minimum(starts + 1, ends)] == 0) & ~refused & ~too_long
    kept = ~(refused | too_long | none)
    return Fitted(cols.slices(starts[kept], ends[kept]), kept, int(np.count_nonzero(long & kept)),
                  int(np.count_nonzero(too_long)), int(np.count_nonzero(none)))


def arrow_lists(values: np.ndarray, offsets: np.ndarray, limit: int = ARROW_TOKENS):
    """A list<int32> Arrow column of these examples, in chunks of at most `limit` tokens (one
    example longer than that gets a chunk of its own)."""
    import pyarrow as pa

    chunks = [pa.ListArray.from_arrays(pa.array((offsets[a:b + 1] - offsets[a]).astype(np.int32)),
                                       pa.array(values[offsets[a]:offsets[b]], pa.int32()))
              for a, b in itertools.pairwise(cuts(offsets, limit))]
    return pa.chunked_array(chunks, pa.list_(pa.int32()))


def cuts(offsets: np.ndarray, limit: int = ARROW_TOKENS) -> list[int]:
    """Where arrow_lists cuts examples into chunks of at most `limit` tokens: the first example of
    each chunk, then the number of examples."""
    at, found = 0, [0]
    while offsets[-1] - offsets[at] > limit:  # the chunk from `at` ends before the first example that overflows it
        at = max(at + 1, int(np.searchsorted(offsets, offsets[at] + limit, side="right")) - 1)
        found.append(at)
    found.append(len(offsets) - 1)
    return found
