"""Row formats -> one internal type: a list of messages ({role, content, ...}).

Pure functions: a row (dict) in, messages out, or a RowError naming the field. Every message is
one line: values from the data are quoted, escaped and shortened (`_show`).
"""

from __future__ import annotations

import json
from typing import Any

Message = dict[str, Any]
Conversation = list[Message]

SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
    "system": "system", "tool": "tool", "observation": "tool", "function_call": "assistant",
}
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


_EXPECTED_KEYS = ("expected messages, conversations, instruction+output, or question/prompt/query + "
                  "answer/response/completion; or set --format_type and --field_map")


def detect_format(row: dict[str, Any]) -> str:
    """Which format a row is in, from its keys; raises RowError if none fits (a DataError for the
    whole file when the row is a TableRow)."""
    if isinstance(row, Unreadable):
        raise RowError(None, row.problem)
    if not isinstance(row, dict):
        raise RowError(None, f"expected a JSON object per row, got {_kind(row)}")
    if "messages" in row:
        fmt = "messages"
    elif "conversations" in row:
        fmt = "sharegpt"
    elif "instruction" in row and "output" in row:
        fmt = "alpaca"
    elif any(k in row for k in CUSTOM_INSTRUCTION) and any(k in row for k in CUSTOM_OUTPUT):
        fmt = "custom"
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
    cols = ("instruction", "output") if fmt == "alpaca" else tuple(_custom_map(row).values())
    for col in cols:
        value = row.get(col)
        if value is not None and not isinstance(value, str):
            raise DataError(row.source, "", col, f"the column holds {_kinds(value)}; expected text")


def parse_field_map(spec: str | None) -> dict[str, str]:
    """'instruction=question,output=answer' -> {'instruction': 'question', 'output': 'answer'}."""
    if not spec:
        return {}
    out = {}
    for part in spec.split(","):
        ours, _, theirs = part.partition("=")
        ours, theirs = ours.strip(), theirs.strip()
        if ours not in ("instruction", "input", "output", "system") or not theirs:
            from sftkit.errors import ConfigError

            raise ConfigError(f"field_map entry '{part}': expected NAME=COLUMN with NAME one of "
                              "instruction, input, output, system")
        out[ours] = theirs
    return out


def to_messages(row: dict[str, Any], fmt: str, field_map: dict[str, str] | None = None) -> Conversation:
    """Convert one row in format `fmt` to a validated list of messages."""
    if isinstance(row, Unreadable):
        raise RowError(None, row.problem)
    if not isinstance(row, dict):
        raise RowError(None, f"expected a JSON object per row, got {_kind(row)}")
    if field_map:
        msgs = _from_alpaca(row, field_map)
    elif fmt == "alpaca":
        msgs = _from_alpaca(row, {})
    elif fmt == "sharegpt":
        msgs = _from_sharegpt(row)
    elif fmt == "messages":
        msgs = _from_openai(row)
    elif fmt == "custom":
        msgs = _from_alpaca(row, _custom_map(row))
    else:
        raise RowError(None, f"unknown format '{fmt}'")
    check_conversation(msgs, "messages" if fmt == "messages" else "conversations")
    _check_tools(row.get("tools"))
    return msgs


def _check_tools(tools: Any) -> None:
    """`tools`, passed to the chat template as is: a list of tool schemas (objects), or empty."""
    if not tools:
        return
    if not isinstance(tools, list):
        hint = " (a JSON string is not parsed; store the list itself)" if isinstance(tools, str) else ""
        raise RowError("tools", f"expected a list of tool schemas (objects), got {_kind(tools)}{hint}")
    for j, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise RowError(f"tools[{j}]", f"expected a tool schema (an object), got {_kind(tool)}")


def _text(value: Any, field: str, allow_empty: bool = True) -> str:
    if value is None:
        if allow_empty:
            return ""
        raise RowError(field, "is missing (null)")
    if not isinstance(value, str):
        raise RowError(field, f"expected a string, got {_kind(value)}")
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
    col = {k: mapping.get(k, k) for k in ("instruction", "input", "output", "system")}
    for need in ("instruction", "output"):
        if col[need] not in row:
            raise RowError(col[need], "is missing")
    instruction = _text(row[col["instruction"]], col["instruction"], allow_empty=False)
    extra = _text(row.get(col["input"]), col["input"])
    output = _text(row[col["output"]], col["output"], allow_empty=False)
    msgs: Conversation = []
    system = _text(row.get(col["system"]), col["system"])
    if system:
        msgs.append({"role": "system", "content": system})
    history = row.get("history") or []
    if not isinstance(history, list):
        raise RowError("history", f"expected a list of [instruction, output] pairs, got {_kind(history)}")
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise RowError(f"history[{i}]", "expected an [instruction, output] pair")
        msgs.append({"role": "user", "content": _text(pair[0], f"history[{i}][0]", allow_empty=False)})
        msgs.append({"role": "assistant", "content": _text(pair[1], f"history[{i}][1]", allow_empty=False)})
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    msgs.append({"role": "user", "content": user})
    msgs.append({"role": "assistant", "content": output})
    return msgs


