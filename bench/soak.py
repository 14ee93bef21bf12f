"""Soak: a long run of the tiny model with checkpoints and evals every 100 steps; checks that
resident memory stays flat (growth under 5% from step 200 to the end).

    .venv/bin/python bench/soak.py --steps 2000 --out /tmp/soak
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--out", default="/tmp/soak")
    args = ap.parse_args()
    out = Path(args.out)
    cmd = [str(Path(sys.executable).parent / "sftkit"), "train", "--data_path", "data/sample_alpaca.json",
           "--eval_data_path", "data/sample_sharegpt.json", "--output_dir", str(out), "--use_lora",
           "--max_steps", str(args.steps), "--save_steps", str(args.every), "--eval_steps", str(args.every),
           "--save_total_limit", "2", "--logging_steps", "20", "--max_length", "512", "--learning_rate", "1e-3",
           "--per_device_train_batch_size", "4"]
    start = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.time() - start
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rss = [(r["step"], r["rss_mb"]) for r in rows if r.get("rss_mb") is not None]
    base = next(v for s, v in rss if s >= 200)
    final = rss[-1][1]
    peak = max(v for s, v in rss if s >= 200)
    print(f"{args.steps} steps, checkpoint + eval every {args.every}: {wall:.0f} s")
    print(f"RSS at step 200: {base:.1f} MB; at the end: {final:.1f} MB ({(final / base - 1) * 100:+.2f}%); "
          f"peak after 200: {peak:.1f} MB ({(peak / base - 1) * 100:+.2f}%)")
    print("checkpoints left:", sorted(p.name for p in out.glob("checkpoint-*")))
    print("target (< 5% growth):", "met" if final / base - 1 < 0.05 else "NOT met")


if __name__ == "__main__":
    main()
