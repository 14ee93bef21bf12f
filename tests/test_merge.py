"""merge-lora's check in half precision: a right bf16 merge of LoRA, DoRA and rsLoRA (and an fp16
one) passes on a model whose logits are as large as a real Qwen3's; a wrong merge is still refused."""

from __future__ import annotations

import pytest
import torch

from sftkit.config import MergeOptions
from sftkit.errors import ConfigError
from sftkit.merge import PROBES, _probe_batch, merge_adapter
from sftkit.models import TINY, load_tokenizer, resolve_model_path

VARIANTS = {"lora": {}, "dora": {"use_dora": True}, "rslora": {"use_rslora": True}}


def adapter_of(kind: str, folder):
    """A random adapter on the built-in tiny model (logits near 20, as a real Qwen3's), its B not
    zero, so it moves the logits by a few units."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(TINY), dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False,
                        **VARIANTS[kind])
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.3)
    model.save_pretrained(folder)
    return folder


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits.float()


@pytest.mark.parametrize("kind", sorted(VARIANTS))
def test_half_precision_merges_pass_when_right(kind, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = adapter_of(kind, tmp_path / "adapter")
    batch = _probe_batch(load_tokenizer(resolve_model_path(TINY)))
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(TINY), dtype=torch.float32).eval()
    plain = logits(base, batch)
    truth = logits(PeftModel.from_pretrained(base, adapter).eval(), batch)  # base + adapter in float32
    effect = (truth - plain).abs().max().item()
    assert truth.abs().max().item() > 16 and effect > 1.5, (truth.abs().max().item(), effect)
    for dtype in ("bfloat16", "float16") if kind == "rslora" else ("bfloat16",):
        out = tmp_path / f"merged_{dtype}"
        report = merge_adapter(adapter, out, MergeOptions(dtype=dtype))
        assert report.dtype == dtype and report.max_logit_diff < 1e-3
        served = AutoModelForCausalLM.from_pretrained(out).eval()
        assert served.dtype == getattr(torch, dtype)
        off = (logits(served, batch) - truth).abs().max().item()
        # what the old flat 0.05 refused: half-precision round-off alone is larger, and still far
        # below what the adapter does to the logits
        assert off < effect / 3, (dtype, off, effect)
        if dtype == "bfloat16":
            assert off > 0.05, off


def test_a_wrong_half_precision_merge_is_refused(tmp_path, monkeypatch):
    """PEFT's merge made to add a tenth too much of each update: refused in one line, nothing written."""
    from peft.tuners.lora.layer import Linear

    adapter = adapter_of("lora", tmp_path / "adapter")
    right = Linear.get_delta_weight
    monkeypatch.setattr(Linear, "get_delta_weight", lambda self, name: 1.1 * right(self, name))
    with pytest.raises(ConfigError, match="the merged model's logits differ from base \\+ adapter by .* in float32"):
        merge_adapter(adapter, tmp_path / "merged", MergeOptions(dtype="bfloat16"))
    assert not (tmp_path / "merged").exists() and len(PROBES) == 4
