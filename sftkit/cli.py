"""The `sftkit` command: prepare-data, train, eval, merge-lora.

Options come from SFTConfig's fields (name, type, docstring's first paragraph), so a default is
written in one place.
Heavy imports happen inside the commands: `sftkit --help` stays instant.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer
from typer.core import TyperCommand

from sftkit.config import COMMAND_OPTIONS, SFTConfig, eval_fields, field_help, group_of, prepare_fields
from sftkit.errors import ConfigError, NothingToDo, SftkitError, clip
from sftkit.options import cli_type, default_of

CONFIG_OPTION = typer.Option(None, "--config", help="A YAML run file; flags given here override its values.")
RUN_FILE_ARGUMENT = typer.Argument(None, help="A YAML run file, as --config takes it.", show_default=False)
VERBOSE = inspect.Parameter("verbose", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=typer.Option(
    False, "--verbose", help="Show the third-party warnings and progress bars that sftkit hides as expected."))


RUN_FILES = (".yaml", ".yml")  # `sftkit train RUN.yaml`: the run file as the command's argument
# What click's BOOL accepts after a boolean flag: `--use_lora true` as HF-style scripts pass it.
BOOL_WORDS = {"1", "0", "true", "false", "t", "f", "yes", "no", "y", "n", "on", "off"}


def _default_text(f: dataclasses.Field) -> str:
    """" [default: X] [range: R]", escaped: rich would read an unescaped [default: X] as markup
    and drop it."""
    from rich.markup import escape

    value = default_of(f)
    text = "" if value in (None, [], "") else \
        f" [default: {', '.join(map(str, value)) if isinstance(value, list) else value}]"
    if "range" in f.metadata:
        text += f" [range: {f.metadata['range'].bounds()}]"
    return escape(text)


def config_options(fields: list[dataclasses.Field], docs: dict[str, str], panel: str | None = None,
                   help_overrides: dict[str, str] | None = None) -> list[inspect.Parameter]:
    """One `--name` option per field; unset options stay None so YAML values and defaults survive.
    A boolean is one option that takes an optional value (see BoolFlagCommand): one name column,
    so the names fit an 80-column terminal."""
    from rich.markup import escape

    params = []
    for f in fields:
        flag_type = cli_type(f)
        is_bool = flag_type is Optional[bool]
        # escaped: rich would read the `[wandb]` of `pip install 'sftkit[wandb]'` as markup and drop it
        text = escape((help_overrides or {}).get(f.name, docs.get(f.name, ""))) + _default_text(f)
        # a boolean is read as text and converted by `with_options`: a click flag takes no value
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                                        annotation=Optional[str] if is_bool else flag_type,
                                        default=typer.Option(None, f"--{f.name}", help=text, show_default=False,
                                                             metavar="BOOL" if is_bool else None,
                                                             rich_help_panel=(panel or group_of(f)).title())))
    return params


def bool_fields() -> dict[str, dataclasses.Field]:
    """Every boolean option of every command, by flag."""
    fields = [*dataclasses.fields(SFTConfig), *(f for cls in COMMAND_OPTIONS.values() for f in dataclasses.fields(cls))]
    return {f"--{f.name}": f for f in fields if cli_type(f) is Optional[bool]}


def normalize_bool_flags(args: list[str]) -> list[str]:
    """`--flag` -> `--flag true`; `--no-flag` (and a field's off_flag, eval's `--greedy`) ->
    `--flag false`; `--flag false` stays. Everything after a bare `--` is left alone."""
    flags = bool_fields()
    aliases = {f"--no-{name[2:]}": name for name in flags}
    aliases.update({f.metadata["off_flag"]: name for name, f in flags.items() if "off_flag" in f.metadata})
    out: list[str] = []
    for i, arg in enumerate(args):
        if arg == "--":
            return out + args[i:]
        if arg in aliases:
            out += [aliases[arg], "false"]
        elif arg in flags and (i + 1 == len(args) or args[i + 1].startswith("-") or args[i + 1].endswith(RUN_FILES)):
            out += [arg, "true"]  # a bare flag; a word after it is its value, but for `train RUN.yaml`
        else:
            out.append(arg)
    return out


def parse_bools(values: dict[str, Any]) -> dict[str, Any]:
    """The text of boolean options as bool; anything else unchanged."""
    flags = bool_fields()
    out = dict(values)
    for name, value in values.items():
        if f"--{name}" in flags and isinstance(value, str):
            if value.lower() not in BOOL_WORDS:
                raise ConfigError(f"--{name} {clip(value)}: expected true or false")
            out[name] = value.lower() in ("1", "true", "t", "yes", "y", "on")
    return out


class BoolFlagCommand(TyperCommand):
    """Booleans accept `--flag`, `--flag true|false` and `--no-flag`, as HF-style scripts pass them."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        return super().parse_args(ctx, normalize_bool_flags(list(args)))


