"""Shared fixtures: the real vendored Qwen3 tokenizer, an isolated sftkit cache, CLI runners."""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# The files that take longest, longest first (test-seconds of a --durations run on 9cf3859, both
# workers busy): training 1205, habits 1015, faults 810, round_two 807, performance 447,
# crash_safety 336, merge_eval 319, distributed 250, config_cli 222; every other file < 200.
# test_fsdp (added since): 123-153 s run alone, placed by that.
# `make test` hands whole files to 2 workers in collection order (--dist loadfile
# --no-loadscope-reorder): xdist's own order, by test count, put crash_safety (few tests, 336 s)
# last and left one worker alone for ~5 minutes at the end.
LONGEST_FIRST = ("test_training.py", "test_habits.py", "test_faults.py", "test_round_two.py", "test_performance.py",
                 "test_crash_safety.py", "test_merge_eval.py", "test_fsdp.py", "test_distributed.py", "test_config_cli.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Each test session builds its own tiny-qwen3 and data cache; nothing leaks from ~/.cache."""
    cache = tmp_path_factory.mktemp("sftkit_cache")
    old = {k: os.environ.get(k) for k in ("SFTKIT_CACHE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    os.environ.update(SFTKIT_CACHE=str(cache), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    yield cache
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def tok():
    from transformers import AutoTokenizer

    from sftkit.models import bundled_tokenizer_dir

    return AutoTokenizer.from_pretrained(bundled_tokenizer_dir())


def run_cli(*args: str, launch: list[str] | None = None, env: dict | None = None, check: bool = True,
            timeout: int = 600, cwd: Path = ROOT, fresh: bool = False) -> subprocess.CompletedProcess:
    """Run `sftkit ARGS` as a process of its own in `cwd`: forked from a warm server that has done
    the imports (tests/warm_cli.py), or with `fresh` the console script itself, for what a fresh
    interpreter does while importing. `launch`: `accelerate launch LAUNCH -m sftkit ARGS`, fresh."""
    if launch is not None:
        cmd = [str(BIN / "accelerate"), "launch", *launch, "-m", "sftkit", *args]
    else:
        cmd = [str(BIN / "sftkit"), *args]
    full_env = {**os.environ, **(env or {})}
    if fresh or launch is not None:
        proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout, check=False)
    else:
        proc = warm_server().run(cmd, full_env, cwd, timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                             f"stderr:\n{proc.stderr[-5000:]}")
    return proc


class WarmServer:
    """The client of tests/warm_cli.py: one server per test process, started on first use."""

    def __init__(self):
        self.log = tempfile.NamedTemporaryFile(prefix="warm_cli_", suffix=".log", delete=False)  # noqa: SIM115
        read, write = os.pipe()
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "warm_cli.py"), str(write)], cwd=ROOT,
                                     stdin=subprocess.PIPE, stdout=self.log, stderr=self.log, pass_fds=(write,),
                                     text=True)
        os.close(write)
        self.answers = os.fdopen(read)
        atexit.register(self.close)

    def run(self, cmd: list[str], env: dict, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
        with tempfile.TemporaryDirectory(prefix="warm_cli_") as tmp:
            out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
            # bytes (a non-UTF-8 name) as the child's sys.argv would hold them: decoded with surrogateescape
            args = [os.fsdecode(a) if isinstance(a, bytes) else str(a) for a in cmd[1:]]
            request = {"args": args, "env": env, "cwd": str(cwd), "stdout": str(out), "stderr": str(err),
                       "timeout": timeout}
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            line = self.answers.readline()
            if not line:
                raise RuntimeError(f"tests/warm_cli.py stopped: {Path(self.log.name).read_text()[-3000:]}")
            answer = json.loads(line)
            if answer.get("timeout"):
                raise subprocess.TimeoutExpired(cmd, timeout)
            return subprocess.CompletedProcess(cmd, answer["returncode"], out.read_text(errors="replace"),
                                               err.read_text(errors="replace"))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        os.unlink(self.log.name)


_SERVER: list[WarmServer] = []  # this test process's server, once started


def warm_server() -> WarmServer:
    if not _SERVER:
        _SERVER.append(WarmServer())
    return _SERVER[0]


def read_metrics(out_dir: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at `path` (created here) with these mount options (e.g. "size=18M"),
    unmounted afterwards; the test is skipped where mounting is not allowed."""
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=False).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)
