"""`--help` says what an option is in two short lines; detail lives in docs/CONFIG.md."""

from __future__ import annotations

import textwrap

import typer

from sftkit.cli import build_app
from sftkit.config import COMMAND_OPTIONS, field_docs, field_help

WIDTH, LINES = 100, 2


def _helps() -> dict[str, str]:
    """`command --option` -> its help text as --help shows it, for every option of every command."""
    group = typer.main.get_command(build_app())
    out = {}
    for name, command in group.commands.items():
        for param in command.params:
            if getattr(param, "help", None):
                out[f"{name} {param.opts[0]}"] = param.help.replace("\\[", "[")
    return out


def test_every_option_help_is_at_most_two_short_lines():
    helps = _helps()
    assert "train --learning_rate" in helps and "merge-lora --max_shard_size" in helps
    long = {opt: text for opt, text in helps.items() if len(textwrap.wrap(text, WIDTH)) > LINES}
    assert not long, f"--help over {LINES} lines of {WIDTH} characters (move detail to a later paragraph): {long}"


def test_help_is_the_first_paragraph_of_the_docstring():
    for cls in (None, *COMMAND_OPTIONS.values()):
        docs, helps = (field_docs(), field_help()) if cls is None else (field_docs(cls), field_help(cls))
        assert docs.keys() == helps.keys()
        for name, text in helps.items():
            assert text and docs[name].startswith(text), name
