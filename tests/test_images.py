"""Image-and-text rows on a tiny random-init Qwen3.5 (tests/family.py): the forms other tools write,
token ids equal to transformers' own processor's, labels on replies only, bad images as one-line
errors, each example's M-RoPE positions as the model computes them, packed image rows training as
each alone, the vision tower frozen by default, and a changed image file prepared again."""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import loss_and_grads, write_jsonl

from sftkit.data.options import DataOptions
from sftkit.data.prepare import load_prepared, prepare
from sftkit.data.render import IGNORE_INDEX
from sftkit.errors import DataError

IMAGE_TOKEN = 151655  # <|image_pad|> in the Qwen3 tokenizer the tiny models use


def picture(path: Path, height: int, width: int, seed: int) -> Path:
    from PIL import Image

    pixels = (np.random.default_rng(seed).random((height, width, 3)) * 255).astype("uint8")
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def vl(family_model, tmp_path_factory):
    """(model folder, data folder): a tiny Qwen3.5 and images of several sizes and formats."""
    data = tmp_path_factory.mktemp("images")
    picture(data / "wide.png", 20, 30, 0)
    picture(data / "tall.jpg", 40, 12, 1)
    picture(data / "small.png", 9, 9, 2)
    return family_model("qwen3_5"), data


@pytest.fixture(scope="module")
def vision_models(vl, tmp_path_factory):
    """model_type -> a tiny vision-language model of it: Qwen3.5 (Gated DeltaNet and gated attention)
    and Qwen3-VL (a Qwen3 text model, interleaved M-RoPE, deepstack features)."""
    import family

    return {"qwen3_5": vl[0], "qwen3_vl": family.build_qwen3_vl(tmp_path_factory.mktemp("qwen3_vl"))}


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def rows_of_each_form(data: Path) -> dict[str, tuple[list[dict], list[list[dict]]]]:
    """form -> (rows as that tool writes them, the same conversations as transformers' processor
    takes them: content parts with PIL images)."""
    from PIL import Image

    def img(name):
        return {"type": "image", "image": Image.open(data / name)}

    def text(t):
        return {"type": "text", "text": t}

    return {
        "llamafactory_alpaca": (
            [{"instruction": "<image>Describe <image> both.", "output": "Two pictures.",
              "images": ["wide.png", "tall.jpg"]}],
            [[{"role": "user", "content": [img("wide.png"), text("Describe "), img("tall.jpg"), text(" both.")]},
              {"role": "assistant", "content": "Two pictures."}]]),
        "llamafactory_sharegpt": (
            [{"conversations": [{"from": "human", "value": "<image>What?"}, {"from": "gpt", "value": "A thing."},
                                {"from": "human", "value": "And <image>?"}, {"from": "gpt", "value": "Another."}],
              "images": ["small.png", str(data / "wide.png")]}],
            [[{"role": "user", "content": [img("small.png"), text("What?")]},
              {"role": "assistant", "content": "A thing."},
              {"role": "user", "content": [text("And "), img("wide.png"), text("?")]},
              {"role": "assistant", "content": "Another."}]]),
        "openai_parts": (
            [{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(data / "small.png")}},
                                                        {"type": "text", "text": "Hi"}]},
                           {"role": "assistant", "content": "Hello."}]},
             {"messages": [{"role": "user", "content": [{"type": "text", "text": "See "},
                                                        {"type": "image", "image": "file://" + str(data / "tall.jpg")}]},
                           {"role": "assistant", "content": "Seen."}]}],
            [[{"role": "user", "content": [img("small.png"), text("Hi")]}, {"role": "assistant", "content": "Hello."}],
             [{"role": "user", "content": [text("See "), img("tall.jpg")]}, {"role": "assistant", "content": "Seen."}]]),
        "trl_images": (
            [{"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Name it."}]},
                           {"role": "assistant", "content": "A square."}], "images": ["small.png"]}],
            [[{"role": "user", "content": [img("small.png"), text("Name it.")]},
              {"role": "assistant", "content": "A square."}]]),
    }


def reference_processor(model: Path, monkeypatch):
    """transformers' own Qwen3VLProcessor for the model (its image processor, tokenizer and template).
    Its constructor checks the video processor's class, which needs torchvision, absent here: that
    check alone is skipped (no video is processed)."""
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen3VLProcessor
    from transformers.processing_utils import ProcessorMixin

    monkeypatch.setattr(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: None)
    tok = AutoTokenizer.from_pretrained(model)
    return Qwen3VLProcessor(image_processor=AutoImageProcessor.from_pretrained(model), tokenizer=tok,
                            video_processor=None, chat_template=tok.chat_template)


