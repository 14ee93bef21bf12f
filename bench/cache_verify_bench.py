"""Cache-verify bench: what checking a prepared set before each use costs (issue 23, build 5).

Writes a prepared set of ROWS examples in prepare's layout (input_ids, labels, length as int32
columns saved by `datasets.save_to_disk`, as `prepare._save_dataset` does; built from numpy here,
since 51M Python ints would take GBs), random ids, lengths drawn from 64 to 2*MEAN-64 tokens;
records it (`digest.record`, as prepare does inside its temporary folder), then times
`dataset.damage`, the check `train` and `eval` run before using a set: sizes, then every file's
xxh3-128. The files are read from the page cache (just written), so this is the hash's cost, not a
cold disk's. Also timed: the Arrow read that checks a set written before the record.

    .venv/bin/python -m bench.cache_verify_bench --rows 200000 --mean 256
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from sftkit import digest
from sftkit.data import dataset, prepare


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--mean", type=int, default=256, help="mean tokens per example")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="cache_verify_bench-"))
    try:
        start = time.perf_counter()
        _save(root / prepare.DATASET_DIR, args.rows, args.mean)
        saved_s = time.perf_counter() - start
        start = time.perf_counter()
        files = digest.record(root, prepare.DATASET_DIR)
        record_s = time.perf_counter() - start
        (root / prepare.MANIFEST).write_text(json.dumps({"files": files}))
        size = sum(f["size"] for f in files.values())
        checks = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            assert dataset.damage(root) is None
            checks.append(time.perf_counter() - start)
        (root / prepare.MANIFEST).write_text("{}")  # a set written before the record
        start = time.perf_counter()
        assert dataset.damage(root) is None
        arrow_s = time.perf_counter() - start
        check = min(checks)
        print(json.dumps({"rows": args.rows, "bytes": size, "files": len(files), "save_s": round(saved_s, 2),
                          "record_s": round(record_s, 3), "check_s_min": round(check, 3),
                          "check_s_all": [round(x, 3) for x in checks], "check_s_per_gb": round(check / size * 1e9, 3),
                          "unrecorded_arrow_read_s": round(arrow_s, 3)}))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _save(path: Path, rows: int, mean: int) -> None:
    import datasets
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng(0)
    lengths = rng.integers(64, 2 * mean - 64, rows, dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    ids = rng.integers(0, 151_000, int(offsets[-1]), dtype=np.int32)
    labels = np.where(rng.random(ids.size) < 0.5, -100, ids).astype(np.int32)
    table = pa.table({"input_ids": pa.ListArray.from_arrays(offsets, ids),
                      "labels": pa.ListArray.from_arrays(offsets, labels), "length": pa.array(lengths)})
    with prepare.quiet_datasets():
        datasets.Dataset(table).save_to_disk(str(path))


if __name__ == "__main__":
    main()
