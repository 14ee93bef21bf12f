"""The checks of a command's inputs that need no model and no heavy import, run first.

torch, transformers and accelerate take 8-20 s to import on 2 busy cores: a missing data file
once took 19-22 s to report and a missing --data_path 21 s (train) / 33 s (eval), against 0.5 s
for a flag typo. These run before any of them is imported (bench/time_to_error.py measures it).
"""

from __future__ import annotations

import os
from pathlib import Path

from sftkit.config import SFTConfig
from sftkit.data.prepare import is_prepared, resolve_sources
from sftkit.errors import DataError
from sftkit.io import check_writable


def check_data(specs: list[str], cfg: SFTConfig) -> None:
    """Every data source exists and can be read: files, directories and globs are looked up (a
    Hub name is left to the loader); no data at all names the flag."""
    if len(specs) == 1 and is_prepared(specs[0]):
        return
    for _, src in resolve_sources(specs, cfg.data_options()):
        if not src.hub and not os.access(src.path, os.R_OK):
            raise DataError(src.path, "", None, "cannot be read (permission denied)")


def check_train(cfg: SFTConfig) -> None:
    """`sftkit train`: the training and eval data, and the output folder (claim checks it again,
    with the accelerator, and takes it)."""
    from sftkit.run_dir import check_output_dir, run_inputs

    check_output_dir(Path(cfg.output_dir), run_inputs(cfg))
    check_data(cfg.data_path, cfg)
    if cfg.eval_data_path:
        check_data([cfg.eval_data_path], cfg)


def check_eval(model: str, cfg: SFTConfig, output_dir: Path | None) -> Path:
    """`sftkit eval`: the data, and the folder eval.json goes to, which it returns: the model's
    folder, or --output_dir (a preset or Hub name has no folder of its own to write into)."""
    check_data(cfg.data_path, cfg)
    if output_dir is None and not Path(model).is_dir():
        from sftkit.errors import ConfigError

        raise ConfigError(f"--model {model} is not a folder, so eval.json has nowhere of its own to go; "
                          "pass --output_dir")
    out = Path(output_dir or model)
    check_writable(out, "eval.json's folder", "pass --output_dir to write eval.json elsewhere")
    return out
