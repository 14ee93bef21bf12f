"""Memory and disk follow what trains (issue 21): a LoRA checkpoint holds the adapter, its
optimizer state and the base's identity, never a frozen weight; resume refuses a base that
changed; a LoRA run under --bf16 holds its frozen base in bf16 and trains what it trains in fp32;
--load_in_4bit (QLoRA) on this CPU."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import torch
from conftest import ROOT, read_metrics, run_cli
from safetensors import safe_open

ARGS = ["--data_path", "data/sample_alpaca.json", "--use_lora", "--max_length", "256", "--per_device_train_batch_size",
        "2", "--lr_scheduler_type", "constant", "--warmup_ratio", "0", "--learning_rate", "1e-3", "--logging_steps", "1",
        "--seed", "11", "--save_steps", "1"]
# what a checkpoint keeps beside its tensors, the same at any model size: the tokenizer (11 MB of
# Qwen3's tokenizer.json), so that eval and merge-lora of a checkpoint render with the run's template
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def tensors(file) -> dict[str, tuple]:
    with safe_open(str(file), framework="pt") as f:
        return {k: (str(f.get_slice(k).get_dtype()), tuple(f.get_slice(k).get_shape())) for k in f.keys()}  # noqa: SIM118


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A local copy of tiny-qwen3 (a base the test may change) and a 2-step LoRA run on it."""
    from sftkit.models import resolve_model_path

    d = tmp_path_factory.mktemp("what_trains")
    shutil.copytree(resolve_model_path("tiny-qwen3"), d / "base")
    run_cli("train", *ARGS, "--max_steps", "2", "--model_name_or_path", str(d / "base"), "--output_dir", str(d / "run"))
    return d


def test_a_lora_checkpoint_holds_no_frozen_weight(base):
    ckpt = base / "run" / "checkpoint-1"
    saved = tensors(ckpt / "state" / "model.safetensors")
    adapter = tensors(ckpt / "model" / "adapter_model.safetensors")
    base_names = tensors(base / "base" / "model.safetensors")
    # 2 layers x 7 projections x (A, B): 28 tensors, all of them LoRA's, none of the base's 24
    assert len(saved) == 28 and all(".lora_A." in k or ".lora_B." in k for k in saved), sorted(saved)
    assert not {k.split("base_model.model.")[-1] for k in saved} & set(base_names)
    assert {k.replace(".default", "") for k in saved} == set(adapter) and all(d == "F32" for d, _ in saved.values())
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["version"] == 4 and state["base_model"] == str(base / "base") and len(state["base_hash"]) == 16
    # the size: adapter + its two AdamW moments (3 x the adapter), within 2x, the tokenizer aside
    adapter_bytes = (ckpt / "model" / "adapter_model.safetensors").stat().st_size
    total = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file() and f.name not in TOKENIZER_FILES)
    assert total < 2 * 3 * adapter_bytes, (total, adapter_bytes)
    assert all(v[1].startswith("xxh3_128:") for v in json.loads((ckpt / "checksums.json").read_text()).values())


