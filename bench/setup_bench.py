"""Train setup time at 50 / 60k / 1M rows (issue 23): seconds from `sftkit train` starting to its
first step, for the code under test (PYTHONPATH) on prepared sets of growing size.

How the sets are built: `sftkit prepare-data` runs once on data/sample_alpaca.json (50 real rows,
the real tokenizer and chat template). The bigger sets repeat those 50 examples' input_ids and
labels (row i is example i % 50) through the same `sftkit.data.prepare._save_dataset` that
prepare-data uses, next to a copy of its manifest.json with the row, token and kept counts scaled
and a fingerprint of its own. So the on-disk format is prepare-data's; only the content repeats.

Timed: `sftkit train --data_path SET --use_lora --max_steps 1 --save_steps 0 --output_dir TMP`
(the venv's console script; the default tiny-qwen3 model, CPU), with PYTHONPATH naming which
checkout's code runs. `to_step` is seconds from Popen to the first line with a "step" in
metrics.jsonl (polled every 0.05 s); `to_exit` is seconds to process end (adds the final save).

    PYTHONPATH=/work/wt23b python bench/setup_bench.py --code /work/main --code /work/wt23b \
        --rows 50 60000 1000000 --skip /work/main:1000000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SFTKIT = "/work/main/.venv/bin/sftkit"


def base_set(work: Path, code: str) -> Path:
    out = work / "set_50"
    if not (out / "manifest.json").is_file():
        env = {**os.environ, "PYTHONPATH": code}
        subprocess.run([SFTKIT, "prepare-data", "--data_path", str(REPO / "data/sample_alpaca.json"),
                        "--output_dir", str(out)], check=True, env=env, stdout=subprocess.DEVNULL)
    return out


def big_set(work: Path, base: Path, rows: int) -> Path:
    from sftkit.data.columns import pack
    from sftkit.data.prepare import DATASET_DIR, MANIFEST, _save_dataset, load_prepared
    from sftkit.digest import record

    out = work / f"set_{rows}"
    if (out / MANIFEST).is_file():
        return out
    ds = load_prepared(base)
    base_cols = pack(list(zip(ds["input_ids"], ds["labels"])))
    rep = [i % len(base_cols) for i in range(rows)]
    tmp = work / f"tmp_{rows}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _save_dataset(tmp / DATASET_DIR, base_cols.take(rep))  # row i is example i % 50
    m = json.loads((base / MANIFEST).read_text())
    scale = rows / m["examples_saved"]
    m.update(rows_in=rows, examples_kept=rows, examples_saved=rows, tokens=round(m["tokens"] * scale),
             supervised_tokens=round(m["supervised_tokens"] * scale),
             fingerprint=f"{m['fingerprint']}-x{rows}")
    if "files" in m:  # the sizes and digests train checks before each use (dataset.damage)
        m["files"] = record(tmp, DATASET_DIR)
    (tmp / MANIFEST).write_text(json.dumps(m, indent=2))
    tmp.rename(out)
    return out


def time_train(data: Path, code: str) -> dict:
    out = Path(tempfile.mkdtemp(prefix="setup_bench_"))
    env = {**os.environ, "PYTHONPATH": code, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [SFTKIT, "train", "--data_path", str(data), "--use_lora", "--max_steps", "1", "--save_steps", "0",
           "--output_dir", str(out / "run")]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    to_step = None
    metrics = out / "run" / "metrics.jsonl"
    while proc.poll() is None:
        if to_step is None and metrics.is_file() and '"step"' in metrics.read_text():
            to_step = time.perf_counter() - start
        time.sleep(0.05)
    to_exit = time.perf_counter() - start
    err = proc.stderr.read()
    if to_step is None and metrics.is_file() and '"step"' in metrics.read_text():
        to_step = to_exit  # written in the last 50 ms
    shutil.rmtree(out, ignore_errors=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} (PYTHONPATH={code}) failed:\n{err[-3000:]}")
    return {"to_step": round(to_step, 2) if to_step else None, "to_exit": round(to_exit, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--code", action="append", required=True, help="a checkout for PYTHONPATH (repeatable)")
    ap.add_argument("--rows", type=int, nargs="+", default=[50, 60_000, 1_000_000])
    ap.add_argument("--skip", action="append", default=[], help="CODE:ROWS pairs not to run")
    ap.add_argument("--work", default="/tmp/sftkit_setup_bench")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    base = base_set(work, a.code[-1])
    results = []
    for rows in a.rows:
        t = time.perf_counter()
        data = base if rows == 50 else big_set(work, base, rows)
        print(f"set {rows:,} rows ready ({time.perf_counter() - t:.1f} s)", flush=True)
        for code in a.code:
            if f"{code}:{rows}" in a.skip:
                continue
            r = {"rows": rows, "code": code, **time_train(data, code)}
            print(json.dumps(r), flush=True)
            results.append(r)
    (work / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
