"""What each CLI command does, between parsing (cli.py) and the work (data/, train.py, merge.py, ...)."""

from __future__ import annotations

import json
from pathlib import Path

from sftkit.checkpoint import FINAL_DIR
from sftkit.config import GenerationOptions, MergeOptions, SFTConfig
from sftkit.errors import ConfigError, clip
from sftkit.prechecks import check_data, check_eval, check_hub_name, check_train
from sftkit.progress import console


def prepare_command(cfg: SFTConfig, inspect_n: int = 0) -> dict:
    from sftkit.data.prepare import load_prepared, prepare
    from sftkit.models import load_image_spec, load_tokenizer
    from sftkit.report import print_examples, print_manifest
    from sftkit.run_dir import check_output_dir

    con = console()
    out = Path(cfg.output_dir)
    if inspect_n < 0:
        raise ConfigError(f"--inspect must be at least 0, got {inspect_n}")
    check_output_dir(out, cfg.data_path)
    check_data(cfg.data_path, cfg)
    check_hub_name(cfg.model_name_or_path)
    tokenizer = load_tokenizer(cfg.model_name_or_path, cfg.trust_remote_code, cfg.chat_template)
    manifest = prepare(cfg.data_options(), cfg.data_path, out, tokenizer, con, cfg.mixing(),
                       image_spec=load_image_spec(cfg.model_name_or_path, tokenizer))
    print_manifest(manifest, out, con)
    if inspect_n:
        print_examples(load_prepared(out), tokenizer, inspect_n, con)
    return manifest


def train_command(cfg: SFTConfig) -> dict:
    check_train(cfg)  # before torch and accelerate import, which takes seconds
    from accelerate import PartialState

    from sftkit.train import run

    con = console()
    summary = run(cfg, con)
    if not PartialState().is_main_process:
        return summary
    if summary["event"] == "stopped":
        config = Path(cfg.output_dir).absolute() / "config.yaml"  # its paths are absolute too: any folder
        con.print(f"stopped at step {summary['step']}: saved {summary['checkpoint']}. Resume with the same launcher:\n"
                  f"  sftkit train --config {config} --resume_from_checkpoint latest", highlight=False)
        return summary
    con.print(end_line(summary, cfg), highlight=False)
    if summary.get("skipped_steps"):
        con.print(f"[yellow]warning: {summary['skipped_steps']} of the {summary['step']} steps had a nan or inf "
                  "gradient and were skipped (--skip_nan_steps); see skipped_steps in metrics.jsonl[/yellow]",
                  highlight=False)
    if "final_eval" in summary:  # a stop signal came during the final eval: the model is complete
        con.print(f"the final eval was {summary['final_eval']}; run it with: sftkit eval --model "
                  f"{Path(cfg.output_dir) / FINAL_DIR} --data_path {cfg.eval_data_path}", highlight=False)
    return summary


def end_line(summary: dict, cfg: SFTConfig) -> str:
    """`done: 8 steps in 12.3s; train loss 0.0213; eval loss 11.9 (perplexity 1.5e+05); model in
    ...; tensorboard logs in ...`: what the run ended with and where its outputs are."""
    out, n = Path(cfg.output_dir), summary["step"]
    parts = [f"done: {n} step{'s' * (n != 1)} in {summary['elapsed_s']:.1f}s"]
    if summary.get("train_loss") is not None:
        parts.append(f"train loss {summary['train_loss']:.4f}")
    if summary.get("eval_loss") is not None:
        parts.append(f"eval loss {summary['eval_loss']:.4f} (perplexity {summary['eval_ppl']:.4g})")
    parts.append(f"model in {out / FINAL_DIR}")
    # accelerate's trackers log under project_dir (our output_dir) / the run's name
    run_name = cfg.run_name or out.name
    for tracker in cfg.trackers or []:
        if tracker == "tensorboard":
            parts.append(f"tensorboard logs in {out / run_name}")
        elif tracker == "wandb":
            parts.append(f"wandb project {run_name}")
    return "; ".join(parts)


