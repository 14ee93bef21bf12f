"""Peak resident memory per rank with sequence parallelism 1 (one process) and 2 (two processes
under `accelerate launch`, gloo) at a short and a long max_length, on this CPU (issue 22).

The model: a random-init Qwen3 of hidden 256, 4 layers, 8 heads (4 kv), the real 151,936-word
vocabulary and tokenizer, LoRA, packing, varlen attention, no gradient checkpointing. The data:
conversations of one long user turn (random common words) and a short reply, so that a packed
row is one example of about max_length tokens and the lm_head (supervised tokens only) stays cheap.
Each run trains 2 steps of 1 row; `peak_rss_mb_per_rank` is read from its metrics.jsonl end
record (VmHWM of each rank, the whole run: imports, data, model, steps).

    .venv/bin/python bench/sequence_parallel_memory.py --lengths 1024 8192 --out /tmp/spmem
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
WORDS = ("time person year way day thing man world life hand part child eye woman place work week case point "
         "government company number group problem fact water money story month lot right study book job word "
         "business issue side kind head house service friend father power hour game line end member law car "
         "city community name president team minute idea kid body information back parent face others level").split()


def build_model(out: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from sftkit.models import bundled_tokenizer_dir

    if (out / "config.json").is_file():
        return out
    torch.manual_seed(0)
    Qwen3ForCausalLM(Qwen3Config(vocab_size=151936, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                                 num_attention_heads=8, num_key_value_heads=4, head_dim=32,
                                 max_position_embeddings=65536, tie_word_embeddings=True)).save_pretrained(out)
    AutoTokenizer.from_pretrained(bundled_tokenizer_dir()).save_pretrained(out)
    return out


def build_data(out: Path, tokens: int, rows: int = 4) -> Path:
    """`rows` conversations of about `tokens` tokens (about 0.9 of max_length: 1.2 tokens a word)."""
    path = out / f"long_{tokens}.jsonl"
    rng = random.Random(tokens)
    with path.open("w") as f:
        for _ in range(rows):
            user = " ".join(rng.choice(WORDS) for _ in range(int(tokens * 0.9 / 1.2)))
            f.write(json.dumps({"messages": [{"role": "user", "content": user},
                                             {"role": "assistant", "content": "A short reply."}]}) + "\n")
    return path


def run(model: Path, data: Path, length: int, size: int, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    args = ["train", "--model_name_or_path", str(model), "--data_path", str(data), "--use_lora", "--packing",
            "--max_length", str(length), "--per_device_train_batch_size", "1", "--max_steps", "2",
            "--save_steps", "0", "--logging_steps", "1", "--warmup_ratio", "0", "--output_dir", str(out)]
    if size == 1:
        cmd, env = [str(BIN / "sftkit"), *args, "--attn_implementation", "varlen"], {}
    else:
        cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(REPO / "accelerate_configs/multi_gpu.yaml"),
               "--num_processes", str(size), "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "-m", "sftkit", *args, "--sequence_parallel_size", str(size)]
        env = {"ACCELERATE_USE_CPU": "true"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    return {"max_length": length, "sequence_parallel": size, "peak_rss_mb_per_rank": records[-1]["peak_rss_mb_per_rank"],
            "tokens_per_step": steps[0]["tokens"], "losses": [round(r["loss"], 5) for r in steps],
            "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 8192])
    ap.add_argument("--out", type=Path, default=Path("/tmp/spmem"))
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("SFTKIT_CACHE", str(a.out / "cache"))
    model = build_model(a.out / "model")
    print("| max_length | sequence parallel | peak RSS per rank, MB | tokens in step 1 | losses | seconds |")
    print("|---:|---:|---|---:|---|---:|")
    for length in a.lengths:
        data = build_data(a.out, length)
        for size in (1, 2):
            r = run(model, data, length, size, a.out / f"run_{length}_{size}")
            print(f"| {length} | {size} | {', '.join(f'{x:,.0f}' for x in r['peak_rss_mb_per_rank'])} | "
                  f"{r['tokens_per_step']:,} | {r['losses']} | {r['seconds']} |", flush=True)


if __name__ == "__main__":
    main()
