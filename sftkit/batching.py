"""Data order and micro-batches. The order is a pure function of (seed, epoch), so a resumed run
sees exactly the batches an uninterrupted one would."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sftkit.data.render import IGNORE_INDEX


@dataclass(frozen=True)
class Plan:
    """How many micro-batches and optimizer steps a run has."""

    num_examples: int
    global_micro_batch: int      # examples per micro-batch over all ranks
    accumulation: int
    micro_per_epoch: int
    total_steps: int

    @classmethod
    def make(cls, num_examples: int, per_device: int, world: int, accumulation: int,
             epochs: float, max_steps: int) -> Plan:
        global_micro = per_device * world
        micro_per_epoch = math.ceil(num_examples / global_micro)
        if max_steps > 0:
            steps = max_steps
        else:
            steps = max(1, math.ceil(math.ceil(epochs * micro_per_epoch) / accumulation))
        return cls(num_examples, global_micro, accumulation, micro_per_epoch, steps)

    def epoch_of(self, micro_index: int) -> float:
        return micro_index / self.micro_per_epoch


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def micro_batch_indices(plan: Plan, seed: int, micro_index: int, rank: int, world: int) -> list[int]:
    """This rank's example indices for global micro-batch `micro_index` (counted across epochs).

    An empty list means the epoch's last micro-batch had too few examples for this rank.
    """
    epoch, j = divmod(micro_index, plan.micro_per_epoch)
    order = epoch_order(plan.num_examples, seed, epoch)
    chunk = order[j * plan.global_micro_batch:(j + 1) * plan.global_micro_batch]
    return chunk[rank::world]  # strided, so a short last batch is spread evenly over ranks


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; `keep` marks positions whose next token is supervised, `targets` holds
    those next tokens in row-major order (the order boolean indexing returns logits in)."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.as_tensor(e["input_ids"])
        labels[i, :n] = torch.as_tensor(e["labels"])
        mask[i, :n] = 1
        if e.get("weight", 1) == 0:
            labels[i] = IGNORE_INDEX
    keep = torch.zeros_like(ids, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": mask, "keep": keep, "targets": labels[:, 1:][keep[:, :-1]]}


def load_micro_batch(dataset, indices: list[int], fallback: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Collate `indices`; with none, one example with no supervised token keeps every rank in step
    (each rank must run forward and backward) while adding nothing to the loss."""
    if not indices:
        return collate([{**dataset[fallback], "weight": 0}], pad_id)
    return collate([dataset[i] for i in indices], pad_id)
