"""On a GPU only (skipped without CUDA; `bash bench/gpu_check.sh OUTDIR` runs them with -m gpu):
the flash varlen kernel against the reference and against sdpa under the packed block mask, the
fused loss against the plain path on CUDA, inductor-compiled layers against eager, and one full
and one LoRA step of a random-init Qwen3-0.6B through sftkit's own setup and train_step; the
memory of a bf16 LoRA and a QLoRA base."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
from conftest import ROOT, loss_and_grads

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest deviation over the largest entry: bf16 round-off is relative to a tensor's scale."""
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-12)).item()


def test_flash_varlen_kernel_matches_reference_bf16():
    """The GPU kernel (torch's varlen_attn, else flash-attn) against per-example sdpa, with GQA
    and a length-1 document: outputs and the gradients of q, k and v."""
    from sftkit.arch.packed_attention import flash_varlen, offsets, reference, torch_varlen, varlen

    assert torch_varlen() is not None or flash_varlen() is not None, "no flash varlen kernel: the loop would run"
    cu, longest = offsets([1, 37, 300, 1000, 250])
    cu = cu.cuda()
    gen = torch.Generator(device="cuda").manual_seed(0)
    total = int(cu[-1])
    q, k, v = (torch.randn(total, heads, 128, device="cuda", generator=gen, dtype=torch.bfloat16).requires_grad_()
               for heads in (16, 8, 8))
    grad_out = torch.randn(total, 16, 128, device="cuda", generator=gen, dtype=torch.bfloat16)
    results = []
    for fn in (lambda: varlen(q, k, v, cu, longest, 128 ** -0.5, 0.0), lambda: reference(q, k, v, cu, 128 ** -0.5, 0.0)):
        out = fn()
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
        results.append((out, *grads))
    for got, want in zip(*results):
        assert rel_err(got, want) < 2e-2


def packed_docs(lengths, vocab=151936, seed=0):
    gen = torch.Generator().manual_seed(seed)
    docs = []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,), generator=gen).tolist()
        docs.append({"input_ids": ids, "labels": ids})
    return docs


def small_model(attention: str):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from sftkit.arch.packed_attention import register

    config = Qwen3Config(vocab_size=151936, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=64, tie_word_embeddings=True,
                         attn_implementation=register() if attention == "varlen" else attention)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).cuda()
    model.config.use_cache = False
    return model


def test_varlen_model_matches_sdpa_block_mask_bf16():
    """The packed micro-batch as one padding-free row through varlen attention, against the same
    rows under sdpa's 4-D block-diagonal mask (the fallback): loss and every gradient, bf16."""
    from sftkit.batching import collate

    docs = packed_docs([1, 700, 1200, 129, 2048, 50])
    rows = [docs[:3], docs[3:]]
    want_loss, want = loss_and_grads(small_model("sdpa"), collate(rows, 151643, True), bf16=True)
    got_loss, got = loss_and_grads(small_model("varlen"), collate(rows, 151643, True, padding_free=True), bf16=True)
    assert got_loss == pytest.approx(want_loss, rel=1e-2)
    for name in want:
        assert rel_err(got[name], want[name]) < 5e-2, name


@pytest.mark.parametrize("bf16", [False, True])
def test_fused_loss_on_cuda_matches_plain(bf16):
    """The fused head as a GPU run builds it (bf16: the lm_head gradient summed in bf16 over 5
    chunks of 512 rows) against the plain path, loss and every gradient."""
    from sftkit.batching import collate
    from sftkit.loss import fused_head

    model = small_model("varlen")
    batch = collate([packed_docs([900, 1100, 300])], 151643, True, padding_free=True)
    plain_loss, plain = loss_and_grads(model, batch, None, bf16)
    head = fused_head(model, "bf16" if bf16 else "no", False, 512, cuda=True)
    assert head is not None and head.grad_dtype == (torch.bfloat16 if bf16 else torch.float32)
    loss, grads = loss_and_grads(model, batch, head, bf16)
    assert loss == pytest.approx(plain_loss, rel=1e-3 if bf16 else 1e-5)
    for name in plain:
        assert rel_err(grads[name], plain[name]) < (3e-2 if bf16 else 1e-4), name


def test_inductor_compiled_layers_match_eager_on_cuda():
    """--torch_compile as a GPU run builds it (inductor, each decoder layer, dynamic shapes) against
    eager: loss and every gradient, on two packed micro-batches of different lengths. (The CPU
    tests compile with aot_eager: inductor's CPU kernels are no GPU run's.)"""
    from sftkit.batching import collate
    from sftkit.models import compile_layers

    batches = [collate([packed_docs(lengths, seed=i)], 151643, True, padding_free=True)
               for i, lengths in enumerate(([900, 1100, 300], [64, 700]))]
    want_loss, want = loss_and_grads(small_model("varlen"), batches, bf16=True)
    model = small_model("varlen")
    compile_layers(model, "inductor")
    got_loss, got = loss_and_grads(model, batches, bf16=True)
    assert got_loss == pytest.approx(want_loss, rel=1e-2)
    for name in want:
        assert rel_err(got[name], want[name]) < 5e-2, name


