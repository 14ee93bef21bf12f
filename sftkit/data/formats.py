"""Row formats -> one internal type: a list of messages ({role, content, ...}).

Pure functions: a row (dict) in, messages out, or a RowError naming the field. Every message is
one line: values from the data are quoted, escaped and shortened (`_show`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sftkit.data.options import SWITCHES

Message = dict[str, Any]
Conversation = list[Message]

# Role names of a turn -> our role. "function": a LLaMA-Factory function_call turn, whose value is
# the JSON of one tool call or a list of them; it becomes an assistant message with tool_calls.
ROLE_NAMES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
    "system": "system", "tool": "tool", "observation": "tool", "function_call": "function",
}
# TRL's formats without a chat template: {"text"} (language modeling) and {"prompt", "completion"}
# as strings become PLAIN pieces, tokenized as written; `train` says whether a piece is supervised.
PLAIN = "plain"
CUSTOM_INSTRUCTION = ("question", "prompt", "query")
CUSTOM_OUTPUT = ("answer", "response", "completion")


class RowError(ValueError):
    """A problem in one row; `field` is the dotted path to the bad value."""

    def __init__(self, field: str | None, problem: str):
        super().__init__(problem)
        self.field, self.problem = field, problem


class Unreadable:
    """Stands in for a row that could not be read at all (a line that is not JSON or not UTF-8).
    Converting it raises RowError, so --skip_bad_rows counts it like any other bad row."""

    __slots__ = ("problem",)

    def __init__(self, problem: str):
        self.problem = problem


class TableRow(dict):
    """A row of a table (Parquet, CSV, a Hugging Face dataset), which knows its source. All rows of
    a table have the same columns, so columns that fit no format are the file's fault: detect_format
    reports that once for the file (a DataError), not once for every row."""

    def __init__(self, data: dict[str, Any], source: str):
        super().__init__(data)
        self.source = source


def _kind(value: Any) -> str:
    """A value's type in JSON's words: 'null', 'a number', 'a list', ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _kinds(value: Any) -> str:
    """The plural of _kind: 'numbers', 'lists', ..."""
    kind = _kind(value)
    return {"a boolean": "booleans", "a number": "numbers", "a string": "strings", "a list": "lists",
            "an object": "objects"}.get(kind, f"{kind} values")


def _show(value: Any, limit: int = 40) -> str:
    """A value from the data, quoted for a one-line message: control characters escaped, shortened."""
    if isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)[1:-1]
    else:
        try:
            text = json.dumps(value, ensure_ascii=False, default=str)
        except (TypeError, ValueError, RecursionError):
            text = type(value).__name__
    for ch in "\x85\u2028\u2029":  # line breaks that JSON leaves as they are
        text = text.replace(ch, f"\\u{ord(ch):04x}")
    return f"'{text[:limit]}...'" if len(text) > limit else f"'{text}'"


def _keys(row: dict[str, Any], limit: int = 12) -> str:
    names = [_show(k, 30)[1:-1] for k in sorted(map(str, row))]
    more = f", and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more or "none"


def _missing(row: dict[str, Any]) -> tuple[str, str, str] | None:
    """(field, what is missing, the --field_map that would fix it) when the keys half-fit a format,
    e.g. instruction without output."""
    if "instruction" in row:
        return "output", "'output' is missing (an alpaca row needs instruction and output)", "output=COLUMN"
    if "output" in row:
        return "instruction", "'instruction' is missing (an alpaca row needs instruction and output)", \
            "instruction=COLUMN"
    have = next((k for k in CUSTOM_INSTRUCTION if k in row), None)
    if have:
        return "answer", f"there is '{have}' but no answer, response or completion", \
            f"instruction={have},output=COLUMN"
    have = next((k for k in CUSTOM_OUTPUT if k in row), None)
    if have:
        return "question", f"there is '{have}' but no question, prompt or query", f"instruction=COLUMN,output={have}"
    return None


_EXPECTED_KEYS = ("expected messages, conversations, instruction+output, prompt+completion, text, or "
                  "question/prompt/query + answer/response/completion; or set --format_type and --field_map")


