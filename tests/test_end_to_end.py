"""The real chain through the real CLI in subprocesses: prepare -> accelerate launch train ->
eval -> merge-lora, and full fine-tuning. Tiny Qwen3, real tokenizer, CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import read_metrics, run_cli

SINGLE = ["--config_file", "accelerate_configs/single_gpu.yaml", "--num_processes", "1"]
TRAIN = ["--max_steps", "24", "--per_device_train_batch_size", "4", "--logging_steps", "1",
         "--learning_rate", "0.01", "--warmup_ratio", "0", "--save_steps", "12", "--lora_dropout", "0"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "data"
    run_cli("prepare-data", "--data_path", "data/sample_alpaca.json", "--data_path", "data/sample_sharegpt.json",
            "--output_dir", str(out), "--max_length", "512")
    man = json.loads((out / "manifest.json").read_text())
    assert man["rows_in"] == 100 and man["examples_kept"] == 100
    return out


@pytest.fixture(scope="module")
def lora_run(prepared):
    out = prepared.parent / "lora"
    run_cli("train", "--data_path", str(prepared), "--output_dir", str(out), "--use_lora", *TRAIN, launch=SINGLE)
    return out


def test_lora_training_learns_and_logs_everything(lora_run):
    records = read_metrics(lora_run)
    head, steps = records[0], [r for r in records if "loss" in r]
    assert head["world_size"] == 1 and head["distributed_type"] == "NO" and head["mixed_precision"] == "no"
    assert len(steps) == 24
    for key in ("step", "epoch", "loss", "lr", "grad_norm", "tokens", "supervised_tokens", "tokens_per_s", "elapsed_s"):
        assert all(key in r for r in steps), key
    first, last = [r["loss"] for r in steps[:5]], [r["loss"] for r in steps[-5:]]
    assert sum(last) / 5 < sum(first) / 5 - 0.05, (first, last)
    cfg = (lora_run / "config.yaml").read_text()
    assert "use_lora: true" in cfg
    assert sorted(p.name for p in lora_run.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-24"]


def test_eval_writes_loss_and_perplexity(lora_run, prepared):
    run_cli("eval", "--model", str(lora_run / "final"), "--data_path", str(prepared))
    result = json.loads((lora_run / "eval" / "eval.json").read_text())  # beside the model, never inside it
    assert result["examples"] == 100 and result["supervised_tokens"] > 1000
    assert abs(result["perplexity"] - torch.tensor(result["loss"]).exp().item()) < 1e-3 * result["perplexity"]
    # eval computes the training loss's definition: same number from the checkpoint of the last step
    run_cli("eval", "--model", str(lora_run / "checkpoint-24"), "--data_path", str(prepared))
    again = json.loads((lora_run / "eval" / "eval.json").read_text())
    assert again["loss"] == pytest.approx(result["loss"], rel=1e-6)


def test_merged_model_matches_base_plus_adapter(lora_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_cli("merge-lora", "--adapter", str(lora_run / "final"), "--output_dir", str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    base_path = json.loads((lora_run / "final" / "adapter_config.json").read_text())["base_model_name_or_path"]
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path),
                                          str(lora_run / "final")).eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
             for q in ("What is 2+2?", "Name a colour.", "翻译：早上好")]
    batch = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        diff = (merged(**batch).logits - reference(**batch).logits).abs().max().item()
    assert diff < 1e-4
    gen = json.loads((tmp_path / "merged" / "generation_config.json").read_text())
    assert 151645 in gen["eos_token_id"]  # <|im_end|>: generation stops at the end of the reply


def test_full_fine_tuning_end_to_end(prepared, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "full"
    run_cli("train", "--data_path", str(prepared), "--output_dir", str(out), "--max_steps", "6",
            "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--logging_steps", "1",
            "--save_steps", "0", "--gradient_checkpointing")
    steps = [r for r in read_metrics(out) if "loss" in r]
    assert len(steps) == 6 and steps[-1]["loss"] < steps[0]["loss"]
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert model.config.model_type == "qwen3"
    assert sum(p.numel() for p in model.parameters()) > 9_000_000
    assert not list(out.glob("checkpoint-*"))


def test_train_reads_raw_data_and_reuses_its_cache(tmp_path):
    import os

    cache = Path(os.environ["SFTKIT_CACHE"]) / "prepared"
    data = tmp_path / "raw.json"
    # bytes of its own (a trailing line): the cache is keyed by content, and other tests of this
    # session prepare sample_alpaca.json with these options
    data.write_text((Path("data") / "sample_alpaca.json").resolve().read_text() + "\n")
    args = ["train", "--data_path", str(data), "--max_steps", "1", "--save_steps", "0", "--use_lora",
            "--max_length", "512"]
    before = set(cache.iterdir()) if cache.exists() else set()
    run_cli(*args, "--output_dir", str(tmp_path / "a"))
    after_first = set(cache.iterdir())
    run_cli(*args, "--output_dir", str(tmp_path / "b"))
    assert len(after_first - before) == 1 and set(cache.iterdir()) == after_first
