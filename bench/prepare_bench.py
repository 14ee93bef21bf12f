"""Benchmark sftkit's prepare-data against TRL's SFTTrainer dataset preparation. Offline, CPU only.

Both tools get the same synthetic JSONL files (OpenAI `messages` rows, bench/synthetic.py) and must
produce input_ids plus an assistant-only loss mask. Four distributions, each timed in the same run:
  multi-turn  1-4 turns, a system message in ~30%, reasoning_content in ~35% of replies (max_length 4096)
  alpaca      Alpaca-style: 56% single turn, no reasoning, replies of 10-800 tokens (log-uniform; 4096)
  messages    issue 24's shape: 1-4 turns with P .55/.25/.12/.08, a system message in 10%, user ~60 and
              assistant ~180 tokens, lognormal (max_length 1024, as the issue measured)
  long        long conversations: 1-4 turns, a system message in 10%, replies ~200 tokens (at most ~800),
              reasoning_content in 30% of replies: ~720 tokens a row (max_length 4096)
Timed:
  sftkit  `prepare(DataOptions(...), [file], fresh_dir, tok)`, end to end: read, validate, render, tokenize,
          mask, length filter, save_to_disk, lengths plot.
  TRL     `Dataset.from_json` + `SFTTrainer._prepare_dataset` (ChatML check, tokenize with the
          assistant mask, build labels, truncate, drop fully masked rows), timed inside
          `SFTTrainer(...)`; model building and the rest of the constructor are reported apart.
          HF datasets caching is off, so nothing is a cache hit.
Each tool is warmed up first on a few rows, so neither pays its first imports inside the clock.
The bare encode (the Rust `encode_batch` of each rendered conversation, nothing else) is timed too:
the floor both tools pay; sftkit's CPU seconds above it, a row, are its per-row overhead.
Besides wall time, CPU seconds (this process + reaped worker processes) are reported: on a shared
machine they are the steadier measure of work, while wall time shows what parallelism buys.

    .venv/bin/python -m bench.prepare_bench                 # all three, sftkit num_proc 1 and auto (0)
    .venv/bin/python -m bench.prepare_bench --data alpaca --n 2000   # one distribution, quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from collections import Counter
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path

from bench import models, synthetic
from bench.child import clock, offline

MAX_LENGTH = {"multi-turn": 4096, "alpaca": 4096, "messages": 1024, "long": 4096}
"""The distributions (bench/synthetic.py) and the max_length each is prepared at."""


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    return path


def bench_encode(data: Path, tok) -> dict:
    """The floor: each conversation rendered to one text (not timed), then only the Rust encode."""
    convs = [json.loads(line)["messages"] for line in data.open(encoding="utf-8")]
    texts = tok.apply_chat_template(convs, tokenize=False)
    backend = tok.backend_tokenizer
    backend.encode_batch(texts[:8], add_special_tokens=False)  # warm-up
    elapsed = clock()
    encs = backend.encode_batch(texts, add_special_tokens=False)
    secs, cpu = elapsed()
    return {"tool": "bare encode_batch (floor)", "seconds": secs, "cpu": cpu, "examples": len(texts),
            "tokens": sum(len(e.ids) for e in encs), "supervised": 0, "dropped": 0}


def bench_sftkit(data: Path, out: Path, tok, num_proc: int, max_length: int = 4096) -> dict:
    from sftkit.data.options import DataOptions
    from sftkit.data.prepare import prepare, processes_for

    cfg = DataOptions(max_length=max_length, num_proc=num_proc)
    procs = processes_for(num_proc, sum(1 for _ in data.open(encoding="utf-8")))
    elapsed = clock()
    man = prepare(cfg, [str(data)], fresh(out / f"sftkit_np{num_proc}"), tok)
    secs, cpu = elapsed()
    assert not man["cached"]
    name = f"auto: {procs}" if num_proc == 0 else num_proc
    return {"tool": f"sftkit prepare (num_proc={name})", "seconds": secs, "cpu": cpu,
            "examples": man["examples_kept"], "tokens": man["tokens"], "supervised": man["supervised_tokens"],
            "dropped": sum(man["dropped"].values())}


def bench_trl(data: Path, out: Path, tok, num_proc: int, max_length: int = 4096) -> tuple[dict, object]:
    import datasets
    from trl import SFTConfig, SFTTrainer

    datasets.disable_caching()
    datasets.disable_progress_bars()
    start = time.perf_counter()
    model = models.init(models.preset_config("tiny"))  # SFTTrainer wants one; only its data preparation is timed
    model_secs = time.perf_counter() - start
    args = SFTConfig(output_dir=str(fresh(out / "trl_out")), assistant_only_loss=True, max_length=max_length,
                     packing=False, dataset_num_proc=num_proc, report_to=[], bf16=False)

    class TimedSFTTrainer(SFTTrainer):
        prep = (0.0, 0.0)  # (wall, cpu) of the last _prepare_dataset

        def _prepare_dataset(self, *args, **kwargs):
            elapsed = clock()
            try:
                return super()._prepare_dataset(*args, **kwargs)
            finally:
                TimedSFTTrainer.prep = elapsed()

    def load(path: Path):
        return datasets.Dataset.from_json(str(path), cache_dir=str(fresh(out / "hf_cache")))

    warmup = load(synthetic.head(data, out / "warmup.jsonl"))
    TimedSFTTrainer(model=model, args=args, train_dataset=warmup, processing_class=tok)  # warm-up
    elapsed = clock()
    ds = load(data)
    load_secs, load_cpu = elapsed()
    t0 = time.perf_counter()
    trainer = TimedSFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    build_secs = time.perf_counter() - t0
    prep_secs, prep_cpu = TimedSFTTrainer.prep
    prepared = trainer.train_dataset
    supervised = sum(sum(t != -100 for t in lab) for lab in prepared["labels"])  # = sum(assistant_masks)
    template = "TRL qwen3_training.jinja" if trainer.chat_template else "tokenizer's own (has generation markers)"
    note = (f"template: {template}; timed: Dataset.from_json {load_secs:.2f}s + _prepare_dataset {prep_secs:.2f}s; "
            f"excluded: model build {model_secs:.2f}s, rest of SFTTrainer(...) {build_secs - prep_secs:.2f}s")
    row = {"tool": f"TRL 1.16 SFTTrainer (dataset_num_proc={num_proc})", "seconds": load_secs + prep_secs,
           "cpu": load_cpu + prep_cpu, "examples": len(prepared), "tokens": sum(map(len, prepared["input_ids"])),
           "supervised": supervised, "dropped": len(ds) - len(prepared), "note": note}
    return row, prepared


def compare(sftkit_dir: Path, trl_ds) -> str:
    """How far the two tools' outputs agree, example by example."""
    from sftkit.data.prepare import load_prepared

    ours = load_prepared(sftkit_dir)
    if len(ours) != len(trl_ds):
        return f"example counts differ ({len(ours)} vs {len(trl_ds)}); no per-example comparison"
    same_ids = same_both = 0
    extra = Counter()  # tokens TRL supervises and sftkit does not, in examples with identical ids
    for a, b in zip(ours, trl_ds):
        if a["input_ids"] != b["input_ids"]:
            continue
        same_ids += 1
        same_both += a["labels"] == b["labels"]
        extra.update(f"{ids[i - 1]}->{ids[i]}" for ids in [a["input_ids"]]
                     for i, (x, y) in enumerate(zip(a["labels"], b["labels"])) if x == -100 and y != -100)
    return (f"identical input_ids in {same_ids}/{len(ours)} examples, of which {same_both} have identical labels; "
            f"tokens only TRL supervises there (prev_id->id: count): {dict(extra.most_common(3))}")