def detect_format(row: dict[str, Any]) -> str:
    """Which format a row is in, from its keys; raises RowError if none fits (a DataError for the
    whole file when the row is a TableRow)."""
    if isinstance(row, Unreadable):
        raise RowError(None, row.problem)
    if not isinstance(row, dict):
        raise RowError(None, f"expected a JSON object per row, got {_kind(row)}")
    if "prompt" in row and "completion" in row:
        fmt = "prompt_completion"  # TRL's, standard (strings) or conversational (message lists)
    elif "messages" in row:
        fmt = "messages"
    elif "conversations" in row:
        fmt = "sharegpt"
    elif "instruction" in row and "output" in row:
        fmt = "alpaca"
    elif any(k in row for k in CUSTOM_INSTRUCTION) and any(k in row for k in CUSTOM_OUTPUT):
        fmt = "custom"
    elif "text" in row:
        fmt = "text"  # TRL's language modeling rows; other columns (an id, a source) are left alone
    else:
        missing = _missing(row)
        if isinstance(row, TableRow):
            from sftkit.errors import DataError

            if missing:
                raise DataError(row.source, "", missing[0], f"no such column: {missing[1]}; the columns are "
                                f"{_keys(row)}; rename a column or set --field_map {missing[2]}")
            raise DataError(row.source, "", None, f"the columns ({_keys(row)}) fit no format; {_EXPECTED_KEYS}")
        hint = f"; {missing[1]}" if missing else ""
        raise RowError(None, f"cannot tell the format from the keys ({_keys(row)}){hint}; {_EXPECTED_KEYS}")
    if isinstance(row, TableRow):
        _check_columns(row, fmt)
    return fmt


def _check_columns(row: TableRow, fmt: str) -> None:
    """A column of the wrong type is wrong in every row: one error for the file."""
    from sftkit.errors import DataError

    if fmt in ("messages", "sharegpt"):
        col = "messages" if fmt == "messages" else "conversations"
        value = row.get(col)
        if value is not None and not isinstance(value, list):
            raise DataError(row.source, "", col, f"the column holds {_kinds(value)}; expected lists of "
                            + ("{role, content} objects" if fmt == "messages" else "{from, value} objects"))
        return
    if fmt == "prompt_completion":
        return  # strings or message lists: each row's own values say which, and are checked there
    cols = ("instruction", "output") if fmt == "alpaca" else ("text",) if fmt == "text" else \
        tuple(_custom_map(row).values())
    for col in cols:
        value = row.get(col)
        if value is not None and not isinstance(value, str):
            raise DataError(row.source, "", col, f"the column holds {_kinds(value)}; expected text")


# --field_map names (and LLaMA-Factory's dataset_info.json names, accepted as aliases):
# columns of a row, then the keys and role names inside a turn.
COLUMNS = ("instruction", "input", "output", "system", "history", "messages", "tools")
TAGS = ("role", "content", "user", "assistant", "observation", "function", "system_tag")
ALIASES = {"prompt": "instruction", "query": "input", "response": "output", "conversations": "messages",
           "role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
           "observation_tag": "observation", "tool": "observation", "function_tag": "function"}
_ALPACA_COLUMNS = {"instruction", "input", "output", "history"}
_TAG_ROLES = {"user": "user", "assistant": "assistant", "observation": "tool", "function": "function",
              "system_tag": "system"}


def parse_field_map(spec: str | dict[str, str] | None) -> dict[str, str]:
    """'instruction=question,output=answer' -> {'instruction': 'question', 'output': 'answer'}; the
    names are ours (COLUMNS, TAGS) or LLaMA-Factory's (ALIASES). A dict is checked the same way."""
    if not spec:
        return {}
    pairs = spec.items() if isinstance(spec, dict) else (p.partition("=")[::2] for p in spec.split(","))
    out = {}
    for name, theirs in pairs:
        name, theirs = str(name).strip(), str(theirs).strip() if isinstance(theirs, str) else ""
        ours = ALIASES.get(name, name)
        if ours not in COLUMNS + TAGS or not theirs:
            from sftkit.errors import ConfigError

            what = (f"expected NAME=VALUE with NAME a column ({', '.join(COLUMNS)}) or a turn's key or role "
                    f"name ({', '.join(TAGS)})") if ours not in COLUMNS + TAGS else "the name in your data is missing"
            raise ConfigError(f"field_map entry '{name}={theirs}': {what}")
        out[ours] = theirs
    return out


def mapped_format(field_map: dict[str, str]) -> str | None:
    """The format a field map implies: conversations for turn keys, alpaca columns otherwise; None
    when it only renames the columns every format shares (system, tools)."""
    if field_map.keys() & ({"messages"} | set(TAGS)):
        return "sharegpt"
    if field_map.keys() & _ALPACA_COLUMNS:
        return "custom"
    return None


