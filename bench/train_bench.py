"""Training throughput: sftkit against TRL's SFTTrainer and a bare PyTorch loop, same model, same tokens.

Every system trains one epoch over the same examples (tokenized once, by sftkit's prepare-data)
from the same saved model, with the same micro-batch size, max_length, learning rate, seed and
precision:
  sftkit       sftkit's own loop, `setup` -> `fit` -> `finish` of sftkit.train (what `sftkit train`
               runs), timed by the `elapsed_s` of its metrics.jsonl.
  trl_default  TRL 1.16 `SFTTrainer` with its own defaults (gradient checkpointing on, no packing,
               random order), fed the same input_ids and labels (-100 outside assistant replies).
  trl_best     TRL with packing="bfd", which turns on padding-free batches, and no gradient
               checkpointing. Without flash-attention (a CPU) the padding-free row, the whole
               micro-batch end to end, gets a block-diagonal mask from transformers under sdpa:
               correct, but its attention is quadratic in rows x max_length.
  trl_liger    trl_best with `use_liger_kernel=True` (Liger's fused linear cross-entropy, RMSNorm,
               SwiGLU and RoPE Triton kernels): GPU only, needs the liger-kernel package.
  bare         `sftkit.train.train_step` called in a plain for loop over the same run's steps: the
               step itself (the exact loss, backward, clip, optimizer step, its one all-reduce)
               with no logging, no progress bar, no signal handling and no DataLoader worker (so
               sftkit, which collates ahead in one, can beat it on wall time).
sftkit and bare take sftkit's own attention default (auto: varlen on a GPU with packing, sdpa
otherwise); TRL gets sdpa, or flash_attention_2 where flash-attn is installed. A system whose
package is missing (trl, liger-kernel) is reported as "not installed" and not run.
Each system runs in a fresh child process (`--child SYSTEM`), so its peak memory (VmHWM of that
process on CPU, torch.cuda.max_memory_allocated on GPU) is its own. Only the training loop is
timed: imports, model loading and data preparation are not. The first `--warmup` steps (default 1)
are reported apart, and the throughput columns exclude them; `--max_steps` caps every system's
run. MFU counts sftkit's model FLOPs (sftkit.arch.flops) against the GPU's peak: sftkit's own from
its metrics.jsonl, the others' as sftkit's FLOPs per token times their tokens/s (the same data).
Supervised tokens are the positions whose next token is trained on; padding efficiency is real
tokens / (rows x width) slots of the micro-batches. The model: --model, a preset of bench/models.py
or a directory; the data: bench/synthetic.py's multi-turn conversations.
The 1-minute load average is printed: on a shared CPU, wall times vary by tens of percent.

    .venv/bin/python -m bench.train_bench --model tiny --out /tmp/train_bench.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from functools import partial
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path

from bench import models, synthetic
from bench.child import REPO, offline, python, report, run

SYSTEMS = ("sftkit", "trl_default", "trl_best", "trl_liger", "bare")
START_FIELDS = ("memory_forecast", "fused_loss", "loss_chunk_rows", "attention", "linear_attention", "mixed_precision", "trainable_params",
                "total_params")


def work_dir() -> Path:
    cache = os.environ.get("SFTKIT_CACHE")
    return Path(cache) / "train_bench" if cache else Path("/tmp/sftkit_train_bench")


# ---- set-up shared by all systems, done once by the parent ----------------------------------------
def prepare_data(a, model_dir: Path) -> tuple[Path, dict]:
    """Synthetic conversations (bench/synthetic.py's multi-turn), tokenized once by sftkit's prepare-data."""
    from sftkit.data.options import DataOptions
    from sftkit.data.prepare import prepare
    from sftkit.models import load_tokenizer

    raw = work_dir() / "data" / f"conversations_n{a.n}_seed{a.seed}.jsonl"
    if not raw.is_file():
        raw.parent.mkdir(parents=True, exist_ok=True)
        synthetic.write(raw, synthetic.rows(synthetic.multi_turn, a.n, a.seed))
    out = work_dir() / "prepared" / f"n{a.n}_seed{a.seed}_len{a.max_length}"  # prepare() rebuilds it if stale
    return out, prepare(DataOptions(max_length=a.max_length), [str(raw)], out, load_tokenizer(str(model_dir)))


def sftkit_config(a, out: Path):
    """The sftkit run's SFTConfig; the bare loop builds its model and batches from it too."""
    import yaml

    from sftkit.config import SFTConfig

    extra = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in a.sftkit_args)}
    return SFTConfig(
        model_name_or_path=str(a.model_dir), data_path=[str(a.data_dir)], output_dir=str(out),
        max_length=a.max_length, per_device_train_batch_size=a.batch_size, gradient_accumulation_steps=a.grad_accum,
        packing=a.packing, learning_rate=a.lr, num_train_epochs=1.0, max_steps=a.max_steps, logging_steps=1,
        save_steps=0, bf16=a.bf16, use_lora=a.lora, report_to="none", seed=a.seed, **extra)


