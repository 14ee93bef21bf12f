"""Every shipped Qwen chat template (tests/templates/, byte-identical copies, provenance in its
README), as it ships, with its switches: ids equal `apply_chat_template` and labels equal an
independent reference computed from character offsets in the rendered text.

The tokenizer is the vendored Qwen3 one for every template: the real Qwen3.5 tokenizer is not
available offline, and it uses the same ChatML special-token names (`<|im_start|>`, `<|im_end|>`),
which is all a template's text depends on. Special-token text inside content is the documented
exception to "ids equal apply_chat_template" (test_render covers it), so this corpus has none.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jinja2
import pytest

from sftkit.data.prepare import Loaded, Row, expanded
from sftkit.data.render import IGNORE_INDEX, Refused, RenderOptions, render_batch, render_pieces, template_spec

TEMPLATES = Path(__file__).parent / "templates"
NAMES = sorted(p.stem for p in TEMPLATES.glob("*.jinja"))
HEADER, END, END_ID = "<|im_start|>assistant\n", "<|im_end|>", 151645
QWEN3_5_ON = {"qwen3_5_think", "qwen3_5_nothink", "qwen3_6", "qwen3_8"}  # refuse 2 rows of CORPUS
U, A, S, T = "user", "assistant", "system", "tool"


def m(role, content, **kw):
    return {"role": role, "content": content, **kw}


def call(name, **arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def tool(name, **properties):
    return {"type": "function", "function": {"name": name, "description": f"{name} of a place", "parameters": {
        "type": "object", "properties": {k: {"type": v} for k, v in properties.items()}, "required": list(properties)}}}


TOOLS = [tool("get_weather", city="string", days="integer"), tool("get_time", city="string")]
WEATHER, TIME = call("get_weather", city="Paris", days=3), call("get_time", city="東京")
NESTED = call("get_weather", city="Oslo", days=2, units={"temp": "C", "wind": "m/s"}, hours=[6, 12])
# (messages, tools): single and multi-turn, system, reasoning in the last and in earlier turns,
# tool calls (one, several, nested arguments) and their results, a tools list, empty replies, unicode
CORPUS = [
    ([m(U, "hi"), m(A, "hello")], None),
    ([m(S, "You are terse."), m(U, "2+2?"), m(A, "4")], None),
    ([m(S, "sys"), m(U, "q1"), m(A, "a1"), m(U, "q2"), m(A, "a2"), m(U, "q3"), m(A, "a3")], None),
    ([m(U, "think first"), m(A, "42", reasoning_content="6*7 is 42")], None),
    ([m(U, "q1"), m(A, "a1", reasoning_content="early reasoning"), m(U, "q2"), m(A, "a2", reasoning_content="r2")],
     None),
    ([m(U, "q1"), m(A, "a1", reasoning_content="early, none later"), m(U, "q2"), m(A, "a2")], None),
    ([m(U, "q"), m(A, "<think>\ninline reasoning\n</think>\n\nanswer")], None),
    ([m(U, "Reply with nothing."), m(A, "")], None),
    ([m(U, "q1"), m(A, ""), m(U, "q2"), m(A, "a2")], None),
    ([m(U, "\n\nleading newlines"), m(A, "\nreply with a leading newline")], None),
    ([m(U, "你好，世界 🎉"), m(A, "你好！👩‍💻 はい、안녕하세요 π ≈ 3.14159")], None),
    ([m(U, "q"), m(A, "x"), m(A, "y")], None),
    ([m(A, "I speak first."), m(U, "OK"), m(A, "Fine.")], None),
    ([m(S, "Use the tools."), m(U, "Weather in Paris?"), m(A, "", tool_calls=[WEATHER]), m(T, '{"temp": 21}'),
      m(A, "It is 21C.")], TOOLS),
    ([m(U, "Weather and time?"), m(A, "Checking both.", tool_calls=[WEATHER, TIME]), m(T, "sunny"), m(T, "09:00"),
      m(A, "Sunny, and 09:00 in Tokyo.")], TOOLS),
    ([m(U, "Plan my week in Oslo"), m(A, "", reasoning_content="I need the forecast.", tool_calls=[NESTED]),
      m(T, '{"rain": [true, false]}'), m(A, "Rain on Monday.", reasoning_content="Summarise.")], TOOLS),
    ([m(S, "Be brief."), m(U, "Tools listed, none used"), m(A, "Fine without them.")], TOOLS),
    ([m(U, "weather?"), m(A, "", tool_calls=[WEATHER]), m(T, "rain"), m(A, "Rain."), m(U, "and now?"),
      m(A, "Still rain.", reasoning_content="same as before")], None),
    # refused by the Qwen3.5+ templates ("System message must be at the beginning."):
    ([m(U, "q1"), m(A, "a1"), m(S, "From now on, answer in French."), m(U, "q2"), m(A, "r2")], None),
    # refused by the Qwen3.5+ templates ("No user query found in messages."):
    ([m(S, "sys"), m(A, "an answer to nothing")], None),
]

# Switch combinations per template: its default always, then each switch it reads
SWITCHES = {
    "qwen3": [{"enable_thinking": False}, {"enable_thinking": True}],
    "qwen3_5_think": [{"enable_thinking": False}],
    "qwen3_5_nothink": [{"enable_thinking": True}, {"enable_thinking": False}],
    "qwen3_6": [{"enable_thinking": False}, {"preserve_thinking": True},
                {"preserve_thinking": True, "enable_thinking": False}],
    "qwen3_8": [{"reasoning_effort": "low"}, {"reasoning_effort": "medium"}, {"reasoning_effort": "xhigh"},
                {"preserve_thinking": False}, {"enable_thinking": False, "preserve_thinking": False}],
}
CASES = [(name, sw) for name in NAMES for sw in [{}, *SWITCHES.get(name, [])]]


_SPECS: dict = {}


def with_template(tok, name: str):
    """Set template `name` on `tok`; its TemplateSpec, built once per template."""
    tok.chat_template = (TEMPLATES / f"{name}.jinja").read_text()
    if name not in _SPECS:
        _SPECS[name] = template_spec(tok)
    return _SPECS[name]


def free_opening(tok, prefix, switches) -> str:
    """What the generation prompt after `prefix` gives after the header: rendered with and without
    add_generation_prompt. A prefix without a user turn cannot be rendered by every template (Qwen3.5:
    'No user query found'), and the generation prompt does not depend on it: a one-question prefix."""
    if not any(x["role"] == U for x in prefix):
        prefix = [m(U, "x")]
    bare = tok.apply_chat_template(prefix, tokenize=False, **switches)
    prompt = tok.apply_chat_template(prefix, tokenize=False, add_generation_prompt=True, **switches)
    assert prompt.startswith(bare + HEADER), prompt
    return prompt[len(bare + HEADER):]


def reference(tok, msgs, tools, switches, last: bool = False):
    """Independent of render.py: tokenize the template's whole text with offsets. Each assistant
    message is the block at its `<|im_start|>assistant\\n`; its supervised span starts after that
    header, and after the generation prompt's opening when the block starts with it, and runs
    through its `<|im_end|>`. A token is supervised when it starts inside a span (`last`: the last
    reply's span alone, the text as served: the generation prompt of the turns before it, then the
    last reply as the whole conversation renders it)."""
    text = tok.apply_chat_template(msgs, tools=tools, tokenize=False, **switches)
    if last and any(x["role"] == U for x in msgs[:-1]):
        prompt = tok.apply_chat_template(msgs[:-1], tools=tools, tokenize=False, add_generation_prompt=True,
                                         **switches)
        text = prompt[:prompt.rindex(HEADER)] + text[text.rindex(HEADER):]
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    starts = [x.start() for x in re.finditer(re.escape(HEADER), text)]
    replies = [i for i, x in enumerate(msgs) if x["role"] == A]
    assert len(starts) == len(replies), text
    spans = []
    for at, i in zip(starts, replies):
        begin = at + len(HEADER)
        opening = free_opening(tok, msgs[:i], switches)
        if opening and text.startswith(opening, begin):
            begin += len(opening)
        spans.append((begin, text.index(END, begin) + len(END)))
    spans = spans[-1:] if last else spans
    labels = [t if any(a <= s < b for a, b in spans) else IGNORE_INDEX
              for t, (s, _) in zip(enc["input_ids"], enc["offset_mapping"])]
    return text, enc["input_ids"], labels


def supervised(tok, labels) -> str:
    return tok.decode([t for t in labels if t != IGNORE_INDEX])


def test_the_templates_are_the_shipped_bytes():
    """Each file's sha256 is the one its README records for the shipped template."""
    import hashlib

    listed = dict(re.findall(r"^\| `(\w+)\.jinja` \|.*\| `([0-9a-f]{64})` \|$", (TEMPLATES / "README.md").read_text(),
                             re.MULTILINE))
    assert sorted(listed) == NAMES and len(NAMES) == 9
    for name, sha in listed.items():
        assert hashlib.sha256((TEMPLATES / f"{name}.jinja").read_bytes()).hexdigest() == sha, name


