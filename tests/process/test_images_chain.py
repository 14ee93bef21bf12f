"""Image-and-text rows through the real CLI on a tiny random-init Qwen3.5 (tests/family.py): the
forms of tests/test_images.py through prepare-data, LoRA packed (stopped and resumed exactly),
full fine-tuning unpadded, eval (loss and generation for image prompts) and merge-lora, each output
the vision-language checkpoint again, with its image processor; two ranks where one micro-batch
has an image and the other none (ZeRO-3 in `make test`, DDP with a trained merger and FSDP2
behind `-m family`) train what one process trains."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import ROOT, TWO, final_weights, losses, read_metrics, run_cli, stopped_at, write_jsonl
from test_family import check_layout
from test_images import picture, rows_of_each_form

SHORT = ["--logging_steps", "1", "--max_length", "256", "--dataloader_num_workers", "1"]


@pytest.fixture(scope="module")
def image_data(family_model, tmp_path_factory):
    """(model, prepared set, its source files): the four forms and a text-only file."""
    model = family_model("qwen3_5")
    data = tmp_path_factory.mktemp("image_rows")
    picture(data / "wide.png", 20, 30, 0)
    picture(data / "tall.jpg", 40, 12, 1)
    picture(data / "small.png", 9, 9, 2)
    files = [write_jsonl(data / f"{form}.jsonl", rows * 2) for form, (rows, _) in rows_of_each_form(data).items()]
    files.append(write_jsonl(data / "text.jsonl", [{"instruction": f"Say {i}.", "output": f"{i}."} for i in range(4)]))
    out = data / "prepared"
    run_cli("prepare-data", "--model_name_or_path", str(model), *[a for f in files for a in ("--data_path", str(f))],
            "--output_dir", str(out), "--max_length", "256")
    return model, out, files


def test_lora_packed_on_images_resumes_exactly_evals_and_merges(image_data, tmp_path):
    model, prepared, files = image_data
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert manifest["images"]["examples_with_images"] == 10 and manifest["examples_kept"] == 14
    args = ["train", "--model_name_or_path", str(model), "--data_path", str(prepared), "--use_lora", "--packing",
            "--max_steps", "4", "--save_steps", "2", "--per_device_train_batch_size", "2", "--learning_rate", "1e-3",
            *SHORT]
    whole = tmp_path / "whole"
    run_cli(*args, "--output_dir", str(whole))
    start = next(r for r in read_metrics(whole) if r.get("event") == "start")
    assert start["packing_check"]["leaked"] is None and start["packing_check"]["examples"] >= 2
    resumed = stopped_at(whole, tmp_path / "resumed", 2)
    run_cli(*args, "--output_dir", str(resumed), "--resume_from_checkpoint", "latest")
    assert losses(resumed) == losses(whole)
    for name, tensor in final_weights(whole).items():
        assert torch.equal(final_weights(resumed)[name], tensor), name
    # the adapter holds the language model's LoRA alone; eval and generation read the images
    adapter = whole / "final"
    assert all(".language_model." in k and "visual" not in k for k in final_weights(whole))
    assert (adapter / "preprocessor_config.json").is_file()
    ev = tmp_path / "eval"
    run_cli("eval", "--model", str(adapter), "--data_path", str(files[0]), "--output_dir", str(ev),
            "--num_samples", "2", "--max_new_tokens", "3")
    result = json.loads((ev / "eval.json").read_text())
    samples = [json.loads(line) for line in (ev / "samples.jsonl").read_text().splitlines()]
    assert result["num_samples"] == 2 and all(s["prompt"][0]["content"][0]["type"] == "image" for s in samples)
    merged = tmp_path / "merged"
    run_cli("merge-lora", "--adapter", str(adapter), "--output_dir", str(merged))
    check_layout(merged, model, "qwen3_5")
    assert (merged / "preprocessor_config.json").read_bytes() == (model / "preprocessor_config.json").read_bytes()
    again = tmp_path / "eval_merged"
    run_cli("eval", "--model", str(merged), "--data_path", str(files[0]), "--output_dir", str(again))
    assert json.loads((again / "eval.json").read_text())["loss"] == pytest.approx(result["loss"], rel=1e-4)


def test_full_fine_tuning_on_images_keeps_the_tower_and_the_layout(image_data, tmp_path):
    model, prepared, _ = image_data
    out = tmp_path / "full"
    run_cli("train", "--model_name_or_path", str(model), "--data_path", str(prepared), "--max_steps", "2",
            "--save_steps", "0", "--per_device_train_batch_size", "3", "--gradient_accumulation_steps", "2",
            "--learning_rate", "1e-3", *SHORT, "--output_dir", str(out))
    check_layout(out / "final", model, "qwen3_5")  # the vision tower byte for byte: frozen by default
    assert (out / "final" / "preprocessor_config.json").is_file()
    # --train_vision merger and tower: tests/test_images.py (which parameters train) and the 2-rank
    # DDP test below (a trained merger on ranks with and without images)


def test_images_on_a_text_model_are_refused_before_it_loads(image_data, tmp_path):
    _, _, files = image_data
    result = run_cli("train", "--data_path", str(files[0]), "--output_dir", str(tmp_path / "out"), "--max_steps", "1",
                     check=False)
    assert result.returncode == 2 and "the model is a text model" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr
    shutil.rmtree(tmp_path / "out", ignore_errors=True)


def two_rank_config(name: str, tmp_path) -> list[str]:
    if name == "multi_gpu":
        return ["--config_file", "accelerate_configs/multi_gpu.yaml"]
    if name == "fsdp2":
        return ["--config_file", "accelerate_configs/fsdp2.yaml"]
    ds = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # every tensor partitioned
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    config = (ROOT / "accelerate_configs" / "deepspeed_zero3.yaml").read_text()
    (tmp_path / "acc.yaml").write_text(config.replace("ds_configs/zero3.json", str(tmp_path / "ds.json")))
    return ["--config_file", str(tmp_path / "acc.yaml")]


@pytest.mark.parametrize("config, vision", [
    ("zero3", "frozen"),
    pytest.param("multi_gpu", "merger", marks=pytest.mark.family),
    pytest.param("fsdp2", "frozen", marks=pytest.mark.family),
])
def test_two_ranks_with_and_without_images_train_what_one_does(image_data, tmp_path, config, vision):
    """Micro-batches of one example on each of two ranks: where one holds an image and the other
    none, both run the vision tower (a stand-in image, times 0), so ZeRO-3 and FSDP2 gather its
    weights on both and DDP gets the trained merger's gradient from both."""
    model, _, files = image_data
    # one row with an image and one without: each step (an epoch) gives each rank one of them
    pair = [write_jsonl(tmp_path / "image.jsonl", [json.loads(files[0].read_text().splitlines()[0])]),
            write_jsonl(tmp_path / "text.jsonl", [json.loads(files[4].read_text().splitlines()[0])])]
    shutil.copy(files[0].parent / "wide.png", tmp_path)
    shutil.copy(files[0].parent / "tall.jpg", tmp_path)
    args = ["train", "--model_name_or_path", str(model), *[a for f in pair for a in ("--data_path", str(f))],
            "--max_steps", "3", "--save_steps", "0", "--train_vision", vision, *SHORT]
    run_cli(*args, "--per_device_train_batch_size", "2", "--output_dir", str(tmp_path / "one"))
    env = {"ACCELERATE_USE_CPU": "true"} if config == "multi_gpu" else {}
    run_cli(*args, "--per_device_train_batch_size", "1", "--output_dir", str(tmp_path / "two"),
            launch=[*two_rank_config(config, tmp_path), *TWO], env=env)
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)
    if config == "zero3":  # and one process accumulating two micro-batches of one
        run_cli(*args, "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "2",
                "--output_dir", str(tmp_path / "accumulated"))
        assert losses(tmp_path / "accumulated") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)


