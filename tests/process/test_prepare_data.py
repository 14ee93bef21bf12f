"""prepare-data through the CLI: inspect, weighted mixing, one and two processes, folders and gzip,
sparse and 50 MB inputs, a file swapped while it is read, template switches per row, and other
tools' data."""

from __future__ import annotations

import gzip
import itertools
import json
import os
import random
import re
import threading
import time
from pathlib import Path

import pytest
from conftest import BIN, ROOT, chat_rows, measured, run_cli, write_jsonl
from test_interop import LF_SHAREGPT, u
from test_templates import CORPUS, TEMPLATES, A, S, U, m, reference, with_template

from sftkit.data.prepare import read_manifest


def test_inspect_shows_examples(tmp_path):
    proc = run_cli("prepare-data", "--data_path", "data/sample_sharegpt.json", "--output_dir", str(tmp_path / "o"),
                   "--inspect", "2")
    assert "example 0" in proc.stdout and "example 1" in proc.stdout and "supervised" in proc.stdout


def test_weighted_mixing_on_the_command_line_and_in_yaml(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"instruction": f"a{i}", "output": "x"} for i in range(10)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"question": f"b{i}", "answer": "y"} for i in range(4)])
    run_cli("prepare-data", "--data_path", str(a), "--data_path", str(b), "--data_weights", "0.5",
            "--data_weights", "2", "--output_dir", str(tmp_path / "cli"))
    man = read_manifest(tmp_path / "cli")
    assert [(x["examples"], x["after_weighting"]) for x in man["mixing"]] == [(10, 5), (4, 8)]
    assert man["examples_kept"] == 14 and man["examples_saved"] == 13
    (tmp_path / "mix.yaml").write_text(f"data_path: [{a}, {b}]\ndata_weights: [0.5, 2]\n")
    run_cli("prepare-data", "--config", str(tmp_path / "mix.yaml"), "--output_dir", str(tmp_path / "yaml"))
    assert read_manifest(tmp_path / "yaml")["fingerprint"] == man["fingerprint"]
    proc = run_cli("prepare-data", "--data_path", str(a), "--data_weights", "1", "--data_weights", "2",
                   "--output_dir", str(tmp_path / "bad"), check=False)
    assert proc.returncode == 2 and "one weight per source" in proc.stderr


def _files(out: Path) -> dict[str, bytes]:
    return {str(f.relative_to(out)): f.read_bytes() for f in sorted(out.rglob("*")) if f.is_file()}


def test_num_proc_gives_identical_output(tmp_path):
    """The real CLI with 1 and with 2 processes: every saved file the same bytes (the arrow data,
    datasets' json, lengths.png), the manifest the same but for its honest "seconds"."""
    rows = json.loads((ROOT / "data" / "sample_sharegpt.json").read_text()) * 12
    big = tmp_path / "big.json"  # 600 rows: two chunks of 512, so each process renders one
    big.write_text(json.dumps(rows))
    for n in ("1", "2"):
        run_cli("prepare-data", "--data_path", str(big), "--max_length", "512", "--num_proc", n,
                "--output_dir", str(tmp_path / n))
    one, two = _files(tmp_path / "1"), _files(tmp_path / "2")
    assert sorted(one) == sorted(two) and "dataset/data-00000-of-00001.arrow" in one
    manifests = [json.loads(files.pop("manifest.json")) for files in (one, two)]
    assert one == two
    for manifest in manifests:
        del manifest["seconds"]
    assert manifests[0] == manifests[1] and manifests[0]["examples_kept"] == 600


def test_bad_row_past_the_first_chunk_reads_the_same_with_two_processes(tmp_path):
    """A row the template refuses (Qwen3's never reads reasoning_effort), rendered by the second
    process: the same one line, naming file and line, and exit 2, as with one process."""
    rows = [{"instruction": f"q{i}", "output": "a"} for i in range(600)]
    rows[550]["reasoning_effort"] = "high"
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    said = []
    for n in ("1", "2"):
        proc = run_cli("prepare-data", "--data_path", str(data), "--num_proc", n, "--output_dir",
                       str(tmp_path / n), check=False)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert not (tmp_path / n).exists()
        said.append(proc.stderr)
    assert said[0] == said[1] and said[0].startswith(f"error: {data}:line 551: field 'reasoning_effort': ")


