"""Shared fixtures: the real vendored Qwen3 tokenizer, an isolated sftkit cache, CLI runners."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


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
            timeout: int = 600, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run `sftkit ARGS` (or `accelerate launch LAUNCH -m sftkit ARGS`) in a subprocess, in `cwd`."""
    if launch is None:
        cmd = [str(BIN / "sftkit"), *args]
    else:
        cmd = [str(BIN / "accelerate"), "launch", *launch, "-m", "sftkit", *args]
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                             f"stderr:\n{proc.stderr[-5000:]}")
    return proc


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
