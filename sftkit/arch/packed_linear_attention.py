"""Gated DeltaNet (linear-attention) layers over packed rows: each example's short causal
convolution and recurrent state start from zero at its own first token, as they would alone.

transformers 5.24's Gated DeltaNet layers (Qwen3-Next, Qwen3.5, Qwen3.5-MoE) do not keep packed
examples apart by themselves: position_ids never reach them, the reference convolution drops the
`cu_seq_lens_q` it is handed (the last kernel-1 = 3 tokens of one example then feed the next one's
first tokens), and the reference recurrence refuses `cu_seqlens`. Even with causal-conv1d
installed the layer passes the convolution no `seq_idx`, so only the recurrence would be split.
`install` therefore gives each such layer a forward that reads the boundaries collate passes
(`cu_seq_lens_q`, over the micro-batch's tokens laid end to end) and, at each call:

  kernels  on CUDA, one padding-free row, flash-linear-attention's `chunk_gated_delta_rule` taking
           `cu_seqlens` and causal-conv1d's `causal_conv1d_fn` taking `seq_idx` (both checked in
           their signatures, not assumed by version): the layer's own forward, with both
  loop     otherwise (a CPU, a missing package, several rows): the layer's own forward on each
           example's slice in turn. Everything else in the layer is per token, so this is exactly
           the unpacked computation; slow on a GPU (a host sync and one pass per example)

The forward is set on each layer instance (an attribute, not a change of transformers' class):
parameter names, state_dict keys and PEFT's module names stay as they were. transformers' own
hook for this (`use_kernel_func_from_hub_with_fallback`) resolves one function per process at
import time, and swapping it needs the `kernels` package and a kernel repository.
"""

from __future__ import annotations

import functools
import inspect
import itertools

import torch

VARLEN_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def is_gated_delta_net(module) -> bool:
    """Qwen3NextGatedDeltaNet, Qwen3_5GatedDeltaNet, Qwen3_5MoeGatedDeltaNet, ..."""
    return type(module).__name__.endswith("GatedDeltaNet")


def install(model) -> int:
    """Make every Gated DeltaNet layer of `model` keep packed examples apart; returns how many
    layers it found (0: none, so a packed run must refuse). Installing twice changes nothing."""
    layers = [m for m in model.modules() if is_gated_delta_net(m)]
    for layer in layers:
        if not isinstance(layer.__dict__.get("forward"), functools.partial):
            layer.forward = functools.partial(packed_forward, layer.forward)
    return len(layers)


def packed_forward(forward, hidden_states: torch.Tensor, cache=None, attention_mask=None, **kwargs):
    """The layer's forward, given the boundaries: `forward` is the layer's own (bound) forward."""
    cu = kwargs.pop("cu_seq_lens_q", None)
    for name in VARLEN_KWARGS:
        kwargs.pop(name, None)
    if cu is None:
        return forward(hidden_states, cache=cache, attention_mask=attention_mask, **kwargs)
    if cache is not None or attention_mask is not None:
        raise ValueError("a packed row has neither a cache nor a padding mask (collate gives it none)")
    if hidden_states.is_cuda and hidden_states.shape[0] == 1 and kernels_take_boundaries():
        return forward(hidden_states, cu_seq_lens_q=cu.long(), seq_idx=sequence_index(cu, hidden_states.shape[1]),
                       **kwargs)
    return per_example(forward, hidden_states, cu, kwargs)


def per_example(forward, hidden_states: torch.Tensor, cu: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """The layer on each example alone. The rows are laid end to end, as collate counts `cu`."""
    batch, length, width = hidden_states.shape
    bounds = cu.tolist()
    if bounds[0] != 0 or bounds[-1] != batch * length:
        raise ValueError(f"cu_seq_lens_q ends at {bounds[-1]}, the micro-batch holds {batch * length} tokens")
    flat = hidden_states.reshape(1, batch * length, width)
    outs = [forward(flat[:, start:end], **kwargs) for start, end in itertools.pairwise(bounds)]
    return torch.cat(outs, dim=1).view(batch, length, -1)


def sequence_index(cu: torch.Tensor, length: int) -> torch.Tensor:
    """causal-conv1d's seq_idx: [1, length] int32, the example each token belongs to."""
    cu = cu.to(torch.long)
    example = torch.arange(cu.numel() - 1, device=cu.device, dtype=torch.int32)
    return torch.repeat_interleave(example, cu.diff(), output_size=length)[None]


@functools.lru_cache(maxsize=1)
def kernels_take_boundaries() -> bool:
    """flash-linear-attention's chunked gated delta rule takes `cu_seqlens` and causal-conv1d's
    convolution takes `seq_idx`: then transformers (which imports the same two functions) runs both
    kernels, each keeping examples apart. Either missing or older: the per-example loop."""
    try:
        from causal_conv1d import causal_conv1d_fn
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except Exception:  # noqa: BLE001 (an ImportError, or a Triton/CUDA error raised while importing)
        return False
    return ("cu_seqlens" in inspect.signature(chunk_gated_delta_rule).parameters
            and "seq_idx" in inspect.signature(causal_conv1d_fn).parameters)
