"""The prepared GPU check, run by `bash bench/gpu_check.sh OUTDIR` (which installs the wheels the
device lacks first, then runs `python -m bench.gpu_check OUTDIR`). Everything fits one device call
of 9 minutes (540 s), the installs included: the parts run in order of value, each with a time
budget, and a part whose budget no longer fits before END_S is skipped and recorded as "skipped:
budget". A running part may overrun its budget by half (it is worth more than the parts after it),
never past END_S.

  budget  part (bf16; sftkit unless named; 2 untimed warm-up steps, then 6 timed)
   ~25 s  installs (gpu_check.sh), then the environment and a 10-s GPU warm-up (a fresh machine
          ran its first processes 1.8x slower: first step 4.5 s vs 1.5 s)
   120 s  1. Qwen3.5-2B-shaped, LoRA, packed 4096 x 2: Gated DeltaNet kernels (flash-linear-attention
          compiles its Triton kernels in this first run), the 248,320-word vocabulary's fused loss
   110 s  2. Qwen3-30B-A3B-shaped, 12 of its 48 layers (bench/models.py MOE_LAYERS), LoRA on
          attention and the 128 routed experts (sftkit's default LoRA: its dropout resolves to 0
          there, the only way PEFT reaches experts), 2048 x 2
    70 s  3. Qwen3.5-2B-shaped, full fine-tuning, packed 4096 x 1 (fp32 weights and AdamW: 30 GB)
    45 s  4. Qwen3-0.6B, full, packed 2048 x 4: the dense row earlier checks measured
    80 s  5. pytest -m gpu tests/test_gpu.py (varlen vs the sdpa block mask, fused loss vs plain,
          inductor vs eager, a full and a LoRA step of Qwen3-0.6B)
    80 s  6. Qwen3-0.6B as in 4, TRL best (packing bfd) and TRL + Liger: the peers
    90 s  7. Qwen3-1.7B, full, packed 4096 x 2, sftkit and TRL + Liger
  = 25 + 10 + 595 s of budgets for END_S = 510 s: when every part takes its budget, 6 and 7 are
  skipped; they run when the ones before finish early.

Each row records supervised tokens/s, MFU (sftkit's FLOPs count against the GPU's bf16 peak), peak
GPU memory (torch.cuda.max_memory_allocated) and, from sftkit's metrics.jsonl start record, which
loss (fused_loss) and kernel paths (attention; linear_attention: fla, loop or torch, none for models
without Gated DeltaNet layers; and transformers' experts kernel of a MoE model) ran. Printed and written to OUTDIR/summary.md and OUTDIR/summary.json.

Without CUDA the same parts run as a dry run on tiny stand-ins of each architecture (a qwen3_5_text
with the real 248,320-word vocabulary, a qwen3_moe with 8 experts, the tiny Qwen3), 2 steps each,
small enough for CI (2 cores): numbers that say the check works, not how fast anything is.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from bench import child
from bench.child import REPO, offline, python
from bench.models import MOE, MOE_LAYERS
from bench.train_bench import missing

CALL_S = 540  # the device call, installs included
END_S = 510  # parts end by here, counted from gpu_check.sh's start: 30 s for the summary and removing the cache
OVERRUN = 1.5  # a running part may take this times its budget, if END_S allows
WARM_UP_S = 10


@dataclass(frozen=True)
class Bench:
    """One bench.train_bench call."""

    name: str
    model: str
    length: int
    rows: int
    budget_s: int
    dry_run: tuple[str, int]
    """The model preset and max_length that stand in for it without CUDA (one row a step)."""
    lora: bool = False
    systems: str = "sftkit"

    @property
    def method(self) -> str:
        return "LoRA" if self.lora else "full"


@dataclass(frozen=True)
class Pytest:
    name: str
    budget_s: int


PARTS = [
    Bench("qwen3.5-2b LoRA", "qwen3.5-2b", 4096, 2, 120, ("tiny-qwen3.5", 512), lora=True),
    # sftkit's default LoRA: lora_dropout resolves to 0 on a MoE model, so the routed experts get adapters
    Bench(f"qwen3-30b-a3b ({MOE_LAYERS} layers) LoRA + experts", MOE, 2048, 2, 110, ("tiny-moe", 512), lora=True),
    Bench("qwen3.5-2b full", "qwen3.5-2b", 4096, 1, 70, ("tiny-qwen3.5", 512)),
    Bench("qwen3-0.6b full", "qwen3-0.6b", 2048, 4, 45, ("tiny", 256)),
    Pytest("pytest -m gpu", 80),
    Bench("qwen3-0.6b full, TRL", "qwen3-0.6b", 2048, 4, 80, ("tiny", 256), systems="trl_best,trl_liger"),
    Bench("qwen3-1.7b full", "qwen3-1.7b", 4096, 2, 90, ("tiny", 512), systems="sftkit,trl_liger"),
]
STEPS, WARMUP = (8, 2), (2, 1)  # (GPU, CPU): optimizer steps per run, and of those untimed
CONVERSATIONS = (256, 16)  # (GPU, CPU): bench/synthetic.py's multi-turn conversations, ~480 tokens each


def part_timeout(budget_s: float, left: float, cuda: bool) -> float | None:
    """How long a part may run, or None to skip it: its budget no longer fits in what is left. On a
    GPU it may overrun its budget by half; a dry run (CPU) is bounded by END_S alone."""
    if left < budget_s:
        return None
    return min(left, OVERRUN * budget_s) if cuda else left


def environment(cuda: bool) -> dict:
    import torch

    from sftkit.arch.packed_attention import flash_varlen, torch_varlen

    versions = {}
    for name in ("torch", "transformers", "accelerate", "peft", "trl", "liger-kernel", "flash-attn",
                 "flash-linear-attention", "fla-core", "causal-conv1d", "triton"):
        try:  # read from the installed metadata: importing trl alone takes ~11 s on 2 cores
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    kernel = "torch varlen_attn" if torch_varlen() else "flash-attn" if flash_varlen() else "reference loop"
    return {"device": torch.cuda.get_device_name() if cuda else "CPU (dry run)", "python": sys.version.split()[0],
            "versions": versions, "varlen_kernel": kernel if cuda else "reference loop (CPU)",
            "date": time.strftime("%Y-%m-%d %H:%M %Z")}


def warm_up(seconds: float) -> float:
    """bf16 matmuls until `seconds` pass: clocks up, CUDA context and cuBLAS initialised."""
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    start, n = time.time(), 0
    while time.time() - start < seconds:
        a @ a
        n += 1
        if n % 20 == 0:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    return 2 * 8192 ** 3 * n / (time.time() - start) / 1e12  # achieved TFLOPS, for the record


def run(cmd: list[str], log: Path, timeout: float) -> tuple[int | None, str]:
    """(exit code or None on timeout, last line) of a command, its output in `log`. On timeout its
    whole process group goes, so that train_bench's training child frees the GPU too (within
    END_S's 30 s of slack)."""
    done = child.run(cmd, log=log, timeout=max(timeout, 1))
    return done.code, done.last_line()


