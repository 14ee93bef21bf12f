"""Packing checks itself: before step 1 of a packed run, a few examples go through the model packed
in one row and each alone, and every layer's output must agree to round-off.

Keeping packed examples apart rests on transformers handing the boundaries (position_ids, varlen
offsets) to every attention and Gated DeltaNet layer; a version that renames or drops one of those
arguments lets examples see each other silently. Compared layer by layer, a leak moves a token's
hidden state by about its own size (measured on the tiny family, every layer kind), while
round-off stays below 1e-5 of it in float32 and 1e-2 in bfloat16.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from sftkit.arch.table import linear_attention_layers
from sftkit.batching import collate
from sftkit.errors import SftkitError
from sftkit.loss import FusedHead, loss_and_hidden_states

PROBE_EXAMPLES = 4  # at most: the first examples of the set that fit one packed row together
SCAN = 64           # examples looked at to find them
# the largest change of a token's hidden state, relative to its size, that is round-off (TF32
# matmuls on a GPU included); the loss's own relative tolerance is a tenth of it
TOLERANCE = {"full": 1e-2, "half": 0.25}


@dataclass
class PackingCheck:
    """What the probe found (metrics.jsonl's start line, `packing_check`)."""

    examples: int
    tokens: int
    loss_packed: float      # token mean, the examples packed in one row
    loss_apart: float       # token mean, each example alone
    largest_change: float   # of a token's hidden state, relative to its size, over every layer
    tolerance: float
    seconds: float
    leaked: str | None = None  # the first layer whose outputs differ ("layer 0 (linear attention)")

    def record(self) -> dict:
        return asdict(self)


def probe_examples(lengths: list[int], capacity: int) -> list[int]:
    """Indices of the first examples (of the first SCAN) that fit one row of `capacity` tokens together."""
    chosen, used = [], 0
    for i, n in enumerate(lengths[:SCAN]):
        if used + n <= capacity:
            chosen.append(i)
            used += n
            if len(chosen) == PROBE_EXAMPLES:
                break
    return chosen


def layer_kind(config, index: int) -> str:
    return "linear attention (Gated DeltaNet)" if index in linear_attention_layers(config) else "attention"


def check_packing(model, config, examples: list[dict], pad_id: int, padding_free: bool, device,
                  head: FusedHead | None, half: bool, vision=None) -> PackingCheck:
    """Run `examples` packed in one row (as training collates them) and each alone (padded layout),
    in eval mode without gradients, and compare every layer's hidden states and the loss. Every
    rank runs the same examples, so sharded models (ZeRO-3, FSDP2) gather in step."""
    start = time.perf_counter()
    packed = collate([examples], pad_id, packed=True, padding_free=padding_free, vision=vision).to(device)
    apart = [collate([[e]], pad_id, packed=False, vision=vision).to(device) for e in examples]
    training = model.training
    model.eval()  # no dropout: the two layouts see the same function
    try:
        # eager even under --torch_compile: the probe's shapes would cost compilations of their own,
        # and the boundaries reach the layers through the same Python either way
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):
            loss, hidden = loss_and_hidden_states(model, packed, head)
            alone = [loss_and_hidden_states(model, b, head) for b in apart]
    finally:
        model.train(training)
    tolerance = TOLERANCE["half" if half else "full"]
    leaked, largest = None, 0.0
    for layer in range(1, len(hidden)):  # hidden[0]: the embeddings; hidden[i]: layer i-1's output
        got = hidden[layer][0].float()
        want = torch.cat([h[layer][0] for _, h in alone]).float()
        change = ((got - want).norm(dim=-1) / want.norm(dim=-1).clamp_min(1e-6)).max().item()
        largest = max(largest, change)
        if leaked is None and not change <= tolerance:
            leaked = f"layer {layer - 1} ({layer_kind(config, layer - 1)})"
    targets = packed.targets.numel()
    loss_apart = sum(x.item() for x, _ in alone) / targets
    loss_packed = loss.item() / targets
    if leaked is None and not abs(loss_packed - loss_apart) <= tolerance / 10 * abs(loss_apart):
        leaked = "the loss head"
    return PackingCheck(len(examples), packed.tokens, loss_packed, loss_apart, largest, tolerance,
                        round(time.perf_counter() - start, 3), leaked)


def leak_error(check: PackingCheck) -> SftkitError:
    import transformers

    return SftkitError(
        f"packed examples see each other: {check.examples} examples packed in one row and run one at a time "
        f"differ from {check.leaked} on (a token's output by {check.largest_change:.2g} of its size, round-off "
        f"stays under {check.tolerance:.2g}; loss {check.loss_packed:.6g} packed, {check.loss_apart:.6g} apart), "
        f"so this transformers {transformers.__version__} does not keep them apart: train without --packing, "
        "or with a transformers version sftkit is tested with (constraints.txt)")
