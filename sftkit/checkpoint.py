"""Checkpoints and the final model. Every write goes to a temporary directory that is renamed
into place, so `latest` never finds a half-written checkpoint.

checkpoint-N/
  state/              accelerate.save_state: the weights that train (never a frozen one), the
                      optimizer, RNG of every rank (DeepSpeed: its engine's files, frozen excluded);
                      under FSDP2 instead dcp/ (torch.distributed.checkpoint: the trained weights'
                      and the optimizer's shards, by name) and rng_{rank}.pt
  model/              the model or adapter in Hugging Face format (eval and merge-lora read it)
  scheduler.json      the learning-rate scheduler's state
  trainer_state.json  the TrainState: step, micro-batches consumed, token counts, time, skipped
                      steps, and the base model the frozen weights are reloaded from
  checksums.json      written last: the size and digest of every other file (resume verifies them)

final/                the model as save_model writes it (what eval and merge-lora take), and
                      sftkit_state.json: the step it holds

This module owns those names: nothing else spells them (tests/test_architecture.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sftkit.accel import is_zero3
from sftkit.arch.layout import copy_processor_files, vision_language_config
from sftkit.arch.layout import restore as restore_layout
from sftkit.digest import algo_of, of_bytes, of_files
from sftkit.errors import ConfigError, SftkitError
from sftkit.io import apply_umask, atomic_write_text
from sftkit.models import model_folder
from sftkit.sharding import full_state_dict, is_sharded

CHECKPOINT_PREFIX = "checkpoint-"   # checkpoint-N: the state after step N
CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")
TRAINER_STATE = "trainer_state.json"
STATE_DIR = "state"
MODEL_DIR = "model"
FINAL_DIR = "final"
CONFIG_FILE = "sftkit_config.yaml"  # beside every saved model: the options that trained it
SCHEDULER_FILE = "scheduler.json"
FINAL_STATE = "sftkit_state.json"   # in final/: the step it holds (a finished run has final/ of its last step)
MODEL_CARD = "README.md"          # beside a saved model: what it is (model_card)
CHECKSUMS = "checksums.json"        # written last: size and digest of every other file
LEGACY_SCHEDULER = "custom_checkpoint_0.pkl"  # where accelerate kept our scheduler before scheduler.json
DCP_DIR = "dcp"                     # FSDP2, in state/: the trained tensors and the optimizer, by name
RNG_FILE = "rng_{rank}.pt"          # FSDP2, in state/: each rank's RNG states


@dataclass
class TrainState:
    """Where a run is: everything besides the tensors that a resumed run needs to continue exactly.

    Version 1 (sftkit 0.1 before this class) wrote the same keys without "version", and
    "skipped_steps" only once a step had been skipped; version 2 had no run identity; version 3
    saved the frozen weights in state/ and sha256 checksums. All load: the missing fields keep
    their defaults (0 and "": unknown), and a state/ holding frozen weights loads as before.
    """

    VERSION = 4

    step: int = 0                 # optimizer steps done
    micro_index: int = 0          # micro-batches consumed (the data position; step x accumulation)
    tokens: int = 0               # real tokens trained on, all ranks
    supervised_tokens: int = 0    # tokens in the loss, all ranks
    elapsed_s: float = 0.0        # training time before this process, for the end summary
    skipped_steps: int = 0        # steps skipped by --skip_nan_steps
    total_steps: int = 0          # the length of the run's schedule (0: unknown, before version 3)
    run_id: str = ""              # run_dir.run_identity: which run wrote this ("": unknown)
    data_fingerprint: str = ""    # the prepared training set's fingerprint
    base_model: str = ""          # where the run loaded its base from (a frozen weight is reloaded from there)
    base_hash: str = ""           # run_dir.base_identity of that base ("": unknown, or not a local folder)

    def advance(self, micro_batches: int, tokens: int, supervised: int, skipped: bool) -> None:
        """Count one optimizer step."""
        self.step += 1
        self.micro_index += micro_batches
        self.tokens += tokens
        self.supervised_tokens += supervised
        self.skipped_steps += int(skipped)

    def to_dict(self) -> dict:
        return {"version": self.VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, values: dict, source: str = TRAINER_STATE) -> TrainState:
        version = values.get("version", 1)
        if version > cls.VERSION:
            raise ConfigError(f"{source} was written by a newer sftkit (state version {version}); upgrade sftkit")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


def list_checkpoints(out_dir: Path) -> list[Path]:
    found = [p for p in out_dir.glob(f"{CHECKPOINT_PREFIX}*") if CHECKPOINT_RE.match(p.name)
             and (p / TRAINER_STATE).is_file()]
    return sorted(found, key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)))


def checkpoint_dir(out_dir: Path, step: int) -> Path:
    return out_dir / f"{CHECKPOINT_PREFIX}{step}"


def temporary(folder: Path) -> Path:
    """Where `folder` (a checkpoint-N or final/) is written before it is renamed into place."""
    return folder.with_name(f".{folder.name}.tmp")


def saves_in(out_dir: Path) -> list[Path]:
    """What a run saved in `out_dir` (every checkpoint-* folder, whole or not, and final/), for
    --overwrite_output_dir to remove."""
    return [*out_dir.glob(f"{CHECKPOINT_PREFIX}*"), out_dir / FINAL_DIR]


def saves_cut_short(out_dir: Path) -> list[Path]:
    """The temporary folders of saves that never finished (a killed run's), for the next owner of
    `out_dir` to remove."""
    return [*out_dir.glob(f".{CHECKPOINT_PREFIX}*.tmp"), temporary(out_dir / FINAL_DIR)]


def read_state(path: Path) -> TrainState:
    """The TrainState of a checkpoint, without loading any tensor."""
    try:
        values = json.loads((path / TRAINER_STATE).read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path / TRAINER_STATE} is unreadable ({str(err).splitlines()[0][:120]})") from None
    return TrainState.from_dict(values, str(path / TRAINER_STATE))


def saved_config(path: Path) -> dict:
    """The options of the run that wrote a checkpoint or a final/ ({} when not recorded)."""
    from sftkit.io import read_yaml

    file = path / MODEL_DIR / CONFIG_FILE if (path / TRAINER_STATE).is_file() else path / CONFIG_FILE
    return read_yaml(file) or {} if file.is_file() else {}


def model_in(path: str) -> str:
    """The model directory of `path`: a checkpoint holds its model under model/; anything else is one."""
    p = Path(path)
    if (p / TRAINER_STATE).is_file() and (p / MODEL_DIR).is_dir():
        return str(p / MODEL_DIR)
    return path


def ensure_stop_token(generation_config, tokenizer) -> None:
    """Make generation stop at the token the chat template ends a reply with (<|im_end|> for
    Qwen3, whose base models' eos is <|endoftext|>), as well as at the tokenizer's eos."""
    from sftkit.data.render import reply_close

    eos = generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    close = reply_close(tokenizer)
    for tok_id in (close and tokenizer.convert_tokens_to_ids(close), tokenizer.eos_token_id):
        if isinstance(tok_id, int) and tok_id >= 0 and tok_id != tokenizer.unk_token_id and tok_id not in eos:
            eos.append(tok_id)
    generation_config.eos_token_id = eos
    if generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id


def save_model(accelerator, model, tokenizer, cfg, path: Path) -> None:
    """Model or adapter + tokenizer + generation config + sftkit config, loadable without sftkit,
    in the layout of the base checkpoint (sftkit/arch/layout.py).

    Under ZeRO-3 and FSDP2 each rank holds a slice of every weight: they are gathered on rank 0
    (all ranks must call it), and the files are reopened afterwards to check every shape. A LoRA
    model saves its adapter alone from the gathered state dict, as PEFT does from its own.
    """
    unwrapped = accelerator.unwrap_model(model)
    state_dict = accelerator.get_state_dict(model) if is_zero3(accelerator) else \
        full_state_dict(model) if is_sharded(model) else None
    if accelerator.is_main_process:
        path.mkdir(parents=True, exist_ok=True)
        unwrapped.save_pretrained(path, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(path)
        gen = unwrapped.generation_config
        ensure_stop_token(gen, tokenizer)
        gen.save_pretrained(path)
        cfg.save_yaml(path / CONFIG_FILE)
        atomic_write_text(path / MODEL_CARD, model_card(cfg))  # in place of PEFT's empty card
        if state_dict is not None:
            check_saved_shapes(path, unwrapped)
        base = model_folder(cfg.model_name_or_path)  # a Hub id: its snapshot in the cache
        restore_layout(path, base)  # a Qwen3.5 base: its vision tower and MTP weights too
        copy_processor_files(base, path)  # and the processor serving takes images with
        apply_umask(path)
    accelerator.wait_for_everyone()


def model_card(cfg) -> str:
    """README.md of a saved model: what it is and how to load it. PEFT's own card is an empty
    template naming the base by its resolved path (for the tiny preset, a folder in sftkit's cache)."""
    kind = (f"a LoRA adapter (rank {cfg.lora_r}, alpha {cfg.lora_alpha})" if cfg.use_lora
            else "a fully fine-tuned model")
    load = ("peft.AutoPeftModelForCausalLM.from_pretrained(this folder), or `sftkit merge-lora --adapter "
            "this folder` for a standalone model" if cfg.use_lora
            else "transformers.AutoModelForImageTextToText.from_pretrained(this folder) (a vision-language model; "
            "AutoModelForCausalLM gives Qwen3.5's text model alone)" if vision_language_config(cfg.model_name_or_path)
            else "transformers.AutoModelForCausalLM.from_pretrained(this folder)")
    data = ", ".join(f"`{d}`" for d in cfg.data_path) or "(none named)"
    return (f"# Fine-tuned with sftkit\n\nThis folder holds {kind} of `{cfg.model_name_or_path}`, trained on "
            f"{data}.\nEvery option of the run is in `{CONFIG_FILE}` beside this file.\n\nLoad it with {load}.\n")


def save_final(accelerator, model, tokenizer, cfg, out_dir: Path, step: int) -> Path:
    """final/, written to a temporary folder and renamed: a run stopped while saving leaves no
    half-written or empty final/. It records its step (FINAL_STATE): the run has finished only once
    a final/ of its last step is there. A failed write (a full disk) removes the partial folder and
    says which checkpoint a rerun writes final/ from."""
    final = out_dir / FINAL_DIR
    tmp = temporary(final)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        save_model(accelerator, model, tokenizer, cfg, tmp)
        if accelerator.is_main_process:
            write_json(tmp / FINAL_STATE, {"step": step})
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
    except Exception as err:  # noqa: BLE001 -- as in save_checkpoint: a full disk is any of several errors
        shutil.rmtree(tmp, ignore_errors=True)
        kept = list_checkpoints(out_dir)
        raise SftkitError(f"saving {FINAL_DIR}/ failed ({_cause(err)}); "
                          + (f"{kept[-1]} is intact: free space and rerun with --resume_from_checkpoint latest, "
                             f"which writes {FINAL_DIR}/" if kept else "no checkpoint was kept")) from None
    accelerator.wait_for_everyone()
    return final


def final_step(out_dir: Path) -> float:
    """The step final/ holds: -1 without final/, infinity for one written before FINAL_STATE
    (taken as finished, as it always was)."""
    final = out_dir / FINAL_DIR
    if not final.is_dir():
        return -1
    try:
        return int(json.loads((final / FINAL_STATE).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return math.inf


def _cause(err: Exception) -> str:
    """What failed, in a few words: a full disk comes as OSError, SafetensorError or RuntimeError."""
    return "No space left on device" if "No space left" in str(err) else (str(err).splitlines() or [repr(err)])[0][:200]


def check_saved_shapes(path: Path, model) -> None:
    """Reopen the saved safetensors: no tensor may be empty, and each has the model's shape."""
    from safetensors import safe_open

    # peft names "...lora_A.default.weight" in the model and "...lora_A.weight" in the file
    expected = {n.replace(".default", ""): tuple(getattr(p, "ds_shape", p.shape)) for n, p in model.named_parameters()}
    checked = 0
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():  # noqa: SIM118 -- safe_open has keys(), no iteration
                shape = tuple(st.get_slice(key).get_shape())
                if 0 in shape:
                    raise RuntimeError(f"{f.name}: tensor {key} is empty {shape}; the ZeRO-3 gather failed")
                if key in expected and expected[key] != shape:
                    raise RuntimeError(f"{f.name}: tensor {key} has shape {shape}, the model has {expected[key]}")
                checked += 1
    if checked == 0:
        raise RuntimeError(f"no tensors were written to {path}")


def save_checkpoint(accelerator, model, tokenizer, cfg, out_dir: Path, state: TrainState, scheduler,
                    optimizer=None) -> Path:
    step = state.step
    final = checkpoint_dir(out_dir, step)
    tmp = temporary(final)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        if is_sharded(model):  # FSDP2: every rank writes its shards (DCP)
            (tmp / STATE_DIR).mkdir(exist_ok=True)
            save_sharded(model, optimizer, tmp / STATE_DIR, kept_names(model))
        else:
            save_state(accelerator, tmp / STATE_DIR)
        save_model(accelerator, model, tokenizer, cfg, tmp / MODEL_DIR)
        if accelerator.is_main_process:
            # JSON, not accelerate's custom_checkpoint pickle, which it loads with weights_only=False
            known = {SCHEDULER_FILE: write_json(tmp / SCHEDULER_FILE, scheduler.state_dict()),
                     TRAINER_STATE: write_json(tmp / TRAINER_STATE, state.to_dict())}
            apply_umask(tmp)
            # the list of every file's size and checksum is written last: it marks a complete checkpoint
            write_json(tmp / CHECKSUMS, checksums(tmp, known))
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            prune(out_dir, cfg.save_total_limit, state.run_id)
    except Exception as err:  # noqa: BLE001 -- OSError, SafetensorError, torch.save's RuntimeError: a full disk is any
        shutil.rmtree(tmp, ignore_errors=True)
        kept = list_checkpoints(out_dir)
        raise SftkitError(f"saving {final.name} failed ({_cause(err)}); "
                          + (f"the previous checkpoint {kept[-1]} is intact" if kept else "no earlier checkpoint exists")
                          + "; free space and resume with --resume_from_checkpoint latest") from None
    accelerator.wait_for_everyone()
    return final


def kept_names(model) -> set[str]:
    """The state-dict names a checkpoint holds: parameters that train, and buffers. A frozen weight
    (LoRA's base, its 4-bit quantization state) is never copied: resume reloads it from the base."""
    trains = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    return trains | {n for n, _ in model.named_buffers(remove_duplicate=False)}


def _drop_frozen(models, weights, _output_dir) -> None:
    """accelerate's save-state hook: the state dicts it is about to write lose their frozen weights."""
    for model, state in zip(models, weights):
        for name in set(state) - kept_names(model):
            del state[name]


def save_state(accelerator, folder: Path) -> None:
    """accelerate.save_state without frozen weights. DeepSpeed writes its own files: its engine
    leaves them out itself (exclude_frozen_parameters; the other backends ignore the flag)."""
    hook = accelerator.register_save_state_pre_hook(_drop_frozen)
    try:
        accelerator.save_state(str(folder), exclude_frozen_parameters=True)
    finally:
        hook.remove()


def write_json(path: Path, obj) -> str:
    """Write `obj` as JSON atomically; its digest, taken from the bytes written (not reread)."""
    text = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
    atomic_write_text(path, text)
    return of_bytes(text.encode())


def prune(out_dir: Path, keep: int | None, run_id: str) -> None:
    """Keep the newest `keep` checkpoints of this run (`run_id`); another run's are neither
    removed nor counted, so a newer one of theirs cannot push out this run's own."""
    if keep is None:
        return
    for old in [p for p in list_checkpoints(out_dir) if _run_id(p) == run_id][:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _run_id(path: Path) -> str | None:
    try:
        return read_state(path).run_id
    except ConfigError:
        return None  # unreadable: not provably this run's, so kept


def files_of(folder: Path) -> dict[str, Path]:
    """relative path -> file, for every file in a checkpoint but the checksum list."""
    return {f.relative_to(folder).as_posix(): f for f in sorted(folder.rglob("*"))
            if f.is_file() and f.name != CHECKSUMS}


def checksums(folder: Path, known: dict[str, str] | None = None) -> dict[str, list]:
    """relative path -> [size, digest] of every file in a checkpoint (the marker itself excluded),
    hashed in parallel; `known`: the digests of files hashed as they were written."""
    files, known = files_of(folder), known or {}
    todo = [name for name in files if name not in known]
    hashed = dict(zip(todo, of_files([files[name] for name in todo])))
    return {name: [f.stat().st_size, known.get(name) or hashed[name]] for name, f in files.items()}


def damage(path: Path) -> str | None:
    """What is wrong with a checkpoint folder, or None when it is intact. With a checksum list
    (sftkit >= 0.1 state version 3) every file must match it and no other file may be there;
    older checkpoints get the checks their layout allows."""
    try:
        values = json.loads((path / TRAINER_STATE).read_text())
        TrainState.from_dict(values)
    except (OSError, ValueError, TypeError, AttributeError, ConfigError) as err:  # AttributeError: not an object
        return f"{TRAINER_STATE} is unreadable ({str(err).splitlines()[0][:120]})"
    marker = path / CHECKSUMS
    if not marker.is_file():
        if values.get("version", 1) >= 3:  # which always wrote one
            return f"{CHECKSUMS} is missing (a copy cut short?)"
        if not any((path / STATE_DIR).glob("*")) or not any((path / MODEL_DIR).glob("*")):
            return f"{STATE_DIR}/ or {MODEL_DIR}/ is missing or empty (a copy cut short?)"
        return None
    listed = read_checksums(marker)
    if listed is None:
        return f"{CHECKSUMS} is unreadable"
    return mismatch(listed, files_of(path))


def read_checksums(marker: Path) -> dict[str, list] | None:
    """The checksum list, or None when it is not one: {name: [size, digest]}."""
    try:
        listed = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(listed, dict):
        return None
    entries = listed.values()
    ok = all(isinstance(v, list) and len(v) == 2 and isinstance(v[0], int) and isinstance(v[1], str) for v in entries)
    return listed if ok else None


def mismatch(listed: dict[str, list], files: dict[str, Path]) -> str | None:
    """The first file that is missing, added, or differs from the list: sizes first (free), then
    the digests, all files at once in parallel threads, each with the hash it was listed with."""
    for name in sorted(set(listed) | set(files)):
        if name not in files:
            return f"{name} is missing"
        if name not in listed:
            return f"{name} was not written by sftkit (an added file is never loaded)"
        if files[name].stat().st_size != listed[name][0]:
            return f"{name} differs from what was saved (size)"
    names = sorted(files)
    found = of_files([files[n] for n in names], [algo_of(listed[n][1]) for n in names])
    for name, got in zip(names, found):
        if got != listed[name][1]:
            return f"{name} differs from what was saved (checksum)"
    return None


def load_checkpoint(accelerator, path: Path, scheduler, model=None, optimizer=None) -> TrainState:
    """Weights, optimizer, RNG states (accelerate, which reads with weights_only=True; an FSDP2
    checkpoint's through DCP, on any number of ranks, sharded or not), the scheduler (JSON; older
    checkpoints: accelerate's pickle, read with weights_only=True), state."""
    legacy = path / STATE_DIR / LEGACY_SCHEDULER
    sharded = (path / STATE_DIR / DCP_DIR).is_dir()
    if model is not None and is_sharded(model) and not sharded:
        raise ConfigError(f"{path} was written by a run without FSDP2, whose optimizer state cannot be sharded here; "
                          "resume it with the accelerate config that wrote it (multi_gpu.yaml or a deepspeed_*.yaml)")
    if sharded and model is None:
        raise ValueError("an FSDP2 checkpoint loads into the model and optimizer: pass them")
    if (path / SCHEDULER_FILE).is_file():
        scheduler.load_state_dict(json.loads((path / SCHEDULER_FILE).read_text()))
        if sharded:  # unwrap_model leaves a sharded model as it is
            unwrapped = accelerator.unwrap_model(model)
            load_sharded(unwrapped, optimizer, path / STATE_DIR, kept_names(unwrapped))
        else:
            load_state(accelerator, path / STATE_DIR)
        return read_state(path)
    if legacy.is_file():
        import torch

        try:
            scheduler.load_state_dict(torch.load(legacy, weights_only=True))
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:  # not plain data: never run
            raise ConfigError(f"{legacy} holds more than plain data ({str(err).splitlines()[0][:120]}); refused: "
                              "resume from another checkpoint") from None
    # accelerate would load the legacy pickle itself, with weights_only=False: it sees the state
    # folder without it (links to the other files)
    with tempfile.TemporaryDirectory(prefix=".sftkit-load-") as view:
        for item in (path / STATE_DIR).iterdir():
            if item.name != LEGACY_SCHEDULER:
                (Path(view) / item.name).symlink_to(item.resolve())
        load_state(accelerator, Path(view))
    return read_state(path)


def load_state(accelerator, folder: Path) -> None:
    """accelerate.load_state, where the weights file may hold only what trains (state version 4)
    or everything (before): the model is loaded here (load_weights), accelerate loads the rest.
    DeepSpeed's engine loads its own files, without the frozen weights it left out."""
    hook = accelerator.register_load_state_pre_hook(load_weights)
    try:
        if accelerator.state.deepspeed_plugin is not None:
            accelerator.load_state(str(folder), load_module_strict=False)
        else:
            accelerator.load_state(str(folder))
    finally:
        hook.remove()


def load_weights(models: list, folder: str) -> None:
    """accelerate's load-state hook: each model's model{_i}.safetensors, which must hold every
    parameter that trains and may hold frozen ones (older checkpoints) but nothing else; the
    models it loaded leave the list, so that accelerate does not load them again."""
    from safetensors.torch import load_model

    for i, model in enumerate(models):
        file = Path(folder) / f"model{f'_{i}' if i else ''}.safetensors"
        if not file.is_file():
            return  # not a layout sftkit writes: accelerate's own loader decides
        frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
        try:
            missing, unexpected = load_model(model, str(file), strict=False)
        except RuntimeError as err:  # torch's size mismatch: one line per tensor
            from sftkit.fit import mismatch_error

            line = mismatch_error(err, file, "this run loads")
            if line is None:
                raise
            raise line from None
        missing, unexpected = set(missing) & kept_names(model), set(unexpected) - frozen
        if missing or unexpected:
            what = f"lacks {len(missing)} weight(s) that train" if missing else f"holds {len(unexpected)} unknown tensor(s)"
            example = min(missing or unexpected)
            raise ConfigError(f"{file} {what} (e.g. {example}): it was written for another model; resume from "
                              "a checkpoint of this run, or start a new run")
    models.clear()


# ---- FSDP2's state/: torch.distributed.checkpoint (DCP), sharded as trained, resharded as loaded ----


def save_sharded(model, optimizer, folder, keep: set[str]) -> None:
    """Every rank writes its own shards of the weights that train (`keep`: never a frozen base
    weight) and of the optimizer's moments, keyed by parameter name, and its RNG states; DCP's
    coordinator (rank 0) writes the metadata once every rank's files are in, so a checkpoint holds
    the whole state however many ranks wrote it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
    state = {"model": {k: v for k, v in get_model_state_dict(model).items() if k in keep},
             "optim": get_optimizer_state_dict(model, inner)}
    dcp.save(state, checkpoint_id=str(folder / DCP_DIR))
    save_rng(folder)


def load_sharded(model, optimizer, folder, keep: set[str]) -> None:
    """The state save_sharded wrote, into this run's model and optimizer: sharded or not, on any
    number of ranks (DCP reads each rank's slices of every tensor by name)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    inner = getattr(optimizer, "optimizer", optimizer)
    state = {"model": {k: v for k, v in get_model_state_dict(model).items() if k in keep},
             "optim": get_optimizer_state_dict(model, inner)}
    dcp.load(state, checkpoint_id=str(folder / DCP_DIR))
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
    set_optimizer_state_dict(model, inner, state["optim"])
    load_rng(folder)


def rng_file(folder, rank: int):
    return folder / RNG_FILE.format(rank=rank)


def save_rng(folder) -> None:
    """This rank's torch (and CUDA) RNG states, for the dropout masks a resumed run must repeat."""
    import torch
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(states, rng_file(folder, rank))


def load_rng(folder) -> None:
    """This rank's saved RNG states; a rank the checkpoint has none of (more ranks than wrote it)
    takes rank 0's."""
    import torch
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    path = rng_file(folder, rank)
    states = torch.load(path if path.is_file() else rng_file(folder, 0), weights_only=True)
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
