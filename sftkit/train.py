"""The training loop: one accelerate loop for CPU, one GPU, DDP, DeepSpeed ZeRO-1/2/3 and FSDP2.

    run(cfg) = setup(cfg) -> fit(run) -> finish(run)

  setup       the accelerator, the data, the model, optimizer and schedule, the state (resumed or new)
  train_step  one optimizer step over its micro-batches: the exact loss, backward, clip, step
  fit         the loop, top to bottom; logging, eval and saving are one line each
  finish      the last checkpoint and final/, then the final eval, and the end line of metrics.jsonl

A stop signal (signals.StopRequest) is honoured at step boundaries from the first step to the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sftkit.accel import (
    check_device,
    distributed_type,
    fill_hidden_sizes,
    fsdp_offload,
    is_zero3,
    make_accelerator,
    shards_model,
)
from sftkit.arch.flops import flops_per_step_fn, peak_flops
from sftkit.arch.moe import RouterBalance, router_balance
from sftkit.arch.packed_linear_attention import kernel_warning, linear_attention_path_of
from sftkit.arch.table import text_config
from sftkit.arch.vision import Vision, vision_of
from sftkit.batching import (
    MicroBatch,
    PackedSteps,
    Schedule,
    StepBatches,
    end_workers,
    ignore_stop_signals,
    total_steps,
)
from sftkit.checkpoint import (
    TrainState,
    checkpoint_dir,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    save_final,
)
from sftkit.config import SFTConfig
from sftkit.data.dataset import hold_out, lengths, prepared_dir, spelled_fingerprint
from sftkit.data.prepare import load_prepared, read_manifest
from sftkit.errors import ConfigError, SftkitError
from sftkit.evaluate import evaluate_loss
from sftkit.lock import FolderLock
from sftkit.loss import FusedHead, fused_head, loss_sums
from sftkit.memory_check import check_fits, forecast, resolve_auto_batch
from sftkit.metrics import (
    MetricsLog,
    Throughput,
    as_float,
    json_float,
    param_fingerprint,
    peak_gpu_gb,
    peak_rss_mb,
    rss_mb,
)
from sftkit.models import (
    build_for_training,
    count_parameters,
    experts_note,
    load_image_spec,
    load_tokenizer,
    resolve_model_path,
)
from sftkit.neftune import add_neftune
from sftkit.packing_check import SCAN, check_packing, leak_error, probe_examples
from sftkit.plan import LORA_IMPORT_BYTES
from sftkit.run_dir import Resume, base_identity, claim, find_resume, portable, run_identity, spelled_run_identity
from sftkit.sequence_parallel import SequenceGroup, sequence_group
from sftkit.sharding import clip_grad_norm_, is_sharded, shard
from sftkit.signals import StoppedWaiting, StopRequest


@dataclass
class Run:
    """Everything one training run holds, built by `setup`."""

    cfg: SFTConfig
    accelerator: Any
    model: torch.nn.Module           # wrapped by accelerate (DDP, DeepSpeed engine), or sharded (FSDP2)
    optimizer: Any
    scheduler: torch.optim.lr_scheduler.LRScheduler
    params: list[torch.nn.Parameter]  # the trainable ones
    head: FusedHead | None           # the fused loss head, or None for the plain path
    tokenizer: Any
    train_set: Any                   # datasets.Dataset: input_ids, labels, length
    eval_set: Any | None
    schedule: Schedule
    total_steps: int
    state: TrainState
    step_flops: Callable[[int, int, int], float]  # (tokens, supervised, attention pairs) -> model FLOPs
    peak_flops: float | None         # one device's peak FLOPs/s, for MFU; None: unknown
    start_time: float                # wall clock of step 0, a resumed run's earlier time included
    balance: RouterBalance | None = None  # MoE: the routers' load-balancing term; None: dense or off
    lock: FolderLock | None = None   # the output folder's (run_dir.claim): held while the run lives
    sequence: SequenceGroup | None = None  # sequence parallelism: the processes sharing each row
    saved_step: int | None = None    # the step whose checkpoint is on disk (resumed from or saved)
    log: MetricsLog | None = None    # set by start_outputs
    meter: Throughput | None = None  # set by fit: windows start with the loop
    last_loss: float | None = None   # the last logged train loss, for the end line
    packing_check: dict | None = None  # probe_packing's record, for the start line
    forecast: dict | None = None  # the memory model's prediction (memory_check.py), for the start and end lines
    vision: Vision | None = None  # the data has images: how a micro-batch's become the model's inputs

    @property
    def out(self) -> Path:
        return Path(self.cfg.output_dir)

    @property
    def cuda(self) -> bool:
        """It trains on a GPU: what attn_implementation auto and loss_chunk_size -1 mean depends on it."""
        return self.accelerator.device.type == "cuda"


@dataclass
class StepStats:
    """What one optimizer step did. Counts are over all ranks; the loss stays on the device."""

    loss_sum: torch.Tensor   # this rank's sum of token losses (float64, on the device: no sync)
    aux_sum: torch.Tensor    # this rank's sum over examples of tokens x router balance loss (0 if none)
    routed: int              # tokens of the step's examples, the balance loss's denominator
    supervised: int          # supervised tokens, the loss's denominator
    tokens: int              # real tokens
    slots: int               # token slots, padding included
    attn_pairs: int          # sum of example length^2, for the attention's FLOPs
    stop: bool               # some rank was asked to stop (SIGTERM, Ctrl-C)
    grad_norm: Any           # before clipping; None when neither clipping nor --skip_nan_steps
    skipped: bool            # --skip_nan_steps skipped the update
    lr: float                # the learning rate the step used

    def loss(self, accelerator) -> float:
        """The step's token-mean loss over all ranks (a host sync: logging steps only)."""
        return self.losses(accelerator)[0]

    def losses(self, accelerator) -> tuple[float, float]:
        """The step's token-mean loss and balance loss over all ranks (one host sync: logging steps only)."""
        sums = accelerator.reduce(torch.stack([self.loss_sum, self.aux_sum.double()]), reduction="sum").tolist()
        return sums[0] / max(self.supervised, 1), sums[1] / max(self.routed, 1)


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


