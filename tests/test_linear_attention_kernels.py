"""Which computation runs the Gated DeltaNet layers (sftkit/arch/packed_linear_attention.py), and
what sftkit's kernel path hands flash-linear-attention. fla's Triton kernels need a GPU, so here
the kernel path runs with pure-torch stand-ins of its two functions that keep the same contract
(a varlen causal convolution on [B, T, D], transformers' chunked delta rule per segment): it must
give the per-example loop's loss and gradients over a packed row, and the layer's own forward's
over padded rows. Tiny random-init models of the three hybrid generations from tests/family.py."""

from __future__ import annotations

import contextlib
import functools
import itertools

import family
import pytest
import torch
import torch.nn.functional as F
from conftest import loss_and_grads
from test_hybrid import assert_same_gradients

from sftkit.arch.packed_linear_attention import (
    FLA,
    LOOP,
    TORCH,
    Kernels,
    fla_kernels,
    is_gated_delta_net,
    kernel_forward,
    kernel_warning,
    linear_attention_path,
    linear_attention_path_of,
)
from sftkit.batching import collate
from sftkit.config import SFTConfig
from sftkit.models import build_for_training

HYBRIDS = ("qwen3_next", "qwen3_5", "qwen3_5_moe")
PAD = 151643
# 70 crosses the delta rule's 64-token chunk; 1 and 3 are shorter than the convolution's kernel (4)
LENGTHS = (70, 1, 26, 3)

# (cuda, fla installed, packed, rows) -> path, without a cache
PATHS = {
    (True, True, True, 1): FLA, (True, True, True, 3): LOOP,
    (True, False, True, 1): LOOP, (True, False, True, 3): LOOP,
    (False, True, True, 1): LOOP, (False, True, True, 3): LOOP,
    (False, False, True, 1): LOOP, (False, False, True, 3): LOOP,
    (True, True, False, 1): FLA, (True, True, False, 3): FLA,
    (True, False, False, 1): TORCH, (True, False, False, 3): TORCH,
    (False, True, False, 1): TORCH, (False, True, False, 3): TORCH,
    (False, False, False, 1): TORCH, (False, False, False, 3): TORCH,
}


@pytest.mark.parametrize(("cuda", "fla", "packed", "rows"), list(PATHS))
def test_dispatch_table(cuda, fla, packed, rows):
    """Kernels on CUDA with fla only, and for packed rows only in one row (their boundaries go to
    one sequence); a cache (generation) always takes the layer's own forward, and refuses packing."""
    assert linear_attention_path(cuda, fla, packed, rows, cache=False) == PATHS[cuda, fla, packed, rows]
    if packed:
        with pytest.raises(ValueError, match="no cache"):
            linear_attention_path(cuda, fla, packed, rows, cache=True)
    else:
        assert linear_attention_path(cuda, fla, packed, rows, cache=True) == TORCH


class StandIns:
    """fla's causal_conv1d and chunk_gated_delta_rule in plain torch, recording their arguments:
    each sequence of `cu_seqlens` (else each row) starts from a zero state."""

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []

    def kernels(self) -> Kernels:
        return Kernels(self.conv, self.rule)

    def conv(self, x, weight, bias=None, activation=None, cu_seqlens=None):
        self.calls.append(("conv", {"x": x.shape, "weight": weight.shape, "activation": activation,
                                    "cu_seqlens": cu_seqlens}))
        width = weight.shape[1]

        def causal(seg):  # [B, t, D] -> [B, t, D], depthwise
            y = F.conv1d(seg.transpose(1, 2), weight[:, None], bias, padding=width - 1, groups=weight.shape[0])
            return F.silu(y[..., :seg.shape[1]]).transpose(1, 2)

        return torch.cat([causal(x[:, s:e]) for s, e in spans(x, cu_seqlens)], dim=1), None

    def rule(self, q, k, v, g, beta, use_qk_l2norm_in_kernel=False, cu_seqlens=None):
        from transformers.models.qwen3_5.modeling_qwen3_5 import torch_chunk_gated_delta_rule

        self.calls.append(("rule", {"q": q.shape, "v": v.shape,
                                    "use_qk_l2norm_in_kernel": use_qk_l2norm_in_kernel, "cu_seqlens": cu_seqlens}))
        outs = [torch_chunk_gated_delta_rule(q[:, s:e], k[:, s:e], v[:, s:e], g=g[:, s:e], beta=beta[:, s:e],
                                             use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)[0]
                for s, e in spans(q, cu_seqlens)]
        return torch.cat(outs, dim=1), None


