"""What a run reports: metrics.jsonl (and accelerate's trackers), the throughput of each logging
window (tokens/s, padding efficiency, TFLOPS, MFU), memory, and the ranks' weight fingerprints."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch


def read_jsonl(path: Path) -> tuple[list[dict], int]:
    """The records of a JSON-lines log, and how many lines were dropped as unreadable: a process
    killed mid-append leaves a torn last line, which must not block a resume."""
    records, torn = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                torn += 1
    return records, torn


class MetricsLog:
    """metrics.jsonl (always) plus accelerate's trackers; main process only."""

    def __init__(self, accelerator, path: Path, resumed_step: int | None, console=None):
        self.accelerator, self.path = accelerator, path
        if accelerator.is_main_process:
            kept = []
            if resumed_step is not None and path.exists():
                records, torn = read_jsonl(path)
                if torn and console is not None:
                    console.print(f"note: {path}: dropped {torn} unreadable line(s), the torn end of the interrupted "
                                  "run's log", highlight=False)
                # lines the interrupted run wrote after its checkpoint are replaced by this run's
                kept = [json.dumps(r) for r in records if r.get("step", 0) <= resumed_step and "event" not in r]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(ln + "\n" for ln in kept))

    def write(self, record: dict, step: int | None = None, first: bool = False) -> None:
        if self.accelerator.is_main_process:
            lines = self.path.read_text().splitlines() if first else []
            with self.path.open("w" if first else "a") as f:
                for ln in [json.dumps(record)] + lines:
                    f.write(ln + "\n")
        if step is not None:
            self.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)


class Throughput:
    """Tokens, token slots and model FLOPs since the last report (a logging window) and since the
    start; `window()` turns them into rates and MFU against `peak` (FLOPs/s of one device)."""

    def __init__(self, peak: float | None):
        self.peak = peak
        self.start = time.time()
        self.run_flops = 0.0
        self._reset(self.start)

    def _reset(self, now: float) -> None:
        self.tokens, self.slots, self.flops, self.t = 0, 0, 0.0, now

    def add(self, tokens: int, slots: int, flops: float) -> None:
        self.tokens += tokens
        self.slots += slots
        self.flops += flops
        self.run_flops += flops

    def window(self) -> dict:
        """This window's rates; starts the next window."""
        now = time.time()
        seconds = max(now - self.t, 1e-9)
        out = {"tokens_per_s": round(self.tokens / seconds, 1),
               "padding_efficiency": round(self.tokens / max(self.slots, 1), 4), **self._rate(self.flops / seconds)}
        self._reset(now)
        return out

    def whole_run(self) -> dict:
        """TFLOPS and MFU over this process's steps, evals and saves."""
        return self._rate(self.run_flops / max(time.time() - self.start, 1e-9))

    def _rate(self, flops_per_s: float) -> dict:
        return {"tflops_per_device": sig(flops_per_s / 1e12),
                "mfu": None if self.peak is None else sig(flops_per_s / self.peak)}


def rss_mb() -> float | None:
    """This process's resident memory now (Linux), so leaks show in metrics.jsonl."""
    try:
        with open("/proc/self/statm") as f:
            return round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except (OSError, ValueError, IndexError):
        return None


def peak_rss_mb() -> float | None:
    """The most resident memory this process has held (Linux VmHWM)."""
    try:
        with open("/proc/self/status") as f:
            return next(round(int(ln.split()[1]) / 1024, 1) for ln in f if ln.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        return None


def peak_gpu_gb() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available() else None


def param_fingerprint(model) -> torch.Tensor:
    """Sum and sum of squares of the trainable weights, in float64: equal on every rank when the
    ranks are in sync (the check that catches a launch where each rank trains alone)."""
    total = torch.zeros(2, dtype=torch.float64)
    for p in model.parameters():
        if p.requires_grad:
            w = p.detach().double().cpu()
            total += torch.stack([w.sum(), (w * w).sum()])
    return total


def sig(x: float) -> float:
    """Four significant digits: TFLOPS span 1e-3 (a CPU) to 1e3 (a GPU)."""
    return float(f"{x:.4g}")


def as_float(x) -> float:
    """A tensor, a number or None as a Python float (None: NaN)."""
    return math.nan if x is None else float(x.item() if hasattr(x, "item") else x)


def json_float(x):
    """JSON has no NaN: a missing or non-finite value is written as null."""
    x = as_float(x)
    return x if math.isfinite(x) else None