@functools.cache
def tokenizer_of(model: Path):
    """The model's tokenizer, loaded once for the module (prepare only reads it)."""
    from sftkit.models import load_tokenizer

    return load_tokenizer(str(model))


def prepared(model: Path, files: list[Path], out: Path, **options):
    from sftkit.models import load_image_spec

    tok = tokenizer_of(model)
    manifest = prepare(DataOptions(**options), [str(f) for f in files], out, tok,
                       image_spec=load_image_spec(str(model), tok))
    return manifest, load_prepared(out)


@pytest.mark.parametrize("form", ["llamafactory_alpaca", "llamafactory_sharegpt", "openai_parts", "trl_images"])
def test_ids_equal_the_processors_and_only_replies_are_supervised(vl, tmp_path, monkeypatch, form):
    model, data = vl
    rows, conversations = rows_of_each_form(data)[form]
    _, ds = prepared(model, [write_jsonl(data / f"{form}.jsonl", rows)], tmp_path / "out")
    processor = reference_processor(model, monkeypatch)
    assert len(ds) == len(conversations)
    for example, conversation in zip(ds, conversations):
        want = processor.apply_chat_template(conversation, tokenize=True, return_dict=True)
        assert example["input_ids"] == want["input_ids"][0]
        ids, labels = np.array(example["input_ids"]), np.array(example["labels"])
        assert (ids == IMAGE_TOKEN).sum() == want["image_grid_thw"].prod(-1).sum() // 4 > 0
        assert (labels[ids == IMAGE_TOKEN] == IGNORE_INDEX).all()
        supervised = processor.tokenizer.decode(ids[labels != IGNORE_INDEX])
        replies = [m["content"] for m in conversation if m["role"] == "assistant"]
        # Qwen3.5's template gives the last reply an empty think block, the earlier ones none
        assert supervised == "".join(f"{r}<|im_end|>" for r in replies[:-1]) + f"</think>\n\n{replies[-1]}<|im_end|>"
        assert len(example["images"]) == len(want["image_grid_thw"])


def test_a_hub_image_feature_and_relative_paths_are_read(vl, tmp_path):
    """A Parquet table of {"bytes", "path"} structs (what a Hub dataset's Image feature writes) and
    paths relative to the data file's folder, both stored by their bytes' sha256."""
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    model, data = vl
    small = (data / "small.png").read_bytes()
    table = pa.table({"messages": [[{"role": "user", "content": "<image>Which?"},
                                    {"role": "assistant", "content": "That."}]],
                      "images": [[{"bytes": small, "path": None}]]})
    pq.write_table(table, tmp_path / "hub.parquet")
    shutil.copy(data / "small.png", tmp_path / "here.png")
    write_jsonl(tmp_path / "rel.jsonl", [{"instruction": "<image>Which?", "output": "That.", "images": ["here.png"]}])
    manifest, ds = prepared(model, [tmp_path / "hub.parquet", tmp_path / "rel.jsonl"], tmp_path / "out")
    digest = hashlib.sha256(small).hexdigest()
    assert [Path(p).name for e in ds for p in e["images"]] == [digest, digest]
    assert ds[0]["input_ids"] == ds[1]["input_ids"]
    assert manifest["images"] == {**manifest["images"], "examples_with_images": 2, "images": 2, "stored": 1}


@pytest.mark.parametrize("row, field, problem", [
    ({"instruction": "<image>x", "output": "y", "images": ["missing.png"]}, "images[0]", "cannot read the image"),
    ({"instruction": "<image>x", "output": "y", "images": ["not_an_image.png"]}, "images[0]",
     "is not a readable image"),
    ({"instruction": "<image>x", "output": "y", "images": ["cut.png"]}, "images[0]", "is not a readable image"),
    ({"instruction": "<image>x <image>", "output": "y", "images": ["wide.png"]}, "images",
     "the row places more images than its images column holds (1)"),
    ({"instruction": "x", "output": "y", "images": ["wide.png"]}, "images",
     "holds 1 image(s) but the conversation places 0"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x.org/a.png"}}]},
                   {"role": "assistant", "content": "y"}]}, "messages[0].content[0]", "is a remote URL"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "image": "data:image/png,abc"}]},
                   {"role": "assistant", "content": "y"}]}, "messages[0].content[0]", "must be base64"),
])
def test_bad_images_are_one_line_errors(vl, tmp_path, cli, row, field, problem):
    model, data = vl
    for name in ("wide.png",):
        shutil.copy(data / name, tmp_path / name)
    (tmp_path / "not_an_image.png").write_text("hello")
    (tmp_path / "cut.png").write_bytes((data / "wide.png").read_bytes()[:200])
    file = write_jsonl(tmp_path / "bad.jsonl", [row])
    result = cli("prepare-data", "--model_name_or_path", model, "--data_path", file, "--output_dir", tmp_path / "out")
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert "\n" not in line and "Traceback" not in line
    assert f"{file}:line 1: field '{field}': " in line and problem in line, line
    assert not (tmp_path / "out").exists()


