"""Build the accelerate.Accelerator for a run: the only place that knows about backends."""

from __future__ import annotations

import os
import re
import sys
import tempfile
from contextlib import contextmanager
from datetime import timedelta

from sftkit.config import SFTConfig
from sftkit.errors import ConfigError, SftkitError, clip
from sftkit.options import AUTO


def launched_processes() -> int:
    """How many processes the launcher started, by its own variables: torchrun and accelerate's
    multi-process launcher set WORLD_SIZE, mpirun OMPI_COMM_WORLD_SIZE or PMI_SIZE."""
    for var in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


# What a launcher sets for each process it starts (torchrun, accelerate launch and the deepspeed
# launcher: LOCAL_RANK; mpirun: its own), as accelerate reads them.
LOCAL_RANK_VARS = ("LOCAL_RANK", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK")


def check_rendezvous() -> None:
    """WORLD_SIZE > 1 left in the environment of a process no launcher started (no local rank)
    would wait out the time-out for ranks that never come; such a launch cannot work, so it stops
    here, before any collective."""
    world = os.environ.get("WORLD_SIZE")
    if world is None:
        return
    if not world.strip().isdigit():
        raise ConfigError(f"WORLD_SIZE={world!r} in the environment is not a process count; unset it, or start "
                          "the run with torchrun or accelerate launch")
    if int(world) > 1 and not any(var in os.environ for var in LOCAL_RANK_VARS):
        raise ConfigError(f"WORLD_SIZE={world} is set but no launcher started this process (no LOCAL_RANK): it would "
                          f"wait for {int(world) - 1} rank(s) nobody starts. Unset WORLD_SIZE, RANK, MASTER_ADDR and "
                          "MASTER_PORT to run one process, or start it with torchrun or accelerate launch")


# What only a launcher sets in the processes it starts: torchrun's (and so accelerate launch's)
# elastic agent, DeepSpeed's launcher, mpirun, srun. Without any of them, ranks were started by hand
# (or a shell kept an earlier job's variables), and the rendezvous waits FIRST_WAIT_S at most.
LAUNCHER_VARS = ("TORCHELASTIC_RUN_ID", "CROSS_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_PROCID")
FIRST_WAIT_S = 20


def started_by_launcher() -> bool:
    return any(var in os.environ for var in LAUNCHER_VARS)


def rendezvous_by_hand(timeout: timedelta, cuda: bool) -> None:
    """The process group of ranks no launcher started (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and
    MASTER_PORT set by hand, or left in a shell from an earlier job): every rank must reach rank 0's
    store within FIRST_WAIT_S (or the run's time-out, if shorter), else this stops in one line naming
    the variables, where torch would wait the whole time-out for ranks nobody starts. The group is
    the one `init_process_group` makes from those variables (accelerate then takes it as it is)."""
    import torch.distributed as dist

    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ.get("RANK") or 0)
    host, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT") or 29500)
    first = min(timedelta(seconds=FIRST_WAIT_S), timeout)
    try:
        store = dist.TCPStore(host, port, world, is_master=rank == 0, timeout=first, wait_for_workers=True)
    except RuntimeError as err:  # torch's DistStoreError and DistNetworkError are RuntimeErrors
        who = "no other rank reached it" if rank == 0 else "nothing answered there"
        raise ConfigError(f"WORLD_SIZE={world} and RANK={rank} are set but no launcher started this process, and "
                          f"{who} ({host}:{port}) within {first.total_seconds():g} s ({clip(str(err))}). To run one "
                          "process unset WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; for several, "
                          "start them with torchrun or accelerate launch") from None
    store.set_timeout(timeout)
    # the key prefix of init_process_group's own rendezvous, so that a rank that makes its group from
    # the variables itself (env://) meets this one
    dist.init_process_group("nccl" if cuda else "gloo", store=dist.PrefixStore("default_pg", store), rank=rank,
                            world_size=world, timeout=timeout)


def check_launch(accelerator) -> None:
    """Every process compares the launcher's count with the Accelerator's: a mismatch means the
    ranks would train alone, each on all the data, and nothing would say so."""
    started, kind = launched_processes(), distributed_type(accelerator)
    if started > 1 and (accelerator.num_processes != started or kind == "NO"):
        raise ConfigError(f"the launcher started {started} processes but accelerate runs them as {kind} with "
                          f"{accelerator.num_processes}: each would train alone. Launch with accelerate launch "
                          "--config_file accelerate_configs/multi_gpu.yaml (DDP) or a deepspeed_*.yaml")
    # accelerate launch --num_processes N without --multi_gpu or a config file starts ONE process;
    # its simple launcher still exports MASTER_ADDR for the N it was asked for
    simple_launch = "ACCELERATE_MIXED_PRECISION" in os.environ and not deepspeed_launched()
    if started == 1 and simple_launch and "MASTER_ADDR" in os.environ:
        raise ConfigError("accelerate launch was asked for several processes but started one (MASTER_ADDR is set, "
                          "WORLD_SIZE is not: no --multi_gpu and no config file). Add --config_file "
                          "accelerate_configs/multi_gpu.yaml, or drop --num_processes (and MASTER_ADDR) for one process")


