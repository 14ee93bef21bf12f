"""The loss: token cross-entropy summed over supervised tokens, normalised by the number of
supervised tokens in the whole optimizer step (all micro-batches, all ranks).

(a + b) / (n + m) is not a/n + b/m: averaging per micro-batch over-weights short examples.

Two paths compute the same sum:
  plain  the model projects the supervised positions onto the vocabulary (`logits_to_keep`), and
         autograd keeps those fp32 logits for the backward: 0.6 MB per supervised token with
         Qwen3's 151,936-word vocabulary, 9.7 GB for 16k tokens.
  fused  the model returns its final hidden states; the vocabulary projection, the loss and both
         gradients are computed chunk by chunk in one pass, so at most `chunk` rows of logits
         exist at once (512 rows: 0.3 GB) and nothing is recomputed. Same three matmuls as the
         plain path; rows whose label is -100 never reach the lm_head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from sftkit.arch.moe import RouterBalance, balance_loss_sum
from sftkit.arch.table import arch_of
from sftkit.arch.vision import stand_in_tower


@dataclass
class FusedHead:
    lm_head: torch.nn.Linear   # read at every call: DeepSpeed may swap the weight tensor's dtype
    dtype: torch.dtype | None  # matmul dtype (bf16 under bf16 autocast); None: the weight's own
    chunk: int                 # rows of logits computed at once
    # the lm_head gradient's running sum over chunks: fp32, or the matmul dtype (see fused_head)
    grad_dtype: torch.dtype = torch.float32


def fused_head(model, mixed_precision: str, zero3: bool, chunk: int, cuda: bool = False) -> FusedHead | None:
    """The fused head for this (unwrapped) model, or None where only the plain path is exact.

    Not under ZeRO-3 (the lm_head weight is a partition outside its module's forward), not with
    fp16 (gradients computed before the loss scale is applied could underflow), and not when the
    lm_head is replaced (LoRA on lm_head, modules_to_save) or the architecture transforms logits.

    On a GPU under bf16 the lm_head gradient is summed in bf16, as the plain path's one bf16
    matmul returns it: an fp32 sum takes a [vocab, hidden] fp32 temporary per chunk (1.2 GB for
    Qwen3-1.7B) and two more passes over it, which would make the fused loss slower than the plain
    one. On a CPU it stays fp32 (no bf16 speed to gain there).
    """
    if chunk <= 0 or zero3 or mixed_precision == "fp16":
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT
    if not arch_of(base.config).fused_loss:
        return None
    head = base.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.bias is not None or head.weight.dtype == torch.float16:
        return None
    dtype = torch.bfloat16 if mixed_precision == "bf16" else None
    return FusedHead(head, dtype, chunk, dtype if cuda and dtype is not None else torch.float32)


def token_loss_sum(model, batch, head: FusedHead | None = None) -> torch.Tensor:
    """Sum of cross-entropies over the micro-batch's supervised tokens."""
    return loss_sums(model, batch, head)[0]


def loss_sums(model, batch, head: FusedHead | None = None,
              balance: RouterBalance | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(sum of token cross-entropies, and with `balance` the routers' sum over examples of tokens
    x balance loss from the same forward: sftkit/arch/moe.py)."""
    ce, out = forward_loss(model, batch, head, **({"output_router_logits": True} if balance else {}))
    if balance is None:
        return ce, None
    return ce, balance_loss_sum(out.router_logits, batch.segments, batch.lengths, balance)


def loss_and_hidden_states(model, batch, head: FusedHead | None = None) -> tuple[torch.Tensor, tuple]:
    """(sum of token cross-entropies, every layer's hidden states) of one forward: what
    sftkit/packing_check.py compares."""
    ce, out = forward_loss(model, batch, head, output_hidden_states=True)
    return ce, out.hidden_states


def forward_loss(model, batch, head: FusedHead | None = None, **extra) -> tuple[torch.Tensor, Any]:
    """(sum of token cross-entropies over the supervised tokens, the model's output) of one forward;
    `extra`: more forward arguments (router logits, hidden states).

    `use_cache=False`: with a cache, transformers ignores packed position_ids silently and the
    examples of a packed row attend to each other.
    """
    with stand_in_tower(model, batch) as tower:  # no image here: the vision tower runs anyway, times 0
        if head is None:
            out = model(**batch.inputs, logits_to_keep=batch.keep, use_cache=False, **extra)
            loss = F.cross_entropy(out.logits.float(), batch.targets, reduction="sum")
        else:
            # An all-False mask: the model's own lm_head projects no row. hidden_states[-1] is the final,
            # normed hidden state, the lm_head's input (checked against the plain path in tests).
            out = model(**batch.inputs, logits_to_keep=torch.zeros_like(batch.keep), use_cache=False,
                        **{**extra, "output_hidden_states": True})
            loss = fused_cross_entropy(out.hidden_states[-1][batch.keep], batch.targets, head)
    return sum(tower, loss), out


def fused_cross_entropy(hidden: torch.Tensor, targets: torch.Tensor, head: FusedHead) -> torch.Tensor:
    weight = head.lm_head.weight
    # inside forward() autograd is off, so whether gradients are wanted is decided here
    grads = torch.is_grad_enabled()
    return FusedLinearCrossEntropy.apply(hidden, weight, targets, head.chunk, head.dtype or weight.dtype,
                                         grads and hidden.requires_grad, grads and weight.requires_grad,
                                         head.grad_dtype)


class FusedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T, target_i), with the gradients computed during the forward.

    Per chunk: logits = h W^T in `dtype`, loss = logsumexp - logit[target], and d loss / d logits
    = softmax - onehot, from which dh = g W and dW += g^T h (summed in `grad_dtype`). The backward
    only scales the stored gradients by the incoming one (the loss scale, 1/n_supervised).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int, dtype: torch.dtype, want_h: bool, want_w: bool,
                grad_dtype: torch.dtype = torch.float32):
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_h = torch.empty_like(hidden) if want_h else None
            grad_w = torch.zeros(weight.shape, dtype=grad_dtype, device=weight.device) if want_w else None
            step = softmax_chunk if dtype == torch.float32 else softmax_chunk_low_precision
            for start in range(0, hidden.shape[0], chunk):
                h = hidden[start:start + chunk].to(dtype)
                t = targets[start:start + chunk]
                loss, probs = step(h @ w.T, t)
                total += loss
                if not (want_h or want_w):
                    continue
                probs[torch.arange(len(t), device=t.device), t] -= 1.0
                g = probs.to(dtype)
                del probs  # the fp32 [chunk, vocab] buffer goes before the matmuls allocate theirs
                if want_h:
                    grad_h[start:start + chunk] = g @ w
                if want_w:
                    if grad_w.dtype == dtype:  # one GEMM that accumulates into grad_w: no temporary
                        grad_w.addmm_(g.T, h)
                    else:  # a bf16 matmul accumulates in fp32 inside; the sum over chunks stays fp32
                        grad_w += (g.T @ h).float()
                del g  # (in fp32 the softmax buffer itself) freed before the next chunk's logits exist
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        dh = None if grad_h is None else grad_h * grad_out.to(grad_h.dtype)
        dw = None if grad_w is None else (grad_w.float() * grad_out).to(ctx.weight_dtype)
        return dh, dw, None, None, None, None, None, None


def softmax_chunk(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss, softmax) of fp32 logits, in place: one [chunk, vocab] fp32 buffer in all."""
    target_logit = logits.gather(1, targets[:, None])
    peak = logits.amax(dim=1, keepdim=True)
    exps = logits.sub_(peak).exp_()
    sums = exps.sum(dim=1, keepdim=True)
    return (sums.log() + peak - target_logit).sum(), exps.div_(sums)


def softmax_chunk_low_precision(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same from bf16 logits in fewer passes over [chunk, vocab]: one max over bf16, one fused
    softmax that reads bf16 and writes fp32 (where the fp32 path casts, subtracts, exponentiates,
    sums and divides, each a full pass). logsumexp comes from the softmax itself: the largest
    logit's probability is 1 / sum(exp(logit - max)), at least 1/vocab, so its log never underflows."""
    peak, where = logits.max(dim=1, keepdim=True)
    probs = torch.softmax(logits, dim=1, dtype=torch.float32)
    lse = peak.float() - probs.gather(1, where).log()
    return (lse - logits.gather(1, targets[:, None]).float()).sum(), probs