def to_messages(row: dict[str, Any], fmt: str, field_map: dict[str, str] | None = None) -> Conversation:
    """Convert one row in format `fmt` to a validated list of messages."""
    return to_conversation(row, fmt, field_map)[0]


def to_conversation(row: dict[str, Any], fmt: str, field_map: dict[str, str] | None = None
                    ) -> tuple[Conversation, list[dict[str, Any]] | None]:
    """(messages, tool schemas or None) of one row in format `fmt`, validated."""
    if isinstance(row, Unreadable):
        raise RowError(None, row.problem)
    if not isinstance(row, dict):
        raise RowError(None, f"expected a JSON object per row, got {_kind(row)}")
    fm = field_map or {}
    if fmt in ("alpaca", "custom"):
        mapping = fm if fmt == "alpaca" or fm.keys() & _ALPACA_COLUMNS else {**_custom_map(row), **fm}
        msgs, where = _from_alpaca(row, mapping), "conversations"
    elif fmt in ("sharegpt", "messages"):
        tags = turn_tags(fmt, fm)
        msgs, where = _from_turns(row, tags), tags.column
    elif fmt == "text":
        return [{"role": PLAIN, "content": _text(row.get("text"), "text", allow_empty=False), "train": True}], None
    elif fmt == "prompt_completion":
        msgs, where = _from_prompt_completion(row), "completion"
        if msgs[0]["role"] == PLAIN:
            return msgs, None
    else:
        raise RowError(None, f"unknown format '{fmt}'")
    check_conversation(msgs, where)
    return msgs, parse_tools(row.get(fm.get("tools", "tools")), fm.get("tools", "tools"))


def row_switches(row: dict[str, Any]) -> dict[str, Any] | None:
    """The row's own template switches (options.SWITCHES), or None: from `chat_template_kwargs`
    (TRL's convention) and top-level keys (`"enable_thinking": false`). A null value is unset (a
    Parquet struct column holds null for a key another row sets)."""
    found: dict[str, Any] = {}
    kwargs = row.get("chat_template_kwargs")
    if kwargs is not None:
        if not isinstance(kwargs, dict):
            raise RowError("chat_template_kwargs", f"expected an object of template switches "
                           f"({', '.join(SWITCHES)}), got {_kind(kwargs)}")
        for key, value in kwargs.items():
            if key not in SWITCHES:
                raise RowError(f"chat_template_kwargs.{_show(key, 30)[1:-1]}", "is not a switch sftkit passes to "
                               f"the chat template; only {', '.join(SWITCHES)} are")
            if value is not None:
                found[key] = _switch(value, SWITCHES[key], f"chat_template_kwargs.{key}")
    for key, kind in SWITCHES.items():
        value = row.get(key)
        if value is not None:
            value = _switch(value, kind, key)
            if found.get(key, value) != value:
                raise RowError(key, f"is {_show(value)} here but {_show(found[key])} in chat_template_kwargs; "
                               "set it once")
            found[key] = value
    return found or None


def _switch(value: Any, kind: type, field: str) -> Any:
    if not isinstance(value, kind):
        raise RowError(field, f"expected {'true or false' if kind is bool else 'a string'}, got {_kind(value)}")
    return value


def parse_tools(value: Any, field: str = "tools") -> list[dict[str, Any]] | None:
    """Tool schemas for the chat template: a list, or a JSON string of one (LLaMA-Factory stores them
    so). A flat schema ({name, description, parameters}) is wrapped as {type: function, function: ...},
    the form an OpenAI-style server hands the template at inference."""
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            raise RowError(field, f"expected a list of tool schemas or a JSON string of one, got the text "
                           f"{_show(value)}, which is not JSON") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise RowError(field, f"expected a list of tool schemas (objects), got {_kind(value)}")
    tools = []
    for j, tool in enumerate(value):
        if not isinstance(tool, dict):
            raise RowError(f"{field}[{j}]", f"expected a tool schema (an object), got {_kind(tool)}")
        tools.append(tool if "type" in tool or "name" not in tool else {"type": "function", "function": tool})
    return tools or None


def _text(value: Any, field: str, allow_empty: bool = True) -> str:
    if value is None:
        if allow_empty:
            return ""
        raise RowError(field, "is missing (null)")
    if not isinstance(value, str):
        raise RowError(field, f"expected a string, got {_kind(value)}")
    return _valid_text(value, field)


