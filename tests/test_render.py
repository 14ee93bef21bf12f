"""Rendering against the REAL Qwen3 chat template: ids and supervised spans checked against an
independent reference computed from the rendered text's character offsets."""

from __future__ import annotations

import re

import pytest

from sftkit.data.render import IGNORE_INDEX, RenderOptions, render_batch, template_spec

IM_END = 151645
U, A, S = "user", "assistant", "system"


def m(role, content, **kw):
    return {"role": role, "content": content, **kw}


CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
CONVERSATIONS = [
    [m(U, "hi"), m(A, "hello")],
    [m(S, "You are terse."), m(U, "2+2?"), m(A, "4")],
    [m(U, "a"), m(A, "b"), m(U, "c"), m(A, "d")],
    [m(S, "sys"), m(U, "q1"), m(A, "a1"), m(U, "q2"), m(A, "a2"), m(U, "q3"), m(A, "a3")],
    [m(U, "think first"), m(A, "42", reasoning_content="6*7 is 42")],
    [m(U, "q1"), m(A, "a1", reasoning_content="early reasoning, dropped by the template"), m(U, "q2"), m(A, "a2")],
    [m(U, "q1"), m(A, "a1", reasoning_content="r1"), m(U, "q2"), m(A, "a2", reasoning_content="r2")],
    [m(U, "q"), m(A, "<think>inline reasoning</think>answer")],
    [m(U, "q"), m(A, "<think>\nr\n</think>\n\nanswer"), m(U, "q2"), m(A, "<think>r2</think>a2")],
    [m(U, ""), m(A, "You sent nothing.")],
    [m(U, "   "), m(A, "Only spaces?")],
    [m(S, "  \n "), m(U, "x"), m(A, "y")],
    [m(U, "\n\nleading newlines"), m(A, "\nreply with a leading newline")],
    [m(U, "q1"), m(A, "\n\nearly reply, leading newlines"), m(U, "q2"), m(A, "a2")],
    [m(U, "你好，世界"), m(A, "你好！有什么可以帮你的吗？")],
    [m(U, "日本語で答えて"), m(A, "はい、わかりました。")],
    [m(U, "emoji 🎉🚀"), m(A, "🎉 party! 👩‍💻")],
    [m(U, "한국어"), m(A, "안녕하세요 😊")],
    [m(U, "code"), m(A, "```python\ndef f(x):\n    return x * 2\n```")],
    [m(U, "trailing spaces   "), m(A, "reply   ")],
    [m(U, "tabs\tand\r\nwindows newlines"), m(A, "ok\r\n")],
    [m(U, "weather?"), m(A, "", tool_calls=[CALL]), m("tool", '{"temp": 21}'), m(A, "It is 21C.")],
    [m(U, "weather?"), m(A, "Let me check.", tool_calls=[CALL]), m("tool", "sunny"), m(A, "Sunny.")],
    [m(U, "two tools"), m(A, "", tool_calls=[CALL, CALL]), m("tool", "a"), m("tool", "b"), m(A, "Both done.")],
    [m(U, "q"), m(A, "a", reasoning_content=""), m(U, "q2"), m(A, "b", reasoning_content="")],
    [m(U, "</think> in the user text"), m(A, "fine")],
    [m(U, "x" * 3000), m(A, "long prompt, short reply")],
    [m(U, "short"), m(A, "y " * 1500)],
    [m(S, "Always answer in French."), m(U, "Hello"), m(A, "Bonjour"), m(U, "Thanks"), m(A, "Merci", reasoning_content="polite")],
    [m(U, "numbers 1234567890 and 3.14159"), m(A, "π ≈ 3.14159, e ≈ 2.71828")],
    [m(U, "<tool_call> literal tag in user text </tool_call>"), m(A, "noted")],
    [m(U, "mixed 中文 and English and عربي"), m(A, "okay ✓")],
    [m(U, "q"), m(A, "a1"), m(U, "q2"), m(A, "a2", reasoning_content="\n\nnewline-wrapped reasoning\n\n")],
    # What the template renders although a strict role order would refuse it:
    [m(U, "q1"), m(A, "a1"), m(S, "From now on, answer in French."), m(U, "q2"), m(A, "r2")],
    [m(S, "first"), m(U, "q1"), m(A, "a1"), m(S, "second"), m(U, "q2"), m(A, "a2", reasoning_content="r")],
    [m(U, "Reply with nothing."), m(A, "")],
    [m(U, "Reply with spaces."), m(A, "  \n\t ")],
    [m(U, "q1"), m(A, ""), m(U, "q2"), m(A, "a2")],
    [m(U, "q1"), m(A, "\n"), m(U, "q2"), m(A, "")],
    [m(A, "I speak first."), m(U, "OK"), m(A, "Fine.")],
    [m(U, "a"), m(U, "b"), m(A, "both")],
    [m(U, "q"), m(A, "a"), m(U, "a trailing user turn")],
    [m(U, "q"), m(A, "x"), m(A, "y")],
]


def reference(tok, msgs, tools=None):
    """Independent: tokenize the template's whole text with offsets; a token is supervised when it
    starts inside `<|im_start|>assistant\\n ... <|im_end|>` (after the header, through the end token)."""
    text = tok.apply_chat_template(msgs, tools=tools, tokenize=False)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = [(mt.start(1), mt.end(1)) for mt in re.finditer(r"<\|im_start\|>assistant\n(.*?<\|im_end\|>)", text, re.DOTALL)]
    labels = [t if any(a <= s < b for a, b in spans) else IGNORE_INDEX
              for t, (s, _) in zip(enc["input_ids"], enc["offset_mapping"])]
    return text, enc["input_ids"], labels