def test_two_processes_from_a_script_without_a_main_guard(tmp_path):
    """SFTDataset(..., num_proc=2) at the top of a script, no `if __name__ == "__main__"`: the
    children never run the script again (a spawned multiprocessing child would, and fail)."""
    import subprocess
    import sys

    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": f"q{i}", "output": "a"} for i in range(600)])
    script = tmp_path / "script.py"
    script.write_text("from transformers import AutoTokenizer\nfrom sftkit import SFTDataset\n"
                      "from sftkit.models import bundled_tokenizer_dir\n"
                      "print('script body ran', flush=True)\n"
                      f"ds = SFTDataset({str(data)!r}, AutoTokenizer.from_pretrained(bundled_tokenizer_dir()), num_proc=2)\n"
                      "print(len(ds))\n")
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["script", "body", "ran", "600"]


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
    assert manifest["files_not_read"] == [f"{data / 'c.tsv'} (type '.tsv' is not read)"]
    proc = run_cli("prepare-data", "--data_path", str(data / "a.jsonl"), "--output_dir", str(tmp_path / "q"))
    assert "note: " not in proc.stdout + proc.stderr
    assert json.loads((tmp_path / "q" / "manifest.json").read_text())["files_not_read"] == []
    # train reading the directory itself says it too, once
    proc = run_cli("train", "--data_path", str(data), "--output_dir", str(tmp_path / "run"), "--use_lora",
                   "--max_steps", "1", "--save_steps", "0")
    notes = [x for x in (proc.stdout + proc.stderr).splitlines() if x.startswith("note: ")]
    said = [n for n in notes if "c.tsv" in n]
    assert len(said) == 1 and said[0].startswith(f"note: {data}: skipped 1 file(s): c.tsv"), proc.stdout + proc.stderr


