"""What each CLI command does, between parsing (cli.py) and the work (data/, train.py, merge.py, ...)."""

from __future__ import annotations

import json
from pathlib import Path

from sftkit.config import GenerationOptions, MergeOptions, SFTConfig
from sftkit.errors import ConfigError
from sftkit.progress import console


def prepare_command(cfg: SFTConfig, inspect_n: int = 0) -> dict:
    from sftkit.data.prepare import load_prepared, prepare
    from sftkit.models import load_tokenizer
    from sftkit.report import print_examples, print_manifest
    from sftkit.run_dir import check_output_dir

    con = console()
    out = Path(cfg.output_dir)
    if inspect_n < 0:
        raise ConfigError(f"--inspect must be at least 0, got {inspect_n}")
    check_output_dir(out, cfg.data_path)
    tokenizer = load_tokenizer(cfg.model_name_or_path, cfg.trust_remote_code, cfg.chat_template)
    manifest = prepare(cfg.data_options(), cfg.data_path, out, tokenizer, con, cfg.mixing())
    print_manifest(manifest, out, con)
    if inspect_n:
        print_examples(load_prepared(out), tokenizer, inspect_n, con)
    return manifest


def train_command(cfg: SFTConfig) -> dict:
    from accelerate import PartialState

    from sftkit.train import run

    con = console()
    summary = run(cfg, con)
    if not PartialState().is_main_process:
        return summary
    if summary["event"] == "stopped":
        config = Path(cfg.output_dir) / "config.yaml"
        con.print(f"stopped at step {summary['step']}: saved {summary['checkpoint']}. Resume with the same launcher:\n"
                  f"  sftkit train --config {config} --resume_from_checkpoint latest", highlight=False)
        return summary
    con.print(f"done: {summary['step']} steps in {summary['elapsed_s']:.1f}s; model in {Path(cfg.output_dir) / 'final'}",
              highlight=False)
    if summary.get("skipped_steps"):
        con.print(f"[yellow]warning: {summary['skipped_steps']} of the {summary['step']} steps had a nan or inf "
                  "gradient and were skipped (--skip_nan_steps); see skipped_steps in metrics.jsonl[/yellow]",
                  highlight=False)
    if "final_eval" in summary:  # a stop signal came during the final eval: the model is complete
        con.print(f"the final eval was {summary['final_eval']}; run it with: sftkit eval --model "
                  f"{Path(cfg.output_dir) / 'final'} --data_path {cfg.eval_data_path}", highlight=False)
    return summary


def eval_command(model_path: str, cfg: SFTConfig, output_dir: Path | None,
                 gen: GenerationOptions | None = None) -> dict:
    """Loss and perplexity over the set; with gen.num_samples > 0, also completions for that
    many prompts (samples.jsonl) and exact match, token F1 and ROUGE-L against the references."""
    from sftkit.accel import make_accelerator
    from sftkit.data.dataset import prepared_dir
    from sftkit.data.prepare import load_prepared
    from sftkit.evaluate import evaluate_loss
    from sftkit.io import atomic_write_json
    from sftkit.models import load_for_eval
    from sftkit.report import print_eval

    con = console()
    out = eval_output_dir(model_path, cfg.data_path, output_dir)
    accelerator = make_accelerator(cfg)
    model, tokenizer = load_for_eval(model_path, cfg)
    with accelerator.main_process_first():
        data_dir = prepared_dir(cfg.data_options(), cfg.data_path, tokenizer,
                                con if accelerator.is_main_process else None)
    dataset = load_prepared(data_dir)
    model = accelerator.prepare(model)
    result = evaluate_loss(model, dataset, accelerator, cfg.per_device_eval_batch_size, tokenizer.pad_token_id)
    result.update(model=str(model_path), data=cfg.data_path)
    if gen is not None and gen.num_samples > 0:
        from sftkit.generate import generate_samples, reference_metrics
        from sftkit.io import atomic_write_text

        samples = generate_samples(accelerator, accelerator.unwrap_model(model), tokenizer, cfg, gen)
        if accelerator.is_main_process:
            atomic_write_text(out / "samples.jsonl", "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
            result.update(generation=reference_metrics(samples), num_samples=len(samples))
    if accelerator.is_main_process:
        atomic_write_json(out / "eval.json", result)
        print_eval(result, out / "eval.json", con)
    return result


def eval_output_dir(model_path: str, data_paths: list[str], output_dir: Path | None) -> Path:
    """Where eval writes eval.json and samples.jsonl: --output_dir, else eval/ beside the model
    (OUT/checkpoint-6 -> OUT/eval; a file inside a checkpoint would count as damage), else ./eval
    for a model named by id. Never a file, nor a folder that is, holds or lies inside an input."""
    from sftkit.io import check_not_a_file, check_not_an_input, check_writable

    model = Path(model_path)
    out = Path(output_dir) if output_dir is not None else model.resolve().parent / "eval" if model.is_dir() \
        else Path("eval")
    check_not_a_file(out)
    check_not_an_input(out, [model_path, *data_paths])
    check_writable(out, "eval.json's folder", "pass --output_dir to write eval.json elsewhere")
    return out


def merge_command(adapter: Path, output_dir: Path, opts: MergeOptions) -> float:
    """Merge, then say what was merged, how closely the saved model matches, and where it is."""
    from sftkit.merge import PROBES, merge_adapter

    con = console()
    report = merge_adapter(adapter, output_dir, opts)
    con.print(f"merged {report.adapter} into {report.base} ({report.dtype})"
              f"{'; untied lm_head from embed_tokens' if report.untied else ''}")
    con.print(f"max |logit difference| vs base + adapter on {len(PROBES)} prompts: {report.max_logit_diff:.2e}")
    con.print(f"saved to {output_dir}")
    return report.max_logit_diff
