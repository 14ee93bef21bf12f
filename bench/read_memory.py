"""Peak memory of reading one JSON Lines file (sources.read + formats, as prepare-data's reading
step does), per byte of the file: the factor sources.READ_MEMORY refuses a too-big file by.

    python bench/read_memory.py --mb 50 --dir /tmp
Each size runs in a fresh process; peak RSS (ru_maxrss) above the RSS after imports, / file bytes.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
from pathlib import Path


def write(path: Path, mb: int, kind: str) -> None:
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "tokens", "model", "reply", "a", "of", "the"]

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    with open(path, "w") as f:
        while f.tell() < mb * 1_000_000:
            if kind == "alpaca":
                row = {"instruction": text(rng.randint(5, 60)), "input": "", "output": text(rng.randint(8, 600))}
            else:
                row = {"messages": [{"role": "user", "content": text(rng.randint(5, 60))},
                                    {"role": "assistant", "content": text(rng.randint(8, 600))}]}
            f.write(json.dumps(row) + "\n")


def measure(path: str) -> None:
    from sftkit.data.options import DataOptions
    from sftkit.data.prepare import load_conversations, resolve_sources

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    opts = DataOptions(data_path=[path])
    loaded = load_conversations(resolve_sources(opts.data_path, opts), opts)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    size = Path(path).stat().st_size
    print(f"{Path(path).name}: {size / 1e6:.0f} MB, {len(loaded.convs)} rows, peak +{(peak - base) / 1e6:.0f} MB "
          f"= {(peak - base) / size:.2f} x the file")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, nargs="+", default=[50])
    ap.add_argument("--dir", default="/tmp")
    ap.add_argument("--measure")
    args = ap.parse_args()
    if args.measure:
        measure(args.measure)
        sys.exit()
    for mb in args.mb:
        for kind in ("alpaca", "messages"):
            path = Path(args.dir) / f"read_memory_{kind}_{mb}mb.jsonl"
            write(path, mb, kind)
            subprocess.run([sys.executable, __file__, "--measure", str(path)], check=True)
            path.unlink()