def check_device(cfg: SFTConfig, console=None) -> None:
    """Options that cannot work, or work badly, on this machine; before anything loads."""
    import importlib.util

    import torch

    if cfg.fp16 and not torch.cuda.is_available():
        raise ConfigError("--fp16 needs a CUDA GPU (its loss scaling is a GPU feature); on a CPU train in fp32 "
                          "(drop --fp16), or use --bf16")
    if cfg.bf16 and not torch.cuda.is_available() and console is not None:
        console.print("note: bf16 on a CPU is emulated and several times slower than fp32; "
                      "drop --bf16 for CPU runs", highlight=False)
    if cfg.load_in_4bit:
        check_4bit(torch.cuda.is_available())
    if "wandb" in (cfg.trackers or []) and importlib.util.find_spec("wandb") is None:
        raise ConfigError("--report_to wandb: wandb is not installed; pip install 'sftkit[wandb]' "
                          "(or pip install wandb), or use --report_to tensorboard")


def check_4bit(cuda: bool) -> None:
    """--load_in_4bit needs bitsandbytes, and on a CPU its multi-backend build (0.50.2 has it):
    accelerate refuses a 4-bit model on a CPU without it."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("--load_in_4bit needs bitsandbytes: pip install -c constraints.txt 'sftkit[qlora]' "
                          "(or drop --load_in_4bit)")
    if not cuda:
        import bitsandbytes

        if "multi_backend" not in getattr(bitsandbytes, "features", set()):
            raise ConfigError(f"--load_in_4bit on a CPU needs a bitsandbytes with its CPU backend (this is "
                              f"{bitsandbytes.__version__}); upgrade it (0.50.2 works), train on a GPU, or drop "
                              "--load_in_4bit")


def deepspeed_fills(cfg: SFTConfig, world: int) -> dict:
    """What the flags give for the DeepSpeed config's batch and clipping fields."""
    return {
        "train_micro_batch_size_per_gpu": cfg.per_device_train_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "train_batch_size": cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world,
        "gradient_clipping": cfg.max_grad_norm,
    }


def check_deepspeed_batch(ds: dict, cfg: SFTConfig, world: int) -> None:
    """A batch field the DeepSpeed JSON fixes (not "auto") must be what the flags give: DeepSpeed
    would batch otherwise than our loop and the loss normalisation. gradient_clipping may differ."""
    for key, value in deepspeed_fills(cfg, world).items():
        if key != "gradient_clipping" and ds.get(key, "auto") not in ("auto", value):
            raise ConfigError(f"the DeepSpeed config sets {key}={ds[key]} but the flags give {value}; "
                              f"set it to \"auto\" in the DeepSpeed JSON, or change the flags to match")


def fill_hidden_sizes(accelerator, config) -> None:
    """DeepSpeed's "auto" bucket sizes, which accelerate fills from `model.config.hidden_size` as it
    prepares the model: a vision-language config keeps that in its text config, where accelerate
    does not look (it raises). Filled here from the text model's, by accelerate's own rules."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    from sftkit.arch.table import text_config

    hidden = text_config(config).hidden_size
    zero = plugin.deepspeed_config.get("zero_optimization", {})
    for key, value in (("reduce_bucket_size", hidden * hidden), ("stage3_prefetch_bucket_size", int(0.9 * hidden * hidden)),
                       ("stage3_param_persistence_threshold", 10 * hidden)):
        if zero.get(key) == "auto":
            zero[key] = value


def check_sequence_world(size: int, world: int) -> None:
    """--sequence_parallel_size divides the processes (checked again when the groups are made)."""
    if world % size:
        raise ConfigError(f"--sequence_parallel_size {size} must divide the {world} processes; launch a multiple "
                          f"of {size} (--num_processes) or pick a divisor of {world}")


def deepspeed_launched() -> bool:
    """accelerate launch started this process with a DeepSpeed config (it exports this)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"


def deepspeed_file() -> dict:
    """The DeepSpeed JSON that accelerate launch names, read before the Accelerator exists; {} without
    one, or where it cannot be read (accelerate then names the file and what is wrong with it)."""
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if not deepspeed_launched() or not path:
        return {}
    import json

    try:
        with open(path, encoding="utf-8") as f:
            ds = json.load(f)
    except (OSError, ValueError):
        return {}
    return ds if isinstance(ds, dict) else {}


