"""Build the accelerate.Accelerator for a run: the only place that knows about backends."""

from __future__ import annotations

import os
from datetime import timedelta

from sftkit.config import SFTConfig
from sftkit.errors import ConfigError


def make_accelerator(cfg: SFTConfig, log_with: str | None = None):
    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    # Without a GPU, DeepSpeed needs gloo named here: otherwise every rank silently trains alone
    # (../shared/PLATFORM_NOTES.md: data not split, loss doubled). Tokenizing a big set on rank 0
    # can take a while, hence the generous collective time-out.
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 or os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"
    backend = "gloo" if launched and not torch.cuda.is_available() else None
    handlers = [InitProcessGroupKwargs(backend=backend, timeout=timedelta(hours=2))] if launched else []
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=log_with, project_dir=cfg.output_dir, kwargs_handlers=handlers,
    )
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None and cfg.skip_nan_steps:
        raise ConfigError("--skip_nan_steps does not work under DeepSpeed (its engine steps inside backward); "
                          "drop the flag, or use DDP")
    if plugin is not None:
        # We batch ourselves (no DataLoader goes through prepare), so fill DeepSpeed's "auto"s here.
        ds = plugin.deepspeed_config
        world = accelerator.num_processes
        fills = {
            "train_micro_batch_size_per_gpu": cfg.per_device_train_batch_size,
            "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
            "train_batch_size": cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world,
            "gradient_clipping": cfg.max_grad_norm,
        }
        for key, value in fills.items():
            if ds.get(key, "auto") == "auto":
                ds[key] = value
            elif key != "gradient_clipping" and ds[key] != value:
                raise ConfigError(f"the DeepSpeed config sets {key}={ds[key]} but the flags give {value}; "
                                  f"set it to \"auto\" in the DeepSpeed JSON, or change the flags to match")
    return accelerator


def distributed_type(accelerator) -> str:
    return str(accelerator.distributed_type).split(".")[-1]


def is_zero3(accelerator) -> bool:
    plugin = accelerator.state.deepspeed_plugin
    return plugin is not None and plugin.zero_stage == 3
