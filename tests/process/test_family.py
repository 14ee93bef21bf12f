"""The Qwen3 MoE and the hybrid generations (Qwen3-Next, Qwen3.5, Qwen3.5-MoE) through the real CLI:
tiny random-init models from tests/family.py with the vendored Qwen3 tokenizer (the 248k-row
Qwen3.5 one is not available offline) and each generation's own chat template.

In `make test`: Qwen3 MoE through the chain; Qwen3.5 with LoRA, packed, on one process and on two
DDP ranks (the same losses and adapter), merge-lora, and full fine-tuning, both written in the
vision-language layout the base came in. Behind `-m family` (deselected by `make test`; 7.4 min on
2 shared cores): every hybrid through prepare-data, train (LoRA and full), eval and merge-lora,
each output loaded with plain transformers and peft.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import EXACT, TWO, losses, read_metrics, run_cli, steps

from sftkit.arch.layout import weight_map

HYBRIDS = ("qwen3_next", "qwen3_5", "qwen3_5_moe")


VISION_LANGUAGE = {"qwen3_5": "Qwen3_5ForConditionalGeneration", "qwen3_5_moe": "Qwen3_5MoeForConditionalGeneration"}


SHORT = ["--max_steps", "2", "--save_steps", "0", "--logging_steps", "1", "--max_length", "128"]


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


@pytest.fixture(scope="module")
def packed_lora(family_model, tmp_path_factory):
    """Qwen3.5, LoRA on its default targets, the 8 demo examples packed into rows of 128 tokens
    (3 rows), 2 rows a step, one process."""
    out = tmp_path_factory.mktemp("qwen3_5_lora") / "one"
    run_cli("train", "--model_name_or_path", str(family_model("qwen3_5")), "--data_path", "data/demo_alpaca.json",
            "--output_dir", str(out), "--use_lora", "--packing", "--per_device_train_batch_size", "2", *SHORT, *EXACT,
            "--lora_dropout", "0")
    return out


def test_qwen3_5_lora_two_ranks_match_one(family_model, packed_lora, tmp_path):
    """2 DDP ranks x 1 packed row train what one process with 2 rows trains: the same losses and
    adapter (Gated DeltaNet and attention LoRA weights included), ranks in sync. atol 1e-4 of each
    tensor's largest entry: the rows are padded to other widths, and float32 round-off through the
    Gated DeltaNet backward reaches 4e-5 of a gradient's size (tests/test_hybrid.py); measured 2.4e-6."""
    from safetensors.torch import load_file

    out = tmp_path / "two"
    run_cli("train", "--model_name_or_path", str(family_model("qwen3_5")), "--data_path", "data/demo_alpaca.json",
            "--output_dir", str(out), "--use_lora", "--packing", "--per_device_train_batch_size", "1", *SHORT, *EXACT,
            "--lora_dropout", "0", launch=["--config_file", "accelerate_configs/multi_gpu.yaml", *TWO],
            env={"ACCELERATE_USE_CPU": "true"})
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


def test_qwen3_5_merge_and_full_write_the_vision_language_layout(family_model, packed_lora, tmp_path):
    """merge-lora on the Qwen3.5 adapter, and a full fine-tune's final/, are the base's layout."""
    base = family_model("qwen3_5")
    adapter = json.loads((packed_lora / "final" / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) >= {"in_proj_qkv", "in_proj_z", "out_proj", "q_proj", "down_proj"}
    run_cli("merge-lora", "--adapter", str(packed_lora / "final"), "--output_dir", str(tmp_path / "merged"))
    check_layout(tmp_path / "merged", base, "qwen3_5")
    run_cli("train", "--model_name_or_path", str(base), "--data_path", "data/demo_alpaca.json",
            "--output_dir", str(tmp_path / "full"), "--learning_rate", "1e-3", *SHORT)
    check_layout(tmp_path / "full" / "final", base, "qwen3_5")


def test_qwen3_moe_prepare_train_eval_merge(family_model, four, tmp_path):
    """prepare-data -> train (LoRA on the experts; and full, in this process) -> eval -> merge-lora,
    every command exit 0; aux_loss in metrics.jsonl; the adapter loads with peft, the merged and the fully trained
    models with plain transformers, and the merged experts are the trained ones."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base, data, prep = family_model("qwen3_moe"), str(four), tmp_path / "prep"
    run_cli("prepare-data", "--model_name_or_path", str(base), "--data_path", data, "--output_dir", str(prep))
    common = ["--model_name_or_path", str(base), "--data_path", str(prep), "--max_steps", "2", "--logging_steps", "1",
              "--save_steps", "0", "--learning_rate", "1e-2", "--warmup_ratio", "0"]
    trained = run_cli("train", *common, "--output_dir", str(tmp_path / "lora"), "--use_lora")  # the default LoRA
    assert "LoRA adapts the experts too" in trained.stdout
    assert read_metrics(tmp_path / "lora")[0]["router_aux_loss_coef"] == 0.001  # the config's, by default
    lora_steps = steps(tmp_path / "lora")
    assert len(lora_steps) == 2 and all(1.0 < r["aux_loss"] < 4.0 for r in lora_steps)
    adapter = tmp_path / "lora" / "final"
    assert "mlp.experts.gate_up_proj" in json.loads((adapter / "adapter_config.json").read_text())["target_parameters"]
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    assert sum(".mlp.experts." in name for name in saved) == 4 * 2  # A and B of gate_up_proj and down_proj, 2 layers
    ev = run_cli("eval", "--model", str(adapter), "--data_path", str(prep))
    assert "eval.json" in ev.stdout and "aux_loss" not in json.loads((adapter.parent / "eval" / "eval.json").read_text())
    run_cli("merge-lora", "--adapter", str(adapter), "--output_dir", str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(base)
    name = "model.layers.0.mlp.experts.gate_up_proj"
    assert not torch.equal(merged.state_dict()[name], plain.state_dict()[name])
    PeftModel.from_pretrained(plain, adapter)
    # the full fine-tune in this process (the CLI path is the LoRA run's): 15 s less of start-up
    from sftkit.config import SFTConfig
    from sftkit.train import run

    run(SFTConfig(model_name_or_path=str(base), data_path=[str(prep)], output_dir=str(tmp_path / "full"), max_steps=2,
                  save_steps=0, learning_rate=1e-2, warmup_ratio=0, logging_steps=1))
    assert all(1.0 < r["aux_loss"] < 4.0 for r in steps(tmp_path / "full"))
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "final")
    trained = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    assert not torch.equal(trained["model.layers.0.mlp.gate.weight"], plain.state_dict()["model.layers.0.mlp.gate.weight"])
    assert type(full).__name__ == "Qwen3MoeForCausalLM"


@pytest.mark.family
@pytest.mark.parametrize("kind", HYBRIDS)
def test_hybrid_chain(family_model, kind, tmp_path):
    """prepare-data -> train LoRA and full -> eval -> merge-lora, all exit 0; the adapter loads
    with peft on the text model, final/ and the merged model with plain transformers."""
    import transformers
    from peft import PeftModel

    base = family_model(kind)
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
