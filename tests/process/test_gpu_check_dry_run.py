"""bench/gpu_check.sh, the one call a lent GPU machine runs, stays runnable: here, without CUDA, its
dry run (a tiny stand-in of each architecture, 2 steps a run) must go through every part and write
both summary files with a row per system, the start record's paths included. (Its time budget and
model presets: tests/test_gpu_check.py.)"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from conftest import RANK_MODULE, ROOT, rank_env

from bench import gpu_check, models


def test_gpu_check_dry_run_writes_the_summary(tmp_path):
    # the check's child processes are forked from the warm server (their start-up is not what is checked)
    env = rank_env({**os.environ, "PYTHON": sys.executable, "BENCH_PYTHON": f"{sys.executable} -m {RANK_MODULE} --module"})
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env['PYTHONPATH']}"
    env.pop("SFTKIT_CACHE", None)  # the check keeps its own cache, a temporary folder it removes
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), str(tmp_path / "out")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=400, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    md = (tmp_path / "out" / "summary.md").read_text()
    assert summary["cuda"] is False and "skipped" in summary["pytest"]  # the GPU tests are collected, not run
    # every part ran: none skipped for time, none failed
    assert [p["part"] for p in summary["parts"]] == [p.name for p in gpu_check.PARTS]
    assert all(p["took_s"] is not None and not p["status"].startswith("skipped") for p in summary["parts"]), \
        summary["parts"]
    benches = [p for p in gpu_check.PARTS if isinstance(p, gpu_check.Bench)]
    assert [(r["run"], r["system"]) for r in summary["rows"]] == [(p.name, s) for p in benches
                                                                  for s in p.systems.split(",")]
    assert "| fused_loss | linear_attention | attention | experts | trainable | status |" in md
    for r, part in zip(summary["rows"], (p for p in benches for _ in p.systems.split(","))):
        assert f"| {r['run']} | {r['system']} | {part.dry_run[0]} | {part.method} |" in md
        if r["system"] != "sftkit":  # only what this machine cannot run: trl absent, Liger without a GPU
            assert r["status"].startswith(("not installed", "not run")), r
            continue
        assert r["status"] == "ok", r
        for key in ("sup_tok_s", "tok_s", "peak_gb", "first_loss"):
            assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, r
        assert r["fused_loss"] is True and r["attention"] == "sdpa" and r["mfu"] is None, r  # no GPU peak: no MFU
        # Gated DeltaNet layers of a packed row on a CPU run their per-example loop; other models have none
        assert r["linear_attention"] == ("loop" if part.dry_run[0] == "tiny-qwen3.5" else None), r
        assert r["loss_chunk_rows"] == (256 if part.dry_run[0] == "tiny-qwen3.5" else 512), r  # 0.3 GiB of fp32 logits
        assert r["trainable_params"] < r["total_params"] if part.lora else r["trainable_params"] == r["total_params"]
    moe = next(r for r in summary["rows"] if r["model"] == "tiny-moe")
    assert moe["trainable_params"] > attention_lora_params("tiny-moe"), "default LoRA left the routed experts frozen"
    assert moe["experts"] in ("grouped_mm", "batched_mm", "eager")
    assert all(r.get("experts") is None for r in summary["rows"] if r is not moe)


def attention_lora_params(preset: str) -> int:
    """What sftkit's default LoRA would train on q, k, v and o alone."""
    from sftkit.config import SFTConfig

    c = models.preset_config(preset)
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    per_layer = (c.hidden_size + q) + 2 * (c.hidden_size + kv) + (q + c.hidden_size)
    return SFTConfig().lora_r * per_layer * c.num_hidden_layers