@pytest.mark.parametrize("name,switches", CASES, ids=[f"{n}-{json.dumps(s)}" for n, s in CASES])
def test_ids_and_labels_match_the_template_on_every_row(own_tok, name, switches):
    spec = with_template(own_tok, name)
    rendered = render_batch([c for c, _ in CORPUS], own_tok, spec, RenderOptions(**switches), [t for _, t in CORPUS])
    refused = 0
    for (msgs, tools), got in zip(CORPUS, rendered):
        try:
            text, ref_ids, ref_labels = reference(own_tok, msgs, tools, switches)
        except jinja2.TemplateError as err:
            refused += 1
            assert isinstance(got, Refused) and got.problem == f"the chat template refuses this row: {err}", got
            continue
        ids, labels = got
        assert ids == own_tok.apply_chat_template(msgs, tools=tools, tokenize=True, **switches)["input_ids"], text
        assert ids == ref_ids, text
        assert labels == ref_labels, f"{text!r}\nsupervised {supervised(own_tok, labels)!r}\n" \
                                     f"reference  {supervised(own_tok, ref_labels)!r}"
        assert labels.count(END_ID) == sum(x["role"] == A for x in msgs)  # every reply learns to stop
    assert refused == (2 if name in QWEN3_5_ON else 0)


@pytest.mark.parametrize("name,switches,last_reply", [
    # the generation prompt opens the think block itself: the model writes from after `<think>\n`
    ("qwen3_thinking_2507", {}, "6*7 is 42\n</think>\n\n42<|im_end|>"),
    ("qwen3_5_think", {}, "6*7 is 42\n</think>\n\n42<|im_end|>"),
    # Qwen3 opens nothing: the whole think block is the model's
    ("qwen3", {}, "<think>\n6*7 is 42\n</think>\n\n42<|im_end|>"),
    ("qwen2_5", {}, "42<|im_end|>"),  # no reasoning in the template at all
])
def test_the_opening_of_the_generation_prompt_is_prompt(own_tok, name, switches, last_reply):
    spec = with_template(own_tok, name)
    _, labels = render_batch([CORPUS[3][0]], own_tok, spec, RenderOptions(**switches))[0]
    assert supervised(own_tok, labels) == last_reply


