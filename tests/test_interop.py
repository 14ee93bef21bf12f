"""Data written by other tools prepares as-is: LLaMA-Factory ShareGPT with tools, its
content-part messages, its dataset_info.json registry, axolotl's one-object JSON files, and what
the Qwen3 template renders although a strict role order would refuse it.

Each file is written here in the shape those tools document, prepared with no flags, and every
saved example is checked against the REAL Qwen3 tokenizer: ids equal
`apply_chat_template(messages, tools=...)` and labels equal test_render's independent reference
from the rendered text's character offsets. The expected messages are written by hand, in the
OpenAI form the template reads, not produced by sftkit's own converter.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_jsonl
from test_render import reference

from sftkit.data.options import DataOptions
from sftkit.data.prepare import load_prepared, prepare
from sftkit.errors import ConfigError, DataError

TOOL = {"name": "get_weather", "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
WRAPPED = [{"type": "function", "function": TOOL}]  # how an OpenAI-style server hands a tool to the template


def call(name: str, **arguments) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def u(text):
    return {"role": "user", "content": text}


def a(text, **kw):
    return {"role": "assistant", "content": text, **kw}


def s(text):
    return {"role": "system", "content": text}


def t(text):
    return {"role": "tool", "content": text}


# LLaMA-Factory ShareGPT (its data/README.md): human/gpt/function_call/observation turns, a system
# column, and `tools` as a JSON string (as in its glaive_toolcall demos).
LF_SHAREGPT = [
    ({"conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
        {"from": "observation", "value": '{"temp": 21}'},
        {"from": "gpt", "value": "It is 21C in Paris."}],
      "system": "You are a weather bot.", "tools": json.dumps([TOOL])},
     [s("You are a weather bot."), u("Weather in Paris?"), a("", tool_calls=[call("get_weather", city="Paris")]),
      t('{"temp": 21}'), a("It is 21C in Paris.")], WRAPPED),
    ({"conversations": [  # a list of calls in one function_call turn, and two observations
        {"from": "human", "value": "Paris and Rome?"},
        {"from": "function_call", "value": json.dumps([{"name": "get_weather", "arguments": {"city": "Paris"}},
                                                       {"name": "get_weather", "arguments": {"city": "Rome"}}])},
        {"from": "observation", "value": "21"}, {"from": "observation", "value": "25"},
        {"from": "gpt", "value": "21C and 25C."}], "tools": json.dumps([TOOL])},
     [u("Paris and Rome?"), a("", tool_calls=[call("get_weather", city="Paris"), call("get_weather", city="Rome")]),
      t("21"), t("25"), a("21C and 25C.")], WRAPPED),
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}], "tools": ""},
     [u("Hi"), a("Hello!")], None),
]

# LLaMA-Factory's content-part messages: {type: text | reasoning | tool_call, value}.
LF_PARTS = [
    ({"messages": [
        {"role": "user", "content": [{"type": "text", "value": "What is 6 * 7?"}]},
        {"role": "assistant", "content": [{"type": "reasoning", "value": "6 * 7 = 42"},
                                          {"type": "text", "value": "42"}]}]},
     [u("What is 6 * 7?"), a("42", reasoning_content="6 * 7 = 42")], None),
    ({"messages": [
        {"role": "user", "content": [{"type": "text", "value": "Weather in Oslo?"}]},
        {"role": "assistant", "content": [
            {"type": "reasoning", "value": "I need the tool."},
            {"type": "tool_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Oslo"}})}]},
        {"role": "tool", "content": [{"type": "text", "value": "-3"}]},
        {"role": "assistant", "content": [{"type": "text", "value": "-3C in Oslo."}]}],
      "tools": [TOOL]},
     [u("Weather in Oslo?"), a("", reasoning_content="I need the tool.", tool_calls=[call("get_weather", city="Oslo")]),
      t("-3"), a("-3C in Oslo.")], WRAPPED),
]

# OpenAI messages that the template renders although a strict role order refuses them.
RENDERED_AS_IS = [
    ({"messages": [u("q1"), a("a1"), s("From now on, answer in French."), u("q2"), a("r2")]},
     [u("q1"), a("a1"), s("From now on, answer in French."), u("q2"), a("r2")], None),
    ({"messages": [u("Reply with nothing."), a("")]}, [u("Reply with nothing."), a("")], None),
    ({"messages": [u("q1"), a(" \n\t "), u("q2"), a("a2")]}, [u("q1"), a(" \n\t "), u("q2"), a("a2")], None),
    ({"messages": [u("Weather?"), {"role": "assistant", "content": None, "tool_calls": [call("get_weather", city="Nice")]},
                   t("sunny"), a("Sunny.")], "tools": WRAPPED},
     [u("Weather?"), a("", tool_calls=[call("get_weather", city="Nice")]), t("sunny"), a("Sunny.")], WRAPPED),
]


def prepared(tmp_path: Path, tok, specs: list[str], name: str = "out", **options) -> tuple[list, dict]:
    out = tmp_path / name
    manifest = prepare(DataOptions(data_path=specs, **options), specs, out, tok)
    return list(load_prepared(out)), manifest


def assert_exact(tok, saved: list, expected: list) -> None:
    """Every saved example equals the official template's ids, and the offsets reference's labels."""
    assert len(saved) == len(expected)
    for example, (msgs, tools) in zip(saved, expected):
        ids = tok.apply_chat_template(msgs, tools=tools, tokenize=True)["input_ids"]
        text, ref_ids, ref_labels = reference(tok, msgs, tools)
        assert example["input_ids"] == ids == ref_ids, text
        assert example["labels"] == ref_labels, text


@pytest.mark.parametrize("cases, suffix", [(LF_SHAREGPT, ".json"), (LF_PARTS, ".jsonl"), (RENDERED_AS_IS, ".jsonl")],
                         ids=["llamafactory-sharegpt-tools", "llamafactory-content-parts", "rendered-as-is"])
def test_files_of_other_tools_prepare_exactly_as_the_template_renders(tmp_path, tok, cases, suffix):
    path = tmp_path / f"data{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps([row for row, _, _ in cases], indent=2))
    else:
        write_jsonl(path, [row for row, _, _ in cases])
    saved, manifest = prepared(tmp_path, tok, [str(path)])
    assert_exact(tok, saved, [(msgs, tools) for _, msgs, tools in cases])
    empty = sum(1 for _, msgs, _ in cases for m in msgs if m["role"] == "assistant" and not m["content"].strip()
                and not m.get("tool_calls") and not m.get("reasoning_content"))
    assert manifest["warnings"] == {"empty_reply": empty}


def test_a_json_file_holding_one_conversation_is_one_row(tmp_path, tok):
    """axolotl's fixtures: one pretty-printed conversation object per .json file (its
    conversation.missingturns.json has an empty gpt turn in the middle, as here)."""
    turns = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": ""},
             {"from": "human", "value": "Hello?"}, {"from": "gpt", "value": "Hey"}]
    path = tmp_path / "one.json"
    path.write_text(json.dumps({"conversations": turns}, indent=2))
    saved, manifest = prepared(tmp_path, tok, [str(path)])
    assert manifest["rows_in"] == 1 and manifest["warnings"] == {"empty_reply": 1}
    assert_exact(tok, saved, [([u("Hi"), a(""), u("Hello?"), a("Hey")], None)])


def test_a_wrapper_object_gets_advice_that_works(tmp_path, tok):
    rows = [{"instruction": "1 + 1?", "output": "2"}, {"instruction": "2 + 2?", "output": "4"}]
    path = tmp_path / "wrapped.json"
    path.write_text(json.dumps({"data": rows}, indent=2))
    with pytest.raises(DataError) as err:
        prepared(tmp_path, tok, [str(path)])
    assert "key 'data' holds 2 rows; save that list alone as the file" in str(err.value)
    path.write_text(json.dumps(rows, indent=2))  # the advice, followed
    saved, _ = prepared(tmp_path, tok, [str(path)])
    assert_exact(tok, saved, [([u("1 + 1?"), a("2")], None), ([u("2 + 2?"), a("4")], None)])


def test_json_lines_of_lists_is_refused_with_one_clear_line(tmp_path, tok):
    path = tmp_path / "lists.jsonl"
    path.write_text('[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}]\n'
                    '[{"role": "user", "content": "Yo"}, {"role": "assistant", "content": "Hey"}]\n')
    with pytest.raises(DataError) as err:
        prepared(tmp_path, tok, [str(path)])
    assert str(err.value).startswith(f"{path}:line 1: the line holds a JSON list, not an object; JSON Lines holds "
                                     'one row object per line, e.g. {"messages": [...]}')


def test_null_content_is_an_error_naming_the_field(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [u("ok"), a("ok")]}, {"messages": [u(None), a("x")]}])
    with pytest.raises(DataError) as err:
        prepared(tmp_path, tok, [str(path)])
    assert str(err.value) == (f"{path}:line 2: field 'messages[0].content': is null; the chat template needs text "
                              'here (write "" for an empty turn)')


REGISTRY_ROWS = {
    "qa.json": [{"q": "Capital of France?", "ctx": "One word.", "a": "Paris", "sys": "Be exact."}],
    "chat.jsonl": [{"dialog": [{"speaker": "person", "text": "Hi"}, {"speaker": "bot", "text": "Hello"},
                               {"speaker": "person", "text": "Bye"}, {"speaker": "bot", "text": "Goodbye"}]}],
    "glaive.json": [{"conversations": [
        {"from": "human", "value": "Weather in Rome?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Rome"}})},
        {"from": "observation", "value": "25"}, {"from": "gpt", "value": "25C."}], "functions": json.dumps([TOOL])}],
}
REGISTRY = {
    "qa": {"file_name": "qa.json", "columns": {"prompt": "q", "query": "ctx", "response": "a", "system": "sys"}},
    "chat": {"file_name": "chat.jsonl", "formatting": "sharegpt", "columns": {"messages": "dialog"},
             "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "person", "assistant_tag": "bot",
                      "tool_calls_tag": "tool_calls"}},  # as some registries on the Hub write it
    "glaive": {"file_name": "glaive.json", "formatting": "sharegpt",
               "columns": {"messages": "conversations", "tools": "functions"}},
}
REGISTRY_EXPECTED = {
    "qa": [([s("Be exact."), u("Capital of France?\n\nOne word."), a("Paris")], None)],
    "chat": [([u("Hi"), a("Hello"), u("Bye"), a("Goodbye")], None)],
    "glaive": [([u("Weather in Rome?"), a("", tool_calls=[call("get_weather", city="Rome")]), t("25"), a("25C.")],
                WRAPPED)],
}


@pytest.fixture
def registry(tmp_path) -> Path:
    folder = tmp_path / "lf_data"
    folder.mkdir()
    for name, rows in REGISTRY_ROWS.items():
        if name.endswith(".jsonl"):
            write_jsonl(folder / name, rows)
        else:
            (folder / name).write_text(json.dumps(rows, indent=2))
    (folder / "dataset_info.json").write_text(json.dumps(REGISTRY, indent=2))
    return folder / "dataset_info.json"


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_a_dataset_info_json_entry_prepares_by_name(tmp_path, tok, registry, name):
    saved, manifest = prepared(tmp_path, tok, [f"{registry}:{name}"])
    assert manifest["sources"][0]["path"] == str(registry.parent / REGISTRY[name]["file_name"])
    assert_exact(tok, saved, REGISTRY_EXPECTED[name])


def test_dataset_info_option_and_the_entry_s_mapping_in_the_fingerprint(tmp_path, tok, registry):
    saved, first = prepared(tmp_path, tok, ["chat"], "a", dataset_info=str(registry))
    assert_exact(tok, saved, REGISTRY_EXPECTED["chat"])
    saved, _ = prepared(tmp_path, tok, [], "a2", dataset_info=f"{registry}:glaive")  # no data_path
    assert_exact(tok, saved, REGISTRY_EXPECTED["glaive"])
    info = json.loads(registry.read_text())
    info["chat"]["tags"]["assistant_tag"] = "person"  # same file, other roles: another prepared set
    info["chat"]["tags"]["user_tag"] = "bot"
    registry.write_text(json.dumps(info))
    _, second = prepared(tmp_path, tok, ["chat"], "b", dataset_info=str(registry))
    assert second["fingerprint"] != first["fingerprint"]
    with pytest.raises(DataError, match=r"no entry 'nope'; the entries are chat, glaive, qa"):
        prepared(tmp_path, tok, [f"{registry}:nope"], "c")
    with pytest.raises(DataError, match=r"is a LLaMA-Factory dataset_info.json; name one of its entries"):
        prepared(tmp_path, tok, [str(registry)], "d")
    info["chat"]["columns"]["images"] = "pictures"  # a column sftkit cannot use is named, not ignored
    registry.write_text(json.dumps(info))
    with pytest.raises(DataError, match=r"field 'chat.columns.images': is not supported"):
        prepared(tmp_path, tok, ["chat"], "e", dataset_info=str(registry))


def test_field_map_reads_custom_turn_names_and_changes_the_fingerprint(tmp_path, tok, registry):
    path = registry.parent / "chat.jsonl"
    mapping = "messages=dialog,role=speaker,content=text,user=person,assistant=bot"
    saved, first = prepared(tmp_path, tok, [str(path)], "a", field_map=mapping)
    assert_exact(tok, saved, REGISTRY_EXPECTED["chat"])
    _, second = prepared(tmp_path, tok, [str(path)], "b", field_map=mapping.replace("user=person", "user_tag=person"))
    assert second["fingerprint"] != first["fingerprint"]  # an alias, but a different option value
    with pytest.raises(ConfigError, match="field_map entry 'speaker=x'"):
        prepared(tmp_path, tok, [str(path)], "c", field_map="speaker=x")


# Messages that once pointed at the wrong cause, each pinned to its real cause and fix.

def test_all_rows_bad_with_skip_bad_rows_names_the_bad_rows_not_truncation(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "x", "output": None}] * 3)
    with pytest.raises(DataError) as err:
        prepared(tmp_path, tok, [str(path)], skip_bad_rows=True)
    text = str(err.value)
    assert f"no example is left: 3 bad row(s) skipped, the first: {path}:line 1: field 'output'" in text
    assert "--truncation" not in text and "--max_length" not in text


def test_truncation_that_cuts_every_reply_away_says_raise_max_length(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Tell me a long story " * 5, "output": "Once"}] * 2)
    with pytest.raises(DataError) as err:
        prepared(tmp_path, tok, [str(path)], max_length=10, truncation="right")
    text = str(err.value)
    assert text.endswith("no example is left: 2 with no reply token left to train on after --truncation right "
                         "to 10 tokens; raise --max_length")
    assert "left/right" not in text


def test_a_format_type_that_does_not_fit_names_the_missing_key(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [u("Hi"), a("Hey")]}])
    with pytest.raises(DataError) as err:
        prepared(tmp_path, tok, [str(path)], format_type="sharegpt")
    assert str(err.value) == (f"{path}:line 1: field 'conversations': is missing (the row's keys are messages, "
                              "which fit the messages format, not sharegpt: set --format_type messages, or auto to "
                              "detect it)")


def test_generation_samples_skip_a_conversation_with_no_prompt_before_its_reply():
    """Kept for training since the template renders it, but eval's generation needs a prompt."""
    from sftkit.generate import sample_pairs

    convs = [[a("I speak first.")], [u("q1"), a("a1"), u("q2"), a("a2")], [a("hi"), u("ok"), a("fine")], [u("x"), a("y")]]
    assert sample_pairs(convs, 2) == [([u("q1"), a("a1"), u("q2")], "a2"), ([a("hi"), u("ok")], "fine")]
