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
The sets are built by the last --code's sftkit, each once (in --work).

    .venv/bin/python -m bench.setup_bench --code PATH/TO/BEFORE --code PATH/TO/AFTER \
        --rows 50 60000 1000000 --skip PATH/TO/BEFORE:1000000
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from bench.child import BIN, REPO, checkout_env, python, run


def base_set(work: Path, code: str) -> Path:
    """prepare-data's output for data/sample_alpaca.json, by `code`'s sftkit."""
    out = work / "set_50"
    if not (out / "manifest.json").is_file():
        run([str(BIN / "sftkit"), "prepare-data", "--data_path", str(REPO / "data/sample_alpaca.json"),
             "--output_dir", str(out)], env=checkout_env(code)).check("prepare-data")
    return out


def big_set(work: Path, code: str, rows: int) -> Path:
    """The set of `rows` rows, built by `code`'s sftkit in a child (`--build`)."""
    out = work / f"set_{rows}"
    if not (out / "manifest.json").is_file():
        run(python("bench.setup_bench", "--code", code, "--work", str(work), "--build", str(rows)), cwd=code,
            env=checkout_env(code)).check(f"building the {rows:,}-row set")
    return out


def build(work: Path, rows: int) -> None:
    """In the child: set_50's examples repeated to `rows` rows, saved as prepare-data saves them."""
    from sftkit.data.columns import pack
    from sftkit.data.prepare import DATASET_DIR, MANIFEST, _save_dataset, load_prepared
    from sftkit.digest import record

    base, out = work / "set_50", work / f"set_{rows}"
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


def time_train(data: Path, code: str) -> dict:
    out = Path(tempfile.mkdtemp(prefix="setup_bench_"))
    metrics, to_step = out / "run" / "metrics.jsonl", []

    def first_step(elapsed: float) -> None:
        if not to_step and metrics.is_file() and '"step"' in metrics.read_text():
            to_step.append(elapsed)

    cmd = [str(BIN / "sftkit"), "train", "--data_path", str(data), "--use_lora", "--max_steps", "1", "--save_steps",
           "0", "--output_dir", str(out / "run")]
    done = run(cmd, env=checkout_env(code), watch=first_step)
    first_step(done.wall_s)  # written in the last 50 ms
    shutil.rmtree(out, ignore_errors=True)
    done.check(f"{' '.join(cmd)} (PYTHONPATH={code})")
    return {"to_step": round(to_step[0], 2) if to_step else None, "to_exit": round(done.wall_s, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--code", action="append", required=True, help="a checkout for PYTHONPATH (repeatable)")
    ap.add_argument("--rows", type=int, nargs="+", default=[50, 60_000, 1_000_000])
    ap.add_argument("--skip", action="append", default=[], help="CODE:ROWS pairs not to run")
    ap.add_argument("--work", type=Path, default=Path("/tmp/sftkit_setup_bench"))
    ap.add_argument("--build", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    work = a.work.resolve()
    if a.build:
        build(work, a.build)
        return
    work.mkdir(parents=True, exist_ok=True)
    base = base_set(work, a.code[-1])
    results = []
    for rows in a.rows:
        t = time.perf_counter()
        data = base if rows == 50 else big_set(work, a.code[-1], rows)
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