def test_an_earlier_reply_whose_reasoning_the_template_drops_is_supervised_from_its_header(own_tok):
    spec = with_template(own_tok, "qwen3_thinking_2507")
    ids, labels = render_batch([CORPUS[4][0]], own_tok, spec, RenderOptions())[0]
    assert "early reasoning" not in own_tok.decode(ids)
    assert supervised(own_tok, labels) == "a1<|im_end|>r2\n</think>\n\na2<|im_end|>"


def test_thinking_off_leaves_the_empty_think_block_in_the_prompt(own_tok):
    for name in ("qwen3_5_nothink", "qwen3_5_think"):  # off by default / switched off
        spec = with_template(own_tok, name)
        switches = {} if name == "qwen3_5_nothink" else {"enable_thinking": False}
        ids, labels = render_batch([CORPUS[0][0]], own_tok, spec, RenderOptions(**switches))[0]
        assert supervised(own_tok, labels) == "hello<|im_end|>"
        prompt = own_tok.apply_chat_template(CORPUS[0][0][:1], tokenize=True, add_generation_prompt=True,
                                          **switches)["input_ids"]
        assert ids[:len(prompt)] == prompt and own_tok.decode(prompt).endswith("<think>\n\n</think>\n\n")
        assert all(t == IGNORE_INDEX for t in labels[:len(prompt)])


