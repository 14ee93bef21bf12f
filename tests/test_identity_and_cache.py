"""Issue 23, build 5: a run's identity and the prepared cache, tried on the real CLI. The same bytes
are one run however their path is typed and from whatever folder; a checkpoint of the earlier,
path-spelled identity resumes when typed as then and is otherwise refused in one line; a damaged
cache entry is rebuilt with one note; a damaged prepared folder is one error line, exit 2.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from conftest import ROOT, read_metrics, run_cli

from sftkit.checkpoint import checksums, damage, read_state

ARGS = ["--use_lora", "--per_device_train_batch_size", "2", "--lr_scheduler_type", "constant", "--warmup_ratio", "0",
        "--learning_rate", "1e-3", "--max_length", "512", "--logging_steps", "1", "--seed", "7", "--save_steps", "2"]
DATA = ROOT / "data" / "sample_alpaca.json"


def _one_error(proc) -> str:
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return errors[0]


def _said_changed(proc) -> str:
    lines = [x for x in proc.stdout.splitlines() if "changed" in x]
    assert len(lines) == 1, proc.stdout
    return lines[0]


def _set_run_id(checkpoint: Path, run_id: str) -> None:
    """Give a checkpoint another run id, its checksums rewritten so that it stays intact."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    (checkpoint / "trainer_state.json").write_text(json.dumps({**state, "run_id": run_id}))
    (checkpoint / "checksums.json").unlink()
    (checkpoint / "checksums.json").write_text(json.dumps(checksums(checkpoint)))
    assert damage(checkpoint) is None


def test_the_same_bytes_typed_another_way_from_another_folder_are_the_same_run(tmp_path):
    """The trial: data.jsonl typed relative in one folder, then absolute from another, was
    'another run' (its path was in the identity), so `latest` refused; and config.yaml held the
    relative path, so the printed resume command worked only from the first folder."""
    a, b, c = (tmp_path / n for n in "abc")
    for d in (a, b, c):
        d.mkdir()
    shutil.copy(DATA, a / "data.json")
    run_cli("train", *ARGS, "--data_path", "data.json", "--output_dir", "out", "--max_steps", "2", cwd=a)
    out = a / "out"
    first = read_state(out / "checkpoint-2").run_id

    proc = run_cli("train", *ARGS, "--data_path", str(a / "data.json"), "--output_dir", str(out),
                   "--max_steps", "4", "--resume_from_checkpoint", "latest", cwd=b)
    assert f"resuming from {out / 'checkpoint-2'}: step 2 of 4" in proc.stdout
    # the length is all that changed: not the data, not its path
    assert _said_changed(proc) == "changed since that checkpoint: max_steps 2 -> 4" and "warning" not in proc.stdout
    assert read_state(out / "checkpoint-4").run_id == first
    losses = [r["step"] for r in read_metrics(out) if "loss" in r]
    assert losses == [1, 2, 3, 4]

    # the resume command a stop prints, typed from a third folder: config.yaml holds absolute paths
    saved = (out / "config.yaml").read_text()
    assert f"- {a / 'data.json'}" in saved and f"output_dir: {out}" in saved
    (c / "link.json").symlink_to(a / "data.json")  # and a symlink to the same bytes is the same run too
    proc = run_cli("train", "--config", str(out / "config.yaml"), "--data_path", "link.json",
                   "--resume_from_checkpoint", "latest", "--max_steps", "6", cwd=c)
    assert f"resuming from {out / 'checkpoint-4'}: step 4 of 6" in proc.stdout
    assert _said_changed(proc) == "changed since that checkpoint: max_steps 4 -> 6"
    assert read_state(out / "checkpoint-6").run_id == first


