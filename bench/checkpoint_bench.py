"""Checkpoint bench: what a checkpoint costs on disk and in seconds, LoRA and full, for two sftkit
trees (before and after a change), and the peak RSS of one training step.

Each (tree, mode) runs in a fresh child process started in that tree, with PYTHONPATH naming it
(bench/child.py `checkout_env`), through the tree's own functions: `sftkit.train.setup`
(accelerator, data, model, optimizer), one `train_step` (so the optimizer holds its moments), then
`checkpoint.save_checkpoint` (timed), `checkpoint.damage` (the checksum verification a resume runs
first, timed) and `checkpoint.load_checkpoint` (timed). Loading the base model is not timed: every
resume loads it, before and after. Files are read back from the page cache (nothing drops it), so
the seconds are what the hashing and the (de)serialisation cost, not a cold disk.

Modes: lora (fp32), lora_bf16 (--bf16: after the change the frozen base is bf16), full (fp32).
The model: a random-init Qwen3 from Qwen's published config (--model: a preset of bench/models.py),
1 micro-batch of 64 tokens. `--hashes` measures the candidate checksum hashes on 256 MB in memory.
`--account` prints the checkpoint sizes of a LoRA run computed from a config (no run): the 8B figures.

    git worktree add /tmp/sftkit-before 0c02b29
    .venv/bin/python -m bench.checkpoint_bench --model qwen3-0.6b --before /tmp/sftkit-before --after .
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from bench import models
from bench.child import REPO, checkout_env, offline, python, report, run

MODES = ("lora", "lora_bf16", "full")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def child(a) -> dict:
    """One tree, one mode: setup, a step, save, verify, load; the seconds, bytes and peak RSS."""
    from sftkit.checkpoint import damage, load_checkpoint, save_checkpoint
    from sftkit.config import SFTConfig
    from sftkit.metrics import peak_rss_mb
    from sftkit.train import setup, step_batches, train_step

    out = Path(a.work) / f"run-{a.tag}-{a.child}"
    shutil.rmtree(out, ignore_errors=True)
    run = setup(SFTConfig(model_name_or_path=a.model_dir, data_path=[a.data], output_dir=str(out), max_steps=2,
                          save_steps=0, max_length=64, per_device_train_batch_size=1, use_lora=a.child != "full",
                          bf16=a.child == "lora_bf16", report_to="none", dataloader_num_workers=0))
    frozen = {str(p.dtype) for p in run.model.parameters() if not p.requires_grad}
    train_step(run, step_batches(run)[0])
    run.state.step = 1  # as fit counts it: the checkpoint is checkpoint-1
    rss_step = peak_rss_mb()
    t0 = time.perf_counter()
    path = save_checkpoint(run.accelerator, run.model, run.tokenizer, run.cfg, run.out, run.state, run.scheduler)
    t1 = time.perf_counter()
    problem = damage(path)
    t2 = time.perf_counter()
    load_checkpoint(run.accelerator, path, run.scheduler)
    t3 = time.perf_counter()
    record = {"tree": a.tag, "mode": a.child, "frozen_dtypes": sorted(frozen), "peak_rss_mb_step": round(rss_step),
              "save_s": round(t1 - t0, 2), "verify_s": round(t2 - t1, 2), "load_s": round(t3 - t2, 2),
              "resume_s": round(t3 - t1, 2), "checkpoint_mb": round(du(path) / 1e6, 1),
              "state_mb": round(du(path / "state") / 1e6, 1), "damage": problem}
    shutil.rmtree(out, ignore_errors=True)
    return record


def run_child(a, tag: str, tree: str, mode: str) -> dict:
    """`child` in a fresh process that imports `tree`'s sftkit."""
    done = run(python("bench.checkpoint_bench", "--child", mode, "--tag", tag, "--model_dir", a.model_dir, "--data",
                      a.data, "--work", a.work), cwd=tree, env=checkout_env(tree))
    record = done.result()
    if done.code or record is None:
        return {"tree": tag, "mode": mode, "error": [done.last_line()]}
    return record


def hashes(size: int = 256 << 20) -> dict:
    """GB/s of each candidate on `size` random bytes in memory (the best of 3)."""
    import hashlib

    import xxhash

    data = os.urandom(size)
    candidates = {"sha256": lambda: hashlib.sha256(data).digest(), "xxh3_128": lambda: xxhash.xxh3_128(data).digest()}
    try:
        import blake3

        candidates["blake3 (1 thread)"] = lambda: blake3.blake3(data).digest()
        candidates["blake3 (all threads)"] = lambda: blake3.blake3(data, max_threads=blake3.blake3.AUTO).digest()
    except ImportError:
        pass
    speeds = {}
    for name, fn in candidates.items():
        best = min(_timed(fn) for _ in range(3))
        speeds[name] = round(size / best / 1e9, 2)
    return speeds


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def account(config_file: Path, r: int = 16) -> dict:
    """Checkpoint sizes of a LoRA run (all 7 projections, rank r) computed from a config: GB."""
    c = json.loads(config_file.read_text())
    h, inter, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    q, kv = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    shapes = [(h, q), (h, kv), (h, kv), (q, h), (h, inter), (h, inter), (inter, h)]  # (in, out) per layer
    lora = layers * sum(r * (i + o) for i, o in shapes)
    per_layer = sum(i * o for i, o in shapes) + 2 * h + 2 * c["head_dim"]  # projections, 2 norms, q/k norms
    embed = c["vocab_size"] * h
    base = layers * per_layer + embed * (1 if c.get("tie_word_embeddings") else 2) + h
    gb = 1e9
    adapter, moments = 4 * lora / gb, 8 * lora / gb  # fp32 adapter; AdamW's two fp32 moments
    return {"base_params": base, "lora_params": lora,
            "before_gb": round(4 * base / gb + adapter + moments + adapter, 3),  # state/ held the fp32 base too
            "after_gb": round(adapter + moments + adapter, 3),                   # state/ + model/: the adapter twice
            "base_fp32_gb": round(4 * base / gb, 2), "base_bf16_gb": round(2 * base / gb, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen3-0.6b")
    p.add_argument("--before", help="an sftkit tree to compare with (e.g. git archive of main)")
    p.add_argument("--after", default=str(REPO))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--hashes", action="store_true")
    p.add_argument("--account", type=Path, help="a config.json: the LoRA checkpoint sizes it gives, computed")
    p.add_argument("--out", type=Path)
    p.add_argument("--child"), p.add_argument("--tag"), p.add_argument("--model_dir"), p.add_argument("--data")
    p.add_argument("--work", default=os.environ.get("SFTKIT_CACHE", "/tmp") + "/checkpoint_bench")
    a = p.parse_args()
    offline()
    if a.child:
        report(child(a))
        return
    if a.hashes or a.account:
        print(json.dumps({"hashes_gb_s": hashes()} if a.hashes else account(a.account), indent=2))
        return
    a.work = str(Path(a.work).resolve())  # the children start in their tree
    a.model_dir = str(models.build_preset(a.model, Path(a.work) / "models").resolve())
    a.data = str(REPO / "data" / "sample_alpaca.json")
    load = os.getloadavg()[0]
    rows = [run_child(a, tag, tree, mode) for tag, tree in (("before", a.before), ("after", a.after)) if tree
            for mode in a.modes.split(",")]
    for row in rows:
        print(json.dumps(row))
    print(f"1-minute load average at the start: {load:.2f}")
    if a.out:
        a.out.write_text(json.dumps({"model": a.model, "load_avg_start": load, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
