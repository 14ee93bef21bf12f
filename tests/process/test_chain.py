"""The chain a user runs, through the real CLI: prepare-data -> accelerate launch train -> eval ->
merge-lora, full fine-tuning, and the demo that shows the chain learned. Tiny Qwen3, real
tokenizer, CPU."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, losses, read_metrics, run_cli, steps

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
    head, records = read_metrics(lora_run)[0], steps(lora_run)
    assert head["world_size"] == 1 and head["distributed_type"] == "NO" and head["mixed_precision"] == "no"
    assert len(records) == 24
    for key in ("step", "epoch", "loss", "lr", "grad_norm", "tokens", "supervised_tokens", "tokens_per_s", "elapsed_s"):
        assert all(key in r for r in records), key
    first, last = [r["loss"] for r in records[:5]], [r["loss"] for r in records[-5:]]
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
    loss = losses(out)
    assert len(loss) == 6 and loss[6] < loss[1]
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert model.config.model_type == "qwen3"
    assert sum(p.numel() for p in model.parameters()) > 9_000_000
    assert not list(out.glob("checkpoint-*"))


def test_the_demo_shows_that_the_chain_learned(tmp_path):
    """README's first command after setup: the merged model answers the trained prompts with the
    trained replies (the base model does not), and nothing third-party is printed."""
    proc = subprocess.run(["bash", "scripts/demo.sh"], cwd=ROOT, env={**os.environ, "OUT": str(tmp_path / "demo")},
                          capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.strip() == "", proc.stderr
    assert "the base model vs the merged (fine-tuned) model" in proc.stdout
    # the demo's last line is computed from its numbers, and the README quotes what it prints
    sys.path.insert(0, str(ROOT / "scripts"))
    from demo_compare import describe, run_numbers

    said = describe(*run_numbers(tmp_path / "demo" / "run"))
    assert said in " ".join(proc.stdout.split())
    quoted = re.search(r"\n((?:> .*\n)+)", (ROOT / "README.md").read_text()).group(1)
    assert " ".join(quoted.replace("> ", " ").split()) == said
    rows = json.loads((tmp_path / "demo" / "compare.json").read_text())
    assert len(rows) == 4 and all(r["merged"] == r["trained_reply"] for r in rows)
    assert not any(r["base"] == r["trained_reply"] for r in rows)