def test_images_for_a_text_model_and_a_cut_image_are_refused(vl, tmp_path):
    model, data = vl
    file = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "<image>Describe it.", "output": "A picture of noise.",
                                               "images": [str(data / "wide.png")]}])
    from sftkit.models import load_tokenizer

    with pytest.raises(DataError, match="the model is a text model"):
        prepare(DataOptions(), [str(file)], tmp_path / "text", load_tokenizer("tiny-qwen3"))
    # an image's tokens are never cut: too long, the example is dropped whatever the truncation
    manifest, _ = prepared(model, [file, write_jsonl(tmp_path / "b.jsonl", [
        {"instruction": "plain", "output": "text"}])], tmp_path / "cut", max_length=12, truncation="right")
    assert manifest["dropped"]["too_long"] == 1 and manifest["examples_kept"] == 1
    assert "images" not in manifest  # nothing with an image was kept


@pytest.mark.parametrize("kind", ["qwen3_5", "qwen3_vl"])
def test_mrope_positions_are_the_models(vl, vision_models, tmp_path, kind):
    from sftkit.arch.vision import mrope_positions, vision_of
    from sftkit.batching import collate
    from sftkit.models import load_image_spec, load_model

    model_dir, data = vision_models[kind], vl[1]
    rows, _ = rows_of_each_form(data)["llamafactory_sharegpt"]
    _, ds = prepared(model_dir, [write_jsonl(data / f"mrope_{kind}.jsonl", rows)], tmp_path / "out")
    model = load_model(str(model_dir), vision=True)
    vision = vision_of(model.config, load_image_spec(str(model_dir), None).processor)
    batch = collate([[ds[0]]], 151643, packed=False, vision=vision)
    ids, grids = batch.inputs["input_ids"], batch.inputs["image_grid_thw"]
    want, _ = model.model.get_rope_index(ids, (ids == IMAGE_TOKEN).int(), image_grid_thw=grids)
    assert torch.equal(batch.inputs["position_ids"][1:], want)
    assert torch.equal(mrope_positions(ids[0], [tuple(g) for g in grids.tolist()], IMAGE_TOKEN, 2), want[:, 0])
    assert not torch.equal(want[1], want[0])  # the images do move the height and width positions


@pytest.fixture(scope="module")
def mixed_set(vl, tmp_path_factory):
    """Image rows of every form and a text row, prepared."""
    model, data = vl
    out = tmp_path_factory.mktemp("mixed")
    # beside the images: a relative path is read from the data file's folder
    files = [write_jsonl(data / f"mixed_{form}.jsonl", rows) for form, (rows, _) in rows_of_each_form(data).items()]
    files.append(write_jsonl(out / "text.jsonl", [{"instruction": "Say hi.", "output": "Hi."}]))
    return prepared(model, files, out / "set")[1]


def assert_same_gradients(got: dict, want: dict, what: str) -> None:
    """tests/test_hybrid.py's comparison with an atol 50x wider (5e-5 of the tensor's largest
    gradient): image rows are longer, and the vision tower sums over every patch of a row at once.
    Measured 2026-12-07: at most 2.2e-5 (Gated DeltaNet's convolution; the PyTorch fallback computes
    in float32 whatever the model's dtype, so float64 still leaves 1.5e-7); M-RoPE positions running
    across the packed row instead moved gradients by 0.58 of their largest."""
    assert got.keys() == want.keys() and any("visual" in n for n in got)
    for name, expected in want.items():
        scale = max(1.0, expected.abs().max().item())
        torch.testing.assert_close(got[name], expected, rtol=1e-5, atol=5e-5 * scale, msg=f"{what}: {name}")


