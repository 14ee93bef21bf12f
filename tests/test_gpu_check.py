"""bench/gpu_check.sh, the one call a lent GPU machine runs: its time budget, which only a GPU
exercises, checked as arithmetic, and the model presets it builds, from config alone on the meta
device. (Its CPU dry run: tests/process/test_gpu_check_dry_run.py.)"""

from __future__ import annotations

import pytest

from bench import gpu_check, models


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
