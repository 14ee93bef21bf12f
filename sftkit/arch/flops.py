"""Model FLOPs of a training step and MFU: achieved model FLOPs / time / the device's peak.

Counted (one multiply-add = 2 FLOPs), per the PaLM appendix B convention with sftkit's choices:
  * weights: 2 * (the matmul parameters a token passes through) per token forward. Dense layers
    count whole; a MoE layer counts its router, its top-k routed experts (not all of them) and its
    shared expert with that expert's sigmoid gate: active parameters, as MoE papers report them.
    The lm_head counts only for supervised positions, because those are the only rows training
    needs (the fused loss never computes the others, so counting them would inflate MFU);
  * softmax attention, on every layer that is not linear attention: QK^T and AV,
    4 * heads * head_dim per (query, key) pair forward, causal: an example of length s has
    s(s+1)/2 pairs (the sum of s^2 is carried by the batch; s^2/2 used). Qwen3-Next and Qwen3.5
    gate each head's output, so their q_proj has 2 * heads * head_dim outputs;
  * Gated DeltaNet layers (`table.linear_attention_layers`: the config's `layer_types`): their
    projections (in_proj qkvz and ba, out_proj) as weights, the depthwise causal conv1d as
    kernel * channels multiply-adds, and the recurrence S_t = a_t S_{t-1} (I - b_t k_t k_t^T)
    + b_t v_t k_t^T, o_t = S_t q_t (Yang et al. 2024, Gated Delta Networks, eq. 10) as
    4 * key_head_dim * value_head_dim multiply-adds per value head per token (decay, S k, the
    rank-1 update, S q), as Megatron's Qwen3.5 estimate counts it. The chunked kernels do more
    arithmetic than that; MFU counts the model's work, not the kernel's;
  * backward: 2x forward for the activations' gradients, plus 1x forward for the weights'
    gradients of trainable matmuls only (full fine-tuning: 3x forward; LoRA: about 2x).
Recomputation by gradient checkpointing is not counted: MFU measures useful work. The embedding
(a lookup), norms, activations and RoPE are not counted either (under 1% at Qwen3 sizes).
"""

from __future__ import annotations

from dataclasses import dataclass

from sftkit.arch.table import arch_of, linear_attention_layers, text_config

# Dense bf16 tensor-core peaks in TFLOPS (vendor data sheets, without sparsity). Matched against
# torch.cuda.get_device_name() in order, so the PCIe H100 comes before the generic H100 entry.
PEAK_TFLOPS = (
    ("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("H20", 148.0), ("GH200", 989.0),
    ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10", 125.0),
)


def peak_flops(device_name: str | None, override_tflops: float = 0.0) -> float | None:
    """FLOPs per second of one device, or None when unknown (then no MFU is reported)."""
    if override_tflops > 0:
        return override_tflops * 1e12
    for key, tflops in PEAK_TFLOPS:
        if device_name and key in device_name:
            return tflops * 1e12
    return None


@dataclass(frozen=True)
class TokenCost:
    """Forward multiply-adds per token of the decoder (no lm_head), and the attention's share."""

    weights: int         # matmul parameters one token passes through (active ones only)
    recurrence: int      # Gated DeltaNet state updates: not weights, so LoRA does not change them
    attention_width: int  # sum over full-attention layers of heads * head_dim (per causal pair)


def token_cost(config) -> TokenCost:
    """The decoder's per-token forward cost, read from a model config (a vision-language
    config: its text model, the part sftkit trains)."""
    c = text_config(config)
    linear = set(linear_attention_layers(config))
    weights = recurrence = width = 0
    for i in range(c.num_hidden_layers):
        if i in linear:
            w, r = delta_net(c)
            weights, recurrence = weights + w, recurrence + r
        else:
            weights += attention(c, arch_of(config).gated_attention)
            width += c.num_attention_heads * head_dim(c)
        weights += moe(c) if is_moe_layer(c, i) else 3 * c.hidden_size * c.intermediate_size
    return TokenCost(weights, recurrence, width)


def head_dim(c) -> int:
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def attention(c, gated: bool) -> int:
    """q (and its output gate), k, v, o projections."""
    q, kv = c.num_attention_heads * head_dim(c), c.num_key_value_heads * head_dim(c)
    return c.hidden_size * (q * (2 if gated else 1) + 2 * kv) + q * c.hidden_size


def delta_net(c) -> tuple[int, int]:
    """(projection and conv multiply-adds, recurrence multiply-adds) of one Gated DeltaNet layer."""
    keys = c.linear_num_key_heads * c.linear_key_head_dim
    values = c.linear_num_value_heads * c.linear_value_head_dim
    projections = c.hidden_size * (2 * keys + 2 * values + 2 * c.linear_num_value_heads) + values * c.hidden_size
    conv = c.linear_conv_kernel_dim * (2 * keys + values)
    return projections + conv, 4 * c.linear_num_value_heads * c.linear_key_head_dim * c.linear_value_head_dim


def is_moe_layer(c, i: int) -> bool:
    """transformers' rule (Qwen3 MoE, Qwen3-Next); Qwen3.5 MoE has no dense layers and no such fields."""
    if not getattr(c, "num_experts", 0):
        return False
    return i not in (getattr(c, "mlp_only_layers", None) or []) and (i + 1) % getattr(c, "decoder_sparse_step", 1) == 0


def moe(c) -> int:
    """Router, top-k routed experts (gate, up, down each), shared expert and its gate."""
    h, shared = c.hidden_size, getattr(c, "shared_expert_intermediate_size", 0) or 0
    routed = c.num_experts_per_tok * 3 * h * c.moe_intermediate_size
    return h * c.num_experts + routed + (3 * h * shared + h if shared else 0)


def flops_per_step_fn(config, lora: bool):
    """f(tokens, supervised tokens, sum of length^2) -> model FLOPs of the training step."""
    cost = token_cost(config)
    c = text_config(config)
    head = c.vocab_size * c.hidden_size
    weight_pass = 2 if lora else 3  # LoRA's frozen weights need no weight gradient

    def flops(tokens: int, supervised: int, pairs: int) -> float:
        forward_attn = 4 * cost.attention_width * pairs / 2
        return (weight_pass * 2 * (cost.weights * tokens + head * supervised)
                + 3 * (forward_attn + 2 * cost.recurrence * tokens))

    return flops