@pytest.mark.parametrize("kind", ["qwen3_5", "qwen3_vl"])
def test_packed_image_rows_train_as_each_alone(vision_models, mixed_set, kind):
    """The loss and every gradient of image rows packed in one row (padding-free or not) equal
    theirs trained each alone: images stay with their example, each example's M-RoPE positions
    start afresh, Gated DeltaNet layers get the boundaries. The fused loss head gives the plain
    head's loss and gradients on them."""
    from sftkit.arch.vision import vision_of
    from sftkit.batching import collate
    from sftkit.loss import fused_head
    from sftkit.models import keep_linear_attention_apart, load_image_spec, load_model

    model_dir = vision_models[kind]  # the same tokenizer: mixed_set's ids are either's
    model = load_model(str(model_dir), vision=True)
    keep_linear_attention_apart(model, packing=True)
    vision = vision_of(model.config, load_image_spec(str(model_dir), None).processor)
    examples = [mixed_set[i] for i in range(len(mixed_set))]
    assert sum(bool(e["images"]) for e in examples) >= 4 and not all(e["images"] for e in examples)
    alone = loss_and_grads(model, [collate([[e]], 151643, packed=False, vision=vision) for e in examples])
    assert any(n.startswith("model.visual.") for n in alone[1])  # the pixels reach the loss
    for padding_free in (False, True):
        packed = loss_and_grads(model, collate([examples], 151643, packed=True, padding_free=padding_free,
                                               vision=vision))
        assert packed[0] == pytest.approx(alone[0], rel=1e-6)
        assert_same_gradients(packed[1], alone[1], f"padding_free={padding_free}")
    padded = loss_and_grads(model, collate([[e] for e in examples], 151643, packed=False, vision=vision))
    assert padded[0] == pytest.approx(alone[0], rel=1e-6)
    assert_same_gradients(padded[1], alone[1], "padded")
    head = fused_head(model, "no", False, 64)
    assert head is not None
    fused = loss_and_grads(model, collate([examples], 151643, packed=True, vision=vision), head)
    assert fused[0] == pytest.approx(alone[0], rel=1e-6)
    assert_same_gradients(fused[1], alone[1], "fused head")


def test_pixels_cross_the_worker_boundary_bit_for_bit(vl, mixed_set):
    from sftkit.arch.vision import vision_of
    from sftkit.batching import collate, pack
    from sftkit.models import load_image_spec

    model_dir, _ = vl
    config = json.loads((model_dir / "config.json").read_text())

    class Config:  # what vision_of reads
        image_token_id = config["image_token_id"]

        class vision_config:
            spatial_merge_size = config["vision_config"]["spatial_merge_size"]

    vision = vision_of(Config, load_image_spec(str(model_dir), None).processor)
    batch = collate([[mixed_set[i]] for i in range(3)], 151643, packed=False, vision=vision)
    back = pack([batch]).unpack()[0]
    for name, value in batch.inputs.items():
        assert torch.equal(back.inputs[name], value) and back.inputs[name].dtype == value.dtype, name


@pytest.mark.parametrize("train_vision, trained", [("frozen", set()), ("merger", {"merger"}),
                                                   ("tower", {"merger", "blocks", "patch_embed", "pos_embed"})])
def test_the_vision_tower_is_frozen_unless_asked(vl, train_vision, trained):
    from sftkit.config import SFTConfig
    from sftkit.models import build_for_training

    model_dir, _ = vl
    for lora in (False, True):
        cfg = SFTConfig(model_name_or_path=str(model_dir), train_vision=train_vision, use_lora=lora)
        model = build_for_training(cfg, vision=True)
        parts = {n.replace("modules_to_save.default.", "").split("visual.")[1].split(".")[0]
                 for n, p in model.named_parameters() if "visual." in n and p.requires_grad}
        assert parts == trained, (lora, parts)
        language = [p.requires_grad for n, p in model.named_parameters() if "language_model" in n]
        assert any(language) and (lora or all(language))


