"""The routers' load-balancing loss of MoE models, per example, so that an optimizer step's value
does not depend on how the step is cut into micro-batches and ranks.

Definition. For example i (T_i real tokens; padding and the empty stand-in rows of load_micro_batch
excluded), layer l with E experts, top-k routing, router probabilities p_t = softmax(logits_t) and
c_te = 1 where expert e is among token t's top k:

    f_ile = (1/T_i) sum_t c_te      share of i's tokens routed to e (sums to k over e)
    P_ile = (1/T_i) sum_t p_te      mean router probability of e over i's tokens
    aux_il = E * sum_e f_ile P_ile  transformers' load_balancing_loss_func on one example and one
                                    layer (k when perfectly balanced)
    aux_i  = mean over the MoE layers of aux_il

and the step's value is the token-weighted mean over all its examples, on all ranks:

    aux = sum_i T_i aux_i / sum_i T_i

The loss trained on is token loss + router_aux_loss_coef * aux; metrics.jsonl's `aux_loss` is
`aux` (without the coefficient). Only P carries a gradient (the top-k choice is a step function),
as in transformers, Switch Transformer and DeepSeek-V3's sequence-wise balance loss.

Why per example and not as transformers computes it. transformers takes f and P over a whole
micro-batch, all layers pooled: a product of two means over the micro-batch, so the same step
cut into 8 micro-batches of 1 or 1 of 8 gives different values and gradients (and gradient
accumulation would change the objective). Per example, each term depends on its own example
only, and the weights T_i / sum T_i need the step's router-token count, which train_step's one
all-reduce carries anyway: no collective is added. The other exact choice, f over the whole
global batch (Qwen's global-batch balancing), needs every micro-batch's routing before the
first backward: a second forward of the step, or the step's activations held at once. The cost
of ours: it asks each sequence to be balanced, which is stricter than a global batch (Qwen
reports less expert specialisation under sequence-level balancing); with the released
coefficient 0.001 the term is a few thousandths of a token loss of about 1. Layers are averaged
rather than pooled so that two layers' imbalances cannot cancel.

Memory: the softmax of every MoE layer's router logits is kept for the backward, 4 bytes x
tokens x experts per layer: 0.4 GB for Qwen3-30B-A3B (48 layers, 128 experts) at 16k tokens,
1.6 GB for Qwen3-Next (48 layers, 512 experts). The router logits come from transformers'
`output_router_logits=True`, with which the model also computes its own (unused) pooled loss:
the same softmaxes once more, freed when the forward's output is, so they add to the forward's
peak (a hook on the routers would avoid it, but fires again in a checkpointed layer's recompute).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sftkit.arch.table import arch_of, text_config
from sftkit.errors import ConfigError


@dataclass(frozen=True)
class RouterBalance:
    """The load-balancing term of one model: its weight, and the routing it mirrors."""

    coef: float
    num_experts: int
    top_k: int


def router_balance(config, coef: float) -> RouterBalance | None:
    """The term for this model config under --router_aux_loss_coef `coef` (-1: the config's own
    router_aux_loss_coef); None for a dense model or a coefficient of 0."""
    text = text_config(config)
    if not arch_of(config).moe:
        if coef > 0:
            raise ConfigError(f"--router_aux_loss_coef {coef}: {getattr(text, 'model_type', 'this model')} has no "
                              "routed experts; drop the option")
        return None
    coef = getattr(text, "router_aux_loss_coef", 0.0) if coef < 0 else coef
    return RouterBalance(float(coef), text.num_experts, text.num_experts_per_tok) if coef > 0 else None


def balance_loss_sum(router_logits: tuple[torch.Tensor, ...], segments: torch.Tensor, lengths: torch.Tensor,
                     balance: RouterBalance) -> torch.Tensor:
    """sum_i T_i aux_i over this micro-batch's examples (see the module docstring).

    router_logits: one [tokens, experts] tensor per MoE layer, tokens in row-major order of the
    micro-batch; segments: [rows, width], the example each token belongs to, -1 for none;
    lengths: [examples], T_i. No host sync: the example count is the shape of `lengths`."""
    n = lengths.numel()
    seg = segments.reshape(-1).to(router_logits[0].device)
    seg = torch.where(seg < 0, n, seg)  # row n collects what belongs to no example, then is dropped
    counted = (seg < n).float()
    tokens = lengths.to(seg.device, torch.float32).clamp(min=1)
    total = torch.zeros((), dtype=torch.float32, device=seg.device)
    for logits in router_logits:
        probs = logits.float().softmax(dim=-1)
        top = probs.topk(balance.top_k, dim=-1).indices
        chosen = torch.zeros(n + 1, balance.num_experts, device=seg.device)
        chosen.index_put_((seg[:, None].expand_as(top), top), counted[:, None].expand_as(top).contiguous(),
                          accumulate=True)
        mass = torch.zeros(n + 1, balance.num_experts, device=seg.device).index_add(0, seg, probs)
        # T_i aux_il = E * sum_e (count_ie / T_i) (mass_ie / T_i) * T_i
        total = total + balance.num_experts * (chosen[:n] * mass[:n]).sum(dim=1).div(tokens).sum()
    return total / max(len(router_logits), 1)
