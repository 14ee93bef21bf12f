"""FSDP2: every weight, gradient and optimizer moment sharded over the ranks (torch's fully_shard).

accelerate 1.15 enables FSDP for GPU device modes only and silently runs a CPU launch as plain
DDP, so sftkit shards the model itself, on every device, and accelerate runs the processes as a
plain multi-process run (sftkit/accel.py). One group per decoder layer, then the root (embeddings,
final norm, lm_head): a layer's weights are gathered for its forward and its backward only.
Gradients are reduce-scattered after every micro-batch's backward, also under accumulation:
holding them back (set_requires_gradient_sync(False)) would keep every layer's whole gradient
until the last micro-batch, DDP's memory.

  shard(model, bf16)       fully_shard per decoder layer, then the root
  is_sharded(model)        whether `model` is one that shard() returned
  clip_grad_norm_          the norm of all ranks' gradient shards, and the clip by it
  full_state_dict(model)   the whole model gathered on rank 0's CPU, for save_pretrained

What a sharded checkpoint holds (DCP shards of the trained weights and optimizer, every rank's
RNG states) is written and read by sftkit/checkpoint.py, with every other checkpoint file.
"""

from __future__ import annotations

import math

from sftkit.arch.table import decoder_layers


def shard(model, bf16: bool, device_type: str, offload: bool = False):
    """`model` sharded in place over the default process group (every rank calls it). With
    `bf16` layers compute with bf16 copies of the fp32 weights and gradients are reduced in fp32
    (bf16 keeps 8 significant bits, and a sum over 8 ranks in it can lose 3); otherwise all is fp32.
    The optimizer must be built afterwards: fully_shard replaces every parameter by a DTensor.
    `offload` (fsdp2_offload.yaml): the shards of the weights, gradients and AdamW moments live in
    CPU memory, copied to the device for each layer's all-gather, and the optimizer steps on the
    CPU: the device keeps the layers being computed and the activations."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    where = CPUOffloadPolicy(pin_memory=device_type == "cuda") if offload else OffloadPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy, offload_policy=where)
    # the root keeps its weights gathered from its forward to the end of the backward (FSDP2 does
    # not reshard the root after forward): the fused loss head reads the whole lm_head weight there
    fully_shard(model, mesh=mesh, mp_policy=policy, offload_policy=where)
    return model


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def clip_grad_norm_(params: list, max_norm: float):
    """Scale the gradients so that their global 2-norm is at most `max_norm`; returns the norm
    before clipping, a plain tensor, equal on every rank. A rank's own shards give only part of
    the sum of squares: full_tensor() all-reduces it (clipped by its own part, each rank's shard
    would be scaled by another factor: an update no single model's gradient gives)."""
    import torch
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, 2.0)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    if math.isfinite(max_norm):
        torch.nn.utils.clip_grads_with_norm_([p for p in params if p.grad is not None], max_norm, total)
    return total


def full_state_dict(model) -> dict:
    """The unsharded state dict on rank 0's CPU ({} on the other ranks); every rank must call it.
    Tied weights would come back as separate copies (lm_head.weight beside
    model.embed_tokens.weight): each name of a shared parameter gets the same tensor again, so
    save_pretrained drops the tied one as it does for an unsharded model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    first: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        kept = first.setdefault(id(param), name)
        if kept != name and kept in state and name in state:
            state[name] = state[kept]
    return state
