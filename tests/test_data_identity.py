"""Issue 23, build 5 (data identity by content): each trial on the real CLI."""

from __future__ import annotations

import gzip
import json

from conftest import run_cli


def test_a_directory_names_every_file_it_skips(tmp_path):
    """A directory of a.jsonl + b.jsonl.gz + c.tsv prepared a.jsonl's rows and never named the other two."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jsonl").write_text('{"instruction": "Hi", "output": "Hello"}\n')
    (data / "b.jsonl.gz").write_bytes(gzip.compress(b'{"instruction": "Yo", "output": "Hey"}\n'))
    (data / "c.tsv").write_text("instruction\toutput\nA\tB\n")
    proc = run_cli("prepare-data", "--data_path", str(data), "--output_dir", str(tmp_path / "p"))
    notes = [x for x in (proc.stdout + proc.stderr).splitlines() if x.startswith("note: ")]
    assert len(notes) == 1, proc.stdout + proc.stderr
    assert notes[0].startswith(f"note: {data}: skipped 2 file(s): b.jsonl.gz (type '.jsonl.gz' is not read), "
                               "c.tsv (type '.tsv' is not read)"), notes[0]
    assert json.loads((tmp_path / "p" / "manifest.json").read_text())["rows_in"] == 1
    proc = run_cli("prepare-data", "--data_path", str(data / "a.jsonl"), "--output_dir", str(tmp_path / "q"))
    assert "note: " not in proc.stdout + proc.stderr