def test_a_changed_image_is_prepared_again(vl, tmp_path):
    from sftkit.data.dataset import prepared_dir
    from sftkit.models import load_image_spec

    model, data = vl
    image = shutil.copy(data / "wide.png", tmp_path / "x.png")
    file = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "<image>What?", "output": "Noise.", "images": ["x.png"]}])
    tok = tokenizer_of(model)
    spec = load_image_spec(str(model), tok)
    opts = DataOptions(data_path=[str(file)])
    first = prepared_dir(opts, [str(file)], tok, image_spec=spec)
    before = json.loads((first / "manifest.json").read_text())["fingerprint"]
    assert prepared_dir(opts, [str(file)], tok, image_spec=spec) == first
    picture(Path(image), 20, 30, 7)  # same size, other pixels: the same tokens
    again = prepared_dir(opts, [str(file)], tok, image_spec=spec)
    after = json.loads((again / "manifest.json").read_text())["fingerprint"]
    assert after != before
    assert [Path(p).read_bytes() for p in load_prepared(again)[0]["images"]] == [Path(image).read_bytes()]


def test_sftdataset_reads_images_with_the_tokenizers_model(vl):
    from sftkit import SFTDataset

    model, data = vl
    rows, _ = rows_of_each_form(data)["trl_images"]
    ds = SFTDataset(str(write_jsonl(data / "api.jsonl", rows)), tokenizer_of(model))
    assert (np.array(ds[0]["input_ids"]) == IMAGE_TOKEN).sum() > 0 and len(ds[0]["images"]) == 1
    assert Path(ds[0]["images"][0]).read_bytes() == (data / "small.png").read_bytes()


def test_a_unified_processor_config_is_read_as_well(vl, tmp_path):
    """transformers 5's processor.save_pretrained writes processor_config.json alone (the image
    processor's config under "image_processor"): the same ids as from preprocessor_config.json."""
    model, data = vl
    unified = shutil.copytree(model, tmp_path / "model")
    config = json.loads((unified / "preprocessor_config.json").read_text())
    (unified / "processor_config.json").write_text(json.dumps({"image_processor": config,
                                                                "processor_class": "Qwen3VLProcessor"}))
    (unified / "preprocessor_config.json").unlink()
    rows, _ = rows_of_each_form(data)["llamafactory_alpaca"]
    file = write_jsonl(data / "unified.jsonl", rows)
    got, want = prepared(unified, [file], tmp_path / "a")[1][0], prepared(model, [file], tmp_path / "b")[1][0]
    assert got["input_ids"] == want["input_ids"] and got["labels"] == want["labels"]
    assert [Path(p).name for p in got["images"]] == [Path(p).name for p in want["images"]]


def test_a_decoded_hub_image_is_stored_as_png(vl):
    """A Hub dataset's Image feature comes decoded (a PIL image): stored as its PNG, whose pixels
    are the image's."""
    import hashlib

    from PIL import Image

    from sftkit.data import formats, images
    from sftkit.models import load_image_spec

    model, data = vl
    decoded = Image.open(data / "tall.jpg").convert("RGB")
    row = {"messages": [{"role": "user", "content": "<image>Which?"}, {"role": "assistant", "content": "That."}],
           "images": [decoded]}
    msgs, _ = formats.to_conversation(row, "messages")
    stored = []
    assert images.gather(msgs, row, None, load_image_spec(str(model), None), stored.append) == 1
    assert stored[0].sha256 == hashlib.sha256(stored[0].data).hexdigest()
    assert np.array_equal(np.asarray(images.decode(stored[0].data)), np.asarray(decoded))
    assert (stored[0].width, stored[0].height) == decoded.size


def test_prepare_data_reports_the_images(vl, tmp_path, cli):
    model, data = vl
    rows, _ = rows_of_each_form(data)["llamafactory_alpaca"]
    file = write_jsonl(data / "report.jsonl", rows)
    result = cli("prepare-data", "--model_name_or_path", model, "--data_path", file, "--output_dir", tmp_path / "out",
                 "--inspect", "1")
    assert result.exit_code == 0, result.output
    assert "examples with images" in result.output and "2 (2," in result.output
    # 20x30 pixels are 8 tokens (resized to 16x32, 4-pixel patches merged 2x2), 40x12 are 10
    assert "<|vision_start|><|image_pad|> x 8<|vision_end|>Describe <|vision_start|><|image_pad|> x 10" in result.output


