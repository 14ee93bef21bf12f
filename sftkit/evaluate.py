"""Evaluation: the model eval is pointed at (an adapter, a merged or full model, a checkpoint, a
base), and the exact token-mean loss (the training loss's definition) and perplexity."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from sftkit.batching import load_micro_batch
from sftkit.checkpoint import model_in
from sftkit.data.dataset import lengths as example_lengths
from sftkit.errors import ConfigError
from sftkit.loss import token_loss_sum
from sftkit.models import adapter_base, check_weights_format, load_adapter, load_model, load_tokenizer


def eval_tokenizer(path: str, cfg):
    """The tokenizer of what eval is pointed at: its own where it has one, else the config's model's."""
    p = Path(model_in(path))
    return load_tokenizer(str(p) if (p / "tokenizer_config.json").is_file() else cfg.model_name_or_path,
                          cfg.trust_remote_code)


def eval_image_spec(path: str, cfg, tokenizer):
    """The image processor of what eval is pointed at (a saved vision-language model carries its
    own; an adapter's base does), else of the config's model; None for a text model."""
    from sftkit.models import load_image_spec

    p = Path(model_in(path))
    sources = [str(p)] + ([adapter_base(p)] if (p / "adapter_config.json").is_file() else []) + [cfg.model_name_or_path]
    return next((spec for source in sources if (spec := load_image_spec(source, tokenizer)) is not None), None)


def load_for_eval(path: str, cfg, vision: bool = False):
    """(model in eval mode, tokenizer) for an adapter, a merged or full model, a checkpoint, or a base.
    `vision`: the data has images: the vision-language model."""
    path = model_in(path)
    p = Path(path)
    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    attention = cfg.attention(torch.cuda.is_available())
    if p.exists() and not p.is_dir():
        raise ConfigError(f"--model {path}: expected a model directory")
    # the tokenizer first: its chat template is checked before any weights load
    tokenizer = load_tokenizer(path if (p / "tokenizer_config.json").is_file() else cfg.model_name_or_path,
                               cfg.trust_remote_code)
    if (p / "adapter_config.json").is_file():
        from sftkit.fit import check_adapter_fits

        base = adapter_base(p)
        check_adapter_fits(p, base)  # before the base loads
        from sftkit.arch.layout import adapter_on_vision_model

        if vision and not adapter_on_vision_model(p):
            raise ConfigError(f"{path} is an adapter of a text model; data with images needs one trained on images")
        model = load_adapter(load_model(base, dtype, attention, cfg.trust_remote_code, vision=vision), p, base)
    else:
        check_weights_format(path)
        model = load_model(path, dtype, attention, cfg.trust_remote_code, vision=vision)
    model.eval()
    return model, tokenizer


@torch.no_grad()
def evaluate_loss(model, dataset, accelerator, batch_size: int, pad_id: int, head=None,
                  should_stop=None, vision=None) -> dict | None:
    """Sum of token losses over the whole set / its supervised tokens, sharded over ranks.
    `should_stop()` true on any rank (checked before each batch, one all-reduce each) ends it on
    every rank, and it returns None."""
    model.eval()
    world, rank = accelerator.num_processes, accelerator.process_index
    n = len(dataset)
    # Sort by length so batches pad little; every rank runs the same number of batches.
    lengths = example_lengths(dataset)  # one Arrow column read, not row by row through datasets
    order = sorted(range(n), key=lambda i: lengths[i])
    per_step = batch_size * world
    totals = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    for start in range(0, n, per_step):
        if should_stop is not None and accelerator.reduce(
                torch.tensor(int(should_stop()), device=accelerator.device), reduction="sum").item():
            return None
        idx = order[start:start + per_step][rank::world]
        batch = load_micro_batch(dataset, [[i] for i in idx], pad_id, vision=vision).to(accelerator.device)
        totals[0] += token_loss_sum(model, batch, head).double()
        totals[1] += batch.targets.numel()
    loss_sum, count = accelerator.reduce(totals, reduction="sum").tolist()
    loss = loss_sum / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700)), "supervised_tokens": int(count), "examples": n}
