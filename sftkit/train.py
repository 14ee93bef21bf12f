"""The training loop: one accelerate loop for CPU, one GPU, DDP and DeepSpeed ZeRO-1/2/3."""

from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path

import torch

from sftkit.accel import distributed_type, is_zero3, make_accelerator
from sftkit.batching import Schedule, StepBatches, ignore_stop_signals, total_steps
from sftkit.checkpoint import load_checkpoint, resolve_resume, save_checkpoint, save_model
from sftkit.config import SFTConfig
from sftkit.data.prepare import load_prepared
from sftkit.dataset import prepared_dir
from sftkit.errors import SftkitError
from sftkit.evaluate import evaluate_loss
from sftkit.flops import flops_per_step_fn, peak_flops
from sftkit.loss import fused_head, token_loss_sum
from sftkit.models import build_for_training, count_parameters, load_tokenizer

# flash-attention turns packed position_ids into varlen offsets, so a packed micro-batch can be one
# row with no padding at all; eager/sdpa would build a block mask quadratic in that row instead.
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")


def lr_lambda(total: int, warmup: int, kind: str):
    def f(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0
    return f


class MetricsLog:
    """metrics.jsonl (always) plus accelerate's trackers; main process only."""

    def __init__(self, accelerator, path: Path, resumed_step: int | None):
        self.accelerator, self.path = accelerator, path
        if accelerator.is_main_process:
            kept = []
            if resumed_step is not None and path.exists():
                # lines the interrupted run wrote after its checkpoint are replaced by this run's
                kept = [ln for ln in path.read_text().splitlines()
                        if ln.strip() and json.loads(ln).get("step", 0) <= resumed_step and "event" not in json.loads(ln)]
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


class StopRequest:
    """SIGTERM/SIGINT (a preempted job, Ctrl-C): finish the step, save a checkpoint, exit cleanly."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


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


def build_optimizer(cfg: SFTConfig, params: list) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay,
                             fused=cfg.fused_adamw or None, foreach=None if cfg.fused_adamw else True)


def run(cfg: SFTConfig, console=None) -> dict:
    """Train as `cfg` says; returns the final summary (also the last line of metrics.jsonl)."""
    out = Path(cfg.output_dir)
    trackers = None if cfg.report_to == "none" else cfg.report_to
    accelerator = make_accelerator(cfg, log_with=trackers)
    main = accelerator.is_main_process
    world, rank = accelerator.num_processes, accelerator.process_index
    from accelerate.utils import set_seed

    set_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model_name_or_path, cfg.trust_remote_code, cfg.chat_template)
    with accelerator.main_process_first():  # rank 0 tokenizes; the others then find its cache
        train_dir = prepared_dir(cfg, cfg.data_path, tokenizer, console if main else None, cfg.data_weights)
        eval_dir = prepared_dir(cfg, [cfg.eval_data_path], tokenizer) if cfg.eval_data_path else None
    train_set = load_prepared(train_dir)
    eval_set = load_prepared(eval_dir) if eval_dir else None
    if cfg.packing and max(train_set["length"]) > cfg.max_length:
        raise SftkitError(f"{train_dir} holds examples longer than max_length={cfg.max_length}, which cannot be packed; "
                          "prepare the data with the same --max_length")

    model = build_for_training(cfg)
    trainable, total = count_parameters(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg, params)
    schedule = Schedule(train_set["length"], cfg.per_device_train_batch_size, world, cfg.seed,
                        cfg.packing, cfg.max_length, cfg.group_by_length)
    steps = total_steps(schedule, cfg.gradient_accumulation_steps, cfg.num_train_epochs, cfg.max_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    head = fused_head(accelerator.unwrap_model(model), accelerator.mixed_precision, is_zero3(accelerator),
                      cfg.loss_chunk_size)
    step_flops = flops_per_step_fn(accelerator.unwrap_model(model).config, cfg.use_lora)
    peak = peak_flops(torch.cuda.get_device_name() if torch.cuda.is_available() else None, cfg.mfu_peak_tflops)
    warmup = math.ceil(cfg.warmup_ratio * steps)
    # Not passed to prepare(): accelerate would step it once per process per optimizer step.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(steps, warmup, cfg.lr_scheduler_type))
    accelerator.register_for_checkpointing(scheduler)

    state = {"step": 0, "micro_index": 0, "tokens": 0, "supervised_tokens": 0, "elapsed_s": 0.0}
    resumed = None
    if cfg.resume_from_checkpoint:
        state = load_checkpoint(accelerator, resolve_resume(cfg.resume_from_checkpoint, out))
        resumed = state["step"]
    if main:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save_yaml(out / "config.yaml")
    if trackers:
        # trackers take scalars only: lists become comma-separated text, None an empty string
        flat = {k: ",".join(map(str, v)) if isinstance(v, list) else "" if v is None else v
                for k, v in cfg.to_dict().items()}
        accelerator.init_trackers(cfg.run_name or out.name, config=flat)
    log = MetricsLog(accelerator, out / "metrics.jsonl", resumed)
    log.write({
        "event": "start", "world_size": world, "distributed_type": distributed_type(accelerator),
        "mixed_precision": accelerator.mixed_precision, "num_examples": len(train_set), "rows_per_epoch":
        len(schedule.units), "total_steps": steps, "trainable_params": trainable, "total_params": total,
        "resumed_from_step": resumed, "fused_loss": head is not None,
    }, first=True)

    from sftkit.progress import train_progress

    pad_id, G = tokenizer.pad_token_id, cfg.gradient_accumulation_steps
    padding_free = cfg.packing and cfg.attn_implementation in VARLEN_ATTENTION
    loader = torch.utils.data.DataLoader(
        StepBatches(train_set, schedule, G, rank, pad_id, cfg.packing, padding_free),
        sampler=range(state["step"], steps), batch_size=None, num_workers=cfg.dataloader_num_workers,
        pin_memory=torch.cuda.is_available(), prefetch_factor=2 if cfg.dataloader_num_workers else None,
        worker_init_fn=ignore_stop_signals,
        # its own generator: starting an iterator draws a worker seed, and a draw from the global RNG
        # would shift the dropout masks of a resumed run (caught by the kill -9 resume test)
        generator=torch.Generator().manual_seed(cfg.seed))
    start_time = time.time() - state["elapsed_s"]
    loop_start = time.time()
    window = {"tokens": 0, "slots": 0, "flops": 0.0, "t": time.time()}
    run_flops = 0.0
    loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    summary: dict = {}
    grad_norm = None
    skip = stopped_early = False
    model.train()
    with StopRequest() as stop, train_progress(steps, state["step"], enabled=main, console=console) as bar:
        for step, batches in zip(range(state["step"], steps), loader):
            state["micro_index"] += G
            counts = torch.tensor([sum(b.targets.numel() for b in batches), sum(b.tokens for b in batches),
                                   sum(b.slots for b in batches), int(stop.requested),
                                   sum(b.attn_pairs for b in batches)], device=accelerator.device)
            # The step's one host sync: supervised tokens, tokens, slots, attention pairs, and whether
            # any rank must stop, all-reduced. The backward's scale needs the first before it starts;
            # everything else in the step stays on the device (.item() only at logging steps).
            n_sup, n_tok, n_slots, n_stop, n_pairs = accelerator.reduce(counts, reduction="sum").tolist()
            # accelerate divides by G and DDP/DeepSpeed average over ranks: undo both, so the
            # gradient is exactly d(sum of token losses)/d(theta) / n_sup.
            scale = G * world / max(n_sup, 1)
            loss_sum.zero_()
            for batch in batches:
                batch = batch.to(accelerator.device)
                with accelerator.accumulate(model):
                    ce = token_loss_sum(model, batch, head)
                    accelerator.backward(ce * scale)
                    loss_sum += ce.detach()
                    skip = False
                    if accelerator.sync_gradients and (cfg.max_grad_norm > 0 or cfg.skip_nan_steps):
                        grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm or math.inf)
                        # the norm of the synced gradients: every rank takes the same decision
                        skip = cfg.skip_nan_steps and not math.isfinite(_float(grad_norm))
                    if not skip:
                        optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            if skip:
                state["skipped_steps"] = state.get("skipped_steps", 0) + 1
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            state["step"] = step + 1
            state["tokens"] += n_tok
            state["supervised_tokens"] += n_sup
            window["tokens"] += n_tok
            window["slots"] += n_slots
            flops = step_flops(n_tok, n_sup, n_pairs) / world  # per device
            window["flops"] += flops
            run_flops += flops
            last = state["step"] == steps
            saving = bool(cfg.save_steps and state["step"] % cfg.save_steps == 0)
            if state["step"] % cfg.logging_steps == 0 or step == 0 or last or n_stop or saving:
                loss = accelerator.reduce(loss_sum.clone(), reduction="sum").item() / max(n_sup, 1)
                if not math.isfinite(loss) and not skip:  # checked before any save: no NaN checkpoint
                    raise SftkitError(f"the loss became {loss} at step {state['step']}; lower --learning_rate, "
                                      "use bf16 instead of fp16, or pass --skip_nan_steps. "
                                      "Checkpoints saved before this step are kept.")
                now = time.time()
                achieved = window["flops"] / max(now - window["t"], 1e-9)  # FLOPs per second, this window
                record = {
                    "step": state["step"], "epoch": round(schedule.epoch_of(state["micro_index"]), 4),
                    "loss": loss if math.isfinite(loss) else None, "skipped_steps": state.get("skipped_steps", 0),
                    "lr": lr, "grad_norm": _json_float(grad_norm), "tokens": state["tokens"],
                    "supervised_tokens": state["supervised_tokens"],
                    "tokens_per_s": round(window["tokens"] / max(now - window["t"], 1e-9), 1),
                    "padding_efficiency": round(window["tokens"] / max(window["slots"], 1), 4),
                    "tflops_per_device": _sig(achieved / 1e12), "mfu": None if peak is None else _sig(achieved / peak),
                    "rss_mb": rss_mb(), "peak_gpu_mem_gb": peak_gpu_gb(),
                    "elapsed_s": round(now - start_time, 2),
                }
                window.update(tokens=0, slots=0, flops=0.0, t=now)
                log.write(record, step=state["step"])
                bar.update(state["step"], loss=record["loss"] or math.nan, lr=lr, tokens_per_s=record["tokens_per_s"])
            if eval_set is not None and cfg.eval_steps and state["step"] % cfg.eval_steps == 0 and not last:
                ev = evaluate_loss(model, eval_set, accelerator, cfg.per_device_eval_batch_size, pad_id, head)
                log.write({"step": state["step"], "eval_loss": ev["loss"], "eval_ppl": ev["perplexity"]},
                          step=state["step"])
                model.train()
            if n_stop and not last:
                state["elapsed_s"] = time.time() - start_time
                path = save_checkpoint(accelerator, model, tokenizer, cfg, out, state["step"], state)
                log.write({"event": "stopped", "step": state["step"], "checkpoint": str(path)})
                stopped_early = True
                break
            if saving and not last:
                state["elapsed_s"] = time.time() - start_time
                save_checkpoint(accelerator, model, tokenizer, cfg, out, state["step"], state)
    if stopped_early:
        if trackers:
            accelerator.end_training()
        return {"event": "stopped", "step": state["step"], "elapsed_s": round(time.time() - start_time, 2)}

    if eval_set is not None:
        ev = evaluate_loss(model, eval_set, accelerator, cfg.per_device_eval_batch_size, pad_id, head)
        summary.update(eval_loss=ev["loss"], eval_ppl=ev["perplexity"])
        log.write({"step": state["step"], "eval_loss": ev["loss"], "eval_ppl": ev["perplexity"]}, step=state["step"])
    state["elapsed_s"] = time.time() - start_time
    if cfg.save_steps:
        save_checkpoint(accelerator, model, tokenizer, cfg, out, state["step"], state)
    save_model(accelerator, model, tokenizer, cfg, out / "final")
    prints = None if is_zero3(accelerator) else accelerator.gather(
        param_fingerprint(model).to(accelerator.device).unsqueeze(0)).tolist()
    achieved = run_flops / max(time.time() - loop_start, 1e-9)  # this process's steps, evals and saves
    summary.update(event="end", step=state["step"], tokens=state["tokens"],
                   supervised_tokens=state["supervised_tokens"], elapsed_s=round(state["elapsed_s"], 2),
                   tflops_per_device=_sig(achieved / 1e12), mfu=None if peak is None else _sig(achieved / peak),
                   peak_rss_mb=peak_rss_mb(), peak_gpu_mem_gb=peak_gpu_gb(),
                   param_fingerprints=prints, ranks_in_sync=None if prints is None else all(p == prints[0] for p in prints))
    log.write(summary)
    if main:
        from sftkit.report import plot_losses

        plot_losses(out / "metrics.jsonl", out / "loss.png")
    if trackers:
        accelerator.end_training()
    return summary


def _sig(x: float) -> float:
    """Four significant digits: TFLOPS span 1e-3 (a CPU) to 1e3 (a GPU)."""
    return float(f"{x:.4g}")


def _float(x) -> float:
    return math.nan if x is None else float(x.item() if hasattr(x, "item") else x)


def _json_float(x):
    """JSON has no NaN: a missing or non-finite value is written as null."""
    x = _float(x)
    return x if math.isfinite(x) else None