def lr_schedule(cfg: SFTConfig) -> Callable[[int, int], float]:
    """(total steps, step) -> the factor on the peak learning rate, as this configuration sets it."""
    def warmup(total: int) -> int:
        return cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total)
    return lambda total, step: lr_lambda(total, warmup(total), cfg.lr_scheduler_type)(step)


def build_optimizer(cfg: SFTConfig, params: list) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay,
                             fused=cfg.fused_adamw or None, foreach=None if cfg.fused_adamw else True)


def apply_optimizer_options(cfg: SFTConfig, optimizer, scheduler, factor: float) -> None:
    """A loaded optimizer and scheduler hold the checkpoint's learning rate, betas, eps and weight
    decay; this run's options win, as the resume report says they do. `factor`: the schedule's
    factor at the step it continues from."""
    for group in optimizer.param_groups:
        group.update(betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay,
                     initial_lr=cfg.learning_rate, lr=cfg.learning_rate * factor)
    scheduler.base_lrs = [cfg.learning_rate] * len(optimizer.param_groups)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # what get_last_lr() reports


# ---- setup --------------------------------------------------------------------------------------
def setup(cfg: SFTConfig, console=None) -> Run:
    """Build the run: accelerator, data, model, optimizer, schedule, and the state to start from.
    The output folder and the checkpoint to resume are checked before the model loads."""
    check_device(cfg, console if int(os.environ.get("RANK", "0")) == 0 else None)
    cfg = resolve_auto_batch(cfg, console)  # before the accelerator: DeepSpeed's batch fields take it
    accelerator = make_accelerator(cfg, log_with=cfg.trackers)
    lock = claim(cfg, accelerator)  # one writer per folder, until this process ends
    with lock.released_on_error():  # a refused start leaves no lock (nor the folder it made)
        return build_run(cfg, accelerator, lock, console)


