"""The bad-input corpus (tests/data/bad/, described in its EXPECTED.json) through the real CLI.

Every bad file gives exactly one line, `error: PATH[:line N | :row N]: [field 'F': ]PROBLEM`, and
exit code 2, never a traceback; with --skip_bad_rows a bad row is skipped and counted in
manifest.json, while a fault of the whole file stays an error. The valid oddities (a BOM, CRLF,
newlines inside CSV cells, a trailing blank line) must prepare.

The CLI runs in-process (typer's CliRunner on build_app()), a subprocess costs ~5 s per call; one
test runs the installed console script on a few files to show it behaves the same.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
from conftest import run_cli
from typer.testing import CliRunner

import sftkit.models
from sftkit.cli import build_app

BAD = Path(__file__).resolve().parent / "data" / "bad"
CASES = json.loads((BAD / "EXPECTED.json").read_text())["cases"]
NOT_CASES = {"EXPECTED.json", "make_parquet.py", ".gitattributes"}
ERRORS = sorted(name for name, case in CASES.items() if "valid" not in case)
VALID = sorted(name for name, case in CASES.items() if "valid" in case)


_real_load_tokenizer = sftkit.models.load_tokenizer


@functools.cache
def _tokenizer(*args):
    return _real_load_tokenizer(*args)


@pytest.fixture
def cli(monkeypatch):
    """invoke(ARGS) -> click Result: `sftkit ARGS` in this process. Only the tokenizer load (~1.5 s)
    is shared between calls; the tokenizer is read-only in prepare-data."""
    _tokenizer("tiny-qwen3", False, None)  # load it outside the runner's captured streams
    monkeypatch.setattr(sftkit.models, "load_tokenizer", _tokenizer)
    app = build_app()
    runner = CliRunner()
    return lambda *args: runner.invoke(app, list(args), catch_exceptions=False)


def expected_line(name: str) -> str:
    """The start of the error line, up to and including the field."""
    case = CASES[name]
    at = f"{BAD / name}" + (f":{case['where']}" if case["where"] else "")
    return f"error: {at}: " + (f"field '{case['field']}': " if case["field"] else "")


def one_error_line(result) -> str:
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and result.stderr.strip() == lines[0], result.output
    return lines[0]


def check_manifest(out: Path, bad_rows: int, rows: int | None = None) -> dict:
    man = json.loads((out / "manifest.json").read_text())
    assert man["dropped"]["bad_row"] == bad_rows
    assert man["rows_in"] == man["examples_kept"] + sum(man["dropped"].values())
    if rows is not None:
        assert man["rows_in"] == rows
    return man


def test_the_corpus_is_complete():
    on_disk = {p.name for p in BAD.iterdir()} - NOT_CASES
    assert on_disk == set(CASES)
    assert len(ERRORS) >= 25 and all(p.stat().st_size < 64 * 1024 for p in BAD.iterdir() if p.is_file())


@pytest.mark.parametrize("name", ERRORS)
def test_bad_input_is_one_line_naming_file_line_and_field(name, cli, tmp_path):
    case, out = CASES[name], tmp_path / "out"
    result = cli("prepare-data", "--data_path", str(BAD / name), "--output_dir", str(out))
    assert result.exit_code == 2, result.output
    line = one_error_line(result)
    assert line.startswith(expected_line(name)), line
    assert case["problem"] in line, line
    assert not out.exists()  # nothing half-written
    if case["skip"] == "error":  # the whole file is at fault: skipping rows cannot help
        skipped = cli("prepare-data", "--data_path", str(BAD / name), "--output_dir", str(out), "--skip_bad_rows")
        assert skipped.exit_code == 2 and one_error_line(skipped) == line
        assert not out.exists()


def test_skip_bad_rows_skips_and_counts_each_bad_row(cli, tmp_path):
    """Every file with a bad row, in one run (one prepare costs ~1 s): each source's bad rows are
    counted, the rest kept, and the first few listed with the same text as the error."""
    names = sorted(name for name in ERRORS if CASES[name]["skip"] != "error")
    args = [a for name in names for a in ("--data_path", str(BAD / name))]
    result = cli("prepare-data", *args, "--output_dir", str(tmp_path / "out"), "--skip_bad_rows")
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    man = check_manifest(tmp_path / "out", sum(CASES[name]["skip"] for name in names))
    assert {s["path"]: s["bad_rows"] for s in man["sources"]} == {str(BAD / n): CASES[n]["skip"] for n in names}
    assert len(man["bad_rows_first"]) == 5
    for name, listed in zip(names, man["bad_rows_first"]):
        assert ("error: " + listed).startswith(expected_line(name)) and CASES[name]["problem"] in listed, listed


def test_valid_oddities_prepare(cli, tmp_path):
    args = [a for name in VALID for a in ("--data_path", str(BAD / name))]
    result = cli("prepare-data", *args, "--output_dir", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    man = check_manifest(tmp_path / "out", 0, rows=sum(CASES[name]["valid"] for name in VALID))
    assert man["examples_kept"] == man["rows_in"]
    assert {s["path"]: s["rows"] for s in man["sources"]} == {str(BAD / n): CASES[n]["valid"] for n in VALID}


def test_csv_cells_keep_their_newlines_and_a_bom_is_not_part_of_a_column_name():
    from sftkit.data import formats, sources

    rows = [row for _, row in sources.read(sources.Source(str(BAD / "embedded_newlines.csv"))).rows]
    assert rows[0]["instruction"] == "Write a haiku\nabout rain." and rows[1]["input"] == "2 and 3"
    assert formats.to_messages(rows[0], "alpaca")[-1]["content"].count("\n") == 2
    rows = [row for _, row in sources.read(sources.Source(str(BAD / "bom.csv"))).rows]
    assert list(rows[0]) == ["instruction", "input", "output"]
    rows = [row for _, row in sources.read(sources.Source(str(BAD / "crlf.csv"))).rows]
    assert rows[1]["instruction"] == "Two\r\nlines"


def test_very_large_single_lines(cli, tmp_path):
    """A 3 MB line that is not JSON is one short error (no echo of the line) or, skipped, one count;
    a 1 MB valid row prepares and is dropped as too long."""
    small = json.dumps({"instruction": "What is 1 + 1?", "output": "2"})
    path = tmp_path / "huge_bad.jsonl"
    path.write_text(small + "\n" + '{"instruction": "x", "output": "' + "a" * 3_000_000 + "\n" + small + "\n")
    result = cli("prepare-data", "--data_path", str(path), "--output_dir", str(tmp_path / "o1"))
    assert result.exit_code == 2
    line = one_error_line(result)
    assert line.startswith(f"error: {path}:line 2: not valid JSON (Unterminated string") and len(line) < 300
    result = cli("prepare-data", "--data_path", str(path), "--output_dir", str(tmp_path / "o1"), "--skip_bad_rows")
    assert result.exit_code == 0, result.output
    check_manifest(tmp_path / "o1", 1, rows=3)

    path = tmp_path / "huge_ok.jsonl"
    path.write_text(small + "\n" + json.dumps({"instruction": "Say a lot.", "output": "a " * 500_000}) + "\n")
    result = cli("prepare-data", "--data_path", str(path), "--output_dir", str(tmp_path / "o2"))
    assert result.exit_code == 0, result.output
    assert check_manifest(tmp_path / "o2", 0, rows=2)["dropped"]["too_long"] == 1


def test_the_console_script_gives_the_same_lines(cli, tmp_path):
    """The installed `sftkit` in a subprocess: the same line on stderr and exit code 2 for a file
    that was a traceback before; with --skip_bad_rows, the same counts as in-process."""
    name = "sharegpt_from_list.json"
    proc = run_cli("prepare-data", "--data_path", str(BAD / name), "--output_dir", str(tmp_path / "e"),
                   check=False, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr + proc.stdout
    in_process = cli("prepare-data", "--data_path", str(BAD / name), "--output_dir", str(tmp_path / "x"))
    assert proc.stderr.strip().splitlines() == [one_error_line(in_process)]
    names = ("bad_line_deep.jsonl", "non_utf8.jsonl", "null_output.parquet")
    run_cli("prepare-data", *[a for n in names for a in ("--data_path", str(BAD / n))],
            "--output_dir", str(tmp_path / "s"), "--skip_bad_rows", timeout=120)
    check_manifest(tmp_path / "s", 3, rows=40 + 4 + 4)
