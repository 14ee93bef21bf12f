"""Benchmark sftkit's prepare-data against TRL's SFTTrainer dataset preparation. Offline, CPU only.

Both tools get the same synthetic JSONL files (OpenAI `messages` rows) and must produce input_ids
plus an assistant-only loss mask. Three distributions, each timed in the same run:
  multi-turn  1-4 turns, a system message in ~30%, reasoning_content in ~35% of replies (max_length 4096)
  alpaca      Alpaca-style: 56% single turn, no reasoning, replies of 10-800 tokens (log-uniform; 4096)
  messages    issue 24's shape: 1-4 turns with P .55/.25/.12/.08, a system message in 10%, user ~60 and
              assistant ~180 tokens, lognormal (max_length 1024, as the issue measured)
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

    .venv/bin/python bench/prepare_bench.py                 # all three, sftkit num_proc 1 and auto (0)
    .venv/bin/python bench/prepare_bench.py --data alpaca --n 2000   # one distribution, quick
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse
import json
import math
import platform
import random
import resource
import shutil
import time
from collections import Counter
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path

_WORD_TEXT = ("the a of to and in is it that for on with as was at by this be from or have an they which you one data "
         "model train loss token batch layer weight gradient learning rate step value function return python code "
         "error file system memory process thread network server client request response query answer question "
         "explain example simple because however therefore result number list table string river mountain city "
         "music history science language people world time year good small large new old first last long great "
         "little right big high different important")
WORDS = _WORD_TEXT.split(" ")
CJK = ("你好", "世界", "模型", "训练", "数据", "学习", "问题", "答案", "こんにちは", "ありがとう", "東京", "日本語",
       "안녕하세요", "감사합니다", "机器学习", "深度神经网络")
EMOJI = ("🙂", "🚀", "🔥", "✅", "🤖", "📈", "🎉", "👍🏽", "❤️", "🇯🇵")


def text(rng: random.Random, lo: int, hi: int) -> str:
    """lo..hi words: mostly English, ~8% CJK, ~4% emoji, with sentence punctuation and paragraphs."""
    out, start = [], True
    for _ in range(rng.randint(lo, hi)):
        r = rng.random()
        w = rng.choice(CJK) if r < 0.08 else rng.choice(EMOJI) if r < 0.12 else rng.choice(WORDS)
        out.append(w.capitalize() if start else w)
        start = rng.random() < 0.1
        if start:
            out[-1] += rng.choice((".", ".", "?", "!", ".\n\n"))
    return " ".join(out).replace("\n ", "\n")


def conversation(rng: random.Random) -> dict:
    """1-4 user/assistant turns, a system message in ~30%, reasoning_content in ~35% of replies."""
    msgs = [{"role": "system", "content": text(rng, 5, 40)}] if rng.random() < 0.3 else []
    for _ in range(rng.randint(1, 4)):
        msgs.append({"role": "user", "content": text(rng, 3, 60)})
        reply = {"role": "assistant", "content": text(rng, 5, 200)}
        if rng.random() < 0.35:
            reply["reasoning_content"] = text(rng, 10, 120)
        msgs.append(reply)
    return {"messages": msgs}


def alpaca_conversation(rng: random.Random) -> dict:
    """Alpaca-style: 56% one turn, else 2-3; a system message in ~10%; no reasoning. A reply is
    8-600 words, log-uniform: 8-818 tokens, median 92, mean 180 (measured on the first 3,000 rows)."""
    msgs = [{"role": "system", "content": text(rng, 5, 30)}] if rng.random() < 0.1 else []
    for _ in range(1 if rng.random() < 0.56 else rng.randint(2, 3)):
        msgs.append({"role": "user", "content": text(rng, 3, 60)})
        words = round(math.exp(rng.uniform(math.log(8), math.log(600))))
        msgs.append({"role": "assistant", "content": text(rng, words, words)})
    return {"messages": msgs}


def words(rng: random.Random, mean: float, sigma: float = 0.6) -> int:
    """A lognormal word count with this mean (at least 1)."""
    return max(1, round(rng.lognormvariate(math.log(mean) - sigma * sigma / 2, sigma)))


def messages_conversation(rng: random.Random) -> dict:
    """Issue 24's hidden set, regenerated with our own seed: 1-4 turns with P .55/.25/.12/.08, a system
    message in 10%, user ~60 and assistant ~180 tokens, lognormal (sigma 0.6). `text` gives ~1.36
    tokens a word (the alpaca set's 8-600 words -> 8-818 tokens), so 44 and 132 words on average."""
    msgs = [{"role": "system", "content": text(rng, 5, 30)}] if rng.random() < 0.1 else []
    for _ in range(rng.choices((1, 2, 3, 4), weights=(0.55, 0.25, 0.12, 0.08))[0]):
        n = words(rng, 44)
        msgs.append({"role": "user", "content": text(rng, n, n)})
        n = words(rng, 132)
        msgs.append({"role": "assistant", "content": text(rng, n, n)})
    return {"messages": msgs}


DISTRIBUTIONS = {"multi-turn": conversation, "alpaca": alpaca_conversation, "messages": messages_conversation}
MAX_LENGTH = {"multi-turn": 4096, "alpaca": 4096, "messages": 1024}


def write_data(n: int, seed: int, path: Path, make=conversation) -> None:
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for _ in range(n):
            f.write(json.dumps(make(rng), ensure_ascii=False) + "\n")


def sample(data: Path, out: Path, rows: int = 8) -> Path:
    """The first rows of the data file, for warm-up runs."""
    path = out / "warmup.jsonl"
    with data.open(encoding="utf-8") as f:
        path.write_text("".join(next(f) for _ in range(rows)), encoding="utf-8")
    return path


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    return path


def _now() -> tuple[float, float]:
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.perf_counter(), time.process_time() + kids.ru_utime + kids.ru_stime


def clock():
    """Start a clock; calling the result gives (wall, cpu) seconds since. CPU counts reaped workers too."""
    start = _now()
    return lambda: tuple(b - a for a, b in zip(start, _now()))


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
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM
    from trl import SFTConfig, SFTTrainer

    datasets.disable_caching()
    datasets.disable_progress_bars()
    start = time.perf_counter()
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=151936, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=128, tie_word_embeddings=True))
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

    TimedSFTTrainer(model=model, args=args, train_dataset=load(sample(data, out)), processing_class=tok)  # warm-up
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
        write_data(a.n, a.seed, data[name], DISTRIBUTIONS[name])
        print(f"data {name}: {data[name]} ({data[name].stat().st_size / 1e6:.1f} MB, {a.n} conversations)")
    bench_sftkit(sample(data[names[0]], a.out), a.out, tok, 1)  # warm-up: imports (datasets, matplotlib)
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
    ap.add_argument("--data", choices=[*DISTRIBUTIONS, "all"], default="all", help="which distribution(s)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/prepare_bench"))
    a = ap.parse_args()

    from sftkit.models import load_tokenizer

    a.out.mkdir(parents=True, exist_ok=True)
    print(versions())
    tok = load_tokenizer("tiny-qwen3")
    rows = bench_all(list(DISTRIBUTIONS) if a.data == "all" else [a.data], a, tok)
    print("\n| data | tool | examples/s | tokens/s | seconds | CPU seconds | examples/CPU-s | examples | tokens "
          "| supervised tokens | dropped | / TRL (examples/s, per CPU-s) |\n"
          "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['data']} | {r['tool']} | {r['examples'] / r['seconds']:,.0f} | {r['tokens'] / r['seconds']:,.0f} | "
              f"{r['seconds']:.1f} | {r['cpu']:.1f} | {r['examples'] / r['cpu']:,.0f} | {r['examples']:,} | "
              f"{r['tokens']:,} | {r['supervised']:,} | {r['dropped']} | {r.get('ratio', '')} |")


if __name__ == "__main__":
    main()
