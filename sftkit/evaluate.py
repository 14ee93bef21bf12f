"""Evaluation: the exact token-mean loss (the training loss's definition) and perplexity."""

from __future__ import annotations

import math

import torch

from sftkit.batching import load_micro_batch
from sftkit.data.dataset import lengths as example_lengths
from sftkit.loss import token_loss_sum


@torch.no_grad()
def evaluate_loss(model, dataset, accelerator, batch_size: int, pad_id: int, head=None,
                  should_stop=None) -> dict | None:
    """Sum of token losses over the whole set / its supervised tokens, sharded over ranks.
    `should_stop()` true on any rank (checked before each batch, one all-reduce each) ends it on
    every rank, and it returns None."""
    model.eval()
    world, rank = accelerator.num_processes, accelerator.process_index
    n = len(dataset)
    # Sort by length so batches pad little; every rank runs the same number of batches.
    lengths = example_lengths(dataset)  # one Arrow column read, not ~0.5 ms a row through datasets
    order = sorted(range(n), key=lambda i: lengths[i])
    per_step = batch_size * world
    totals = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    for start in range(0, n, per_step):
        if should_stop is not None and accelerator.reduce(
                torch.tensor(int(should_stop()), device=accelerator.device), reduction="sum").item():
            return None
        idx = order[start:start + per_step][rank::world]
        batch = load_micro_batch(dataset, [[i] for i in idx], pad_id).to(accelerator.device)
        totals[0] += token_loss_sum(model, batch, head).double()
        totals[1] += batch.targets.numel()
    loss_sum, count = accelerator.reduce(totals, reduction="sum").tolist()
    loss = loss_sum / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700)), "supervised_tokens": int(count), "examples": n}
