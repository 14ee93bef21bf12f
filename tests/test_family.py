"""The hybrid generations (Qwen3-Next, Qwen3.5, Qwen3.5-MoE) through the real CLI: tiny random-init
models from tests/family.py with the vendored Qwen3 tokenizer (the 248k-row Qwen3.5 one is not
available offline) and each generation's own chat template.

In CI (`make test`): Qwen3.5 with LoRA, packed, on one process and on two DDP ranks (the same
losses and adapter), merge-lora, and full fine-tuning, both written in the vision-language layout
the base came in. Behind `-m family` (deselected by `make test`; 7.4 min on 2 shared cores, 136-161 s
a generation): every hybrid through prepare-data, train (LoRA and full), eval and merge-lora, each
output loaded with plain transformers and peft.
"""

from __future__ import annotations

import json
from pathlib import Path

import family
import pytest
import torch
from conftest import read_metrics, run_cli

from sftkit.arch.layout import weight_map

HYBRIDS = ("qwen3_next", "qwen3_5", "qwen3_5_moe")
VISION_LANGUAGE = {"qwen3_5": "Qwen3_5ForConditionalGeneration", "qwen3_5_moe": "Qwen3_5MoeForConditionalGeneration"}
SHORT = ["--max_steps", "2", "--save_steps", "0", "--logging_steps", "1", "--max_length", "128"]
# lr 1 with adam_epsilon 1, as tests/test_distributed.py: updates proportional to the gradient, so
# any mis-weighting of ranks or micro-batches shows at rtol 1e-5
EXACT = ["--learning_rate", "1", "--adam_epsilon", "1", "--warmup_ratio", "0", "--lora_dropout", "0"]
TWO = ["--config_file", "accelerate_configs/multi_gpu.yaml", "--num_processes", "2", "--num_machines", "1",
       "--mixed_precision", "no", "--dynamo_backend", "no"]


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """kind -> a tiny model directory, built on first use."""
    built: dict[str, Path] = {}

    def base(kind: str) -> Path:
        if kind not in built:
            built[kind] = family.build(kind, tmp_path_factory.mktemp(kind))
        return built[kind]
    return base


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for key, shard in weight_map(folder).items():
        with safe_open(str(folder / shard), framework="pt") as f:
            out[key] = f.get_tensor(key)
    return out


def check_layout(model_dir: Path, base: Path, kind: str) -> None:
    """A Qwen3.5 output is the vision-language checkpoint again: its config, every tensor name of
    the base, the vision tower and MTP weights byte for byte, trained text weights; it loads as the
    vision-language model and as the text model, with the same logits."""
    import transformers

    if kind not in VISION_LANGUAGE:
        return
    assert json.loads((model_dir / "config.json").read_text())["architectures"] == [VISION_LANGUAGE[kind]]
    got, want = tensors(model_dir), tensors(base)
    assert got.keys() == want.keys()
    kept = [k for k in want if k.startswith(("model.visual.", "mtp."))]
    assert len(kept) > 20 and all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in kept)
    assert any(not torch.equal(got[k], want[k]) for k in want if ".linear_attn." in k)
    ids = torch.tensor([[151644, 872, 198, 9707, 151645]])
    with torch.no_grad():
        vl = getattr(transformers, VISION_LANGUAGE[kind]).from_pretrained(model_dir)(input_ids=ids).logits
        text = transformers.AutoModelForCausalLM.from_pretrained(model_dir)(input_ids=ids).logits
    torch.testing.assert_close(vl, text, rtol=0, atol=0)


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out) if "loss" in r]


@pytest.fixture(scope="module")
def packed_lora(bases, tmp_path_factory):
    """Qwen3.5, LoRA on its default targets, the 8 demo examples packed into rows of 128 tokens
    (3 rows), 2 rows a step, one process."""
    out = tmp_path_factory.mktemp("qwen3_5_lora") / "one"
    run_cli("train", "--model_name_or_path", str(bases("qwen3_5")), "--data_path", "data/demo_alpaca.json",
            "--output_dir", str(out), "--use_lora", "--packing", "--per_device_train_batch_size", "2", *SHORT, *EXACT)
    return out


