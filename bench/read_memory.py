"""Peak memory of reading one JSON Lines file (sources.read + formats, as prepare-data's reading
step does), per byte of the file: the factor sources.READ_MEMORY refuses a too-big file by.

Each size and format (Alpaca rows, one-turn `messages` rows: bench/synthetic.py's `few_words_*`)
is read in a fresh process; its peak RSS (ru_maxrss) above the RSS after imports, / file bytes.

    .venv/bin/python -m bench.read_memory --mb 50 --dir /tmp
"""

from __future__ import annotations

import argparse
import resource
from pathlib import Path

from bench import synthetic
from bench.child import python, run

ROWS = {"alpaca": synthetic.few_words_alpaca, "messages": synthetic.few_words_messages}


def measure(path: Path) -> None:
    """In the child: read the file as prepare-data does, print the peak above the imports."""
    from sftkit.data.options import DataOptions
    from sftkit.data.prepare import load_conversations, resolve_sources

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    opts = DataOptions(data_path=[str(path)])
    loaded = load_conversations(resolve_sources(opts.data_path, opts), opts)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    size = path.stat().st_size
    print(f"{path.name}: {size / 1e6:.0f} MB, {len(loaded.convs)} rows, peak +{(peak - base) / 1e6:.0f} MB "
          f"= {(peak - base) / size:.2f} x the file")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, nargs="+", default=[50])
    ap.add_argument("--dir", type=Path, default=Path("/tmp"))
    ap.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.measure:
        measure(a.measure)
        return
    for mb in a.mb:
        for kind, make in ROWS.items():
            path = synthetic.write_mb(a.dir / f"read_memory_{kind}_{mb}mb.jsonl", mb, make)
            print(run(python("bench.read_memory", "--measure", str(path))).check("read_memory").stdout, end="")
            path.unlink()


if __name__ == "__main__":
    main()
