"""train through the CLI: the numbers (micro-batch splits, options that must leave the losses
unchanged, packing), what a LoRA checkpoint holds, QLoRA on this CPU, and runs whose steps diverge,
are skipped or are bigger than the data."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import LORA, ROOT, SAMPLE, chat_rows, final_weights, losses, one_error, read_metrics, run_cli, steps
from safetensors import safe_open
from safetensors.torch import load_file


def test_accumulation_parity(eight, tmp_path):
    """8x1, 2x4 and 1x8 see the same 8 examples per step: same losses, same weights (rtol 1e-5).

    adam_epsilon 1: plain Adam divides near-zero gradients by their own tiny norm and turns float
    round-off (1e-9) into weight differences of 1e-6; with a large epsilon the update is
    proportional to the gradient, so any mis-weighting of micro-batches shows, even a uniform scale.
    """
    runs = {}
    for micro, accum in ((8, 1), (2, 4), (1, 8)):
        out = tmp_path / f"m{micro}a{accum}"
        run_cli("train", "--data_path", str(eight), "--output_dir", str(out), "--max_steps", "3", "--save_steps", "0",
                "--per_device_train_batch_size", str(micro), "--gradient_accumulation_steps", str(accum),
                "--adam_epsilon", "1", "--learning_rate", "1", "--max_length", "512", "--warmup_ratio", "0",
                "--logging_steps", "1", "--seed", "7")
        runs[(micro, accum)] = (list(losses(out).values()), final_weights(out))
    ref_losses, ref_weights = runs[(8, 1)]
    assert len(ref_losses) == 3 and ref_losses[2] < ref_losses[0]
    for key, (got, w) in runs.items():
        assert got == pytest.approx(ref_losses, rel=1e-5), key
        for name, tensor in ref_weights.items():
            torch.testing.assert_close(w[name], tensor, rtol=1e-5, atol=1e-7, msg=f"{key} {name}")


def test_training_options_leave_losses_unchanged(tmp_path):
    """Through the real CLI: the plain path, the foreach optimizer, in-process collation and no
    packing check give the losses of the defaults (fused loss, fused AdamW, one DataLoader worker); torch.compile
    (compiled per layer) gives them to round-off; MFU follows the given peak. The compile runs on
    aot_eager, which traces forward and backward as inductor does: inductor's CPU kernels, which no
    GPU run uses, cost 45 s of C++ compiling on a fresh machine (inductor on a GPU: tests/test_gpu.py)."""
    common = ["--data_path", str(ROOT / SAMPLE), "--max_steps", "4", "--save_steps", "0",
              "--max_length", "512", "--learning_rate", "1e-3", "--warmup_ratio", "0", "--logging_steps", "1",
              "--per_device_train_batch_size", "4", "--packing"]
    variants = {
        "default": ["--mfu_peak_tflops", "0.5"],
        "plain": ["--loss_chunk_size", "0", "--no-fused_adamw", "--dataloader_num_workers", "0", "--packing_check",
                  "false"],
        "compiled": ["--torch_compile", "--torch_compile_backend", "aot_eager"],
        "varlen": ["--attn_implementation", "varlen"],  # one padding-free row a micro-batch, offsets via the worker
    }
    seen = {}
    for name, extra in variants.items():
        run_cli("train", *common, "--output_dir", str(tmp_path / name), *extra)
        records = read_metrics(tmp_path / name)
        seen[name] = list(losses(tmp_path / name).values())
        assert records[0]["fused_loss"] is (name != "plain")
        assert records[0]["attention"] == ("varlen" if name == "varlen" else "sdpa")  # auto on a CPU: sdpa
        check = records[0]["packing_check"]
        assert check == {"skipped": "--packing_check false"} if name == "plain" else check["leaked"] is None, check
        if name == "default":
            mfu = [(r["mfu"], r["tflops_per_device"]) for r in steps(tmp_path / name)]
            assert all(got == pytest.approx(tflops / 0.5, rel=1e-2) for got, tflops in mfu)
            assert records[-1]["mfu"] > 0 and records[-1]["peak_rss_mb"] > 0
    assert len(seen["default"]) == 4 and seen["default"][-1] < seen["default"][0]
    assert seen["plain"] == pytest.approx(seen["default"], rel=1e-5)
    assert seen["compiled"] == pytest.approx(seen["default"], rel=1e-3)
    assert seen["varlen"] == pytest.approx(seen["default"], rel=1e-5)


def test_packed_training_runs_and_logs_padding_efficiency(eight, tmp_path):
    out = tmp_path / "packed"
    run_cli("train", "--data_path", str(eight), "--output_dir", str(out), "--max_steps", "2", "--save_steps", "0",
            "--packing", "--per_device_train_batch_size", "1", "--max_length", "512", "--learning_rate", "1e-3",
            "--warmup_ratio", "0", "--logging_steps", "1", "--seed", "7")
    records = read_metrics(out)
    assert records[0]["rows_per_epoch"] < 8  # 8 examples of <= 103 tokens share rows of 512
    assert all(0 < r["padding_efficiency"] <= 1 for r in steps(out))
    check = records[0]["packing_check"]
    assert check["leaked"] is None and check["examples"] == 4 and check["largest_change"] < 1e-4, check
    proc = run_cli("train", "--data_path", str(eight), "--output_dir", str(tmp_path / "x"), "--packing",
                   "--attn_implementation", "sdpa_paged", check=False)
    assert proc.returncode == 2 and "packing needs an attention implementation" in proc.stderr


# Imported at start-up by the interpreter of a run (sitecustomize on PYTHONPATH): transformers' mask
# builder no longer finds the packed examples in restarting position_ids, as a version that dropped
# that detection would, so sdpa attention sees the whole packed row.
DROP_BOUNDARIES = """
import transformers.masking_utils as masking
masking.find_packed_sequence_indices = lambda position_ids: None
"""


def test_a_packed_run_whose_examples_would_see_each_other_stops_before_step_one(eight, tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(DROP_BOUNDARIES)
    env = {"PYTHONPATH": str(tmp_path / "site")}
    args = ["train", "--data_path", str(eight), "--max_steps", "1", "--save_steps", "0", "--packing", "--max_length", "512"]
    proc = run_cli(*args, "--output_dir", str(tmp_path / "leaky"), env=env, fresh=True, check=False)
    one_error(proc, "packed examples see each other", "layer 0 (attention)", "without --packing")
    assert not (tmp_path / "leaky" / "metrics.jsonl").exists()


# what a checkpoint keeps beside its tensors, the same at any model size: the tokenizer (11 MB of
# Qwen3's tokenizer.json), so that eval and merge-lora of a checkpoint render with the run's template
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def tensors(file) -> dict[str, tuple]:
    with safe_open(str(file), framework="pt") as f:
        return {k: (str(f.get_slice(k).get_dtype()), tuple(f.get_slice(k).get_shape())) for k in f.keys()}  # noqa: SIM118


def test_a_lora_checkpoint_holds_no_frozen_weight(reference_run):
    from sftkit.models import resolve_model_path

    base = Path(resolve_model_path("tiny-qwen3"))  # what the reference run trained
    ckpt = reference_run / "checkpoint-1"
    saved = tensors(ckpt / "state" / "model.safetensors")
    adapter = tensors(ckpt / "model" / "adapter_model.safetensors")
    base_names = tensors(base / "model.safetensors")
    # 2 layers x 7 projections x (A, B): 28 tensors, all of them LoRA's, none of the base's 24
    assert len(saved) == 28 and all(".lora_A." in k or ".lora_B." in k for k in saved), sorted(saved)
    assert not {k.split("base_model.model.")[-1] for k in saved} & set(base_names)
    assert {k.replace(".default", "") for k in saved} == set(adapter) and all(d == "F32" for d, _ in saved.values())
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["version"] == 4 and state["base_model"] == str(base) and len(state["base_hash"]) == 16
    # the size: adapter + its two AdamW moments (3 x the adapter), within 2x, the tokenizer aside
    adapter_bytes = (ckpt / "model" / "adapter_model.safetensors").stat().st_size
    total = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file() and f.name not in TOKENIZER_FILES)
    assert total < 2 * 3 * adapter_bytes, (total, adapter_bytes)
    assert all(v[1].startswith("xxh3_128:") for v in json.loads((ckpt / "checksums.json").read_text()).values())


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
def test_qlora_on_this_cpu_trains_resumes_and_merges_into_the_unquantized_base(tmp_path):
    """bitsandbytes' CPU backend (0.50.2) runs nf4: the frozen projections are 4-bit, the
    checkpoint holds the adapter alone, resume continues exactly, and merge-lora merges into the
    unquantized base the adapter names (tiny-qwen3's is fp32 on disk; a Qwen3's bf16)."""
    import bitsandbytes as bnb

    from sftkit.config import SFTConfig
    from sftkit.models import build_for_training, resolve_model_path

    base = Path(resolve_model_path("tiny-qwen3"))
    model = build_for_training(SFTConfig(use_lora=True, load_in_4bit=True, model_name_or_path=str(base)))
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, bnb.nn.Linear4bit) and q_proj.base_layer.weight.quant_type == "nf4"
    assert q_proj.base_layer.weight.quant_state.nested and q_proj.lora_A.default.weight.dtype == torch.float32
    args = [*LORA, "--data_path", SAMPLE, "--max_length", "256", "--save_steps", "1", "--load_in_4bit",
            "--model_name_or_path", str(base), "--max_steps", "2"]
    out = tmp_path / "run"
    run_cli("train", *args, "--output_dir", str(out))
    want = losses(out)
    saved = tensors(out / "checkpoint-1" / "state" / "model.safetensors")
    assert len(saved) == 28 and all(".lora_" in k for k in saved)
    shutil.rmtree(out / "checkpoint-2")
    shutil.rmtree(out / "final")
    proc = run_cli("train", *args, "--output_dir", str(out), "--resume_from_checkpoint", "latest")
    assert "Traceback" not in proc.stderr and "gemm_4bit" not in proc.stdout + proc.stderr  # quiet
    got = losses(out)
    assert got[2] == pytest.approx(want[2], rel=1e-6) and want[2] != want[1]
    proc = run_cli("merge-lora", "--adapter", str(out / "final"), "--output_dir", str(tmp_path / "merged"))
    merged = tensors(tmp_path / "merged" / "model.safetensors")
    assert set(merged) == set(tensors(base / "model.safetensors")) and {d for d, _ in merged.values()} == {"F32"}


def test_nan_loss_stops_with_a_message_or_is_skipped(eight, tmp_path):
    # lr 1e30: Adam moves every weight by ~1e30; a few steps later the loss is NaN
    args = ["--data_path", str(eight), "--max_steps", "4", "--save_steps", "1", "--learning_rate", "1e30", "--warmup_ratio", "0",
            "--max_grad_norm", "0", "--per_device_train_batch_size", "4", "--max_length", "512", "--logging_steps", "1"]
    proc = run_cli("train", "--output_dir", str(tmp_path / "stop"), *args, check=False)
    # the loss, or before it a weight or optimizer moment checked at the save, is found non-finite
    found = re.search(r"error: training diverged at step (\d+): (the loss became nan|a weight or an optimizer moment)",
                      proc.stderr)
    assert proc.returncode == 2 and found and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    bad = int(found.group(1))
    assert 1 <= bad <= 4  # the checkpoints of the steps before it are kept, none after, and the message names the last
    kept = sorted((tmp_path / "stop").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert [p.name for p in kept] == [f"checkpoint-{i}" for i in range(1, bad)]
    assert (f"The last checkpoint, {kept[-1]}, holds finite weights." if kept else "No checkpoint was written") \
        in proc.stderr
    for checkpoint in kept:  # every checkpoint left on disk is finite
        assert all(torch.isfinite(t).all() for t in load_file(str(checkpoint / "model" / "model.safetensors")).values())
    run_cli("train", "--output_dir", str(tmp_path / "skip"), *args, "--skip_nan_steps")
    last = steps(tmp_path / "skip")[-1]
    assert last["step"] == 4 and last["skipped_steps"] >= 1 and (tmp_path / "skip" / "final").is_dir()


def test_a_diverging_run_leaves_only_finite_checkpoints(tmp_path):
    """Full fine-tuning at lr 1e5, a checkpoint every 5 steps."""
    out = tmp_path / "diverged"
    proc = run_cli("train", "--data_path", "data/sample_alpaca.json", "--learning_rate", "1e5", "--max_steps", "30",
                   "--save_steps", "5", "--max_length", "512", "--output_dir", str(out), check=False)
    assert proc.returncode == 2 and "error: training diverged at step" in proc.stderr and "Traceback" not in proc.stderr
    kept = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    for checkpoint in kept:
        assert all(torch.isfinite(t).all() for t in load_file(str(checkpoint / "model" / "model.safetensors")).values())
    assert (f"The last checkpoint, {kept[-1]}, holds finite weights" if kept else "No checkpoint was written") \
        in proc.stderr


def test_a_step_bigger_than_the_data_is_said_once(tmp_path):
    """50 accumulation steps of 4 on 8 examples: each step is the whole epoch (every epoch ends a
    step), said once with the accumulation that fills the micro-batches; the run trains 2 epochs."""
    data = chat_rows(tmp_path)  # 8 examples
    proc = run_cli("train", "--data_path", str(data), "--output_dir", str(tmp_path / "o"), "--num_train_epochs", "2",
                   "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "50", "--save_steps", "0",
                   "--dataloader_num_workers", "0")
    warning = [x for x in proc.stdout.splitlines() if "warning: one optimizer step" in x]
    assert len(warning) == 1 and "asks for 200 examples" in warning[0] and "an epoch holds 8" in warning[0]
    assert "--gradient_accumulation_steps 2 fills them" in " ".join(proc.stdout.split())
    records = steps(tmp_path / "o")
    assert [r["step"] for r in records] == [1, 2] and records[-1]["supervised_tokens"] > 0


def test_skipping_most_steps_stops_the_run(tmp_path):
    data = chat_rows(tmp_path)
    # lr 1e30 (as in the NaN test above): after a few steps every gradient is nan, every step skipped
    proc = run_cli("train", "--data_path", str(data), "--output_dir", str(tmp_path / "o"), "--max_steps", "30",
                   "--learning_rate", "1e30", "--warmup_ratio", "0", "--max_grad_norm", "0", "--skip_nan_steps",
                   "--per_device_train_batch_size", "4", "--max_length", "512", "--save_steps", "0", check=False)
    errors = [x for x in proc.stderr.splitlines() if x.strip()]  # stdout holds the progress lines
    assert proc.returncode == 2 and len(errors) == 1, proc.stdout[-1500:] + proc.stderr[-1500:]
    assert "of the first 10 steps had a nan or inf gradient and were skipped (--skip_nan_steps allows 10%)" \
        in errors[0]