def test_child_processes_prepare_the_same_set_with_images(vl, tmp_path):
    """Image rows rendered by two child processes (600 rows: two chunks) give the set one process
    gives, byte for byte; a bad image among them is skipped and counted with --skip_bad_rows."""
    model, data = vl
    rows = [{"instruction": f"<image>Row {i}?", "output": f"Answer {i}.", "images": ["small.png"]} if i % 2 else
            {"instruction": f"Row {i}?", "output": f"Answer {i}."} for i in range(600)]
    rows.append({"instruction": "<image>x", "output": "y", "images": ["missing.png"]})
    file = write_jsonl(data / "many.jsonl", rows)
    one, _ = prepared(model, [file], tmp_path / "one", num_proc=1, skip_bad_rows=True)
    two, _ = prepared(model, [file], tmp_path / "two", num_proc=2, skip_bad_rows=True)
    assert one["fingerprint"] == two["fingerprint"] and one["dropped"]["bad_row"] == 1
    assert one["images"]["examples_with_images"] == 300 and one["images"]["stored"] == 1
    for name in ("dataset/data-00000-of-00001.arrow", "images.arrow"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


def test_a_set_prepared_with_another_image_processor_is_refused(vl, tmp_path):
    from sftkit.data.dataset import prepared_dir
    from sftkit.errors import ConfigError
    from sftkit.models import load_image_spec, load_tokenizer

    model, data = vl
    rows, _ = rows_of_each_form(data)["trl_images"]
    file = write_jsonl(data / "other_processor.jsonl", rows)
    prepared(model, [file], tmp_path / "set")
    other = shutil.copytree(model, tmp_path / "other")
    config = json.loads((other / "preprocessor_config.json").read_text())
    (other / "preprocessor_config.json").write_text(json.dumps({**config, "size": {"shortest_edge": 256,
                                                                                   "longest_edge": 4096}}))
    tok = load_tokenizer(str(other))
    opts = DataOptions(data_path=[str(tmp_path / "set")])
    with pytest.raises(ConfigError, match="prepared with another image processor"):
        prepared_dir(opts, opts.data_path, tok, image_spec=load_image_spec(str(other), tok))
    assert prepared_dir(opts, opts.data_path, tok, image_spec=load_image_spec(str(model), tok)) == tmp_path / "set"


def test_template_switches_and_tool_calls_render_as_the_processor_does(vl, tmp_path, monkeypatch):
    """--enable_thinking false and a tool-calling conversation with an image: the processor's ids."""
    from PIL import Image

    model, data = vl
    processor = reference_processor(model, monkeypatch)
    call = {"type": "function", "function": {"name": "zoom", "arguments": {"factor": 2}}}
    tools = [{"type": "function", "function": {"name": "zoom", "description": "Zoom in.",
                                               "parameters": {"type": "object", "properties": {"factor": {"type": "integer"}}}}}]
    row = {"messages": [{"role": "user", "content": [{"type": "image", "image": "wide.png"}, {"type": "text", "text": "Zoom."}]},
                        {"role": "assistant", "content": "", "tool_calls": [call]},
                        {"role": "tool", "content": "zoomed"},
                        {"role": "assistant", "content": "Done."}], "tools": tools}
    want_messages = [{"role": "user", "content": [{"type": "image", "image": Image.open(data / "wide.png")},
                                                   {"type": "text", "text": "Zoom."}]}, *row["messages"][1:]]
    file = write_jsonl(data / "tools.jsonl", [row])
    _, ds = prepared(model, [file], tmp_path / "out", enable_thinking=False)
    want = processor.apply_chat_template(want_messages, tools=tools, tokenize=True, return_dict=True,
                                         enable_thinking=False)
    assert ds[0]["input_ids"] == want["input_ids"][0]
    labels = np.array(ds[0]["labels"])
    assert processor.tokenizer.decode(np.array(ds[0]["input_ids"])[labels != IGNORE_INDEX]).endswith("Done.<|im_end|>")


def test_a_bad_row_leaves_no_image_in_the_set(vl, tmp_path):
    """--skip_bad_rows: a row whose second image is missing stores not even its first."""
    model, data = vl
    file = write_jsonl(data / "half_bad.jsonl", [
        {"instruction": "<image> and <image>", "output": "Two.", "images": ["tall.jpg", "missing.png"]},
        {"instruction": "<image>One.", "output": "One.", "images": ["small.png"]}])
    manifest, _ = prepared(model, [file], tmp_path / "out", skip_bad_rows=True)
    assert manifest["dropped"]["bad_row"] == 1 and manifest["images"]["stored"] == 1
    stored = {p.name for p in (tmp_path / "out" / "images").iterdir()}
    assert stored == {hashlib.sha256((data / "small.png").read_bytes()).hexdigest()}