def finite(x):
    """A number JSON can hold, or None (JSON has no NaN)."""
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


def bench(part: Bench, out: Path, cuda: bool, timeout: float) -> list[dict]:
    """One train_bench call; a row per system, as the summary shows them."""
    base = row_base(part, cuda)
    model, length, rows = base["model"], *map(int, base["shape"].split(" x "))
    systems = part.systems.split(",")
    why = {s: missing(s, cuda) for s in systems}
    runnable = [s for s in systems if not why[s]]
    if not runnable:  # nothing to launch (no trl on this machine): say so without building a model
        return [{**base, "system": s, "status": why[s]} for s in systems]
    steps, warmup = STEPS if cuda else WARMUP
    stem = f"bench_{model}_{length}_{part.method}_{'+'.join(runnable)}".replace(".", "_")
    result = out / f"{stem}.json"
    cmd = python("bench.train_bench", "--model", model, "--max_length", str(length), "--batch_size", str(rows),
                 "--packing", "--systems", ",".join(runnable), "--max_steps", str(steps), "--warmup", str(warmup),
                 "--n", str(CONVERSATIONS[0 if cuda else 1]), "--out", str(result))
    cmd += ["--lora"] if part.lora else []
    code, last = run(cmd, out / f"{stem}.log", timeout)
    if code != 0 or not result.is_file():
        status = f"timed out after {timeout:.0f} s" if code is None else f"exit {code}: {last[-200:]}"
        return [{**base, "system": s, "status": why[s] or status} for s in systems]
    by = {r["system"]: r for r in json.loads(result.read_text())["results"]}
    return [{**base, "system": s, "status": why[s]} if why[s] else row(base, by[s]) for s in systems]


