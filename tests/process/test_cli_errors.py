"""Mistakes on the command line, through the console script: one line and exit 2, never a traceback,
and nothing written. (The range of every option and the bad-input corpus are checked in process:
tests/test_config.py, tests/test_data_errors.py.)"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import BIN, LORA, ROOT, SAMPLE, measured, one_error, run_cli, write_jsonl
from test_data_errors import BAD, check_manifest
from test_data_formats import ALPACA

from sftkit.data.prepare import read_manifest


def test_a_bad_line_deep_in_jsonl_is_named(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [ALPACA] * 60)
    lines = path.read_text().splitlines()
    lines[56] = '{"instruction": "x", "output": '  # line 57 is cut short
    path.write_text("\n".join(lines) + "\n")
    proc = run_cli("prepare-data", "--data_path", str(path), "--output_dir", str(tmp_path / "out"), check=False)
    assert proc.returncode == 2
    assert f"{path}:line 57: not valid JSON" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_bad_field_is_named_and_skip_bad_rows_accounts_for_it(tmp_path):
    rows = [ALPACA] * 10
    rows[3] = {"instruction": "x", "output": None}
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    proc = run_cli("prepare-data", "--data_path", str(path), "--output_dir", str(tmp_path / "o"), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"error: {path}:line 4: field 'output': is missing (null)"
    run_cli("prepare-data", "--data_path", str(path), "--output_dir", str(tmp_path / "o"), "--skip_bad_rows")
    man = read_manifest(tmp_path / "o")
    assert man["rows_in"] == 10 and man["examples_kept"] == 9 and man["dropped"]["bad_row"] == 1
    assert "line 4" in man["bad_rows_first"][0]


def test_missing_file_and_unknown_format_are_one_line_errors(tmp_path):
    proc = run_cli("prepare-data", "--data_path", "nope/missing.json", "--output_dir", str(tmp_path / "o"), check=False)
    assert proc.returncode == 2 and "nope/missing.json: no such file or directory" in proc.stderr
    proc = run_cli("prepare-data", "--data_path", "data/sample_alpaca.json", "--format_type", "yaml",
                   "--output_dir", str(tmp_path / "o"), check=False)
    assert proc.returncode == 2 and "format_type: 'yaml' is not one of" in proc.stderr
    for p in (proc,):
        assert "Traceback" not in p.stderr


def test_the_console_script_gives_the_same_lines(cli, tmp_path):
    """The installed `sftkit` in a subprocess: the same line on stderr and exit code 2 for a file
    that was a traceback before; with --skip_bad_rows, the same counts as in-process."""
    name = "sharegpt_from_list.json"
    proc = run_cli("prepare-data", "--data_path", str(BAD / name), "--output_dir", str(tmp_path / "e"),
                   check=False, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr + proc.stdout
    in_process = cli("prepare-data", "--data_path", str(BAD / name), "--output_dir", str(tmp_path / "x"))
    assert proc.stderr.strip().splitlines() == [one_error(in_process, alone=True)]
    names = ("bad_line_deep.jsonl", "non_utf8.jsonl", "null_output.parquet")
    run_cli("prepare-data", *[a for n in names for a in ("--data_path", str(BAD / n))],
            "--output_dir", str(tmp_path / "s"), "--skip_bad_rows", timeout=120)
    check_manifest(tmp_path / "s", 3, rows=40 + 4 + 4)


def test_a_lone_surrogate_is_a_bad_row_and_a_duplicate_yaml_key_an_error(tmp_path):
    """A lone "\\ud83d" escape was a TypeError from the tokenizer, naming no file, line or field."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"instruction": "Hi", "output": "Hello"}\n{"instruction": "Smile \\ud83d", "output": "ok"}\n')
    proc = run_cli("prepare-data", "--data_path", str(rows), "--output_dir", str(tmp_path / "p"), check=False)
    assert proc.returncode == 2 and one_error(proc).startswith(
        f"error: {rows}:line 2: field 'instruction': holds '\\ud83d' at character 6, a lone surrogate"), \
        proc.stderr[-3000:]
    proc = run_cli("prepare-data", "--data_path", str(rows), "--output_dir", str(tmp_path / "p"), "--skip_bad_rows",
                   check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert manifest["rows_in"] == 2 and manifest["examples_kept"] == 1 and manifest["dropped"]["bad_row"] == 1
    run = tmp_path / "run.yaml"
    run.write_text("learning_rate: 1.0e-4\nmax_steps: 3\nlearning_rate: 1.0e-3\n")
    proc = run_cli("train", "--config", str(run), check=False)
    assert proc.returncode == 2 and one_error(proc) == \
        f"error: {run}:3: key 'learning_rate' is given twice (lines 1 and 3); keep one", proc.stderr[-3000:]


def test_looping_long_and_non_utf8_paths_are_named_in_one_line(tmp_path):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    latin1 = os.fsdecode(bytes(tmp_path) + b"/caf\xe9.json")
    shutil.copy(ROOT / "data" / "sample_alpaca.json", latin1)
    cases = {
        ("data/sample_alpaca.json", str(tmp_path / "loop")): "cannot be resolved (Symlink loop",
        ("data/sample_alpaca.json", str(tmp_path / ("a" * 300))): "is 300 bytes long, and a file system takes at most 255",
        (latin1, str(tmp_path / "out")): f"error: input {tmp_path}/caf\\xe9.json: the name is not valid UTF-8",
    }
    for (data, out), said in cases.items():
        for command in ("prepare-data", "train"):  # argv as bytes: the name is not UTF-8
            proc = run_cli(command, "--data_path", os.fsencode(data), "--output_dir", out, check=False)
            assert proc.returncode == 2 and said in one_error(proc), (command, out, proc.stderr[-3000:])
    assert sorted(os.listdir(tmp_path)) == sorted(["loop", os.path.basename(latin1)])


def test_custom_columns_it_does_not_know_and_an_output_dir_that_is_a_file(tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"ask": "hi", "reply": "hello"}) + "\n")
    proc = run_cli("prepare-data", "--data_path", str(data), "--format_type", "custom",
                   "--output_dir", str(tmp_path / "p"), check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert f"{data}:line 1:" in proc.stderr and "--field_map instruction=COLUMN,output=COLUMN" in proc.stderr
    (tmp_path / "taken").write_text("a file")
    for command in (["train", *LORA, "--data_path", SAMPLE], ["prepare-data", "--data_path", SAMPLE]):
        proc = run_cli(*command, "--output_dir", str(tmp_path / "taken"), check=False)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
        assert f"--output_dir {tmp_path / 'taken'} is a file" in proc.stderr


def test_booleans_as_hf_scripts_write_them_and_devices_that_cannot_work(tmp_path):
    out = tmp_path / "b"
    run_cli("train", "--data_path", "data/sample_alpaca.json", "--use_lora", "True", "--fused_adamw", "false",
            "--max_steps", "1", "--save_steps", "0", "--output_dir", str(out), "--max_length", "512")
    saved = (out / "config.yaml").read_text()
    assert "use_lora: true" in saved and "fused_adamw: false" in saved
    proc = run_cli("train", "--data_path", "data/sample_alpaca.json", "--use_lora", "maybe", check=False)
    assert proc.returncode == 2 and "--use_lora maybe: expected true or false" in proc.stderr
    proc = run_cli("train", *LORA, "--data_path", SAMPLE, "--fp16", "--output_dir", str(tmp_path / "f"), check=False)
    assert proc.returncode == 2 and "--fp16 needs a CUDA GPU" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("train", *LORA, "--data_path", SAMPLE, "--bf16", "--max_steps", "1", "--save_steps", "0",
                   "--output_dir", str(tmp_path / "h"))
    assert "note: bf16 on a CPU is emulated" in proc.stdout


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
def test_load_in_4bit_without_bitsandbytes_is_one_line(tmp_path):
    proc = run_cli("train", *LORA, "--data_path", SAMPLE, "--max_steps", "1", "--load_in_4bit", "--output_dir",
                   str(tmp_path / "o"), check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "--load_in_4bit needs bitsandbytes: pip install" in proc.stderr


def test_load_in_4bit_needs_lora(tmp_path):
    proc = run_cli("train", "--data_path", "data/sample_alpaca.json", "--load_in_4bit", "--output_dir",
                   str(tmp_path / "o"), check=False)
    assert proc.returncode == 2 and "load_in_4bit set without use_lora" in proc.stderr


def _bomb(path: Path, levels: int, key: str = "seed") -> Path:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels + 1)]
    path.write_text("\n".join([*lines, f"{key}: *a{levels}"]) + "\n")
    return path


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    bomb = _bomb(tmp_path / "bomb.yaml", 7)
    assert bomb.stat().st_size < 600
    code, err, wall, peak_mb = measured([str(BIN / "sftkit"), "train", "--config", str(bomb)])
    assert code == 2 and len(err.encode()) < 1024 and err.count("\n") == 1, err
    assert "expand to more than 100,000 values" in err
    assert wall < 2 and peak_mb < 300, (wall, peak_mb)
