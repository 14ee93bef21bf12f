"""A run directory belongs to one run: a new run does not write over another's checkpoints, and a
resume takes a checkpoint of its own run, says what it continues, and never bends a schedule.

A run's identity is the hash of what decides each of its steps: the options of
`SFTConfig.identity()`, the prepared training set's fingerprint and the number of processes.
Checkpoints record it (TrainState.run_id); `--resume_from_checkpoint latest` only takes those that
match, so a folder reused by a different run is never resumed by mistake. It holds no path as
typed: the data counts by its content (prepare.fingerprint), a local model or template by where
its path leads, so `data.jsonl` from one folder and `/abs/data.jsonl` from another are one run.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sftkit.checkpoint import (
    FINAL_DIR,
    MODEL_DIR,
    TRAINER_STATE,
    TrainState,
    damage,
    final_step,
    list_checkpoints,
    read_state,
    saved_config,
    saves_cut_short,
    saves_in,
)
from sftkit.errors import ConfigError, NothingToDo, quote
from sftkit.io import check_free_space, check_not_a_file, check_not_an_input, check_writable
from sftkit.lock import FolderLock, NoLock, check_unlocked
from sftkit.models import min_saved_bytes

RUN_FILES = ("metrics.jsonl", "loss.png", "config.yaml")  # written beside checkpoint-N/ and final/
NOT_COMPARED = ("output_dir", "resume_from_checkpoint", "overwrite_output_dir")  # differ on every resume


# Run ids are "v2:<16 hex>" since identities hold no path as typed; a bare 16-hex id is older
# (its options and data fingerprint held the paths as spelled): see spelled_run_identity.
SCHEME = "v2"
PATH_OPTIONS = ("model_name_or_path", "chat_template")  # identity options that may name a local path
# options naming local files: config.yaml holds them absolute (see portable)
LOCAL_PATHS = ("model_name_or_path", "chat_template", "eval_data_path", "dataset_info", "resume_from_checkpoint")


def run_identity(cfg, data_fingerprint: str, world_size: int) -> str:
    options = {k: _real(v) if k in PATH_OPTIONS else v for k, v in cfg.identity().items()}
    return f"{SCHEME}:{_digest(options, data_fingerprint, world_size)}"


def spelled_run_identity(cfg, spelled_data_fingerprint: str, world_size: int) -> str:
    """The identity as sftkit wrote it before SCHEME: the options' paths as typed, and the data
    fingerprint that hashed the data's paths (dataset.spelled_fingerprint). Only to recognise a
    checkpoint of that time, which then resumes when typed as it was then."""
    return _digest(cfg.identity(), spelled_data_fingerprint, world_size)


def is_spelled(run_id: str | None) -> bool:
    """Whether a checkpoint's run id is of the scheme before SCHEME (paths as spelled)."""
    return bool(run_id) and ":" not in run_id