def test_xml_tool_calls_are_supervised_and_tools_come_before_the_system_text(own_tok):
    spec = with_template(own_tok, "qwen3_5_think")
    msgs, tools = CORPUS[13]
    ids, labels = render_batch([msgs], own_tok, spec, RenderOptions(), [tools])[0]
    text = own_tok.decode(ids)
    assert text.index("# Tools") < text.index("Use the tools.") < text.index("Weather in Paris?")
    said = supervised(own_tok, labels)
    assert "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n" in said
    assert "# Tools" not in said and "Use the tools." not in said and '{"temp": 21}' not in said


def test_preserve_thinking_keeps_and_supervises_earlier_reasoning(own_tok):
    msgs = CORPUS[4][0]
    for name, switches, kept in (("qwen3_6", {}, False), ("qwen3_6", {"preserve_thinking": True}, True),
                                 ("qwen3_8", {}, True), ("qwen3_8", {"preserve_thinking": False}, False)):
        spec = with_template(own_tok, name)
        _, labels = render_batch([msgs], own_tok, spec, RenderOptions(**switches))[0]
        assert ("early reasoning" in supervised(own_tok, labels)) is kept, (name, switches)


def test_row_switches_override_the_run_and_follow_into_the_opening(own_tok):
    spec = with_template(own_tok, "qwen3_8")
    run = RenderOptions(reasoning_effort="medium")
    rows = [({"reasoning_effort": "low"}, CORPUS[1][0]), ({"enable_thinking": False}, CORPUS[0][0]),
            (None, CORPUS[3][0]), ({"preserve_thinking": False}, CORPUS[4][0])]
    got = render_batch([c for _, c in rows], own_tok, spec, run, None, [s for s, _ in rows])
    for (row, msgs), (ids, labels) in zip(rows, got):
        switches = {**run.switches(), **(row or {})}
        _, ref_ids, ref_labels = reference(own_tok, msgs, None, switches)
        assert (ids, labels) == (ref_ids, ref_labels), switches
    assert "Reasoning effort is set to low" in own_tok.decode(got[0][0])
    assert supervised(own_tok, got[1][1]) == "hello<|im_end|>"  # thinking off: the empty block is prompt
    assert supervised(own_tok, got[2][1]) == "6*7 is 42\n</think>\n\n42<|im_end|>"


def test_a_row_switch_the_template_never_reads_is_refused(own_tok):
    spec = with_template(own_tok, "qwen3")
    got = render_batch([CORPUS[0][0]], own_tok, spec, RenderOptions(), None, [{"reasoning_effort": "low"}])[0]
    assert isinstance(got, Refused) and got.field == "reasoning_effort"
    assert "never reads reasoning_effort" in got.problem and "(it reads enable_thinking)" in got.problem


