"""Start-up time of the CLI (issue 24): seconds from `sftkit ...` to its first check of the data
(a missing file, a bad row), to `--help`, and to the end of a tiny prepare-data and a tiny
1-step train, for each checkout's code (PYTHONPATH), each case a fresh process as a user meets it.

    .venv/bin/python -m bench.startup_bench --code PATH/TO/BEFORE --code PATH/TO/AFTER [--repeat 5]

Wall seconds are the median of --repeat runs (after one untimed warm-up run that builds the
tiny-qwen3 model and the prepared-set cache); CPU seconds are user+sys of the child process (all
its threads and workers, from os.wait4), median too: on a shared, busy machine they move far less
than wall time. HF_HUB_OFFLINE=1; say what else ran.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from bench.child import BIN, REPO, Done, checkout_env, run

DATA = str(REPO / "data" / "sample_alpaca.json")  # 50 rows, as most CLI tests use
GOOD = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'


def cases(tmp: Path) -> dict[str, list[str]]:
    bad = tmp / "bad.jsonl"
    bad.write_text(GOOD + '{"messages": 5}\n')  # line 2 is bad
    return {
        "--help": ["--help"],
        "prepare-data: missing file": ["prepare-data", "--data_path", str(tmp / "nope.jsonl"), "--output_dir", "{out}"],
        "prepare-data: bad row (line 2)": ["prepare-data", "--data_path", str(bad), "--output_dir", "{out}"],
        "train: bad row (line 2)": ["train", "--data_path", str(bad), "--max_steps", "1", "--output_dir", "{out}"],
        "prepare-data: 50 rows, whole run": ["prepare-data", "--data_path", DATA, "--output_dir", "{out}"],
        "train: 50 rows, 1 step, whole run": ["train", "--data_path", DATA, "--max_steps", "1", "--save_steps", "0",
                                              "--output_dir", "{out}"],
    }


def run_once(argv: list[str], env: dict, tmp: Path) -> Done:
    """One run of `sftkit argv`, its {out} a new folder in tmp."""
    out = tmp / f"out_{len(os.listdir(tmp))}"
    return run([str(BIN / "sftkit"), *(a.replace("{out}", str(out)) for a in argv)], env=env)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--code", action="append", required=True, help="a checkout whose sftkit/ runs (PYTHONPATH)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", default="", help="run only the cases whose name holds this text")
    args = ap.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    print("| case | code | wall s (median) | wall s (min-max) | CPU s (median) | exit | last line |")
    print("|---|---|---:|---:|---:|---:|---|")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for name, argv in cases(tmp).items():
            if args.only not in name:
                continue
            for code in args.code:
                cache = tmp / f"cache_{abs(hash(code))}"
                env = checkout_env(code, SFTKIT_CACHE=str(cache))
                # run 0 warms the cache (tiny-qwen3, prepared sets)
                runs = [run_once(argv, env, tmp) for _ in range(args.repeat + 1)][1:]
                walls, cpus = [r.wall_s for r in runs], [r.cpu_s for r in runs]
                line = runs[-1].last_line()[:90].replace(tmp_name, "TMP")
                print(f"| {name} | {code} | {statistics.median(walls):.2f} | {min(walls):.2f}-{max(walls):.2f} | "
                      f"{statistics.median(cpus):.2f} | {runs[-1].code} | `{line}` |", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
