"""The examples' columns (sftkit.data.columns) against plain Python on seeded random rows: the
length policy, repeats and order of a take, and Arrow chunks past the int32 offset limit."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from sftkit.data.columns import arrow_lists, concat, fit_lengths, pack
from sftkit.data.render import IGNORE_INDEX, Refused


def _rows(seed: int, n: int = 300) -> list:
    """(ids, labels) rows of 0-40 tokens, some all-prompt, some supervised only at position 0, and
    a few refused."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        if rng.random() < 0.05:
            rows.append(Refused(None, "no"))
            continue
        ids = [rng.randrange(151_000) for _ in range(rng.randint(1, 40))]
        start = rng.choice([0, 1, len(ids), rng.randrange(len(ids))])  # the reply starts there
        rows.append((ids, [IGNORE_INDEX] * start + ids[start:]))
    return rows


def _reference(rows: list, max_length: int, truncation: str):
    """The policy as it was written per example in Python (prepare.fit_length before columns)."""
    kept, counts = [], {"too_long": 0, "no_supervised_tokens": 0, "truncated": 0}
    for r in rows:
        if isinstance(r, Refused):
            continue
        ids, labels = r
        cut = len(ids) > max_length
        if cut and truncation == "drop":
            counts["too_long"] += 1
            continue
        if cut:
            window = slice(len(ids) - max_length, None) if truncation == "left" else slice(0, max_length)
            ids, labels = ids[window], labels[window]
        if all(t == IGNORE_INDEX for t in labels[1:]):
            counts["no_supervised_tokens"] += 1
            continue
        counts["truncated"] += cut
        kept.append((ids, labels))
    return kept, counts


def _as_rows(cols) -> list:
    o = cols.offsets
    return [(cols.ids[a:b].tolist(), cols.labels[a:b].tolist()) for a, b in itertools.pairwise(o)]


@pytest.mark.parametrize("truncation", ["drop", "left", "right"])
@pytest.mark.parametrize("seed", [0, 1])
def test_fit_lengths_is_the_per_example_policy(truncation, seed):
    rows = _rows(seed)
    # chunks of 64 rows, as prepare-data packs them, joined: refused rows keep their place
    cols = concat([pack(rows[i:i + 64]) for i in range(0, len(rows), 64)])
    assert sorted(cols.refused) == [i for i, r in enumerate(rows) if isinstance(r, Refused)]
    fitted = fit_lengths(cols, 12, truncation)
    kept, counts = _reference(rows, 12, truncation)
    assert _as_rows(fitted.columns) == kept
    assert (fitted.too_long, fitted.no_supervised, fitted.truncated) == (
        counts["too_long"], counts["no_supervised_tokens"], counts["truncated"])
    assert fitted.kept.sum() == len(kept)


def test_take_repeats_and_reorders():
    cols = pack([r for r in _rows(2, 50) if not isinstance(r, Refused)])
    order = [3, 3, 0, 7, 1, 3]
    assert _as_rows(cols.take(order)) == [_as_rows(cols)[i] for i in order]


def test_arrow_chunks_past_the_limit_hold_every_example_once():
    cols = pack([r for r in _rows(3, 200) if not isinstance(r, Refused)])
    column = arrow_lists(cols.ids, cols.offsets, limit=100)
    assert column.num_chunks > 10
    assert all(len(np.concatenate(c.to_numpy(zero_copy_only=False))) <= 100 for c in column.chunks if len(c) > 1)
    assert column.to_pylist() == [ids for ids, _ in _as_rows(cols)]
