"""Packed attention with no padding and no mask: a packed micro-batch is one row, its examples
delimited by cumulative lengths (`cu_seqlens`), and each example attends causally to itself only.

Under packing transformers gives sdpa and eager a [rows, 1, len, len] block-diagonal mask, which
keeps sdpa off its flash kernel, so attention activations take much of a long row's memory on a
GPU. Registered through transformers' AttentionInterface under `ATTENTION_NAME`, with
flash-attention's mask function, a packed row gets no mask at all, and RoPE still reads the
restarting position_ids. The kernel is picked at each call:

  torch  `torch.nn.attention.varlen.varlen_attn` (torch >= 2.10, CUDA, bf16/fp16): flash varlen,
         no extra package
  flash  `flash_attn_varlen_func`, where the flash-attn package is installed (CUDA, bf16/fp16)
  loop   a reference: `scaled_dot_product_attention(is_causal=True)` per example; on a CPU and
         in fp32, so CI runs the same plumbing against the padded path

Rows with a padding mask (eval batches) or a query shorter than its keys (decoding with a cache)
take sdpa under a causal-and-padding mask instead: they hold one example each.
"""

from __future__ import annotations

import inspect
import itertools
from functools import lru_cache

import torch
import torch.nn.functional as F

from sftkit.errors import ConfigError

ATTENTION_NAME = "sftkit_varlen"  # what sftkit's `attn_implementation: varlen` registers


def register() -> str:
    """Make `ATTENTION_NAME` a valid attn_implementation for transformers; returns the name.

    Its mask function is flash-attention's: no mask at all for packed or unpadded rows, the 2-D
    padding mask where a batch is padded (eval, generate). Without one, transformers hands a custom
    attention no mask, and left-padded generation would attend to the padding."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(ATTENTION_NAME, varlen_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, flash_attention_mask)
    return ATTENTION_NAME


def check_model(config) -> None:
    """Refuse what the kernels here do not compute: sliding windows and attention dropout."""
    if "sliding_attention" in (getattr(config, "layer_types", None) or []):
        raise ConfigError("attn_implementation varlen does not implement sliding-window attention, which this model "
                          "uses; set attn_implementation sdpa")
    if getattr(config, "attention_dropout", 0.0):
        raise ConfigError(f"attn_implementation varlen does not implement attention dropout "
                          f"(attention_dropout={config.attention_dropout}); set attn_implementation sdpa")


def offsets(lengths: list[int]) -> tuple[torch.Tensor, int]:
    """(cu_seqlens as int32, the longest length) for examples of these lengths laid end to end."""
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
    return cu, max(lengths)


def offsets_from_positions(position_ids: torch.Tensor | None, batch: int, length: int) -> tuple[torch.Tensor, int]:
    """cu_seqlens where the (flattened) position_ids restart at 0; without them, one example per row.
    Costs a host sync: collate passes `cu_seq_lens_q` so that training never comes here."""
    if position_ids is None:
        return offsets([length] * batch)
    flat = position_ids.expand(batch, -1).reshape(-1)
    starts = (flat == 0).nonzero().view(-1).to(torch.int32)
    cu = torch.cat([starts, torch.tensor([flat.numel()], dtype=torch.int32, device=flat.device)])
    return cu, int(cu.diff().max())


def varlen_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                             sliding_window=None, position_ids=None, cu_seq_lens_q=None, max_length_q=None,
                             **kwargs):
    """transformers' attention signature: query [batch, heads, len, dim], key and value [batch,
    kv_heads, len, dim] (GQA: fewer heads); returns ([batch, len, heads, dim], None)."""
    if sliding_window is not None:
        raise ValueError("varlen attention has no sliding window (check_model refuses such models)")
    batch, _, length, dim = query.shape
    if attention_mask is not None or key.shape[2] != length:
        return masked_attention(module, query, key, value, attention_mask, scaling, dropout)
    if cu_seq_lens_q is None:
        cu, longest = offsets_from_positions(position_ids, batch, length)
    else:
        cu, longest = cu_seq_lens_q.to(device=query.device, dtype=torch.int32), int(max_length_q)
    dtype = compute_dtype(query)
    q, k, v = (t.transpose(1, 2).reshape(-1, t.shape[1], dim).to(dtype) for t in (query, key, value))
    scale = dim ** -0.5 if scaling is None else scaling
    out = varlen(q, k, v, cu, longest, scale, dropout)
    return out.view(batch, length, -1, dim), None


def compute_dtype(query: torch.Tensor) -> torch.dtype:
    """The autocast dtype where autocast is on (the flash kernels take bf16/fp16 only), else the query's.
    Qwen3's q_norm returns fp32 under bf16 autocast (its weight is fp32) while v_proj returns bf16."""
    device = query.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype


