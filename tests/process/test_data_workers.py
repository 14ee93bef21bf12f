"""The DataLoader worker of a run: many micro-batches a step on few file descriptors; a worker killed
ends the run in one line; a stuck one does not hold a run that was told to stop."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

from conftest import BIN, LORA, ROOT, SAMPLE, read_metrics, start_cli

from sftkit.checkpoint import damage


def test_many_micro_batches_need_few_file_descriptors(tmp_path):
    """100 micro-batches a step, two steps prefetched, under a limit of 256 descriptors: with a
    shared-memory descriptor for each of a micro-batch's 4 tensors they were 800 (200 micro-batches,
    1,600, killed the worker and hung the run for good)."""
    out = tmp_path / "fds"
    cmd = (f"ulimit -n 256 && exec {BIN / 'sftkit'} train --data_path {SAMPLE} --use_lora "
           "--per_device_train_batch_size 1 --gradient_accumulation_steps 100 --max_steps 2 --save_steps 0 "
           f"--max_length 512 --output_dir {out}")
    proc = subprocess.run(["bash", "-c", cmd], cwd=ROOT, env=dict(os.environ), capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert read_metrics(out)[-1]["step"] == 2


def test_a_killed_data_worker_ends_the_run_with_one_line(tmp_path):
    out = tmp_path / "worker"
    proc = start_cli("train", *LORA, "--data_path", SAMPLE, "--max_steps", "400", "--save_steps", "0", "--output_dir",
                     str(out))
    deadline = time.time() + 120
    while time.time() < deadline and not any(r.get("step") for r in _lines(out)) and proc.poll() is None:
        time.sleep(0.1)  # training: the worker hands over batches
    children = [int(c) for task in Path(f"/proc/{proc.pid}/task").iterdir()
                for c in (task / "children").read_text().split()]
    assert children, "no DataLoader worker found"
    killed_at = time.time()
    for child in children:
        os.kill(child, signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert time.time() - killed_at < 30
    assert proc.returncode == 2 and err.count("\n") == 1 and "error: the data worker process died" in err, err[-3000:]


def test_a_stuck_data_worker_does_not_hold_a_stopped_run(tmp_path):
    """The worker is stopped (SIGSTOP: it can neither work nor handle SIGTERM); SIGTERM to the
    run then saves the checkpoint, and the run exits 75 instead of joining the worker forever,
    leaving no process behind: its own process group is empty once it has exited, before this test
    kills anything."""
    out = tmp_path / "stuck"
    proc = start_cli("train", *LORA, "--data_path", SAMPLE, "--output_dir", str(out), "--max_steps", "400",
                     "--save_steps", "0")
    deadline = time.time() + 300
    while time.time() < deadline and not any(r.get("step") for r in _lines(out)) and proc.poll() is None:
        time.sleep(0.1)
    workers = [int(c) for task in (Path("/proc") / str(proc.pid) / "task").iterdir()
               for c in (task / "children").read_text().split()]
    assert workers, "no DataLoader worker found"
    assert {str(w) for w in workers} <= {m.split()[0] for m in _group_members(proc.pid)}  # what is checked below
    for worker in workers:
        os.kill(worker, signal.SIGSTOP)
    time.sleep(3)  # the run uses up the steps already handed over, then waits for the stopped worker
    os.kill(proc.pid, signal.SIGTERM)
    try:
        said, err = proc.communicate(timeout=90)  # torch's own shutdown takes 10 s of it
        # what the run left, seen right after it exited: before the safety net below kills anything
        left_workers = [w for w in workers if Path(f"/proc/{w}").exists()]
        left_in_group = _group_members(proc.pid)
        try:
            os.killpg(proc.pid, 0)
            group_empty = False
        except ProcessLookupError:
            group_empty = True
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        for worker in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGKILL)
        proc.kill()
    assert proc.returncode == 75, err[-3000:]
    step = read_metrics(out)[-1]["step"]
    assert f"stopped at step {step}: saved {out / f'checkpoint-{step}'}" in said and damage(out / f"checkpoint-{step}") is None
    assert not left_workers, f"workers {left_workers} outlived the run"
    assert group_empty and not left_in_group, f"processes of the run left: {left_in_group}"


def _group_members(pgid: int) -> list[str]:
    """'pid state command' of each process in process group `pgid`, from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            text = stat.read_text()
            command, fields = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()
            if int(fields[2]) == pgid:  # fields: state, ppid, pgrp, ...
                found.append(f"{stat.parent.name} {fields[0]} {command}")
    return found


def _lines(out) -> list[dict]:
    try:
        return read_metrics(out)
    except (OSError, ValueError):
        return []
