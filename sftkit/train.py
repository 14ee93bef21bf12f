"""The training loop: one accelerate loop for CPU, one GPU, DDP and DeepSpeed ZeRO-1/2/3."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from sftkit.accel import distributed_type, is_zero3, make_accelerator
from sftkit.batching import Plan, load_micro_batch, micro_batch_indices
from sftkit.checkpoint import load_checkpoint, resolve_resume, save_checkpoint, save_model
from sftkit.config import SFTConfig
from sftkit.data.prepare import load_prepared
from sftkit.dataset import prepared_dir
from sftkit.errors import SftkitError
from sftkit.evaluate import evaluate_loss
from sftkit.loss import token_loss_sum
from sftkit.models import build_for_training, count_parameters, load_tokenizer


def lr_lambda(total_steps: int, warmup: int, kind: str):
    def f(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total_steps - warmup)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0
    return f


class MetricsLog:
    """metrics.jsonl (always) plus accelerate's trackers; main process only."""

    def __init__(self, accelerator, path: Path, resume: bool):
        self.accelerator, self.path = accelerator, path
        if accelerator.is_main_process and not resume:
            path.unlink(missing_ok=True)

    def write(self, record: dict, step: int | None = None) -> None:
        if self.accelerator.is_main_process:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if step is not None:
            self.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)


def param_fingerprint(model) -> torch.Tensor:
    """Sum and sum of squares of the trainable weights, in float64: equal on every rank when the
    ranks are in sync (the check that catches a launch where each rank trains alone)."""
    total = torch.zeros(2, dtype=torch.float64)
    for p in model.parameters():
        if p.requires_grad:
            w = p.detach().double().cpu()
            total += torch.stack([w.sum(), (w * w).sum()])
    return total


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

    model = build_for_training(cfg)
    trainable, total = count_parameters(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
    plan = Plan.make(len(train_set), cfg.per_device_train_batch_size, world, cfg.gradient_accumulation_steps,
                     cfg.num_train_epochs, cfg.max_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    warmup = math.ceil(cfg.warmup_ratio * plan.total_steps)
    # Not passed to prepare(): accelerate would step it once per process per optimizer step.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(plan.total_steps, warmup, cfg.lr_scheduler_type))
    accelerator.register_for_checkpointing(scheduler)

    state = {"step": 0, "micro_index": 0, "tokens": 0, "supervised_tokens": 0, "elapsed_s": 0.0}
    if cfg.resume_from_checkpoint:
        ckpt = resolve_resume(cfg.resume_from_checkpoint, out)
        state = load_checkpoint(accelerator, ckpt)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save_yaml(out / "config.yaml")
    if trackers:
        accelerator.init_trackers(cfg.run_name or out.name, config=cfg.to_dict())
    log = MetricsLog(accelerator, out / "metrics.jsonl", resume=bool(cfg.resume_from_checkpoint))
    log.write({
        "event": "start", "world_size": world, "distributed_type": distributed_type(accelerator),
        "mixed_precision": accelerator.mixed_precision, "num_examples": len(train_set),
        "total_steps": plan.total_steps, "trainable_params": trainable, "total_params": total,
        "resumed_from_step": state["step"],
    })

    from sftkit.progress import train_progress

    pad_id = tokenizer.pad_token_id
    G = cfg.gradient_accumulation_steps
    start_time, window = time.time() - state["elapsed_s"], {"tokens": 0, "t": time.time()}
    loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    summary: dict = {}
    grad_norm = None
    model.train()
    with train_progress(plan.total_steps, state["step"], enabled=main, console=console) as bar:
        for step in range(state["step"], plan.total_steps):
            batches = [
                load_micro_batch(train_set, micro_batch_indices(plan, cfg.seed, state["micro_index"] + i, rank, world),
                                 fallback=0, pad_id=pad_id)
                for i in range(G)
            ]
            state["micro_index"] += G
            counts = torch.tensor([sum(int(b["targets"].numel()) for b in batches),
                                   sum(int(b["attention_mask"].sum()) for b in batches)], device=accelerator.device)
            n_sup, n_tok = accelerator.reduce(counts, reduction="sum").tolist()  # one all-reduce per step
            # accelerate divides by G and DDP/DeepSpeed average over ranks: undo both, so the
            # gradient is exactly d(sum of token losses)/d(theta) / n_sup.
            scale = G * world / max(n_sup, 1)
            loss_sum.zero_()
            for batch in batches:
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                with accelerator.accumulate(model):
                    ce = token_loss_sum(model, batch)
                    accelerator.backward(ce * scale)
                    loss_sum += ce.detach()
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm) \
                            if cfg.max_grad_norm > 0 else None
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            state["step"] = step + 1
            state["tokens"] += n_tok
            state["supervised_tokens"] += n_sup
            window["tokens"] += n_tok
            last = state["step"] == plan.total_steps
            if state["step"] % cfg.logging_steps == 0 or step == 0 or last:
                loss = accelerator.reduce(loss_sum.clone(), reduction="sum").item() / max(n_sup, 1)
                if not math.isfinite(loss):
                    raise SftkitError(f"the loss became {loss} at step {state['step']}; lower --learning_rate, "
                                      "or use bf16 instead of fp16. The last checkpoint is kept.")
                now = time.time()
                record = {
                    "step": state["step"], "epoch": round(plan.epoch_of(state["micro_index"]), 4), "loss": loss,
                    "lr": lr, "grad_norm": _float(grad_norm), "tokens": state["tokens"],
                    "supervised_tokens": state["supervised_tokens"],
                    "tokens_per_s": round(window["tokens"] / max(now - window["t"], 1e-9), 1),
                    "elapsed_s": round(now - start_time, 2),
                }
                window.update(tokens=0, t=now)
                log.write(record, step=state["step"])
                bar.update(state["step"], loss=loss, lr=lr, tokens_per_s=record["tokens_per_s"])
            if eval_set is not None and cfg.eval_steps and state["step"] % cfg.eval_steps == 0 and not last:
                ev = evaluate_loss(model, eval_set, accelerator, cfg.per_device_eval_batch_size, pad_id)
                log.write({"step": state["step"], "eval_loss": ev["loss"], "eval_ppl": ev["perplexity"]},
                          step=state["step"])
                model.train()
            if cfg.save_steps and state["step"] % cfg.save_steps == 0 and not last:
                state["elapsed_s"] = time.time() - start_time
                save_checkpoint(accelerator, model, tokenizer, cfg, out, state["step"], state)

    if eval_set is not None:
        ev = evaluate_loss(model, eval_set, accelerator, cfg.per_device_eval_batch_size, pad_id)
        summary.update(eval_loss=ev["loss"], eval_ppl=ev["perplexity"])
    state["elapsed_s"] = time.time() - start_time
    if cfg.save_steps:
        save_checkpoint(accelerator, model, tokenizer, cfg, out, state["step"], state)
    save_model(accelerator, model, tokenizer, cfg, out / "final")
    prints = None if is_zero3(accelerator) else accelerator.gather(
        param_fingerprint(model).to(accelerator.device).unsqueeze(0)).tolist()
    summary.update(event="end", step=state["step"], tokens=state["tokens"],
                   supervised_tokens=state["supervised_tokens"], elapsed_s=round(state["elapsed_s"], 2),
                   param_fingerprints=prints, ranks_in_sync=None if prints is None else all(p == prints[0] for p in prints))
    log.write(summary)
    if trackers:
        accelerator.end_training()
    return summary


def _float(x):
    if x is None:
        return None
    return float(x.item() if hasattr(x, "item") else x)