def _from_sharegpt(row: dict[str, Any]) -> Conversation:
    turns = row.get("conversations")
    if not isinstance(turns, list):
        raise RowError("conversations", f"expected a list of turns, got {_kind(turns)}")
    msgs: Conversation = []
    system = row.get("system")
    if system is not None:
        msgs.append({"role": "system", "content": _text(system, "system")})
    for i, turn in enumerate(turns):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise RowError(where, f"expected an object with from/value, got {_kind(turn)}")
        if "from" not in turn:
            raise RowError(f"{where}.from", "is missing")
        source = turn["from"]
        if not isinstance(source, str) or source not in SHAREGPT_ROLES:
            raise RowError(f"{where}.from",
                           f"unknown role {_show(source)}; expected one of {', '.join(SHAREGPT_ROLES)}")
        if "value" not in turn:
            raise RowError(f"{where}.value", "is missing")
        value = _text(turn["value"], f"{where}.value")
        if source == "function_call":
            msgs.append({"role": "assistant", "content": "", "tool_calls": [_tool_call(value, f"{where}.value")]})
        else:
            msgs.append({"role": SHAREGPT_ROLES[source], "content": value})
    return msgs


def _tool_call(value: Any, field: str) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise RowError(field, "function_call must be JSON with name and arguments") from None
    if isinstance(value, dict) and "function" in value:
        value = value["function"]
    if not (isinstance(value, dict) and isinstance(value.get("name"), str)):
        raise RowError(field, "a tool call needs a string 'name' and 'arguments'")
    arguments = value.get("arguments", {})
    if not (arguments is None or isinstance(arguments, (dict, str))):
        raise RowError(f"{field}.arguments", f"expected an object or a JSON string, got {_kind(arguments)}")
    return {"type": "function", "function": {"name": value["name"], "arguments": arguments}}


def _content(value: Any, field: str) -> str:
    """OpenAI content: a string, null, or a list of {type: text, text} parts."""
    if value is None or isinstance(value, str):
        return value or ""
    if isinstance(value, list):
        parts = []
        for j, part in enumerate(value):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                kind = _show(part.get("type")) if isinstance(part, dict) else _kind(part)
                raise RowError(f"{field}[{j}]", f"only text content parts are supported, got {kind}")
            parts.append(part["text"])
        return "".join(parts)
    raise RowError(field, f"expected a string or a list of text parts, got {_kind(value)}")


def _from_openai(row: dict[str, Any]) -> Conversation:
    raw = row.get("messages")
    if not isinstance(raw, list):
        raise RowError("messages", f"expected a list of messages, got {_kind(raw)}")
    msgs: Conversation = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RowError(where, f"expected an object with role/content, got {_kind(m)}")
        role = m.get("role")
        if not isinstance(role, str) or role not in ("system", "user", "assistant", "tool"):
            raise RowError(f"{where}.role", f"unknown role {_show(role)}; expected system, user, assistant or tool")
        msg: Message = {"role": role, "content": _content(m.get("content"), f"{where}.content")}
        reasoning = m.get("reasoning_content", m.get("thinking"))
        if reasoning is not None:
            key = "reasoning_content" if "reasoning_content" in m else "thinking"
            msg["reasoning_content"] = _text(reasoning, f"{where}.{key}")
        if m.get("tool_calls"):
            calls = m["tool_calls"]
            if not isinstance(calls, list):
                raise RowError(f"{where}.tool_calls", "expected a list")
            msg["tool_calls"] = [_tool_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(calls)]
        msgs.append(msg)
    return msgs


def check_conversation(msgs: Conversation, field: str) -> None:
    """Role order: optional system first, then a user turn; tool results only after a tool call;
    no two user or two assistant turns in a row; ends with a non-empty assistant reply."""
    if not msgs:
        raise RowError(field, "the conversation is empty")
    prev = None
    for i, m in enumerate(msgs):
        role = m["role"]
        where = f"{field}[{i}]"
        if role == "system" and i != 0:
            raise RowError(where, "a system message may only come first")
        if role == "user" and prev == "user":
            raise RowError(where, "two user messages in a row; merge them or add the assistant reply between")
        if role == "assistant":
            if prev in (None, "system"):
                raise RowError(where, "the conversation must start with a user message (after an optional system)")
            if prev == "assistant" and not msgs[i - 1].get("tool_calls"):
                raise RowError(where, "two assistant messages in a row; merge them")
            if not (m["content"].strip() or m.get("tool_calls") or (m.get("reasoning_content") or "").strip()):
                raise RowError(f"{where}.content", "the assistant reply is empty")
        if role == "tool" and prev not in ("assistant", "tool"):
            raise RowError(where, "a tool result must follow an assistant tool call")
        if role == "tool" and prev == "assistant" and not msgs[i - 1].get("tool_calls"):
            raise RowError(where, "a tool result must follow an assistant message with tool_calls")
        prev = role
    if prev != "assistant":
        raise RowError(f"{field}[{len(msgs) - 1}]", "the conversation must end with an assistant reply")
