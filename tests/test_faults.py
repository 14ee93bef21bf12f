"""What a run produced cannot be lost, poisoned or hijacked: damaged checkpoints, a pickle payload,
a signal during the end of a run, outputs that would overwrite inputs, caches with many writers,
a torn log, and data workers that run out of file descriptors or die. Real runs, real signals."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import BIN, ROOT, read_metrics, run_cli

# constant lr, no warm-up: a run of 4 steps resumed to 6 follows the 6-step run exactly
ARGS = ["--data_path", "data/sample_alpaca.json", "--use_lora", "--per_device_train_batch_size", "2",
        "--gradient_accumulation_steps", "2", "--lr_scheduler_type", "constant", "--warmup_ratio", "0",
        "--learning_rate", "1e-3", "--max_length", "512", "--logging_steps", "1", "--seed", "5", "--save_steps", "1"]


def losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out) if "loss" in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 6-step reference, and a 4-step run (checkpoint-1..4) to damage copies of."""
    d = tmp_path_factory.mktemp("faults")
    run_cli("train", *ARGS, "--max_steps", "6", "--output_dir", str(d / "reference"))
    run_cli("train", *ARGS, "--max_steps", "4", "--output_dir", str(d / "four"))
    return d


def damaged_copy(runs, tmp_path, name: str):
    out = tmp_path / name
    shutil.copytree(runs / "four", out)
    shutil.rmtree(out / "final")
    return out


def resume(out, *extra, check=True):
    return run_cli("train", *ARGS, "--max_steps", "6", "--output_dir", str(out), "--resume_from_checkpoint", "latest",
                   *extra, check=check)


@pytest.mark.parametrize("damage", ["truncated_weights", "garbage_rng", "only_trainer_state"])
def test_latest_falls_back_to_the_newest_intact_checkpoint(damage, runs, tmp_path):
    out = damaged_copy(runs, tmp_path, damage)
    if damage == "truncated_weights":
        (out / "checkpoint-4" / "state" / "model.safetensors").write_bytes(
            (out / "checkpoint-4" / "state" / "model.safetensors").read_bytes()[:1000])
        skipped = "checkpoint-4 (state/model.safetensors differs from what was saved (size))"
    elif damage == "garbage_rng":  # same size: only the checksum tells
        rng = out / "checkpoint-4" / "state" / "random_states_0.pkl"
        rng.write_bytes(os.urandom(rng.stat().st_size))
        skipped = "checkpoint-4 (state/random_states_0.pkl differs from what was saved (checksum))"
    else:  # a copy cut short: only trainer_state.json arrived
        (out / "checkpoint-99").mkdir()
        shutil.copy(out / "checkpoint-4" / "trainer_state.json", out / "checkpoint-99" / "trainer_state.json")
        skipped = "checkpoint-99 (checksums.json is missing (a copy cut short?))"
    proc = resume(out)
    assert f"skipped damaged {skipped}" in proc.stdout
    start = 3 if damage != "only_trainer_state" else 4
    assert f"resuming from {out / f'checkpoint-{start}'}: step {start} of 6" in proc.stdout
    got, want = losses(out), losses(runs / "reference")
    assert [got[k] for k in range(1, 7)] == pytest.approx([want[k] for k in range(1, 7)], rel=1e-6)


