"""The prepared set on disk, streamed (sftkit/data/store.py): the files `Dataset.save_to_disk` writes
for the whole set in memory, byte for byte, from a spool of chunks; and prepare() through it,
against the whole set rendered, tokenized and saved in memory as before streaming."""

from __future__ import annotations

import gzip
import json
import random

import numpy as np
import pytest
from conftest import write_jsonl

from sftkit.data import store
from sftkit.data.columns import Columns, fit_lengths, pack
from sftkit.data.options import DataOptions, Mixing
from sftkit.data.prepare import CHUNK, DATASET_DIR, mix, prepare, render_options
from sftkit.data.render import IGNORE_INDEX, render_batch, template_spec


def save_in_memory(cols: Columns, path, max_shard_size=None) -> None:
    """The set as prepare-data saved it before streaming: one table, Dataset.save_to_disk."""
    import datasets

    ds = datasets.Dataset(store.table(cols), info=datasets.DatasetInfo(features=store.features()))
    ds.save_to_disk(str(path), max_shard_size=max_shard_size)


def same_files(got, want) -> None:
    """Every file byte for byte, but state.json's _fingerprint (datasets hashes the in-memory table)."""
    names = sorted(p.name for p in want.iterdir())
    assert sorted(p.name for p in got.iterdir()) == names
    for name in names:
        if name == "state.json":
            a, b = json.loads((got / name).read_text()), json.loads((want / name).read_text())
            assert {**a, "_fingerprint": None} == {**b, "_fingerprint": None}
        else:
            assert (got / name).read_bytes() == (want / name).read_bytes(), name


def random_columns(rows: int, seed: int = 0) -> Columns:
    rng = np.random.default_rng(seed)
    offsets = np.zeros(rows + 1, np.int64)
    np.cumsum(rng.integers(1, 300, rows), out=offsets[1:])
    ids = rng.integers(0, 150_000, offsets[-1]).astype(np.int32)
    return Columns(ids, np.where(rng.random(len(ids)) < 0.5, IGNORE_INDEX, ids).astype(np.int32), offsets)


@pytest.mark.parametrize("max_shard_size", [None, "300KB", "1MB"])
@pytest.mark.parametrize("weighted", [False, True])
def test_the_spool_saves_what_save_to_disk_writes(tmp_path, max_shard_size, weighted):
    """Shards, record batches, the bytes after an odd count in each buffer: as datasets writes the
    whole table, in order or in a weighted order with repeats."""
    cols = random_columns(5000)
    order = (np.concatenate([np.arange(5000), np.sort(np.random.default_rng(1).choice(5000, 1234, replace=False)),
                             np.arange(100)]) if weighted else None)
    spool = store.Spool(tmp_path / "spool")
    for lo in range(0, 5000, 512):  # chunks as prepare adds them
        spool.add(cols.take(np.arange(lo, min(lo + 512, 5000))), np.zeros(min(512, 5000 - lo)))
    saved = spool.save(tmp_path / "got", "f" * 64, order, max_shard_size=max_shard_size)
    whole = cols if order is None else cols.take(order)
    save_in_memory(whole, tmp_path / "want", max_shard_size)
    same_files(tmp_path / "got", tmp_path / "want")
    assert not (tmp_path / "spool").exists()
    assert saved.tokens == int(whole.lengths.sum()) and saved.supervised == whole.supervised()
    assert saved.lengths.tolist() == whole.lengths.tolist()
    assert len(list((tmp_path / "got").glob("*.arrow"))) > (1 if max_shard_size else 0)


def long_rows(n: int, seed: int) -> list[dict]:
    rng, words = random.Random(seed), ["alpha", "beta", "gamma", "delta", "tokens", "model", "reply", "of", "the"]
    return [{"messages": [{"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(2, 40)))},
                          {"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(1, 90)))}]}
            for _ in range(n)]


def test_a_streamed_prepare_saves_the_set_prepared_in_memory(tmp_path, tok):
    """Two sources (JSON Lines, and gzip-compressed), weighted, over several chunks of CHUNK rows,
    some rows too long: the saved files equal those of every row rendered in one call, the length
    policy applied to all, the weighted order taken, and the whole table saved with save_to_disk;
    the manifest's counts and statistics are those of that set."""
    rows_a, rows_b = long_rows(2 * CHUNK + 100, seed=0), long_rows(CHUNK // 2, seed=1)
    a = write_jsonl(tmp_path / "a.jsonl", rows_a)
    b = tmp_path / "b.jsonl.gz"
    b.write_bytes(gzip.compress(write_jsonl(tmp_path / "b.jsonl", rows_b).read_bytes()))
    opts = DataOptions(max_length=96, num_proc=1)
    manifest = prepare(opts, [str(a), str(b)], tmp_path / "out", tok, mixing=Mixing([1.5, 2], seed=3))

    spec = template_spec(tok)
    convs = [r["messages"] for r in rows_a + rows_b]
    fitted = fit_lengths(pack(render_batch(convs, tok, spec, render_options(opts))), 96, "drop")
    origins = [o for o, k in zip([0] * len(rows_a) + [1] * len(rows_b), fitted.kept.tolist()) if k]
    whole = fitted.columns.take(mix(origins, [1.5, 2], 3))
    save_in_memory(whole, tmp_path / "want")
    same_files(tmp_path / "out" / DATASET_DIR, tmp_path / "want")
    lengths = sorted(whole.lengths.tolist())
    assert fitted.too_long > 0 and manifest["dropped"]["too_long"] == fitted.too_long
    assert manifest["examples_kept"] == len(fitted.columns) and manifest["examples_saved"] == len(whole)
    assert manifest["tokens"] == sum(lengths) and manifest["supervised_tokens"] == whole.supervised()
    assert manifest["length"] == {"p50": lengths[len(lengths) // 2], "p90": lengths[int(0.9 * len(lengths))],
                                  "p99": lengths[int(0.99 * len(lengths))], "max": lengths[-1], "min": lengths[0]}
    assert [s["rows"] for s in manifest["sources"]] == [len(rows_a), len(rows_b)]
