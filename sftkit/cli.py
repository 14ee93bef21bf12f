"""The `sftkit` command: prepare-data, train, eval, merge-lora.

Options come from SFTConfig's fields (name, type, docstring), so a default is written once.
Heavy imports happen inside the commands: `sftkit --help` stays instant.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer

from sftkit.config import SFTConfig, field_docs, fields_in
from sftkit.errors import SftkitError

CONFIG_OPTION = typer.Option(None, "--config", help="A YAML run file; flags given here override its values.")


def _option_type(f: dataclasses.Field):
    base = f.type if isinstance(f.type, str) else str(f.type)
    if base == "list[float]":
        return Optional[list[float]]
    if base.startswith("list"):
        return Optional[list[str]]
    if base.startswith("bool"):
        return Optional[bool]
    if base.startswith("int"):
        return Optional[int]
    if base.startswith("float"):
        return Optional[float]
    return Optional[str]


def _default_text(f: dataclasses.Field) -> str:
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if value in (None, [], ""):
        return ""
    return f" [default: {','.join(value) if isinstance(value, list) else value}]"


def config_options(fields: list[dataclasses.Field], help_overrides: dict[str, str] | None = None) -> list[inspect.Parameter]:
    """One `--name` option per SFTConfig field; unset options stay None so YAML values survive."""
    docs = field_docs()
    params = []
    for f in fields:
        names = f"--{f.name}/--no-{f.name}" if _option_type(f) is Optional[bool] else f"--{f.name}"
        text = (help_overrides or {}).get(f.name, docs.get(f.name, "")) + _default_text(f)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=_option_type(f),
                                        default=typer.Option(None, names, help=text, show_default=False,
                                                             rich_help_panel=f.metadata.get("group", "").title())))
    return params


def with_options(extra: list[inspect.Parameter]) -> Callable:
    """Give `fn(config, overrides, **own)` the signature of its own params plus `extra` options."""
    def wrap(fn):
        own = [p for p in inspect.signature(fn).parameters.values() if p.name != "overrides"]
        names = {p.name for p in extra}

        @functools.wraps(fn)
        def command(**kwargs):
            overrides = {k: v for k, v in kwargs.items() if k in names and v not in (None, [])}
            rest = {k: v for k, v in kwargs.items() if k not in names}
            try:
                return fn(overrides=overrides, **rest)
            except SftkitError as err:
                typer.secho(f"error: {err}", fg="red", err=True)
                raise typer.Exit(2) from None
        command.__signature__ = inspect.Signature(own + extra)
        return command
    return wrap


def load_config(config: Path | None, overrides: dict[str, Any]) -> SFTConfig:
    if config is not None:
        return SFTConfig.from_yaml(config, overrides)
    return SFTConfig.from_dict(overrides, source="command line")


def build_app() -> typer.Typer:
    app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                      help="Supervised fine-tuning of Qwen3 models. Run `sftkit COMMAND --help` for options.")

    data_fields = fields_in("model", "data")
    prep_help = {"output_dir": "Directory for the prepared set: dataset/, manifest.json, lengths.png."}

    @app.command("prepare-data")
    @with_options(config_options(data_fields + [f for f in fields_in("train") if f.name == "output_dir"], prep_help))
    def prepare_data(config: Path | None = CONFIG_OPTION,
                     inspect_n: int = typer.Option(0, "--inspect", help="Print N rendered examples with the "
                                                   "supervised tokens highlighted."),
                     overrides: dict = None):
        """Render data with the chat template, tokenize, mask non-assistant tokens, and save."""
        from sftkit.commands import prepare_command

        prepare_command(load_config(config, overrides), inspect_n)

    @app.command("train")
    @with_options(config_options([f for f in dataclasses.fields(SFTConfig)]))
    def train(config: Path | None = CONFIG_OPTION, overrides: dict = None):
        """Fine-tune (LoRA or full). Run under `accelerate launch -m sftkit train` for several processes."""
        from sftkit.commands import train_command

        train_command(load_config(config, overrides))

    eval_fields = [f for f in dataclasses.fields(SFTConfig) if f.name in (
        "data_path", "format_type", "field_map", "max_length", "truncation", "train_on", "reasoning",
        "enable_thinking", "skip_bad_rows", "per_device_eval_batch_size", "attn_implementation",
        "trust_remote_code", "bf16", "dataset_split", "dataset_config")]

    @app.command("eval")
    @with_options(config_options(eval_fields))
    def evaluate(model: str = typer.Option(..., "--model", help="A final/ or checkpoint directory, a merged "
                                           "model, an adapter directory, or a base model."),
                 output_dir: Path | None = typer.Option(None, "--output_dir", help="Where eval.json and "
                                                           "samples.jsonl go. Default: the model directory."),
                 num_samples: int = typer.Option(0, "--num_samples", help="Generate completions for this many "
                                                 "prompts (the conversations up to their last reply)."),
                 max_new_tokens: int = typer.Option(128, "--max_new_tokens", help="Longest completion."),
                 do_sample: bool = typer.Option(False, "--do_sample/--greedy", help="Sample instead of greedy."),
                 temperature: float = typer.Option(0.7, "--temperature", help="Sampling temperature."),
                 top_p: float = typer.Option(0.9, "--top_p", help="Nucleus sampling mass."),
                 overrides: dict = None):
        """Token-mean loss and perplexity of a model on a data set, and optionally generations with
        exact match, token F1 and ROUGE-L against the references."""
        from sftkit.commands import eval_command

        gen = dict(num_samples=num_samples, max_new_tokens=max_new_tokens, do_sample=do_sample,
                   temperature=temperature, top_p=top_p)
        eval_command(model, load_config(None, overrides), output_dir, gen)

    @app.command("merge-lora")
    @with_options([])
    def merge_lora(adapter: Path = typer.Option(..., "--adapter", help="The adapter directory (final/ or a checkpoint)."),
                   output_dir: Path = typer.Option(..., "--output_dir", help="Where the standalone model goes."),
                   dtype: str | None = typer.Option(None, "--dtype", help="float32, bfloat16 or float16. "
                                                       "Default: the base model's dtype."),
                   max_shard_size: str = typer.Option("5GB", "--max_shard_size", help="Largest safetensors "
                                                      "file, e.g. 2GB or 500MB."),
                   overrides: dict = None):
        """Merge a LoRA adapter into its base model and save a standalone model."""
        from sftkit.merge import merge_command

        merge_command(adapter, output_dir, dtype, max_shard_size)

    return app


def main() -> None:
    build_app()(prog_name="sftkit")


if __name__ == "__main__":
    sys.exit(main())
