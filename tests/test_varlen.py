"""Varlen attention (sftkit.arch.packed_attention) on a CPU: the reference kernel behind the same plumbing a GPU
runs (one padding-free row, cu_seqlens from collate, no mask) against the padded path, on the real
tokenizer's renderings and the tiny Qwen3 (GQA: 4 query heads, 2 key/value heads)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import loss_and_grads

from sftkit.batching import PackedStep, collate, pack
from sftkit.config import SFTConfig
from sftkit.data.render import IGNORE_INDEX
from sftkit.loss import fused_head, token_loss_sum
from sftkit.models import build_for_training


@pytest.fixture(scope="module")
def docs(tok):
    """Four rendered conversations and a length-1 document, in the order they are packed."""
    from sftkit.data.render import RenderOptions, render_batch, template_spec

    convs = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}]
             for q, a in (("hi", "hello there"), ("2+2?", "4"), ("name a colour", "blue, or green if you like"),
                          ("and a number", "seven"))]
    rendered = [{"input_ids": i, "labels": lab} for i, lab in render_batch(convs, tok, template_spec(tok), RenderOptions())]
    one = {"input_ids": [rendered[0]["input_ids"][0]], "labels": [IGNORE_INDEX]}
    return [rendered[0], one, rendered[1], rendered[2], rendered[3]]


def test_varlen_equals_padded_loss_and_every_gradient(docs, tok):
    """Packed into one padding-free row (two bins, a length-1 document among them) with varlen
    attention, against one padded row per document under sdpa: same loss, every gradient equal.
    (LoRA runs the same attention; tests/test_gpu.py trains a LoRA step through the GPU kernel.)"""
    varlen = build_for_training(SFTConfig(attn_implementation="varlen", packing=True))
    padded = build_for_training(SFTConfig(attn_implementation="sdpa"))
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from sftkit.arch.packed_attention import ATTENTION_NAME, varlen_attention_forward

    assert varlen.config._attn_implementation == ATTENTION_NAME
    assert ALL_ATTENTION_FUNCTIONS[ATTENTION_NAME] is varlen_attention_forward
    flat = collate([docs[:2], docs[2:]], tok.pad_token_id, True, padding_free=True)
    assert flat.inputs["input_ids"].shape == (1, sum(len(d["input_ids"]) for d in docs))
    assert flat.inputs["cu_seq_lens_q"].tolist()[:3] == [0, len(docs[0]["input_ids"]), len(docs[0]["input_ids"]) + 1]
    rows = collate([[d] for d in docs], tok.pad_token_id, False)
    # The plain loss path in float64, where the two attentions agree to 6e-16: in fp32 the padded
    # and the flat rows round differently (embedding gradient 2.9e-6 apart at scale 23.7, which no
    # elementwise tolerance both allows and keeps tight). Then the fused head in fp32, in chunks of
    # 16 rows, each gradient within 1e-5 of its tensor's largest entry (measured 3e-7).
    want_loss, want = loss_and_grads(copy.deepcopy(padded).double(), rows)
    loss, got = loss_and_grads(copy.deepcopy(varlen).double(), flat)
    assert loss == pytest.approx(want_loss, rel=1e-6)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-12, msg=name)
    want_loss, want = loss_and_grads(padded, rows, fused_head(padded, "no", False, 16))
    loss, got = loss_and_grads(varlen, flat, fused_head(varlen, "no", False, 16))
    assert loss == pytest.approx(want_loss, rel=1e-5)
    assert got.keys() == want.keys()
    for name in want:
        err = (got[name] - want[name]).abs().max().item()
        assert err <= 1e-5 * want[name].abs().max().item(), f"{name}: {err}"


def test_varlen_keeps_documents_apart(docs, tok):
    """Change every token of the first document: the logits of the others do not move, its own do.
    Both with the offsets collate passes and with offsets read off the restarting position_ids."""
    from transformers.masking_utils import create_causal_mask

    model = build_for_training(SFTConfig(attn_implementation="varlen", packing=True)).eval()
    flat = collate([docs], tok.pad_token_id, True, padding_free=True)
    embeds = model.get_input_embeddings()(flat.inputs["input_ids"])
    # what the attention is handed for a packed row: no mask at all (sdpa would get a 4-D block mask)
    assert create_causal_mask(config=model.config, inputs_embeds=embeds, attention_mask=None, cache=None,
                              position_ids=flat.inputs["position_ids"]) is None
    first = len(docs[0]["input_ids"])
    other = {**docs[0], "input_ids": [(t + 1000) % 150000 for t in docs[0]["input_ids"]]}
    for offsets in (True, False):
        logits = []
        for d in (docs[0], other):
            batch = collate([[d, *docs[1:]]], tok.pad_token_id, True, padding_free=True)
            inputs = batch.inputs if offsets else {k: batch.inputs[k] for k in ("input_ids", "position_ids")}
            with torch.no_grad():
                logits.append(model(**inputs, use_cache=False).logits[0])
        assert (logits[0][:first] - logits[1][:first]).abs().max() > 1e-2
        torch.testing.assert_close(logits[0][first:], logits[1][first:], rtol=0, atol=1e-6)


def test_varlen_eval_batches_and_step_hand_over(docs, tok):
    """A varlen model evaluating padded rows (attention mask, no packing) gives sdpa's loss; the
    offsets travel through a data worker's one-tensor hand-over (ints included) unchanged."""
    varlen = build_for_training(SFTConfig(attn_implementation="varlen", packing=True))
    sdpa = build_for_training(SFTConfig(attn_implementation="sdpa"))
    rows = collate([[d] for d in docs], tok.pad_token_id, False)
    with torch.no_grad():
        assert token_loss_sum(varlen, rows).item() == pytest.approx(token_loss_sum(sdpa, rows).item(), rel=1e-5)
    flat = collate([docs[:2], docs[2:]], tok.pad_token_id, True, padding_free=True)
    back = PackedStep(pack([flat]).buffer.clone(), pack([flat]).layout).unpack()[0]
    assert back.inputs.keys() == flat.inputs.keys()
    for k, v in flat.inputs.items():
        assert torch.equal(back.inputs[k], v) if torch.is_tensor(v) else back.inputs[k] == v
    assert back.inputs["cu_seq_lens_q"].dtype == torch.int32


