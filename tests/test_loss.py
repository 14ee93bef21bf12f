"""The fused loss head on every family architecture, and the size of its chunks."""

from __future__ import annotations

import family
import pytest
import torch
from conftest import loss_and_grads

from sftkit.arch.table import ARCHS, arch_of
from sftkit.config import LOSS_CHUNK_BYTES, SFTConfig
from sftkit.loss import fused_head


@pytest.fixture(scope="module")
def batches(tok):
    """Three examples as padded rows, and packed in one padding-free row (the GPU layout)."""
    from sftkit.batching import collate

    texts = ("The experts route tokens.", "Two plus two is four, said the model.", "Gated DeltaNet keeps a state.")
    examples = [{"input_ids": ids, "labels": ids} for ids in (tok(t)["input_ids"] for t in texts)]
    return {"padded": collate([[e] for e in examples], tok.pad_token_id, packed=False),
            "packed": collate([examples], tok.pad_token_id, packed=True, padding_free=True)}


# the dense architectures of the table that are not in tests/family.py, built from their configs
DENSE = ("qwen2", "llama", "mistral")
SIZES = {"vocab_size": 151936, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}


def load(kind: str, family_model):
    from transformers import AutoConfig, AutoModelForCausalLM

    from sftkit.models import keep_linear_attention_apart, load_model

    if kind in DENSE:
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **SIZES)).train()
    model = load_model(str(family_model(kind))).train()
    keep_linear_attention_apart(model, packing=True)
    return model


@pytest.mark.parametrize("kind", family.KINDS + DENSE)
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_fused_loss_equals_plain_on_every_family_architecture(family_model, batches, kind, layout):
    """Every architecture of the table takes the fused head (for the model_type its causal-LM class
    reports: qwen3_5_text for a Qwen3.5 checkpoint), and the fused loss and every gradient equal the
    plain path's, packed rows included (Gated DeltaNet layers on their CPU path)."""
    model = load(kind, family_model)
    batch = batches[layout]
    head = fused_head(model, "no", zero3=False, chunk=8)  # several chunks, the last one short
    assert head is not None, model.config.model_type
    plain_loss, plain = loss_and_grads(model, batch, None)
    fused_loss, fused = loss_and_grads(model, batch, head)
    assert fused_loss == pytest.approx(plain_loss, rel=1e-5)
    assert plain.keys() == fused.keys() and len(plain) == sum(1 for _ in model.parameters())
    for name, want in plain.items():
        # the fused head sums the lm_head gradient over chunks in another order: ~1e-5 of the largest entry
        assert (fused[name] - want).abs().max() <= 1e-4 * want.abs().max(), name


def test_every_table_entry_is_checked_and_unknown_types_take_the_plain_path():
    """A model_type added to the table claims the fused head only once the test above covers it;
    a model_type the table does not know may scale or cap its logits, so it takes the plain path."""
    from transformers import AutoConfig

    checked = set(family.KINDS + DENSE) | {"qwen3_5_text", "qwen3_5_moe_text"}  # what the test above loads
    checked |= {"qwen3_vl", "qwen3_vl_text"}  # tests/test_images.py: fused against plain, on image rows
    assert {t for t, a in ARCHS.items() if a.fused_loss} <= checked
    assert not arch_of(AutoConfig.for_model("gemma2")).fused_loss


@pytest.mark.parametrize("cuda", [False, True])
@pytest.mark.parametrize("vocab", [151_936, 248_320, 32_000])
def test_default_chunk_keeps_its_logits_within_the_device_budget(cuda, vocab):
    """loss_chunk_size -1: the largest power of two whose fp32 logits fit the budget, so a larger
    vocabulary gets fewer rows; an explicit size is taken as it is."""
    rows = SFTConfig().loss_chunk(cuda, vocab)
    budget = LOSS_CHUNK_BYTES["cuda" if cuda else "cpu"]
    assert rows & (rows - 1) == 0
    assert rows * vocab * 4 <= budget < 2 * rows * vocab * 4
    assert SFTConfig(loss_chunk_size=300).loss_chunk(cuda, vocab) == 300
    assert SFTConfig(loss_chunk_size=0).loss_chunk(cuda, vocab) == 0
