"""Sequence parallelism (Ulysses): each packed row's tokens are split over `--sequence_parallel_size`
processes, and attention trades the split for one over heads.

Every process of a sequence group holds 1/N of the row's tokens through the embeddings, norms,
MLPs and the loss, so those activations shrink N-fold. At each attention layer one all-to-all
hands every process all the row's tokens for 1/N of the heads; it attends them under the row's
full packing boundaries (`cu_seqlens`, which travel with every shard), and a second all-to-all
gives each process its own tokens back with every head. RoPE reads each token's own position
(the shard's slice of position_ids), so nothing else in the model sees the split.

The groups: ranks [g*N, (g+1)*N) share one micro-batch (data-parallel rank g); the loss counts each
supervised token on the one rank that holds its logit, and the step's all-reduce of supervised
tokens over all ranks counts it once. The all-to-alls run in a process group of their own, so
they never interleave with DDP's gradient all-reduce on the default group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from sftkit.accel import check_sequence_world
from sftkit.errors import ConfigError

ATTENTION_NAME = "sftkit_ulysses"  # registered over sftkit's varlen attention when N > 1


@dataclass
class SequenceGroup:
    size: int        # N: processes sharing each row
    index: int       # this process's shard of the row
    group: object    # the process group of those N processes (torch.distributed)


def check_model(config, size: int) -> None:
    """Refuse what a head split cannot compute; one line, naming the fix."""
    from sftkit.arch.table import arch_of, linear_attention_layers

    if linear_attention_layers(config):
        raise ConfigError(f"--sequence_parallel_size {size}: {arch_of(config).name} has Gated DeltaNet layers, whose "
                          "recurrence runs along the whole sequence and is not split here; use --sequence_parallel_size 1")
    heads = config.num_attention_heads
    if heads % size:
        raise ConfigError(f"--sequence_parallel_size {size} must divide the model's {heads} attention heads "
                          f"(each process attends heads/{size} of them); pick a divisor of {heads}")


def sequence_group(cfg, accelerator) -> SequenceGroup | None:
    """This process's sequence group under --sequence_parallel_size (None at 1)."""
    from datetime import timedelta

    if cfg.sequence_parallel_size == 1:
        return None
    return make_group(cfg.sequence_parallel_size, accelerator.process_index, accelerator.num_processes,
                      timedelta(minutes=cfg.ddp_timeout_minutes))


def make_group(size: int, rank: int, world: int, timeout) -> SequenceGroup:
    """Every rank creates every group, in the same order (torch.distributed's rule for new_group)."""
    check_sequence_world(size, world)
    mine = None
    for first in range(0, world, size):
        group = dist.new_group(list(range(first, first + size)), timeout=timeout)
        if first <= rank < first + size:
            mine = group
    return SequenceGroup(size, rank % size, mine)


def register(seq: SequenceGroup) -> str:
    """Make `ATTENTION_NAME` an attention of transformers' registry for this process's group."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                  position_ids=None, cu_seq_lens_q=None, max_length_q=None, **kwargs):
        return ulysses_attention(seq, module, query, key, value, attention_mask, scaling, dropout, sliding_window,
                                 position_ids, cu_seq_lens_q, max_length_q)

    AttentionInterface.register(ATTENTION_NAME, attention)
    AttentionMaskInterface.register(ATTENTION_NAME, flash_attention_mask)
    return ATTENTION_NAME


class AllToAll(torch.autograd.Function):
    """x [N, ...]: chunk j goes to rank j of the group; out[i] is rank i's chunk for this rank. Its
    own inverse, so the backward is the same exchange of the gradients."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return exchange(x, group)

    @staticmethod
    def backward(ctx, grad):
        return exchange(grad, ctx.group), None


def exchange(x: torch.Tensor, group) -> torch.Tensor:
    """all_to_all_single over dim 0, on contiguous memory both ways: it reads and writes the bytes
    in order, and an output from empty_like of a permuted gradient keeps that gradient's strides
    (every gradient below the attention would be wrong while the loss stays exact)."""
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dist.all_to_all_single(out, x, group=group)
    return out


def ulysses_attention(seq: SequenceGroup, module, query, key, value, attention_mask, scaling, dropout, sliding_window,
                      position_ids, cu_seq_lens_q, max_length_q):
    """transformers' attention signature on a shard: query [1, heads, len/N, dim], key and value
    [1, kv_heads, len/N, dim]; returns ([1, len/N, heads, dim], None). Rows without offsets (eval
    and generation batches, never split) take the varlen attention as they are."""
    from sftkit.arch.packed_attention import varlen_attention_forward

    if cu_seq_lens_q is None or attention_mask is not None:
        return varlen_attention_forward(module, query, key, value, attention_mask, scaling, dropout, sliding_window,
                                        position_ids)
    n = seq.size
    batch, heads, local, dim = query.shape
    kv = key.shape[1]
    if kv % n:  # query head h reads kv head h // (heads/kv) (transformers' repeat_kv): repeat to split evenly
        key, value = (t.repeat_interleave(heads // kv, dim=1) for t in (key, value))
        kv = heads
    dtype = torch.promote_types(torch.promote_types(query.dtype, key.dtype), value.dtype)
    parts = [t.to(dtype).reshape(batch, n, t.shape[1] // n, local, dim) for t in (query, key, value)]
    sent = torch.cat(parts, dim=2).transpose(0, 1)                      # [n, 1, (heads+2kv)/n, local, dim]
    got = AllToAll.apply(sent, seq.group)                               # [n ranks' tokens, 1, ...]
    whole = got.permute(1, 2, 0, 3, 4).reshape(batch, -1, n * local, dim)  # this rank's heads, all tokens
    q, k, v = whole.split([heads // n, kv // n, kv // n], dim=1)
    out, _ = varlen_attention_forward(module, q, k, v, None, scaling, dropout, sliding_window, None,
                                      cu_seq_lens_q, max_length_q)      # [1, len, heads/n, dim]
    back = out.reshape(batch, n, local, heads // n, dim).transpose(0, 1)  # chunk j: rank j's tokens
    mine = AllToAll.apply(back, seq.group)                              # [n head groups, 1, local, heads/n, dim]
    return mine.permute(1, 2, 0, 3, 4).reshape(batch, local, heads, dim), None
