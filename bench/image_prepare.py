"""What images cost sftkit on this CPU: prepare-data on rows with images (each image read, decoded
once to check it, counted in tokens, stored by sha256) against the same rows without them, and the
collate of a micro-batch with images (the image processor's pixels, in a DataLoader worker).

    python -m bench.image_prepare [--rows 2000] [--size 512]

The model is tests/family.py's tiny Qwen3.5 with the image processor of the released Qwen3-VL and
Qwen3.5 checkpoints (16-pixel patches merged 2x2, 65,536 to 16,777,216 pixels): a 512x512 image is
256 tokens. Images are random-noise PNGs (the worst case for their decoder), one per row.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RELEASED = {"patch_size": 16, "merge_size": 2, "temporal_patch_size": 2,
            "size": {"shortest_edge": 65536, "longest_edge": 16777216}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    import family
    import numpy as np
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from sftkit.arch.vision import Vision
    from sftkit.batching import collate
    from sftkit.data.options import DataOptions
    from sftkit.data.prepare import load_prepared, prepare
    from sftkit.models import load_image_spec, load_tokenizer

    work = Path(tempfile.mkdtemp())
    model = family.build("qwen3_5", work / "model")
    Qwen2VLImageProcessorPil(**RELEASED).save_pretrained(model)  # the released checkpoints' sizes
    rng = np.random.default_rng(0)
    (work / "img").mkdir()
    for i in range(args.rows):
        pixels = (rng.random((args.size, args.size, 3)) * 255).astype("uint8")
        Image.fromarray(pixels).save(work / "img" / f"{i}.png")
    with_images = [{"instruction": f"<image>What is in picture {i}?", "output": f"Noise number {i}.",
                    "images": [f"img/{i}.png"]} for i in range(args.rows)]
    text_only = [{"instruction": f"What is in picture {i}?", "output": f"Noise number {i}."} for i in range(args.rows)]
    for name, rows in (("images.jsonl", with_images), ("text.jsonl", text_only)):
        (work / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = load_tokenizer(str(model))
    spec = load_image_spec(str(model), tok)
    results = {}
    for name in ("text.jsonl", "images.jsonl"):
        start = time.perf_counter()
        manifest = prepare(DataOptions(num_proc=1), [str(work / name)], work / f"out_{name}", tok, image_spec=spec)
        seconds = time.perf_counter() - start
        results[name] = {"seconds": round(seconds, 2), "rows_per_s": round(args.rows / seconds, 1),
                         "tokens": manifest["tokens"]}
    ds = load_prepared(work / "out_images.jsonl")
    vision = Vision(spec.processor, tok.convert_tokens_to_ids(spec.token), 2)
    examples = [ds[i] for i in range(8)]
    collate([examples[:1]], tok.pad_token_id, True, vision=vision)  # warm
    start = time.perf_counter()
    repeats = 5
    for _ in range(repeats):
        batch = collate([examples], tok.pad_token_id, True, vision=vision)
    results["collate_8_images_s"] = round((time.perf_counter() - start) / repeats, 3)
    results["pixel_values_mb"] = round(batch.inputs["pixel_values"].numel() * 4 / 2**20, 1)
    results["image_tokens_each"] = int((batch.inputs["input_ids"] == vision.image_token_id).sum()) // 8
    results["image_png_kb"] = round((work / "img" / "0.png").stat().st_size / 1024, 1)
    print(json.dumps({"rows": args.rows, "size": args.size, **results}, indent=1))
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
