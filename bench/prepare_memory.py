"""Peak memory of `sftkit prepare-data` against the number of rows (issue 23).

Writes N synthetic Alpaca rows (bench/synthetic.py `alpaca_row`: instruction 8-60 words, output
20-200 words, seed 0) as JSON Lines, runs the real CLI on them in a child process (default
--num_proc: auto), and reports the peak RSS of the largest single process (ru_maxrss of the child
and the workers it reaped), wall and CPU seconds. Offline, CPU only, the built-in tiny-qwen3 tokenizer.

    .venv/bin/python -m bench.prepare_memory --rows 20000 200000 --dir /tmp/prep_mem
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from bench import synthetic
from bench.child import BIN, offline_env, run


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
            synthetic.write(data, synthetic.rows(synthetic.alpaca_row, n))
        out = a.dir / f"out_{n}"
        shutil.rmtree(out, ignore_errors=True)
        done = run([str(BIN / "sftkit"), "prepare-data", "--data_path", str(data), "--output_dir", str(out)],
                   env=offline_env(SFTKIT_CACHE=str(a.dir / "cache"))).check(f"prepare-data on {data}")
        print(f"| {n:,} | {data.stat().st_size / 2**20:.1f} | {done.peak_rss_mb:,.0f} | {done.wall_s:.1f} "
              f"| {done.cpu_s:.1f} |", flush=True)


if __name__ == "__main__":
    main()
