"""Peak memory and time of `sftkit prepare-data` against the number of rows, and of `sftkit train`
up to its first step on the largest prepared set against a 50-row one.

Writes N synthetic Alpaca rows (bench/synthetic.py `alpaca_row`: instruction 8-60 words, output
20-200 words, seed 0) as JSON Lines, runs the real CLI on them in a child process (default
--num_proc: auto), and reports the peak RSS of the largest single process (ru_maxrss of the child
and the workers it reaped), wall and CPU seconds. With --train: `sftkit train --use_lora
--max_steps 1 --save_steps 0` on the prepared set of the most rows and on one of its first 50 rows,
its wall and peak RSS, and the seconds from its start to its first step's record in metrics.jsonl.
Offline, CPU only, the built-in tiny-qwen3 tokenizer and model.

    .venv/bin/python -m bench.prepare_memory --rows 20000 200000 1000000 --train --dir /tmp/prep_mem
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
    ap.add_argument("--train", action="store_true", help="then time train to its first step on the largest set")
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
    if a.train:
        train_to_first_step(a.dir, max(a.rows))


def train_to_first_step(folder: Path, rows: int) -> None:
    """train on the prepared set of `rows` rows and on one of its first 50 rows, to step 1."""
    small = folder / "alpaca_50.jsonl"
    with (folder / f"alpaca_{rows}.jsonl").open() as f, small.open("w") as out:
        out.writelines(line for _, line in zip(range(50), f))
    sets = {50: folder / "out_50", rows: folder / f"out_{rows}"}
    run([str(BIN / "sftkit"), "prepare-data", "--data_path", str(small), "--output_dir", str(sets[50])],
        env=offline_env(SFTKIT_CACHE=str(folder / "cache"))).check("prepare-data on 50 rows")
    print("\n| prepared rows | train wall s (to step 1, then exit) | start to step 1 s | peak RSS MB |\n|---:|---:|---:|---:|")
    for n, prepared in sets.items():
        out = folder / f"train_{n}"
        shutil.rmtree(out, ignore_errors=True)
        first: list[float] = []

        def watch(elapsed: float, metrics: Path = out / "metrics.jsonl", first: list = first) -> None:
            if not first and metrics.is_file() and '"loss"' in metrics.read_text():
                first.append(elapsed)

        done = run([str(BIN / "sftkit"), "train", "--data_path", str(prepared), "--output_dir", str(out), "--use_lora",
                    "--max_steps", "1", "--save_steps", "0", "--logging_steps", "1", "--max_length", "512"],
                   env=offline_env(SFTKIT_CACHE=str(folder / "cache")), watch=watch).check(f"train on {prepared}")
        print(f"| {n:,} | {done.wall_s:.1f} | {first[0] if first else float('nan'):.1f} | {done.peak_rss_mb:,.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
