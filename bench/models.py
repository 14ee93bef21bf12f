"""Random-init models for the benchmarks: from a preset name, a dict of config values or a saved
config.json, saved with sftkit's bundled Qwen3 tokenizer; and tests/family.py's tiny model of each
architecture.

    path = build_preset("tiny128", root)                 # root/tiny128-<hash of its config>, built once
    path = build(config({"model_type": "qwen3", ...}), root, "qwen3-h256")
    path = family("qwen3_5", root, {"vocab_size": 248_320})

The presets, for `bench.train_bench --model` and `bench.checkpoint_bench --model`:
  tiny, tiny128                     sftkit's tiny-qwen3 (hidden 64), and the same at hidden 128
  qwen3-0.6b, qwen3-1.7b, qwen3-8b  Qwen's published configs (bench/qwen3), saved in bf16
  qwen3.5-2b, qwen3-30b-a3b-12l     the published Qwen3.5-2B, and 12 of Qwen3-30B-A3B's 48 layers
  tiny-qwen3.5, tiny-moe            stand-ins of those two architectures for a CPU (the GPU check's
                                    dry run): Qwen3.5's whole vocabulary, a qwen3_moe of 8 experts
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QWEN3_DIR = REPO / "bench" / "qwen3"  # Qwen's published configs (no weights), copied from ../shared/qwen3
# Newer generations, built from a config alone (bench/qwen3_5/README.md, bench/qwen3_moe/README.md).
# The Qwen3 tokenizer's ids (< 151,936) fit Qwen3.5's 248,320-word vocabulary, whose every row is
# still in the embedding and lm_head.
QWEN3_5_2B = REPO / "bench" / "qwen3_5" / "Qwen3.5-2B"
QWEN3_30B_A3B = REPO / "bench" / "qwen3_moe" / "Qwen3-30B-A3B"
# 12 of Qwen3-30B-A3B's 48 layers: each holds 623M parameters (128 experts of 3 x 2048 x 768), 1.25 GB
# in bf16, and a LoRA step on the experts keeps about as much again (PEFT's ParamWrapper merges each
# expert stack with its adapter every forward, and the backward holds the merge), plus ~0.2 GB of
# fp32 adapters with their AdamW moments and the activations of 4096 tokens. 12 layers are ~16 GB of
# weights and an estimated ~45 GB peak: room to spare on one 80 GB GPU, and quick to save and load
# within the check's time; all 48 (61 GB of bf16 weights) would not fit. Per-layer speed and MFU do
# not depend on the layer count.
MOE_LAYERS = 12
MOE = f"qwen3-30b-a3b-{MOE_LAYERS}l"
TINY128 = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
           "num_key_value_heads": 2, "head_dim": 32, "initializer_range": 0.02}  # the size PLATFORM_NOTES measured
HYBRID4 = ["linear_attention"] * 3 + ["full_attention"]
TINY = None
"""Where a preset's values start: sftkit's tiny-qwen3 (sftkit.models.TINY_CONFIG)."""
PRESETS = {
    # name -> (where its values start: TINY or a saved config's folder, the values that replace those)
    "tiny": (TINY, {}),
    "tiny128": (TINY, TINY128),
    "qwen3-0.6b": (QWEN3_DIR / "Qwen3-0.6B", {}),
    "qwen3-1.7b": (QWEN3_DIR / "Qwen3-1.7B", {}),
    "qwen3-8b": (QWEN3_DIR / "Qwen3-8B", {}),
    "qwen3.5-2b": (QWEN3_5_2B, {}),
    MOE: (QWEN3_30B_A3B, {"num_hidden_layers": MOE_LAYERS, "max_window_layers": MOE_LAYERS}),
    "tiny-qwen3.5": (QWEN3_5_2B, {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
                                  "layer_types": HYBRID4, "num_attention_heads": 4, "num_key_value_heads": 2,
                                  "head_dim": 16, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
                                  "linear_num_key_heads": 2, "linear_num_value_heads": 4}),
    "tiny-moe": (QWEN3_30B_A3B, {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                 "max_window_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                 "head_dim": 16, "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32}),
}
PUBLISHED = {"qwen3-0.6b", "qwen3-1.7b", "qwen3-8b", "qwen3.5-2b", MOE}
"""Presets of a published model: made in bf16, as published (a full fine-tune loads them in fp32 all
the same); 12 layers of Qwen3-30B-A3B are 30 GB in fp32."""


def config(spec: dict | str | Path):
    """A transformers config from a dict of values with their model_type, or from a saved
    config.json (or its folder)."""
    from transformers import AutoConfig

    if not isinstance(spec, dict):
        path = Path(spec)
        return config(json.loads((path / "config.json" if path.is_dir() else path).read_text()))
    values = dict(spec)
    return AutoConfig.for_model(values.pop("model_type"), **values)


def preset_config(name: str):
    """A preset's config: its saved config.json (or sftkit's tiny-qwen3) with the preset's values in place."""
    from sftkit.models import TINY_CONFIG

    if name not in PRESETS:
        raise SystemExit(f"--model: '{name}' is neither a preset ({', '.join(PRESETS)}) nor a directory")
    base, changes = PRESETS[name]
    if base is TINY:
        return config({"model_type": "qwen3", **TINY_CONFIG, **changes})
    if not (base / "config.json").is_file():
        raise SystemExit(f"--model {name}: {base}/config.json not found (see {base.parent}/README.md)")
    return config({**json.loads((base / "config.json").read_text()), **changes})