def check_deepspeed_file(cfg: SFTConfig) -> None:
    """The batch check above, from the JSON file accelerate launch names, before anything heavy is
    imported: the Accelerator's own check would come only after the imports and set-up."""
    if cfg.per_device_train_batch_size == AUTO:
        return  # checked by make_accelerator once the micro-batch is chosen
    if ds := deepspeed_file():
        check_deepspeed_batch(ds, cfg, launched_processes())


def make_accelerator(cfg: SFTConfig, log_with: str | None = None):
    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    check_rendezvous()
    check_fsdp(cfg)
    # Without a GPU, DeepSpeed needs gloo named here: otherwise every rank silently trains alone
    # (the data not split, the loss doubled). The time-out is an option: rank 0 may tokenize a big
    # set while the others wait.
    deepspeed = deepspeed_launched()
    launched = launched_processes() > 1 or deepspeed
    backend = "gloo" if launched and not torch.cuda.is_available() else None
    timeout = timedelta(minutes=cfg.ddp_timeout_minutes)
    handlers = [InitProcessGroupKwargs(backend=backend, timeout=timeout)] if launched else []
    if launched_processes() > 1 and not started_by_launcher():
        rendezvous_by_hand(timeout, torch.cuda.is_available())
    if deepspeed and not torch.cuda.is_available():
        skip_shared_memory_op()
    try:
        # FSDP2 is sftkit's own (sharding.py): accelerate's FSDP mode, GPU-only in 1.15, would
        # shard again in prepare(); it builds a plain multi-process run instead (MULTI_CPU, MULTI_GPU)
        with hidden_from_accelerate("ACCELERATE_USE_FSDP"):
            accelerator = Accelerator(
                mixed_precision=cfg.mixed_precision,
                gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                log_with=log_with, project_dir=cfg.output_dir, kwargs_handlers=handlers,
                # several processes on a machine without a GPU (torchrun, or multi_gpu.yaml without
                # ACCELERATE_USE_CPU): accelerate would leave each alone; cpu=True makes them MULTI_CPU
                cpu=launched and not deepspeed and not torch.cuda.is_available(),
            )
    except RuntimeError as err:  # torch's DistStoreError is one: "Timed out ... 1/2 clients joined"
        if "timed out" not in str(err).lower():
            raise
        raise SftkitError(f"rank {os.environ.get('RANK', '?')} waited {cfg.ddp_timeout_minutes:g} min at the "
                          f"rendezvous for the other ranks of WORLD_SIZE={os.environ.get('WORLD_SIZE')}: "
                          f"{missing_at_rendezvous(str(err))} ({clip(str(err))}); start every rank, or raise "
                          "--ddp_timeout_minutes") from None
    check_launch(accelerator)
    if launched:
        check_all_arrived(accelerator, cfg.ddp_timeout_minutes)
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None and cfg.load_in_4bit:
        raise ConfigError("--load_in_4bit does not work under DeepSpeed (its engine casts and partitions the "
                          "weights, not bitsandbytes' packed 4-bit ones); use one GPU or DDP (multi_gpu.yaml)")
    if plugin is not None and cfg.skip_nan_steps:
        raise ConfigError("--skip_nan_steps does not work under DeepSpeed (its engine steps inside backward); "
                          "drop the flag, or use DDP")
    if plugin is not None:
        # We batch ourselves (no DataLoader goes through prepare), so fill DeepSpeed's "auto"s here.
        ds = plugin.deepspeed_config
        check_deepspeed_batch(ds, cfg, accelerator.num_processes)
        for key, value in deepspeed_fills(cfg, accelerator.num_processes).items():
            if ds.get(key, "auto") == "auto":
                ds[key] = value
    return accelerator


def skip_shared_memory_op() -> None:
    """DeepSpeed on a CPU compiles a C++ shared-memory all-reduce as its comm backend starts (half a
    minute in each new environment, a compiler needed, a bare print a rank), used by its inference
    all-reduce alone, never by training. Marked incompatible in DeepSpeed's table of ops (a dict it
    keeps for such edits), the backend starts without it and all-reduces through gloo."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def fsdp_version() -> int | None:
    """The FSDP version the accelerate config asks for (accelerate launch exports its
    distributed_type FSDP as ACCELERATE_USE_FSDP, its fsdp_version as FSDP_VERSION); None: no FSDP."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None
    version = os.environ.get("FSDP_VERSION", "1").strip()
    return int(version) if version.isdigit() else -1


def fsdp_offload() -> bool:
    """The accelerate config's fsdp_offload_params (exported as FSDP_OFFLOAD_PARAMS)."""
    return os.environ.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true"


