"""bench/gpu_check.sh, the one call a lent GPU machine runs, stays runnable: here, without CUDA,
its dry run (a tiny stand-in of each architecture, 2 steps a run) must go through every part and
write both summary files with a row per system, the start record's paths included. Its time
budget, which only a GPU exercises, is checked as arithmetic; the model presets it builds from
config alone, on the meta device."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from conftest import ROOT

from bench import gpu_check, models


def test_gpu_check_dry_run_writes_the_summary(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
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


@pytest.mark.parametrize(("preset", "params"), [
    ("qwen3.5-2b", 1_881_825_088),  # the text model of Qwen3.5-2B (its vision tower is not built)
    (gpu_check.MOE, 622_331_904 + models.MOE_LAYERS * 623_120_640),  # embeddings + 12 of 48 layers
])
def test_presets_have_the_published_shapes(preset, params):
    import torch
    from transformers import AutoModelForCausalLM

    config = models.preset_config(preset)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == params
    if preset == "qwen3.5-2b":
        assert type(model).__name__ == "Qwen3_5ForCausalLM" and config.vocab_size == 248_320
        assert config.layer_types == (["linear_attention"] * 3 + ["full_attention"]) * 6
    else:  # Qwen3-30B-A3B's layer: 128 experts, 8 a token, 32 query and 4 key-value heads
        assert (config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size) == (128, 8, 768)
        assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (32, 4, 151_936)


def test_budget_fits_the_call():
    """The parts, in order of value, each start only if their budget fits before END_S; a running
    part may overrun by half on a GPU. The first four (the new rows and one dense Qwen3 row) fit
    even when the installs take 40 s."""
    assert gpu_check.part_timeout(100, 99, cuda=True) is None
    assert gpu_check.part_timeout(100, 400, cuda=True) == 150
    assert gpu_check.part_timeout(100, 120, cuda=True) == 120
    assert gpu_check.part_timeout(100, 400, cuda=False) == 400
    assert gpu_check.END_S + 15 + 10 <= gpu_check.CALL_S  # slack for a killed part, the summary, removing the cache
    first = gpu_check.PARTS[:4]
    assert [p.model for p in first] == ["qwen3.5-2b", gpu_check.MOE, "qwen3.5-2b", "qwen3-0.6b"]
    assert 40 + gpu_check.WARM_UP_S + sum(p.budget_s for p in first) <= gpu_check.END_S


def test_a_part_that_no_longer_fits_is_skipped_and_says_so(tmp_path):
    trl = gpu_check.PARTS[5]
    status, rows, ran = gpu_check.run_part(trl, tmp_path, cuda=True, left=trl.budget_s - 1)
    assert not ran and status == f"skipped: budget ({trl.budget_s - 1} s left, budget {trl.budget_s} s)"
    assert [(r["system"], r["status"], r["shape"]) for r in rows] == [
        ("trl_best", "skipped: budget", "2048 x 4"), ("trl_liger", "skipped: budget", "2048 x 4")]
    assert gpu_check.run_part(gpu_check.PARTS[4], tmp_path, cuda=True, left=10) == (
        "skipped: budget (10 s left, budget 80 s)", [], False)  # pytest -m gpu
    assert not list(tmp_path.iterdir())  # nothing was started