def varlen(q, k, v, cu: torch.Tensor, longest: int, scale: float, dropout: float) -> torch.Tensor:
    """Causal attention within each example: q [tokens, heads, dim], k/v [tokens, kv_heads, dim]."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        if dropout == 0.0 and torch_varlen() is not None:
            return torch_kernel(q, k, v, cu, longest, scale)
        if flash_varlen() is not None:
            return flash_varlen()(q, k, v, cu, cu, longest, longest, dropout_p=dropout, softmax_scale=scale,
                                  causal=True)
    return reference(q, k, v, cu, scale, dropout)


@lru_cache(maxsize=1)
def torch_varlen():
    """torch's varlen_attn, or None where this torch lacks it (before 2.10)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@lru_cache(maxsize=1)
def flash_varlen():
    """flash-attn's flash_attn_varlen_func, or None where the package is not installed."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


@lru_cache(maxsize=1)
def torch_varlen_params() -> frozenset[str]:
    return frozenset(inspect.signature(torch_varlen()).parameters)


def torch_kernel(q, k, v, cu, longest: int, scale: float) -> torch.Tensor:
    """varlen_attn, whose arguments changed between releases: torch 2.10 takes `is_causal`, 2.11+
    `window_size` ((-1, 0) is causal; its default (-1, -1) attends both ways); `enable_gqa` and
    `scale` are checked for, not assumed."""
    params = torch_varlen_params()
    options = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            options["enable_gqa"] = True
        else:  # query head h reads kv head h // groups, as transformers' repeat_kv lays them out
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if "scale" in params:
        options["scale"] = scale
    elif scale != q.shape[-1] ** -0.5:
        q = q * (scale * q.shape[-1] ** 0.5)
    return torch_varlen()(q, k, v, cu, cu, longest, longest, **options)


def reference(q, k, v, cu: torch.Tensor, scale: float, dropout: float) -> torch.Tensor:
    """sdpa with is_causal on each example in turn: exact, slow on a GPU (one host sync per call)."""
    bounds = cu.tolist()
    outs = []
    for start, end in itertools.pairwise(bounds):
        seg = [t[start:end].transpose(0, 1)[None] for t in (q, k, v)]  # [1, heads, len, dim]
        out = F.scaled_dot_product_attention(*seg, dropout_p=dropout, is_causal=True, scale=scale,
                                             enable_gqa=q.shape[1] != k.shape[1])
        outs.append(out[0].transpose(0, 1))
    return torch.cat(outs)


def masked_attention(module, query, key, value, attention_mask, scaling, dropout):
    """sdpa under a causal mask aligned to the last key (a cache puts earlier keys first) and the
    2-D padding mask, for rows that hold one example each. Every query also sees its own key: a
    left-padded pad query would otherwise see none and turn NaN, and NaN values poison the real
    queries' outputs even where the mask gives them weight 0 (0 x NaN)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q_len, kv_len = query.shape[2], key.shape[2]
    q_pos = torch.arange(q_len, device=query.device)[:, None] + (kv_len - q_len)
    k_pos = torch.arange(kv_len, device=query.device)[None, :]
    mask = (k_pos <= q_pos)[None, None]
    if attention_mask is not None:
        mask = (mask & attention_mask[:, None, None, -kv_len:].bool()) | (k_pos == q_pos)
    return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling)
