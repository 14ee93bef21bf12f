"""Speed options change the speed, never the math: each is checked against the plain path on the
real tokenizer's renderings and the tiny Qwen3 (real 151,936-word vocabulary)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import ROOT, loss_and_grads

from sftkit.batching import collate
from sftkit.config import SFTConfig
from sftkit.loss import fused_head, token_loss_sum


@pytest.fixture(scope="module")
def examples(tok):
    """Nine sample conversations rendered by the real template: input_ids and assistant-only labels."""
    from sftkit.data.render import RenderOptions, render_batch, template_spec

    rows = json.loads((ROOT / "data" / "sample_alpaca.json").read_text())[:9]
    convs = [[{"role": "user", "content": r["instruction"] + ("\n" + r["input"] if r.get("input") else "")},
              {"role": "assistant", "content": r["output"]}] for r in rows]
    return [{"input_ids": i, "labels": lab} for i, lab in render_batch(convs, tok, template_spec(tok), RenderOptions())]


def tiny_model(lora: bool = False, **overrides):
    from sftkit.models import build_for_training

    lora_options = {"use_lora": True, "lora_dropout": 0.0} if lora else {}  # no dropout: deterministic grads
    return build_for_training(SFTConfig(**lora_options, **overrides))


def assert_grads_close(got: dict, want: dict, rel: float):
    """Each tensor within rel of its own largest entry (the initializer_range-0.5 model has sharp,
    ill-conditioned softmaxes, so elementwise rtol would test round-off, not the math)."""
    assert got.keys() == want.keys() and got
    for name, g in want.items():
        err = (got[name] - g).abs().max().item()
        assert err <= rel * g.abs().max().item() + 1e-12, f"{name}: {err} vs scale {g.abs().max().item()}"


def float64_loss_and_grads(model, batch):
    """The exact value both loss paths approximate: the plain path on a float64 copy of the model,
    cross-entropy in float64 too (token_loss_sum casts logits to fp32)."""
    exact = copy.deepcopy(model).double()
    out = exact(**batch.inputs, logits_to_keep=batch.keep, use_cache=False)
    loss = torch.nn.functional.cross_entropy(out.logits, batch.targets, reduction="sum")
    loss.backward()
    return loss.item(), {n: p.grad.float() for n, p in exact.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("lora", [False, True])
def test_fused_loss_equals_plain_fp32(examples, tok, packed, lora):
    """Loss and every trainable gradient (the tied embedding/lm_head included) of both paths match
    the float64 value, for chunks smaller than, equal to and larger than the supervised row count.

    Against float64, not against each other: the plain path's one [rows, vocab] fp32 matmul is
    1.4e-6 off on an AVX2 EPYC (and rounds differently on other CPUs), the fused one 5e-8."""
    rows = [examples[:3], examples[3:6], examples[6:]] if packed else [[e] for e in examples]
    batch = collate(rows, tok.pad_token_id, packed)
    model = tiny_model(lora)
    exact_loss, exact_grads = float64_loss_and_grads(model, batch)
    plain_loss, plain_grads = loss_and_grads(model, batch, None)
    assert plain_loss == pytest.approx(exact_loss, rel=1e-5)
    assert_grads_close(plain_grads, exact_grads, rel=1e-4)
    n = batch.targets.numel()
    for chunk in (7, n, 4096):
        head = fused_head(model, "no", zero3=False, chunk=chunk)
        assert head is not None
        loss, grads = loss_and_grads(model, batch, head)
        assert loss == pytest.approx(exact_loss, rel=1e-6), chunk
        assert_grads_close(grads, exact_grads, rel=1e-4)
    with torch.no_grad():  # the eval path: loss only
        assert token_loss_sum(model, batch, head).item() == pytest.approx(exact_loss, rel=1e-6)


@pytest.mark.parametrize("cuda", [False, True])
def test_fused_loss_equals_plain_bf16_autocast(examples, tok, cuda):
    """Under bf16 autocast both paths run the vocabulary matmuls in bf16: same loss to bf16 round-off.
    The fused path sums the lm_head gradient over chunks in fp32 (CPU) or, as a GPU gets it, in
    bf16 (cuda=True: only the dtype differs, so a CPU runs it); the plain one rounds it to bf16."""
    batch = collate([[e] for e in examples], tok.pad_token_id, False)
    model = tiny_model()
    plain_loss, plain_grads = loss_and_grads(model, batch, None, bf16=True)
    head = fused_head(model, "bf16", False, 64, cuda=cuda)
    assert head.grad_dtype == (torch.bfloat16 if cuda else torch.float32)
    loss, grads = loss_and_grads(model, batch, head, bf16=True)
    assert loss == pytest.approx(plain_loss, rel=1e-4)
    assert_grads_close(grads, plain_grads, rel=3e-2)


def test_low_precision_softmax_chunk_equals_fp32_steps():
    """The bf16 chunk (one max, one fused softmax, logsumexp from the top probability) against the
    fp32 steps on the same logits, including rows whose target probability underflows fp32
    (logit spread 300: exp(-300) is 0 in fp32) and a flat row."""
    from sftkit.loss import softmax_chunk, softmax_chunk_low_precision

    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(6, 5000, generator=gen) * 4).to(torch.bfloat16)
    logits[1, 7], logits[2] = 300.0, 0.0  # row 1: every other word at about exp(-300); row 2: uniform
    targets = torch.tensor([3, 8, 4999, 0, 17, 2500])
    want_loss, want_probs = softmax_chunk(logits.float(), targets)
    loss, probs = softmax_chunk_low_precision(logits, targets)
    assert want_loss.item() > 300 and probs.dtype == torch.float32
    assert loss.item() == pytest.approx(want_loss.item(), rel=1e-6)
    torch.testing.assert_close(probs, want_probs, rtol=1e-5, atol=1e-9)


def test_fused_loss_keeps_no_vocabulary_sized_activations(examples, tok):
    """What autograd keeps for the backward: the plain path holds [supervised rows x 151,936]
    logits; the fused path nothing larger than the lm_head weight itself (its gradient)."""
    batch = collate([[e] for e in examples], tok.pad_token_id, False)
    model = tiny_model()
    vocab, hidden = model.config.vocab_size, model.config.hidden_size
    n = batch.targets.numel()
    assert n > hidden  # otherwise the two bounds below would not differ

    def largest_saved(head):
        sizes = []

        def pack(t):
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = token_loss_sum(model, batch, head)
        loss.backward()
        return max(sizes)

    assert largest_saved(None) >= n * vocab
    assert largest_saved(fused_head(model, "no", False, 64)) <= vocab * hidden


def test_fused_head_only_where_exact():
    model = tiny_model()
    assert fused_head(model, "no", False, 1024) is not None
    assert fused_head(model, "no", True, 1024) is None       # ZeRO-3: a partitioned weight
    assert fused_head(model, "fp16", False, 1024) is None    # gradients before loss scaling
    assert fused_head(model, "no", False, 0) is None         # loss_chunk_size 0: the plain path
    assert SFTConfig(loss_chunk_size=64).loss_chunk(cuda=True, vocab_size=248_320) == 64
    wrapped = tiny_model(lora=True, modules_to_save=["lm_head"])
    assert fused_head(wrapped, "no", False, 1024) is None    # lm_head replaced by PEFT
    lora = tiny_model(lora=True)
    assert fused_head(lora, "no", False, 1024) is not None   # adapter elsewhere, plain lm_head


def test_padding_free_rows_equal_packed_rows(examples, tok):
    """All packed rows in one row (what flash-attention runs without padding) changes nothing."""
    rows = [examples[:4], examples[4:]]
    rowed = collate(rows, tok.pad_token_id, True)
    flat = collate(rows, tok.pad_token_id, True, padding_free=True)
    assert flat.inputs["input_ids"].shape[0] == 1 and flat.slots == flat.tokens < rowed.slots
    model = tiny_model()
    head = fused_head(model, "no", False, 1024)
    loss_a, grads_a = loss_and_grads(model, rowed, head)
    loss_b, grads_b = loss_and_grads(model, flat, head)
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    assert_grads_close(grads_b, grads_a, rel=1e-4)


def test_selective_gradient_checkpointing_same_gradients(examples, tok):
    from sftkit.models import decoder_layers

    batch = collate([[e] for e in examples[:4]], tok.pad_token_id, False)
    results = []
    for gc, every in ((False, 1), (True, 1), (True, 2)):
        model = tiny_model(gradient_checkpointing=gc, checkpoint_every_n_layers=every)
        model.train()
        flags = [layer.gradient_checkpointing for layer in decoder_layers(model)]
        assert flags == ([False, False] if not gc else [True, True] if every == 1 else [True, False])
        results.append(loss_and_grads(model, batch, None))
    for loss, grads in results[1:]:
        assert loss == results[0][0]
        assert_grads_close(grads, results[0][1], rel=1e-6)


def test_fused_adamw_equals_foreach():
    torch.manual_seed(0)
    base = [torch.nn.Parameter(torch.randn(300, 70)), torch.nn.Parameter(torch.randn(70))]
    runs = []
    for fused in (True, False):
        params = copy.deepcopy(base)
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, fused=fused or None, foreach=None if fused else True)
        gen = torch.Generator().manual_seed(1)
        for _ in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        runs.append(params)
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_flops_formula_matches_flop_counter(examples, tok):
    """Our model-FLOPs formula against torch's FlopCounterMode on a real forward and backward of a
    full fine-tune. Eager attention computes the full s x s score matrix, which the counter counts,
    so the formula is evaluated with every (query, key) pair instead of the causal half."""
    from torch.utils.flop_counter import FlopCounterMode

    from sftkit.arch.flops import flops_per_step_fn

    batch = collate([[e] for e in examples[:3]], tok.pad_token_id, False)
    model = tiny_model(attn_implementation="eager")
    # the plain path: the fused one runs the same matmuls, but one as an in-place addmm_, which the
    # counter does not see
    with FlopCounterMode(display=False) as counter:
        token_loss_sum(model, batch, None).backward()
    rows, width = batch.inputs["input_ids"].shape
    full_pairs = rows * width * width  # eager attention also scores the padding
    want = flops_per_step_fn(model.config, lora=False)(rows * width, batch.targets.numel(), 2 * full_pairs)
    assert counter.get_total_flops() == pytest.approx(want, rel=0.01)