def build_run(cfg: SFTConfig, accelerator, lock: FolderLock, console=None) -> Run:
    """setup's work once the output folder is this run's."""
    from accelerate.utils import set_seed

    set_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model_name_or_path, cfg.trust_remote_code, cfg.chat_template)
    image_spec = load_image_spec(cfg.model_name_or_path, tokenizer)  # None: a text model
    train_set, eval_set, manifest = load_sets(cfg, accelerator, tokenizer, console, image_spec)
    images = "images" in train_set.column_names or (eval_set is not None and "images" in eval_set.column_names)
    if images and image_spec is None:
        raise ConfigError(f"the training data has images, but {cfg.model_name_or_path} is a text model (no image "
                          "processor, preprocessor_config.json); train a vision-language model on it (Qwen3.5, Qwen3-VL)")
    if images and accelerator.is_main_process and console is not None:
        console.print(images_note(manifest, cfg.train_vision), highlight=False)
    if images and cfg.sequence_parallel_size > 1:
        raise ConfigError(f"--sequence_parallel_size {cfg.sequence_parallel_size} splits packed rows over processes, "
                          "and an image's tokens must stay with its pixels; train data with images without it")
    data_fp = manifest["fingerprint"]
    forecast = predict_memory(cfg, manifest)  # refused here, before the model loads, if it will not fit
    sequence = sequence_group(cfg, accelerator)  # None unless --sequence_parallel_size > 1
    # each sequence group of N processes trains one data-parallel share of the step
    schedule = Schedule(lengths(train_set), cfg.per_device_train_batch_size,
                        accelerator.num_processes // cfg.sequence_parallel_size, cfg.gradient_accumulation_steps,
                        cfg.seed, cfg.packing, cfg.max_length, cfg.group_by_length)
    steps = total_steps(schedule, cfg.num_train_epochs, cfg.max_steps)
    check_step_size(cfg, schedule, console if accelerator.is_main_process else None)
    if cfg.warmup_steps and cfg.warmup_ratio and accelerator.is_main_process and console is not None:
        console.print(f"note: warm-up is --warmup_steps {cfg.warmup_steps}; --warmup_ratio {cfg.warmup_ratio} "
                      "is not used", highlight=False)
    with accelerator.main_process_first():  # the tiny preset is built once, by rank 0, not by two at once
        base = resolve_model_path(cfg.model_name_or_path)
    state = TrainState(total_steps=steps, run_id=run_identity(cfg, data_fp, accelerator.num_processes),
                       data_fingerprint=data_fp, base_model=base, base_hash=base_identity(base))
    resume = find_resume(cfg, state, lr_schedule(cfg), lambda: spelled_run_identity(
        cfg, spelled_fingerprint(cfg.data_options(), cfg.data_path, tokenizer, cfg.mixing()),
        accelerator.num_processes)) if cfg.resume_from_checkpoint else None
    cuda = accelerator.device.type == "cuda"  # Run.cuda, before there is a Run
    model = build_for_training(cfg, cuda, sequence, images)  # auto attention: varlen on a GPU
    add_neftune(model, cfg.neftune_noise_alpha)  # train mode only: eval and final/ never see it
    trainable, total = count_parameters(model)
    if shards_model(accelerator):  # FSDP2: sharded here, before the optimizer sees its parameters
        model = shard(model, cfg.bf16, accelerator.device.type, fsdp_offload())
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg, params)
    fill_hidden_sizes(accelerator, model.config)
    if is_sharded(model):  # prepare() would wrap it in DDP: only the optimizer goes through it
        optimizer = accelerator.prepare(optimizer)
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    # Not passed to prepare(): accelerate would step it once per process per optimizer step.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(lr_schedule(cfg), steps))
    if resume:
        # the counters continue; the identity, length and data are this configuration's from now on
        loaded = load_checkpoint(accelerator, resume.path, scheduler, model, optimizer)
        state = dataclasses.replace(loaded, total_steps=steps, run_id=state.run_id, data_fingerprint=data_fp,
                                    base_model=state.base_model, base_hash=state.base_hash)
        apply_optimizer_options(cfg, optimizer, scheduler, lr_schedule(cfg)(steps, state.step))
        if accelerator.is_main_process and console is not None:
            report_resume(resume, steps, console)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    chunk = cfg.loss_chunk(cuda, text_config(unwrapped.config).vocab_size)
    run = Run(cfg, accelerator, model, optimizer, scheduler, params,
              fused_head(unwrapped, accelerator.mixed_precision, is_zero3(accelerator), chunk, cuda),
              tokenizer, train_set, eval_set, schedule, steps, state,
              flops_per_step_fn(unwrapped.config, cfg.use_lora), peak_flops(device, cfg.mfu_peak_tflops),
              start_time=time.time() - state.elapsed_s, lock=lock, saved_step=state.step if resume else None,
              balance=router_balance(unwrapped.config, cfg.router_aux_loss_coef), sequence=sequence,
              forecast=forecast, vision=vision_of(unwrapped.config, image_spec.processor,
                                                  tokenizer.convert_tokens_to_ids(image_spec.token)) if images else None)
    if sequence is not None and run.balance is not None:
        raise ConfigError(f"--sequence_parallel_size {sequence.size}: the MoE balance loss is computed per example, "
                          "and an example's tokens are split over processes here; add --router_aux_loss_coef 0")
    run.packing_check = probe_packing(run)  # a leak stops here, before anything is written
    start_outputs(run, trainable, total, resumed=state.step if resume else None, console=console)
    return run


