"""Run by tests/process/test_sequence_parallel.py under `torchrun --nproc_per_node 2` (gloo, CPU): one packed
padding-free row of several examples, its loss and every gradient with sequence parallelism 2
against sequence parallelism 1 (each rank computes the unsplit reference itself), in float64 on
the plain loss path. Writes what it measured to the JSON file named by argv[1] (rank 0).

Also with the row's packing boundaries dropped from the shards (one sequence over the whole row):
that loss must differ, or the comparison above could not see a lost boundary.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from datetime import timedelta
from pathlib import Path

import conftest  # tests/ is on the rank's path (conftest.rank_env)
import torch
import torch.distributed as dist

from sftkit.batching import collate, shard_sequence
from sftkit.config import SFTConfig
from sftkit.models import build_for_training
from sftkit.sequence_parallel import make_group


def examples(lengths: list[int], seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(0, 151_000, (n,), generator=g).tolist()
        labels = [-100 if i < n // 3 else t for i, t in enumerate(ids)]  # a prompt, then a reply
        out.append({"input_ids": ids, "labels": labels})
    return out


def loss_and_grads(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """conftest's, the loss as a tensor for all_reduce."""
    loss, grads = conftest.loss_and_grads(model, batch)
    return torch.tensor(loss, dtype=torch.float64), grads


def main(out_path: str) -> None:
    dist.init_process_group("gloo", timeout=timedelta(minutes=5))
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0:  # the tiny preset is built once, then read by both
        build_for_training(SFTConfig(attn_implementation="varlen", packing=True))
    dist.barrier()
    # 5 examples, 103 tokens: odd, so the shards need the padding sequence as well
    batch = collate([examples([17, 1, 40, 29, 16])], 151643, True, padding_free=True)
    ref = build_for_training(SFTConfig(attn_implementation="varlen", packing=True)).double()
    want_loss, want = loss_and_grads(ref, batch)

    seq = make_group(world, rank, world, timedelta(minutes=5))
    sp = build_for_training(SFTConfig(packing=True, sequence_parallel_size=world), sequence=seq).double()
    shard = shard_sequence(batch, world, rank)
    loss, grads = loss_and_grads(sp, shard)
    dist.all_reduce(loss)
    for g in grads.values():  # each rank holds its tokens' share of every gradient
        dist.all_reduce(g)
    targets = torch.tensor([shard.targets.numel()])
    dist.all_reduce(targets)

    whole = torch.tensor([0, shard.inputs["cu_seq_lens_q"][-1].item()], dtype=torch.int32)
    blind = dataclasses.replace(shard, inputs={**shard.inputs, "cu_seq_lens_q": whole, "cu_seq_lens_k": whole,
                                               "max_length_q": int(whole[-1]), "max_length_k": int(whole[-1])})
    blind_loss, _ = loss_and_grads(sp, blind)
    dist.all_reduce(blind_loss)

    if rank == 0:
        errors = {n: ((grads[n] - w).abs().max() / w.abs().max().clamp_min(1e-30)).item() for n, w in want.items()}
        Path(out_path).write_text(json.dumps({
            "loss": loss.item(), "want_loss": want_loss.item(), "blind_loss": blind_loss.item(),
            "targets": int(targets), "want_targets": batch.targets.numel(),
            "grad_names": sorted(grads), "want_names": sorted(want), "worst_grad_rel": max(errors.values()), "errors": errors,
            "shard_tokens": shard.inputs["input_ids"].shape[1], "row_tokens": batch.inputs["input_ids"].shape[1]}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