def test_a_checkpoint_of_the_path_spelled_identity_resumes_as_typed_then_or_is_refused_in_one_line(tmp_path,
                                                                                                   monkeypatch, tok):
    """Checkpoints written before run ids held no path (a bare 16-hex id) must not become
    unresumable silently: typed as then, from the same folder, they resume; otherwise one line
    says why and how."""
    from sftkit.config import SFTConfig
    from sftkit.data.dataset import spelled_fingerprint
    from sftkit.run_dir import spelled_run_identity

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    shutil.copy(DATA, a / "data.json")
    run_cli("train", *ARGS, "--data_path", "data.json", "--output_dir", "out", "--max_steps", "2", cwd=a)
    out = a / "out"
    # the id the earlier sftkit wrote for this run (checked against that code: see the commit)
    monkeypatch.chdir(a)
    cfg = SFTConfig.from_dict({"data_path": ["data.json"], "use_lora": True, "per_device_train_batch_size": 2,
                               "lr_scheduler_type": "constant", "warmup_ratio": 0.0, "learning_rate": 1e-3,
                               "max_length": 512, "seed": 7})
    _set_run_id(out / "checkpoint-2", spelled_run_identity(cfg, spelled_fingerprint(cfg.data_options(),
                                                                                   cfg.data_path, tok), 1))

    refused = run_cli("train", *ARGS, "--data_path", str(a / "data.json"), "--output_dir", str(out),
                      "--max_steps", "4", "--resume_from_checkpoint", "latest", cwd=b, check=False)
    assert "written by an earlier sftkit, whose run identity held the data's and the model's paths as typed" in \
        _one_error(refused) and f"--resume_from_checkpoint {out / 'checkpoint-2'}" in _one_error(refused)

    proc = run_cli("train", *ARGS, "--data_path", "data.json", "--output_dir", "out", "--max_steps", "4",
                   "--resume_from_checkpoint", "latest", cwd=a)
    assert "resuming from out/checkpoint-2: step 2 of 4" in proc.stdout
    assert _said_changed(proc) == "changed since that checkpoint: max_steps 2 -> 4" and "warning" not in proc.stdout
    assert read_state(out / "checkpoint-4").run_id.startswith("v2:")  # written by this identity from now on


def _cache_entry(data: Path) -> Path:
    """The prepared-cache entry made from `data` (its manifest names the file it read)."""
    import os

    entries = [m.parent for m in (Path(os.environ["SFTKIT_CACHE"]) / "prepared").glob("*/manifest.json")
               if str(data) in (s["path"] for s in json.loads(m.read_text())["sources"])]
    assert len(entries) == 1, entries
    return entries[0]


def _cut(path: Path) -> tuple[int, int]:
    """Truncate a file to half its size, as a copy cut short would; (new size, old size)."""
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(size // 2)
    return size // 2, size


def test_a_damaged_cache_entry_is_rebuilt_with_one_note_and_a_damaged_prepared_set_is_one_error(tmp_path):
    """The trial: a truncated .arrow file in a cache entry failed every later run of that data with
    ArrowInvalid (entries were never checked). Now each entry's manifest records every file's size
    and digest, checked before each use."""
    from sftkit.data.dataset import damage

    rows = [{"messages": [{"role": "user", "content": f"build five, question {i}"},
                          {"role": "assistant", "content": f"answer {i} of the cache trial"}]} for i in range(8)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = [*ARGS, "--data_path", str(data), "--max_steps", "1"]
    run_cli("train", *common, "--output_dir", str(tmp_path / "one"))
    entry = _cache_entry(data)
    arrow = next((entry / "dataset").glob("*.arrow"))
    new, old = _cut(arrow)
    proc = run_cli("train", *common, "--output_dir", str(tmp_path / "two"))
    assert (f"note: prepared cache {entry} was damaged (dataset/{arrow.name}: size {new:,}, expected {old:,}); "
            "rebuilding") in proc.stdout
    assert "Traceback" not in proc.stderr and damage(entry) is None and arrow.stat().st_size == old
    assert not list(entry.parent.glob(".*.tmp"))  # the damaged copy is gone

    # same size, other bytes: the digest finds it (a flipped block)
    with open(arrow, "r+b") as fh:
        fh.seek(old // 2)
        byte = fh.read(1)
        fh.seek(old // 2)
        fh.write(bytes([byte[0] ^ 0xFF]))
    assert damage(entry).startswith(f"dataset/{arrow.name}: its bytes changed (digest xxh3_128:")
    # a set written before the record: every Arrow file must still read to its end
    manifest = json.loads((entry / "manifest.json").read_text())
    (entry / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "files"}))
    _cut(arrow)
    assert damage(entry).startswith(f"dataset/{arrow.name}: cannot be read as Arrow (")

    # a prepared folder given to train is the user's: one line naming the file and the fix, exit 2
    prepared = tmp_path / "prepared"
    run_cli("prepare-data", "--data_path", str(data), "--max_length", "512", "--output_dir", str(prepared))
    arrow = next((prepared / "dataset").glob("*.arrow"))
    new, old = _cut(arrow)
    proc = run_cli("train", *ARGS, "--data_path", str(prepared), "--max_steps", "1", "--output_dir",
                   str(tmp_path / "three"), check=False)
    assert _one_error(proc) == (f"error: {arrow}: the prepared set is damaged (size {new:,}, expected {old:,}); "
                                f"run prepare-data again into {prepared} to rebuild it")