def sft_options(fields: list[dataclasses.Field], help_overrides: dict[str, str] | None = None) -> list[inspect.Parameter]:
    return config_options(fields, field_help(), None, help_overrides)


def command_options(command: str) -> list[inspect.Parameter]:
    cls = COMMAND_OPTIONS[command]
    return config_options(dataclasses.fields(cls), field_help(cls), command)


def with_options(extra: list[inspect.Parameter]) -> Callable:
    """Give `fn(config, overrides, **own)` the signature of its own params plus `extra` options."""
    def wrap(fn):
        own = [p for p in inspect.signature(fn).parameters.values() if p.name != "overrides"]
        names = {p.name for p in extra}

        @functools.wraps(fn)
        def command(verbose: bool = False, **kwargs):
            if not verbose:
                from sftkit.quiet import quiet_third_party

                quiet_third_party()
            overrides = {k: v for k, v in kwargs.items() if k in names and v not in (None, [])}
            rest = {k: v for k, v in kwargs.items() if k not in names}
            try:
                return fn(overrides=parse_bools(overrides), **rest)
            except SftkitError as err:
                typer.secho(f"error: {err}", fg="red", err=True)
                raise typer.Exit(2) from None
            except NothingToDo as done:
                if int(os.environ.get("RANK", "0")) == 0:  # said once, not by every process
                    typer.echo(str(done))
        command.__signature__ = inspect.Signature(own + extra + [VERBOSE])
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


# eval reads data_path as the set to evaluate on: its docstring in DataOptions says "Training data"
EVAL_HELP = {"data_path": "Data to evaluate on: .json/.jsonl/.parquet/.csv files, a directory, a glob, a prepared "
                          "directory (from prepare-data), or a Hugging Face dataset name. Repeat the flag for several."}


PLAN_OPTIONS = {
    "model": typer.Option(None, "--model", help="A local model folder, its config.json, or a family size sftkit "
                          "knows (--list); nothing is downloaded."),
    "gpus": typer.Option("1xH100", "--gpus", help="The devices: NxKIND (8xH100), NxMEMGB (1x24GB), or cpu / Nxcpu "
                         "(this machine's memory)."),
    "data": typer.Option(None, "--data", help="A prepared directory: its token counts give the time for the data, "
                         "its longest example the activations."),
    "json": typer.Option(False, "--json", help="Print JSON for scripts instead of the table."),
    "list": typer.Option(False, "--list", help="List the family sizes sftkit knows, and exit."),
}


