"""DataOptions: what the data package needs to read, render and prepare a set, and nothing else.

SFTConfig inherits these fields (they are its data group); `SFTConfig.data_options()` builds a
DataOptions from a run's config, and `SFTDataset` builds one directly. The defaults are written here
once. The data package never sees the rest of a run's config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from sftkit.errors import ConfigError
from sftkit.options import EVAL, at_least, check_choice, check_types

FORMATS = ("auto", "alpaca", "sharegpt", "messages", "custom", "text", "prompt_completion")
TRUNCATIONS = ("drop", "left", "right")
TRAIN_ON = ("all", "last")
REASONING = ("template", "drop")
MULTI_TURN = ("as_is", "expand")
SWITCHES = {"enable_thinking": bool, "preserve_thinking": bool, "reasoning_effort": str}
"""The chat-template variables sftkit passes through (per run: the fields below; per row:
`chat_template_kwargs` or a top-level key), with the type each takes."""
# Options that choose which data is read or how fast, not what a prepared example holds: they are
# left out of the prepared set's fingerprint and its manifest's "options".
NOT_IN_EXAMPLES = {"in_examples": False}
# Options added after sets were prepared without them: in the fingerprint only when set otherwise
# than their default, so that the sets prepared before keep their keys.
IN_EXAMPLES_WHEN_SET = {"in_examples": "when_set"}
AUTO_PROCS = 0
"""`num_proc` 0: as many tokenizing processes as the rows justify and the cores allow."""
# A child process costs about 6 CPU-seconds before its first row (imports, the tokenizer and its
# spec unpickled), against about 2 ms a row rendered: n rows in w processes take about
# 6 s + n x 2 ms / w, so a second process pays off from about 16,384 rows (bench/RESULTS.md).
AUTO_ROWS_PER_PROC = 8192
# The parent pickles every chunk out and every result back, about 5% of a child's work, so 8
# children keep it under half busy. The Rust encoder already keeps about 2 cores busy in each
# process, so auto gives one process per AUTO_CORES_PER_PROC cores: more only add their start-up.
AUTO_CORES_PER_PROC = 2
AUTO_MAX_PROCS = 8


@dataclass(frozen=True)
class Mixing:
    """`--data_weights`: one weight per data_path entry, and the seed that picks fractional shares."""

    weights: list[float]
    seed: int


@dataclass
class DataOptions:
    data_path: list[str] = field(default_factory=list, metadata=EVAL)
    """Training data: .json/.jsonl/.parquet/.csv files, a directory, a glob, a prepared directory
    (from prepare-data), or a Hugging Face dataset name. Repeat the flag for several sources."""
    data_weights: list[float] = field(default_factory=list, metadata={**NOT_IN_EXAMPLES, **at_least(0)})
    """Mixing weight per `data_path` entry, in the same order: 2 repeats a source's examples twice,
    0.5 keeps a seeded half of them. Default: 1 for every source."""
    eval_data_path: str | None = field(default=None, metadata=NOT_IN_EXAMPLES)
    """Evaluation data, in any form `data_path` accepts."""
    format_type: str = field(default="auto", metadata=EVAL)
    """Row format: auto (detected per file from the first row), alpaca, sharegpt, messages, custom,
    text or prompt_completion.

    text is TRL's language modeling: every token supervised, no template. prompt_completion is
    TRL's too: strings without a template, message lists with it; the loss on the completion only."""
    field_map: str | None = field(default=None, metadata=EVAL)
    """Names in your data, as NAME=VALUE pairs: columns, a turn's keys and role names, e.g.
    `instruction=question,output=answer`.

    Columns: instruction, input, output, system, history, messages, tools; a turn's keys: role,
    content; role names: user, assistant, observation, function, system_tag. LLaMA-Factory's names
    (prompt, query, response, role_tag, user_tag, ...) work too. ShareGPT-style data, for example:
    `messages=conversations,role=from,content=value,user=human,assistant=gpt`."""
    dataset_info: str | None = field(default=None, metadata=NOT_IN_EXAMPLES)
    """A LLaMA-Factory dataset_info.json: a `data_path` entry that is one of its names is read as the
    entry says.

    The entry's file_name or hf_hub_url, formatting, columns and tags are read. `REGISTRY.json:NAME`
    with no `data_path` trains on that entry; `--data_path REGISTRY.json:NAME` works without this
    option."""
    dataset_split: str = field(default="train", metadata=EVAL)
    """Split to read when `data_path` is a Hugging Face dataset name."""
    dataset_config: str | None = field(default=None, metadata=EVAL)
    """Configuration (subset) name of a Hugging Face dataset."""
    max_length: int = field(default=2048, metadata={**EVAL, **at_least(1)})
    """Longest example in tokens, prompt and reply together."""
    truncation: str = field(default="drop", metadata=EVAL)
    """What to do with a longer example: drop it (counted in manifest.json), or cut tokens from
    the left or the right."""
    train_on: str = field(default="all", metadata=EVAL)
    """Which assistant turns are supervised: all, or only the last one."""
    reasoning: str = field(default="template", metadata=EVAL)
    """Reasoning (`<think>`) policy: `template` renders exactly as the chat template does at
    inference; `drop` removes all reasoning.

    Qwen3's template drops the reasoning of turns before the last user message."""
    multi_turn: str = field(default="as_is", metadata={**EVAL, **IN_EXAMPLES_WHEN_SET})
    """A conversation with several replies: as_is, one example; expand, one example a reply, each
    as it is served.

    expand: reply i's example is the conversation up to it, rendered as the chat template renders
    it when reply i is the one generated (its reasoning kept, the earlier turns as the template
    treats them then), reply i alone supervised. as_is trains the earlier replies where the
    template puts them: Qwen3 and Qwen3.5 drop their reasoning, so the model would learn to answer
    without thinking (prepare-data counts such replies)."""
    enable_thinking: bool | None = field(default=None, metadata=EVAL)
    """Passed to the chat template when set; unset, the template's own default. False for no-think
    data.

    Qwen3 and Qwen3.5-4B+ think by default, Qwen3.5-2B and smaller do not. With false, the empty
    `<think></think>` block that the generation prompt then holds is prompt, not supervised reply.
    This and the next two switches: a row's `chat_template_kwargs` (or its own top-level key)
    overrides the value for that row; setting one that the template never reads is an error."""
    preserve_thinking: bool | None = field(default=None, metadata=EVAL)
    """Passed to the chat template when set: true keeps the reasoning of turns before the last user
    message (Qwen3.6; Qwen3.8 keeps it unless false). Unset: the template's own default."""
    reasoning_effort: str | None = field(default=None, metadata=EVAL)
    """Passed to the chat template when set (Qwen3.8 takes low, medium or xhigh, its default, and writes
    it into the system turn); the template itself checks the value. Unset: the template's default."""
    skip_bad_rows: bool = field(default=False, metadata=EVAL)
    """Skip malformed rows (counted, the first few listed) instead of stopping at the first one."""
    num_proc: int = field(default=AUTO_PROCS, metadata={**NOT_IN_EXAMPLES, **at_least(1, off=AUTO_PROCS,
                                                                                        off_means="auto")})
    """Processes for tokenization. 0 (auto): one per 8,192 rows and per 2 usable cores, at most 8.
    Any number gives the same prepared set, byte for byte.

    A process costs seconds to start, so a small set stays in one; the tokenizer already runs 2
    threads in each."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Types of every field (SFTConfig's too, when it is one), then the data options' values."""
        check_types(self)
        for name, allowed in (("format_type", FORMATS), ("truncation", TRUNCATIONS), ("train_on", TRAIN_ON),
                              ("reasoning", REASONING), ("multi_turn", MULTI_TURN)):
            check_choice(self, name, allowed)
        if self.data_weights and len(self.data_weights) != len(self.data_path):
            raise ConfigError(f"data_weights has {len(self.data_weights)} values for {len(self.data_path)} data_path "
                              "entries; give one weight per source, in the same order")

    def template_switches(self) -> dict[str, Any]:
        """The switches set for the run, as chat-template keyword arguments."""
        return {k: getattr(self, k) for k in SWITCHES if getattr(self, k) is not None}

    def example_options(self) -> dict[str, Any]:
        """The options that decide what a prepared example holds (fingerprinted, in the manifest)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(DataOptions)
                if f.name != "data_path" and f.metadata.get("in_examples", True) is True
                or f.metadata.get("in_examples") == "when_set" and getattr(self, f.name) != f.default}
