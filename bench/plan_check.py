"""The memory model against measurement: real `sftkit train` runs on this CPU, each in its own
process, and for each the peak the model predicted (metrics.jsonl's start line, memory_forecast)
beside the peak resident memory the process reached (its end line, peak_rss_mb: Linux VmHWM).

    python -m bench.plan_check [--only NAME ...] [--out DIR]

Prints one table (predicted, measured, ratio, the moment the model puts the peak at, the parts)
and writes DIR/plan_check.json. The runs span tiny to 200M parameters, LoRA and full, checkpointing
on and off, packed and padded, QLoRA (where bitsandbytes is installed), 2-process DDP and FSDP2, a
Qwen3.5 and a MoE shape.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from bench.child import REPO, offline_env, records, run
from bench.models import build, config, family

BIN = Path(os.environ.get("SFTKIT_BIN", REPO / ".venv" / "bin"))
TWO = ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]

# model name -> how to build it (a qwen3 config of these values, or a tiny family model resized)
QWEN3 = {"model_type": "qwen3", "vocab_size": 151936, "max_position_embeddings": 4096, "tie_word_embeddings": True,
         "rms_norm_eps": 1e-6, "bos_token_id": 151643, "eos_token_id": 151645, "pad_token_id": 151643}
MODELS = {
    "q3-h256": {**QWEN3, "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
                "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64},
    "q3-h768": {**QWEN3, "hidden_size": 768, "intermediate_size": 2304, "num_hidden_layers": 12,
                "num_attention_heads": 12, "num_key_value_heads": 4, "head_dim": 64},
    "q3.5-h256": ("qwen3_5", {"hidden_size": 256, "intermediate_size": 768, "head_dim": 64,
                              "linear_key_head_dim": 64, "linear_value_head_dim": 64}),
    "moe-h256": ("qwen3_moe", {"hidden_size": 256, "intermediate_size": 768, "head_dim": 64, "num_experts": 8,
                               "moe_intermediate_size": 256}),
}
COMMON = ["--max_steps", "3", "--logging_steps", "1", "--save_steps", "0", "--dataloader_num_workers", "0",
          "--max_length", "1024", "--lr_scheduler_type", "constant", "--warmup_ratio", "0"]
LORA = ["--use_lora", "--learning_rate", "1e-3"]
# name -> (model, flags, launcher: None, "ddp" or "fsdp2")
RUNS = {
    "tiny-full": ("tiny-qwen3", [], None),
    "tiny-lora": ("tiny-qwen3", LORA, None),
    "h256-qlora-ckpt": ("q3-h256", [*LORA, "--load_in_4bit", "--gradient_checkpointing"], None),
    "h256-full": ("q3-h256", [], None),
    "h256-full-packed": ("q3-h256", ["--packing", "--per_device_train_batch_size", "2"], None),
    "h256-lora-ckpt": ("q3-h256", [*LORA, "--gradient_checkpointing"], None),
    "h768-full": ("q3-h768", ["--per_device_train_batch_size", "2"], None),
    "h768-full-ckpt": ("q3-h768", ["--per_device_train_batch_size", "8", "--gradient_checkpointing"], None),
    "h768-lora": ("q3-h768", [*LORA, "--per_device_train_batch_size", "8"], None),
    "h768-lora-packed-ckpt": ("q3-h768", [*LORA, "--packing", "--gradient_checkpointing",
                                          "--per_device_train_batch_size", "4"], None),
    "h768-lora-accum": ("q3-h768", [*LORA, "--per_device_train_batch_size", "2",
                                    "--gradient_accumulation_steps", "2"], None),
    "h768-qlora": ("q3-h768", [*LORA, "--load_in_4bit", "--per_device_train_batch_size", "2"], None),
    "q3.5-full": ("q3.5-h256", ["--per_device_train_batch_size", "2"], None),
    "moe-lora": ("moe-h256", [*LORA, "--lora_dropout", "0"], None),
    "h256-ddp-full": ("q3-h256", ["--per_device_train_batch_size", "2"], "ddp"),
    "h256-fsdp2-full": ("q3-h256", ["--per_device_train_batch_size", "2"], "fsdp2"),
}


def model_dir(name: str, root: Path) -> str:
    spec = MODELS.get(name)
    if spec is None:
        return name
    if isinstance(spec, tuple):
        return str(family(spec[0], root / name, spec[1]))
    return str(build(config(spec), root, name))


def data_file(root: Path) -> Path:
    """Conversations of a few hundred to about 1,000 tokens: long enough that activations count."""
    from bench.synthetic import multi_turn, rows, write

    path = root / "data.jsonl"
    if not path.exists():
        write(path, rows(multi_turn, 64, seed=0))
    return path


def one(name: str, root: Path) -> dict:
    model, flags, launcher = RUNS[name]
    out = root / "runs" / name
    args = ["train", "--model_name_or_path", model_dir(model, root), "--data_path", str(data_file(root)),
            "--output_dir", str(out), "--overwrite_output_dir", *COMMON, *flags]
    env = offline_env()
    if launcher is None:
        cmd = [str(BIN / "sftkit"), *args]
    else:
        config_file = {"ddp": "multi_gpu", "fsdp2": "fsdp2"}[launcher]
        cmd = [str(BIN / "accelerate"), "launch", "--config_file", f"accelerate_configs/{config_file}.yaml", *TWO,
               "-m", "sftkit", *args]
        env["ACCELERATE_USE_CPU"] = "true"
    done = run(cmd, env=env).check(name)
    lines = records(out)
    start = next(r for r in lines if r.get("event") == "start")
    end = next(r for r in lines if r.get("event") == "end")
    forecast = start["memory_forecast"]
    measured = max(end["peak_rss_mb_per_rank"])
    return {"run": name, "predicted_mb": forecast["peak_mb"], "measured_mb": measured,
            "ratio": round(forecast["peak_mb"] / measured, 3), "moment": forecast["moment"],
            "parts_mb": forecast["parts_mb"], "wall_s": round(done.wall_s, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="plan_check_"))
    root.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.only or RUNS:
        r = one(name, root)
        results.append(r)
        print(f"{r['run']:24} predicted {r['predicted_mb']:8.0f} MB  measured {r['measured_mb']:8.0f} MB  "
              f"ratio {r['ratio']:.3f}  at {r['moment']:5}  {r['parts_mb']}", flush=True)
    (root / "plan_check.json").write_text(json.dumps(results, indent=1))
    worst = max(abs(r["ratio"] - 1) for r in results)
    print(f"{len(results)} runs; the worst is {worst:.1%} off")


if __name__ == "__main__":
    main()
