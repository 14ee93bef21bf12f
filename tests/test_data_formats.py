"""Rows into messages: Alpaca (system, history), ShareGPT roles and function calls, OpenAI messages
with reasoning and content parts, custom columns, and TRL's text and prompt/completion rows."""

from __future__ import annotations

import json

from sftkit.data import formats

ALPACA = {"instruction": "Add", "input": "2 and 3", "output": "5"}


def test_alpaca_with_system_and_history():
    row = {**ALPACA, "system": "be brief", "history": [["hi", "hello"]]}
    assert formats.to_messages(row, formats.detect_format(row)) == [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "Add\n\n2 and 3"},
        {"role": "assistant", "content": "5"}]


def test_sharegpt_roles_and_function_call():
    row = {"conversations": [
        {"from": "system", "value": "s"}, {"from": "human", "value": "weather?"},
        {"from": "function_call", "value": '{"name": "w", "arguments": {"c": 1}}'},
        {"from": "observation", "value": "sunny"}, {"from": "gpt", "value": "Sunny."}]}
    msgs = formats.to_messages(row, formats.detect_format(row))
    assert [x["role"] for x in msgs] == ["system", "user", "assistant", "tool", "assistant"]
    assert msgs[2]["tool_calls"][0]["function"] == {"name": "w", "arguments": {"c": 1}}


def test_openai_messages_with_reasoning_and_parts():
    row = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                        {"role": "assistant", "content": "c", "thinking": "t"}]}
    assert formats.to_messages(row, "messages") == [
        {"role": "user", "content": "ab"}, {"role": "assistant", "content": "c", "reasoning_content": "t"}]


def test_custom_columns_and_field_map():
    assert formats.detect_format({"question": "q", "answer": "a"}) == "custom"
    assert formats.to_messages({"prompt": "q", "completion": "a"}, "custom")[-1] == {"role": "assistant", "content": "a"}
    fm = formats.parse_field_map("instruction=ask,output=reply")
    assert formats.to_messages({"ask": "q", "reply": "a"}, "custom", fm)[0] == {"role": "user", "content": "q"}


def test_trl_text_and_prompt_completion_rows(tmp_path, tok):
    """{"text"}: the text's own tokens and the tokenizer's EOS, every one supervised (no template).
    {"prompt": str, "completion": str}: prompt and completion tokenized as written, then EOS; only
    the completion and EOS supervised. Message lists: the chat template's ids exactly, and only the
    completion's reply supervised, not the assistant turn inside the prompt."""
    from sftkit.data.options import DataOptions
    from sftkit.data.prepare import load_prepared, prepare
    from sftkit.data.render import IGNORE_INDEX

    text = "The sky is blue. <|im_end|> stays plain text."
    prompt = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
              {"role": "user", "content": "What color is the sky?"}]
    completion = [{"role": "assistant", "content": "It is blue."}]
    rows = {"text.jsonl": {"text": text, "source": "web"},
            "standard.jsonl": {"prompt": "The sky is", "completion": " blue."},
            "conversational.jsonl": {"prompt": prompt, "completion": completion}}
    got = {}
    for name, row in rows.items():
        (tmp_path / name).write_text(json.dumps(row) + "\n")
        out = tmp_path / name.replace(".jsonl", "")
        manifest = prepare(DataOptions(), [str(tmp_path / name)], out, tok)
        got[name] = load_prepared(out)[0]
        assert manifest["sources"][0]["format"] == ("text" if name == "text.jsonl" else "prompt_completion")

    def plain(s):
        return tok(s, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    eos = tok.eos_token_id
    assert got["text.jsonl"]["input_ids"] == plain(text) + [eos] and tok.convert_ids_to_tokens(eos) == "<|im_end|>"
    assert got["text.jsonl"]["labels"] == got["text.jsonl"]["input_ids"]
    p, c = plain("The sky is"), plain(" blue.")
    assert got["standard.jsonl"]["input_ids"] == p + c + [eos]
    assert got["standard.jsonl"]["labels"] == [IGNORE_INDEX] * len(p) + c + [eos]
    conv = got["conversational.jsonl"]
    assert conv["input_ids"] == list(tok.apply_chat_template(prompt + completion, tokenize=True, return_dict=False))
    supervised = tok.decode([t for t in conv["labels"] if t != IGNORE_INDEX])
    assert supervised == "<think>\n\n</think>\n\nIt is blue.<|im_end|>"