def test_every_kind_of_damage_is_found_and_an_explicit_damaged_path_is_refused(runs, tmp_path):
    from sftkit.checkpoint import damage

    out = damaged_copy(runs, tmp_path, "kinds")
    ckpt = out / "checkpoint-4"
    assert damage(ckpt) is None and damage(out / "checkpoint-1") is None
    cases = {
        "state/optimizer.bin": lambda p: p.write_bytes(b"garbage" * 10),
        "state/random_states_0.pkl": lambda p: p.write_bytes(b""),
        "trainer_state.json": lambda p: p.write_text(p.read_text()[:20]),
        "checksums.json": lambda p: p.write_text("{"),
        "model/adapter_model.safetensors": lambda p: p.unlink(),
    }
    for rel, spoil in cases.items():
        backup = tmp_path / "backup"
        shutil.copytree(ckpt, backup)
        spoil(ckpt / rel)
        assert damage(ckpt) is not None, rel
        shutil.rmtree(ckpt)
        backup.rename(ckpt)
    (ckpt / "state" / "optimizer.bin").write_bytes(b"garbage")
    proc = resume(out, "--resume_from_checkpoint", str(ckpt), check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert f"error: {ckpt} is damaged: state/optimizer.bin differs from what was saved" in proc.stderr
    assert "intact checkpoints beside it: checkpoint-1, checkpoint-2, checkpoint-3" in proc.stderr


def make_older(ckpt, scheduler_pickle: bytes | None = None) -> None:
    """Turn a checkpoint into the layout sftkit wrote before state version 3: no checksums.json,
    no run identity, the scheduler in accelerate's custom_checkpoint_0.pkl."""
    state = json.loads((ckpt / "trainer_state.json").read_text())
    old = {k: v for k, v in state.items() if k not in ("total_steps", "run_id", "data_fingerprint")}
    (ckpt / "trainer_state.json").write_text(json.dumps({**old, "version": 2}))
    (ckpt / "checksums.json").unlink()
    target = ckpt / "state" / "custom_checkpoint_0.pkl"
    if scheduler_pickle is None:
        torch.save(json.loads((ckpt / "scheduler.json").read_text()), target)
    else:
        target.write_bytes(scheduler_pickle)
    (ckpt / "scheduler.json").unlink()


class Payload:
    """Unpickling this runs a shell command that leaves a file: the side effect a test can see."""

    def __init__(self, mark):
        self.mark = str(mark)

    def __reduce__(self):
        return (os.system, (f"touch {self.mark}",))


def test_a_pickle_in_a_checkpoint_never_runs(runs, tmp_path):
    mark = tmp_path / "PWNED"
    out = damaged_copy(runs, tmp_path, "pickle")
    # a checkpoint of today: a file it did not write is never loaded; latest falls back
    (out / "checkpoint-4" / "state" / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(Payload(mark)))
    proc = resume(out)
    assert "checkpoint-4 (state/custom_checkpoint_0.pkl was not written by sftkit" in proc.stdout
    assert not mark.exists()
    # a checkpoint of the older layout (no checksums; accelerate's pickle held the scheduler)
    old = damaged_copy(runs, tmp_path, "legacy")
    legacy = old / "checkpoint-4"
    make_older(legacy, pickle.dumps(Payload(mark)))
    proc = resume(old, "--resume_from_checkpoint", str(legacy), check=False)
    assert proc.returncode == 2 and "holds more than plain data" in proc.stderr and "Traceback" not in proc.stderr
    assert not mark.exists()


def test_checkpoints_of_the_older_layout_still_resume_exactly(runs, tmp_path):
    """No checksums.json, the scheduler in accelerate's custom_checkpoint_0.pkl (plain data)."""
    out = damaged_copy(runs, tmp_path, "older")
    for ckpt in out.glob("checkpoint-*"):
        make_older(ckpt)
    proc = resume(out)
    assert f"resuming from {out / 'checkpoint-4'}: step 4 of 6" in proc.stdout
    assert losses(out)[6] == pytest.approx(losses(runs / "reference")[6], rel=1e-6)


def test_a_torn_last_line_of_metrics_does_not_block_resume(runs, tmp_path):
    out = damaged_copy(runs, tmp_path, "torn")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 1.2, "tok')  # killed mid-append
    proc = resume(out)
    assert "dropped 1 unreadable line(s), the torn end of the interrupted run's log" in proc.stdout
    assert losses(out)[6] == pytest.approx(losses(runs / "reference")[6], rel=1e-6)


def _signal_when(cmd, ready, sig=signal.SIGTERM, timeout=300):
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.01)
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:  # it finished first
        pass
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def test_sigterm_during_the_final_eval_and_the_final_save_loses_nothing(runs, tmp_path):
    """The end of a run is protected like its steps: final/ is complete (written atomically) and a
    checkpoint of the last step is on disk; the final eval is cut short and the exit code is 75."""
    from safetensors.torch import load_file

    big_eval = tmp_path / "eval.json"
    big_eval.write_text(json.dumps(json.loads((ROOT / "data" / "sample_alpaca.json").read_text()) * 40))
    out = tmp_path / "eval_stop"
    cmd = [str(BIN / "sftkit"), "train", *ARGS, "--max_steps", "6", "--output_dir", str(out),
           "--eval_data_path", str(big_eval), "--per_device_eval_batch_size", "2"]
    code, said, err = _signal_when(cmd, lambda: (out / "final").is_dir())
    assert code == 75, err[-2000:]
    assert "the final eval was skipped: stopped by SIGTERM" in said and "Traceback" not in err
    reference = load_file(str(runs / "reference" / "final" / "adapter_model.safetensors"))
    for name, tensor in load_file(str(out / "final" / "adapter_model.safetensors")).items():
        torch.testing.assert_close(tensor, reference[name], rtol=1e-6, atol=1e-8)
    assert "nothing to resume" in run_cli("train", *ARGS, "--max_steps", "6", "--output_dir", str(out),
                                          "--eval_data_path", str(big_eval), "--resume_from_checkpoint", "latest").stdout
    # during the final save: the signal waits for the save, and nothing half-written is left
    out = tmp_path / "save_stop"
    cmd = [str(BIN / "sftkit"), "train", *ARGS, "--max_steps", "6", "--output_dir", str(out)]
    code, said, err = _signal_when(cmd, lambda: (out / ".checkpoint-6.tmp").exists() or (out / ".final.tmp").exists())
    assert code in (0, 75), err[-2000:]
    assert (out / "checkpoint-6" / "checksums.json").is_file() and not list(out.glob(".*.tmp"))
    for name, tensor in load_file(str(out / "final" / "adapter_model.safetensors")).items():
        torch.testing.assert_close(tensor, reference[name], rtol=1e-6, atol=1e-8)


