"""The sftkit cache through the CLI: raw data prepared once and reused, a damaged entry rebuilt with one
note (a damaged prepared folder of the user's is one error), four processes racing on each entry."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import LORA, ROOT, one_error, run_cli, start_python


def test_train_reads_raw_data_and_reuses_its_cache(tmp_path):
    import os

    cache = Path(os.environ["SFTKIT_CACHE"]) / "prepared"
    data = tmp_path / "raw.json"
    # bytes of its own (a trailing line): the cache is keyed by content, and other tests of this
    # session prepare sample_alpaca.json with these options
    data.write_text((Path("data") / "sample_alpaca.json").resolve().read_text() + "\n")
    args = ["train", "--data_path", str(data), "--max_steps", "1", "--save_steps", "0", "--use_lora",
            "--max_length", "512"]
    before = set(cache.iterdir()) if cache.exists() else set()
    run_cli(*args, "--output_dir", str(tmp_path / "a"))
    after_first = set(cache.iterdir())
    run_cli(*args, "--output_dir", str(tmp_path / "b"))
    assert len(after_first - before) == 1 and set(cache.iterdir()) == after_first


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
    common = [*LORA, "--save_steps", "2", "--data_path", str(data), "--max_steps", "1"]
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
    proc = run_cli("train", *LORA, "--save_steps", "2", "--data_path", str(prepared), "--max_steps", "1",
                   "--output_dir", str(tmp_path / "three"), check=False)
    assert one_error(proc) == (f"error: {arrow}: the prepared set is damaged (size {new:,}, expected {old:,}); "
                                f"run prepare-data again into {prepared} to rebuild it")


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
    procs = [start_python(RACE, env={"SFTKIT_CACHE": str(tmp_path / "cache")}) for _ in range(4)]
    results = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in results]
    paths = {out.strip().splitlines()[-1] for out, _ in results}
    assert len(paths) == 1
    model, prepared = json.loads(paths.pop())
    assert not list((tmp_path / "cache").rglob("*.tmp"))
    from sftkit.data.prepare import load_prepared

    assert len(load_prepared(prepared)) == 50 and (ROOT / model).joinpath("model.safetensors").is_file()