def test_qwen3_5_lora_two_ranks_match_one(bases, packed_lora, tmp_path):
    """2 DDP ranks x 1 packed row train what one process with 2 rows trains: the same losses and
    adapter (Gated DeltaNet and attention LoRA weights included), ranks in sync. atol 1e-4 of each
    tensor's largest entry: the rows are padded to other widths, and float32 round-off through the
    Gated DeltaNet backward reaches 4e-5 of a gradient's size (tests/test_hybrid.py); measured 2.4e-6."""
    from safetensors.torch import load_file

    out = tmp_path / "two"
    run_cli("train", "--model_name_or_path", str(bases("qwen3_5")), "--data_path", "data/demo_alpaca.json",
            "--output_dir", str(out), "--use_lora", "--packing", "--per_device_train_batch_size", "1", *SHORT, *EXACT,
            launch=TWO, env={"ACCELERATE_USE_CPU": "true"})
    end = read_metrics(out)[-1]
    assert read_metrics(out)[0]["world_size"] == 2 and end["ranks_in_sync"] is True
    # the CPU's paths: Gated DeltaNet layers example by example, the fused loss head in chunks of 512 rows
    # (the tiny model has Qwen3's 151,936 words)
    start = read_metrics(packed_lora)[0]
    assert (start["linear_attention"], start["fused_loss"], start["loss_chunk_rows"]) == ("loop", True, 512)
    assert losses(out) == pytest.approx(losses(packed_lora), rel=1e-5)
    got, want = (load_file(str(d / "final" / "adapter_model.safetensors")) for d in (out, packed_lora))
    assert got.keys() == want.keys() and any("linear_attn.in_proj_qkv" in k for k in got)
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-4 * tensor.abs().max().item(), msg=name)


def test_qwen3_5_merge_and_full_write_the_vision_language_layout(bases, packed_lora, tmp_path):
    """merge-lora on the Qwen3.5 adapter, and a full fine-tune's final/, are the base's layout."""
    base = bases("qwen3_5")
    adapter = json.loads((packed_lora / "final" / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) >= {"in_proj_qkv", "in_proj_z", "out_proj", "q_proj", "down_proj"}
    run_cli("merge-lora", "--adapter", str(packed_lora / "final"), "--output_dir", str(tmp_path / "merged"))
    check_layout(tmp_path / "merged", base, "qwen3_5")
    run_cli("train", "--model_name_or_path", str(base), "--data_path", "data/demo_alpaca.json",
            "--output_dir", str(tmp_path / "full"), "--learning_rate", "1e-3", *SHORT)
    check_layout(tmp_path / "full" / "final", base, "qwen3_5")


@pytest.mark.family
@pytest.mark.parametrize("kind", HYBRIDS)
def test_hybrid_chain(bases, kind, tmp_path):
    """prepare-data -> train LoRA and full -> eval -> merge-lora, all exit 0; the adapter loads
    with peft on the text model, final/ and the merged model with plain transformers."""
    import transformers
    from peft import PeftModel

    base = bases(kind)
    run_cli("prepare-data", "--data_path", "data/demo_alpaca.json", "--output_dir", str(tmp_path / "prepared"),
            "--model_name_or_path", str(base), "--max_length", "128")
    for name, extra in (("lora", ["--use_lora", "--learning_rate", "1e-3"]), ("full", ["--learning_rate", "1e-4"])):
        run_cli("train", "--model_name_or_path", str(base), "--data_path", str(tmp_path / "prepared"),
                "--output_dir", str(tmp_path / name), *SHORT, *extra)
    proc = run_cli("eval", "--model", str(tmp_path / "lora" / "final"), "--data_path", "data/demo_alpaca.json")
    assert json.loads((tmp_path / "lora" / "eval" / "eval.json").read_text())["loss"] > 0, proc.stdout  # beside final/
    run_cli("merge-lora", "--adapter", str(tmp_path / "lora" / "final"), "--output_dir", str(tmp_path / "merged"))
    peft_model = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base),
                                           str(tmp_path / "lora" / "final"))
    assert any(".linear_attn." in n and "lora_A" in n for n, _ in peft_model.named_parameters())
    for folder in (tmp_path / "full" / "final", tmp_path / "merged"):
        transformers.AutoModelForCausalLM.from_pretrained(folder)
        check_layout(folder, base, kind)