def test_resume_refuses_a_base_that_changed(base, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(base / "run", out)
    shutil.rmtree(out / "final")
    changed = tmp_path / "base"
    shutil.copytree(base / "base", changed)
    config = json.loads((changed / "config.json").read_text())
    (changed / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    proc = run_cli("train", *ARGS, "--max_steps", "3", "--model_name_or_path", str(changed), "--output_dir", str(out),
                   "--resume_from_checkpoint", str(out / "checkpoint-2"), check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"error: {out / 'checkpoint-2'} was trained on the base model {base / 'base'}" in proc.stderr
    assert "its config or weight files changed" in proc.stderr
    # the same base, moved: its identity is its content, not its path; the run continues
    moved = tmp_path / "moved"
    shutil.copytree(base / "base", moved)
    run_cli("train", *ARGS, "--max_steps", "3", "--model_name_or_path", str(moved), "--output_dir", str(out),
            "--resume_from_checkpoint", str(out / "checkpoint-2"))
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2, 3]


def lora_step(tmp_path, name: str, **options):
    """setup() a tiny LoRA run, give lora_B seeded values (at init it is 0, which would leave
    lora_A without a gradient), and take one forward and backward of the first micro-batch
    through the run's own model and loss head: (run, loss, trainable grads)."""
    from accelerate.state import AcceleratorState

    from sftkit.config import SFTConfig
    from sftkit.loss import token_loss_sum
    from sftkit.train import setup, step_batches

    AcceleratorState._reset_state(True)  # one process, two precisions: accelerate keeps one state per process
    run = setup(SFTConfig(data_path=[str(ROOT / "data" / "sample_alpaca.json")], output_dir=str(tmp_path / name),
                          use_lora=True, max_steps=1, save_steps=0, max_length=256, per_device_train_batch_size=2,
                          seed=11, **options))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in run.model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    batch = step_batches(run)[0][0]
    loss = token_loss_sum(run.model, batch, run.head)
    loss.backward()
    return run, loss.item() / batch.targets.numel(), {n: p.grad.clone() for n, p in run.model.named_parameters()
                                                      if p.requires_grad}


def test_bf16_keeps_the_frozen_base_in_bf16_and_trains_in_fp32(tmp_path):
    """With --bf16 every frozen tensor (the tied embedding/lm_head, norms, projections) is bf16 and
    every LoRA tensor fp32; the loss and LoRA gradients match the fp32 run within bf16 round-off:
    loss within 0.1%, each gradient tensor within 8% of its norm (bf16 keeps 8 bits of mantissa,
    ~0.4% per rounding, compounded over 2 layers, a bf16 residual stream and the 151,936-word
    softmax; measured here: 1.4e-5 and at most 3.6%). A base cast wrongly (fp16 overflow, an
    integer type) or a gradient lost is off by far more."""
    run, loss, grads = lora_step(tmp_path, "bf16", bf16=True)
    frozen = {p.dtype for p in run.model.parameters() if not p.requires_grad}
    trains = {p.dtype for p in run.model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trains == {torch.float32}
    assert run.head is not None and run.head.lm_head.weight.dtype == torch.bfloat16  # the fused head, bf16
    _, want_loss, want = lora_step(tmp_path, "fp32")
    assert loss == pytest.approx(want_loss, rel=1e-3)
    assert grads.keys() == want.keys() and len(want) == 28
    for n, g in want.items():
        assert g.norm() > 0 and (grads[n] - g).norm() <= 8e-2 * g.norm(), (n, ((grads[n] - g).norm() / g.norm()).item())


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
def test_qlora_on_this_cpu_trains_resumes_and_merges_into_the_unquantized_base(base, tmp_path):
    """bitsandbytes' CPU backend (0.50.2) runs nf4: the frozen projections are 4-bit, the
    checkpoint holds the adapter alone, resume continues exactly, and merge-lora merges into the
    unquantized base the adapter names (tiny-qwen3's is fp32 on disk; a Qwen3's bf16)."""
    import bitsandbytes as bnb

    from sftkit.config import SFTConfig
    from sftkit.models import build_for_training

    model = build_for_training(SFTConfig(use_lora=True, load_in_4bit=True, model_name_or_path=str(base / "base")))
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, bnb.nn.Linear4bit) and q_proj.base_layer.weight.quant_type == "nf4"
    assert q_proj.base_layer.weight.quant_state.nested and q_proj.lora_A.default.weight.dtype == torch.float32
    args = [*ARGS, "--load_in_4bit", "--model_name_or_path", str(base / "base"), "--max_steps", "2"]
    out = tmp_path / "run"
    run_cli("train", *args, "--output_dir", str(out))
    want = {r["step"]: r["loss"] for r in read_metrics(out) if "loss" in r}
    saved = tensors(out / "checkpoint-1" / "state" / "model.safetensors")
    assert len(saved) == 28 and all(".lora_" in k for k in saved)
    shutil.rmtree(out / "checkpoint-2")
    shutil.rmtree(out / "final")
    proc = run_cli("train", *args, "--output_dir", str(out), "--resume_from_checkpoint", "latest")
    assert "Traceback" not in proc.stderr and "gemm_4bit" not in proc.stdout + proc.stderr  # quiet
    got = {r["step"]: r["loss"] for r in read_metrics(out) if "loss" in r}
    assert got[2] == pytest.approx(want[2], rel=1e-6) and want[2] != want[1]
    proc = run_cli("merge-lora", "--adapter", str(out / "final"), "--output_dir", str(tmp_path / "merged"))
    merged = tensors(tmp_path / "merged" / "model.safetensors")
    assert set(merged) == set(tensors(base / "base" / "model.safetensors")) and {d for d, _ in merged.values()} == {"F32"}


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
def test_load_in_4bit_without_bitsandbytes_is_one_line(tmp_path):
    proc = run_cli("train", *ARGS, "--max_steps", "1", "--load_in_4bit", "--output_dir", str(tmp_path / "o"),
                   check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "--load_in_4bit needs bitsandbytes: pip install" in proc.stderr


def test_load_in_4bit_needs_lora(tmp_path):
    proc = run_cli("train", "--data_path", "data/sample_alpaca.json", "--load_in_4bit", "--output_dir",
                   str(tmp_path / "o"), check=False)
    assert proc.returncode == 2 and "load_in_4bit set without use_lora" in proc.stderr


def test_sha256_checksums_of_older_checkpoints_still_verify(tmp_path):
    """A checksums.json as sftkit wrote it before state version 4 (bare sha256 hex digests)
    verifies, and a byte changed at the same size is still found; new lists are xxh3-128."""
    import hashlib

    from sftkit.checkpoint import checksums, damage

    ckpt = tmp_path / "checkpoint-3"
    (ckpt / "state").mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"version": 3, "step": 3}))
    (ckpt / "state" / "optimizer.bin").write_bytes(bytes(range(256)) * 4096)
    files = [f for f in sorted(ckpt.rglob("*")) if f.is_file()]
    old = {f.relative_to(ckpt).as_posix(): [f.stat().st_size, hashlib.sha256(f.read_bytes()).hexdigest()] for f in files}
    (ckpt / "checksums.json").write_text(json.dumps(old))
    assert damage(ckpt) is None
    blob = bytearray((ckpt / "state" / "optimizer.bin").read_bytes())
    blob[500_000] ^= 1
    (ckpt / "state" / "optimizer.bin").write_bytes(bytes(blob))
    assert damage(ckpt) == "state/optimizer.bin differs from what was saved (checksum)"
    new = checksums(ckpt)
    assert new.keys() == old.keys() and all(v[1].startswith("xxh3_128:") for v in new.values())
    (ckpt / "checksums.json").write_text(json.dumps(new))
    assert damage(ckpt) is None
