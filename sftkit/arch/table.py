"""One row of facts per architecture of the Qwen family, keyed by the config's `model_type`.

Everything that differs between generations and is not the chat template (templates are read,
never recognised: see sftkit/data/render.py) is a field here, so that supporting a new generation
is one entry, not edits in several modules. Code that needs a fact asks `arch_of(config)`.

Beside the table, the three readers of a model's structure that every other module shares:
`text_config` (the text model's config inside a vision-language one), `linear_attention_layers`
(which decoder layers are linear attention: the config's `layer_types`, the one source of that
fact) and `decoder_layers` (the repeated blocks, which FSDP2, checkpointing and compile act on).
"""

from __future__ import annotations

from dataclasses import dataclass

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")  # a dense MLP, or a MoE layer's shared expert
# Gated DeltaNet: the input projections (Qwen3-Next fuses q, k, v and the output gate z in one) and
# the output projection. Left out by default: the decay/beta gates (in_proj_ba; in_proj_a, in_proj_b)
# and shared_expert_gate, whose outputs are one number per value head (32 on Qwen3-Next-80B-A3B) or
# a single number: a rank-16 adapter there is about as big as the full update of its output side.
# List them in --lora_target_modules (or modules_to_save) to train them.
# Qwen3.5-MoE's shared expert, named with its parent: the routed experts are lora_expert_parameters.
SHARED_EXPERT = tuple(f"shared_expert.{name}" for name in MLP)
DELTANET_NEXT = ("in_proj_qkvz", "out_proj")
DELTANET_3_5 = ("in_proj_qkv", "in_proj_z", "out_proj")
EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")  # transformers 5's fused [experts, out, in]
# PEFT 0.21 rewrites the target_modules gate_proj/up_proj/down_proj of qwen2_moe-style model_types
# (qwen3_moe, qwen3_next) into the fused routed experts (its transformers-4 compatibility), so there
# a shared expert's nn.Linear layers can only be reached as parameters, and no MLP name may stand in
# lora_modules: PEFT would turn it into an expert ParamWrapper, which refuses lora_dropout 0.05.
SHARED_EXPERT_WEIGHTS = tuple(f"mlp.shared_expert.{name}.weight" for name in MLP)


@dataclass(frozen=True)
class Arch:
    """Facts about one architecture (one or more model_types)."""

    name: str
    lora_modules: tuple[str, ...] = ATTENTION + MLP
    """nn.Linear names that LoRA wraps by default (PEFT target_modules, matched by name suffix)."""
    lora_expert_parameters: tuple[str, ...] = ()
    """Expert tensors that LoRA reaches by default (PEFT target_parameters, each wrapped by a
    ParamWrapper): the fused 3-D routed experts, and where PEFT cannot name it as a module, the
    shared expert. ParamWrapper refuses lora_dropout != 0 (see sftkit.models.lora_parameters)."""
    moe: bool = False
    """Routed experts: the config's router_aux_loss_coef weighs a load-balancing loss (arch/moe.py)."""
    gated_attention: bool = False
    """q_proj also yields a sigmoid gate per head output (2 x heads x head_dim outputs): FLOPs."""
    fused_loss: bool = True
    """The last (normed) hidden state goes straight into a bias-free lm_head, with no logit scaling
    or soft-capping: the fused loss head (sftkit/loss.py) computes exactly what the model would."""


# a model_type the table does not know: Qwen3-like facts, but the plain loss path (its logits may
# be scaled or capped)
UNKNOWN = Arch("unknown", fused_loss=False)
ARCHS: dict[str, Arch] = {
    "qwen2": Arch("Qwen2.5"),
    "llama": Arch("Llama"),
    "mistral": Arch("Mistral"),
    "qwen3": Arch("Qwen3"),
    "qwen3_moe": Arch("Qwen3 MoE", lora_modules=ATTENTION, lora_expert_parameters=EXPERTS, moe=True),
    "qwen3_next": Arch("Qwen3-Next", lora_modules=ATTENTION + DELTANET_NEXT,
                       lora_expert_parameters=EXPERTS + SHARED_EXPERT_WEIGHTS, moe=True, gated_attention=True),
    "qwen3_5": Arch("Qwen3.5", lora_modules=ATTENTION + DELTANET_3_5 + MLP, gated_attention=True),
    "qwen3_5_moe": Arch("Qwen3.5 MoE", lora_modules=ATTENTION + DELTANET_3_5 + SHARED_EXPERT,
                        lora_expert_parameters=EXPERTS, moe=True, gated_attention=True),
}
# Qwen3-VL: a Qwen3 text model (multimodal rotary positions, vision features added to its first
# layers' hidden states) under a vision tower
ARCHS["qwen3_vl"] = ARCHS["qwen3_vl_text"] = Arch("Qwen3-VL")
# the text model's own config inside a vision-language checkpoint
ARCHS["qwen3_5_text"] = ARCHS["qwen3_5"]
ARCHS["qwen3_5_moe_text"] = ARCHS["qwen3_5_moe"]


def text_config(config):
    """The text model's config: a vision-language config's text part, or the config itself."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def arch_of(config) -> Arch:
    """The facts for a model config (a vision-language config: its text model); UNKNOWN's for a
    model_type the table does not know."""
    text = text_config(config)
    return ARCHS.get(getattr(text, "model_type", None)) or ARCHS.get(getattr(config, "model_type", None)) or UNKNOWN


def linear_attention_layers(config) -> list[int]:
    """The indices of the decoder layers that are linear attention (Gated DeltaNet in Qwen3-Next
    and Qwen3.5: a packed row must hand them its example boundaries), from the config's
    `layer_types`; [] for a model without them."""
    text = text_config(config)
    types = getattr(text, "layer_types", None) or []
    return [i for i, kind in enumerate(types[:getattr(text, "num_hidden_layers", None)]) if kind == "linear_attention"]


def decoder_layers(model) -> list:
    """The repeated transformer blocks, in order (transformers marks them GradientCheckpointingLayer)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
