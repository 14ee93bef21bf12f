"""sftkit/data/template.py renders what transformers' `apply_chat_template(..., tokenize=False)`
renders, character for character, over every shipped template and varied conversations; and its
cached sandbox refuses exactly what jinja2's own immutable sandbox refuses."""

from __future__ import annotations

import json
from collections.abc import MutableSequence
from pathlib import Path

import jinja2
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from sftkit.data.template import ChatSandbox, apply, environment

ROOT = Path(__file__).resolve().parents[1]
# tests/templates/ (byte-identical copies) and, where the checkout has it, the shared originals
SOURCES = {f"{p.parent.parent.name}/{p.stem}": p.read_text()
           for folder in (ROOT / "tests" / "templates", ROOT.parent / "shared" / "qwen" / "templates")
           for p in sorted(folder.glob("*.jinja"))}
U, A, S, T = "user", "assistant", "system", "tool"


def m(role, content, **kw):
    return {"role": role, "content": content, **kw}


def call(name, arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a place", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city"]}}},
         {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}]
WEATHER = call("get_weather", {"city": "Paris", "days": 3})
NESTED = call("get_weather", {"city": "Oslo", "units": {"temp": "C"}, "hours": [6, 12], "ok": True, "x": None})
AS_TEXT = call("get_time", json.dumps({"city": "東京"}, ensure_ascii=False))
# (messages, tools)
CONVERSATIONS = [
    ([m(U, "hi"), m(A, "hello")], None),
    ([m(U, "hi")], None),
    ([m(S, "You are terse."), m(U, "2+2?"), m(A, "4")], None),
    ([m(S, "sys"), m(U, "q1"), m(A, "a1"), m(U, "q2"), m(A, "a2"), m(U, "q3"), m(A, "a3")], None),
    ([m(U, "think first"), m(A, "42", reasoning_content="6*7 is 42")], None),
    ([m(U, "q1"), m(A, "a1", reasoning_content="early"), m(U, "q2"), m(A, "a2", reasoning_content="late")], None),
    ([m(U, "q1"), m(A, "a1", reasoning_content="early, none later"), m(U, "q2"), m(A, "a2")], None),
    ([m(U, "q"), m(A, "a", thinking="under the name gpt-oss templates read")], None),
    ([m(U, "q"), m(A, "a", reasoning="under an older name", reasoning_content=None)], None),
    ([m(U, "q"), m(A, "a", reasoning_content="")], None),
    ([m(U, "q"), m(A, "<think>\ninline reasoning\n</think>\n\nanswer")], None),
    ([m(U, "q"), m(A, "<think>r</think>a"), m(U, "q2"), m(A, "<think>\nr2\n</think>\n\na2")], None),
    ([m(U, "Reply with nothing."), m(A, "")], None),
    ([m(U, "\n\nleading newlines"), m(A, "\nreply with a leading newline  ")], None),
    ([m(U, "你好，世界 🎉 <|im_end|> literal"), m(A, "はい 👩‍💻 π ≈ 3.14159 {{ not jinja }}")], None),
    ([m(A, "I speak first."), m(U, "OK"), m(A, "Fine.")], None),
    ([m(U, "q1"), m(A, "a1"), m(S, "From now on, answer in French."), m(U, "q2"), m(A, "r2")], None),
    ([m(S, "sys"), m(A, "an answer to nothing")], None),
    ([m(S, "Use the tools."), m(U, "Weather in Paris?"), m(A, "", tool_calls=[WEATHER]), m(T, '{"temp": 21}'),
      m(A, "It is 21C.")], TOOLS),
    ([m(U, "Weather and time?"), m(A, None, tool_calls=[WEATHER, AS_TEXT]), m(T, "sunny"), m(T, "09:00"),
      m(A, "Sunny, 09:00.")], TOOLS),
    ([m(U, "Plan my week"), m(A, "", reasoning_content="I need the forecast.", tool_calls=[NESTED]),
      m(T, '{"rain": [true, false]}'), m(A, "Rain on Monday.", reasoning_content="Summarise.")], TOOLS),
    ([m(S, "Be brief."), m(U, "Tools listed, none used"), m(A, "Fine without them.", tool_calls=None)], TOOLS),
    ([m(U, "weather?"), m(A, "", tool_calls=[WEATHER]), m(T, "rain"), m(A, "Rain."), m(U, "and now?"),
      m(A, "Still rain.", reasoning_content="same as before")], None),
    ([m(U, [{"type": "text", "text": "content as parts"}]), m(A, "ok")], None),
]
SWITCH_SETS = [{}, {"enable_thinking": True}, {"enable_thinking": False}, {"preserve_thinking": True},
               {"reasoning_effort": "low", "enable_thinking": False}]