def spans(x, cu) -> list[tuple[int, int]]:
    return list(itertools.pairwise(cu.tolist())) if cu is not None else [(0, x.shape[1])]


@contextlib.contextmanager
def forwards(model, make):
    """Every Gated DeltaNet layer's forward is `make(layer)` inside; sftkit's installed one after."""
    installed = {layer: layer.forward for layer in layers(model)}
    for layer in installed:
        layer.forward = make(layer)
    try:
        yield
    finally:
        for layer, forward in installed.items():
            layer.forward = forward


def kernel_path(kernels: Kernels):
    """sftkit's kernel path with these kernels, as the installed forward takes it on CUDA with fla."""
    return lambda layer: functools.partial(kernel_forward, layer, kernels)


def own(layer):
    """transformers' forward of the layer."""
    return functools.partial(type(layer).forward, layer)


def layers(model) -> list:
    found = [m for m in model.modules() if is_gated_delta_net(m)]
    assert found
    return found


@pytest.fixture(scope="module")
def paths(family_model) -> dict:
    """kind -> a tiny model's directory."""
    return {kind: family_model(kind) for kind in HYBRIDS}


@pytest.fixture(scope="module")
def hybrid(paths):
    """(kind -> the model in float64 as it trains packed: on this CPU, the per-example loop;
    four examples of LENGTHS tokens)."""
    g = torch.Generator().manual_seed(0)
    docs = [{"input_ids": torch.randint(0, 1000, (n,), generator=g).tolist(),
             "labels": torch.randint(0, 1000, (n,), generator=g).tolist()} for n in LENGTHS]
    models = {}
    for kind, path in paths.items():
        model = build_for_training(SFTConfig(model_name_or_path=str(path), packing=True)).double()
        if getattr(model.config.get_text_config(), "num_experts", None):
            model.set_experts_implementation("eager")  # torch's grouped_mm takes no float64
        models[kind] = model
    return models, docs


@pytest.mark.parametrize("kind", HYBRIDS)
def test_kernel_path_keeps_packed_examples_apart(hybrid, kind):
    """A padding-free row of 4 examples: the kernel path (stand-ins) gives the loss and every
    gradient of the per-example loop, and hands both kernels the row's boundaries as a LongTensor,
    the convolution [B, T, D], the rule q/k L2-normalised in the kernel."""
    models, docs = hybrid
    model = models[kind]
    batch = collate([docs], PAD, True, padding_free=True)
    want_loss, want = loss_and_grads(model, [batch])  # the installed forward on a CPU: the loop
    stand_ins = StandIns()
    with forwards(model, kernel_path(stand_ins.kernels())):
        loss, got = loss_and_grads(model, [batch])
    assert loss == pytest.approx(want_loss, rel=1e-9)
    assert_same_gradients(got, want, "kernel path")
    cu = batch.inputs["cu_seq_lens_q"]
    tokens, conv_dim = sum(LENGTHS), layers(model)[0].conv1d.weight.shape[0]
    assert [name for name, _ in stand_ins.calls] == ["conv", "rule"] * 3  # 3 Gated DeltaNet layers
    for name, args in stand_ins.calls:
        assert args["cu_seqlens"].dtype == torch.long and args["cu_seqlens"].tolist() == cu.tolist()
        if name == "conv":
            assert args["x"] == (1, tokens, conv_dim) and args["weight"] == (conv_dim, 4)
            assert args["activation"] == "silu"
        else:
            assert args["use_qk_l2norm_in_kernel"] is True
            assert args["q"][:2] == (1, tokens) and args["v"][:2] == (1, tokens)


@pytest.mark.parametrize("kind", HYBRIDS)
def test_kernel_path_on_padded_rows_is_the_layers_own(hybrid, kind):
    """Unpacked right-padded rows: the kernel path (no boundaries) gives transformers' forward's loss
    and gradients; padding is zeroed before the convolution, as transformers does."""
    models, docs = hybrid
    model = models[kind]
    batch = collate([[d] for d in docs], PAD, False)
    assert not batch.inputs["attention_mask"].all()
    with forwards(model, own):
        want_loss, want = loss_and_grads(model, [batch])
    stand_ins = StandIns()
    with forwards(model, kernel_path(stand_ins.kernels())):
        loss, got = loss_and_grads(model, [batch])
    assert loss == pytest.approx(want_loss, rel=1e-9)
    assert_same_gradients(got, want, "kernel path, padded rows")
    assert all(args["cu_seqlens"] is None for _, args in stand_ins.calls)
    assert {args["x"][0] for name, args in stand_ins.calls if name == "conv"} == {len(docs)}