def check_fsdp(cfg: SFTConfig) -> None:
    """What FSDP2 runs cannot do, refused before anything loads."""
    version = fsdp_version()
    if version is None:
        return
    if version != 2:
        raise ConfigError(f"the accelerate config asks for FSDP version {os.environ.get('FSDP_VERSION')}; sftkit "
                          "runs FSDP2 only: set fsdp_version: 2 in its fsdp_config (as "
                          "accelerate_configs/fsdp2.yaml does), or use multi_gpu.yaml (DDP) or a deepspeed_*.yaml")
    if cfg.load_in_4bit:
        raise ConfigError("--load_in_4bit does not work under FSDP2 (fully_shard cannot slice bitsandbytes' packed "
                          "4-bit weights); use one GPU or DDP (multi_gpu.yaml)")


def launch_backend(world: int) -> tuple[str, bool]:
    """(backend, offload) the launch asks for, read from what accelerate launch exports, before the
    Accelerator exists: single, ddp, zero1/2/3 or fsdp2; offload: the optimizer state (and ZeRO-3's or
    FSDP2's weights) on the CPU."""
    if fsdp_version() == 2 and world > 1:
        return "fsdp2", fsdp_offload()
    if not deepspeed_launched():
        return ("ddp" if world > 1 else "single"), False
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "")
    offload = os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none")
    zero = deepspeed_file().get("zero_optimization")
    if isinstance(zero, dict):  # the JSON file, where there is one, is what DeepSpeed reads
        stage = str(zero.get("stage", stage))
        offload = (zero.get("offload_optimizer") or {}).get("device", "none")
    return f"zero{stage if stage in ('1', '2', '3') else '2'}", offload not in ("none", "", None)


def shards_model(accelerator) -> bool:
    """The model is to be sharded with FSDP2: the config asks for it and there are ranks to shard over
    (one process trains the whole model, as it would without FSDP)."""
    return fsdp_version() == 2 and accelerator.num_processes > 1


@contextmanager
def hidden_from_accelerate(var: str):
    """`var` absent from the environment while accelerate reads it, then back as it was."""
    value = os.environ.pop(var, None)
    try:
        yield
    finally:
        if value is not None:
            os.environ[var] = value


def missing_at_rendezvous(message: str) -> str:
    """Who never came, from torch's rendezvous time-out: rank 0's store counts the ranks that
    joined ("1/2 clients joined"), so of two the missing one is known; a rank that is not 0 waited
    for rank 0's store."""
    rank, world = int(os.environ.get("RANK", "0") or 0), int(os.environ.get("WORLD_SIZE", "0") or 0)
    if rank != 0:
        return f"rank 0 (the store at {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}) never arrived"
    joined = re.search(r"(\d+)/(\d+) clients joined", message)
    if world == 2:
        return "rank 1 never arrived"
    if joined:
        return f"{int(joined.group(2)) - int(joined.group(1))} of ranks 1-{world - 1} never arrived"
    return "some never arrived"


def check_all_arrived(accelerator, minutes: float) -> None:
    """The first collective is a monitored barrier: a rank that joined the process group but
    never reaches it (stuck, or dead before it) is named in one line by the ranks that wait, after
    --ddp_timeout_minutes, where a plain collective gives a gloo traceback naming no rank (or, on
    NCCL, waits out its time-out). monitored_barrier is gloo's: on NCCL it runs in a gloo side group."""
    import torch.distributed as dist

    if accelerator.num_processes < 2 or not dist.is_initialized():
        return
    rank = dist.get_rank()
    group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    try:
        with _native_stderr_held("monitoredBarrier"):
            dist.monitored_barrier(group=group, timeout=timedelta(minutes=minutes), wait_all_ranks=True)
    except RuntimeError as err:
        found = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", str(err))
        who = f"rank(s) {found.group(1).strip()}" if found else "rank 0" if rank else "the other ranks"
        raise SftkitError(f"rank {rank} waited {minutes:g} min at the first collective for {who} of "
                          f"{accelerator.num_processes}, which never arrived ({clip(str(err))}); see that rank's "
                          "output for why, or raise --ddp_timeout_minutes") from None


@contextmanager
def _native_stderr_held(drop: str):
    """File descriptor 2 held in a temporary file while `drop`'s C++ code runs: on a time-out gloo's
    logger prints the news twice ("[Rank 0]: Rank 1 failed to pass monitoredBarrier ...") before
    the exception our one line is made from. Its other lines are passed on, in order."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = [line for line in held.read().splitlines(keepends=True) if drop.encode() not in line]
            os.write(2, b"".join(kept))


def distributed_type(accelerator) -> str:
    return str(accelerator.distributed_type).split(".")[-1]


def is_zero3(accelerator) -> bool:
    plugin = accelerator.state.deepspeed_plugin
    return plugin is not None and plugin.zero_stage == 3
