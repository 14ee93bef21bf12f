"""After training: merge-lora users can serve, eval on every kind of model directory, generation, and
an adapter on a base of another size named in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import BIN, built_once, free_port, one_error, run_cli

REPLIES = {"Say hi.": "Hi there!", "Capital of France?": "Paris.", "2+2?": "4", "Colour of the sky?": "Blue."}


IM_END = 151645


@pytest.fixture(scope="module")
def memorised(tmp_path_factory):
    """LoRA trained until it has memorised 4 short replies, with its checkpoint and merged model
    (built once for both workers; tests write only folders of their own names into it)."""
    return built_once(tmp_path_factory, "memorised", memorise)


def memorise(d: Path) -> None:
    (d / "mem.json").write_text(json.dumps([{"instruction": q, "output": a} for q, a in REPLIES.items()]))
    run_cli("train", "--data_path", str(d / "mem.json"), "--output_dir", str(d / "run"), "--use_lora",
            "--lora_r", "32", "--lora_alpha", "64", "--lora_dropout", "0", "--learning_rate", "0.01",
            "--max_steps", "60", "--per_device_train_batch_size", "4", "--warmup_ratio", "0",
            "--lr_scheduler_type", "constant", "--logging_steps", "10", "--save_steps", "30")
    proc = run_cli("merge-lora", "--adapter", str(d / "run" / "final"), "--output_dir", str(d / "merged"))
    assert "max |logit difference| vs base + adapter" in proc.stdout


def test_merged_model_says_the_memorised_replies_and_stops(memorised):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(memorised / "merged")
    model = AutoModelForCausalLM.from_pretrained(memorised / "merged").eval()
    for question, reply in REPLIES.items():
        prompt = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)
        out = model.generate(**prompt, max_new_tokens=30, do_sample=False)[0, prompt["input_ids"].shape[1]:].tolist()
        assert out[-1] == IM_END and len(out) < 30  # stopped by generation_config's eos, not the limit
        text = tok.decode(out, skip_special_tokens=True)
        assert text.replace("<think>", "").replace("</think>", "").strip() == reply


def test_a_bf16_merge_served_by_transformers_serve_answers_what_it_learned(memorised, tmp_path):
    """The hand-off users make: merge-lora --dtype bfloat16, `transformers serve` on the merged folder
    (a free loopback port, offline), the `openai` client asks each question; the trained replies
    come back. The server is stopped by its own process id."""
    import os
    import signal
    import subprocess
    import time
    import urllib.request

    from openai import OpenAI

    merged = tmp_path / "merged_bf16"
    run_cli("merge-lora", "--adapter", str(memorised / "run" / "final"), "--output_dir", str(merged),
            "--dtype", "bfloat16")
    port, log = free_port(), (tmp_path / "serve.log").open("w")
    server = subprocess.Popen([str(BIN / "transformers"), "serve", str(merged), "--host", "127.0.0.1", "--port", port],
                              stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
                time.sleep(0.5)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=60)
        for question, reply in REPLIES.items():
            answer = client.chat.completions.create(model=str(merged), max_tokens=30,
                                                    messages=[{"role": "user", "content": question}])
            text = answer.choices[0].message.content
            assert text.replace("<think>", "").replace("</think>", "").strip() == reply, (question, text)
    finally:
        os.kill(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def test_eval_generation_metrics_and_samples(memorised):
    run_cli("eval", "--model", str(memorised / "merged"), "--data_path", str(memorised / "mem.json"),
            "--num_samples", "4", "--max_new_tokens", "20")
    result = json.loads((memorised / "eval" / "eval.json").read_text())  # beside the model, never inside it
    assert result["generation"] == {"exact_match": 1.0, "token_f1": 1.0, "rouge_l": 1.0}
    samples = [json.loads(line) for line in (memorised / "eval" / "samples.jsonl").read_text().splitlines()]
    assert [s["completion"] for s in samples] == list(REPLIES.values())
    assert [s["reference"] for s in samples] == list(REPLIES.values())


def test_eval_gives_one_loss_for_adapter_checkpoint_and_merged(memorised):
    losses = {}
    for name, path in (("adapter", memorised / "run" / "final"), ("checkpoint", memorised / "run" / "checkpoint-60"),
                       ("merged", memorised / "merged")):
        run_cli("eval", "--model", str(path), "--data_path", str(memorised / "mem.json"),
                "--output_dir", str(memorised / f"eval_{name}"))
        losses[name] = json.loads((memorised / f"eval_{name}" / "eval.json").read_text())["loss"]
    assert losses["checkpoint"] == pytest.approx(losses["adapter"], rel=1e-5)
    assert losses["merged"] == pytest.approx(losses["adapter"], rel=1e-5, abs=1e-6)


def _base_plus_adapter_logits(adapter_dir, texts_tok):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter_dir)).eval()
    with torch.no_grad():
        return model(**texts_tok).logits


@pytest.mark.parametrize("case", ["untied", "tied_modules_to_save"])
def test_merge_parity(case, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from sftkit.models import TINY_CONFIG, bundled_tokenizer_dir

    args = []
    if case == "untied":
        torch.manual_seed(1)
        Qwen3ForCausalLM(Qwen3Config(**{**TINY_CONFIG, "tie_word_embeddings": False})).save_pretrained(tmp_path / "base")
        AutoTokenizer.from_pretrained(bundled_tokenizer_dir()).save_pretrained(tmp_path / "base")
        args = ["--model_name_or_path", str(tmp_path / "base")]
    else:  # trains the tied embedding and lm_head apart: the merged model must come out untied
        args = ["--modules_to_save", "embed_tokens", "--modules_to_save", "lm_head"]
    run_cli("train", "--data_path", "data/sample_alpaca.json", "--output_dir", str(tmp_path / "run"), "--use_lora",
            "--max_steps", "3", "--learning_rate", "0.01", "--warmup_ratio", "0", "--save_steps", "0",
            "--max_length", "512", *args)
    run_cli("merge-lora", "--adapter", str(tmp_path / "run" / "final"), "--output_dir", str(tmp_path / "merged"))
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    batch = tok(["<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n", "2 + 2 = 4"],
                return_tensors="pt", padding=True)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        got = merged(**batch).logits
    expected = _base_plus_adapter_logits(tmp_path / "run" / "final", batch)
    assert (got - expected).abs().max().item() < 1e-4
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert not torch.equal(merged.get_input_embeddings().weight, merged.get_output_embeddings().weight)


def test_merge_writes_shards_and_eval_shards_over_two_processes(memorised, tmp_path):
    from transformers import AutoModelForCausalLM

    run_cli("merge-lora", "--adapter", str(memorised / "run" / "final"), "--output_dir", str(tmp_path / "sharded"),
            "--max_shard_size", "10MB")
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) >= 2  # the 39 MB embedding is one tensor
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "sharded") is not None
    # the same eval under accelerate launch with 2 processes: the set is sharded, the sums gathered
    launch = ["--config_file", "accelerate_configs/multi_gpu.yaml", "--num_processes", "2", "--mixed_precision", "no",
              "--dynamo_backend", "no"]
    run_cli("eval", "--model", str(memorised / "merged"), "--data_path", str(memorised / "mem.json"),
            "--num_samples", "4", "--max_new_tokens", "20", "--output_dir", str(tmp_path / "two"),
            launch=launch, env={"ACCELERATE_USE_CPU": "true"})
    run_cli("eval", "--model", str(memorised / "merged"), "--data_path", str(memorised / "mem.json"),
            "--output_dir", str(tmp_path / "one"))
    two = json.loads((tmp_path / "two" / "eval.json").read_text())
    one = json.loads((tmp_path / "one" / "eval.json").read_text())
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5) and two["supervised_tokens"] == one["supervised_tokens"]
    samples = [json.loads(line) for line in (tmp_path / "two" / "samples.jsonl").read_text().splitlines()]
    assert [s["index"] for s in samples] == [0, 1, 2, 3] and two["generation"]["exact_match"] == 1.0


def test_merge_refuses_a_directory_without_an_adapter(tmp_path):
    proc = run_cli("merge-lora", "--adapter", str(tmp_path), "--output_dir", str(tmp_path / "out"), check=False)
    assert proc.returncode == 2 and "holds no adapter_config.json" in proc.stderr


def _swap_base(other_size, tmp_path) -> Path:
    """The adapter, its base now the 96-wide model at the same path (a base re-downloaded as another size)."""
    _, wide, adapter = other_size
    base = tmp_path / "base"
    shutil.copytree(wide, base)
    moved = shutil.copytree(adapter, tmp_path / "adapter")
    config = (moved / "adapter_config.json").read_text()
    (moved / "adapter_config.json").write_text(config.replace(str(other_size[0]), str(base)))
    return moved


def test_merge_and_eval_name_both_shapes_of_a_base_of_another_size(other_size, tmp_path):
    adapter = _swap_base(other_size, tmp_path)
    base = tmp_path / "base"
    expected = (f"error: {adapter} was trained on a base of another size: its model.layers.0.self_attn.q_proj."
                f"lora_A.weight is [4, 64], and the base {base} needs [4, 96] (model.layers.0.self_attn.q_proj.weight "
                "[64, 96]); pass the base it was trained on")
    for args in (("merge-lora", "--adapter", str(adapter), "--output_dir", str(tmp_path / "merged")),
                 ("eval", "--model", str(adapter), "--data_path", "data/sample_alpaca.json",
                  "--output_dir", str(tmp_path / "eval"))):
        proc = run_cli(*args, check=False)
        assert proc.returncode == 2 and one_error(proc) == expected, args
    assert not (tmp_path / "merged").exists() and not (tmp_path / "eval").exists()