def test_kernel_path_refuses_what_it_cannot_keep_apart(hybrid):
    """Boundaries over several rows, a padding mask beside them, or a cache: the kernel path
    refuses rather than mixing examples (the dispatch never sends them there)."""
    models, _ = hybrid
    layer = layers(models["qwen3_5"])[0]
    kernels = StandIns().kernels()
    x = torch.zeros(2, 5, 64, dtype=torch.float64)
    cu = torch.tensor([0, 3, 5, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match="one row without padding"):
        kernel_forward(layer, kernels, x, cu_seq_lens_q=cu)
    with pytest.raises(ValueError, match="one row without padding"):
        kernel_forward(layer, kernels, x[:1], attention_mask=torch.ones(1, 5), cu_seq_lens_q=cu[:3])
    with pytest.raises(ValueError, match="without a cache"):
        kernel_forward(layer, kernels, x, cache=object())


def test_recorded_path_and_warning(hybrid):
    """What the run's start records and says: the path of a training micro-batch, and one line on
    CUDA without flash-linear-attention naming the extra; nothing for a model without the layers."""
    from transformers import AutoConfig, AutoModelForCausalLM

    models, _ = hybrid
    model = models["qwen3_5"]
    assert linear_attention_path_of(model, cuda=True, packing=True, padding_free=True, fla=True) == FLA
    assert linear_attention_path_of(model, cuda=True, packing=True, padding_free=False, fla=True) == LOOP
    assert linear_attention_path_of(model, cuda=True, packing=True, padding_free=True, fla=False) == LOOP
    assert linear_attention_path_of(model, cuda=True, fla=True) == FLA
    assert linear_attention_path_of(model, cuda=False, packing=True, padding_free=True) == LOOP
    assert linear_attention_path_of(model, cuda=False) == TORCH
    line = kernel_warning(model, cuda=True, fla=False)
    assert 'pip install "sftkit[gdn]"' in line and "1.22 s vs 0.70 s" in line and "\n" not in line
    assert kernel_warning(model, cuda=True) is not None  # no fla on this machine
    assert kernel_warning(model, cuda=False) is None
    assert kernel_warning(model, cuda=True, fla=True) is None
    dense = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen3", **family.text_config("qwen3")))
    assert linear_attention_path_of(dense, cuda=True) is None
    assert kernel_warning(dense, cuda=True, fla=False) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or fla_kernels() is None, reason="needs CUDA and fla")
@pytest.mark.parametrize("kind", HYBRIDS)
def test_fla_kernels_on_cuda(paths, hybrid, kind):
    """flash-linear-attention's own kernels, through the installed forward in float32: a packed
    padding-free row gives the loss and gradients of its examples alone, and padded rows those of
    transformers' forward (Triton may multiply float32 in TF32: a tolerance, not exactness)."""
    _, docs = hybrid
    model = build_for_training(SFTConfig(model_name_or_path=str(paths[kind]), packing=True)).cuda().float()
    if getattr(model.config.get_text_config(), "num_experts", None):
        model.set_experts_implementation("eager")  # torch's grouped_mm may refuse float32
    assert linear_attention_path_of(model, cuda=True, packing=True, padding_free=True) == FLA
    assert kernel_warning(model, cuda=True) is None
    packed = collate([docs], PAD, True, padding_free=True).to("cuda")
    with forwards(model, own):
        want_loss, want = loss_and_grads(model, [collate([[d]], PAD, False).to("cuda") for d in docs])
    loss, got = loss_and_grads(model, [packed])
    assert_close_enough(loss, got, want_loss, want)
    padded = collate([[d] for d in docs], PAD, False).to("cuda")
    with forwards(model, own):
        want_loss, want = loss_and_grads(model, [padded])
    loss, got = loss_and_grads(model, [padded])
    assert_close_enough(loss, got, want_loss, want)


def assert_close_enough(loss, got, want_loss, want):
    """test_hybrid's GPU tolerance, over every gradient."""
    assert loss == pytest.approx(want_loss, rel=2e-2)
    assert got.keys() == want.keys()
    for name, expected in want.items():
        scale = expected.abs().max().item()
        assert (got[name] - expected).abs().max().item() <= 5e-2 * scale + 1e-3, name
