"""Formats, sources, validation errors, accounting and caching of prepare-data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import ROOT, run_cli

from sftkit.data import formats
from sftkit.data.options import DataOptions
from sftkit.data.prepare import prepare, read_manifest
from sftkit.data.render import IGNORE_INDEX
from sftkit.errors import ConfigError, DataError


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


ALPACA = {"instruction": "Add", "input": "2 and 3", "output": "5"}


def test_alpaca_with_system_and_history():
    row = {**ALPACA, "system": "be brief", "history": [["hi", "hello"]]}
    assert formats.to_messages(row, formats.detect_format(row)) == [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "Add\n\n2 and 3"},
        {"role": "assistant", "content": "5"}]


def test_sharegpt_roles_and_function_call():
    row = {"conversations": [
        {"from": "system", "value": "s"}, {"from": "human", "value": "weather?"},
        {"from": "function_call", "value": '{"name": "w", "arguments": {"c": 1}}'},
        {"from": "observation", "value": "sunny"}, {"from": "gpt", "value": "Sunny."}]}
    msgs = formats.to_messages(row, formats.detect_format(row))
    assert [x["role"] for x in msgs] == ["system", "user", "assistant", "tool", "assistant"]
    assert msgs[2]["tool_calls"][0]["function"] == {"name": "w", "arguments": {"c": 1}}


def test_openai_messages_with_reasoning_and_parts():
    row = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                        {"role": "assistant", "content": "c", "thinking": "t"}]}
    assert formats.to_messages(row, "messages") == [
        {"role": "user", "content": "ab"}, {"role": "assistant", "content": "c", "reasoning_content": "t"}]


def test_custom_columns_and_field_map():
    assert formats.detect_format({"question": "q", "answer": "a"}) == "custom"
    assert formats.to_messages({"prompt": "q", "completion": "a"}, "custom")[-1] == {"role": "assistant", "content": "a"}
    fm = formats.parse_field_map("instruction=ask,output=reply")
    assert formats.to_messages({"ask": "q", "reply": "a"}, "custom", fm)[0] == {"role": "user", "content": "q"}


@pytest.mark.parametrize("row, field, problem", [
    ({"instruction": "x"}, None, "cannot tell the format"),
    ({"instruction": "x", "output": 3}, "output", "expected a string"),
    ({"conversations": [{"from": "alien", "value": "a"}]}, "conversations[0].from", "unknown role"),
    ({"messages": [{"role": "user", "content": "a"}]}, "messages", "no assistant reply to train on"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}, {"role": "assistant", "content": "x"}]},
     "messages[0].content[0]", "only text, reasoning, tool_call content parts are supported, got 'image_url'"),
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


def test_bad_line_deep_in_jsonl_is_named_by_cli(tmp_path):
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


def test_length_policies_and_accounting(tmp_path, tok):
    rows = [{"instruction": "short", "output": "ok"}, {"instruction": "long " * 200, "output": "fine"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    man = prepare(DataOptions(max_length=64), [str(path)], tmp_path / "drop", tok)
    assert man["examples_kept"] == 1 and man["dropped"]["too_long"] == 1
    # cutting from the right removes the reply: nothing left to learn, dropped and counted
    man = prepare(DataOptions(max_length=64, truncation="right"), [str(path)], tmp_path / "right", tok)
    assert man["examples_kept"] == 1 and man["dropped"]["no_supervised_tokens"] == 1
    man = prepare(DataOptions(max_length=64, truncation="left"), [str(path)], tmp_path / "left", tok)
    assert man["examples_kept"] == 2 and man["length"]["max"] == 64
    for m in (man,):
        assert m["rows_in"] == m["examples_kept"] + sum(m["dropped"].values())


def test_repeat_run_is_cached_and_options_change_the_fingerprint(tmp_path, tok):
    path = ROOT / "data" / "sample_sharegpt.json"
    first = prepare(DataOptions(max_length=512), [str(path)], tmp_path / "o", tok)
    again = prepare(DataOptions(max_length=512), [str(path)], tmp_path / "o", tok)
    assert not first["cached"] and again["cached"] and again["fingerprint"] == first["fingerprint"]
    other = prepare(DataOptions(max_length=512, train_on="last"), [str(path)], tmp_path / "o", tok)
    assert not other["cached"] and other["supervised_tokens"] < first["supervised_tokens"]
    assert (tmp_path / "o" / "lengths.png").stat().st_size > 1000


def test_refuses_to_overwrite_a_foreign_directory(tmp_path, tok):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(Exception, match="not a prepare-data output"):
        prepare(DataOptions(), [str(ROOT / "data" / "sample_alpaca.json")], tmp_path / "mine", tok)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_sft_dataset_api(tok):
    from sftkit import SFTDataset

    ds = SFTDataset(data_path=str(ROOT / "data" / "sample_alpaca.json"), tokenizer=tok, max_length=512,
                    format_type="alpaca", use_chat_template=True)
    assert len(ds) == 50
    ex = ds[0]
    assert set(ex) == {"input_ids", "attention_mask", "labels"}
    assert len(ex["input_ids"]) == len(ex["labels"]) == len(ex["attention_mask"])
    sup = [t for t in ex["labels"] if t != IGNORE_INDEX]
    assert sup and tok.decode(sup).endswith("<|im_end|>")
    # unshifted: a supervised label equals the input id at the same position
    assert all(lab == i for lab, i in zip(ex["labels"], ex["input_ids"]) if lab != IGNORE_INDEX)


def test_inspect_shows_examples(tmp_path):
    proc = run_cli("prepare-data", "--data_path", "data/sample_sharegpt.json", "--output_dir", str(tmp_path / "o"),
                   "--inspect", "2")
    assert "example 0" in proc.stdout and "example 1" in proc.stdout and "supervised" in proc.stdout


def test_data_error_message_format():
    assert str(DataError("f.jsonl", "line 3", "output", "is missing")) == "f.jsonl:line 3: field 'output': is missing"


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
    for m in manifests:
        del m["seconds"]
    assert manifests[0] == manifests[1] and manifests[0]["examples_kept"] == 600


def test_processes_for_rows_and_cores(tmp_path):
    from sftkit.data.options import AUTO_CORES_PER_PROC, AUTO_MAX_PROCS, AUTO_ROWS_PER_PROC
    from sftkit.data.prepare import processes_for, usable_cores

    assert DataOptions().num_proc == 0  # auto
    assert processes_for(0, 50) == 1 and processes_for(0, 2 * AUTO_ROWS_PER_PROC - 1) == 1
    assert processes_for(0, 10**7) == max(1, min(usable_cores() // AUTO_CORES_PER_PROC, AUTO_MAX_PROCS))
    mask = len(os.sched_getaffinity(0))
    for text, cores in (("max 100000\n", mask), ("150000 100000\n", 1), ("50000 100000\n", 1),
                        (f"{100000 * (mask + 4)} 100000\n", mask), ("garbled", mask)):
        (tmp_path / "cpu.max").write_text(text)  # cgroup v2: a quota of 1.5 CPUs is 1 core, none is the mask
        assert usable_cores(str(tmp_path / "cpu.max")) == cores, text
    assert usable_cores(str(tmp_path / "absent")) == mask
    assert processes_for(4, 600) == 2  # never more processes than chunks of 512 rows
    assert processes_for(3, 10**7) == 3  # a number given is taken as given
    with pytest.raises(ConfigError, match="num_proc must be at least 1, or 0 \\(auto\\)"):
        DataOptions(num_proc=-1)


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


def _session(sid: int) -> list[str]:
    """Command lines of the processes in session `sid` (the CLI's, started with start_new_session)."""
    return [cmd for _, cmd in _session_pids(sid)]


def _session_pids(sid: int) -> list[tuple[int, str]]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == sid:  # after pid and (comm): state, ppid, pgrp, session
                found.append((int(stat.parent.name), (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()))
        except (OSError, IndexError, ValueError):
            continue  # it ended while being read
    return found


DEFAULT_SIGINT = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                  "os.execv(sys.argv[1], sys.argv[1:])")


def _start_two_children(tmp_path):
    """`sftkit prepare-data --num_proc 2` in a session of its own, once both its children run."""
    import subprocess
    import sys
    import time

    from conftest import BIN

    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": f"q{i}", "output": "a"} for i in range(1100)])
    # Started as a terminal starts it, SIGINT at its default: a job run in the background of a
    # non-interactive shell (`nohup make test &`) inherits SIGINT ignored, Python then installs no
    # KeyboardInterrupt, and the prepare rightly runs to its end (this test failed so, twice).
    proc = subprocess.Popen([sys.executable, "-c", DEFAULT_SIGINT, str(BIN / "sftkit"), "prepare-data",
                             "--data_path", str(data), "--num_proc", "2",
                             "--output_dir", str(tmp_path / "out")], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        children = [pid for pid, cmd in _session_pids(proc.pid) if "sftkit.data.workers" in cmd]
        if len(children) == 2:
            return proc, children
        time.sleep(0.05)
    raise AssertionError(f"the command ended (or hung) before its children started: {proc.poll()}")


def _ends_clean(proc, tmp_path) -> str:
    """The command's stderr, once it and every process of its session are gone and it left no file."""
    import time

    _, err = proc.communicate(timeout=60)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]
    deadline = time.time() + 30
    while _session(proc.pid) and time.time() < deadline:
        time.sleep(0.1)
    assert _session(proc.pid) == []
    return err.decode()


def test_ctrl_c_during_a_multi_process_prepare(tmp_path):
    """SIGINT to the process group, as Ctrl-C sends it, while the tokenizing children run: the
    command exits 130 without a traceback (none from a child either), leaves nothing in the output
    folder's parent, and no process of its session outlives it."""
    import signal
    import time

    proc, _ = _start_two_children(tmp_path)
    time.sleep(1)  # the children are importing transformers (5 s): the window where one would print a traceback
    os.killpg(proc.pid, signal.SIGINT)
    err = _ends_clean(proc, tmp_path)
    assert proc.returncode == 130 and "Traceback" not in err, err  # 128 + SIGINT, as a shell says it


def test_a_killed_child_ends_the_prepare_with_one_line(tmp_path):
    """A child killed as the out-of-memory killer does it (SIGKILL): one line and exit 2, not a
    parent waiting forever for its results."""
    import signal

    proc, children = _start_two_children(tmp_path)
    os.kill(children[0], signal.SIGKILL)
    err = _ends_clean(proc, tmp_path)
    assert proc.returncode == 2 and err.count("\n") == 1, err
    assert err.startswith("error: a tokenizing process was killed by SIGKILL before it finished")


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


def test_lengths_reads_the_column_through_a_selection():
    import datasets

    from sftkit.data.dataset import hold_out, lengths
    ds = datasets.Dataset.from_dict({"length": [5, 3, 9, 1, 7, 2, 8]})
    train, held = hold_out(ds, 2, seed=0)
    assert lengths(train) == list(train["length"]) and lengths(held) == list(held["length"])
    assert sorted(lengths(train) + lengths(held)) == sorted(ds["length"])