def test_run_switches_are_checked_against_the_template(own_tok):
    from sftkit.data.prepare import check_switches
    from sftkit.errors import ConfigError

    spec = with_template(own_tok, "qwen3_instruct_2507")
    with pytest.raises(ConfigError, match="never reads enable_thinking, so setting it would change nothing "
                                          r"\(it reads none of enable_thinking, preserve_thinking, reasoning_effort\)"):
        check_switches(own_tok, spec, RenderOptions(enable_thinking=False))
    spec = with_template(own_tok, "qwen3_8")
    with pytest.raises(ConfigError, match="refuses reasoning_effort='high': Unexpected reasoning effort high. "
                                          "Supported types are xhigh"):
        check_switches(own_tok, spec, RenderOptions(reasoning_effort="high"))
    check_switches(own_tok, spec, RenderOptions(reasoning_effort="low", enable_thinking=True))


def test_row_switches_are_read_and_checked():
    from sftkit.data.formats import RowError, row_switches

    assert row_switches({"messages": []}) is None
    assert row_switches({"chat_template_kwargs": {"enable_thinking": False, "reasoning_effort": None},
                         "reasoning_effort": "low"}) == {"enable_thinking": False, "reasoning_effort": "low"}
    for row, field, problem in (
            ({"chat_template_kwargs": "x"}, "chat_template_kwargs", "expected an object"),
            ({"chat_template_kwargs": {"tools": []}}, "chat_template_kwargs.tools", "only enable_thinking"),
            ({"enable_thinking": "no"}, "enable_thinking", "expected true or false, got a string"),
            ({"reasoning_effort": 1}, "reasoning_effort", "expected a string"),
            ({"enable_thinking": True, "chat_template_kwargs": {"enable_thinking": False}}, "enable_thinking",
             "set it once")):
        with pytest.raises(RowError) as err:
            row_switches(row)
        assert err.value.field == field and problem in err.value.problem


def test_switches_enter_the_fingerprint(tmp_path, tok):
    from sftkit.data.options import DataOptions
    from sftkit.data.prepare import fingerprint, resolve_sources

    (tmp_path / "d.jsonl").write_text(json.dumps({"messages": CORPUS[0][0]}) + "\n")
    fps = set()
    for sw in ({}, {"enable_thinking": False}, {"enable_thinking": True}, {"preserve_thinking": True},
               {"reasoning_effort": "low"}):
        opts = DataOptions(data_path=[str(tmp_path / "d.jsonl")], **sw)
        fps.add(fingerprint(resolve_sources(opts.data_path, opts), tok, opts, None))
    assert len(fps) == 5


@pytest.mark.parametrize("name,switches", CASES, ids=[f"{n}-{json.dumps(s)}" for n, s in CASES])
def test_expanded_replies_are_rendered_as_served(own_tok, name, switches):
    """multi_turn expand: reply i's example is the conversation up to it, its ids those of
    apply_chat_template, its labels the reference's for the last reply alone; the text before the
    supervised span is the generation prompt of the conversation before the reply (the served
    context), and the supervised text is what follows it, through <|im_end|>."""
    spec = with_template(own_tok, name)
    opts = RenderOptions(train_on="last", as_served=True, **switches)
    tally = Loaded()
    rows = [r for i, (msgs, tools) in enumerate(CORPUS) for r in expanded(Row(msgs, tools, None, 0, 0, str(i)), tally)]
    assert sum(k * n for k, n in tally.examples_per_row.items()) == len(rows) == sum(
        x["role"] == A for msgs, _ in CORPUS for x in msgs)
    rendered = render_batch([r.conv for r in rows], own_tok, spec, opts, [r.tools for r in rows])
    served = differs = 0
    for row, got in zip(rows, rendered):
        conv, tools = row.conv, row.tools
        try:
            text, ref_ids, ref_labels = reference(own_tok, conv, tools, switches, last=True)
        except jinja2.TemplateError as err:
            assert isinstance(got, Refused) and got.problem == f"the chat template refuses this row: {err}", got
            continue
        ids, labels = got
        assert ids == ref_ids and labels == ref_labels, f"{text!r}\nsupervised {supervised(own_tok, labels)!r}"
        assert labels.count(END_ID) == 1 and conv[-1]["role"] == A
        whole = own_tok.apply_chat_template(conv, tools=tools, tokenize=False, **switches)
        differs += text != whole
        if text == whole:
            assert ids == own_tok.apply_chat_template(conv, tools=tools, tokenize=True, **switches)["input_ids"]
        if not any(x["role"] == U for x in conv[:-1]):
            continue  # no served context: a template may refuse a generation prompt without a question
        prompt = own_tok.apply_chat_template(conv[:-1], tools=tools, tokenize=False, add_generation_prompt=True,
                                             **switches)
        context = prompt[:prompt.rindex(HEADER) + len(HEADER)]
        assert text.startswith(context), f"{text!r} does not continue its served context {context!r}"
        # the generation prompt's opening (Qwen3's empty think block when thinking is off) is prompt,
        # unless the reply in the data starts otherwise (its reasoning)
        reply = text[len(prompt) if text.startswith(prompt) else len(context):text.rindex(END) + len(END)]
        if not reply.startswith("\n"):  # a reply that starts with "\n" shares its first token with the header
            assert supervised(own_tok, labels) == reply
            served += 1
    assert served >= 7  # the rest open with a "\n" (an empty think block after the prompt's "<think>\n")
    # Qwen3 renders a reply followed by another reply without the empty think block it gets as the
    # last turn: served, the second reply follows the first with it (the one such row in CORPUS)
    assert differs == (name in ("qwen3", "qwen3_thinking_2507"))