@pytest.fixture(scope="module")
def qwen3_0_6b(tmp_path_factory):
    """A random-init Qwen3-0.6B directory (bf16 weights, as published) with the bundled tokenizer."""
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from sftkit.models import bundled_tokenizer_dir

    path = tmp_path_factory.mktemp("qwen3-0.6b")
    config = Qwen3Config.from_pretrained(ROOT / "bench" / "qwen3" / "Qwen3-0.6B")
    with torch.device("cuda"):
        torch.manual_seed(0)
        model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(bundled_tokenizer_dir()).save_pretrained(path)
    del model
    torch.cuda.empty_cache()
    return path


@pytest.mark.parametrize("lora", [False, True])
def test_one_step_of_qwen3_0_6b(qwen3_0_6b, tmp_path, lora):
    """sftkit's setup and train_step on a GPU, packed, bf16: varlen attention by default, the fused
    loss, a finite loss near ln(vocab) for random weights, and a finite gradient norm."""
    from sftkit.config import SFTConfig
    from sftkit.train import setup, step_loader, train_step

    cfg = SFTConfig(model_name_or_path=str(qwen3_0_6b), data_path=[str(ROOT / "data" / "sample_alpaca.json")],
                    output_dir=str(tmp_path / "out"), packing=True, max_length=2048, bf16=True, max_steps=1,
                    per_device_train_batch_size=2, use_lora=lora, save_steps=0, learning_rate=1e-4)
    run = setup(cfg)
    start = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[0])
    assert start["attention"] == "varlen" and start["fused_loss"] is True
    stats = train_step(run, next(step_loader(run)))
    loss = stats.loss(run.accelerator)
    assert math.isfinite(loss) and abs(loss - math.log(151936)) < 2.0, loss
    assert math.isfinite(float(stats.grad_norm))
    del run
    torch.cuda.empty_cache()


def lora_setup(path, out, **options):
    """setup() of a bf16 LoRA run on `path`; (run, GPU bytes its model holds)."""
    from sftkit.config import SFTConfig
    from sftkit.train import setup

    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    run = setup(SFTConfig(model_name_or_path=str(path), data_path=[str(ROOT / "data" / "sample_alpaca.json")],
                          output_dir=str(out), max_length=512, bf16=True, max_steps=2, per_device_train_batch_size=2,
                          use_lora=True, save_steps=0, learning_rate=1e-4, **options))
    return run, torch.cuda.memory_allocated() - before


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes (sftkit[qlora])")
def test_qlora_and_bf16_lora_memory_of_qwen3_0_6b(qwen3_0_6b, tmp_path):
    """A --bf16 LoRA run holds Qwen3-0.6B's frozen base in bf16: 2 bytes x 596M = 1.19 GB, plus the
    fp32 adapter (10.1M x 4 = 0.04 GB). --load_in_4bit holds the 440M projection weights in nf4
    (0.5 byte each and its double-quantized scales) beside the bf16 embedding (156M): about 0.6 GB
    in all, so under 0.65 x the bf16 run's. One QLoRA step has a finite loss near ln(vocab), and
    its checkpoint, saved and loaded on the GPU, holds only LoRA tensors. The figures are printed
    for bench/RESULTS.md (pytest -s)."""
    from safetensors import safe_open

    from sftkit.checkpoint import load_checkpoint, save_checkpoint
    from sftkit.train import step_loader, train_step

    run, bf16_bytes = lora_setup(qwen3_0_6b, tmp_path / "bf16")
    assert {p.dtype for p in run.model.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert 1.1e9 < bf16_bytes < 1.4e9, bf16_bytes
    del run
    run, q_bytes = lora_setup(qwen3_0_6b, tmp_path / "qlora", load_in_4bit=True)
    print(f"\nQwen3-0.6B LoRA model memory on {torch.cuda.get_device_name()}: bf16 base {bf16_bytes / 1e9:.3f} GB, "
          f"4-bit base {q_bytes / 1e9:.3f} GB")
    assert q_bytes < 0.65 * bf16_bytes, (q_bytes, bf16_bytes)
    torch.cuda.reset_peak_memory_stats()
    stats = train_step(run, next(step_loader(run)))
    loss = stats.loss(run.accelerator)
    assert math.isfinite(loss) and abs(loss - math.log(151936)) < 2.0, loss
    print(f"QLoRA step peak {torch.cuda.max_memory_allocated() / 1e9:.3f} GB")
    run.state.step = 1
    path = save_checkpoint(run.accelerator, run.model, run.tokenizer, run.cfg, run.out, run.state, run.scheduler)
    with safe_open(str(path / "state" / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
    assert names and all(".lora_" in n for n in names)
    load_checkpoint(run.accelerator, path, run.scheduler)
    del run
    torch.cuda.empty_cache()
