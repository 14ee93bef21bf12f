"""Signals, real ones: SIGKILL at random moments never leaves a checkpoint that `latest` would take
half-written; SIGTERM during the final eval and the final save loses nothing; Ctrl-C and a killed
child of a multi-process prepare-data end it cleanly. (SIGTERM and SIGINT mid-run, then resumed:
test_resume.py.)"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import BIN, LORA, ROOT, SAMPLE, losses, run_cli, start_cli, write_jsonl


def test_kill_9_at_random_moments(reference_run, tmp_path):
    """SIGKILL anywhere in a step or in the middle of writing a checkpoint, 7 times: after a random
    step from 2 to 5, within the time a step and its checkpoint take (that run's last one). `latest`
    is then a whole checkpoint, and resuming from it gives the uninterrupted run's next loss."""
    from sftkit.checkpoint import list_checkpoints

    reference = losses(reference_run)
    rng = random.Random(1234)
    killed = 0  # trials whose run the kill cut short
    for trial in range(7):
        out = tmp_path / f"trial{trial}"
        args = ["--output_dir", str(out), "--save_steps", "1", "--save_total_limit", "2", *LORA, "--data_path", SAMPLE]
        proc = start_cli("train", *args, "--max_steps", "6")
        after = rng.randint(2, 5)
        deadline = time.time() + 120
        while time.time() < deadline and len(done := _logged_steps(out)) < after and proc.poll() is None:
            time.sleep(0.02)
        time.sleep(rng.uniform(0, done[-1]["elapsed_s"] - done[-2]["elapsed_s"]) if len(done) > 1 else 0)
        proc.send_signal(signal.SIGKILL)
        killed += proc.wait() == -signal.SIGKILL
        latest = list_checkpoints(out)[-1]
        step = json.loads((latest / "trainer_state.json").read_text())["step"]
        assert (latest / "state" / "optimizer.bin").is_file() and (latest / "model" / "adapter_config.json").is_file()
        target = min(step + 1, 6)
        run_cli("train", *args, "--max_steps", str(target), "--resume_from_checkpoint", "latest")
        assert losses(out)[target] == pytest.approx(reference[target], rel=1e-6), (trial, step)
    assert killed >= 5, f"{7 - killed} of 7 runs ended before the kill: nothing was cut short"


def _logged_steps(out) -> list[dict]:
    """The step records a running run has written so far (its last line may be half-written)."""
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            break
        if "loss" in record:
            found.append(record)
    return found


def _signal_when(args, ready, sig=signal.SIGTERM, timeout=300):
    """Start `sftkit ARGS`, send `sig` to its process group once ready() or it ended: (exit code, stdout, stderr)."""
    proc = start_cli(*args)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.01)
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:  # it finished first
        pass
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def test_sigterm_during_the_final_eval_and_the_final_save_loses_nothing(reference_run, tmp_path):
    """The end of a run is protected like its steps: final/ is complete (written atomically) and a
    checkpoint of the last step is on disk; the final eval is cut short and the exit code is 75."""
    from safetensors.torch import load_file

    big_eval = tmp_path / "eval.json"
    big_eval.write_text(json.dumps(json.loads((ROOT / SAMPLE).read_text()) * 40))
    out = tmp_path / "eval_stop"
    args = ["train", *LORA, "--data_path", SAMPLE, "--save_steps", "1", "--max_steps", "6"]  # the reference run's
    code, said, err = _signal_when([*args, "--output_dir", str(out), "--eval_data_path", str(big_eval),
                                    "--per_device_eval_batch_size", "2"], lambda: (out / "final").is_dir())
    assert code == 75, err[-2000:]
    assert "the final eval was skipped: stopped by SIGTERM" in said and "Traceback" not in err
    reference = load_file(str(reference_run / "final" / "adapter_model.safetensors"))
    for name, tensor in load_file(str(out / "final" / "adapter_model.safetensors")).items():
        torch.testing.assert_close(tensor, reference[name], rtol=1e-6, atol=1e-8)
    assert "nothing to resume" in run_cli(*args, "--output_dir", str(out), "--eval_data_path", str(big_eval),
                                          "--resume_from_checkpoint", "latest").stdout
    # during the final save: the signal waits for the save, and nothing half-written is left
    out = tmp_path / "save_stop"
    code, said, err = _signal_when([*args, "--output_dir", str(out)],
                                   lambda: (out / ".checkpoint-6.tmp").exists() or (out / ".final.tmp").exists())
    assert code in (0, 75), err[-2000:]
    assert (out / "checkpoint-6" / "checksums.json").is_file() and not list(out.glob(".*.tmp"))
    for name, tensor in load_file(str(out / "final" / "adapter_model.safetensors")).items():
        torch.testing.assert_close(tensor, reference[name], rtol=1e-6, atol=1e-8)


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