def _valid_text(value: str, field: str) -> str:
    """Text that encodes: a lone surrogate (JSON's "\\ud83d", half an escaped emoji) would make the
    tokenizer raise a TypeError naming no file, line or field, which --skip_bad_rows cannot skip."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise RowError(field, f"holds {value[err.start]!r} at character {err.start}, a lone surrogate (half of an "
                              "escaped emoji?), which is not text") from None
    return value


def _custom_map(row: dict[str, Any]) -> dict[str, str]:
    instruction = next((k for k in CUSTOM_INSTRUCTION if k in row), None)
    output = next((k for k in CUSTOM_OUTPUT if k in row), None)
    if instruction is None or output is None:
        missing = "question, prompt or query" if instruction is None else "answer, response or completion"
        raise RowError(None, f"custom format: no {missing} column among the keys ({_keys(row)}); name the "
                       "columns with --field_map instruction=COLUMN,output=COLUMN")
    return {"instruction": instruction, "output": output}


def _from_alpaca(row: dict[str, Any], mapping: dict[str, str]) -> Conversation:
    col = {k: mapping.get(k, k) for k in ("instruction", "input", "output", "system", "history")}
    for need in ("instruction", "output"):
        if col[need] not in row:
            raise RowError(col[need], "is missing" + _other_format(row, "alpaca"))
    instruction = _text(row[col["instruction"]], col["instruction"], allow_empty=False)
    extra = _text(row.get(col["input"]), col["input"])
    output = _text(row[col["output"]], col["output"], allow_empty=False)
    msgs: Conversation = []
    system = _text(row.get(col["system"]), col["system"])
    if system:
        msgs.append({"role": "system", "content": system})
    history = row.get(col["history"]) or []
    if not isinstance(history, list):
        raise RowError(col["history"], f"expected a list of [instruction, output] pairs, got {_kind(history)}")
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise RowError(f"{col['history']}[{i}]", "expected an [instruction, output] pair")
        msgs.append({"role": "user", "content": _text(pair[0], f"{col['history']}[{i}][0]", allow_empty=False)})
        msgs.append({"role": "assistant", "content": _text(pair[1], f"{col['history']}[{i}][1]", allow_empty=False)})
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    msgs.append({"role": "user", "content": user})
    msgs.append({"role": "assistant", "content": output})
    return msgs


def _other_format(row: dict[str, Any], fmt: str) -> str:
    """' (the row's keys ... fit the X format ...)' when the format asked for is not the one the row's
    keys fit (e.g. --format_type sharegpt on a messages file); '' otherwise."""
    try:
        found = detect_format(dict(row))
    except RowError:
        return ""
    if found == fmt or (found, fmt) in (("custom", "alpaca"), ("alpaca", "custom")):
        return ""
    return (f" (the row's keys are {_keys(row)}, which fit the {found} format, not {fmt}: set --format_type "
            f"{found}, or auto to detect it)")


@dataclass(frozen=True)
class Tags:
    """Where a turn-based row keeps its turns, and the names inside a turn."""

    column: str                 # the row's list of turns
    role: str                   # a turn's role key
    content: str                # a turn's content key
    roles: dict[str, str]       # role name in the data -> user/assistant/system/tool/function
    system: str = "system"      # the row's system prompt column, put before the turns


_DEFAULT_TAGS = {"sharegpt": Tags("conversations", "from", "value", ROLE_NAMES),
                 "messages": Tags("messages", "role", "content", ROLE_NAMES)}


def turn_tags(fmt: str, field_map: dict[str, str]) -> Tags:
    """The format's usual names, with the field map's on top (its role names added to the usual ones)."""
    base = _DEFAULT_TAGS[fmt]
    roles = {**base.roles, **{field_map[k]: role for k, role in _TAG_ROLES.items() if k in field_map}}
    return Tags(field_map.get("messages", base.column), field_map.get("role", base.role),
                field_map.get("content", base.content), roles, field_map.get("system", "system"))


def _from_turns(row: dict[str, Any], tags: Tags) -> Conversation:
    """ShareGPT ({from, value}), OpenAI ({role, content}) or LLaMA-Factory (content parts) turns."""
    if tags.column not in row:
        raise RowError(tags.column, "is missing" + _other_format(row, "sharegpt" if tags.column == "conversations"
                                                                 else "messages"))
    turns = row[tags.column]
    if not isinstance(turns, list):
        raise RowError(tags.column, f"expected a list of messages, got {_kind(turns)}")
    msgs: Conversation = []
    system = row.get(tags.system)
    if system is not None:
        msgs.append({"role": "system", "content": _text(system, tags.system)})
    for i, turn in enumerate(turns):
        msgs.append(_turn(turn, f"{tags.column}[{i}]", tags))
    return msgs


def _key(turn: dict[str, Any], mapped: str, usual: tuple[str, str]) -> str:
    """The mapped key, or whichever usual one the turn has ('from' or 'role', 'value' or 'content')."""
    return mapped if mapped in turn else next((k for k in usual if k in turn), mapped)


def _turn(turn: Any, where: str, tags: Tags) -> Message:
    if not isinstance(turn, dict):
        raise RowError(where, f"expected an object with {tags.role}/{tags.content}, got {_kind(turn)}")
    role_key, content_key = _key(turn, tags.role, ("from", "role")), _key(turn, tags.content, ("value", "content"))
    if role_key not in turn:
        raise RowError(f"{where}.{role_key}", "is missing")
    name = turn[role_key]
    role = tags.roles.get(name) if isinstance(name, str) else None
    if role is None:
        raise RowError(f"{where}.{role_key}", f"unknown role {_show(name)}; expected one of "
                       f"{', '.join(tags.roles)} (name others with --field_map user=NAME,assistant=NAME,...)")
    calls = turn.get("tool_calls") if role == "assistant" else None
    if content_key not in turn and not calls:
        raise RowError(f"{where}.{content_key}", "is missing")
    value = turn.get(content_key)
    if value is None and not calls:
        raise RowError(f"{where}.{content_key}", 'is null; the chat template needs text here (write "" for '
                       "an empty turn)")
    if role == "function":
        return {"role": "assistant", "content": "", "tool_calls": _function_calls(value, f"{where}.{content_key}")}
    text, reasoning, part_calls = _content(value, f"{where}.{content_key}", role)
    msg: Message = {"role": role, "content": text}
    reasoning_key = next((k for k in ("reasoning_content", "thinking") if turn.get(k) is not None), None)
    if reasoning_key:
        reasoning = [_text(turn[reasoning_key], f"{where}.{reasoning_key}")]
    if reasoning:
        msg["reasoning_content"] = "\n".join(reasoning)
    if calls:
        if not isinstance(calls, list):
            raise RowError(f"{where}.tool_calls", "expected a list")
        part_calls = [_tool_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(calls)] + part_calls
    if part_calls:
        msg["tool_calls"] = part_calls
    return msg


def _function_calls(value: Any, field: str) -> list[dict[str, Any]]:
    """A function_call turn's value: the JSON of one call {name, arguments}, or of a list of calls."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            raise RowError(field, "function_call must be JSON with name and arguments, or a list of "
                           "such calls") from None
    calls = value if isinstance(value, list) else [value]
    if not calls:
        raise RowError(field, "function_call holds an empty list of calls")
    return [_tool_call(c, f"{field}[{j}]" if isinstance(value, list) else field) for j, c in enumerate(calls)]


