"""Bad data is one error naming file, line and field: the row errors of the formats, and the
bad-input corpus (tests/data/bad/, described in its EXPECTED.json) through prepare-data.

Every bad file gives exactly one line, `error: PATH[:line N | :row N]: [field 'F': ]PROBLEM`, and
exit code 2, never a traceback; with --skip_bad_rows a bad row is skipped and counted in
manifest.json, while a fault of the whole file stays an error. The valid oddities (a BOM, CRLF,
newlines inside CSV cells, a trailing blank line) must prepare. The CLI runs in this process (the
`cli` fixture); tests/process/test_cli_errors.py runs the console script on a few of these files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import one_error

from sftkit.data import formats
from sftkit.errors import DataError


@pytest.mark.parametrize("row, field, problem", [
    ({"instruction": "x"}, None, "cannot tell the format"),
    ({"instruction": "x", "output": 3}, "output", "expected a string"),
    ({"conversations": [{"from": "alien", "value": "a"}]}, "conversations[0].from", "unknown role"),
    ({"messages": [{"role": "user", "content": "a"}]}, "messages", "no assistant reply to train on"),
    ({"messages": [{"role": "user", "content": [{"type": "video"}]}, {"role": "assistant", "content": "x"}]},
     "messages[0].content[0]", ("only text, reasoning, tool_call, image, image_url content parts are supported, "
                                "got 'video'")),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}, {"role": "assistant", "content": "x"}]},
     "messages[0].content[0].image_url", "is missing its url"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": [{"type": "image"}]}]},
     "messages[1].content[0]", "an image belongs in a user message, not in the assistant's"),
    ({"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "x"}]},
     "messages[0].content", "is null; the chat template needs text here"),
    ({"conversations": [{"from": "human", "value": None}, {"from": "gpt", "value": "x"}]},
     "conversations[0].value", "is null"),
    ({"messages": [{"role": "user", "content": [{"type": "reasoning", "value": "r"}]}, {"role": "assistant", "content": "x"}]},
     "messages[0].content[0]", "a reasoning part belongs in an assistant message"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}], "tools": "get_weather"},
     "tools", "which is not JSON"),
])
def test_row_errors_name_the_field(row, field, problem):
    with pytest.raises(formats.RowError) as err:
        formats.to_messages(row, formats.detect_format(row))
    assert err.value.field == field and problem in err.value.problem


def test_data_error_message_format():
    assert str(DataError("f.jsonl", "line 3", "output", "is missing")) == "f.jsonl:line 3: field 'output': is missing"


# ---- the corpus ---------------------------------------------------------------------------------


BAD = Path(__file__).resolve().parent / "data" / "bad"


CASES = json.loads((BAD / "EXPECTED.json").read_text())["cases"]


NOT_CASES = {"EXPECTED.json", "make_parquet.py", ".gitattributes"}


ERRORS = sorted(name for name, case in CASES.items() if "valid" not in case)


VALID = sorted(name for name, case in CASES.items() if "valid" in case)


def expected_line(name: str) -> str:
    """The start of the error line, up to and including the field."""
    case = CASES[name]
    at = f"{BAD / name}" + (f":{case['where']}" if case["where"] else "")
    return f"error: {at}: " + (f"field '{case['field']}': " if case["field"] else "")


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
    line = one_error(result, alone=True)
    assert line.startswith(expected_line(name)), line
    assert case["problem"] in line, line
    assert not out.exists()  # nothing half-written
    if case["skip"] == "error":  # the whole file is at fault: skipping rows cannot help
        skipped = cli("prepare-data", "--data_path", str(BAD / name), "--output_dir", str(out), "--skip_bad_rows")
        assert skipped.exit_code == 2 and one_error(skipped, alone=True) == line
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


def test_very_large_single_lines(cli, tmp_path):
    """A 3 MB line that is not JSON is one short error (no echo of the line) or, skipped, one count;
    a 1 MB valid row prepares and is dropped as too long."""
    small = json.dumps({"instruction": "What is 1 + 1?", "output": "2"})
    path = tmp_path / "huge_bad.jsonl"
    path.write_text(small + "\n" + '{"instruction": "x", "output": "' + "a" * 3_000_000 + "\n" + small + "\n")
    result = cli("prepare-data", "--data_path", str(path), "--output_dir", str(tmp_path / "o1"))
    assert result.exit_code == 2
    line = one_error(result, alone=True)
    assert line.startswith(f"error: {path}:line 2: not valid JSON (Unterminated string") and len(line) < 300
    result = cli("prepare-data", "--data_path", str(path), "--output_dir", str(tmp_path / "o1"), "--skip_bad_rows")
    assert result.exit_code == 0, result.output
    check_manifest(tmp_path / "o1", 1, rows=3)

    path = tmp_path / "huge_ok.jsonl"
    path.write_text(small + "\n" + json.dumps({"instruction": "Say a lot.", "output": "a " * 500_000}) + "\n")
    result = cli("prepare-data", "--data_path", str(path), "--output_dir", str(tmp_path / "o2"))
    assert result.exit_code == 0, result.output
    assert check_manifest(tmp_path / "o2", 0, rows=2)["dropped"]["too_long"] == 1
