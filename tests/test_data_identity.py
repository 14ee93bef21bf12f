"""Issue 23, build 5 (data identity by content): each trial on the real CLI or the real reading path."""

from __future__ import annotations

import gzip
import itertools
import json
import os
import random
import re
import threading
import time

import pytest
from conftest import run_cli

from sftkit.data import sources
from sftkit.data.options import DataOptions
from sftkit.data.prepare import fingerprint, load_conversations, prepare, resolve_sources
from sftkit.errors import DataError

ROW_A = '{"instruction": "Hi", "output": "Hello"}\n'
ROW_B = '{"instruction": "Yo", "output": "Hey"}\n'


def test_a_directory_names_every_file_it_skips(tmp_path):
    """A directory of a.jsonl + b.jsonl.gz + c.tsv prepared a.jsonl's rows and never named the other two;
    now b.jsonl.gz is read and c.tsv alone is named."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jsonl").write_text(ROW_A)
    (data / "b.jsonl.gz").write_bytes(gzip.compress(ROW_B.encode()))
    (data / "c.tsv").write_text("instruction\toutput\nA\tB\n")
    proc = run_cli("prepare-data", "--data_path", str(data), "--output_dir", str(tmp_path / "p"))
    notes = [x for x in (proc.stdout + proc.stderr).splitlines() if x.startswith("note: ")]
    assert len(notes) == 1, proc.stdout + proc.stderr
    assert notes[0].startswith(f"note: {data}: skipped 1 file(s): c.tsv (type '.tsv' is not read)"), notes[0]
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert manifest["rows_in"] == 2 and [s["rows"] for s in manifest["sources"]] == [1, 1]
    proc = run_cli("prepare-data", "--data_path", str(data / "a.jsonl"), "--output_dir", str(tmp_path / "q"))
    assert "note: " not in proc.stdout + proc.stderr


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


def test_a_corrupt_gzip_is_one_line(tmp_path):
    bad = tmp_path / "rows.jsonl.gz"
    bad.write_bytes(gzip.compress(ROW_A.encode())[:-12] + b"\x00" * 4)  # cut inside the deflate stream
    proc = run_cli("prepare-data", "--data_path", str(bad), "--output_dir", str(tmp_path / "p"), check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}: is not a valid gzip file ("), proc.stderr
    assert not (tmp_path / "p").exists()


def test_a_gzip_that_unpacks_past_memory_is_refused(tmp_path):
    path = str(tmp_path / "zeros.jsonl.gz")
    with pytest.raises(DataError, match=r"^.*zeros.jsonl.gz: unpacks to more than 1 KB, .* more than the 3 KB available"):
        sources._gunzip(path, gzip.compress(b"\0" * 10_000), available=3_000)  # 1,000 bytes may be unpacked
    assert sources._gunzip(path, gzip.compress(b"\0" * 999), available=3_000) == b"\0" * 999


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
        sources.read(src)
    with pytest.raises(DataError, match=rf"^{data}: changed while it was read .*; run again$"):
        prepare(opts, opts.data_path, out, tok, cache=True, fp=key)
    assert not out.exists() and list(tmp_path.iterdir()) == [data]
    manifest = prepare(opts, opts.data_path, out, tok, cache=True)  # unchanged since: the key is of B's bytes
    assert manifest["fingerprint"] == fingerprint(resolve_sources(opts.data_path, opts), tok, opts, None) != key


def test_a_sparse_file_is_refused_from_its_size_before_it_is_read(tmp_path):
    """A 2 GB sparse file was refused in one line, but after 48 s and 4.6 GB of memory."""
    path = tmp_path / "huge.jsonl"
    path.write_text(ROW_A)
    os.truncate(path, 2_000_000_000)
    proc = run_cli("prepare-data", "--data_path", str(path), "--output_dir", str(tmp_path / "p"), check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: is a sparse file: 2.0 GB long but "), proc.stderr
    assert "the rest holes that read as zero bytes" in lines[0] and not (tmp_path / "p").exists()


def test_a_file_bigger_than_memory_allows_is_refused_from_its_size(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(ROW_A * 50_000)  # 2.0 MB
    with pytest.raises(DataError, match=rf"^{path}: is 2.0 MB, and reading it takes about 3x that in memory, "
                       r"more than the 5.0 MB available \(MemAvailable\); split it"):
        sources.check_size(str(path), os.stat(path), available=5_000_000)
    sources.check_size(str(path), os.stat(path), available=7_000_000)
    sources.check_size(str(path), os.stat(path), available=None)  # memory unknown: nothing is refused


def test_a_file_replaced_over_and_over_during_prepare_data_never_saves_one_files_rows_under_the_others_key(tmp_path):
    """The issue's trial on the real CLI: the data file is swapped between A (30 rows) and B (50)
    every millisecond or so while `prepare-data` reads it. It may refuse ("changed while it was
    read"), or save a set whose key and rows are of one file; never A's key over B's rows (before
    the one-read rule the key came from one read and the rows from another: run on that code
    (006877b^), 3 of 6 runs of this test with 2 swapped prepares caught B's key over A's rows; it has 4)."""
    rows = {name: "".join(json.dumps({"instruction": f"{name} {i}", "output": "ok"}) + "\n" for i in range(n))
            for name, n in (("A", 30), ("B", 50))}
    data = tmp_path / "rows.jsonl"
    truth = {}  # each file's key, from a prepare of it left alone
    for name, text in rows.items():
        data.write_text(text)
        run_cli("prepare-data", "--data_path", str(data), "--output_dir", str(tmp_path / f"alone_{name}"))
        manifest = json.loads((tmp_path / f"alone_{name}" / "manifest.json").read_text())
        truth[manifest["fingerprint"]] = manifest["rows_in"]
    assert sorted(truth.values()) == [30, 50]
    stop = threading.Event()

    def swap():
        for i in itertools.count():
            if stop.is_set():
                return
            tmp = tmp_path / f".swap{i % 2}"
            tmp.write_text(rows["AB"[i % 2]])
            os.replace(tmp, data)
            time.sleep(random.uniform(0, 0.002))

    swapper = threading.Thread(target=swap, daemon=True)
    swapper.start()
    try:
        procs = [run_cli("prepare-data", "--data_path", str(data), "--output_dir", str(tmp_path / f"swapped_{i}"),
                         check=False) for i in range(4)]
    finally:
        stop.set()
        swapper.join()
    for i, proc in enumerate(procs):
        out = tmp_path / f"swapped_{i}"
        if proc.returncode == 2:
            assert re.fullmatch(rf"error: {re.escape(str(data))}: changed while it was read .*; run again", proc.stderr.strip()), \
                proc.stderr[-3000:]
            assert not out.exists()
        else:
            assert proc.returncode == 0, proc.stderr[-3000:]
            manifest = json.loads((out / "manifest.json").read_text())
            assert truth.get(manifest["fingerprint"]) == manifest["rows_in"], (truth, manifest["fingerprint"], manifest["rows_in"])


def test_the_precheck_reads_a_json_lines_file_only_as_far_as_it_checks(tmp_path):
    """prepare-data and train check the first rows before their imports: a JSON Lines file is read
    that many lines far (not hashed), and a file that only its whole shows (a pretty-printed object,
    an array in a .jsonl) is read whole, giving the rows the full read gives."""
    lines = tmp_path / "rows.jsonl"
    lines.write_text(ROW_A * 3 + '{"instruction": "' + "x" * 3_000_000 + '", "output": "y"}\n' + ROW_B * 2)
    got = sources.read(sources.Source(str(lines)), head=3)
    assert got.source.digest is None and [w for w, _ in got.rows] == ["line 1", "line 2", "line 3"]
    whole = sources.read(sources.Source(str(lines)))
    assert whole.source.digest is not None and len(list(whole.rows)) == 6
    for text in ('{\n  "instruction": "Hi",\n  "output": "Hello"\n}\n', '[\n' + ROW_A.strip() + ',\n' + ROW_B.strip() + '\n]\n',
                 "\ufeff" + ROW_A * 2):
        other = tmp_path / "other.jsonl"
        other.write_text(text)
        head = [(w, dict(r)) for w, r in sources.read(sources.Source(str(other)), head=1000).rows]
        assert head == [(w, dict(r)) for w, r in sources.read(sources.Source(str(other))).rows] and head