def row_base(part: Bench, cuda: bool) -> dict:
    """What a row of this part ran: the part, the model preset, the method and tokens x rows."""
    model, length = (part.model, part.length) if cuda else part.dry_run
    return {"run": part.name, "model": model, "method": part.method, "shape": f"{length} x {part.rows if cuda else 1}"}


def row(base: dict, r: dict) -> dict:
    if "error" in r:
        return {**base, "system": r["system"], "status": f"failed: {r['error'][-200:]}"}
    start = r.get("start") or {}  # sftkit's start record; TRL has none
    return {**base, "system": r["system"], "status": "ok", "sup_tok_s": finite(r["sup_tok_s"]),
            "tok_s": finite(r["tok_s"]), "mfu": finite(r.get("mfu")), "tflops": finite(r.get("tflops")),
            "peak_gb": finite(r["peak_mb"] / 1024), "steps": r["steps"], "warmup_steps": r["warmup_steps"],
            "first_loss": finite(r["first_loss"]), "fused_loss": start.get("fused_loss"),
            "loss_chunk_rows": start.get("loss_chunk_rows"),
            "attention": start.get("attention"), "linear_attention": start.get("linear_attention"),
            "experts": start.get("experts"),
            "trainable_params": start.get("trainable_params"), "total_params": start.get("total_params"),
            **predicted(start.get("memory_forecast")), "note": r["note"]}


def predicted(forecast: dict | None) -> dict:
    """The memory model's prediction for an sftkit run (sftkit/plan.py), to set beside what it measured."""
    if not forecast:
        return {}
    return {"predicted_gb": finite(forecast["peak_mb"] / 1024), "predicted_tok_s": finite(forecast.get("tokens_per_s"))}


def pytest_gpu(out: Path, timeout: float) -> str:
    """pytest's last line (its counts), or why there is none."""
    code, last = run(python("pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", str(REPO / "tests" / "test_gpu.py")),
                     out / "pytest_gpu.log", timeout)
    return f"timed out after {timeout:.0f} s" if code is None else last if code in (0, 1) else f"exit {code}: {last}"


def with_ratios(rows: list[dict]) -> None:
    """On each peer's row: sftkit's speed and memory over the peer's, same model and shape."""
    ours = {(r["model"], r["shape"], r["method"]): r for r in rows if r["system"] == "sftkit" and r["status"] == "ok"}
    for r in rows:
        mine = ours.get((r["model"], r["shape"], r["method"]))
        if r["system"] != "sftkit" and r["status"] == "ok" and mine and r["sup_tok_s"] and r["peak_gb"]:
            r["sftkit_over"] = {"sup_tok_s": mine["sup_tok_s"] / r["sup_tok_s"],
                                "peak_memory": mine["peak_gb"] / r["peak_gb"]}


def cell(value, fmt: str = "{}") -> str:
    return "—" if value is None else fmt.format(value)


def fused(r: dict) -> str:
    """The fused_loss cell: whether the fused head ran, and its chunk of rows where recorded."""
    rows = r.get("loss_chunk_rows")
    return cell(r.get("fused_loss")) + (f" ({rows}-row chunks)" if r.get("fused_loss") and rows else "")


