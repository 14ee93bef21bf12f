"""Disks that fill while a command writes, are too small, read-only or not the user's: one line naming
the place, exit 2, and nothing lost (the previous checkpoint kept, no half-written folder)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import BIN, LORA, ROOT, SAMPLE, chat_rows, one_error, run_cli, steps, tmpfs

from sftkit.checkpoint import damage, list_checkpoints


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs to fill needs root")
def test_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path):
    # a LoRA checkpoint of tiny-qwen3 is ~12 MB (the adapter, its optimizer state and the 11 MB
    # tokenizer; 49 MB while it held the frozen base): the first fits in 18 MB, the second does not
    with tmpfs(tmp_path / "disk", "size=18M") as disk:
        out = disk / "run"
        proc = run_cli("train", "--output_dir", str(out), "--save_steps", "2", "--save_total_limit", "1", *LORA,
                       "--data_path", SAMPLE, "--max_steps", "6", check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert "saving checkpoint-4 failed (No space left on device); the previous checkpoint" in proc.stderr
        assert sorted(p.name for p in out.iterdir() if p.name.startswith((".checkpoint", "checkpoint"))) == ["checkpoint-2"]
        assert json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["step"] == 2
        shutil.copytree(out, tmp_path / "roomy")  # more space: resume from what survived
    run_cli("train", "--output_dir", str(tmp_path / "roomy"), "--save_steps", "0", "--resume_from_checkpoint",
            "latest", *LORA, "--data_path", SAMPLE, "--max_steps", "3")
    assert [r["step"] for r in steps(tmp_path / "roomy")] == [1, 2, 3]


def _size(folder) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs to fill needs root")
def test_a_full_disk_during_the_final_save_is_resumable(reference_run, tmp_path):
    """--save_steps 0: the last step's checkpoint is kept until final/ is complete. The tmpfs holds
    that checkpoint (sized from the reference run's, same model) and half of final/."""
    out = reference_run
    need = _size(out / "checkpoint-6") + _size(out / "final") // 2 + 2 * 2**20  # + config, metrics, tmpfs blocks
    with tmpfs(tmp_path / "disk", f"size={need}") as disk:
        run = disk / "run"
        proc = run_cli("train", *LORA, "--data_path", SAMPLE, "--max_steps", "2", "--save_steps", "0", "--output_dir",
                       str(run), check=False)
        assert proc.returncode == 2
        assert one_error(proc) == (f"error: saving final/ failed (No space left on device); {run / 'checkpoint-2'} "
                                    "is intact: free space and rerun with --resume_from_checkpoint latest, which "
                                    "writes final/")
        assert not list(run.glob(".*")) and not (run / "final").exists() and damage(run / "checkpoint-2") is None
        shutil.copytree(run, tmp_path / "roomy")  # more space: what survived, elsewhere
    roomy = tmp_path / "roomy"
    proc = run_cli("train", *LORA, "--data_path", SAMPLE, "--max_steps", "2", "--save_steps", "0", "--output_dir",
                   str(roomy), "--resume_from_checkpoint", "latest")
    assert "its steps are done but final/ was not written (its save failed): writing it now" in proc.stdout
    assert (roomy / "final" / "adapter_model.safetensors").is_file() and not list_checkpoints(roomy)
    assert [r["step"] for r in steps(roomy)] == [1, 2]
    again = run_cli("train", *LORA, "--data_path", SAMPLE, "--max_steps", "2", "--save_steps", "0", "--output_dir",
                    str(roomy), "--resume_from_checkpoint", "latest")
    assert "has finished" in again.stdout and "nothing to resume" in again.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_merge_refuses_a_disk_smaller_than_what_it_writes(other_size, tmp_path):
    """The trial: 24 MB free passed the old check (half the base's 39.2 MB of weights) and then
    failed in safetensors. The merge writes 39.2 MB of weights and 11.4 MB of tokenizer."""
    _, _, adapter = other_size
    with tmpfs(tmp_path / "disk", "size=24m") as disk:
        proc = run_cli("merge-lora", "--adapter", str(adapter), "--output_dir", str(disk / "merged"), check=False)
        assert proc.returncode == 2
        assert one_error(proc) == (f"error: --output_dir {disk / 'merged'}: 24.0 MiB free on its file system, and "
                                    "what is written there needs at least 48.3 MiB; free some space or choose another "
                                    "place")
        assert not os.listdir(disk)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_disk_that_fills_during_the_merge_leaves_nothing(other_size, tmp_path):
    """Room for the bytes but only 4 files (tmpfs nr_inodes: its root, the temporary folder and
    two files): the third file written fails with ENOSPC, as a full disk does."""
    _, _, adapter = other_size
    with tmpfs(tmp_path / "disk", "size=200m,nr_inodes=4") as disk:
        proc = run_cli("merge-lora", "--adapter", str(adapter), "--output_dir", str(disk / "merged"), check=False)
        assert proc.returncode == 2
        line = one_error(proc)
        assert line.startswith(f"error: --output_dir {disk / 'merged'}: the disk filled while the merged model was "
                               "written (No space left on device, "), line
        assert line.endswith("bytes free now); the partial copy was removed and nothing was written there: free some "
                             "space or choose another place"), line
        assert not os.listdir(disk)


def _can_bind_read_only(tmp: Path) -> bool:
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind -o ro {tmp} {tmp} && ! touch {tmp}/x"],
                           capture_output=True, check=False) if shutil.which("unshare") else None
    return probe is not None and probe.returncode == 0


