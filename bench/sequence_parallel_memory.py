"""Peak resident memory per rank with sequence parallelism 1 (one process) and 2 (two processes
under `accelerate launch`, gloo) at a short and a long max_length, on this CPU (issue 22).

The model: a random-init Qwen3 of hidden 256, 4 layers, 8 heads (4 kv), the real 151,936-word
vocabulary and tokenizer, LoRA, packing, varlen attention, no gradient checkpointing. The data:
conversations of one long user turn (random common nouns, bench/synthetic.py `long_prompt`) and a
short reply, so that a packed
row is one example of about max_length tokens and the lm_head (supervised tokens only) stays cheap.
Each run trains 2 steps of 1 row; `peak_rss_mb_per_rank` is read from its metrics.jsonl end
record (VmHWM of each rank, the whole run: imports, data, model, steps).

    .venv/bin/python -m bench.sequence_parallel_memory --lengths 1024 8192 --out /tmp/spmem
"""

from __future__ import annotations

import argparse
import os
import shutil
from functools import partial
from pathlib import Path

from bench import models, synthetic
from bench.child import BIN, REPO, offline_env, records, run

MODEL = {"model_type": "qwen3", "vocab_size": 151936, "hidden_size": 256, "intermediate_size": 768,
         "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 32,
         "max_position_embeddings": 65536, "tie_word_embeddings": True}


def train(model: Path, data: Path, length: int, size: int, out: Path) -> dict:
    """2 steps of one packed row at `length`, on `size` processes; each rank's peak RSS, the losses."""
    shutil.rmtree(out, ignore_errors=True)
    args = ["train", "--model_name_or_path", str(model), "--data_path", str(data), "--use_lora", "--packing",
            "--max_length", str(length), "--per_device_train_batch_size", "1", "--max_steps", "2",
            "--save_steps", "0", "--logging_steps", "1", "--warmup_ratio", "0", "--output_dir", str(out)]
    if size == 1:
        cmd, env = [str(BIN / "sftkit"), *args, "--attn_implementation", "varlen"], offline_env()
    else:
        cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(REPO / "accelerate_configs/multi_gpu.yaml"),
               "--num_processes", str(size), "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "-m", "sftkit", *args, "--sequence_parallel_size", str(size)]
        env = offline_env(ACCELERATE_USE_CPU="true")
    done = run(cmd, env=env).check(" ".join(cmd))
    *lines, end = records(out)
    steps = [r for r in lines if "loss" in r]
    return {"max_length": length, "sequence_parallel": size, "peak_rss_mb_per_rank": end["peak_rss_mb_per_rank"],
            "tokens_per_step": steps[0]["tokens"], "losses": [round(r["loss"], 5) for r in steps],
            "seconds": round(done.wall_s, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 8192])
    ap.add_argument("--out", type=Path, default=Path("/tmp/spmem"))
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("SFTKIT_CACHE", str(a.out / "cache"))
    model = models.build(models.config(MODEL), a.out / "models", "qwen3-h256")
    print("| max_length | sequence parallel | peak RSS per rank, MB | tokens in step 1 | losses | seconds |")
    print("|---:|---:|---|---:|---|---:|")
    for length in a.lengths:
        # 4 rows of about 0.9 x max_length tokens: a packed row holds one
        data = synthetic.write(a.out / f"long_{length}.jsonl",
                               synthetic.rows(partial(synthetic.long_prompt, tokens=length), 4, seed=length))
        for size in (1, 2):
            r = train(model, data, length, size, a.out / f"run_{length}_{size}")
            print(f"| {length} | {size} | {', '.join(f'{x:,.0f}' for x in r['peak_rss_mb_per_rank'])} | "
                  f"{r['tokens_per_step']:,} | {r['losses']} | {r['seconds']} |", flush=True)


if __name__ == "__main__":
    main()