def test_varlen_model_generates_as_sdpa_does(tok):
    """Left-padded batch generation with a cache (eval --num_samples on a varlen model): the same
    greedy tokens as sdpa, so pad queries stay finite and decoding sees its earlier keys."""
    varlen = build_for_training(SFTConfig(attn_implementation="varlen", packing=True)).eval()
    sdpa = build_for_training(SFTConfig(attn_implementation="sdpa")).eval()
    tok.padding_side = "left"
    try:
        enc = tok(["a short prompt", "a somewhat longer prompt with more words in it"], return_tensors="pt", padding=True)
    finally:
        tok.padding_side = "right"
    outs = [m.generate(**enc, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=tok.pad_token_id)
            for m in (varlen, sdpa)]
    assert torch.equal(outs[0], outs[1])


def test_attention_auto_and_its_checks():
    """auto is varlen only with packing on a GPU; varlen refuses what its kernels do not compute."""
    from transformers import Qwen3Config

    from sftkit.arch.packed_attention import check_model
    from sftkit.errors import ConfigError

    assert SFTConfig(packing=True).attention(cuda=True) == "varlen"
    assert SFTConfig(packing=True).attention(cuda=False) == "sdpa"
    assert SFTConfig().attention(cuda=True) == "sdpa"
    assert SFTConfig(packing=True).padding_free(cuda=True) and not SFTConfig(packing=True).padding_free(cuda=False)
    assert SFTConfig(packing=True, attn_implementation="sdpa").attention(cuda=True) == "sdpa"
    with pytest.raises(ConfigError, match="sliding-window"):
        check_model(Qwen3Config(use_sliding_window=True, sliding_window=64, max_window_layers=0, num_hidden_layers=2))
    with pytest.raises(ConfigError, match="dropout"):
        check_model(Qwen3Config(attention_dropout=0.1))