def _tool_call(value: Any, field: str) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            raise RowError(field, "a tool call must be JSON with name and arguments") from None
    if isinstance(value, dict) and "function" in value:
        value = value["function"]
    if not (isinstance(value, dict) and isinstance(value.get("name"), str)):
        raise RowError(field, "a tool call needs a string 'name' and 'arguments'")
    arguments = value.get("arguments", {})
    if not (arguments is None or isinstance(arguments, (dict, str))):
        raise RowError(f"{field}.arguments", f"expected an object or a JSON string, got {_kind(arguments)}")
    return {"type": "function", "function": {"name": value["name"], "arguments": arguments}}


_PART_TYPES = ("text", "reasoning", "tool_call", "image", "image_url")
IMAGE = "image"
"""A content part that stands for an image: {"type": "image", "source": the row's value (None: the
next of the row's `images` column), "field": where it is}; sftkit/data/images.py reads it."""


def _content(value: Any, field: str, role: str) -> tuple[str | list[dict[str, Any]], list[str], list[dict[str, Any]]]:
    """(text, reasoning parts, tool calls) of a turn's content: a string (null for an assistant that
    only calls tools), or a list of parts: OpenAI's {type: text, text}, {type: image | image_url}
    or LLaMA-Factory's {type: text | reasoning | tool_call, value}. Content with an image is a list
    of text and image parts, in order."""
    if value is None or isinstance(value, str):
        return _valid_text(value or "", field), [], []
    if not isinstance(value, list):
        raise RowError(field, f"expected a string or a list of content parts, got {_kind(value)}")
    parts: list[dict[str, Any]] = []
    reasoning, calls = [], []
    for j, part in enumerate(value):
        where = f"{field}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _PART_TYPES:
            got = _show(kind) if isinstance(part, dict) else _kind(part)
            raise RowError(where, f"only {', '.join(_PART_TYPES)} content parts are supported, got {got}")
        if kind in ("image", "image_url"):
            if role not in ("user", "tool"):
                raise RowError(where, f"an image belongs in a user message, not in the {role}'s")
            parts.append({"type": IMAGE, "source": _image_source(part, kind, where), "field": where})
            continue
        key = "text" if kind == "text" and "text" in part else "value"
        if kind != "text" and role != "assistant":
            raise RowError(where, f"a {kind} part belongs in an assistant message, not a {role} message")
        if kind == "tool_call":
            calls.append(_tool_call(part.get(key), f"{where}.{key}"))
            continue
        text = _text(part.get(key), f"{where}.{key}", allow_empty=False)
        if kind == "reasoning":
            reasoning.append(text)
        elif parts and parts[-1]["type"] == "text":
            parts[-1]["text"] += text
        else:
            parts.append({"type": "text", "text": text})
    if not any(p["type"] == IMAGE for p in parts):
        return "".join(p["text"] for p in parts), reasoning, calls
    return parts, reasoning, calls


