"""Peak resident memory per supervised token of one packed LoRA step, for every family member,
and the fused head's chunk size at Qwen3.5's vocabulary, on this CPU.

Each model is tests/family.py's tiny random-init model of the real class (hidden 64) with its
generation's real vocabulary (151,936 words; 248,320 for Qwen3.5 and Qwen3.5-MoE), so that the
vocabulary projection and the loss are what grows with the tokens. Each run is one `sftkit train`
process (LoRA, packing, 1 step) over rows of a short question and a long reply, at two sizes of
step; memory per supervised token is the slope between them, from the end record's peak RSS
(VmHWM: imports, model and the step). `--code DIR` runs another checkout's sftkit (a worktree of an
older commit) with this .venv, for a before/after table.

    .venv/bin/python -m bench.loss_memory --out /tmp/lossmem
    git worktree add /tmp/before a7ae4dd && .venv/bin/python -m bench.loss_memory --code /tmp/before --out /tmp/lossmem_before
    .venv/bin/python -m bench.loss_memory --chunks 128 256 512 1024 --out /tmp/lossmem   # qwen3_5 only
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from bench import models, synthetic
from bench.child import REPO, checkout_env, python, records, run

KINDS = ("qwen3", "qwen3_moe", "qwen3_next", "qwen3_5", "qwen3_5_moe")
VOCAB = {"qwen3_5": 248_320, "qwen3_5_moe": 248_320}  # the others: Qwen3's 151,936 (tests/family.py)


def build_model(kind: str, root: Path) -> Path:
    return models.family(kind, root, {"vocab_size": VOCAB[kind]} if kind in VOCAB else None)


def step(model: Path, data: Path, rows: int, out: Path, code: Path | None, extra: list[str]) -> dict:
    """One packed LoRA step of `rows` rows; its peak RSS, supervised tokens and seconds."""
    cmd = python("sftkit", "train", "--model_name_or_path", str(model), "--data_path", str(data), "--use_lora",
                 "--packing", "--max_length", "1024", "--per_device_train_batch_size", str(rows), "--max_steps", "1",
                 "--save_steps", "0", "--logging_steps", "1", "--warmup_ratio", "0", "--dataloader_num_workers", "0",
                 "--output_dir", str(out), *extra)
    shutil.rmtree(out, ignore_errors=True)
    done = run(cmd, cwd=code or REPO, env=checkout_env(code)).check(" ".join(cmd))  # -m: the cwd's sftkit first
    start, *_, end = lines = records(out)
    trained = next(r for r in lines if "loss" in r)
    return {"peak_rss_mb": end["peak_rss_mb"], "supervised": end["supervised_tokens"],
            "fused_loss": start.get("fused_loss"), "chunk": start.get("loss_chunk_rows"),
            "step_s": round(trained["tokens"] / trained["tokens_per_s"], 2), "seconds": round(done.wall_s, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/lossmem"))
    ap.add_argument("--code", type=Path, help="a checkout whose sftkit runs (default: this one)")
    ap.add_argument("--kinds", nargs="+", default=list(KINDS))
    ap.add_argument("--rows", type=int, nargs=2, default=[1, 3], help="packed rows of the small and the large step")
    ap.add_argument("--chunks", type=int, nargs="+", help="instead: qwen3_5's large step at these loss_chunk_size")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("SFTKIT_CACHE", str(a.out / "cache"))
    data = synthetic.write(a.out / "long_replies.jsonl", synthetic.rows(synthetic.long_reply, 8))
    if a.chunks:
        model = build_model("qwen3_5", a.out / "models")
        print("| loss_chunk_size | chunk's fp32 logits, MB | peak RSS, MB | supervised tokens | step s |")
        print("|---:|---:|---:|---:|---:|")
        for chunk in a.chunks:
            r = step(model, data, a.rows[1], a.out / f"chunk_{chunk}", a.code, ["--loss_chunk_size", str(chunk)])
            print(f"| {chunk} | {chunk * VOCAB['qwen3_5'] * 4 / 2**20:,.0f} | {r['peak_rss_mb']:,.0f} | "
                  f"{r['supervised']:,} | {r['step_s']} |", flush=True)
        return
    print("| model_type | vocabulary | fused loss | chunk rows | peak RSS small / large step, MB | "
          "supervised tokens | MB per supervised token |")
    print("|---|---:|---|---:|---|---|---:|")
    for kind in a.kinds:
        model = build_model(kind, a.out / "models")
        small, large = (step(model, data, n, a.out / f"{kind}_{n}", a.code, []) for n in a.rows)
        slope = (large["peak_rss_mb"] - small["peak_rss_mb"]) / (large["supervised"] - small["supervised"])
        print(f"| {kind} | {VOCAB.get(kind, 151_936):,} | {large['fused_loss']} | {large['chunk'] or '-'} | "
              f"{small['peak_rss_mb']:,.0f} / {large['peak_rss_mb']:,.0f} | {small['supervised']:,} / "
              f"{large['supervised']:,} | {slope:.3f} |", flush=True)


if __name__ == "__main__":
    main()
