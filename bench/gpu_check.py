"""The prepared GPU check of issue 12, run by `bash bench/gpu_check.sh OUTDIR` (which installs the
wheels the device lacks first). In one call of at most 8 minutes on an H100:

  1. warm the GPU (a fresh machine ran its first processes 1.8x slower: first step 4.5 s vs 1.5 s),
  2. `pytest -m gpu tests/test_gpu.py` (varlen vs the sdpa block mask, fused loss vs plain, one
     full and one LoRA step of Qwen3-0.6B),
  3. bench/train_bench.py, full fine-tuning, packed, bf16: Qwen3-0.6B at 2048 tokens x 4 rows and
     Qwen3-1.7B at 4096 x 2, for sftkit, trl_best and trl_liger; 3 untimed warm-up steps, then 10,
  4. one table (supervised tokens/s, peak memory, MFU, ratios against TRL + Liger), printed and
     written to OUTDIR/summary.md and OUTDIR/summary.json.

Without CUDA the same steps run as a dry run on the tiny model, small enough for CI (2 cores):
numbers that say the script works, not how fast anything is.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUDGET_S = 450  # the device call allows 600 s; what is left when the budget runs out is skipped
SYSTEMS = "sftkit,trl_best,trl_liger"
# (name, model, max_length, rows per step): the measured settings
GPU_RUNS = [("qwen3-0.6b/2048", "qwen3-0.6b", 2048, 4), ("qwen3-1.7b/4096", "qwen3-1.7b", 4096, 2)]
CPU_RUNS = [("tiny/256 (dry run)", "tiny", 256, 1), ("tiny/512 (dry run)", "tiny", 512, 1)]


def environment(cuda: bool) -> dict:
    import torch

    from sftkit.arch.packed_attention import flash_varlen, torch_varlen

    versions = {}
    for name in ("torch", "transformers", "accelerate", "peft", "trl", "liger-kernel", "flash-attn"):
        try:  # read from the installed metadata: importing trl alone takes ~11 s on 2 cores
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    kernel = "torch varlen_attn" if torch_varlen() else "flash-attn" if flash_varlen() else "reference loop"
    return {"device": torch.cuda.get_device_name() if cuda else "CPU (dry run)", "python": sys.version.split()[0],
            "versions": versions, "varlen_kernel": kernel if cuda else "reference loop (CPU)",
            "date": time.strftime("%Y-%m-%d %H:%M %Z")}


def warm_up(seconds: float = 20.0) -> float:
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
    """(exit code or None on timeout, last line) of a command, its output in `log`."""
    with log.open("w") as f:
        try:
            code = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=max(timeout, 1),
                                  check=False).returncode
        except subprocess.TimeoutExpired:
            code = None
    lines = log.read_text(errors="replace").strip().splitlines()
    return code, lines[-1] if lines else ""


def bench(name: str, model: str, length: int, rows: int, out: Path, cuda: bool, timeout: float) -> dict:
    """One train_bench run; its rows as the summary shows them."""
    steps, warmup = (13, 3) if cuda else (2, 1)
    result = out / f"bench_{model}_{length}.json"
    cmd = [sys.executable, str(REPO / "bench" / "train_bench.py"), "--model", model, "--max_length", str(length),
           "--batch_size", str(rows), "--packing", "--systems", SYSTEMS, "--max_steps", str(steps),
           "--warmup", str(warmup), "--out", str(result)] + ([] if cuda else ["--n", "16"])
    code, last = run(cmd, out / f"bench_{model}_{length}.log", timeout)
    if code != 0 or not result.is_file():
        why = "timed out" if code is None else f"exit {code}: {last}"
        return {"run": name, "error": why, "rows": [{"system": s, "error": why} for s in SYSTEMS.split(",")]}
    results = json.loads(result.read_text())["results"]
    return {"run": name, "rows": [row(r) for r in results]}


def row(r: dict) -> dict:
    if "error" in r:
        return {"system": r["system"], "error": r["error"]}
    def finite(x):  # JSON has no NaN
        return x if isinstance(x, (int, float)) and math.isfinite(x) else None

    return {"system": r["system"], "sup_tok_s": finite(r["sup_tok_s"]), "tok_s": finite(r["tok_s"]),
            "peak_gb": finite(r["peak_mb"] / 1024), "mfu": finite(r.get("mfu")), "tflops": finite(r.get("tflops")),
            "steps": r["steps"], "warmup_steps": r["warmup_steps"], "first_loss": finite(r["first_loss"]),
            "note": r["note"]}


def with_ratios(runs: list[dict]) -> None:
    """sftkit's speed and memory over TRL + Liger's (and TRL best's), where both ran."""
    for b in runs:
        by = {r["system"]: r for r in b["rows"] if "error" not in r}
        ours = by.get("sftkit")
        for peer in ("trl_liger", "trl_best"):
            if ours and peer in by:
                b[f"sftkit_over_{peer}"] = {"sup_tok_s": ours["sup_tok_s"] / by[peer]["sup_tok_s"],
                                            "peak_memory": ours["peak_gb"] / by[peer]["peak_gb"]}


def markdown(summary: dict) -> str:
    env = summary["environment"]
    lines = [f"# GPU check: {env['device']}", "",
             f"{env['date']}; python {env['python']}; "
             + ", ".join(f"{k} {v}" for k, v in env["versions"].items()) + f"; varlen kernel: {env['varlen_kernel']}",
             f"command: `bash bench/gpu_check.sh OUTDIR` (sftkit {summary['commit']})", "",
             f"pytest -m gpu: {summary['pytest']}", ""]
    mem = "peak GPU GB" if summary["cuda"] else "peak RSS GB"
    lines += [f"| run | system | supervised tok/s | tok/s | {mem} | MFU | vs TRL+Liger tok/s | vs TRL+Liger memory |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for b in summary["runs"]:
        ratio = b.get("sftkit_over_trl_liger")
        for r in b["rows"]:
            if "error" in r:
                lines.append(f"| {b['run']} | {r['system']} | {r['error']} | | | | | |")
                continue
            mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.3f}"
            vs = (f"{ratio['sup_tok_s']:.2f}x | {ratio['peak_memory']:.2f}x" if ratio and r["system"] == "sftkit"
                  else " | ")
            lines.append(f"| {b['run']} | {r['system']} | {r['sup_tok_s']:,.0f} | {r['tok_s']:,.0f} | "
                         f"{r['peak_gb']:.2f} | {mfu} | {vs} |")
    if not summary["cuda"]:
        lines += ["", "Dry run without CUDA (tiny model, 2 steps): it shows the check runs, not any speed."]
    return "\n".join(lines) + "\n"


def main() -> int:
    out = Path(sys.argv[1]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    import torch

    cuda = torch.cuda.is_available()
    start = time.time()
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            check=False).stdout.strip() or "unknown"
    summary = {"cuda": cuda, "commit": commit, "environment": environment(cuda)}
    if cuda:
        summary["warm_up_tflops"] = round(warm_up(), 1)
    code, last = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu",
                      str(REPO / "tests" / "test_gpu.py")], out / "pytest_gpu.log", 150 if cuda else 120)
    summary["pytest"] = "timed out" if code is None else last
    summary["runs"] = []
    for name, model, length, rows in GPU_RUNS if cuda else CPU_RUNS:
        left = BUDGET_S - (time.time() - start)
        if left < 30:
            summary["runs"].append({"run": name, "error": "skipped: time budget spent",
                                    "rows": [{"system": s, "error": "skipped"} for s in SYSTEMS.split(",")]})
            continue
        summary["runs"].append(bench(name, model, length, rows, out, cuda, left))
    with_ratios(summary["runs"])
    summary["elapsed_s"] = round(time.time() - start, 1)
    text = markdown(summary)
    (out / "summary.md").write_text(text)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=lambda x: None) + "\n")
    print(text + f"\n{summary['elapsed_s']:.0f} s; logs and results in {out}")
    return 0 if all("error" not in b for b in summary["runs"]) else 1


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
