"""Open what a user points eval at: an adapter, a merged or full model, a checkpoint, a base."""

from __future__ import annotations

from pathlib import Path

from sftkit.config import SFTConfig
from sftkit.errors import ConfigError


def model_dir(path: str) -> str:
    """A checkpoint directory holds its model under model/."""
    p = Path(path)
    if (p / "trainer_state.json").is_file() and (p / "model").is_dir():
        return str(p / "model")
    return path


def load_for_eval(path: str, cfg: SFTConfig):
    import torch

    from sftkit.models import check_weights_format, load_model, load_tokenizer

    path = model_dir(path)
    p = Path(path)
    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    if (p / "adapter_config.json").is_file():
        from peft import PeftModel

        base = adapter_base(p)
        model = PeftModel.from_pretrained(load_model(base, dtype, cfg.attn_implementation, cfg.trust_remote_code), path)
    else:
        if p.exists() and not p.is_dir():
            raise ConfigError(f"--model {path}: expected a model directory")
        check_weights_format(path)
        model = load_model(path, dtype, cfg.attn_implementation, cfg.trust_remote_code)
    tokenizer = load_tokenizer(path if (p / "tokenizer_config.json").is_file() else cfg.model_name_or_path,
                               cfg.trust_remote_code)
    model.eval()
    return model, tokenizer


def adapter_base(adapter: Path) -> str:
    import json

    base = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{adapter}/adapter_config.json names no base model (base_model_name_or_path)")
    return base