def build_preset(name: str, root: Path) -> Path:
    """A preset's model directory under `root`, built once; a directory name is returned as it is."""
    if Path(name).is_dir():
        return Path(name)
    return build(preset_config(name), root, name, bf16=name in PUBLISHED)


def build(cfg, root: Path, name: str, bf16: bool = False) -> Path:
    """A random-init model of `cfg` in root/NAME-HASH, built once (the hash is of the config, so a
    changed one is never reused): safetensors, sftkit's bundled Qwen3 tokenizer and its generation
    config. Made on the GPU where there is one: random init of 8B takes minutes on a CPU."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig

    from sftkit.io import atomic_directory
    from sftkit.models import bundled_tokenizer_dir

    key = hashlib.sha256(cfg.to_json_string().encode()).hexdigest()[:12]
    path = Path(root) / f"{name}-{key}"
    if any(path.glob("model*.safetensors*")):
        return path
    model = init(cfg, dtype=torch.bfloat16 if bf16 else None, device="cuda" if torch.cuda.is_available() else "cpu")
    with atomic_directory(path) as tmp:
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(bundled_tokenizer_dir()).save_pretrained(tmp)
        GenerationConfig.from_pretrained(bundled_tokenizer_dir()).save_pretrained(tmp)
    del model
    torch.cuda.empty_cache()  # the children need the GPU memory, not this process
    return path


def init(cfg, seed: int | None = None, dtype=None, device: str = "cpu"):
    """A random-init model of `cfg` in memory, from sftkit's tiny-qwen3 seed unless given one;
    the global random state is left as it was."""
    import torch
    from transformers import AutoModelForCausalLM

    from sftkit.models import TINY_INIT_SEED

    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(TINY_INIT_SEED if seed is None else seed)
        return AutoModelForCausalLM.from_config(cfg, **({"dtype": dtype} if dtype else {}))


def family(kind: str, root: Path, overrides: dict | None = None) -> Path:
    """tests/family.py's tiny random-init model of `kind` (a model_type: qwen3, qwen3_5, ...) as a
    user finds it on disk, in root/KIND, built once. `overrides`: text config values to change."""
    from sftkit.io import atomic_directory

    path = Path(root) / kind
    if not (path / "config.json").is_file():
        with atomic_directory(path) as tmp:
            _family_module().build(kind, tmp, overrides=overrides)
    return path


@functools.cache
def _family_module():
    """tests/family.py, the one builder of every architecture's tiny model (tests/ is no package)."""
    spec = importlib.util.spec_from_file_location("family", REPO / "tests" / "family.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
