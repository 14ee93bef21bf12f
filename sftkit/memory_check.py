"""A run's predicted peak memory (sftkit/plan.py), before its model loads: refused in one line when
it will not fit, `--per_device_train_batch_size auto` resolved, and the forecast metrics.jsonl keeps."""

from __future__ import annotations

import dataclasses
import os

from sftkit.accel import launch_backend, launched_processes
from sftkit.config import SFTConfig
from sftkit.errors import ConfigError
from sftkit.options import AUTO, default_of
from sftkit.plan import (
    Device,
    Estimate,
    estimate,
    gpu_device,
    host_memory,
    human,
    knobs_of,
    largest_micro_batch,
    plan,
    read_config,
    strategy_of,
    workload_of,
)

ALTERNATIVES = 3  # strategies a refusal names


def this_device() -> Device:
    """One process's device: its GPU, or this machine's memory shared by the processes on it."""
    import torch

    local = int(os.environ.get("LOCAL_WORLD_SIZE", launched_processes()))
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", "0")))
        return gpu_device(props.name, launched_processes(), float(props.total_memory))
    return Device("cpu", local, float(host_memory() or 0))


def forecast(cfg: SFTConfig, manifest: dict | None = None, framework: float | None = None,
             device: Device | None = None) -> Estimate | None:
    """This run's predicted peak per process; None where the model's config cannot be read without
    loading it (a Hub id the built-in table does not hold, with no local copy)."""
    try:
        config = read_config(cfg.model_name_or_path)
        if config is None:
            return None
        device = device or this_device()
        backend, offload = launch_backend(launched_processes())
        return estimate(config, strategy_of(cfg, backend, offload), workload_of(cfg, manifest), device,
                        knobs_of(cfg, device.cuda, framework))
    except (AttributeError, KeyError, TypeError, ValueError, ZeroDivisionError):
        return None  # a config the model cannot read (not a Qwen-like one): the load says what is wrong


def check_fits(cfg: SFTConfig, est: Estimate | None, manifest: dict | None = None,
               device: Device | None = None) -> None:
    """A run predicted above the device's memory stops here, naming what fits (--memory_check false:
    train anyway)."""
    if est is None or est.fits or not cfg.memory_check:
        return
    device = device or this_device()
    config = read_config(cfg.model_name_or_path)
    others = [e for e in plan(config, est.strategy, workload_of(cfg, manifest), device, knobs_of(cfg, device.cuda))
              if e.fits][:ALTERNATIVES]
    where = "this GPU" if device.cuda else f"this machine's {human(device.memory)}" + (
        f" shared by {device.count} processes" if device.count > 1 else "")
    fits = "; ".join(f"{e.strategy.label()} ({human(e.peak)})" for e in others) or "none of the strategies sftkit plans"
    raise ConfigError(f"this run is predicted to need {human(est.peak)} per process at its {est.moment} "
                      f"({est.strategy.label()}), more than {where} can give ({human(device.usable)}); what fits: "
                      f"{fits} (sftkit plan shows each with its command); --memory_check false trains anyway")


def resolve_auto_batch(cfg: SFTConfig, console=None) -> SFTConfig:
    """--per_device_train_batch_size auto: the largest micro-batch that fits, with the accumulation
    that keeps the step's examples per process at the default micro-batch x --gradient_accumulation_steps."""
    if cfg.per_device_train_batch_size != AUTO:
        return cfg
    step = default_of(next(f for f in dataclasses.fields(cfg) if f.name == "per_device_train_batch_size"))
    step *= cfg.gradient_accumulation_steps
    config, device = read_config(cfg.model_name_or_path), this_device()
    if config is None:
        raise ConfigError(f"--per_device_train_batch_size auto needs the model's config.json: {cfg.model_name_or_path} "
                          "is neither a local folder nor a size sftkit knows (sftkit plan --list); give a number")
    backend, offload = launch_backend(launched_processes())
    strategy = strategy_of(dataclasses.replace(cfg, per_device_train_batch_size=1), backend, offload)
    best = largest_micro_batch(config, strategy, workload_of(cfg), device, knobs_of(cfg, device.cuda), step)
    if best is None:
        best = 1  # even one example does not fit: check_fits says so, with what does
    if console is not None and int(os.environ.get("RANK", "0")) == 0:
        console.print(f"--per_device_train_batch_size auto: {best} (with --gradient_accumulation_steps "
                      f"{step // best}: {step} examples a process per step)", highlight=False)
    return dataclasses.replace(cfg, per_device_train_batch_size=best, gradient_accumulation_steps=step // best)
