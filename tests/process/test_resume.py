"""Resuming a run through the CLI: it continues the uninterrupted run exactly (stopped by --max_steps,
SIGTERM or SIGINT), from the newest intact checkpoint of its own, past a torn log line; a pickle in a
checkpoint never runs; pruning keeps another run's checkpoints; a new learning rate applies from the
resumed step. (Which run a checkpoint belongs to: test_run_identity.py.)"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import time

import pytest
import torch
from conftest import (
    LORA,
    SAMPLE,
    built_once,
    final_weights,
    losses,
    make_older,
    one_error,
    read_metrics,
    run_cli,
    start_cli,
    steps,
    stopped_at,
)

from sftkit.checkpoint import checksums, damage, list_checkpoints

# A constant learning rate: a run stopped by --max_steps 5 must follow the same schedule as the
# STEPS-step run it is compared with. Micro-batch 1 x 4 accumulation keeps each step long enough
# (~0.3 s) for a SIGTERM to land mid-run.
STEPS = 8
RESUME = ["--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "4", "--lr_scheduler_type",
          "constant", "--max_length", "512", "--learning_rate", "1e-3", "--warmup_ratio", "0", "--logging_steps", "1",
          "--seed", "7", "--save_steps", "100"]


@pytest.fixture(scope="module")
def straight(eight, tmp_path_factory):
    """STEPS steps without a stop, on 8 examples (2 steps an epoch: step 5 is in epoch 2) and on 50
    (12.5 steps an epoch: step 5 is in epoch 0)."""
    sets = {"later_epoch": str(eight), "epoch_0": SAMPLE}

    def build(folder):
        for name, data in sets.items():
            run_cli("train", "--data_path", data, "--output_dir", str(folder / name), "--max_steps", str(STEPS), *RESUME)

    folder = built_once(tmp_path_factory, "straight", build)
    return {name: (data, folder / name) for name, data in sets.items()}


def _stop_by_signal(data, out, sig=signal.SIGTERM) -> int:
    """SIGTERM to the whole process group, as SLURM's scancel or a container stop sends it (or
    SIGINT, as Ctrl-C does): the DataLoader worker gets it too, and the run must still save its
    checkpoint, say how to resume, and exit with the documented code 75."""
    proc = start_cli("train", "--data_path", data, "--output_dir", str(out), "--max_steps", str(STEPS), *RESUME)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and sum('"loss"' in ln for ln in metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, sig)
    said, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    stop = [r for r in read_metrics(out) if r.get("event") == "stopped"]
    assert len(stop) == 1, "the run ended before the signal arrived"
    assert stop[0]["signal"] == sig.name
    checkpoint = out / f"checkpoint-{stop[0]['step']}"
    assert (checkpoint / "trainer_state.json").is_file() and not (out / "final").exists()
    assert f"stopped at step {stop[0]['step']}: saved {checkpoint}." in said and "done:" not in said
    assert f"sftkit train --config {out / 'config.yaml'} --resume_from_checkpoint latest" in said
    return stop[0]["step"]


@pytest.mark.parametrize("how, where", [("max_steps", "epoch_0"), ("max_steps", "later_epoch"),
                                        ("sigterm", "epoch_0"), ("sigterm", "later_epoch"), ("sigint", "later_epoch")])
def test_resume_continues_exactly(how, where, straight, tmp_path):
    data, reference = straight[where]
    out = tmp_path / "resumed"
    if how == "max_steps":
        run_cli("train", "--data_path", data, "--output_dir", str(out), "--max_steps", "5", *RESUME)
        stopped = 5
    else:
        stopped = _stop_by_signal(data, out, signal.SIGTERM if how == "sigterm" else signal.SIGINT)
    assert 1 <= stopped < STEPS
    run_cli("train", "--data_path", data, "--output_dir", str(out), "--max_steps", str(STEPS),
            "--resume_from_checkpoint", "latest", *RESUME)
    records = read_metrics(out)
    assert records[0]["resumed_from_step"] == stopped
    assert [r["step"] for r in steps(out)] == list(range(1, STEPS + 1))
    assert losses(out) == pytest.approx(losses(reference), rel=1e-6)
    for name, tensor in final_weights(reference).items():
        torch.testing.assert_close(final_weights(out)[name], tensor, rtol=1e-6, atol=1e-8)


def resume(out, *extra, check=True):
    """Resume a copy of the reference run (stopped_at) to its 6 steps."""
    return run_cli("train", *LORA, "--data_path", SAMPLE, "--save_steps", "1", "--max_steps", "6", "--output_dir",
                   str(out), "--resume_from_checkpoint", "latest", *extra, check=check)


@pytest.mark.parametrize("damage", ["truncated_weights", "garbage_rng", "only_trainer_state"])
def test_latest_falls_back_to_the_newest_intact_checkpoint(damage, reference_run, tmp_path):
    out = stopped_at(reference_run, tmp_path / damage, 4)
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
    got, want = losses(out), losses(reference_run)
    assert [got[k] for k in range(1, 7)] == pytest.approx([want[k] for k in range(1, 7)], rel=1e-6)


def test_every_kind_of_damage_is_found_and_an_explicit_damaged_path_is_refused(reference_run, tmp_path):
    out = stopped_at(reference_run, tmp_path / "kinds", 4)
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


def test_a_torn_last_line_of_metrics_does_not_block_resume(reference_run, tmp_path):
    out = stopped_at(reference_run, tmp_path / "torn", 4)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 1.2, "tok')  # killed mid-append
    proc = resume(out)
    assert "dropped 1 unreadable line(s), the torn end of the interrupted run's log" in proc.stdout
    assert losses(out)[6] == pytest.approx(losses(reference_run)[6], rel=1e-6)


class Payload:
    """Unpickling this runs a shell command that leaves a file: the side effect a test can see."""

    def __init__(self, mark):
        self.mark = str(mark)

    def __reduce__(self):
        return (os.system, (f"touch {self.mark}",))


def test_a_pickle_in_a_checkpoint_never_runs(reference_run, tmp_path):
    mark = tmp_path / "PWNED"
    out = stopped_at(reference_run, tmp_path / "pickle", 4)
    # a checkpoint of today: a file it did not write is never loaded; latest falls back
    (out / "checkpoint-4" / "state" / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(Payload(mark)))
    proc = resume(out)
    assert "checkpoint-4 (state/custom_checkpoint_0.pkl was not written by sftkit" in proc.stdout
    assert not mark.exists()
    # a checkpoint of the older layout (no checksums; accelerate's pickle held the scheduler)
    old = stopped_at(reference_run, tmp_path / "legacy", 4)
    legacy = old / "checkpoint-4"
    make_older(legacy, 2, pickle.dumps(Payload(mark)))
    proc = resume(old, "--resume_from_checkpoint", str(legacy), check=False)
    assert proc.returncode == 2 and "holds more than plain data" in proc.stderr and "Traceback" not in proc.stderr
    assert not mark.exists()


def test_pruning_keeps_another_runs_checkpoint_and_this_runs_newest(reference_run, tmp_path):
    """A foreign checkpoint of a later step beside this run's, then a resume with
    --save_total_limit 1: this run's older checkpoints are pruned, never the other run's (which
    pruning by step alone would keep as the newest, deleting this run's as soon as written)."""
    run = stopped_at(reference_run, tmp_path / "prune", 4, keep=(3, 4))
    foreign = run / "checkpoint-9"  # another run's: another identity, intact
    shutil.copytree(reference_run / "checkpoint-6", foreign)
    state = json.loads((foreign / "trainer_state.json").read_text())
    (foreign / "trainer_state.json").write_text(json.dumps({**state, "step": 9, "run_id": "0" * 16}))
    (foreign / "checksums.json").unlink()
    (foreign / "checksums.json").write_text(json.dumps(checksums(foreign)))
    assert damage(foreign) is None
    before = {p.relative_to(foreign): p.read_bytes() for p in foreign.rglob("*") if p.is_file()}
    proc = run_cli("train", *LORA, "--data_path", SAMPLE, "--max_steps", "6", "--save_steps", "1",
                   "--save_total_limit", "1", "--output_dir", str(run), "--resume_from_checkpoint", "latest")
    assert f"resuming from {run / 'checkpoint-4'}: step 4 of 6" in proc.stdout
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-6", "checkpoint-9"]
    assert {p.relative_to(foreign): p.read_bytes() for p in foreign.rglob("*") if p.is_file()} == before


def test_a_new_learning_rate_at_resume_is_applied_and_a_short_max_length_refused(reference_run, tmp_path):
    run = stopped_at(reference_run, tmp_path / "lr", 3, keep=(3,))
    proc = run_cli("train", *LORA, "--data_path", SAMPLE, "--learning_rate", "5e-4",  # the last one counts
                   "--max_steps", "6", "--save_steps", "0", "--output_dir", str(run), "--resume_from_checkpoint",
                   str(run / "checkpoint-3"))
    assert proc.stdout.count("these values apply from here on: learning_rate 0.001 -> 0.0005;") == 1  # said once
    lrs = {r["step"]: r["lr"] for r in steps(run)}
    assert [lrs[s] for s in (2, 3)] == [1e-3, 1e-3] and [lrs[s] for s in (4, 5, 6)] == [5e-4] * 3
    # a prepared set's examples longer than train's --max_length: refused before the model loads
    prepared = tmp_path / "prepared"
    run_cli("prepare-data", "--data_path", SAMPLE, "--max_length", "512", "--output_dir",
            str(prepared))
    longest = json.loads((prepared / "manifest.json").read_text())["length"]["max"]
    proc = run_cli("train", "--data_path", str(prepared), "--max_length", "16", "--output_dir", str(tmp_path / "short"),
                   check=False)
    assert proc.returncode == 2 and f"holds examples of up to {longest} tokens, longer than --max_length 16" \
        in one_error(proc), proc.stderr[-3000:]
    assert not (tmp_path / "short").exists()
