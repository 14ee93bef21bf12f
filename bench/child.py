"""Running a child process and reading what it cost: wall and CPU seconds, peak memory, its result.

    done = run([str(BIN / "sftkit"), "prepare-data", ...], env=offline_env())
    done.check("prepare-data")                          # SystemExit with its stderr unless exit 0
    done.wall_s, done.cpu_s, done.peak_rss_mb           # CPU and memory include the workers it reaped

A bench that measures inside a child of its own (a fresh process: its own imports, its own peak)
runs `python(module, ...)`; the child prints its record with `report(record)` and the parent reads
it back with `done.result()`. Training runs report their peak memory themselves: `records` reads
a run's metrics.jsonl, whose end record holds VmHWM of each rank. `clock()` times a block of this
process the same way.
"""

from __future__ import annotations

import json
import os
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
"""The environment's console scripts: sftkit, accelerate."""
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
RESULT = "BENCH_RESULT "
"""The prefix of the one line in which a child reports its record."""
_POLL_S = 0.05


def offline() -> None:
    """Nothing from the Hugging Face Hub, in this process and its children, unless the caller said so."""
    for name, value in OFFLINE.items():
        os.environ.setdefault(name, value)


def offline_env(**extra: str) -> dict:
    """os.environ for a child, offline unless the caller said otherwise, with `extra` on top."""
    return {**OFFLINE, **os.environ, **extra}


def checkout_env(code: str | Path | None, **extra: str) -> dict:
    """offline_env with PYTHONPATH naming the checkout whose sftkit a child imports (None: this one).
    Run a `python -m` child with cwd=code as well: -m puts the working directory first on sys.path.
    bench/ comes from that checkout where it is a package there, else from this one."""
    path = os.pathsep.join(dict.fromkeys([str(Path(code or REPO).resolve()), str(REPO)]))
    return offline_env(PYTHONPATH=path, **extra)


def python(module: str, *args: str) -> list[str]:
    """The command that runs `python -m module args` in this environment; where BENCH_PYTHON is set,
    that command stands for `python -m` (the tests' warm server: tests/warm_rank.py --module)."""
    prefix = os.environ.get("BENCH_PYTHON")
    return [*shlex.split(prefix), module, *args] if prefix else [sys.executable, "-m", module, *args]


@dataclass
class Done:
    """A finished child."""

    code: int | None
    """Its exit code (negative: the signal that ended it); None: killed at its timeout."""
    wall_s: float
    cpu_s: float
    """User and system seconds of the child and of every process it reaped (its workers)."""
    peak_rss_mb: float
    """ru_maxrss: the peak resident memory of the largest of those processes."""
    stdout: str
    stderr: str
    """Empty where it went to the log, with stdout."""

    def last_line(self) -> str:
        """The last line it wrote to stderr, else to stdout."""
        lines = self.stderr.strip().splitlines() or self.stdout.strip().splitlines() or [""]
        return lines[-1].strip()

    def result(self) -> dict | None:
        """The record it printed with `report`, or None."""
        found = [ln[len(RESULT):] for ln in self.stdout.splitlines() if ln.startswith(RESULT)]
        return json.loads(found[-1]) if found else None

    def check(self, what: str) -> Done:
        """Itself if it exited 0; else SystemExit naming `what`, with the end of its output."""
        if self.code != 0:
            raise SystemExit(f"{what} failed (exit {self.code}):\n{(self.stderr or self.stdout)[-3000:]}")
        return self


def run(cmd: list[str], *, cwd: Path | str = REPO, env: dict | None = None, log: Path | None = None,
        timeout: float | None = None, watch=None) -> Done:
    """Run `cmd` to its end and measure it. Its output goes to files (so a long one cannot block on
    a pipe), into `log` if given (stdout and stderr together, kept), else read back and removed.
    `timeout`: seconds, after which its whole process group is ended (a training child's GPU is
    freed too). `watch(elapsed_s)`: called every 0.05 s while it runs."""
    with tempfile.TemporaryDirectory(prefix="bench_child_") as tmp:
        out_path, err_path = Path(log or Path(tmp) / "stdout"), Path(tmp) / "stderr"
        with out_path.open("w") as out, err_path.open("w") as err:
            start = time.perf_counter()
            proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT if log else err,
                                    start_new_session=timeout is not None)
            status, usage = _wait(proc.pid, start, timeout, watch)
            wall = time.perf_counter() - start
        code = None if status is None else os.waitstatus_to_exitcode(status)
        proc.returncode = -signal.SIGKILL if code is None else code  # reaped here, not by Popen
        return Done(code=code, wall_s=wall, cpu_s=usage.ru_utime + usage.ru_stime if usage else 0.0,
                    peak_rss_mb=usage.ru_maxrss / 1024 if usage else 0.0,
                    stdout=out_path.read_text(errors="replace"), stderr=err_path.read_text(errors="replace"))


def _wait(pid: int, start: float, timeout: float | None, watch) -> tuple[int | None, object]:
    """(wait status, rusage) of the child; (None, None) where it was killed at `timeout`."""
    if timeout is None and watch is None:
        return os.wait4(pid, 0)[1:]
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            return status, usage
        elapsed = time.perf_counter() - start
        if watch:
            watch(elapsed)
        if timeout is not None and elapsed > timeout:
            _kill_group(pid)
            return None, None
        time.sleep(_POLL_S)


def _kill_group(pid: int) -> None:
    """SIGTERM to the child's process group, SIGKILL 5 s later if the child is still there, then
    10 s more for it to go: 15 s at most."""
    for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.perf_counter() + grace
        while time.perf_counter() < deadline:
            if os.wait4(pid, os.WNOHANG)[0]:
                return
            time.sleep(_POLL_S)


def report(record: dict) -> None:
    """Print this child's record for the parent (`Done.result`)."""
    print(RESULT + json.dumps(record), flush=True)


def records(run_dir: Path) -> list[dict]:
    """Every record of a training run's metrics.jsonl; the last, its end record, holds the peaks
    (peak_rss_mb: VmHWM; peak_rss_mb_per_rank) and the totals."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _now() -> tuple[float, float]:
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.perf_counter(), time.process_time() + kids.ru_utime + kids.ru_stime


def clock():
    """Start a clock on this process; calling the result gives (wall, cpu) seconds since. CPU counts
    the worker processes it has reaped too: on a shared machine the steadier measure of work."""
    start = _now()
    return lambda: tuple(b - a for a, b in zip(start, _now()))
