"""bench/gpu_check.sh, the one call a lent GPU machine runs, stays runnable: here, without CUDA,
its dry run (tiny model, 2 steps a system) must write both summary files with a row per system."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from conftest import ROOT


def test_gpu_check_dry_run_writes_the_summary(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
    env.pop("SFTKIT_CACHE", None)  # the check keeps its own cache, a temporary folder it removes
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), str(tmp_path / "out")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=400, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    md = (tmp_path / "out" / "summary.md").read_text()
    assert summary["cuda"] is False and "skipped" in summary["pytest"]  # the GPU tests are collected, not run
    assert len(summary["runs"]) == 2
    for run in summary["runs"]:
        assert [r["system"] for r in run["rows"]] == ["sftkit", "trl_best", "trl_liger"]
        for r in run["rows"]:
            assert f"| {run['run']} | {r['system']} |" in md
            if "error" in r:  # only what this machine cannot run: trl absent, Liger without a GPU
                assert r["system"] != "sftkit" and r["error"].startswith(("not installed", "not run"))
                continue
            for key in ("sup_tok_s", "tok_s", "peak_gb", "first_loss"):
                assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, (run["run"], r)