# (conversation, the supervised replies a template that drops earlier reasoning renders without theirs)
UNSERVED = [
    ([m(U, "q1"), m(A, "a1", reasoning_content="early reasoning"), m(U, "q2"), m(A, "a2", reasoning_content="r2")], 1),
    ([m(U, "q1"), m(A, "a1", reasoning_content="early, none later"), m(U, "q2"), m(A, "a2")], 1),
    ([m(U, "q1"), m(A, "<think>\ninline early\n</think>\n\na1"), m(U, "q2"), m(A, "a2"), m(U, "q3"),
      m(A, "a3", reasoning_content="late")], 1),
    ([m(U, "think first"), m(A, "42", reasoning_content="6*7 is 42")], 0),
    ([m(U, "Plan my week in Oslo"), m(A, "", reasoning_content="I need the forecast.", tool_calls=[NESTED]),
      m(T, '{"rain": [true, false]}'), m(A, "Rain on Monday.", reasoning_content="Summarise.")], 0),
    ([m(U, "q1"), m(A, "a1"), m(U, "q2"), m(A, "a2")], 0),
]


@pytest.mark.parametrize("name,switches,drops", [
    ("qwen3", {}, True), ("qwen3_5_think", {}, True), ("qwen3_6", {}, True),
    ("qwen3_6", {"preserve_thinking": True}, False), ("qwen3_8", {}, False), ("qwen2_5", {}, False),
])
def test_replies_trained_unlike_served_are_counted(own_tok, name, switches, drops):
    """A reply whose reasoning the template drops because a later user turn follows is counted (it
    is served after that reasoning); none where the template keeps past reasoning (Qwen3.6 with
    preserve_thinking, Qwen3.8) or never renders it (Qwen2.5), none on the last reply, none with
    train_on last (the earlier replies are not supervised) or multi_turn expand."""
    spec = with_template(own_tok, name)
    convs, tools = [c for c, _ in UNSERVED], [None] * len(UNSERVED)
    got = render_pieces(convs, own_tok, spec, RenderOptions(**switches), tools).unserved
    assert got == (sum(n for _, n in UNSERVED) if drops else 0)
    assert render_pieces(convs, own_tok, spec, RenderOptions(train_on="last", **switches), tools).unserved == 0
    rows = [r for i, c in enumerate(convs) for r in expanded(Row(c, None, None, 0, 0, str(i)), Loaded())]
    assert render_pieces([r.conv for r in rows], own_tok, spec, RenderOptions(train_on="last", **switches)).unserved == 0