def test_a_corrupt_gzip_is_one_line(tmp_path):
    bad = tmp_path / "rows.jsonl.gz"
    bad.write_bytes(gzip.compress(ROW_A.encode())[:-12] + b"\x00" * 4)  # cut inside the deflate stream
    proc = run_cli("prepare-data", "--data_path", str(bad), "--output_dir", str(tmp_path / "p"), check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}: is not a valid gzip file ("), proc.stderr
    assert not (tmp_path / "p").exists()


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


def test_a_50_mb_row_is_dropped_without_tokenizing_it(tmp_path):
    big = tmp_path / "big.jsonl"
    small = chat_rows(tmp_path)
    with big.open("w") as f:
        f.write(json.dumps({"messages": [{"role": "user", "content": "word " * 10_000_000},
                                         {"role": "assistant", "content": "ok"}]}) + "\n")
        f.write(small.read_text())
    assert big.stat().st_size > 50_000_000

    def prepare(data: Path, out: str) -> tuple[float, float]:
        code, err, wall, peak_mb = measured([str(BIN / "sftkit"), "prepare-data", "--data_path", str(data),
                                             "--output_dir", str(tmp_path / out)])
        assert code == 0, err[-2000:]
        return wall, peak_mb

    small_s, _ = prepare(small, "small")
    big_s, big_mb = prepare(big, "big")
    manifest = json.loads((tmp_path / "big" / "manifest.json").read_text())
    assert manifest["dropped"]["too_long"] == 1 and manifest["examples_kept"] == 8
    # tokenizing it took 60 s and 6.8 GB; bounded, it costs what reading 50 MB costs (10 s, or the small
    # file's time plus 5 s where the machine is slower at starting up)
    assert big_mb < 1024 and big_s < max(10, small_s + 5), (big_s, small_s, big_mb)


def test_a_file_replaced_over_and_over_during_prepare_data_never_saves_one_files_rows_under_the_others_key(tmp_path):
    """On the real CLI: the data file is swapped between A (30 rows) and B (50)
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


# Through the real CLI, on a real file: per-row switches, and rows the template refuses.
ROWS = [
    {"messages": CORPUS[1][0], "chat_template_kwargs": {"reasoning_effort": "low"}},
    {"messages": CORPUS[3][0], "enable_thinking": False},
    {"messages": CORPUS[2][0][:3] + [m(S, "late system"), m(U, "q"), m(A, "a")]},  # line 3: refused
    {"messages": CORPUS[3][0]},
    {"messages": CORPUS[0][0], "reasoning_effort": "high"},  # line 5: refused
]


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("rows") / "switches.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS))
    return path


def prepare_args(path: Path, out: Path, *more: str) -> list[str]:
    return ["prepare-data", "--data_path", str(path), "--output_dir", str(out),
            "--chat_template", str(TEMPLATES / "qwen3_8.jinja"), "--reasoning_effort", "medium", *more]


def test_prepare_data_renders_each_row_with_its_switches_and_counts_refused_rows(own_tok, rows_file, tmp_path):
    from sftkit.data.prepare import load_prepared

    out = tmp_path / "out"
    run_cli(*prepare_args(rows_file, out, "--skip_bad_rows"))
    man = json.loads((out / "manifest.json").read_text())
    assert (man["rows_in"], man["examples_kept"], man["dropped"]["bad_row"]) == (5, 3, 2)
    assert man["options"]["reasoning_effort"] == "medium" and man["sources"][0]["bad_rows"] == 2
    assert man["bad_rows_first"] == [
        f"{rows_file}:line 3: the chat template refuses this row: System message must be at the beginning.",
        (f"{rows_file}:line 5: the chat template refuses this row: Unexpected reasoning effort high. "
         "Supported types are xhigh (default), medium, and low.")]
    with_template(own_tok, "qwen3_8")
    saved = load_prepared(out)
    for row, example in zip([ROWS[0], ROWS[1], ROWS[3]], saved):
        switches = {"reasoning_effort": "medium", **row.get("chat_template_kwargs", {}),
                    **{k: row[k] for k in ("enable_thinking",) if k in row}}
        _, ref_ids, ref_labels = reference(own_tok, row["messages"], None, switches)
        assert (example["input_ids"], example["labels"]) == (ref_ids, ref_labels), switches


def test_a_row_the_template_refuses_is_one_error_line_naming_it(rows_file, tmp_path):
    proc = run_cli(*prepare_args(rows_file, tmp_path / "out"), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.strip() == (f"error: {rows_file}:line 3: the chat template refuses this row: "
                                   "System message must be at the beginning.")
    assert not (tmp_path / "out").exists()


def test_a_run_switch_the_template_never_reads_is_one_error_line(rows_file, tmp_path):
    proc = run_cli("prepare-data", "--data_path", str(rows_file), "--output_dir", str(tmp_path / "out"),
                   "--reasoning_effort", "low", check=False)  # tiny-qwen3 has Qwen3's template
    assert proc.returncode == 2 and "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.strip() == ("error: the chat template never reads reasoning_effort, so setting it would "
                                   "change nothing (it reads enable_thinking); unset reasoning_effort")


def test_the_console_script_prepares_a_new_format_and_refuses_a_bad_file(tmp_path):
    """The installed `sftkit`, in a subprocess: LLaMA-Factory tool-call data with no flags (exit 0,
    the empty reply shown in the summary), and a bad file (exit 2, one line, no traceback)."""
    rows = [row for row, _, _ in LF_SHAREGPT] + [{"conversations": [{"from": "human", "value": "Say nothing."},
                                                                    {"from": "gpt", "value": ""}]}]
    path = tmp_path / "glaive.json"
    path.write_text(json.dumps(rows, indent=2))
    proc = run_cli("prepare-data", "--data_path", str(path), "--output_dir", str(tmp_path / "ok"), timeout=120)
    manifest = json.loads((tmp_path / "ok" / "manifest.json").read_text())
    assert manifest["examples_kept"] == 4 and manifest["warnings"] == {"empty_reply": 1}
    assert "kept, warning: empty_reply" in proc.stdout
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [u("Hi"), {"role": "assistant", "content": None}]}])
    proc = run_cli("prepare-data", "--data_path", str(bad), "--output_dir", str(tmp_path / "no"), check=False, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr
    line = (f"error: {bad}:line 1: field 'messages[1].content': is null; the chat template needs text here "
            '(write "" for an empty turn)')
    assert proc.stderr.strip().splitlines() == [line]
    assert not (tmp_path / "no").exists()