def build_app() -> typer.Typer:
    app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                      help="Supervised fine-tuning of Qwen3 models. Run `sftkit COMMAND --help` for options.")

    @app.callback(invoke_without_command=True)
    def top(version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True)):
        if version:
            from sftkit._version import __version__

            typer.echo(f"sftkit {__version__}")
            raise typer.Exit()
    prep_help = {"output_dir": "Directory for the prepared set: dataset/, manifest.json, lengths.png."}

    @app.command("prepare-data", cls=BoolFlagCommand)
    @with_options(sft_options(prepare_fields(), prep_help))
    def prepare_data(config: Path | None = CONFIG_OPTION,
                     inspect_n: int = typer.Option(0, "--inspect", help="Print N rendered examples with the "
                                                   "supervised tokens highlighted."),
                     overrides: dict | None = None):
        """Render data with the chat template, tokenize, mask non-assistant tokens, and save."""
        from sftkit.commands import prepare_command

        prepare_command(load_config(config, overrides), inspect_n)

    @app.command("train", cls=BoolFlagCommand)
    @with_options(sft_options(dataclasses.fields(SFTConfig)))
    def train(run_file: Path | None = RUN_FILE_ARGUMENT, config: Path | None = CONFIG_OPTION, overrides: dict | None = None):
        """Fine-tune (LoRA or full). Run under `accelerate launch -m sftkit train` for several processes."""
        from sftkit.commands import train_command
        from sftkit.signals import EXIT_STOPPED

        if run_file is not None and config is not None and run_file != config:
            raise ConfigError(f"two run files: {run_file} and --config {config}; pass one")
        summary = train_command(load_config(run_file or config, overrides))
        if summary["event"] == "stopped" or "final_eval" in summary:
            raise typer.Exit(EXIT_STOPPED)

    @app.command("eval", cls=BoolFlagCommand)
    @with_options(sft_options(eval_fields(), EVAL_HELP) + command_options("eval"))
    def evaluate(model: str = typer.Option(..., "--model", help="A final/ or checkpoint directory, a merged "
                                           "model, an adapter directory, or a base model."),
                 output_dir: Path | None = typer.Option(None, "--output_dir", help="Where eval.json and "
                                                           "samples.jsonl go. Default: eval/ beside the model "
                                                           "(./eval for a model id)."),
                 overrides: dict | None = None):
        """Token-mean loss and perplexity of a model on a data set, and optionally generations with
        exact match, token F1 and ROUGE-L against the references."""
        from sftkit.commands import eval_command
        from sftkit.config import GenerationOptions

        gen, rest = split_options(overrides, GenerationOptions)
        eval_command(model, load_config(None, rest), output_dir, GenerationOptions(**gen))

    @app.command("plan", cls=BoolFlagCommand)
    @with_options(sft_options(dataclasses.fields(SFTConfig)))
    def plan(model: str | None = PLAN_OPTIONS["model"], gpus: str = PLAN_OPTIONS["gpus"],
             data: Path | None = PLAN_OPTIONS["data"], as_json: bool = PLAN_OPTIONS["json"],
             list_sizes: bool = PLAN_OPTIONS["list"], overrides: dict | None = None):
        """Peak memory per GPU, fit, speed and time of every sensible strategy (LoRA / QLoRA / full;
        DDP / ZeRO / FSDP2; checkpointing) for a model and devices, before anything is launched; the
        train flags given shape the run (--max_length, --per_device_train_batch_size, --packing, ...)."""
        from sftkit.commands import plan_command

        plan_command(model, gpus, data, overrides, as_json, list_sizes)

    @app.command("merge-lora", cls=BoolFlagCommand)
    @with_options(command_options("merge-lora"))
    def merge_lora(adapter: Path = typer.Option(..., "--adapter", help="The adapter directory (final/ or a checkpoint)."),
                   output_dir: Path = typer.Option(..., "--output_dir", help="Where the standalone model goes."),
                   overrides: dict | None = None):
        """Merge a LoRA adapter into its base model and save a standalone model."""
        from sftkit.commands import merge_command
        from sftkit.config import MergeOptions

        merge_command(adapter, output_dir, MergeOptions(**overrides))

    return app


def main() -> None:
    build_app()(prog_name="sftkit")


if __name__ == "__main__":
    sys.exit(main())
