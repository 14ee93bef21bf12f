"""Peak memory of `sftkit prepare-data` against the number of rows (issue 23).

Writes N synthetic Alpaca rows (instruction 8-60 words, output 20-200 words, seed 0) as JSON Lines,
runs the real CLI on them in a child process (default --num_proc: auto), and reports the peak RSS
of the largest single process (ru_maxrss of the child and the workers it reaped), wall and CPU
seconds. Offline, CPU only, the built-in tiny-qwen3 tokenizer.

    PYTHONPATH=. .venv/bin/python bench/prepare_memory.py --rows 20000 200000 --dir /tmp/prep_mem
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

WORDS = ("the a of to and in is it that for on with as was at by this be from or have an they which you one "
         "data model train loss token batch layer weight gradient learning rate step value function return "
         "python code error file system memory process thread network server client request response query "
         "answer question explain example simple because however therefore result number list").split()


def write_rows(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            row = {"instruction": " ".join(rng.choices(WORDS, k=rng.randint(8, 60))),
                   "input": "",
                   "output": " ".join(rng.choices(WORDS, k=rng.randint(20, 200)))}
            f.write(json.dumps(row) + "\n")


def measure(data: Path, out: Path) -> dict:
    """One prepare-data run in a child: its peak RSS (largest process), wall and CPU seconds."""
    shutil.rmtree(out, ignore_errors=True)
    sftkit = Path(sys.executable).parent / "sftkit"
    env = {**os.environ, "SFTKIT_CACHE": str(out.parent / "cache"), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen([str(sftkit), "prepare-data", "--data_path", str(data), "--output_dir", str(out)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"prepare-data failed on {data}: {proc.stderr.read()[-2000:]}")
    return {"peak_rss_mb": usage.ru_maxrss / 1024, "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[20_000, 200_000])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/prep_mem"))
    a = ap.parse_args()
    a.dir.mkdir(parents=True, exist_ok=True)
    print("| rows | JSONL MB | peak RSS MB (largest process) | wall s | CPU s |\n|---:|---:|---:|---:|---:|")
    for n in a.rows:
        data = a.dir / f"alpaca_{n}.jsonl"
        if not data.exists():
            write_rows(data, n)
        r = measure(data, a.dir / f"out_{n}")
        print(f"| {n:,} | {data.stat().st_size / 2**20:.1f} | {r['peak_rss_mb']:,.0f} | {r['wall_s']:.1f} "
              f"| {r['cpu_s']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
