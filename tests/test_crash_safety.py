"""Crash safety: kill -9 at random moments never leaves a checkpoint that `latest` would pick up
half-written, and resuming from it continues the uninterrupted run; a full disk while saving
keeps the previous checkpoint and says so."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time

import pytest

from conftest import BIN, ROOT, read_metrics, run_cli, tmpfs

ARGS = ["--data_path", "data/sample_alpaca.json", "--use_lora", "--per_device_train_batch_size", "1",
        "--gradient_accumulation_steps", "4", "--lr_scheduler_type", "constant", "--warmup_ratio", "0",
        "--learning_rate", "1e-3", "--max_length", "512", "--logging_steps", "1", "--seed", "3", "--max_steps", "12"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("crash") / "reference"
    run_cli("train", "--output_dir", str(out), "--save_steps", "0", *ARGS)
    return {r["step"]: r["loss"] for r in read_metrics(out) if "loss" in r}


def test_kill_9_at_random_moments(reference, tmp_path):
    from sftkit.checkpoint import list_checkpoints

    rng = random.Random(1234)
    for trial in range(10):
        out = tmp_path / f"trial{trial}"
        cmd = [str(BIN / "sftkit"), "train", "--output_dir", str(out), "--save_steps", "1", "--save_total_limit", "2",
               *ARGS]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and not list_checkpoints(out) and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(rng.uniform(0, 2.0))  # anywhere in a step or in the middle of writing a checkpoint
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        latest = list_checkpoints(out)[-1]
        step = json.loads((latest / "trainer_state.json").read_text())["step"]
        assert (latest / "state" / "optimizer.bin").is_file() and (latest / "model" / "adapter_config.json").is_file()
        target = min(step + 1, 12)
        run_cli("train", "--output_dir", str(out), "--save_steps", "1", "--save_total_limit", "2",
                "--resume_from_checkpoint", "latest", *ARGS[:-1], str(target))
        resumed = {r["step"]: r["loss"] for r in read_metrics(out) if "loss" in r}
        assert resumed[target] == pytest.approx(reference[target], rel=1e-6), (trial, step)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs to fill needs root")
def test_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path):
    # a LoRA checkpoint of tiny-qwen3 is ~12 MB (the adapter, its optimizer state and the 11 MB
    # tokenizer; 49 MB while it held the frozen base): the first fits in 18 MB, the second does not
    with tmpfs(tmp_path / "disk", "size=18M") as disk:
        out = disk / "run"
        proc = run_cli("train", "--output_dir", str(out), "--save_steps", "2", "--save_total_limit", "1",
                       *ARGS[:-1], "6", check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert "saving checkpoint-4 failed (No space left on device); the previous checkpoint" in proc.stderr
        assert sorted(p.name for p in out.iterdir() if p.name.startswith((".checkpoint", "checkpoint"))) == ["checkpoint-2"]
        assert json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["step"] == 2
        shutil.copytree(out, tmp_path / "roomy")  # more space: resume from what survived
    run_cli("train", "--output_dir", str(tmp_path / "roomy"), "--save_steps", "0", "--resume_from_checkpoint",
            "latest", *ARGS[:-1], "3")
    assert [r["step"] for r in read_metrics(tmp_path / "roomy") if "loss" in r] == [1, 2, 3]
