"""Tiny random-init models of every Qwen architecture sftkit trains, saved as a user would find
them on disk: config, safetensors, the tokenizer and the generation's own chat template.

The real Qwen3.5 tokenizer (248,320 rows) is not available offline here, so every model pairs the
vendored Qwen3 tokenizer (151,936 rows, the same ChatML special-token names) with its generation's
template from tests/templates/ (copied from ../shared/qwen/templates, see tests/templates/README.md).
Qwen3.5 models are saved in their vision-language layout (`Qwen3_5ForConditionalGeneration`: a tiny
vision tower, the text model under `model.language_model`) plus MTP weights (`mtp.*`), as the
released checkpoints are.
"""

from __future__ import annotations

import json
from pathlib import Path

TEMPLATES = Path(__file__).parent / "templates"

# model_type -> the template its generation ships (file in tests/templates/)
TEMPLATE = {
    "qwen3": "qwen3.jinja",
    "qwen3_moe": "qwen3.jinja",
    "qwen3_next": "qwen3_instruct_2507.jinja",
    "qwen3_5": "qwen3_5_think.jinja",
    "qwen3_5_moe": "qwen3_6.jinja",
}
KINDS = tuple(TEMPLATE)

_COMMON = {"vocab_size": 151936, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
           "head_dim": 16, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "initializer_range": 0.5,
           "bos_token_id": 151643, "eos_token_id": 151645, "pad_token_id": 151643}
_LINEAR = {"linear_conv_kernel_dim": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
           "linear_num_key_heads": 2, "linear_num_value_heads": 4}
_MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "router_aux_loss_coef": 0.001}
_HYBRID_LAYERS = ["linear_attention", "linear_attention", "linear_attention", "full_attention"]


def text_config(kind: str, overrides: dict | None = None) -> dict:
    """The tiny text model's config values for one model_type; `overrides` replace some (a base
    of another size: {"hidden_size": 96})."""
    return {**_text_config(kind), **(overrides or {})}


def _text_config(kind: str) -> dict:
    if kind == "qwen3":
        return dict(**_COMMON, intermediate_size=128, num_hidden_layers=2, tie_word_embeddings=True)
    if kind == "qwen3_moe":
        return dict(**_COMMON, **_MOE, intermediate_size=128, num_hidden_layers=2, tie_word_embeddings=False)
    if kind == "qwen3_next":
        return dict(**_COMMON, **_LINEAR, **_MOE, intermediate_size=128, shared_expert_intermediate_size=32,
                    num_hidden_layers=4, layer_types=_HYBRID_LAYERS, tie_word_embeddings=False)
    if kind == "qwen3_5":
        return dict(**_COMMON, **_LINEAR, intermediate_size=128, num_hidden_layers=4, layer_types=_HYBRID_LAYERS,
                    tie_word_embeddings=True)
    if kind == "qwen3_5_moe":
        return dict(**_COMMON, **_LINEAR, **_MOE, shared_expert_intermediate_size=32, num_hidden_layers=4,
                    layer_types=_HYBRID_LAYERS, tie_word_embeddings=False)
    raise ValueError(kind)


# the Qwen3 tokenizer's ids of the vision tokens (a real Qwen3.5 config holds its own vocabulary's)
_VISION_TOKENS = {"image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
                  "vision_end_token_id": 151653}
# the image processor of a tiny model: the vision tower's patches (4 pixels, merged 2x2), images
# resized to between 8x8 and 32x32 pixels, so that an image is 1 to 16 tokens
_IMAGE_PROCESSOR = {"patch_size": 4, "merge_size": 2, "temporal_patch_size": 2,
                    "size": {"shortest_edge": 64, "longest_edge": 1024}}
_VISION = {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": 4,
           "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": 64, "num_position_embeddings": 16}