def eval_command(model_path: str, cfg: SFTConfig, output_dir: Path | None,
                 gen: GenerationOptions | None = None) -> dict:
    """Loss and perplexity over the set; with gen.num_samples > 0, also completions for that
    many prompts (samples.jsonl) and exact match, token F1 and ROUGE-L against the references."""
    out = check_eval(model_path, cfg, output_dir)  # before torch imports, as in train
    from sftkit.accel import make_accelerator
    from sftkit.arch.vision import vision_of
    from sftkit.data.dataset import prepared_dir
    from sftkit.data.prepare import load_prepared
    from sftkit.evaluate import eval_image_spec, eval_tokenizer, evaluate_loss, load_for_eval
    from sftkit.io import atomic_write_json
    from sftkit.report import print_eval

    con = console()
    accelerator = make_accelerator(cfg)
    tokenizer = eval_tokenizer(model_path, cfg)  # its chat template is checked before any weights load
    image_spec = eval_image_spec(model_path, cfg, tokenizer)
    with accelerator.main_process_first():
        data_dir = prepared_dir(cfg.data_options(), cfg.data_path, tokenizer,
                                con if accelerator.is_main_process else None, image_spec=image_spec)
    dataset = load_prepared(data_dir)
    images = "images" in dataset.column_names
    model, tokenizer = load_for_eval(model_path, cfg, vision=images)
    model = accelerator.prepare(model)
    vision = vision_of(accelerator.unwrap_model(model).config, image_spec.processor,
                       tokenizer.convert_tokens_to_ids(image_spec.token)) if images else None
    result = evaluate_loss(model, dataset, accelerator, cfg.per_device_eval_batch_size, tokenizer.pad_token_id,
                           vision=vision)
    result.update(model=str(model_path), data=cfg.data_path)
    if gen is not None and gen.num_samples > 0:
        from sftkit.generate import generate_samples, reference_metrics
        from sftkit.io import atomic_write_text

        samples = generate_samples(accelerator, accelerator.unwrap_model(model), tokenizer, cfg, gen,
                                   image_spec if images else None)
        if accelerator.is_main_process:
            atomic_write_text(out / "samples.jsonl", "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
            result.update(generation=reference_metrics(samples), num_samples=len(samples))
    if accelerator.is_main_process:
        atomic_write_json(out / "eval.json", result)
        print_eval(result, out / "eval.json", con)
    return result


def merge_command(adapter: Path, output_dir: Path, opts: MergeOptions) -> float:
    """Merge, then say what was merged, how closely the saved model matches, and where it is."""
    from sftkit.merge import PROBES, merge_adapter

    con = console()
    report = merge_adapter(adapter, output_dir, opts)
    # not "merged X into BASE", which reads as if it wrote into the base model's folder
    con.print(f"merged the adapter {report.adapter} with its base model {report.base} ({report.dtype})"
              f"{'; untied lm_head from embed_tokens' if report.untied else ''}")
    cast = "" if report.dtype == "float32" else f" (in float32, before the cast to {report.dtype})"
    con.print(f"max |logit difference| vs base + adapter on {len(PROBES)} prompts: {report.max_logit_diff:.2e}{cast}")
    con.print(f"saved to {output_dir}")
    return report.max_logit_diff


def flag_args(name: str, value) -> list[str]:
    """One option as the command line spells it (a list: the flag repeated)."""
    if isinstance(value, bool):
        return [f"--{name}"] if value else [f"--{name}", "false"]
    if isinstance(value, list):
        return [a for v in value for a in (f"--{name}", str(v))]
    return [f"--{name}", str(value)]


def plan_command(model: str | None, gpus: str, data: Path | None, overrides: dict, as_json: bool = False,
                 list_sizes: bool = False) -> list:
    """`sftkit plan`: every sensible strategy's peak memory, fit, speed and time for the data, from
    the model's config alone; the best one's command line. `overrides`: the train flags given."""
    import dataclasses

    from sftkit.plan import family_table

    if list_sizes:
        for name, values in family_table().items():
            print(f"{name}  ({values.get('params_published', '?')} parameters, {values['model_type']})")
        return []
    model = model or overrides.pop("model_name_or_path", None)
    if model is None:
        raise ConfigError("--model is missing: a local model folder, its config.json, or a size from --list")
    train_args = [arg for k, v in overrides.items() if k not in ("model_name_or_path", "data_path")
                  for arg in flag_args(k, v)]
    cfg = SFTConfig.from_dict(overrides, source="command line")

    from sftkit.data.prepare import is_prepared, read_manifest
    from sftkit.plan import (
        Knobs,
        command_line,
        count_params,
        host_memory,
        knobs_of,
        parse_device,
        plan,
        read_config,
        strategy_of,
        workload_of,
    )

    try:
        config = read_config(model)
        if config is not None:
            count_params(config)  # every field the model reads is there and a number
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ConfigError(f"--model {model}: its config cannot be read (a field missing or not a number: "
                          f"{clip(str(err))})") from None
    if config is None:
        raise ConfigError(f"--model {model}: no config.json there, and not a size sftkit knows "
                          "(sftkit plan --list names them); pass a local folder or its config.json")
    try:
        device = parse_device(gpus, host_memory())
    except ValueError:
        raise ConfigError(f"--gpus {gpus}: expected NxKIND (8xH100, 1xA100), NxMEMGB (1x24GB) or cpu / Nxcpu") from None
    manifest = None
    if data is not None:
        if not is_prepared(str(data)):
            raise ConfigError(f"--data {data}: not a prepared directory (sftkit prepare-data writes one)")
        manifest = read_manifest(Path(data))
    knobs: Knobs = knobs_of(cfg, device.cuda)
    if device.cuda:
        knobs = dataclasses.replace(knobs, bf16=True, fp16=False)  # what a GPU run uses
    ests = plan(config, strategy_of(cfg), workload_of(cfg, manifest), device, knobs)
    args = ["--model_name_or_path", model] + (["--data_path", str(data)] if data is not None else []) + train_args
    if as_json:
        print(json.dumps({"model": model, "device": dataclasses.asdict(device), "strategies": [
            {**e.record(), "command": command_line(e.strategy, device, args)} for e in ests]}, indent=1))
        return ests
    print_plan(model, device, ests, cfg, args)
    return ests


def print_plan(model: str, device, ests: list, cfg: SFTConfig, args: list[str]) -> None:
    """sftkit plan's table, what its numbers rest on, and the best strategy's command line."""
    from rich.table import Table

    from sftkit.plan import command_line, duration, human, strategy_of

    con = console()
    what = f"{device.count} x {device.kind}" + (f" ({human(device.memory)} each)" if device.cuda else
                                                f" ({human(device.memory)} of memory)")
    table = Table(title=f"{model} on {what}", title_justify="left")
    for col in ("strategy", "peak / process", "fits", "tokens/s", "time for the data"):
        table.add_column(col, justify="left" if col == "strategy" else "right")
    for e in ests:
        table.add_row(e.strategy.label(), human(e.peak), "yes" if e.fits else "no",
                      "?" if e.tokens_per_s is None else f"{e.tokens_per_s:,.0f}", duration(e.dataset_s))
    con.print(table)
    if device.cuda:
        mfu = "measured on an H100" if device.mfu_measured else "assumed: the H100's measured"
        speed = (f"sftkit's FLOPs count at MFU {device.mfu:.3f} ({mfu}) of {device.peak_tflops:g} TFLOPS"
                 if device.peak_tflops else "unknown for this GPU (no peak TFLOPS on record)")
    else:
        speed = f"sftkit's FLOPs count at {device.peak_tflops:g} TFLOPS a process (measured on a 2-core CPU)"
    con.print(f"speed: {speed}; memory: the peak of one process (weights, gradients, AdamW, activations, the loss "
              f"head{', in bf16' if device.cuda else ', fp32, as resident memory'})", highlight=False)
    mine = [e for e in ests if e.fits and e.strategy.method == strategy_of(cfg).method] or [e for e in ests if e.fits]
    if mine:
        con.print(f"best: {command_line(mine[0].strategy, device, args)}", highlight=False, soft_wrap=True)
    else:
        con.print("[yellow]nothing fits: more GPUs, a shorter --max_length or --per_device_train_batch_size 1[/yellow]")