# ---- the children: each trains one system and returns its per-step record -------------------------
def peak_memory_mb() -> float:
    """sftkit's own readings: torch.cuda.max_memory_allocated on GPU, VmHWM (peak RSS) on CPU."""
    from sftkit.metrics import peak_gpu_gb, peak_rss_mb

    gpu = peak_gpu_gb()
    return gpu * 1024 if gpu is not None else peak_rss_mb()


def sync() -> None:
    """Wait for the GPU, so that a step ends when its work is done rather than when it was queued."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def diffs(cumulative: list) -> list:
    return [b - a for a, b in zip([0] + cumulative[:-1], cumulative)]


def child_sftkit(a) -> dict:
    from sftkit.train import finish, fit, setup

    run = setup(sftkit_config(a, a.scratch / "sftkit"))
    config = run.accelerator.unwrap_model(run.model).config
    # a MoE model's routed-experts kernel (transformers' grouped_mm, batched_mm or eager loop)
    experts = getattr(config, "_experts_implementation", None) if getattr(config, "num_experts", None) else None
    fit(run)
    peak_mb = peak_memory_mb()  # the peak of training, not of writing final/ after it
    finish(run)
    lines = [json.loads(ln) for ln in (a.scratch / "sftkit" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "elapsed_s" in r and "tokens" in r and "event" not in r]
    sup, tok = (diffs([r[k] for r in steps]) for k in ("supervised_tokens", "tokens"))
    # slots are not logged, but each step's padding_efficiency (logging_steps=1) gives them to 4 digits
    return {"ends": [r["elapsed_s"] for r in steps], "sup": sup, "tok": tok,
            "slots": sum(t / r["padding_efficiency"] for t, r in zip(tok, steps)), "first_loss": steps[0]["loss"],
            "tflops": [r["tflops_per_device"] for r in steps], "peak_mb": peak_mb,
            "note": f"fused_loss={lines[0].get('fused_loss')}, attention={lines[0].get('attention')}, logging_steps=1",
            # the start record's paths (linear_attention: fla, loop or torch; absent without Gated DeltaNet layers)
            "start": {**{k: lines[0].get(k) for k in START_FIELDS}, "experts": experts}}


def child_bare(a) -> dict:
    from sftkit.train import setup, step_batches, train_step

    run = setup(sftkit_config(a, a.scratch / "bare"))
    batches = step_batches(run)  # collated in this process, step by step
    rec = {"ends": [], "sup": [], "tok": [], "slots": 0, "note": f"sftkit's train_step, fused_loss={bool(run.head)}"}
    run.model.train()
    start = time.perf_counter()
    for step in range(run.total_steps):
        stats = train_step(run, batches[step])
        if step == 0:
            rec["first_loss"] = stats.loss(run.accelerator)
        sync()
        rec["ends"].append(time.perf_counter() - start)
        rec["sup"].append(stats.supervised)
        rec["tok"].append(stats.tokens)
        rec["slots"] += stats.slots
    return {**rec, "peak_mb": peak_memory_mb()}


def child_trl(a, best: bool, liger: bool = False) -> dict:
    import datasets
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from sftkit.data.prepare import load_prepared
    from sftkit.models import load_model, load_tokenizer

    cfg = sftkit_config(a, a.scratch / "unused")  # for the LoRA settings, so that TRL's adapter is sftkit's
    prepared = load_prepared(a.data_dir)
    # In memory, so TRL's dataset maps write no cache files into sftkit's prepared directory. With a
    # labels column TRL tokenizes nothing and builds no mask: it trains on exactly these labels.
    train = datasets.Dataset.from_dict({"input_ids": prepared["input_ids"], "labels": prepared["labels"]})
    rec = {"ends": [], "sup": [], "tok": [], "slots": 0, "first": []}
    pending = {"sup": 0, "tok": 0}

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            rec["start"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            rec["ends"].append(time.perf_counter() - rec["start"])
            for k, count in pending.items():
                rec[k].append(count)
                pending[k] = 0

    class CountingSFTTrainer(SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            labels = inputs["labels"]
            pending["sup"] += int((labels[:, 1:] != -100).sum())  # TRL's loss scores labels[:, 1:]
            mask = inputs.get("attention_mask")  # none when padding-free: one row, no padding
            pending["tok"] += int(mask.sum()) if mask is not None else labels.numel()
            rec["slots"] += labels.numel()
            return super().training_step(model, inputs, num_items_in_batch)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if self.state.global_step == 0:  # divided by the whole step's supervised tokens, the parts add up
                rec["first"].append(loss.item() / (1 if num_items_in_batch is not None else a.grad_accum))
            return loss

    # bf16 always given: TRL's default is on. use_cpu: transformers refuses bf16 on a CPU without it.
    args = SFTConfig(
        output_dir=str(a.scratch / "trl"), per_device_train_batch_size=a.batch_size,
        gradient_accumulation_steps=a.grad_accum, learning_rate=a.lr, num_train_epochs=1, max_length=a.max_length,
        seed=a.seed, bf16=a.bf16, use_cpu=not a.cuda, save_strategy="no", eval_strategy="no", report_to="none",
        max_steps=a.max_steps, use_liger_kernel=liger,
        **({"packing": True, "packing_strategy": "bfd", "gradient_checkpointing": False} if best else {}))
    model = load_model(str(a.model_dir), attn_implementation=a.attn)
    peft_config = None
    if a.lora:
        from peft import LoraConfig

        from sftkit.models import lora_dropout, lora_targets

        peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=lora_dropout(cfg, model.config),
                                 target_modules=lora_targets(cfg, model.config), task_type="CAUSAL_LM")
    trainer = CountingSFTTrainer(model=model, args=args,
                                 train_dataset=train, processing_class=load_tokenizer(str(a.model_dir)),
                                 callbacks=[Clock()], peft_config=peft_config)
    trainer.train()
    note = (f"gradient_checkpointing={args.gradient_checkpointing}, packing={args.packing}, "
            f"padding_free={trainer.padding_free}, liger={liger}, {len(trainer.train_dataset)} rows")
    return {**rec, "first_loss": sum(rec.pop("first")), "peak_mb": peak_memory_mb(), "note": note}


CHILDREN = {"sftkit": child_sftkit, "bare": child_bare, "trl_default": partial(child_trl, best=False),
            "trl_best": partial(child_trl, best=True), "trl_liger": partial(child_trl, best=True, liger=True)}


def summarize(rec: dict, warmup: int = 1) -> dict:
    """Throughput over all steps, and without the first `warmup` steps (fewer where the run is short)."""
    ends, sup, tok = rec["ends"], rec["sup"], rec["tok"]
    n = len(ends)
    w = max(1, min(warmup, n - 1))
    rest = ends[-1] - ends[w - 1]  # the timed steps: those after the warm-up
    ok = n > 1 and rest > 0
    out = {"steps": n, "warmup_steps": w, "first_step_s": ends[0], "loop_s": ends[-1],
           "step_s": rest / (n - w) if ok else ends[0],
           "sup_tok_s": sum(sup[w:]) / rest if ok else math.nan, "tok_s": sum(tok[w:]) / rest if ok else math.nan,
           "sup_tok_s_all": sum(sup) / ends[-1], "tok_s_all": sum(tok) / ends[-1],
           "supervised_tokens": sum(sup), "tokens": sum(tok), "padding_efficiency": sum(tok) / rec["slots"],
           "peak_mb": rec["peak_mb"], "first_loss": rec["first_loss"], "note": rec["note"], "step_ends_s": ends,
           "start": rec.get("start")}
    if rec.get("tflops") and ok:  # sftkit's own count, each step's TFLOPS times its duration
        steps_s = diffs(ends)
        out["model_tflop_timed"] = sum(t * d for t, d in zip(rec["tflops"][w:], steps_s[w:]))
        out["tflops"] = out["model_tflop_timed"] / rest
    return out


# ---- the parent ------------------------------------------------------------------------------------
def add_mfu(rows: list[dict]) -> None:
    """TFLOPS and MFU by sftkit's FLOPs count: sftkit's own; for the others, sftkit's FLOPs per
    timed token times their timed tokens/s (the same data, so the same work per token)."""
    import torch

    from sftkit.arch.flops import peak_flops

    ours = next((r for r in rows if r["system"] == "sftkit" and r.get("tflops")), None)
    if ours is None:
        return
    per_token = ours["tflops"] / ours["tok_s"]
    peak = peak_flops(torch.cuda.get_device_name() if torch.cuda.is_available() else None)
    for r in rows:
        r["tflops"] = r["tflops"] if r is ours else per_token * r["tok_s"]
        r["mfu"] = r["tflops"] * 1e12 / peak if peak else None


def missing(system: str, cuda: bool) -> str | None:
    """Why this system cannot run here, or None."""
    if system.startswith("trl") and not find_spec("trl"):
        return "not installed (trl)"
    if system == "trl_liger" and not find_spec("liger_kernel"):
        return "not installed (liger-kernel)"
    if system == "trl_liger" and not cuda:
        return "not run: Liger's Triton kernels need a GPU"
    return None


def run_child(system: str, a, model_dir: Path, data_dir: Path) -> dict:
    """One system in a fresh process; its output goes to a log file, its result is the marked line."""
    why = missing(system, a.cuda)
    if why:
        print(f"{system}: {why}")
        return {"system": system, "error": why}
    log = work_dir() / "logs" / f"{system}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    done = run(python("bench.train_bench", *sys.argv[1:], "--child", system, "--model_dir", str(model_dir),
                      "--data_dir", str(data_dir)), log=log)
    lines, record = done.stdout.splitlines(), done.result()
    if done.code or record is None:
        print(f"{system}: FAILED (exit {done.code}); the end of {log}:\n    " + "\n    ".join(lines[-15:]))
        return {"system": system, "error": lines[-1] if lines else f"exit {done.code}", "log": str(log)}
    print(f"{system}: {done.wall_s:.0f} s in all (log {log})")
    return {"system": system, **record, "log": str(log)}


def environment() -> dict:
    import torch

    def git(*cmd):
        return subprocess.run(["git", "-C", str(REPO), *cmd], capture_output=True, text=True, check=False).stdout.strip()

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    versions = {p: metadata.version(p) if find_spec(p.replace("-", "_")) else "not installed"
                for p in ("torch", "transformers", "trl", "accelerate", "peft", "liger-kernel")}
    dirty = " + uncommitted changes" if git("status", "--porcelain", "sftkit") else ""
    command = [os.path.relpath(sys.executable), "-m", "bench.train_bench", *sys.argv[1:]]
    return {"command": shlex.join(command), "date": time.strftime("%Y-%m-%d %H:%M %Z"),
            "versions": {"python": platform.python_version(), **versions, "sftkit": git("rev-parse", "--short", "HEAD")
                         + dirty}, "machine": f"{gpu or cpu}; {os.cpu_count()} CPU cores",
            "load_average_at_start": round(os.getloadavg()[0], 2)}  # above the core count: CPU timings are shared


def print_table(rows: list[dict], mem: str) -> None:
    print(f"\n| system | steps | supervised tok/s | tok/s | supervised tok/s, all steps | padding eff. | peak {mem} MB "
          "| step s | first step s | first_loss | supervised tokens |\n|---|" + "---:|" * 10)
    for r in rows:
        print(f"| {r['system']} | {r['steps']} | {r['sup_tok_s']:,.0f} | {r['tok_s']:,.0f} | {r['sup_tok_s_all']:,.0f} "
              f"| {r['padding_efficiency']:.3f} | {r['peak_mb']:,.0f} | {r['step_s']:.3f} | {r['first_step_s']:.2f} "
              f"| {r['first_loss']:.6f} | {r['supervised_tokens']:,} |")
    ours = next((r for r in rows if r["system"] == "sftkit"), None)
    if ours and len(rows) > 1:
        cols = ("sup_tok_s", "tok_s", "sup_tok_s_all", "padding_efficiency", "peak_mb", "step_s")
        print("\n| ratio | supervised tok/s | tok/s | supervised tok/s, all steps | padding eff. | peak memory | step s |"
              "\n|---|" + "---:|" * len(cols))
        for r in rows:
            if r is not ours:
                print(f"| sftkit / {r['system']} | " + " | ".join(f"{ours[c] / r[c]:.2f}x" for c in cols) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny", help=f"a preset ({', '.join(models.PRESETS)}; bench/models.py) or a "
                    "directory")
    ap.add_argument("--n", type=int, help="synthetic conversations; those over max_length are dropped. Default: 512 "
                    "on a GPU, 32 on a CPU (where TRL trains the tiny model at about 50 supervised tokens/s)")
    ap.add_argument("--max_length", type=int, default=1024)
    ap.add_argument("--batch_size", type=int, default=8, help="per-device micro-batch: examples, or packed rows")
    ap.add_argument("--grad_accum", type=int, default=1)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, help="bf16 autocast; default: on with a GPU")
    ap.add_argument("--lora", action="store_true", help="LoRA with sftkit's default adapter settings")
    ap.add_argument("--packing", action="store_true", help="pack for sftkit and bare (trl_best always packs)")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated, from " + ", ".join(SYSTEMS))
    ap.add_argument("--sftkit_args", nargs="*", default=[], metavar="KEY=VALUE",
                    help="more SFTConfig fields for sftkit and bare, e.g. loss_chunk_size=0")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max_steps", type=int, default=-1, help="optimizer steps per system; -1: one epoch")
    ap.add_argument("--warmup", type=int, default=1, help="first steps left out of the throughput columns")
    ap.add_argument("--out", type=Path, help="also write the results here, as JSON")
    ap.add_argument("--child", choices=SYSTEMS, help=argparse.SUPPRESS)
    ap.add_argument("--model_dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--data_dir", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    offline()
    if set(a.systems.split(",")) - set(SYSTEMS):
        ap.error(f"--systems: choose from {', '.join(SYSTEMS)}")
    import torch

    a.cuda = torch.cuda.is_available()
    a.n = a.n or (512 if a.cuda else 32)
    a.bf16 = a.cuda if a.bf16 is None else a.bf16
    a.attn = "flash_attention_2" if a.cuda and find_spec("flash_attn") else "sdpa"
    if a.child:
        import shutil

        a.scratch = work_dir() / "runs" / a.child
        shutil.rmtree(a.scratch, ignore_errors=True)
        report(summarize(CHILDREN[a.child](a), a.warmup))
    else:
        compare(a)


def compare(a) -> None:
    """The parent: the model and data once, then each system in its child; the tables."""
    env = environment()
    print("\n".join(f"{k}: {v}" for k, v in env.items()))
    model_dir = models.build_preset(a.model, work_dir() / "models")
    data_dir, man = prepare_data(a, model_dir)
    print(f"model: {model_dir}\ndata: {data_dir}: {man['examples_kept']} examples ({sum(man['dropped'].values())} "
          f"of {man['rows_in']} dropped, longer than {a.max_length}), {man['tokens']:,} tokens, "
          f"{man['supervised_tokens']:,} supervised\nsettings: batch {a.batch_size} x accum {a.grad_accum}, "
          f"max_length {a.max_length}, lr {a.lr}, {'bf16' if a.bf16 else 'fp32'}, attn {a.attn}, lora {a.lora}, "
          f"packing (sftkit, bare) {a.packing}, sftkit_args {a.sftkit_args}\n")
    results = [run_child(s, a, model_dir, data_dir) for s in a.systems.split(",")]
    rows = [r for r in results if "error" not in r]
    add_mfu(rows)
    print_table(rows, "GPU allocated" if a.cuda else "RSS")
    for r in rows:
        print(f"{r['system']}: {r['note']}")
        if a.max_steps < 0 and r["supervised_tokens"] != man["supervised_tokens"]:  # the whole epoch: the same tokens
            print(f"  WARNING: {r['supervised_tokens']:,} supervised tokens trained, the data holds "
                  f"{man['supervised_tokens']:,}")
    by = {r["system"]: r for r in rows}
    if "sftkit" in by and "bare" in by:
        diff = abs(by["sftkit"]["first_loss"] - by["bare"]["first_loss"])
        print(f"first-step loss, sftkit vs bare (identical batches): |diff| = {diff:.1e} "
              f"({'OK' if diff <= 1e-5 else 'MISMATCH'})")
    env["load_average_at_end"] = round(os.getloadavg()[0], 2)
    print(f"1-minute load average: {env['load_average_at_start']} at the start, {env['load_average_at_end']} at the end "
          f"({os.cpu_count()} cores)")
    if a.out:
        settings = {k: v for k, v in vars(a).items() if k not in ("child", "model_dir", "data_dir", "cuda")}
        a.out.write_text(json.dumps({**env, "settings": settings, "model_dir": model_dir, "data": man,
                                     "results": results}, indent=2, default=str) + "\n")
        print(f"results: {a.out}")


if __name__ == "__main__":
    main()