def build(kind: str, path: Path, seed: int = 0, overrides: dict | None = None) -> Path:
    """Save a tiny random-init `kind` model with tokenizer and template into `path`; returns it.
    `overrides`: text config values to change (see text_config)."""
    import torch
    import transformers
    from transformers import AutoTokenizer, GenerationConfig

    from sftkit.models import bundled_tokenizer_dir

    path = Path(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text = text_config(kind, overrides)
        if kind in ("qwen3_5", "qwen3_5_moe"):
            cls = "Qwen3_5" if kind == "qwen3_5" else "Qwen3_5Moe"
            config = getattr(transformers, f"{cls}Config")(text_config=text, vision_config=_VISION,
                                                           tie_word_embeddings=text["tie_word_embeddings"],
                                                           **_VISION_TOKENS)
            model = getattr(transformers, f"{cls}ForConditionalGeneration")(config)
        else:
            config = transformers.AutoConfig.for_model(kind, **text)
            model = transformers.AutoModelForCausalLM.from_config(config)
    # the Qwen3.5 releases are sharded with an index (which transformers reads only where no single
    # model.safetensors is beside it); 20MB cuts the tiny ones in shards too
    model.save_pretrained(path, max_shard_size="20MB" if kind in ("qwen3_5", "qwen3_5_moe") else "5GB")
    if kind in ("qwen3_5", "qwen3_5_moe"):
        _add_mtp_weights(path, text["hidden_size"], seed)
        image_processor().save_pretrained(path)
    tok = AutoTokenizer.from_pretrained(bundled_tokenizer_dir())
    tok.chat_template = (TEMPLATES / TEMPLATE[kind]).read_text()
    tok.save_pretrained(path)
    GenerationConfig.from_pretrained(bundled_tokenizer_dir()).save_pretrained(path)
    return path


def build_qwen3_vl(path: Path, seed: int = 0) -> Path:
    """A tiny random-init Qwen3-VL (`qwen3_vl`: a Qwen3 text model with interleaved M-RoPE, and a
    vision tower whose first block also feeds the text model's first layer, "deepstack"), saved with
    the vendored Qwen3 tokenizer and Qwen3.5-2B's template: Qwen3-VL's own template is not among the
    ones kept offline (../shared/qwen/templates), and sftkit renders whatever template it is given,
    which places images the same way."""
    import torch
    import transformers
    from transformers import AutoTokenizer, GenerationConfig

    from sftkit.models import bundled_tokenizer_dir

    text = {**{k: v for k, v in _COMMON.items()}, "intermediate_size": 128, "num_hidden_layers": 2,
            "rope_parameters": {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [4, 2, 2],
                                "mrope_interleaved": True}}
    vision = {**_VISION, "depth": 2, "deepstack_visual_indexes": [0]}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = transformers.Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True,
                                            **_VISION_TOKENS)
        transformers.Qwen3VLForConditionalGeneration(config).save_pretrained(path)
    image_processor().save_pretrained(path)
    tok = AutoTokenizer.from_pretrained(bundled_tokenizer_dir())
    tok.chat_template = (TEMPLATES / "qwen3_5_nothink.jinja").read_text()
    tok.save_pretrained(path)
    GenerationConfig.from_pretrained(bundled_tokenizer_dir()).save_pretrained(path)
    return Path(path)


def image_processor():
    """The tiny vision-language models' image processor (transformers' Qwen2-VL one, PIL form: this
    machine has no torchvision)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(**_IMAGE_PROCESSOR)


def _add_mtp_weights(path: Path, hidden: int, seed: int) -> None:
    """The released Qwen3.5 checkpoints carry a multi-token-prediction head (`mtp.*`) that
    transformers does not load; a tiny stand-in of its shapes, in its own shard, as they ship."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed + 1)
    tensors = {"mtp.fc.weight": torch.randn(hidden, 2 * hidden, generator=g),
               "mtp.norm.weight": torch.ones(hidden),
               "mtp.pre_fc_norm_embedding.weight": torch.ones(hidden),
               "mtp.pre_fc_norm_hidden.weight": torch.ones(hidden)}
    save_file(tensors, path / "model-mtp.safetensors", metadata={"format": "pt"})
    index_path = path / "model.safetensors.index.json"
    if index_path.is_file():
        index = json.loads(index_path.read_text())
    else:
        from safetensors import safe_open

        with safe_open(path / "model.safetensors", "pt") as f:
            index = {"metadata": {}, "weight_map": {k: "model.safetensors" for k in f.keys()}}  # noqa: SIM118 (safe_open is no dict)
    index["weight_map"].update({k: "model-mtp.safetensors" for k in tensors})
    index_path.write_text(json.dumps(index, indent=2))
    config_path = path / "config.json"
    config = json.loads(config_path.read_text())
    config["text_config"]["mtp_num_hidden_layers"] = 1
    config_path.write_text(json.dumps(config, indent=2))