def versions() -> str:
    found = [f"{p} {metadata.version(p)}" if find_spec(p) else f"{p} (not installed)"
             for p in ("torch", "transformers", "datasets", "tokenizers", "trl")]
    return f"python {platform.python_version()}, " + ", ".join(found) + f"; {os.cpu_count()} CPU cores"


def bench_all(names: list[str], a, tok) -> list[dict]:
    """Time sftkit on every distribution, then TRL on every one: TRL's run leaves the process
    changed (sftkit measured 16 CPU-s on the alpaca set alone, 22 right after TRL's multi-turn
    run), so neither tool runs after the other's; prints the comparison notes."""
    data = {}
    for name in names:
        data[name] = a.out / f"{name}_n{a.n}_seed{a.seed}.jsonl"
        synthetic.write(data[name], synthetic.rows(synthetic.CONVERSATIONS[name], a.n, a.seed))
        print(f"data {name}: {data[name]} ({data[name].stat().st_size / 1e6:.1f} MB, {a.n} conversations)")
    bench_sftkit(synthetic.head(data[names[0]], a.out / "warmup.jsonl"), a.out, tok, 1)  # warm-up: imports (datasets, matplotlib)
    procs = list(dict.fromkeys([1, a.num_proc]))
    ours = {name: [bench_sftkit(data[name], a.out / name, tok, n, MAX_LENGTH[name]) for n in procs] for name in names}
    for name in names:
        floor = bench_encode(data[name], tok)
        one = ours[name][0]
        print(f"per-row overhead over the bare encode on {name}: sftkit num_proc=1 {1e3 * one['cpu'] / one['examples']:.2f} "
              f"CPU-ms a row, encode_batch alone {1e3 * floor['cpu'] / floor['examples']:.2f} ({floor['seconds']:.1f} s "
              f"wall, {floor['tokens']:,} tokens): {1e3 * (one['cpu'] - floor['cpu']) / one['examples']:.2f} CPU-ms a row more")
        ours[name].append(floor)
    if not find_spec("trl"):
        print("trl is not installed: TRL comparison skipped (pip install trl==1.16.0)")
        return [dict(r, data=name) for name in names for r in ours[name]]
    rows = []
    for name in names:
        trl_row, trl_ds = bench_trl(data[name], a.out, tok, a.trl_num_proc, MAX_LENGTH[name])
        print(f"TRL on {name}: {trl_row['note']}")
        if trl_row["supervised"] == 0:
            print("WARNING: TRL's assistant mask is all zero: it would train on nothing")
        for r in ours[name][:-1]:  # not the floor
            wall = (r["examples"] / r["seconds"]) / (trl_row["examples"] / trl_row["seconds"])
            cpu = (r["examples"] / r["cpu"]) / (trl_row["examples"] / trl_row["cpu"])
            r["ratio"] = f"{wall:.2f}x / {cpu:.2f}x"
        print(f"supervised tokens sftkit/TRL on {name}: {ours[name][0]['supervised'] / max(trl_row['supervised'], 1):.3f}; "
              + compare(a.out / name / "sftkit_np1", trl_ds))
        rows += [dict(r, data=name) for r in [*ours[name], trl_row]]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=20000, help="synthetic conversations per distribution")
    ap.add_argument("--num_proc", type=int, default=0, help="sftkit processes, 0 = auto, the default "
                    "(1 is always run as well)")
    ap.add_argument("--trl_num_proc", type=int, default=1, help="TRL dataset_num_proc")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", choices=[*MAX_LENGTH, "all"], default="all", help="which distribution(s)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/prepare_bench"))
    a = ap.parse_args()
    offline()
    from sftkit.models import load_tokenizer

    a.out.mkdir(parents=True, exist_ok=True)
    print(versions())
    tok = load_tokenizer("tiny-qwen3")
    rows = bench_all(list(MAX_LENGTH) if a.data == "all" else [a.data], a, tok)
    print("\n| data | tool | examples/s | tokens/s | seconds | CPU seconds | examples/CPU-s | examples | tokens "
          "| supervised tokens | dropped | / TRL (examples/s, per CPU-s) |\n"
          "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['data']} | {r['tool']} | {r['examples'] / r['seconds']:,.0f} | {r['tokens'] / r['seconds']:,.0f} | "
              f"{r['seconds']:.1f} | {r['cpu']:.1f} | {r['examples'] / r['cpu']:,.0f} | {r['examples']:,} | "
              f"{r['tokens']:,} | {r['supervised']:,} | {r['dropped']} | {r.get('ratio', '')} |")


if __name__ == "__main__":
    main()