def probe_packing(run: Run) -> dict | None:
    """--packing_check: a few examples packed and each alone must agree to round-off (packing_check.py).
    The start line's record; None without packing."""
    cfg = run.cfg
    if not cfg.packing:
        return None
    if not cfg.packing_check:
        return {"skipped": "--packing_check false"}
    if run.sequence is not None:
        return {"skipped": "sequence parallelism: each row is split over processes"}
    first = run.train_set.select(range(min(SCAN, len(run.train_set))))  # not the whole column: it picks among these
    chosen = probe_examples(lengths(first), cfg.max_length)
    if len(chosen) < 2:
        return {"skipped": "no two of the first examples fit one row"}
    model = run.accelerator.unwrap_model(run.model)
    half = run.accelerator.mixed_precision != "no" or next(model.parameters()).dtype != torch.float32
    check = check_packing(run.model, model.config, [run.train_set[i] for i in chosen], run.tokenizer.pad_token_id,
                          cfg.padding_free(run.cuda), run.accelerator.device, run.head, half, run.vision)
    if check.leaked:
        raise leak_error(check)
    return check.record()


def images_note(manifest: dict, train_vision: str) -> str:
    """`images: 10 examples hold 13 images; the vision tower is frozen (...)`: what of the run sees images."""
    shown = manifest.get("images") or {}
    what = {"frozen": "the vision tower is frozen (--train_vision merger or tower trains it)",
            "merger": "the vision tower's merger trains, the rest of it is frozen",
            "tower": "the whole vision tower trains"}[train_vision]
    return (f"images: {shown.get('examples_with_images', 0):,} examples of the training data hold "
            f"{shown.get('images', 0):,} images; {what}; the memory forecast counts the language model only "
            "(not the tower's weights, activations or the pixels)")


def load_sets(cfg: SFTConfig, accelerator, tokenizer, console=None, image_spec=None):
    """(train set, eval set or None, the train set's manifest), prepared on rank 0 first; the
    other ranks then find its cache. `image_spec`: the model's image processor, for rows with images."""
    main, opts = accelerator.is_main_process, cfg.data_options()
    with accelerator.main_process_first():
        train_dir = prepared_dir(opts, cfg.data_path, tokenizer, console if main else None, cfg.mixing(),
                                 image_spec=image_spec)
        eval_dir = prepared_dir(opts, [cfg.eval_data_path], tokenizer, console if main else None,
                                label="eval data", image_spec=image_spec) if cfg.eval_data_path else None
    manifest = read_manifest(train_dir)
    train_set = load_prepared(train_dir)
    check_lengths(cfg, train_dir, manifest.get("length", {}).get("max") or max(lengths(train_set), default=0))
    eval_set = load_prepared(eval_dir) if eval_dir else None
    if cfg.val_size:
        train_set, eval_set = hold_out(train_set, cfg.val_size, cfg.seed, console if main else None)
    return train_set, eval_set, manifest


def predict_memory(cfg: SFTConfig, manifest: dict) -> dict | None:
    """The memory model's peak for this process (its start-up memory measured now, on a CPU),
    checked against the device: a run that will not fit stops here. The start line's record."""
    framework = None
    if not torch.cuda.is_available() and (now := rss_mb()) is not None:
        import sys

        framework = now * 2**20 + (LORA_IMPORT_BYTES if cfg.use_lora and "peft" not in sys.modules else 0)
    est = forecast(cfg, manifest, framework)
    check_fits(cfg, est, manifest)
    return est.record() if est else None


def check_lengths(cfg: SFTConfig, train_dir: Path, longest: int) -> None:
    """A prepared set's examples fit this run's max_length, so config.yaml's max_length is the one
    trained under. Refused, naming both ways out."""
    if longest > cfg.max_length:
        raise SftkitError(f"{train_dir} holds examples of up to {longest} tokens, longer than --max_length "
                          f"{cfg.max_length}: prepare the data again with --max_length {cfg.max_length} (its length "
                          f"policy then applies), or train with --max_length {longest} or more")


