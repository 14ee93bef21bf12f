"""The checks of a command's inputs that need no model and no heavy import, run first.

torch, transformers and accelerate take seconds to import; these checks run before any of them
is, so a missing file or flag is reported about as fast as a flag typo (bench/time_to_error.py
measures it).
"""

from __future__ import annotations

import os
from pathlib import Path

from sftkit.config import SFTConfig
from sftkit.data.prepare import is_prepared, load_conversations, resolve_sources
from sftkit.errors import DataError
from sftkit.io import check_writable

# Rows of each local file read and validated before anything heavy is imported, so a bad row is
# not reported only after transformers and torch. The reader is prepare-data's own, so the error
# is the one the full read gives; it reads a JSON Lines file only this far, other files whole.
CHECKED_ROWS = 1000


def check_data(specs: list[str], cfg: SFTConfig) -> None:
    """Every data source exists and can be read, and its first CHECKED_ROWS rows are valid rows
    (unless --skip_bad_rows): files, directories and globs are looked up and read (a Hub name is
    left to the loader); no data at all names the flag."""
    if len(specs) == 1 and is_prepared(specs[0]):
        return
    opts = cfg.data_options()
    local = [(i, src) for i, src in resolve_sources(specs, opts) if not src.hub]
    for _, src in local:
        if not os.access(src.path, os.R_OK):
            raise DataError(src.path, "", None, "cannot be read (permission denied)")
    load_conversations(local, opts, limit=CHECKED_ROWS)


# A Hub name without a network: huggingface_hub retries for about a minute (tokenizer, then model)
# and cuts its error line mid-URL. A connect with this time-out says it at once.
HUB_CONNECT_TIMEOUT_S = 3


def check_hub_name(name: str, flag: str = "--model_name_or_path") -> None:
    """A model named by its Hub id can be fetched: HF_HUB_OFFLINE is set (the local cache is then
    used) or the Hub's host answers. A local folder or the built-in preset needs no check."""
    import socket
    from urllib.parse import urlparse

    from sftkit.errors import ConfigError
    from sftkit.models import TINY

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    proxied = any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"))
    if name == TINY or Path(name).expanduser().exists() or offline:
        return
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ConfigError(f"{flag} {name}: no such folder")
    if proxied:  # the Hub is reached through the proxy, whose answer a plain connect cannot tell
        return
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=HUB_CONNECT_TIMEOUT_S).close()
    except OSError as err:
        raise ConfigError(f"{flag} {name}: not a local folder, and the Hugging Face Hub ({endpoint}/{name}) cannot be "
                          f"reached ({err.strerror or err}); set HF_HUB_OFFLINE=1 to load it from the local Hugging "
                          "Face cache, or pass a local model folder") from None


def check_train(cfg: SFTConfig) -> None:
    """`sftkit train`: the training and eval data, and the output folder (claim checks it again,
    with the accelerator, and takes it)."""
    from sftkit.accel import check_deepspeed_file, check_sequence_world, launched_processes
    from sftkit.run_dir import check_output_dir, run_inputs

    check_deepspeed_file(cfg)
    check_sequence_world(cfg.sequence_parallel_size, launched_processes())
    check_output_dir(Path(cfg.output_dir), run_inputs(cfg))
    check_data(cfg.data_path, cfg)
    if cfg.eval_data_path:
        check_data([cfg.eval_data_path], cfg)
    check_hub_name(cfg.model_name_or_path)


def check_eval(model: str, cfg: SFTConfig, output_dir: Path | None) -> Path:
    """`sftkit eval`: the data, and the folder eval.json goes to (eval_output_dir), which it returns."""
    check_data(cfg.data_path, cfg)
    out = eval_output_dir(model, cfg.data_path, output_dir)
    check_hub_name(model, "--model")
    return out


def eval_output_dir(model_path: str, data_paths: list[str], output_dir: Path | None) -> Path:
    """Where eval writes eval.json and samples.jsonl: --output_dir, else eval/ beside the model
    (OUT/checkpoint-6 -> OUT/eval; a file inside a checkpoint would count as damage), else ./eval
    for a model named by id. Never a file, nor a folder that is, holds or lies inside an input."""
    from sftkit.io import check_not_a_file, check_not_an_input

    model = Path(model_path)
    out = Path(output_dir) if output_dir is not None else model.resolve().parent / "eval" if model.is_dir() \
        else Path("eval")
    check_not_a_file(out)
    check_not_an_input(out, [model_path, *data_paths])
    check_writable(out, "eval.json's folder", "pass --output_dir to write eval.json elsewhere")
    return out