def _digest(options: dict, data_fingerprint: str, world_size: int) -> str:
    text = json.dumps({"options": options, "data": data_fingerprint, "world_size": world_size},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _real(value):
    """A local path as where it leads (relative, absolute and symlinked spellings are one); any
    other value (a Hub id, the tiny preset, None) as it is."""
    return os.path.realpath(value) if isinstance(value, str) and value and os.path.exists(value) else value


def portable(cfg):
    """`cfg` with its local paths absolute, for the run's config.yaml: the resume command printed
    at a stop (`sftkit train --config OUT/config.yaml ...`) then reads the same files from any
    folder, where `data.jsonl` was read relative to wherever the command was typed."""
    values = {k: _absolute(getattr(cfg, k)) for k in LOCAL_PATHS}
    return dataclasses.replace(cfg, **values, data_path=[_absolute(x) for x in cfg.data_path],
                               output_dir=os.path.abspath(cfg.output_dir))


def _absolute(value: str | None) -> str | None:
    """A local file, folder, glob that matches or REGISTRY.json:NAME made absolute; a Hub id, the
    tiny preset, `latest` or None unchanged."""
    if not value:
        return value
    registry, sep, name = value.rpartition(":")
    if sep and registry.lower().endswith(".json") and os.path.isfile(registry) and not os.path.exists(value):
        return f"{os.path.abspath(registry)}:{name}"
    if os.path.exists(value) or (any(ch in value for ch in "*?[") and glob.glob(value, recursive=True)):
        return os.path.abspath(value)
    return value


def check_output_dir(out: Path, inputs: list) -> None:
    """Not a file, not one of the inputs (nor holding or inside one), writable, and no live run's."""
    check_not_a_file(out)
    check_not_an_input(out, inputs)
    check_writable(out)
    check_unlocked(out)


def run_inputs(cfg) -> list:
    """What a run reads, which its output folder may not be, hold or lie inside."""
    return [*cfg.data_path, cfg.eval_data_path, cfg.model_name_or_path, cfg.chat_template]


def claim(cfg, accelerator) -> FolderLock:
    """Lock the folder for this run (rank 0 holds it; released when the process ends), then: a
    new run (no resume) refuses a folder that holds another run's checkpoints or final/; with
    overwrite_output_dir it removes them (and that run's metrics) first. Temporary folders here
    are removed: holding the lock means their writer is dead."""
    out = Path(cfg.output_dir)
    check_output_dir(out, run_inputs(cfg))
    accelerator.wait_for_everyone()  # every rank has looked for a live run before rank 0 takes the lock
    lock = (FolderLock if accelerator.is_main_process else NoLock)(out).acquire()
    with lock.released_on_error():
        if not cfg.use_lora:  # final/ holds the whole model at least (an adapter is small)
            check_free_space(out, min_saved_bytes(cfg.model_name_or_path))
        if accelerator.is_main_process:
            for stale in saves_cut_short(out):
                shutil.rmtree(stale, ignore_errors=True)
        if not cfg.resume_from_checkpoint:
            _claim_new(cfg, accelerator, out)
    return lock


def _claim_new(cfg, accelerator, out: Path) -> None:
    found = [p.name for p in list_checkpoints(out)] + ([f"{FINAL_DIR}/"] if (out / FINAL_DIR).exists() else [])
    if not found:
        return
    if not cfg.overwrite_output_dir:
        shown = ", ".join(found[-3:]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        raise ConfigError(f"{out} holds another run ({shown}); continue it with --resume_from_checkpoint latest, "
                          "choose a new --output_dir, or pass --overwrite_output_dir to replace it")
    if accelerator.is_main_process:
        for p in saves_in(out):  # temporary folders went above
            shutil.rmtree(p, ignore_errors=True)
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
    accelerator.wait_for_everyone()


@dataclass
class Resume:
    path: Path           # the checkpoint
    saved: TrainState    # its state
    changes: list[str]   # options (and data) that differ from the run that wrote it
    same_run: bool       # its identity is this configuration's
    skipped: list[str]   # newer checkpoints of this run that were damaged, with what was wrong


def find_resume(cfg, state: TrainState, lr_factor: Callable[[int, int], float],
                spelled_id: Callable[[], str] | None = None) -> Resume:
    """The checkpoint `cfg.resume_from_checkpoint` names, checked against this configuration
    (whose identity, schedule length and data `state` holds; `lr_factor(total_steps, step)` is its
    schedule). `spelled_id`: this run's spelled_run_identity, computed only if a checkpoint of
    that scheme is there (it reads the data again). Raises NothingToDo for a finished run,
    ConfigError for a checkpoint of another run (`latest`) or a schedule that would bend."""
    out, spec = Path(cfg.output_dir), cfg.resume_from_checkpoint
    spelled_id = functools.cache(spelled_id) if spelled_id else None

    def ours(run_id: str | None) -> bool:  # "": written before run ids; None: unreadable (judged later)
        return run_id in (None, "", state.run_id) or (is_spelled(run_id) and spelled_id is not None
                                                       and run_id == spelled_id())

    if spec == "latest":
        found = list_checkpoints(out)
        mine = [p for p in found if ours(_run_of(p))]
        if not found and (out / FINAL_DIR).is_dir():
            raise NothingToDo(f"the run in {out} has finished ({FINAL_DIR}/ is there, and it kept no checkpoint); "
                              "nothing to resume")
        if not found:
            raise ConfigError(f"--resume_from_checkpoint latest: no checkpoint in {out}")
        if not mine and is_spelled(_run_of(found[-1])):
            raise ConfigError(f"the checkpoints in {out} were written by an earlier sftkit, whose run identity held "
                              "the data's and the model's paths as typed, and this run's paths or options differ from "
                              "that run's: resume from the folder it ran in with its paths typed as then, or pass "
                              f"--resume_from_checkpoint {found[-1]} to continue it with these options")
        if not mine:
            changes = "; ".join(describe_changes(found[-1], cfg, read_state(found[-1]), state))
            raise ConfigError(f"the checkpoints in {out} belong to another run (changed: "
                              f"{changes or 'the number of processes'}); restore those options to continue it, pass "
                              "--resume_from_checkpoint with a checkpoint's path to continue it with these options "
                              "anyway, or choose a new --output_dir")
        path, skipped = newest_intact(mine)
    else:
        path, skipped = Path(spec), []
        if not (path / TRAINER_STATE).is_file():
            raise ConfigError(f"--resume_from_checkpoint {spec}: not a checkpoint directory (no {TRAINER_STATE})")
        problem = damage(path)
        if problem:
            intact = [p.name for p in list_checkpoints(path.parent) if damage(p) is None]
            raise ConfigError(f"{path} is damaged: {problem}; intact checkpoints beside it: "
                              f"{', '.join(intact) or 'none'}")
    saved = read_state(path)
    check_schedule(path, saved, state.total_steps, lr_factor, final_step(out))
    check_base(path, saved, state)
    same_run = ours(saved.run_id)
    # a spelled id that matches hashed this run's data: its data fingerprint is of the older rule
    same_data = saved.data_fingerprint in ("", state.data_fingerprint) or (same_run and is_spelled(saved.run_id))
    return Resume(path, saved, describe_changes(path, cfg, saved, state, same_data), same_run, skipped)


def base_identity(model_path: str) -> str:
    """A hash of a local base model: its config.json and its weight files' names and sizes ("" for
    a Hub id). A checkpoint holds no frozen weight, so a resume must find the same base. Names and
    sizes, not contents: hashing the 16 GB of Qwen3-8B at every start would cost seconds, and a
    base that changed under a run changes its files (re-download, re-shard, another dtype)."""
    folder = Path(model_path)
    if not (folder / "config.json").is_file():
        return ""
    weights = sorted((f.name, f.stat().st_size) for f in folder.iterdir()
                     if f.name.endswith((".safetensors", ".safetensors.index.json", ".bin")))
    text = json.dumps({"config": (folder / "config.json").read_text(), "weights": weights})
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_base(path: Path, saved: TrainState, state: TrainState) -> None:
    """The base this run loads is the one the checkpoint was trained on (its frozen weights are
    reloaded from it, never kept in the checkpoint). Unknown on either side: not checked. A base
    of another size is named first, by a tensor and both shapes."""
    from sftkit.fit import check_checkpoint_fits

    check_checkpoint_fits(path / MODEL_DIR, state.base_model)
    if saved.base_hash and state.base_hash and saved.base_hash != state.base_hash:
        raise ConfigError(f"{path} was trained on the base model {saved.base_model} (identity {saved.base_hash}), "
                          f"but {state.base_model} now has identity {state.base_hash}: its config or weight files "
                          "changed. Restore that base to resume, or start a new run (another --output_dir)")


def _run_of(path: Path) -> str | None:
    try:
        return read_state(path).run_id
    except ConfigError:
        return None  # unreadable: a damaged checkpoint, judged by newest_intact


def newest_intact(candidates: list[Path]) -> tuple[Path, list[str]]:
    """The newest checkpoint that verifies, and what was skipped on the way (newest first)."""
    skipped = []
    for path in reversed(candidates):
        problem = damage(path)
        if problem is None:
            return path, skipped
        skipped.append(f"{path.name} ({problem})")
    raise ConfigError(f"no intact checkpoint to resume: {'; '.join(skipped)}")


def check_schedule(path: Path, saved: TrainState, total: int, lr_factor: Callable[[int, int], float],
                   final_at: float = -1) -> None:
    """Nothing is left after the checkpoint's step and final/ (of step `final_at`) holds it: the
    run has finished; without that final/ (its save failed) the resume writes it. A different
    length is fine where the learning rate of every remaining step stays what it was (constant, no
    warm-up left); otherwise resuming would bend the schedule."""
    if saved.step > total or saved.step == total <= final_at:
        raise NothingToDo(f"{path} is step {saved.step}, and these options give {total} steps: the run has "
                          "finished; nothing to resume")
    old = saved.total_steps or total  # unknown before state version 3: taken as unchanged
    if any(lr_factor(old, k) != lr_factor(total, k) for k in range(saved.step, max(old, total))):
        raise ConfigError(f"{path} is step {saved.step} of a {old}-step schedule, and these options give {total} "
                          f"steps: resuming would bend the learning-rate schedule. Resume with --max_steps {old}, "
                          "or start a new run (another --output_dir) to train longer")


# path options whose value counts by what it names: the data fingerprint holds the data and the
# template (the tokenizer's fingerprint), the base identity the model
BY_DATA = ("data_path", "chat_template", "dataset_info")


def describe_changes(path: Path, cfg, saved: TrainState, state: TrainState, same_data: bool | None = None) -> list[str]:
    """'name old -> new' for each option that differs from the run that wrote the checkpoint. A
    path counts by what it names: where the data (or the base) is the same, another spelling of
    its path is no change (`data.jsonl` -> `/abs/data.jsonl` from another folder)."""
    if same_data is None:
        same_data = saved.data_fingerprint in ("", state.data_fingerprint)
    same_base = bool(saved.base_hash) and saved.base_hash == state.base_hash
    old = saved_config(path)

    def changed(k: str, was, now) -> bool:
        if k in NOT_COMPARED or (k in BY_DATA and same_data) or (k == "model_name_or_path" and same_base):
            return False
        if k in (*LOCAL_PATHS, "data_path"):
            return _paths(was) != _paths(now)
        return was != now

    changes = [f"{k} {quote(old[k])} -> {quote(v)}" for k, v in cfg.to_dict().items()
               if k in old and changed(k, old[k], v)]
    if not same_data:
        changes.append("the training data (its prepared set has another fingerprint)")
    return changes


def _paths(value):
    return [_real(x) for x in value] if isinstance(value, list) else _real(value)
