"""What each CLI command does, between parsing (cli.py) and the work (data/, train.py, ...)."""

from __future__ import annotations

import json
from pathlib import Path

from sftkit.config import SFTConfig
from sftkit.progress import console


def prepare_command(cfg: SFTConfig, inspect_n: int = 0) -> dict:
    from sftkit.data.prepare import load_prepared, prepare
    from sftkit.models import load_tokenizer
    from sftkit.report import print_examples, print_manifest

    con = console()
    tokenizer = load_tokenizer(cfg.model_name_or_path, cfg.trust_remote_code, cfg.chat_template)
    out = Path(cfg.output_dir)
    manifest = prepare(cfg, cfg.data_path, out, tokenizer, con, cfg.data_weights)
    print_manifest(manifest, out, con)
    if inspect_n:
        print_examples(load_prepared(out), tokenizer, inspect_n, con)
    return manifest


def train_command(cfg: SFTConfig) -> dict:
    from sftkit.train import run

    from accelerate import PartialState

    con = console()
    summary = run(cfg, con)
    if not PartialState().is_main_process:
        return summary
    if summary.get("ranks_in_sync") is False:
        con.print("[red]warning: the ranks ended with different weights; check the launch (see README)[/red]")
    con.print(f"done: {summary['step']} steps in {summary['elapsed_s']:.1f}s; model in {Path(cfg.output_dir) / 'final'}")
    return summary


def eval_command(model_path: str, cfg: SFTConfig, output_dir: Path | None) -> dict:
    from sftkit.accel import make_accelerator
    from sftkit.data.prepare import load_prepared
    from sftkit.dataset import prepared_dir
    from sftkit.evaluate import evaluate_loss
    from sftkit.io import atomic_write_json
    from sftkit.load import load_for_eval
    from sftkit.report import print_eval

    con = console()
    accelerator = make_accelerator(cfg)
    model, tokenizer = load_for_eval(model_path, cfg)
    with accelerator.main_process_first():
        data_dir = prepared_dir(cfg, cfg.data_path, tokenizer, con if accelerator.is_main_process else None)
    dataset = load_prepared(data_dir)
    model = accelerator.prepare(model)
    result = evaluate_loss(model, dataset, accelerator, cfg.per_device_eval_batch_size, tokenizer.pad_token_id)
    result.update(model=str(model_path), data=cfg.data_path)
    if accelerator.is_main_process:
        out = Path(output_dir or (model_path if Path(model_path).is_dir() else "."))
        atomic_write_json(out / "eval.json", result)
        print_eval(result, out / "eval.json", con)
    return result


def print_json(obj) -> None:
    print(json.dumps(obj, indent=2))
