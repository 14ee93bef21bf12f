"""Hybrid models (Gated DeltaNet + attention: Qwen3-Next, Qwen3.5) over packed rows, in process:
a packed micro-batch gives the loss and every gradient of its examples run one by one, in both
packed layouts (one padding-free row; rows with padding under sdpa's block mask), and the same
batch without the boundaries does not (the recurrence and the convolution leak). Tiny random-init
models from tests/family.py with the real Qwen3 tokenizer and the generation's own template."""

from __future__ import annotations

import family
import pytest
import torch
from conftest import loss_and_grads

from sftkit.batching import collate
from sftkit.config import SFTConfig
from sftkit.errors import ConfigError
from sftkit.loss import token_loss_sum
from sftkit.models import build_for_training, load_tokenizer

HYBRIDS = ("qwen3_5", "qwen3_next")


@pytest.fixture(scope="module")
def hybrid(family_model):
    """kind -> (model directory, its tokenizer, three rendered examples: 81, 1 and 26 tokens).
    81 crosses the delta rule's 64-token chunk; 1 is shorter than the convolution's kernel (4)."""
    from sftkit.data.render import RenderOptions, render_batch, template_spec

    out = {}
    for kind in HYBRIDS:
        path = family_model(kind)
        tok = load_tokenizer(str(path))
        convs = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}]
                 for q, a in (("Tell me about the sea. " * 6, "It is wide, deep and salt. " * 3), ("2+2?", "4"))]
        rendered = [{"input_ids": i, "labels": lab}
                    for i, lab in render_batch(convs, tok, template_spec(tok), RenderOptions())]
        one = {"input_ids": rendered[1]["input_ids"][:1], "labels": [-100]}
        out[kind] = path, tok, [rendered[0], one, rendered[1]]
    return out


def float64_model(path, **options):
    """The model in float64, so that what is compared is the layout, not rounding: in float32 the
    gradients of A_log (4 numbers, sums of cancelling terms over every token) differed by 4e-5 of
    their size between the padding-free row and each example alone; in float64 every gradient
    agrees to 2e-7 of its tensor's largest (the delta rule itself runs in float32 regardless).
    The experts run as a loop: torch's grouped_mm takes no float64."""
    model = build_for_training(SFTConfig(model_name_or_path=str(path), **options)).double()
    if hasattr(model.config, "num_experts"):
        model.set_experts_implementation("eager")
    return model


def assert_same_gradients(got: dict, want: dict, what: str) -> None:
    """tests/test_varlen.py's tolerance, its atol scaled by the tensor's largest gradient
    (the convolution's reach 285 here, the attention's in test_varlen about 1)."""
    assert got.keys() == want.keys() and any("linear_attn" in n for n in got)
    for name, expected in want.items():
        scale = max(1.0, expected.abs().max().item())
        torch.testing.assert_close(got[name], expected, rtol=1e-5, atol=1e-6 * scale, msg=f"{what}: {name}")


@pytest.mark.parametrize("kind", HYBRIDS)
def test_packed_hybrid_equals_each_example_alone(hybrid, kind):
    """Loss and every gradient (all layers: Gated DeltaNet, attention, MLP or experts) of a packed
    micro-batch equal those of its three examples run alone, with both packed layouts under sdpa,
    and one row under varlen attention."""
    path, tok, docs = hybrid[kind]
    alone = [collate([[d]], tok.pad_token_id, False) for d in docs]
    layouts = {"one row, sdpa": ("sdpa", [docs], True), "rows, sdpa": ("sdpa", [docs[:1], docs[1:]], False)}
    if kind == "qwen3_5":  # the Gated DeltaNet path is the same for both; this adds varlen attention beside it
        layouts["one row, varlen"] = ("varlen", [docs], True)
    want_loss, want = None, None
    for name, (attention, rows, padding_free) in layouts.items():
        model = float64_model(path, packing=True, attn_implementation=attention)
        if want is None:
            want_loss, want = loss_and_grads(model, alone)
        loss, got = loss_and_grads(model, [collate(rows, tok.pad_token_id, True, padding_free)])
        assert loss == pytest.approx(want_loss, rel=1e-6), name
        assert_same_gradients(got, want, name)


@pytest.mark.parametrize("kind", HYBRIDS)
def test_without_boundaries_packed_examples_leak(hybrid, kind):
    """The check above can fail: the same packed row without the boundaries (what transformers and
    TRL do with position_ids alone) moves the loss and the gradients of the linear-attention layers
    far beyond the tolerance above (by 0.48 and 1.0 of the largest gradient; the loss by 1e-5 and
    2e-4); handed the offsets, transformers' own forward (sftkit's set aside) refuses them."""
    from sftkit.arch.packed_linear_attention import is_gated_delta_net

    path, tok, docs = hybrid[kind]
    plain = float64_model(path)
    want_loss, want = loss_and_grads(plain, [collate([[d]], tok.pad_token_id, False) for d in docs])
    batch = collate([docs], tok.pad_token_id, True, padding_free=True)
    positions_only = type(batch)({k: batch.inputs[k] for k in ("input_ids", "position_ids")}, batch.keep,
                                 batch.targets, batch.tokens, batch.slots)
    loss, got = loss_and_grads(plain, [positions_only])
    assert abs(loss - want_loss) > 1e-6 * abs(want_loss)
    with pytest.raises(AssertionError):
        assert_same_gradients(got, want, "position_ids only")
    leak = max((got[n] - want[n]).abs().max().item() / want[n].abs().max().item() for n in want if "linear_attn" in n)
    assert leak > 1e-2
    for layer in (m for m in plain.modules() if is_gated_delta_net(m)):
        del layer.forward  # transformers' forward again
    with pytest.raises(ValueError, match="packed sequences apart"):
        token_loss_sum(plain, batch)


def test_packing_refuses_a_linear_attention_model_it_cannot_split(hybrid):
    """A model whose config declares linear-attention layers that sftkit finds no Gated DeltaNet
    layer for: packing stops with one line before training, instead of leaking."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from sftkit.models import keep_linear_attention_apart

    config = AutoConfig.for_model("qwen3", **family.text_config("qwen3"))
    config.layer_types = ["linear_attention", "full_attention"]
    with pytest.raises(ConfigError, match="set packing: false"):
        keep_linear_attention_apart(AutoModelForCausalLM.from_config(config), packing=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", HYBRIDS)
def test_kernels_keep_packed_examples_apart_on_cuda(hybrid, kind):
    """On a GPU, one padding-free row in bfloat16: through flash-linear-attention's varlen short
    convolution and delta rule where it is installed (else the per-example loop), the loss and the
    Gated DeltaNet gradients of each example alone, to bfloat16's precision."""
    from sftkit.arch.packed_linear_attention import linear_attention_path_of

    path, tok, docs = hybrid[kind]
    model = build_for_training(SFTConfig(model_name_or_path=str(path), packing=True)).cuda().to(torch.bfloat16)
    alone = [collate([[d]], tok.pad_token_id, False).to("cuda") for d in docs]
    want_loss, want = loss_and_grads(model, alone)
    loss, got = loss_and_grads(model, [collate([docs], tok.pad_token_id, True, padding_free=True).to("cuda")])
    print(f"{kind}: {linear_attention_path_of(model, cuda=True, packing=True, padding_free=True)}")
    assert loss == pytest.approx(want_loss, rel=2e-2)
    for name in (n for n in want if "linear_attn" in n):
        scale = want[name].float().abs().max().item()
        assert (got[name].float() - want[name].float()).abs().max().item() <= 5e-2 * scale + 1e-3, name
