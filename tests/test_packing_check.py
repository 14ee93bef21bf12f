"""The packing probe (sftkit/packing_check.py): on every family architecture packed examples and
each example alone agree to round-off; with the boundaries taken away (what a transformers that
drops them would do) it finds the leak and names the kind of layer it starts in."""

from __future__ import annotations

import family
import pytest
import torch

from sftkit.config import SFTConfig
from sftkit.data.render import RenderOptions, render_batch, template_spec
from sftkit.models import build_for_training, load_tokenizer
from sftkit.packing_check import check_packing, leak_error, probe_examples

QA = (("Tell me about the sea. " * 6, "It is wide, deep and salt. " * 3), ("2+2?", "4"),
      ("Name a colour.", "Blue, like the sky at noon."))


@pytest.fixture(scope="module")
def packed_family(family_model):
    """packed_family(kind) -> (model built for packed training, its config, its pad id, three
    rendered examples), built on first use (each xdist worker builds only the kinds it runs)."""
    built = {}

    def get(kind: str):
        if kind not in built:
            path = family_model(kind)
            tok = load_tokenizer(str(path))
            convs = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in QA]
            docs = [{"input_ids": i, "labels": lab}
                    for i, lab in render_batch(convs, tok, template_spec(tok), RenderOptions())]
            model = build_for_training(SFTConfig(model_name_or_path=str(path), packing=True))
            built[kind] = model, model.config, tok.pad_token_id, docs
        return built[kind]

    return get


class WithoutBoundaries(torch.nn.Module):
    """The model as a transformers that drops the packed boundaries would run it: the varlen offsets
    go, and with `positions` the position_ids count on across the row instead of restarting."""

    def __init__(self, model, positions: bool):
        super().__init__()
        self.model, self.positions = model, positions

    def forward(self, **inputs):
        inputs = {k: v for k, v in inputs.items() if not k.startswith(("cu_seq_lens", "max_length"))}
        if self.positions and "position_ids" in inputs:
            inputs["position_ids"] = torch.arange(inputs["input_ids"].shape[1]).expand_as(inputs["input_ids"])
        return self.model(**inputs)


@pytest.mark.parametrize("kind", family.KINDS)
@pytest.mark.parametrize("padding_free", [False, True], ids=["row", "padding-free"])
def test_packed_examples_agree_with_each_alone(packed_family, kind, padding_free):
    model, config, pad, docs = packed_family(kind)
    model.train()
    check = check_packing(model, config, docs, pad, padding_free, "cpu", None, half=False)
    assert check.leaked is None and check.largest_change < 1e-4, check
    assert check.examples == 3 and check.tokens == sum(len(d["input_ids"]) for d in docs)
    assert check.loss_packed == pytest.approx(check.loss_apart, rel=1e-5)
    assert model.training  # the probe leaves the model as it found it


@pytest.mark.parametrize("kind,positions,leaks_in", [
    ("qwen3", True, "layer 0 (attention)"),
    ("qwen3_moe", True, "layer 0 (attention)"),
    ("qwen3_5", False, "layer 0 (linear attention (Gated DeltaNet))"),
    ("qwen3_next", False, "layer 0 (linear attention (Gated DeltaNet))"),
    ("qwen3_5_moe", True, "layer 0 (linear attention (Gated DeltaNet))"),
])
def test_without_boundaries_the_leak_is_found_and_named(packed_family, kind, positions, leaks_in):
    """Attention keeps examples apart by their restarting position_ids, Gated DeltaNet by the varlen
    offsets: taking away what each layer kind reads makes examples see each other, by about a
    token's own size, far beyond bfloat16's tolerance too."""
    model, config, pad, docs = packed_family(kind)
    check = check_packing(WithoutBoundaries(model, positions), config, docs, pad, True, "cpu", None, half=True)
    assert check.leaked == leaks_in and check.largest_change > 1.0, check
    line = str(leak_error(check))
    assert "\n" not in line and leaks_in in line and "without --packing" in line


def test_the_probe_takes_the_first_examples_that_fit_one_row():
    assert probe_examples([10, 50, 20, 30, 5, 5], 64) == [0, 1]  # 10 + 50 fill it; 20 does not fit
    assert probe_examples([100, 10, 20, 30, 40], 64) == [1, 2, 3]
    assert probe_examples([3] * 10, 64) == [0, 1, 2, 3]
    assert probe_examples([70, 80], 64) == []
