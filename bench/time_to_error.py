"""Time from `sftkit ...` to its one-line error, for mistakes that need no model (issue 25: a
missing data file took 19-22 s, a missing --data_path 21-33 s; target under 3 s).

    .venv/bin/python -m bench.time_to_error [--repeat 3]

Each case runs as a fresh process (the way a user meets it), HF_HUB_OFFLINE=1; prints the median
and the worst wall time, the exit code and the error line. Timings depend on the machine's load:
say what else ran.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from bench.child import BIN, REPO, offline_env, run

DATA = str(REPO / "data" / "demo_alpaca.json")


def cases(tmp: Path) -> dict[str, list[str]]:
    (tmp / "a_file").write_text("")
    return {
        "flag typo (reference)": ["train", "--data_pth", DATA],
        "train: missing data file": ["train", "--data_path", "mydata/nope.jsonl", "--output_dir", str(tmp / "o")],
        "train: no --data_path": ["train", "--output_dir", str(tmp / "o")],
        "train: missing eval file": ["train", "--data_path", DATA, "--eval_data_path", "nope/eval.jsonl",
                                     "--output_dir", str(tmp / "o")],
        "train: output folder under a file": ["train", "--data_path", DATA, "--output_dir", str(tmp / "a_file" / "o")],
        "eval: no --data_path": ["eval", "--model", str(tmp)],
        "eval: missing data file": ["eval", "--model", str(tmp), "--data_path", "nope.jsonl"],
        "eval: output folder over its data": ["eval", "--model", "tiny-qwen3", "--data_path", DATA,
                                              "--output_dir", str(Path(DATA).parent)],
        "prepare-data: missing data file": ["prepare-data", "--data_path", "nope.jsonl", "--output_dir", str(tmp / "p")],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    print("| case | median s | worst s | exit | error line |\n|---|---:|---:|---:|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, argv in cases(Path(tmp)).items():
            runs = [run([str(BIN / "sftkit"), *argv], env=offline_env()) for _ in range(args.repeat)]
            times, last = [r.wall_s for r in runs], runs[-1]
            lines = last.stderr.strip().splitlines() or [""]
            line = next((x for x in lines if "No such option" in x), next((x for x in lines if "error:" in x), lines[-1]))
            line = line.strip("│ ")[:110].replace(tmp, "TMP")
            print(f"| {name} | {statistics.median(times):.2f} | {max(times):.2f} | {last.code} | `{line}` |")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