def check_step_size(cfg: SFTConfig, schedule: Schedule, console=None) -> None:
    """Every epoch ends an optimizer step, so a step asked to hold more than the data holds the
    whole epoch, in micro-batches that are mostly empty. Said at the start, with the accumulation
    that fits."""
    units = len(schedule.units)
    if schedule.step_size <= units or console is None:
        return
    what = "packed rows" if cfg.packing else "examples"
    fit = max(1, units // (cfg.per_device_train_batch_size * schedule.world))
    console.print(f"[yellow]warning: one optimizer step asks for {schedule.step_size} {what} "
                  f"({cfg.gradient_accumulation_steps} micro-batches of {cfg.per_device_train_batch_size} on "
                  f"{schedule.world} process(es)) but an epoch holds {units}: each step is the whole epoch and most "
                  f"of its micro-batches are empty; --gradient_accumulation_steps {fit} fills them[/yellow]",
                  highlight=False)


def report_resume(resume: Resume, steps: int, console) -> None:
    """Say which checkpoint the run continues from and what changed since it was written."""
    for skipped in resume.skipped:
        console.print(f"[yellow]skipped damaged {skipped}[/yellow]", highlight=False)
    console.print(f"resuming from {resume.path}: step {resume.saved.step} of {steps}", highlight=False)
    if resume.saved.step == steps:
        console.print("its steps are done but final/ was not written (its save failed): writing it now",
                      highlight=False)
    if resume.changes:
        what = "changed since that checkpoint" if resume.same_run else \
            "[yellow]warning: this is not the run that wrote it, so it will not continue exactly; these values " \
            "apply from here on[/yellow]"
        console.print(f"{what}: {'; '.join(resume.changes)}", highlight=False)


def start_outputs(run: Run, trainable: int, total: int, resumed: int | None, console=None) -> None:
    """config.yaml, the trackers, and metrics.jsonl with its start line."""
    cfg, acc = run.cfg, run.accelerator
    if acc.is_main_process:
        run.out.mkdir(parents=True, exist_ok=True)
        portable(cfg).save_yaml(run.out / "config.yaml")  # absolute paths: the resume command works anywhere
    if cfg.trackers:
        # trackers take scalars only: lists become comma-separated text, None an empty string
        flat = {k: ",".join(map(str, v)) if isinstance(v, list) else "" if v is None else v
                for k, v in cfg.to_dict().items()}
        acc.init_trackers(cfg.run_name or run.out.name, config=flat)
    model = acc.unwrap_model(run.model)
    for note in (experts_note(cfg, model.config), kernel_warning(model, run.cuda)):
        if note and console is not None and acc.is_main_process:
            console.print(note, highlight=False)
    run.log = MetricsLog(acc, run.out / "metrics.jsonl", resumed, console)
    run.log.write({
        "event": "start", "world_size": acc.num_processes,
        "distributed_type": "FSDP" if is_sharded(run.model) else distributed_type(acc),
        "fsdp_cpu_offload": fsdp_offload() if is_sharded(run.model) else None,
        "sequence_parallel_size": cfg.sequence_parallel_size,
        "mixed_precision": acc.mixed_precision, "num_examples": len(run.train_set),
        "val_examples": len(run.eval_set) if cfg.val_size else None, "rows_per_epoch": len(run.schedule.units), "total_steps": run.total_steps, "trainable_params": trainable,
        "total_params": total, "resumed_from_step": resumed, "fused_loss": run.head is not None,
        "loss_chunk_rows": run.head.chunk if run.head else None,
        "attention": cfg.attention(run.cuda),
        "linear_attention": linear_attention_path_of(model, run.cuda, cfg.packing, cfg.padding_free(run.cuda)),
        "packing_check": run.packing_check, "memory_forecast": run.forecast,
        **({"router_aux_loss_coef": run.balance.coef} if run.balance else {}),  # what -1 (the config's) resolved to
    }, first=True)


def step_batches(run: Run) -> StepBatches:
    """Item k: this rank's micro-batches of optimizer step k."""
    size, index = (run.sequence.size, run.sequence.index) if run.sequence else (1, 0)
    return StepBatches(run.train_set, run.schedule, run.cfg.gradient_accumulation_steps,
                       run.accelerator.process_index // size, run.tokenizer.pad_token_id, run.cfg.packing,
                       run.cfg.padding_free(run.cuda), (size, index), run.vision)


def step_loader(run: Run, stop: StopRequest | None = None):
    """The remaining steps' micro-batches, collated ahead in `dataloader_num_workers` processes
    and handed over packed (one tensor a step). While it waits, a stop signal ends the wait."""
    batches = iter(data_loader(run))
    alone = run.accelerator.num_processes == 1  # several ranks must agree on the stop (train_step's all-reduce)
    try:
        while True:
            if stop is not None and stop.requested and alone:  # it came during the last step: a wait for
                raise StoppedWaiting()                          # data may never end (a stuck worker)
            if stop is not None:
                stop.waiting = True
            try:
                packed = next(batches)
            except StopIteration:
                return
            except (EOFError, ConnectionError) as err:  # a worker killed while it handed a batch over
                raise worker_died(err) from None
            finally:
                if stop is not None:
                    stop.waiting = False
            yield packed.unpack()
    finally:  # the loop ended (done, stopped, failed): no worker may outlive it
        end_workers(batches)


def worker_died(err: BaseException) -> SftkitError:
    said = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
    return SftkitError(f"the data worker process died ({said}); run again with --dataloader_num_workers 0 to see "
                       "the cause in the training process")


def data_loader(run: Run) -> torch.utils.data.DataLoader:
    workers = run.cfg.dataloader_num_workers
    return torch.utils.data.DataLoader(
        PackedSteps(step_batches(run)), sampler=range(run.state.step, run.total_steps), batch_size=None,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(), prefetch_factor=2 if workers else None,
        worker_init_fn=ignore_stop_signals,
        # its own generator: starting an iterator draws a worker seed, and a draw from the global RNG
        # would shift the dropout masks of a resumed run
        generator=torch.Generator().manual_seed(run.cfg.seed))


# ---- one step -----------------------------------------------------------------------------------
def train_step(run: Run, batches: list[MicroBatch], stop: bool = False) -> StepStats:
    """One optimizer step: gradient of (sum of token losses) / (supervised tokens of the whole step,
    all micro-batches, all ranks), clipped, applied; then the scheduler steps."""
    acc, cfg = run.accelerator, run.cfg
    counts = torch.tensor([sum(b.targets.numel() for b in batches), sum(b.tokens for b in batches),
                           sum(b.slots for b in batches), int(stop), sum(b.attn_pairs for b in batches),
                           sum(b.counted_tokens for b in batches)], device=acc.device)
    # The step's one host sync: supervised tokens, tokens, slots, whether any rank must stop,
    # attention pairs and the examples' tokens, all-reduced. The backward's scales need the first
    # and the last before it starts; everything else in the step stays on the device (.item() only
    # at logging steps).
    n_sup, n_tok, n_slots, n_stop, n_pairs, n_routed = acc.reduce(counts, reduction="sum").tolist()
    # accelerate divides by the accumulation steps and DDP/DeepSpeed/FSDP2 average over ranks: undo both,
    # so the gradient is exactly d(sum of token losses / n_sup + coef * balance loss)/d(theta).
    scale = cfg.gradient_accumulation_steps * acc.num_processes / max(n_sup, 1)
    coef = run.balance.coef if run.balance else 0.0
    aux_scale = coef * cfg.gradient_accumulation_steps * acc.num_processes / max(n_routed, 1)
    loss_sum = torch.zeros((), dtype=torch.float64, device=acc.device)
    aux_sum = torch.zeros((), dtype=torch.float32, device=acc.device)
    grad_norm, skip = None, False
    clip = clip_grad_norm_ if is_sharded(run.model) else acc.clip_grad_norm_  # FSDP2: DTensor shards
    for batch in batches:
        batch = batch.to(acc.device)
        with acc.accumulate(run.model):
            ce, aux = loss_sums(run.model, batch, run.head, run.balance)
            acc.backward(ce * scale if aux is None else ce * scale + aux * aux_scale)
            loss_sum += ce.detach()
            aux_sum += 0 if aux is None else aux.detach()
            if acc.sync_gradients and (cfg.max_grad_norm > 0 or cfg.skip_nan_steps):
                grad_norm = clip(run.params, cfg.max_grad_norm or math.inf)
                # the norm of the synced gradients: every rank takes the same decision
                skip = cfg.skip_nan_steps and not math.isfinite(as_float(grad_norm))
            if not skip:
                run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
    lr = run.scheduler.get_last_lr()[0]
    run.scheduler.step()
    return StepStats(loss_sum, aux_sum, int(n_routed), int(n_sup), int(n_tok), int(n_slots), int(n_pairs), bool(n_stop),
                     grad_norm, skip, lr)


# ---- the loop -----------------------------------------------------------------------------------
def fit(run: Run, console=None, stop: StopRequest | None = None) -> bool:
    """Train to the last step; False when a stop signal ended the run early (a checkpoint is saved).
    `stop`: the signal handling of the caller (run() keeps it on through finish), or fit's own."""
    from sftkit.progress import train_progress

    cfg, state = run.cfg, run.state
    run.model.train()
    run.meter = Throughput(run.peak_flops)
    main = run.accelerator.is_main_process
    with contextlib.nullcontext(stop) if stop else StopRequest() as signals, \
            train_progress(run.total_steps, state.step, enabled=main, console=console) as bar:
        try:
            for batches in step_loader(run, signals):
                stats = train_step(run, batches, signals.requested)
                state.advance(cfg.gradient_accumulation_steps, stats.tokens, stats.supervised, stats.skipped)
                check_skipped(run)
                run.meter.add(stats.tokens, stats.slots, run.step_flops(stats.tokens, stats.supervised,
                                                                        stats.attn_pairs) / run.accelerator.num_processes)
                last = state.step == run.total_steps
                saving = bool(cfg.save_steps) and state.step % cfg.save_steps == 0
                if state.step % cfg.logging_steps == 0 or state.step == 1 or last or stats.stop or saving:
                    log_step(run, stats, bar)
                if run.eval_set is not None and cfg.eval_steps and state.step % cfg.eval_steps == 0 and not last:
                    log_eval(run, bar=bar)
                if stats.stop and not last:
                    return save_and_stop(run, signals)
                if saving and not last:
                    save(run)
        except StoppedWaiting:
            return stopped_waiting(run, signals)
    return True


# --skip_nan_steps rides out a rare overflow; a run that skips more than this share of its steps
# (after SKIP_GRACE of them) is diverging, and stops rather than go on skipping.
MAX_SKIPPED_SHARE = 0.1
SKIP_GRACE = 10


def check_skipped(run: Run) -> None:
    state = run.state
    if state.step >= SKIP_GRACE and state.skipped_steps > MAX_SKIPPED_SHARE * state.step:
        raise SftkitError(f"training diverged: {state.skipped_steps} of the first {state.step} steps had a nan or inf "
                          f"gradient and were skipped (--skip_nan_steps allows {MAX_SKIPPED_SHARE:.0%}). "
                          f"{last_finite(run)} Lower --learning_rate, use bf16 instead of fp16, or check the data")


def stopped_waiting(run: Run, stop: StopRequest) -> bool:
    """A signal ended the wait for the next step's data. One process saves the step it finished
    and returns False (stopped); several cannot (the others may be inside the next step's
    collectives), so each stops, naming the last checkpoint."""
    if run.accelerator.num_processes > 1:
        raise SftkitError(f"stopped by {stop.signal} while waiting for the data of step {run.state.step + 1}. "
                          f"{last_finite(run)} Resume with --resume_from_checkpoint latest")
    return save_and_stop(run, stop)


def save_and_stop(run: Run, stop: StopRequest) -> bool:
    """checkpoint-N of the step just finished and the stopped line of metrics.jsonl; False for fit."""
    run.log.write({"event": "stopped", "step": run.state.step, "checkpoint": str(save(run)),
                   "signal": stop.signal or "on another rank"})
    return False


def log_step(run: Run, stats: StepStats, bar) -> None:
    """One line of metrics.jsonl (and the trackers, and the progress bar). Stops on a NaN loss
    before any save, so no checkpoint holds it."""
    state = run.state
    loss, aux = stats.losses(run.accelerator)
    if not math.isfinite(loss) and not stats.skipped:
        raise SftkitError(f"training diverged at step {state.step}: the loss became {loss}. {last_finite(run)} "
                          "Lower --learning_rate, use bf16 instead of fp16, or pass --skip_nan_steps")
    record = {
        "step": state.step, "epoch": round(run.schedule.epoch_of(state.micro_index), 4),
        "loss": loss if math.isfinite(loss) else None, "skipped_steps": state.skipped_steps,
        **({"aux_loss": json_float(aux)} if run.balance else {}),
        "lr": stats.lr, "grad_norm": json_float(stats.grad_norm), "tokens": state.tokens,
        "supervised_tokens": state.supervised_tokens, **run.meter.window(),
        "rss_mb": rss_mb(), "peak_gpu_mem_gb": peak_gpu_gb(), "elapsed_s": round(time.time() - run.start_time, 2),
    }
    run.log.write(record, step=state.step)
    run.last_loss = record["loss"]
    bar.update(state.step, loss=record["loss"] or math.nan, lr=stats.lr, tokens_per_s=record["tokens_per_s"])


def log_eval(run: Run, stop: StopRequest | None = None, bar=None) -> dict | None:
    """Eval loss and perplexity on the eval set, logged at this step (and shown on `bar`); the model
    goes back to train mode. With `stop`, a stop signal cuts the eval short (on every rank) and it
    returns None."""
    if bar is not None:
        bar.eval_started()
    ev = evaluate_loss(run.model, run.eval_set, run.accelerator, run.cfg.per_device_eval_batch_size,
                       run.tokenizer.pad_token_id, run.head, should_stop=stop and (lambda: stop.requested),
                       vision=run.vision)
    if ev is not None:
        run.log.write({"step": run.state.step, "eval_loss": ev["loss"], "eval_ppl": ev["perplexity"]},
                      step=run.state.step)
        if bar is not None:
            bar.eval_done(run.state.step, ev["loss"], ev["perplexity"])
    run.model.train()
    return ev


def save(run: Run) -> Path:
    """checkpoint-N for the current step, written only from finite weights and optimizer state."""
    if not state_is_finite(run):
        unsaved = checkpoint_dir(run.out, run.state.step).name
        raise SftkitError(f"training diverged at step {run.state.step}: a weight or an optimizer moment became "
                          f"nan or inf, so {unsaved} was not written. {last_finite(run)} "
                          "Lower --learning_rate, use bf16 instead of fp16, or pass --skip_nan_steps")
    run.state.elapsed_s = time.time() - run.start_time
    path = save_checkpoint(run.accelerator, run.model, run.tokenizer, run.cfg, run.out, run.state, run.scheduler,
                           run.optimizer)
    run.saved_step = run.state.step
    return path


def state_is_finite(run: Run) -> bool:
    """Every trainable weight and optimizer tensor finite, on every rank (one all-reduce). Under
    FSDP2 each rank checks its own shards (DTensor.to_local), and the all-reduce covers them all."""
    device = run.accelerator.device
    tensors = [p.detach() for p in run.params]
    tensors += [v for st in getattr(run.optimizer, "state", {}).values() for v in st.values()
                if torch.is_tensor(v) and v.is_floating_point()]
    tensors = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    bad = torch.stack([(~torch.isfinite(t).all()).to(device) for t in tensors]).sum() if tensors else \
        torch.zeros((), device=device)
    return run.accelerator.reduce(bad.long(), reduction="sum").item() == 0


def last_finite(run: Run) -> str:
    """Which checkpoint to go back to: every checkpoint this run wrote was checked finite."""
    kept = list_checkpoints(run.out)
    return f"The last checkpoint, {kept[-1]}, holds finite weights." if kept else "No checkpoint was written before it."


# ---- the end ------------------------------------------------------------------------------------
def finish(run: Run, stop: StopRequest | None = None, console=None) -> dict:
    """The last checkpoint and final/ (written first, atomically), then the final eval (which a
    stop signal cuts short, and `console` names while it runs); the summary, also the last line
    of metrics.jsonl."""
    from sftkit.progress import eval_status

    acc, state, summary = run.accelerator, run.state, {}
    state.elapsed_s = time.time() - run.start_time
    if run.saved_step != state.step:  # kept until final/ is complete: a failed final save is resumable
        save(run)
    save_final(acc, run.model, run.tokenizer, run.cfg, run.out, state.step)
    if not run.cfg.save_steps and acc.is_main_process:  # save_steps 0 keeps no checkpoint once final/ is there
        shutil.rmtree(checkpoint_dir(run.out, state.step), ignore_errors=True)
    if run.eval_set is not None:
        with eval_status(console if acc.is_main_process else None):
            ev = log_eval(run, stop)
        if ev is None:
            summary["final_eval"] = f"skipped: stopped by {stop.signal or 'a signal on another rank'}"
        else:
            summary.update(eval_loss=ev["loss"], eval_ppl=ev["perplexity"])
    prints = None if is_zero3(acc) or is_sharded(run.model) else acc.gather(
        param_fingerprint(run.model).to(acc.device).unsqueeze(0)).tolist()
    rss_mb = peak_rss_mb()
    rss = acc.gather(torch.tensor([rss_mb or 0.0], dtype=torch.float64, device=acc.device)).tolist()
    summary.update(event="end", step=state.step, train_loss=run.last_loss, skipped_steps=state.skipped_steps,
                   tokens=state.tokens,
                   supervised_tokens=state.supervised_tokens,
                   elapsed_s=round(state.elapsed_s, 2), **run.meter.whole_run(),
                   peak_rss_mb=rss_mb, peak_rss_mb_per_rank=rss, peak_gpu_mem_gb=peak_gpu_gb(),
                   predicted_peak_mb=run.forecast["peak_mb"] if run.forecast else None,
                   param_fingerprints=prints,
                   ranks_in_sync=None if prints is None else all(p == prints[0] for p in prints))
    run.log.write(summary)
    if acc.is_main_process:
        from sftkit.report import plot_losses

        plot_losses(run.out / "metrics.jsonl", run.out / "loss.png")
    if summary["ranks_in_sync"] is False:  # every rank holds the gathered fingerprints: all stop here
        raise SftkitError(f"the {len(prints)} ranks ended with different weights (fingerprints {prints}): they did not "
                          "train as one model, so final/ holds rank 0's alone. Check that every process was started "
                          "by the same launch with the same options (see README: several processes)")
    return summary


def run(cfg: SFTConfig, console=None) -> dict:
    """Train as `cfg` says; returns the final summary (also the last line of metrics.jsonl)."""
    r = setup(cfg, console)
    try:
        with StopRequest() as stop:  # the end of the run is as protected as its steps
            if not fit(r, console, stop):
                return {"event": "stopped", "step": r.state.step, "elapsed_s": round(time.time() - r.start_time, 2),
                        "checkpoint": str(checkpoint_dir(r.out, r.state.step))}
            return finish(r, stop, console)
    except RuntimeError as err:
        # torch raises this from its SIGCHLD handler, wherever the loop is, within seconds of the death
        if "DataLoader worker" not in str(err):
            raise
        raise worker_died(err) from None
    finally:
        if cfg.trackers:
            r.accelerator.end_training()
        r.lock.release()