@pytest.mark.family
@pytest.mark.parametrize("kind", ["qwen3_5_moe", "qwen3_vl"])
def test_other_vision_language_models_train_eval_and_merge_on_images(image_data, family_model, tmp_path, kind):
    """Qwen3.5-MoE (routed experts under the vision tower) and Qwen3-VL (deepstack features) through
    LoRA packed, eval and merge-lora on the image rows, each merged model loaded with its image-text
    class and giving the adapter's eval loss."""
    import family

    _, _, files = image_data
    model = family_model(kind) if kind != "qwen3_vl" else family.build_qwen3_vl(tmp_path / "qwen3_vl")
    out = tmp_path / "run"
    run_cli("train", "--model_name_or_path", str(model), *[a for f in files for a in ("--data_path", str(f))],
            "--use_lora", "--packing", "--max_steps", "2", "--save_steps", "0", "--per_device_train_batch_size", "2",
            *SHORT, "--output_dir", str(out))
    assert next(r for r in read_metrics(out) if r.get("event") == "start")["packing_check"]["leaked"] is None
    run_cli("eval", "--model", str(out / "final"), "--data_path", str(files[0]), "--output_dir", str(tmp_path / "e1"))
    run_cli("merge-lora", "--adapter", str(out / "final"), "--output_dir", str(tmp_path / "merged"))
    run_cli("eval", "--model", str(tmp_path / "merged"), "--data_path", str(files[0]), "--output_dir",
            str(tmp_path / "e2"))
    first, second = (json.loads((tmp_path / e / "eval.json").read_text())["loss"] for e in ("e1", "e2"))
    assert second == pytest.approx(first, rel=1e-4)
    from transformers import AutoModelForImageTextToText

    assert "ForConditionalGeneration" in type(AutoModelForImageTextToText.from_pretrained(tmp_path / "merged")).__name__