def _image_source(part: dict[str, Any], kind: str, where: str) -> Any:
    """The image an image part names (OpenAI's image_url.url, or image / url / path), or None for
    TRL's bare {"type": "image"}, which takes the next of the row's `images`."""
    if kind == "image_url":
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        if url is None:
            raise RowError(f"{where}.image_url", "is missing its url")
        return url
    return next((part[k] for k in ("image", "url", "path") if part.get(k) is not None), None)


def text_of(content: str | list[dict[str, Any]]) -> str:
    """A message's text: its content, or the text parts of content with images."""
    return content if isinstance(content, str) else "".join(p["text"] for p in content if p["type"] == "text")


def check_conversation(msgs: Conversation, field: str) -> None:
    """Only what the chat template cannot render or we cannot train on: an empty conversation, or
    one without an assistant reply. Any role order renders (a system message after the first turn
    in place, two user turns in a row, ...), so it is kept as the template renders it."""
    if not msgs:
        raise RowError(field, "the conversation is empty")
    if not any(m["role"] == "assistant" for m in msgs):
        raise RowError(field, "the conversation has no assistant reply to train on")


def warnings(msgs: Conversation) -> list[str]:
    """Kept, but worth a count in manifest.json: 'empty_reply' per assistant reply that is empty or
    whitespace (no text, reasoning or tool call): it trains the model to say nothing."""
    return ["empty_reply" for m in msgs if m["role"] == "assistant" and not m["content"].strip()
            and not m.get("tool_calls") and not (m.get("reasoning_content") or "").strip()]


def _from_prompt_completion(row: dict[str, Any]) -> Conversation:
    """TRL's prompt-completion rows. Strings (standard): two PLAIN pieces, no chat template, the
    completion supervised. Message lists (conversational): the prompt's turns then the completion's,
    rendered with the template; assistant turns of the prompt are marked `train: False`, so only
    the completion's replies are supervised."""
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        if not completion:
            raise RowError("completion", "is empty: nothing to train on")
        return [{"role": PLAIN, "content": prompt, "train": False}, {"role": PLAIN, "content": completion, "train": True}]
    for name, value in (("prompt", prompt), ("completion", completion)):
        if not isinstance(value, list):
            raise RowError(name, f"expected a string (with a string completion) or a list of messages, got {_kind(value)}")
    tags = turn_tags("messages", {})
    before = [{**_turn(t, f"prompt[{i}]", tags), "train": False} for i, t in enumerate(prompt)]
    after = [_turn(t, f"completion[{i}]", tags) for i, t in enumerate(completion)]
    if not any(m["role"] == "assistant" for m in after):
        raise RowError("completion", "holds no assistant message to train on")
    return [{k: v for k, v in m.items() if k != "train" or m["role"] == "assistant"} for m in before] + after
