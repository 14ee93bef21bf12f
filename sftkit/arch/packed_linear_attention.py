"""Gated DeltaNet (linear-attention) layers: which computation runs them, and, over packed rows,
each example's short causal convolution and recurrent state starting from zero at its own first
token, as they would alone.

transformers 5.24's Gated DeltaNet layers (Qwen3-Next, Qwen3.5, Qwen3.5-MoE) do not keep packed
examples apart by themselves: position_ids never reach them, the reference convolution drops the
`cu_seq_lens_q` it is handed (the last kernel-1 = 3 tokens of one example then feed the next one's
first tokens), and the reference recurrence refuses `cu_seqlens`. With kernels installed the layer
still passes its convolution no boundaries. `install` therefore gives each such layer a forward
that reads the boundaries collate passes (`cu_seq_lens_q`, over the micro-batch's tokens laid end
to end) and takes one of three paths at each call (`linear_attention_path`):

  fla    on CUDA with flash-linear-attention (`pip install "sftkit[gdn]"`), no cache: sftkit's own
         forward of the layer (`kernel_forward`), through fla's short convolution and chunked gated
         delta rule; a packed padding-free row hands both kernels its boundaries (`cu_seqlens`)
  loop   packed rows otherwise (a CPU, no fla, several rows): the layer's own forward on each
         example's slice in turn. Everything else in the layer is per token, so this is exactly
         the unpacked computation; slow on a GPU (a host sync and one pass per example)
  torch  unpacked rows otherwise, and any call with a cache (generation): the layer's own forward,
         which is transformers' PyTorch reference where fla is missing

The forward is set on each layer instance (an attribute, not a change of transformers' class):
parameter names, state_dict keys and PEFT's module names stay as they were, and `kernel_forward`
calls the layer's own projections, so LoRA on them applies. transformers' own hook for kernels
(`use_kernel_func_from_hub_with_fallback`) resolves one function per process at import time, and
its convolution comes from causal-conv1d, which takes no `cu_seqlens` and has no wheel for every GPU.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import itertools
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from sftkit.arch.table import linear_attention_layers

VARLEN_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
FLA, LOOP, TORCH = "fla", "loop", "torch"
EXTRA = 'pip install "sftkit[gdn]"'


class Kernels(NamedTuple):
    """The two functions of the fla path, with flash-linear-attention 0.6's signatures."""
    conv: Callable  # causal_conv1d(x [B, T, D], weight [D, W], bias, activation=, cu_seqlens=) -> (y, state)
    rule: Callable  # chunk_gated_delta_rule(q, k, v, g=, beta=, use_qk_l2norm_in_kernel=, cu_seqlens=) -> (o, state)


def is_gated_delta_net(module) -> bool:
    """A module sftkit's forward can drive (it reads the layer's projections, conv1d, A_log and
    dt_bias): Qwen3NextGatedDeltaNet, Qwen3_5GatedDeltaNet, Qwen3_5MoeGatedDeltaNet, ... Which
    layers are linear attention is the config's (`table.linear_attention_layers`): a packed run on
    a model whose config names some, but that has none of these modules, is refused
    (models.keep_linear_attention_apart)."""
    return type(module).__name__.endswith("GatedDeltaNet")


def linear_attention_path(cuda: bool, fla: bool, packed: bool, rows: int, cache: bool) -> str:
    """FLA, LOOP or TORCH (module docstring) for one call: on `cuda` or not, flash-linear-attention
    installed or not, a `packed` micro-batch (boundaries given) of `rows` rows, with a `cache` or not.
    The kernels take the boundaries of one row only: several packed rows take the loop."""
    if packed and cache:
        raise ValueError("a packed row has no cache (collate gives it none); generate from unpacked rows")
    if cache:
        return TORCH
    kernels = cuda and fla
    if packed:
        return FLA if kernels and rows == 1 else LOOP
    return FLA if kernels else TORCH


def install(model) -> int:
    """Give every Gated DeltaNet layer of `model` sftkit's forward; returns how many layers it found
    (0: none, so a packed run must refuse). Installing twice changes nothing."""
    layers = [m for m in model.modules() if is_gated_delta_net(m)]
    # resolved here, not at each call: no import or cache lookup inside a compiled layer
    kernels = fla_kernels() if layers and torch.cuda.is_available() else None
    for layer in layers:
        if not isinstance(layer.__dict__.get("forward"), functools.partial):
            layer.forward = functools.partial(layer_forward, layer, layer.forward, kernels)
    return len(layers)


def layer_forward(layer, own, kernels: Kernels | None, hidden_states: torch.Tensor, cache=None, attention_mask=None,
                  **kwargs):
    """The forward `install` sets: `own` is the layer's own (bound) forward, `kernels` fla's where
    they load on this machine's GPU."""
    cu = kwargs.get("cu_seq_lens_q")
    cuda = hidden_states.is_cuda
    path = linear_attention_path(cuda, kernels is not None, cu is not None, hidden_states.shape[0], cache is not None)
    if path == FLA:
        return kernel_forward(layer, kernels, hidden_states, attention_mask=attention_mask, **kwargs)
    for name in VARLEN_KWARGS:
        kwargs.pop(name, None)
    if path == LOOP:
        if attention_mask is not None:
            raise ValueError("a packed row has no padding mask (collate gives it none)")
        return per_example(own, hidden_states, cu, kwargs)
    return own(hidden_states, cache=cache, attention_mask=attention_mask, **kwargs)