def test_read_only_places_fail_in_one_line_before_the_model_loads(tmp_path):
    ro = tmp_path / "ro"
    (ro / "cache").mkdir(parents=True)
    if not _can_bind_read_only(ro):
        pytest.skip("no read-only bind mount here (needs `unshare -m` and mount rights)")
    data = chat_rows(tmp_path)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/nonexistent/base"}))
    sftkit = BIN / "sftkit"
    cases = {
        "train": (f"train --data_path {data} --output_dir {ro}/run --max_steps 1", f"--output_dir {ro}/run"),
        "prepare-data": (f"prepare-data --data_path {data} --output_dir {ro}/prep", f"--output_dir {ro}/prep"),
        "merge-lora": (f"merge-lora --adapter {adapter} --output_dir {ro}/merged", f"--output_dir {ro}/merged"),
        # the cache (a new data set is prepared into it) on the read-only mount, the output elsewhere
        "cache": (f"train --data_path {data} --output_dir {tmp_path}/run --max_steps 1",
                  "the cache folder", "set SFTKIT_CACHE"),
    }
    for args, *said in cases.values():
        cmd = f"mount --bind -o ro {ro} {ro} && SFTKIT_CACHE={ro}/cache exec {sftkit} {args}"
        proc = subprocess.run(["unshare", "-m", "sh", "-c", cmd], cwd=ROOT, capture_output=True, text=True,
                              timeout=300, check=False)
        one_error(proc, *said, "Read-only file system", alone=True)
    assert not (tmp_path / "run" / "final").exists()


def test_a_folder_the_user_cannot_write_fails_in_one_line(tmp_path):
    """A folder without write permission. Root writes anywhere, so the command runs as root without
    the capability that overrides file permissions (setpriv), which is how an ordinary user stands."""
    if os.geteuid() == 0 and not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: permissions cannot be made to bind")
    drop = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    data = chat_rows(tmp_path)
    for args in (["train", "--data_path", str(data), "--max_steps", "1"], ["prepare-data", "--data_path", str(data)]):
        proc = subprocess.run([*drop, str(BIN / "sftkit"), *args, "--output_dir", str(locked / "run")], cwd=ROOT,
                              capture_output=True, text=True, timeout=300, check=False)
        one_error(proc, f"--output_dir {locked}/run", "Permission denied", alone=True)
    assert not any(locked.iterdir())


def test_too_little_space_is_one_line(tmp_path):
    """A 1 MB file system for the output of a full fine-tune and a merge of a model whose weights
    are 4 MB: at least 2 MB will be written, so both stop before the model loads."""
    small = tmp_path / "small"
    small.mkdir()
    if not shutil.which("unshare") or subprocess.run(
            ["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {small}"], check=False).returncode:
        pytest.skip("no tmpfs mount here (needs `unshare -m` and mount rights)")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    (model / "model.safetensors").write_bytes(bytes(4 * 2**20))  # only its size is read
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(model)}))
    data = chat_rows(tmp_path)
    for args in (f"train --model_name_or_path {model} --data_path {data} --output_dir {small}/run",
                 f"merge-lora --adapter {adapter} --output_dir {small}/merged"):
        cmd = f"mount -t tmpfs -o size=1m tmpfs {small} && exec {BIN / 'sftkit'} {args}"
        proc = subprocess.run(["unshare", "-m", "sh", "-c", cmd], cwd=ROOT, capture_output=True, text=True,
                              timeout=300, check=False)
        line = one_error(proc, "MiB free on its file system", "needs at least 2.0 MiB", alone=True)
        assert line.startswith(f"error: --output_dir {small}/"), line
