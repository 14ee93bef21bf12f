"""Row formats -> one internal type: a list of messages ({role, content, ...}).

Pure functions: a row (dict) in, messages out, or a DataError naming the field.
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


def detect_format(row: dict[str, Any]) -> str:
    """Which format a row is in, from its keys; raises RowError if none fits."""
    if not isinstance(row, dict):
        raise RowError(None, f"expected a JSON object per row, got {type(row).__name__}")
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if any(k in row for k in CUSTOM_INSTRUCTION) and any(k in row for k in CUSTOM_OUTPUT):
        return "custom"
    keys = ", ".join(sorted(row)) or "none"
    raise RowError(None, f"cannot tell the format from the keys ({keys}); expected messages, "
                         "conversations, instruction+output, or question/prompt/query + "
                         "answer/response/completion; set --format_type and --field_map")


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
    if not isinstance(row, dict):
        raise RowError(None, f"expected a JSON object per row, got {type(row).__name__}")
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
    return msgs


def _text(value: Any, field: str, allow_empty: bool = True) -> str:
    if value is None:
        if allow_empty:
            return ""
        raise RowError(field, "is missing (null)")
    if not isinstance(value, str):
        raise RowError(field, f"expected a string, got {type(value).__name__}")
    return value


def _custom_map(row: dict[str, Any]) -> dict[str, str]:
    instruction = next(k for k in CUSTOM_INSTRUCTION if k in row)
    output = next(k for k in CUSTOM_OUTPUT if k in row)
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
        raise RowError("history", f"expected a list of [instruction, output] pairs, got {type(history).__name__}")
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
        raise RowError("conversations", f"expected a list of turns, got {type(turns).__name__}")
    msgs: Conversation = []
    system = row.get("system")
    if system is not None:
        msgs.append({"role": "system", "content": _text(system, "system")})
    for i, turn in enumerate(turns):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise RowError(where, f"expected an object with from/value, got {type(turn).__name__}")
        if "from" not in turn:
            raise RowError(f"{where}.from", "is missing")
        source = turn["from"]
        if source not in SHAREGPT_ROLES:
            raise RowError(f"{where}.from", f"unknown role '{source}'; expected one of {', '.join(SHAREGPT_ROLES)}")
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
    return {"type": "function", "function": {"name": value["name"], "arguments": value.get("arguments", {})}}


def _content(value: Any, field: str) -> str:
    """OpenAI content: a string, null, or a list of {type: text, text} parts."""
    if value is None or isinstance(value, str):
        return value or ""
    if isinstance(value, list):
        parts = []
        for j, part in enumerate(value):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise RowError(f"{field}[{j}]", f"only text content parts are supported, got '{kind}'")
            parts.append(part["text"])
        return "".join(parts)
    raise RowError(field, f"expected a string or a list of text parts, got {type(value).__name__}")


def _from_openai(row: dict[str, Any]) -> Conversation:
    raw = row.get("messages")
    if not isinstance(raw, list):
        raise RowError("messages", f"expected a list of messages, got {type(raw).__name__}")
    msgs: Conversation = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RowError(where, f"expected an object with role/content, got {type(m).__name__}")
        role = m.get("role")
        if role not in ("system", "user", "assistant", "tool"):
            raise RowError(f"{where}.role", f"unknown role '{role}'; expected system, user, assistant or tool")
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