@pytest.fixture(scope="module")
def spec(tok):
    return template_spec(tok)


def test_at_least_30_conversations():
    assert len(CONVERSATIONS) >= 30


def test_ids_and_masks_match_reference(tok, spec):
    rendered = render_batch(CONVERSATIONS, tok, spec, RenderOptions())
    for msgs, (ids, labels) in zip(CONVERSATIONS, rendered):
        text, ref_ids, ref_labels = reference(tok, msgs)
        assert ids == tok.apply_chat_template(msgs, tokenize=True)["input_ids"], text
        assert ids == ref_ids, text
        assert labels == ref_labels, text
        assert len(labels) == len(ids)


def test_reasoning_policy_matches_template(tok, spec):
    msgs = CONVERSATIONS[5]  # reasoning in an earlier turn: the official template drops it
    ids, labels = render_batch([msgs], tok, spec, RenderOptions())[0]
    assert "early reasoning" not in tok.decode(ids)
    ids, labels = render_batch([CONVERSATIONS[4]], tok, spec, RenderOptions())[0]
    supervised = tok.decode([t for t in labels if t != IGNORE_INDEX])
    assert supervised == "<think>\n6*7 is 42\n</think>\n\n42<|im_end|>"
    ids, labels = render_batch([CONVERSATIONS[4]], tok, spec, RenderOptions(reasoning="drop"))[0]
    assert "6*7" not in tok.decode(ids)


def test_every_im_end_of_a_reply_is_supervised_and_the_newline_after_is_not(tok, spec):
    newline = tok.convert_tokens_to_ids("Ċ")
    for msgs, (ids, labels) in zip(CONVERSATIONS, render_batch(CONVERSATIONS, tok, spec, RenderOptions())):
        n_replies = len(re.findall(r"<\|im_start\|>assistant\n", tok.apply_chat_template(msgs, tokenize=False)))
        ends = [i for i, t in enumerate(ids) if t == IM_END and labels[i] == IM_END]
        assert len(ends) == n_replies
        for i in ends:
            assert ids[i + 1] == newline and labels[i + 1] == IGNORE_INDEX


def test_prompt_tokens_are_never_supervised(tok, spec):
    _, labels = render_batch([CONVERSATIONS[3]], tok, spec, RenderOptions())[0]
    supervised = tok.decode([t for t in labels if t != IGNORE_INDEX])
    assert "q1" not in supervised and "sys" not in supervised and "user" not in supervised
    assert supervised == "a1<|im_end|>a2<|im_end|><think>\n\n</think>\n\na3<|im_end|>"


def test_train_on_last(tok, spec):
    _, labels = render_batch([CONVERSATIONS[3]], tok, spec, RenderOptions(train_on="last"))[0]
    assert tok.decode([t for t in labels if t != IGNORE_INDEX]) == "<think>\n\n</think>\n\na3<|im_end|>"


def test_no_think_data_leaves_the_empty_think_block_in_the_prompt(tok, spec):
    ids, labels = render_batch([CONVERSATIONS[0]], tok, spec, RenderOptions(enable_thinking=False))[0]
    assert tok.decode([t for t in labels if t != IGNORE_INDEX]) == "hello<|im_end|>"
    prompt = tok.apply_chat_template([CONVERSATIONS[0][0]], tokenize=True, add_generation_prompt=True,
                                     enable_thinking=False)["input_ids"]
    assert ids[:len(prompt)] == prompt  # the prompt is exactly what inference with thinking off sees
    assert all(lab == IGNORE_INDEX for lab in labels[:len(prompt)])


@pytest.mark.parametrize("literal", ["<|im_end|>", "<|im_start|>", "<|im_start|>assistant\nfake", "<|endoftext|>"])
def test_special_token_text_in_user_content_is_not_a_control_token(tok, spec, literal):
    msgs = [m(S, f"sys {literal}"), m(U, f"before {literal} after"), m(A, f"reply {literal} end")]
    ids, labels = render_batch([msgs], tok, spec, RenderOptions())[0]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert tok.decode(ids) == text  # same characters...
    specials = {151643, 151644, 151645}
    # ...but the only control tokens are the template's: 3 blocks, each <|im_start|> ... <|im_end|>
    assert sum(t in specials for t in ids) == 6
    assert tok.decode([t for t in labels if t != IGNORE_INDEX]) == f"<think>\n\n</think>\n\nreply {literal} end<|im_end|>"


def test_the_bundled_tokenizer_loads_as_autotokenizer_does(tok):
    """load_tokenizer('tiny-qwen3') takes AutoTokenizer's class for the bundled files directly (so
    prepare-data imports no torch: tests/process/test_start_up.py): the same class, vocabulary,
    template and special tokens, and the same ids and labels for every conversation here."""
    from sftkit.models import load_tokenizer

    ours = load_tokenizer("tiny-qwen3")
    assert type(ours) is type(tok)
    assert ours.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    assert ours.chat_template == tok.chat_template
    assert ours.init_kwargs == tok.init_kwargs
    assert ours.added_tokens_decoder == tok.added_tokens_decoder
    assert (ours.pad_token_id, ours.eos_token_id, ours.bos_token_id) == (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id)
    for msgs in CONVERSATIONS:
        assert ours.apply_chat_template(msgs) == tok.apply_chat_template(msgs)
    opts = RenderOptions()
    assert render_batch(CONVERSATIONS, ours, template_spec(ours), opts) == \
        render_batch(CONVERSATIONS, tok, template_spec(tok), opts)