def kernel_forward(layer, kernels: Kernels, hidden_states: torch.Tensor, cache=None, attention_mask=None, **kwargs):
    """The layer's forward without a cache through `kernels`: transformers' forward step by step,
    from the layer's own submodules. With `cu_seq_lens_q` (one packed row) both kernels get them."""
    cu = kwargs.get("cu_seq_lens_q")
    if cache is not None:
        raise ValueError("the kernel path runs without a cache; with one the layer's own forward runs")
    if cu is not None and (hidden_states.shape[0] != 1 or attention_mask is not None):
        raise ValueError("the kernels take the boundaries of one row without padding (collate's padding-free row); "
                         "packed rows with padding take the per-example loop")
    cu = None if cu is None else cu.long()  # fla's cu_seqlens: a LongTensor
    if attention_mask is not None:  # right padding: zero, as transformers' apply_mask_to_padding_states
        hidden_states = (hidden_states * attention_mask[:, :, None]).to(hidden_states.dtype)
    batch, length, _ = hidden_states.shape
    mixed_qkv, z, b, a = projections(layer, hidden_states)
    mixed_qkv, _ = kernels.conv(mixed_qkv, layer.conv1d.weight.squeeze(1), layer.conv1d.bias,
                                activation=layer.activation, cu_seqlens=cu)  # [B, T, D], not transformers' [B, D, T]
    query, key, value = torch.split(mixed_qkv, [layer.key_dim, layer.key_dim, layer.value_dim], dim=-1)
    query = query.reshape(batch, length, -1, layer.head_k_dim)
    key = key.reshape(batch, length, -1, layer.head_k_dim)
    value = value.reshape(batch, length, -1, layer.head_v_dim)
    beta = b.sigmoid()
    g = -layer.A_log.float().exp() * F.softplus(a.float() + layer.dt_bias)  # .float(): in fp16, A can be -inf
    core, _ = kernels.rule(query, key, value, g=g, beta=beta, use_qk_l2norm_in_kernel=True, cu_seqlens=cu)
    core = layer.norm(core.reshape(-1, layer.head_v_dim), z.reshape(-1, layer.head_v_dim))
    return layer.out_proj(core.reshape(batch, length, -1))


def projections(layer, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The convolution's input q|k|v [B, T, 2 * key_dim + value_dim], the gate z [B, T, HV, dv],
    and b, a [B, T, HV], as the layer's forward computes them."""
    if hasattr(layer, "in_proj_qkvz"):  # Qwen3-Next: one projection, grouped by key head
        query, key, value, z, b, a = layer.fix_query_key_value_ordering(layer.in_proj_qkvz(hidden_states),
                                                                        layer.in_proj_ba(hidden_states))
        mixed_qkv = torch.cat([x.reshape(x.shape[0], x.shape[1], -1) for x in (query, key, value)], dim=-1)
        return mixed_qkv, z, b, a
    z = layer.in_proj_z(hidden_states)
    z = z.reshape(z.shape[0], z.shape[1], -1, layer.head_v_dim)
    return layer.in_proj_qkv(hidden_states), z, layer.in_proj_b(hidden_states), layer.in_proj_a(hidden_states)


def per_example(forward, hidden_states: torch.Tensor, cu: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """The layer on each example alone. The rows are laid end to end, as collate counts `cu`."""
    batch, length, width = hidden_states.shape
    bounds = cu.tolist()
    if bounds[0] != 0 or bounds[-1] != batch * length:
        raise ValueError(f"cu_seq_lens_q ends at {bounds[-1]}, the micro-batch holds {batch * length} tokens")
    flat = hidden_states.reshape(1, batch * length, width)
    outs = [forward(flat[:, start:end], **kwargs) for start, end in itertools.pairwise(bounds)]
    return torch.cat(outs, dim=1).view(batch, length, -1)


@functools.lru_cache(maxsize=1)
def fla_kernels() -> Kernels | None:
    """flash-linear-attention's short convolution and chunked gated delta rule, both taking
    `cu_seqlens` (checked in their signatures); None where it is missing, older, or does not load."""
    try:
        from fla.modules.causal_conv1d import causal_conv1d
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except Exception:  # noqa: BLE001 (an ImportError, or a Triton/CUDA error raised while importing)
        return None
    if not all("cu_seqlens" in inspect.signature(f).parameters for f in (causal_conv1d, chunk_gated_delta_rule)):
        return None
    return Kernels(causal_conv1d, chunk_gated_delta_rule)


def linear_attention_path_of(model, cuda: bool, packing: bool = False, padding_free: bool = False,
                             fla: bool | None = None) -> str | None:
    """The path a training micro-batch takes through `model`'s Gated DeltaNet layers (FLA, LOOP or
    TORCH, for the run's record); None for a model without them. Packed rows with padding (not
    `padding_free`) count as several rows. `fla`: whether its kernels load (None: try them)."""
    if not linear_attention_layers(model.config):
        return None
    fla = (cuda and fla_kernels() is not None) if fla is None else fla
    return linear_attention_path(cuda, fla, packing, 1 if padding_free else 2, cache=False)


def kernel_warning(model, cuda: bool, fla: bool | None = None) -> str | None:
    """One line where `model` has Gated DeltaNet layers and trains on CUDA without
    flash-linear-attention's kernels (slower, still exact); None otherwise. `fla` as above."""
    if not cuda or not linear_attention_layers(model.config):
        return None
    if (fla_kernels() is not None) if fla is None else fla:
        return None
    state = "does not load here" if importlib.util.find_spec("fla") else "is not installed"
    return (f"flash-linear-attention {state}: Gated DeltaNet layers run transformers' PyTorch reference (Qwen3.5-9B: "
            "1.22 s vs 0.70 s a step) and packed rows one example at a time; "
            f"{EXTRA} for its kernels")
