"""A model saved in the checkpoint layout it came in.

Released Qwen3.5 checkpoints (dense and MoE) are vision-language models
(`Qwen3_5ForConditionalGeneration`: a vision tower `model.visual.*`, the text model under
`model.language_model.*`, and multi-token-prediction weights `mtp.*` that transformers does not
load). sftkit trains the text model alone (`AutoModelForCausalLM` gives `Qwen3_5ForCausalLM`), whose
save_pretrained writes the text weights under the checkpoint's own names (transformers reverses
its key mapping) but a text-only config and no vision tower or MTP weights. `restore` puts those
back: the source's config.json, and every source tensor the save did not write, copied unchanged
(same dtype, same bytes) into one more shard, with an index over all of them. Then both
`Qwen3_5ForConditionalGeneration.from_pretrained` and `AutoModelForCausalLM.from_pretrained` load it.
"""

from __future__ import annotations

import json
from pathlib import Path

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
TEXT_SHARD = "model-text.safetensors"        # a single-file save, renamed beside the extra shard
EXTRA_SHARD = "model-vision-mtp.safetensors"  # the source's tensors that the text model does not hold
# how a vision-language checkpoint turns images (and videos) into its inputs: served beside the model
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json")


def vision_language_config(source: str | Path) -> dict | None:
    """The source checkpoint's config.json where it is a vision-language layout, else None."""
    file = Path(source) / "config.json"
    if not file.is_file():
        return None
    config = json.loads(file.read_text())
    return config if isinstance(config, dict) and "text_config" in config and "vision_config" in config else None


def weight_map(folder: Path) -> dict[str, str]:
    """tensor name -> shard file, from the index or the single safetensors file."""
    if (folder / INDEX).is_file():
        return json.loads((folder / INDEX).read_text())["weight_map"]
    if not (folder / SINGLE).is_file():
        return {}
    from safetensors import safe_open

    with safe_open(str(folder / SINGLE), framework="pt") as f:
        return dict.fromkeys(f.keys(), SINGLE)


def restore(saved: Path, source: str | Path) -> bool:
    """Give the model save_pretrained just wrote into `saved` the layout of `source`; False (and
    nothing changed) where the source is no vision-language checkpoint, `saved` holds an adapter
    (whose names apply to the text model, as sftkit loads the base), or the saved names are not the
    source's (then the text-only save stays, which AutoModelForCausalLM loads)."""
    config = vision_language_config(source)
    if config is None or (saved / "adapter_config.json").is_file():
        return False
    source, text = Path(source), weight_map(saved)
    original = weight_map(source)
    if not text or not set(text) <= set(original):
        return False
    extra = {key: shard for key, shard in original.items() if key not in text}
    write_extra_shard(source, extra, saved / EXTRA_SHARD)
    if (saved / SINGLE).is_file():
        (saved / SINGLE).rename(saved / TEXT_SHARD)
        text = dict.fromkeys(text, TEXT_SHARD)
    index = {"metadata": {}, "weight_map": {**text, **dict.fromkeys(extra, EXTRA_SHARD)}}
    (saved / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (saved / "config.json").write_text(json.dumps(with_saved_ties(config, saved), indent=2) + "\n")
    return True


def write_extra_shard(source: Path, extra: dict[str, str], out: Path) -> None:
    """The source's tensors named in `extra` (name -> its shard), unchanged, into one file."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    tensors = {}
    for shard in sorted(set(extra.values())):
        with safe_open(str(source / shard), framework="pt") as f:
            tensors.update({key: f.get_tensor(key) for key in f.keys() if key in extra})  # noqa: SIM118 (no dict)
    save_file(tensors, str(out), metadata={"format": "pt"})


def with_saved_ties(config: dict, saved: Path) -> dict:
    """The source config, untied where the saved model was untied (merge-lora unties an embedding
    and lm_head trained apart)."""
    saved_config = json.loads((saved / "config.json").read_text())
    if saved_config.get("tie_word_embeddings", True) or not config.get("tie_word_embeddings", False):
        return config
    return {**config, "tie_word_embeddings": False,
            "text_config": {**config["text_config"], "tie_word_embeddings": False}}


def copy_processor_files(source: str | Path, saved: Path) -> list[str]:
    """The source checkpoint's image and video processor files, copied into `saved` where they are
    not there already (a served vision-language model needs them to take an image); their names."""
    import shutil

    copied = []
    for name in PROCESSOR_FILES:
        if (Path(source) / name).is_file() and not (saved / name).exists():
            shutil.copyfile(Path(source) / name, saved / name)
            copied.append(name)
    return copied


def adapter_on_vision_model(adapter: Path) -> bool:
    """Whether a LoRA adapter was trained on a vision-language model (its names go through
    `language_model`), which its base must then be loaded as; False for one on a text model."""
    from safetensors import safe_open

    from sftkit.arch.vision import LANGUAGE_MODEL

    file = adapter / "adapter_model.safetensors"
    if not file.is_file():
        return False
    with safe_open(str(file), framework="pt") as f:
        return any(f".{LANGUAGE_MODEL}." in key for key in f.keys())  # noqa: SIM118 (safe_open is no dict)