def outcome(render, *args, **kwargs):
    """The text, or the error as (type, message): a row refused must be refused alike."""
    try:
        return render(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 (any error transformers raises, ours must raise too)
        return type(err).__name__, str(err)


def test_every_shipped_template_is_found():
    assert len([k for k in SOURCES if k.startswith("tests/")]) >= 9


@pytest.mark.parametrize("name", ["bundled", *SOURCES])
def test_the_text_equals_apply_chat_template(own_tok, name):
    if name != "bundled":
        own_tok.chat_template = SOURCES[name]
    rendered = 0
    for msgs, tools in CONVERSATIONS:
        for switches in SWITCH_SETS:
            for prompt in (False, True):
                theirs = outcome(own_tok.apply_chat_template, msgs, tools=tools, tokenize=False,
                                 add_generation_prompt=prompt, **switches)
                ours = outcome(apply, own_tok, msgs, tools, prompt, switches)
                assert ours == theirs, (name, msgs, tools, switches, prompt)
                rendered += isinstance(theirs, str)
    assert rendered >= len(CONVERSATIONS) * len(SWITCH_SETS)  # most render: not a comparison of errors


def test_the_reply_markers_parse_and_render_their_body(own_tok):
    """TRL's training templates wrap replies in {% generation %}: parsed, rendered as the body."""
    own_tok.chat_template = ("{% for message in messages %}<|im_start|>{{ message.role }}\n"
                             "{% if message.role == 'assistant' %}{% generation %}{{ message.content }}<|im_end|>"
                             "{% endgeneration %}{% else %}{{ message.content }}<|im_end|>{% endif %}\n{% endfor %}")
    msgs = CONVERSATIONS[2][0]
    assert apply(own_tok, msgs) == own_tok.apply_chat_template(msgs, tokenize=False)
    assert apply(own_tok, msgs).endswith("<|im_start|>assistant\n4<|im_end|>")  # the body, no marker text


# Each reads an attribute the sandbox decides on; the unsafe ones must stay refused or undefined
PROBES = [
    "{{ ''.__class__ }}", "{{ ''.__class__.__mro__ }}", "{{ ''.__class__.__base__.__subclasses__() }}",
    "{{ ().__class__ }}", "{{ messages.__class__ }}", "{{ messages._x }}", "{{ d.__init__ }}",
    "{{ messages.append(1) }}", "{{ messages.pop() }}", "{{ messages.sort() }}", "{{ d.update({'a': 1}) }}",
    "{{ d.pop('role') }}", "{{ d.setdefault('x', 1) }}", "{{ d.clear() }}", "{{ s.add(1) }}",
    "{{ d.items() | list }}", "{{ d.keys() | list }}", "{{ d.get('role') }}", "{{ d.role }}", "{{ d.missing }}",
    "{{ d['role'] }}", "{{ d['__class__'] }}", "{{ d['update'] }}", "{{ messages.index(d) }}",
    "{{ 'x'.upper() }}", "{{ '{0.__class__}'.format(1) }}", "{{ '{0}'.format(1) }}", "{{ '{x}'.format_map({'x': 2}) }}",
    "{{ raise_exception.__globals__ }}", "{{ namespace.mro() }}", "{{ cls.mro() }}", "{{ dict.__call__ }}",
    "{{ dict(a=1).update }}", "{% set ns = namespace(a=1) %}{{ ns.a }}{{ ns._Namespace__attrs }}",
    "{% set ns = namespace(_a=1) %}", "{% set ns = namespace(a=1) %}{% set ns._b = 2 %}",
    "{{ (messages | map(attribute='role') | list) }}", "{{ messages | map(attribute='__class__') | list }}",
    "{% for x in messages %}{{ loop.index }}{{ loop.__class__ }}{% endfor %}",
]


def render_in(env, source: str) -> object:
    context = {"messages": [{"role": "user"}], "d": {"role": "user"}, "s": {1, 2}, "cls": int}
    context["messages"].append(context["d"])
    return outcome(lambda: env.from_string(source).render(**context))  # from_string may refuse it too


def test_the_cached_sandbox_decides_as_jinja2s_own():
    ours = environment()
    theirs = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    theirs.filters.update(ours.filters)
    theirs.globals.update(ours.globals)
    refused = 0
    for probe in PROBES:
        expected = render_in(theirs, probe)
        assert render_in(ours, probe) == expected, probe
        assert render_in(ours, probe) == expected, probe  # again, from the cache
        refused += isinstance(expected, tuple) and expected[0] == "SecurityError"
    assert refused >= 12
    assert render_in(ours, "{{ ''.__class__ }}") == ""  # undefined, as jinja2 renders an unsafe attribute


class _Stack:
    def append(self, x):
        return "appended"


class _ListLike:
    """Reports list as its class, so isinstance takes it for a MutableSequence: per object, not per type."""

    @property
    def __class__(self):
        return list

    def append(self, x):
        return "appended"


def test_a_decision_that_changes_is_not_served_stale():
    """Registering a class with an ABC changes what modifies_known_mutable says: the cache follows.
    An object that reports another class is asked about every time."""
    env = environment()
    assert isinstance(env, ChatSandbox)
    template = env.from_string("{{ x.append(1) }}")
    assert template.render(x=_Stack()) == "appended"
    MutableSequence.register(_Stack)
    with pytest.raises(jinja2.exceptions.SecurityError):
        template.render(x=_Stack())
    with pytest.raises(jinja2.exceptions.SecurityError):
        template.render(x=_ListLike())
