"""The checkpoint layout: checksums as sftkit writes them now and wrote them before, and checkpoints
of the earlier layouts resuming exactly."""

from __future__ import annotations

import io
import json

import pytest
from conftest import losses, make_older, read_metrics


def test_sha256_checksums_of_older_checkpoints_still_verify(tmp_path):
    """A checksums.json as sftkit wrote it before state version 4 (bare sha256 hex digests)
    verifies, and a byte changed at the same size is still found; new lists are xxh3-128."""
    import hashlib

    from sftkit.checkpoint import checksums, damage

    ckpt = tmp_path / "checkpoint-3"
    (ckpt / "state").mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"version": 3, "step": 3}))
    (ckpt / "state" / "optimizer.bin").write_bytes(bytes(range(256)) * 4096)
    files = [f for f in sorted(ckpt.rglob("*")) if f.is_file()]
    old = {f.relative_to(ckpt).as_posix(): [f.stat().st_size, hashlib.sha256(f.read_bytes()).hexdigest()] for f in files}
    (ckpt / "checksums.json").write_text(json.dumps(old))
    assert damage(ckpt) is None
    blob = bytearray((ckpt / "state" / "optimizer.bin").read_bytes())
    blob[500_000] ^= 1
    (ckpt / "state" / "optimizer.bin").write_bytes(bytes(blob))
    assert damage(ckpt) == "state/optimizer.bin differs from what was saved (checksum)"
    new = checksums(ckpt)
    assert new.keys() == old.keys() and all(v[1].startswith("xxh3_128:") for v in new.values())
    (ckpt / "checksums.json").write_text(json.dumps(new))
    assert damage(ckpt) is None


def test_checkpoints_of_older_layouts_still_resume_exactly(eight, tmp_path):
    """Two layouts sftkit wrote before, neither with a checksums.json, the scheduler in accelerate's
    custom_checkpoint_0.pkl (plain data): state version 2 (no run identity) and the first one (no
    "version", no "skipped_steps"). Resumed from `latest`, a run continues the uninterrupted run
    exactly (the same last loss); a state of a newer sftkit is refused."""
    from rich.console import Console

    from sftkit.checkpoint import TrainState
    from sftkit.config import SFTConfig
    from sftkit.errors import ConfigError
    from sftkit.train import run

    def train(out, steps: int, **extra) -> str:  # in this process: five runs, no start-up cost; what it said
        said = Console(file=io.StringIO(), width=200)
        run(SFTConfig(data_path=[str(eight)], output_dir=str(out), max_steps=steps, save_steps=1, max_length=512,
                      use_lora=True, per_device_train_batch_size=1, gradient_accumulation_steps=4,
                      lr_scheduler_type="constant", learning_rate=1e-3, warmup_ratio=0, logging_steps=1, seed=7,
                      **extra), said)
        return said.file.getvalue()

    train(tmp_path / "whole", 3)
    for version in (1, 2):
        out = tmp_path / f"version_{version}"
        train(out, 2)
        state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
        assert state["version"] == TrainState.VERSION
        for checkpoint in out.glob("checkpoint-*"):
            make_older(checkpoint, version)
        said = train(out, 3, resume_from_checkpoint="latest")
        assert f"resuming from {out / 'checkpoint-2'}: step 2 of 3" in said, version
        assert read_metrics(out)[0]["resumed_from_step"] == 2
        assert losses(out)[3] == pytest.approx(losses(tmp_path / "whole")[3], rel=1e-6), version
        # from then on the run writes today's layout
        new = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
        assert new["version"] == TrainState.VERSION and (out / "checkpoint-3" / "checksums.json").is_file(), version
    with pytest.raises(ConfigError, match="newer sftkit"):
        TrainState.from_dict({**state, "version": TrainState.VERSION + 1})
