"""Soak: a long run of the tiny model with checkpoints and evals every 100 steps; checks that
resident memory stays flat (growth under 5% from step 200 to the end). The run's output: OUT.log.

    .venv/bin/python -m bench.soak --steps 2000 --out /tmp/soak
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.child import BIN, offline_env, records, run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--out", type=Path, default=Path("/tmp/soak"))
    a = ap.parse_args()
    cmd = [str(BIN / "sftkit"), "train", "--data_path", "data/sample_alpaca.json",
           "--eval_data_path", "data/sample_sharegpt.json", "--output_dir", str(a.out), "--use_lora",
           "--max_steps", str(a.steps), "--save_steps", str(a.every), "--eval_steps", str(a.every),
           "--save_total_limit", "2", "--logging_steps", "20", "--max_length", "512", "--learning_rate", "1e-3",
           "--per_device_train_batch_size", "4"]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    done = run(cmd, env=offline_env(), log=a.out.with_name(f"{a.out.name}.log")).check("sftkit train")
    rss = [(r["step"], r["rss_mb"]) for r in records(a.out) if r.get("rss_mb") is not None]
    base = next(v for s, v in rss if s >= 200)
    final = rss[-1][1]
    peak = max(v for s, v in rss if s >= 200)
    print(f"{a.steps} steps, checkpoint + eval every {a.every}: {done.wall_s:.0f} s")
    print(f"RSS at step 200: {base:.1f} MB; at the end: {final:.1f} MB ({(final / base - 1) * 100:+.2f}%); "
          f"peak after 200: {peak:.1f} MB ({(peak / base - 1) * 100:+.2f}%)")
    print("checkpoints left:", sorted(p.name for p in a.out.glob("checkpoint-*")))
    print("target (< 5% growth):", "met" if final / base - 1 < 0.05 else "NOT met")


if __name__ == "__main__":
    main()