def markdown(summary: dict) -> str:
    env, cuda = summary["environment"], summary["cuda"]
    lines = [f"# GPU check: {env['device']}", "",
             f"{env['date']}; python {env['python']}; "
             + ", ".join(f"{k} {v}" for k, v in env["versions"].items()) + f"; varlen kernel: {env['varlen_kernel']}",
             f"command: `bash bench/gpu_check.sh OUTDIR` (sftkit {summary['commit']})", ""]
    mem = "peak GPU GB" if cuda else "peak RSS GB"
    lines += [(f"| run | system | model | method | tokens x rows | supervised tok/s | tok/s | MFU | {mem} "
               "| predicted GB, tok/s | fused_loss | linear_attention | attention | experts | trainable | status |"),
              "|---|---|---|---|---|" + "---:|" * 5 + "---|" * 4 + "---:|---|"]
    for r in summary["rows"]:
        ratio = r.get("sftkit_over")
        status = r["status"] + (f" (sftkit: {ratio['sup_tok_s']:.2f}x tok/s, {ratio['peak_memory']:.2f}x memory)"
                                if ratio else "")
        lines.append(f"| {r['run']} | {r['system']} | {r['model']} | {r['method']} | {r['shape']} | "
                     f"{cell(r.get('sup_tok_s'), '{:,.0f}')} | {cell(r.get('tok_s'), '{:,.0f}')} | "
                     f"{cell(r.get('mfu'), '{:.3f}')} | {cell(r.get('peak_gb'), '{:.2f}')} | "
                     f"{cell(r.get('predicted_gb'), '{:.2f}')}, {cell(r.get('predicted_tok_s'), '{:,.0f}')} | "
                     f"{fused(r)} | {cell(r.get('linear_attention'))} | {cell(r.get('attention'))} | "
                     f"{cell(r.get('experts'))} | "
                     f"{cell(r.get('trainable_params'), '{:,}')} | {status} |")
    lines += ["", f"pytest -m gpu: {summary['pytest']}", "",
              (f"Time: installs {cell(summary['install_s'], '{:.0f} s')}, warm-up {summary['warm_up_s']:.0f} s "
               f"({summary['warm_up_tflops']} TFLOPS)" if cuda else "Time: nothing installed or warmed up (dry run)")
              + f"; {summary['elapsed_s']:.0f} s in all of the {CALL_S} s call (parts end by {END_S} s).", "",
              "| part | budget s | took s | status |", "|---|---:|---:|---|"]
    lines += [f"| {p['part']} | {p['budget_s']} | {cell(p.get('took_s'), '{:.0f}')} | {p['status']} |"
              for p in summary["parts"]]
    if not cuda:
        lines += ["", ("Dry run without CUDA (tiny stand-ins of each architecture, 2 steps): it shows the check runs, "
                       "not any speed.")]
    return "\n".join(lines) + "\n"


def run_part(part: Bench | Pytest, out: Path, cuda: bool, left: float) -> tuple[str, list[dict], bool]:
    """(status, summary rows, whether it ran) of one part, given the seconds left before END_S."""
    timeout = part_timeout(part.budget_s, left, cuda)
    if timeout is None:
        rows = ([{**row_base(part, cuda), "system": s, "status": "skipped: budget"} for s in part.systems.split(",")]
                if isinstance(part, Bench) else [])
        return f"skipped: budget ({left:.0f} s left, budget {part.budget_s} s)", rows, False
    if isinstance(part, Pytest):
        return pytest_gpu(out, timeout), [], True
    rows = bench(part, out, cuda, timeout)
    return "; ".join(dict.fromkeys(r["status"] for r in rows)), rows, True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outdir", type=Path, help="where the summary and the logs go")
    out = ap.parse_args().outdir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    offline()
    # gpu_check.sh notes when it started and when its installs ended: the budget counts them
    start = float(os.environ.get("GPU_CHECK_START") or time.time())
    installed = os.environ.get("GPU_CHECK_INSTALLED")
    import torch

    cuda = torch.cuda.is_available()
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            check=False).stdout.strip() or "unknown"
    summary = {"cuda": cuda, "commit": commit, "environment": environment(cuda),
               "install_s": round(float(installed) - start, 1) if installed else None, "call_s": CALL_S, "end_s": END_S}
    began = time.time()
    if cuda:
        summary["warm_up_tflops"] = round(warm_up(WARM_UP_S), 1)
    summary["warm_up_s"] = round(time.time() - began, 1)
    summary["pytest"], summary["rows"], summary["parts"] = "not reached", [], []
    for part in PARTS:
        began = time.time()
        status, rows, ran = run_part(part, out, cuda, left=END_S - (began - start))
        took = round(time.time() - began, 1) if ran else None
        summary["rows"] += rows
        summary["parts"].append({"part": part.name, "budget_s": part.budget_s, "took_s": took, "status": status})
        if isinstance(part, Pytest):
            summary["pytest"] = status
        print(f"{part.name}: {status}" + (f" ({took:.0f} s)" if ran else ""), flush=True)
    with_ratios(summary["rows"])
    summary["elapsed_s"] = round(time.time() - start, 1)
    text = markdown(summary)
    (out / "summary.md").write_text(text)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=lambda x: None) + "\n")
    print("\n" + text + f"\nlogs and results in {out}")
    failed = [r for r in summary["rows"] if r["status"] != "ok" and not r["status"].startswith(
        ("skipped", "not installed", "not run"))]
    return 1 if failed or "failed" in summary["pytest"] or summary["pytest"].startswith(("timed out", "exit")) else 0


if __name__ == "__main__":
    sys.exit(main())
