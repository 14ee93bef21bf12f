"""Images in rows: found in the forms other tools write, read to bytes, checked, and counted in tokens.

The forms:
- LLaMA-Factory: an `images` column (a list, or one value) and `<image>` placeholders in the text of
  Alpaca and ShareGPT rows, one per image, in order.
- OpenAI-style content parts: `{"type": "image", "image": ...}` (also `url`, `path`), and
  `{"type": "image_url", "image_url": {"url": ...}}`.
- TRL: an `images` column with `{"type": "image"}` parts that carry no image, filled in order.
An image is a local path (relative to the data file), a `file://` URL, a base64 `data:` URL, a
Hub dataset's image feature (`{"bytes", "path"}` or a decoded PIL image) or raw bytes.

Each image becomes an `{"type": "image"}` part of its message (what the chat template renders as
`<|vision_start|><|image_pad|><|vision_end|>`) holding its `Picture`: the sha256 of its bytes (how
the prepared set stores and fingerprints it) and its token count, which the model's image
processor decides from the image's size alone (`get_number_of_image_patches`), exactly as the
processor expands the placeholder at inference. Pixels are computed later, in the DataLoader's
workers, from the stored bytes.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftkit.data.formats import IMAGE, Conversation, RowError

PLACEHOLDER = "<image>"  # LLaMA-Factory's
PROCESSOR_CONFIG = "preprocessor_config.json"
UNIFIED_CONFIG = "processor_config.json"
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


@dataclass(frozen=True)
class ImageSpec:
    """What rendering needs of a vision-language model's image processor: its image token (the one
    placeholder the processor expands), the folder it loads from and its config's text (in the
    prepared set's fingerprint). The processor itself loads on first use: a text-only set on a
    vision-language model never imports it (bench/RESULTS.md: 70 MB of the process's memory)."""

    token: str                      # "<|image_pad|>"
    source: str                     # the model folder holding preprocessor_config.json
    config: str = ""                # that file's text

    @property
    def digest(self) -> str:
        """The sha256 of the processor's config: what a prepared set records of the processor."""
        return hashlib.sha256(self.config.encode()).hexdigest()

    @functools.cached_property
    def processor(self):
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(self.source)

    def tokens(self, height: int, width: int) -> int:
        """The image tokens of an image of this size, as the processor expands its placeholder."""
        processor = self.processor
        return processor.get_number_of_image_patches(height, width, {}) // processor.merge_size ** 2


def image_spec(source: str | Path, tokenizer) -> ImageSpec | None:
    """The spec of a model folder's image processor (transformers' Qwen2-VL one, which Qwen3-VL and
    Qwen3.5 use), with the tokenizer's image token; None for a text model: one without a
    vision-language config (vision_config) and a preprocessor_config.json beside it."""
    import json

    try:
        config = json.loads((Path(source) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    processor = processor_config(Path(source))
    if not (isinstance(config, dict) and "vision_config" in config) or processor is None:
        return None
    return ImageSpec(getattr(tokenizer, "image_token", None) or "<|image_pad|>", str(source), processor)


def processor_config(folder: Path) -> str | None:
    """The text of a folder's image processor config: preprocessor_config.json, or the unified
    processor_config.json that transformers 5's processor.save_pretrained writes (the image
    processor's under "image_processor"); None where there is neither."""
    for name in (PROCESSOR_CONFIG, UNIFIED_CONFIG):
        try:
            text = (folder / name).read_text()
        except OSError:
            continue
        if name == PROCESSOR_CONFIG or '"image_processor"' in text:
            return text
    return None


@dataclass(frozen=True)
class Picture:
    """One image of a row: its bytes' sha256, its size and its tokens. `data` is dropped once the
    bytes are stored (Picture.stored)."""

    sha256: str
    height: int
    width: int
    tokens: int
    data: bytes | None = field(default=None, compare=False, repr=False)

    def stored(self) -> Picture:
        return Picture(self.sha256, self.height, self.width, self.tokens)


def has_images(row: dict[str, Any]) -> bool:
    """Whether a row brings images in any form (cheap: looked up before any is read)."""
    if row.get("images") not in (None, [], ""):
        return True
    for key in ("messages", "conversations", "prompt", "completion"):
        turns = row.get(key)
        if isinstance(turns, list) and any(isinstance(t, dict) and isinstance(t.get("content"), list) and any(
                isinstance(p, dict) and p.get("type") in ("image", "image_url") for p in t["content"]) for t in turns):
            return True
    return False


def images_column(row: dict[str, Any]) -> list[Any]:
    """The row's `images` column as a list (one value alone is a list of one)."""
    value = row.get("images")
    if value in (None, ""):
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def read_image(value: Any, field_name: str, base: Path | None, seen: dict | None = None) -> bytes:
    """An image reference's bytes, or RowError naming `field_name` and why not. `seen`: each local
    file read, by its absolute path, gets its (size, mtime_ns) there."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, dict):  # a Hub or Parquet image feature: {"bytes": ..., "path": ...}
        if value.get("bytes"):
            return bytes(value["bytes"])
        if value.get("path"):
            return read_image(value["path"], field_name, base, seen)
        raise RowError(field_name, "an image object needs 'bytes' or 'path'")
    if hasattr(value, "save") and hasattr(value, "size"):  # a decoded PIL image (a Hub dataset's Image feature)
        out = io.BytesIO()
        value.save(out, format="PNG")
        return out.getvalue()
    if not isinstance(value, str) or not value:
        raise RowError(field_name, f"expected an image path, a file:// or data: URL, got {type(value).__name__}")
    if value.startswith("data:"):
        head, _, payload = value.partition(",")
        if not head.endswith(";base64"):
            raise RowError(field_name, "a data: URL image must be base64 (data:image/png;base64,...)")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise RowError(field_name, "the data: URL's base64 does not decode") from None
    if value.startswith("file://"):
        value = value[len("file://"):]
    elif _URL.match(value):
        raise RowError(field_name, f"{value[:60]!r} is a remote URL; sftkit reads images from disk only "
                       "(download them first and give their paths)")
    path = Path(value).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    try:
        data = path.read_bytes()
        if seen is not None:
            st = path.stat()
            seen[str(path.resolve())] = (st.st_size, st.st_mtime_ns)
        return data
    except OSError as err:
        raise RowError(field_name, f"cannot read the image {str(path)!r} ({err.strerror or err})") from None


def picture(data: bytes, field_name: str, spec: ImageSpec) -> Picture:
    """The image's Picture, after checking that it decodes: a broken file is a bad row here, never
    a crash in a DataLoader worker later."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            img.load()  # decodes every pixel: a truncated file fails here
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise RowError(field_name, f"is not a readable image ({str(err).splitlines()[0][:120] if str(err) else type(err).__name__})") from None
    if min(height, width) < 1:
        raise RowError(field_name, f"the image is {width}x{height} pixels")
    try:
        tokens = spec.tokens(height, width)
    except ValueError as err:  # the processor's own limits (an aspect ratio above 200, ...)
        raise RowError(field_name, f"the image processor refuses this image: {str(err).splitlines()[0][:160]}") from None
    return Picture(hashlib.sha256(data).hexdigest(), height, width, tokens, data)


@functools.cache
def stand_in() -> bytes:
    """A black 28x28 PNG: the image a micro-batch without one runs through the vision tower
    (batching.MicroBatch.stand_in_pixels)."""
    import zlib

    row = b"\x00" + b"\x00" * 28 * 3
    chunk = (lambda kind, data: len(data).to_bytes(4, "big") + kind + data
             + zlib.crc32(kind + data).to_bytes(4, "big"))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", (28).to_bytes(4, "big") * 2 + b"\x08\x02\x00\x00\x00")
            + chunk(b"IDAT", zlib.compress(row * 28)) + chunk(b"IEND", b""))


def decode(data: bytes):
    """The stored bytes as an RGB PIL image, what the processor is given."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


def pixels(datas: list[bytes], processor) -> dict[str, Any]:
    """pixel_values and image_grid_thw of these images, as the processor computes them."""
    out = processor(images=[decode(d) for d in datas], return_tensors="pt")
    return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}


def gather(msgs: Conversation, row: dict[str, Any], base: Path | None, spec: ImageSpec | None, store,
           seen: dict | None = None) -> int:
    """Read, check and count every image of a converted row, in order, each image part then holding
    its Picture (`store(picture)` is given the bytes first); returns how many. A row with images for
    a model without an image processor, a count that does not match, or an image that cannot be
    read is a RowError."""
    column = images_column(row)
    if column and not any(p["type"] == IMAGE for m in msgs if isinstance(m["content"], list) for p in m["content"]):
        _split_placeholders(msgs)
    parts = [p for m in msgs if isinstance(m["content"], list) for p in m["content"] if p["type"] == IMAGE]
    if not parts and not column:
        return 0
    if spec is None:
        raise RowError("images" if column else parts[0]["field"], "this row has images, but the model is a text "
                       "model (no image processor, preprocessor_config.json); use a vision-language model "
                       "(Qwen3.5, Qwen3-VL) or remove the images")
    used, found = 0, []
    for part in parts:
        source, where = part.pop("source"), part.pop("field")
        if source is None:
            if used == len(column):
                raise RowError("images", f"the row places more images than its images column holds ({len(column)})"
                               + ("" if column else "; give the images in an images column or in the parts"))
            source, where = column[used], f"images[{used}]"
            used += 1
        found.append(picture(read_image(source, where, base, seen), where, spec))
        part["picture"] = found[-1].stored()
    if used != len(column):
        raise RowError("images", f"holds {len(column)} image(s) but the conversation places {used} (one "
                       f"{PLACEHOLDER} in the text, or one image part, per image)")
    for one in found:  # stored once the whole row holds: a bad row leaves no image behind
        store(one)
    return len(parts)


def _split_placeholders(msgs: Conversation) -> None:
    """LLaMA-Factory's `<image>` placeholders in user turns as image parts, taking the images column."""
    for m in msgs:
        if m["role"] != "user" or not isinstance(m["content"], str) or PLACEHOLDER not in m["content"]:
            continue
        parts: list[dict[str, Any]] = []
        for i, text in enumerate(m["content"].split(PLACEHOLDER)):
            if i:
                parts.append({"type": IMAGE, "source": None, "field": "images"})
            if text:
                parts.append({"type": "text", "text": text})
        m["content"] = parts


def pictures_of(conv: Conversation) -> list[Picture]:
    """A conversation's pictures, in the order the template renders them."""
    return [p["picture"] for m in conv if isinstance(m.get("content"), list) for p in m["content"]
            if p.get("type") == IMAGE]