def _tree_bytes(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_no_command_writes_over_its_inputs_a_full_folder_or_a_file(runs, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(runs / "four", adapter)
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(ROOT / "data" / "sample_alpaca.json", data / "rows.json")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    (tmp_path / "a_file").write_text("mine")
    before = {p: _tree_bytes(p) for p in (adapter, data, tmp_path / "notes")}
    attempts = [
        ["merge-lora", "--adapter", str(adapter / "final"), "--output_dir", str(adapter)],          # holds the input
        ["merge-lora", "--adapter", str(adapter / "final"), "--output_dir", str(adapter / "final")],  # is the input
        ["merge-lora", "--adapter", str(adapter / "final"), "--output_dir", str(tmp_path / "notes")],  # not empty
        ["merge-lora", "--adapter", str(adapter / "final"), "--output_dir", str(tmp_path / "a_file")],  # a file
        ["prepare-data", "--data_path", str(data), "--output_dir", str(data / "prepared")],         # inside the input
        ["prepare-data", "--data_path", str(data / "rows.json"), "--output_dir", str(data / "rows.json")],
        ["prepare-data", "--data_path", str(data), "--output_dir", str(tmp_path / "notes")],
        ["train", "--data_path", str(data), "--output_dir", str(data), "--use_lora"],
        ["train", "--data_path", str(data / "rows.json"), "--output_dir", str(tmp_path / "a_file"), "--use_lora"],
    ]
    for args in attempts:
        proc = run_cli(*args, check=False)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, args
    after = {p: _tree_bytes(p) for p in before}
    assert after == before and (tmp_path / "a_file").read_text() == "mine"
    run_cli("merge-lora", "--adapter", str(adapter / "final"), "--output_dir", str(tmp_path / "notes"),
            "--overwrite_output_dir")
    assert (tmp_path / "notes" / "model.safetensors").is_file() and not (tmp_path / "notes" / "keep.txt").exists()


RACE = """
import json, sys
from sftkit.data.dataset import prepared_dir
from sftkit.data.options import DataOptions
from sftkit.models import load_tokenizer, resolve_model_path
model = resolve_model_path("tiny-qwen3")
prepared = prepared_dir(DataOptions(max_length=512), ["data/sample_alpaca.json"], load_tokenizer("tiny-qwen3"))
print(json.dumps([model, str(prepared)]))
"""


def test_four_processes_racing_on_each_cache_entry(tmp_path):
    env = {**os.environ, "SFTKIT_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", RACE], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    results = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in results]
    paths = {out.strip().splitlines()[-1] for out, _ in results}
    assert len(paths) == 1
    model, prepared = json.loads(paths.pop())
    assert not list((tmp_path / "cache").rglob("*.tmp"))
    from sftkit.data.prepare import load_prepared

    assert len(load_prepared(prepared)) == 50 and (ROOT / model).joinpath("model.safetensors").is_file()


def test_many_micro_batches_need_few_file_descriptors(tmp_path):
    """200 micro-batches a step, two steps prefetched, were 1,600 shared-memory descriptors."""
    out = tmp_path / "fds"
    cmd = (f"ulimit -n 256 && exec {BIN / 'sftkit'} train {' '.join(ARGS[:3])} --per_device_train_batch_size 1 "
           f"--gradient_accumulation_steps 200 --max_steps 2 --save_steps 0 --max_length 512 --output_dir {out}")
    # about 40 s here; before the fix the worker died and the run hung for good
    proc = subprocess.run(["bash", "-c", cmd], cwd=ROOT, env=dict(os.environ), capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert read_metrics(out)[-1]["step"] == 2


def test_a_killed_data_worker_ends_the_run_with_one_line(tmp_path):
    out = tmp_path / "worker"
    cmd = [str(BIN / "sftkit"), "train", *ARGS, "--max_steps", "400", "--save_steps", "0", "--output_dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.1)
    time.sleep(1)
    from pathlib import Path

    children = [int(c) for task in Path(f"/proc/{proc.pid}/task").iterdir()
                for c in (task / "children").read_text().split()]
    assert children, "no DataLoader worker found"
    killed_at = time.time()
    for child in children:
        os.kill(child, signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert time.time() - killed_at < 30
    assert proc.returncode == 2 and err.count("\n") == 1 and "error: the data worker process died" in err


def test_a_diverging_run_leaves_only_finite_checkpoints(tmp_path):
    """The issue's run: full fine-tuning at lr 1e5, a checkpoint every 5 steps."""
    from safetensors.torch import load_file

    out = tmp_path / "diverged"
    proc = run_cli("train", "--data_path", "data/sample_alpaca.json", "--learning_rate", "1e5", "--max_steps", "30",
                   "--save_steps", "5", "--max_length", "512", "--output_dir", str(out), check=False)
    assert proc.returncode == 2 and "error: training diverged at step" in proc.stderr and "Traceback" not in proc.stderr
    kept = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    for checkpoint in kept:
        assert all(torch.isfinite(t).all() for t in load_file(str(checkpoint / "model" / "model.safetensors")).values())
    assert (f"The last checkpoint, {kept[-1]}, holds finite weights" if kept else "No checkpoint was written") \
        in proc.stderr
