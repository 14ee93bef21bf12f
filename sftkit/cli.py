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

from sftkit.config import COMMAND_OPTIONS, SFTConfig, eval_fields, field_docs, group_of, prepare_fields
from sftkit.errors import SftkitError
from sftkit.options import cli_type, default_of

CONFIG_OPTION = typer.Option(None, "--config", help="A YAML run file; flags given here override its values.")


def _default_text(f: dataclasses.Field) -> str:
    value = default_of(f)
    if value in (None, [], ""):
        return ""
    return f" [default: {','.join(value) if isinstance(value, list) else value}]"


def config_options(fields: list[dataclasses.Field], docs: dict[str, str], panel: str | None = None,
                   help_overrides: dict[str, str] | None = None) -> list[inspect.Parameter]:
    """One `--name` option per field; unset options stay None so YAML values and defaults survive."""
    params = []
    for f in fields:
        flag_type = cli_type(f)
        names = f"--{f.name}/{f.metadata.get('off_flag', '--no-' + f.name)}" if flag_type is Optional[bool] else f"--{f.name}"
        text = (help_overrides or {}).get(f.name, docs.get(f.name, "")) + _default_text(f)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=flag_type,
                                        default=typer.Option(None, names, help=text, show_default=False,
                                                             rich_help_panel=(panel or group_of(f)).title())))
    return params


def sft_options(fields: list[dataclasses.Field], help_overrides: dict[str, str] | None = None) -> list[inspect.Parameter]:
    return config_options(fields, field_docs(), None, help_overrides)


def command_options(command: str) -> list[inspect.Parameter]:
    cls = COMMAND_OPTIONS[command]
    return config_options(dataclasses.fields(cls), field_docs(cls), command)


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


def split_options(overrides: dict[str, Any], cls: type) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the values that belong to `cls`'s fields, the rest)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return ({k: v for k, v in overrides.items() if k in names}, {k: v for k, v in overrides.items() if k not in names})


def load_config(config: Path | None, overrides: dict[str, Any]) -> SFTConfig:
    if config is not None:
        return SFTConfig.from_yaml(config, overrides)
    return SFTConfig.from_dict(overrides, source="command line")


def build_app() -> typer.Typer:
    app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                      help="Supervised fine-tuning of Qwen3 models. Run `sftkit COMMAND --help` for options.")
    prep_help = {"output_dir": "Directory for the prepared set: dataset/, manifest.json, lengths.png."}

    @app.command("prepare-data")
    @with_options(sft_options(prepare_fields(), prep_help))
    def prepare_data(config: Path | None = CONFIG_OPTION,
                     inspect_n: int = typer.Option(0, "--inspect", help="Print N rendered examples with the "
                                                   "supervised tokens highlighted."),
                     overrides: dict = None):
        """Render data with the chat template, tokenize, mask non-assistant tokens, and save."""
        from sftkit.commands import prepare_command

        prepare_command(load_config(config, overrides), inspect_n)

    @app.command("train")
    @with_options(sft_options(dataclasses.fields(SFTConfig)))
    def train(config: Path | None = CONFIG_OPTION, overrides: dict = None):
        """Fine-tune (LoRA or full). Run under `accelerate launch -m sftkit train` for several processes."""
        from sftkit.commands import train_command

        train_command(load_config(config, overrides))

    @app.command("eval")
    @with_options(sft_options(eval_fields()) + command_options("eval"))
    def evaluate(model: str = typer.Option(..., "--model", help="A final/ or checkpoint directory, a merged "
                                           "model, an adapter directory, or a base model."),
                 output_dir: Path | None = typer.Option(None, "--output_dir", help="Where eval.json and "
                                                           "samples.jsonl go. Default: the model directory."),
                 overrides: dict = None):
        """Token-mean loss and perplexity of a model on a data set, and optionally generations with
        exact match, token F1 and ROUGE-L against the references."""
        from sftkit.commands import eval_command
        from sftkit.config import GenerationOptions

        gen, rest = split_options(overrides, GenerationOptions)
        eval_command(model, load_config(None, rest), output_dir, GenerationOptions(**gen))

    @app.command("merge-lora")
    @with_options(command_options("merge-lora"))
    def merge_lora(adapter: Path = typer.Option(..., "--adapter", help="The adapter directory (final/ or a checkpoint)."),
                   output_dir: Path = typer.Option(..., "--output_dir", help="Where the standalone model goes."),
                   overrides: dict = None):
        """Merge a LoRA adapter into its base model and save a standalone model."""
        from sftkit.commands import merge_command
        from sftkit.config import MergeOptions

        merge_command(adapter, output_dir, MergeOptions(**overrides))

    return app


def main() -> None:
    build_app()(prog_name="sftkit")


if __name__ == "__main__":
    sys.exit(main())
