"""Model FLOPs of a training step and MFU: achieved model FLOPs / time / the device's peak.

Counted (one multiply-add = 2 FLOPs), per the PaLM appendix B convention with two sftkit choices:
  * weights: 2 * (non-embedding matmul parameters) per token forward; the lm_head counts only for
    supervised positions, because those are the only rows training needs (the fused loss never
    computes the others, so counting them would inflate MFU);
  * attention: QK^T and AV, 4 * layers * heads * head_dim per (query, key) pair forward, causal:
    an example of length s has s(s+1)/2 pairs (the sum of s^2 is carried by the batch; s^2/2 used);
  * backward: 2x forward for the activations' gradients, plus 1x forward for the weights'
    gradients of trainable matmuls only (full fine-tuning: 3x forward; LoRA: about 2x).
Recomputation by gradient checkpointing is not counted: MFU measures useful work.
"""

from __future__ import annotations

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


def flops_per_step_fn(config, lora: bool):
    """f(tokens, supervised tokens, sum of length^2) -> model FLOPs of the training step."""
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    h, layers = c.hidden_size, c.num_hidden_layers
    # Qwen3.5-MoE's config has no intermediate_size (issue 20: train crashed here). Stop-gap until
    # the MoE FLOPs land: the MLP width a token passes through, its active experts plus the shared one
    inter = getattr(c, "intermediate_size", None) or (
        c.moe_intermediate_size * c.num_experts_per_tok + getattr(c, "shared_expert_intermediate_size", 0))
    head_dim = getattr(c, "head_dim", None) or h // c.num_attention_heads
    q, kv = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim
    body = layers * (h * q + 2 * h * kv + q * h + 3 * h * inter)  # q, k, v, o; gate, up, down
    head = c.vocab_size * h
    weight_pass = 2 if lora else 3  # LoRA's frozen weights need no weight gradient

    def flops(tokens: int, supervised: int, pairs: int) -> float:
        forward_attn = 4 * layers * q * pairs / 2
        return weight_pass * 2 * body * tokens + weight_pass * 2 * head * supervised + 3 * forward_attn

    return flops
