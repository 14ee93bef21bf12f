"""Compile and render a chat template the way transformers does, without its per-call wrapper.

Mirrors transformers 5.24 (`utils/chat_template_utils.py`: `_cached_compile_jinja_template`,
`render_jinja_template`, `_alias_reasoning_fields`, `_plain_template_data`; and
`PreTrainedTokenizerBase.apply_chat_template(..., tokenize=False)`) for one conversation, no
`continue_final_message`, no assistant mask, no documents, no control-token sanitising (sftkit
escapes special-token text itself, render.prepare_messages). Why: `apply_chat_template` is most
of prepare-data's cost a row, much of it transformers' message normalising and conversion and the
Jinja sandbox's attribute checks, which this environment caches (see `ChatSandbox`; profile in
bench/RESULTS.md). What reaches the template is exactly what transformers
passes it: `messages` (keys with None values dropped, copied to plain JSON types, reasoning
aliased under `thinking` and `reasoning_content`), `tools`, `documents=None`,
`add_generation_prompt`, then `{**tokenizer.special_tokens_map, **switches}`. A transformers
release that adds a variable or a filter needs the same change here: tests/test_template_exact.py
compares the text character for character with `apply_chat_template` over every shipped template.
"""

from __future__ import annotations

import abc
import json
from datetime import datetime
from functools import lru_cache
from typing import Any, ClassVar

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

# The names a message's reasoning may come under, the one templates read first (transformers'
# _REASONING_FIELDS).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_SCALARS = (str, int, float, bool, type(None))
# Every attribute a dict has (a dict instance has no __dict__ of its own, so these are all of them)
_DICT_ATTRIBUTES = frozenset(dir(dict))


class ChatSandbox(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox, its attribute-safety decision cached per (type, name).

    Why the cache keeps every decision (read in jinja2 3.1.6's sandbox.py):
    `SandboxedEnvironment.is_safe_attribute(obj, attr, value)` is `attr.startswith("_")` or
    `is_internal_attribute(obj, attr)`, and the immutable sandbox adds
    `modifies_known_mutable(obj, attr)`. Neither reads `value`. Both read `obj` only through
    `isinstance` against concrete types (FunctionType, MethodType, type, CodeType, generators, ...)
    and the ABCs MutableSet/MutableMapping/MutableSequence and deque. `isinstance` depends on
    `type(obj)`, on `obj.__class__` where the object reports another class (so such an object is
    never cached), and for an ABC on its registry, which `abc.register` changes: the cache is
    emptied whenever `abc.get_cache_token()` moves. `str.format` handling (`wrap_str_format`) looks
    at the value, and stays uncached in jinja2's `getattr`/`getitem`, which call this method.
    An unsafe attribute stays unsafe: the cache only remembers the sandbox's own answer.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._safe: dict[tuple[type, str], bool] = {}  # a template reads tens of (type, name) pairs
        self._abc_token = abc.get_cache_token()

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        cls = type(obj)
        try:
            plain = obj.__class__ is cls
        except Exception:  # noqa: BLE001 (isinstance swallows any error from __class__: ask the sandbox)
            plain = False
        if not plain or type(attr) is not str:
            return super().is_safe_attribute(obj, attr, value)
        token = abc.get_cache_token()
        if token != self._abc_token:
            self._safe.clear()
            self._abc_token = token
        key = (cls, attr)
        safe = self._safe.get(key)
        if safe is None:
            safe = self._safe[key] = super().is_safe_attribute(obj, attr, value)
        return safe

    def getattr(self, obj: Any, attribute: str) -> Any:
        # `message.role` on a dict: jinja2 tries getattr first, which raises AttributeError for
        # every key (two thirds of the 55 attribute reads a row), then reads obj[attribute]. A name
        # that is no dict attribute goes straight to the key, as jinja2 would end up doing.
        if type(obj) is dict and attribute not in _DICT_ATTRIBUTES:
            try:
                return obj[attribute]
            except (TypeError, LookupError):
                return self.undefined(obj=obj, name=attribute)
        return super().getattr(obj, attribute)


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (TRL's training templates mark replies so): parsed
    as transformers parses it, rendered as its body. transformers records the span only for
    `return_assistant_tokens_mask`, which sftkit does not use (it finds replies itself)."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: jinja2.runtime.Macro) -> str:
        return caller()


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    # transformers' filter: jinja2's own escapes HTML characters, templates need the JSON as is
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _TemplateDict:
    """The `dict` global: a call and `fromkeys`, nothing else to reach through (transformers')."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """`namespace(...)` refusing underscore-prefixed names, which could reach CPython internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: B902 (jinja2's trick: namespace(self=...) works)
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


def _check_name(name: Any) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(
            f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}. "
            "Please rename the attribute.")


def environment() -> ChatSandbox:
    """A fresh environment with transformers' options, extensions, filters and globals."""
    env = ChatSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(),
                       namespace=_Namespace)
    return env


@lru_cache(maxsize=16)  # a prepare uses one or two (a tokenizer's "default" and "tool_use")
def compile_template(source: str) -> jinja2.Template:
    """The template compiled once per source string, each in its own environment (so its
    attribute cache holds only the types this template meets)."""
    return environment().from_string(source)


def _plain(value: Any) -> Any:
    """A copy of plain JSON types, as transformers' `_plain_template_data` makes: what it does to
    anything else (str/int subclasses, numpy scalars, dataclasses, media) is left to it."""
    kind = type(value)
    if kind in _SCALARS:
        return value
    if kind is dict:
        return {_plain(k): _plain(v) for k, v in value.items()}
    if kind is list:
        return [_plain(v) for v in value]
    if kind is tuple:
        return tuple(_plain(v) for v in value)
    from transformers.utils.chat_template_utils import _plain_template_data

    return _plain_template_data(value)


def _message(message: Any) -> dict:
    """One message as the template sees it: None-valued keys dropped, plain types, reasoning under
    all its names (transformers' _normalize_chat_messages, _plain_template_data, _alias_reasoning_fields)."""
    if not isinstance(message, dict):
        raise TypeError(f"Chat messages should be dicts, dataclasses or pydantic models, but got {message!r}.")
    message = {_plain(k): _plain(v) for k, v in message.items() if v is not None}
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


def render(source: str, messages: list, tools: list | None = None, add_generation_prompt: bool = False,
           variables: dict[str, Any] | None = None) -> str:
    """The template's text for one conversation: `apply_chat_template(messages, tools=tools,
    tokenize=False, add_generation_prompt=..., **switches)` with `source` =
    `tokenizer.get_chat_template(None, tools)` and `variables` = `{**tokenizer.special_tokens_map,
    **switches}`."""
    if not messages:
        raise ValueError("Cannot apply chat template to an empty conversation. Provide at least one message.")
    if tools is not None:
        if not all(isinstance(t, dict) for t in tools):
            raise ValueError("sftkit passes tools to the chat template as JSON schemas (dicts), got "
                             f"{[type(t).__name__ for t in tools]}")
        tools = _plain(tools)
    return compile_template(source).render(
        messages=[_message(m) for m in messages], tools=tools, documents=None,
        add_generation_prompt=add_generation_prompt, **_plain(variables or {}))


def apply(tokenizer, messages: list, tools: list | None = None, add_generation_prompt: bool = False,
          switches: dict[str, Any] | None = None) -> str:
    """`tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
    add_generation_prompt=..., **switches)`, the same text, through `render`."""
    return render(tokenizer.get_chat_template(None, tools), messages, tools, add_generation_prompt,
                  {**tokenizer.special_tokens_map, **(switches or {})})
