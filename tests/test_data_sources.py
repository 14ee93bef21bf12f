"""Reading the data: JSON, JSON Lines, Parquet, CSV, folders and globs, gzip, a Hugging Face dataset
folder; sizes checked before anything is read; the cache key and the rows from one read."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest
from conftest import write_jsonl
from test_data_errors import BAD
from test_data_formats import ALPACA

from sftkit.data import sources
from sftkit.data.options import DataOptions
from sftkit.data.prepare import fingerprint, load_conversations, prepare, resolve_sources
from sftkit.errors import DataError

ROW_A = '{"instruction": "Hi", "output": "Hello"}\n'


ROW_B = '{"instruction": "Yo", "output": "Hey"}\n'


def test_sources_json_jsonl_parquet_csv_dir_glob(tmp_path, tok):
    import datasets

    rows = [{"instruction": f"say {i}", "input": "", "output": f"{i}"} for i in range(6)]
    d = tmp_path / "src"
    d.mkdir()
    (d / "a.json").write_text(json.dumps(rows[:2]))
    write_jsonl(d / "b.jsonl", rows[2:4])
    datasets.Dataset.from_list(rows[4:5]).to_parquet(str(d / "c.parquet"))
    datasets.Dataset.from_list(rows[5:6]).to_csv(str(d / "e.csv"))
    cfg = DataOptions(max_length=256)
    for spec, n in ((str(d), 6), (str(d / "*.json*"), 4), (str(d / "c.parquet"), 1), (str(d / "e.csv"), 1)):
        man = prepare(cfg, [spec], tmp_path / f"out{n}{Path(spec).suffix}", tok)
        assert man["examples_kept"] == n and man["rows_in"] == n


def test_csv_cells_keep_their_newlines_and_a_bom_is_not_part_of_a_column_name():
    from sftkit.data import formats, sources

    rows = [row for _, row in sources.read(sources.Source(str(BAD / "embedded_newlines.csv"))).rows]
    assert rows[0]["instruction"] == "Write a haiku\nabout rain." and rows[1]["input"] == "2 and 3"
    assert formats.to_messages(rows[0], "alpaca")[-1]["content"].count("\n") == 2
    rows = [row for _, row in sources.read(sources.Source(str(BAD / "bom.csv"))).rows]
    assert list(rows[0]) == ["instruction", "input", "output"]
    rows = [row for _, row in sources.read(sources.Source(str(BAD / "crlf.csv"))).rows]
    assert rows[1]["instruction"] == "Two\r\nlines"


def test_hugging_face_dataset_loader_on_a_local_dataset_directory(tmp_path):
    """The Hub path is `datasets.load_dataset(name, config, split)`; here it reads a local dataset
    repository layout (no network), the same call a Hub name makes."""
    from sftkit.data import sources

    repo = tmp_path / "my_dataset" / "data"
    repo.mkdir(parents=True)
    write_jsonl(repo / "train.jsonl", [ALPACA, ALPACA])
    src = sources.Source(str(tmp_path / "my_dataset"), hub=True, split="train")
    rows = list(sources.read(src).rows)
    assert [w for w, _ in rows] == ["row 1", "row 2"] and rows[0][1]["output"] == "5"
    assert sources.resolve("someorg/some-dataset")[0].hub
    with pytest.raises(DataError, match="loading it as a Hugging Face dataset failed"):
        list(sources.read(sources.Source("someorg/does-not-exist", hub=True)).rows)


def test_gzip_files_are_read_and_their_faults_name_file_and_line(tmp_path):
    good = tmp_path / "chat.json.gz"
    good.write_bytes(gzip.compress(f"[{ROW_A.strip()}, {ROW_B.strip()}]".encode()))
    assert [where for where, _ in sources.read(sources.resolve(str(good))[0]).rows] == \
        ["row 1 (line 1)", "row 2 (line 1)"]
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(gzip.compress((ROW_A + '{"instruction": "x"\n').encode()))
    opts = DataOptions(data_path=[str(bad)])
    with pytest.raises(DataError, match=rf"^{bad}:line 2: not valid JSON \(Expecting ',' delimiter"):
        load_conversations(resolve_sources(opts.data_path, opts), opts)


def test_a_gzip_that_unpacks_past_memory_is_refused(tmp_path):
    path = str(tmp_path / "zeros.jsonl.gz")
    with pytest.raises(DataError, match=r"^.*zeros.jsonl.gz: unpacks to more than 1 KB, .* more than the 3 KB available"):
        sources._gunzip(path, gzip.compress(b"\0" * 10_000), available=3_000)  # 1,000 bytes may be unpacked
    assert sources._gunzip(path, gzip.compress(b"\0" * 999), available=3_000) == b"\0" * 999


def test_a_file_bigger_than_memory_allows_is_refused_from_its_size(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(ROW_A * 50_000)  # 2.0 MB
    with pytest.raises(DataError, match=rf"^{path}: is 2.0 MB, and reading it takes about 3x that in memory, "
                       r"more than the 5.0 MB available \(MemAvailable\); split it"):
        sources.check_size(str(path), os.stat(path), available=5_000_000)
    sources.check_size(str(path), os.stat(path), available=7_000_000)
    sources.check_size(str(path), os.stat(path), available=None)  # memory unknown: nothing is refused


def test_a_file_replaced_after_it_was_hashed_is_refused_before_anything_is_saved(tmp_path, tok):
    """The cache key is computed from one read of the file, its rows from another: a file replaced
    in between had B's rows saved under A's key. Here the file is replaced between the two, in the
    order `train --data_path` calls them (dataset._prepared_dir: fingerprint, then prepare)."""
    data, out = tmp_path / "rows.jsonl", tmp_path / "entry"
    data.write_text(ROW_A * 3)
    opts = DataOptions(data_path=[str(data)], max_length=64)
    key = fingerprint(resolve_sources(opts.data_path, opts), tok, opts, None)
    src = resolve_sources(opts.data_path, opts)[0][1].hashed()  # the digest the key holds
    (tmp_path / "new.jsonl").write_text(ROW_B * 3)
    os.replace(tmp_path / "new.jsonl", data)
    with pytest.raises(DataError, match=rf"^{data}: changed while it was read .*; run again$"):
        list(sources.read(src).rows)  # streamed: its hash is known once its rows are all taken
    with pytest.raises(DataError, match=rf"^{data}: changed while it was read .*; run again$"):
        prepare(opts, opts.data_path, out, tok, cache=True, fp=key)
    assert not out.exists() and list(tmp_path.iterdir()) == [data]
    manifest = prepare(opts, opts.data_path, out, tok, cache=True)  # unchanged since: the key is of B's bytes
    assert manifest["fingerprint"] == fingerprint(resolve_sources(opts.data_path, opts), tok, opts, None) != key


def test_the_precheck_reads_a_json_lines_file_only_as_far_as_it_checks(tmp_path):
    """prepare-data and train check the first rows before their imports: a JSON Lines file is read
    that many lines far (not hashed), and a file that only its whole shows (a pretty-printed object,
    an array in a .jsonl) is read whole, giving the rows the full read gives."""
    lines = tmp_path / "rows.jsonl"
    lines.write_text(ROW_A * 3 + '{"instruction": "' + "x" * 3_000_000 + '", "output": "y"}\n' + ROW_B * 2)
    got = sources.read(sources.Source(str(lines)), head=3)
    assert got.source.digest is None and [w for w, _ in got.rows] == ["line 1", "line 2", "line 3"]
    whole = sources.read(sources.Source(str(lines)))
    assert len(list(whole.rows)) == 6 and whole.source.digest is not None  # hashed as its rows were taken
    for text in ('{\n  "instruction": "Hi",\n  "output": "Hello"\n}\n', '[\n' + ROW_A.strip() + ',\n' + ROW_B.strip() + '\n]\n',
                 "\ufeff" + ROW_A * 2):
        other = tmp_path / "other.jsonl"
        other.write_text(text)
        head = [(w, dict(r)) for w, r in sources.read(sources.Source(str(other)), head=1000).rows]
        assert head == [(w, dict(r)) for w, r in sources.read(sources.Source(str(other))).rows] and head
