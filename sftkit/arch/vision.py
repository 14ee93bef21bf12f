"""What a vision-language model (Qwen3.5, Qwen3-VL) needs beside the token ids of a micro-batch:
each image's pixels and grid, and the multimodal rotary positions (M-RoPE) of every token.

M-RoPE gives each token three positions (time, height, width). Text tokens have the same number in
all three, counting on from the token before; an image's tokens have the image's start position in
time and the start plus their row and column (after merging) in height and width, and the text after
an image continues from the start plus the larger of its merged height and width. transformers
computes them for a whole row (`get_rope_index`); here each example gets its own, starting at 0,
so that a packed row holds each example exactly as it is alone. `mrope_positions` follows Qwen3.5's
and Qwen3-VL's `get_rope_index` for images (checked against it in tests/test_images.py).

The model is handed `position_ids` of shape (4, rows, tokens): row 0 the text positions (restarting
at each example, what packed attention reads) and rows 1-3 the M-RoPE positions.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

# where Qwen3.5 and Qwen3-VL keep their vision tower, within it the merger(s) into the language model,
# and beside it the language model: module names
VISION_TOWER = "visual"
VISION_MERGERS = ("merger", "deepstack_merger_list")
LANGUAGE_MODEL = "language_model"


@dataclass(frozen=True)
class Vision:
    """How a micro-batch's images become model inputs: the image processor, and the model's image
    token and spatial merge size."""

    processor: Any
    image_token_id: int
    merge_size: int


def vision_of(model_config, processor, token_id: int | None = None) -> Vision:
    """The Vision of a vision-language config and its image processor; `token_id`: the tokenizer's
    id of the image token the ids were made with, which must be the one the model replaces."""
    from sftkit.errors import ConfigError

    merge = model_config.vision_config.spatial_merge_size
    if getattr(processor, "merge_size", merge) != merge:
        raise ConfigError(f"the image processor merges {processor.merge_size}x{processor.merge_size} patches, the "
                          f"model's vision tower {merge}x{merge}; use the model's own preprocessor_config.json")
    if token_id is not None and token_id != model_config.image_token_id:
        raise ConfigError(f"the tokenizer's image token is id {token_id}, the model's config says image_token_id "
                          f"{model_config.image_token_id}; use the tokenizer saved with the model")
    return Vision(processor, model_config.image_token_id, merge)


def mrope_positions(ids: torch.Tensor, grids: list[tuple[int, int, int]], image_token_id: int,
                    merge: int) -> torch.Tensor:
    """(3, len(ids)) M-RoPE positions of one example alone, its images' (t, h, w) grids in order."""
    out = torch.empty((3, len(ids)), dtype=torch.long)
    is_image = (ids == image_token_id).tolist()
    at, pos, k = 0, 0, 0
    n = len(is_image)
    while at < n:
        end = at
        while end < n and is_image[end] == is_image[at]:
            end += 1
        if not is_image[at]:
            out[:, at:end] = torch.arange(pos, pos + end - at)
            pos += end - at
        else:
            while at < end:  # consecutive images: one grid each
                t, h, w = grids[k]
                k += 1
                gh, gw = h // merge, w // merge
                size = t * gh * gw
                tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
                out[0, at:at + size] = tt.reshape(-1) + pos
                out[1, at:at + size] = hh.reshape(-1) + pos
                out[2, at:at + size] = ww.reshape(-1) + pos
                pos += max(h, w) // merge
                at += size
            continue
        at = end
    return out


@contextmanager
def tower_runs(model, pixel_values: torch.Tensor, grid: torch.Tensor) -> Iterator[list[torch.Tensor]]:
    """For a micro-batch without images: within this block, the model's forward also runs its vision
    tower on a stand-in image, where it runs on images (after the token embedding, before the
    language model: ZeRO-3 gathers each module's weights in the order they run, and every rank must
    gather in one order); the list it yields then holds 0 x all the tower made, for the loss. So
    the tower runs once a micro-batch on every rank, without changing the loss or any gradient."""
    modules = {name.rsplit(".", 1)[-1]: m for name, m in model.named_modules()}
    tower, language = modules[VISION_TOWER], modules[LANGUAGE_MODEL]
    made: list[torch.Tensor] = []

    def run(module, args, kwargs):
        out = tower(pixel_values.to(next(tower.parameters()).dtype), grid_thw=grid)
        parts = [v for v in out.values() if torch.is_tensor(v)] + \
            [t for v in out.values() if isinstance(v, (list, tuple)) for t in v if torch.is_tensor(t)]
        made.append(sum(p.float().sum() for p in parts) * 0.0)

    handle = language.register_forward_pre_hook(run, with_kwargs=True, prepend=True)  # before ZeRO-3's own
    try:
        yield made
    finally:
        handle.remove()


def stand_in_tower(model, batch):
    """tower_runs for a micro-batch that carries a stand-in image, else a block that does nothing
    (and yields an empty list)."""
    if batch.stand_in_pixels is None:
        return nullcontext([])
    return tower_runs(model, batch.stand_in_pixels, batch.stand_in_grid)
