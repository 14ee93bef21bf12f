"""Batches: a packed row trains what padded rows train (no cross-talk), best-fit bins, optimizer steps
that hold the same examples however the batch is split, and the shards of a row under sequence
parallelism."""

from __future__ import annotations

import pytest
import torch

from sftkit.batching import collate, shard_sequence


def test_packing_matches_padding_loss_and_gradients(tok):
    """One packed row vs one padded row per example: same loss, same gradients. Fails if the
    position_ids restart or use_cache=False regress (then the examples attend to each other)."""
    from transformers import AutoModelForCausalLM

    from sftkit.batching import collate
    from sftkit.data.render import RenderOptions, render_batch, template_spec
    from sftkit.loss import token_loss_sum
    from sftkit.models import resolve_model_path

    convs = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}]
             for q, a in (("hi", "hello there"), ("2+2?", "4"), ("name a colour", "blue, or green if you like"))]
    examples = [{"input_ids": i, "labels": lab} for i, lab in render_batch(convs, tok, template_spec(tok), RenderOptions())]
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny-qwen3"), attn_implementation="sdpa")
    results = []
    for rows, packed in (([[e] for e in examples], False), ([examples], True)):
        model.zero_grad()
        batch = collate(rows, tok.pad_token_id, packed)
        loss = token_loss_sum(model, batch) / batch.targets.numel()
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in model.parameters()], batch))
    (padded_loss, padded_grads, _), (packed_loss, packed_grads, packed_batch) = results
    assert packed_batch.inputs["input_ids"].shape[0] == 1 and "attention_mask" not in packed_batch.inputs
    assert packed_loss == pytest.approx(padded_loss, rel=1e-5)
    for a, b in zip(packed_grads, padded_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # the test can fail: with a cache, transformers ignores the packed layout and the loss moves
    with torch.no_grad():
        leaky = model(**packed_batch.inputs, logits_to_keep=packed_batch.keep, use_cache=True).logits
        leaky_loss = torch.nn.functional.cross_entropy(leaky.float(), packed_batch.targets).item()
    assert abs(leaky_loss - packed_loss) > 1e-4


def test_best_fit_decreasing_bins():
    from sftkit.batching import bfd_bins

    lengths = [90, 60, 50, 40, 30, 20, 10]
    bins = bfd_bins(lengths, 100)
    assert sorted(i for b in bins for i in b) == list(range(7))
    assert all(sum(lengths[i] for i in b) <= 100 for b in bins)
    assert len(bins) == 3  # 300 tokens in bins of 100: the minimum


@pytest.mark.parametrize("packing", [False, True])
def test_steps_do_not_depend_on_the_split(packing):
    """Global batch 8 as 8 x 1, 1 x 8, 2 ranks x 4, 2 ranks x 2 x 2: each optimizer step holds the
    same examples, over two epochs of 61 examples (a short last step) with length grouping on."""
    from sftkit.batching import Schedule

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(10, 400, (61,), generator=g).tolist()

    def steps(per_device: int, world: int, accumulation: int) -> list[list[int]]:
        s = Schedule(lengths, per_device, world, accumulation, seed=7, packing=packing, max_length=512)
        out = []
        for step in range(2 * s.steps_per_epoch):
            micro = range(step * accumulation, (step + 1) * accumulation)
            rows = [row for k in micro for r in range(world) for row in s.examples(k, r)]
            out.append(sorted(i for row in rows for i in row))
        return out

    want = steps(8, 1, 1)
    assert sorted(i for step in want[:len(want) // 2] for i in step) == list(range(61))
    for split in ((1, 1, 8), (4, 2, 1), (2, 2, 2), (1, 2, 4)):
        assert steps(*split) == want, split


def _examples(lengths):
    g = torch.Generator().manual_seed(1)
    out = []
    for n in lengths:
        ids = torch.randint(0, 1000, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100 if i < n // 2 else t for i, t in enumerate(ids)]})
    return out


@pytest.mark.parametrize("size", [2, 3, 4])
def test_the_shards_of_a_row_are_the_row(size):
    """Laid end to end, the shards are the row padded to a multiple of `size` (the padding a
    sequence of its own); each keeps the whole row's offsets and its own logits' targets."""
    batch = collate([_examples([9, 1, 14, 7])], 0, True, padding_free=True)  # 31 tokens
    shards = [shard_sequence(batch, size, i) for i in range(size)]
    width = batch.inputs["input_ids"].shape[1]
    padded = -(-width // size) * size
    assert {s.inputs["input_ids"].shape[1] for s in shards} == {padded // size}
    ids = torch.cat([s.inputs["input_ids"] for s in shards], dim=1)
    assert torch.equal(ids[:, :width], batch.inputs["input_ids"])
    positions = torch.cat([s.inputs["position_ids"] for s in shards], dim=1)
    assert torch.equal(positions[:, :width], batch.inputs["position_ids"])
    assert positions[0, width:].tolist() == list(range(padded - width))  # a sequence of its own
    assert torch.equal(torch.cat([s.targets for s in shards]), batch.targets)
    assert torch.equal(torch.cat([s.keep for s in shards], dim=1)[:, :width], batch.keep)
    for s in shards:
        assert s.inputs["cu_seq_lens_q"].tolist() == batch.inputs["cu_seq_lens_q"].tolist() + [padded] * (padded > width)
    assert sum(s.tokens for s in shards) == batch.tokens and sum(s.slots for s in shards) == padded
    assert sum(s.attn_pairs for s in shards) == batch.attn_pairs
    assert sum(s.counted_tokens for s in shards) == batch.counted_tokens
