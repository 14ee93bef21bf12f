"""Render a conversation with the chat template into input_ids and labels. Pure functions.

How the supervised span is found without `{% generation %}` markers: the template's own text is
split at its special tokens (`<|im_start|>`, `<|im_end|>`, ...). Every block that opens with
`<|im_start|>assistant\\n` is an assistant reply; its tokens from after that header through the
closing `<|im_end|>` are supervised (so the model learns to stop), the `\\n` after it is not.

Special-token injection: before rendering, every special-token string inside user-provided text
is swapped for a private-use character and swapped back inside its text piece, which is then
tokenized with `split_special_tokens=True`. So a user who writes "<|im_end|>" gets the plain
characters, never the control token. Without such text the ids equal
`tokenizer.apply_chat_template(messages, tokenize=True)` exactly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from sftkit.data.formats import PLAIN, Conversation

IGNORE_INDEX = -100
"""Label of a token the model is not trained to produce (Hugging Face's convention)."""

_SENTINEL_BASE = 0xF0000  # Unicode plane 15, private use: absent from real text


@dataclass(frozen=True)
class RenderOptions:
    train_on: str = "all"
    reasoning: str = "template"
    enable_thinking: bool = True


@dataclass(frozen=True)
class TemplateSpec:
    """What rendering needs to know about a tokenizer's template, read off it once."""

    specials: tuple[str, ...]      # special-token strings, longest first
    special_ids: dict[str, int]
    block_open: str                # "<|im_start|>"
    assistant_prefix: str          # "assistant\n": text after block_open that marks a reply
    block_close: str               # "<|im_end|>"
    no_think_prefix: str           # "<think>\n\n</think>\n\n": prompt part when enable_thinking=False
    eos_id: int | None = None      # appended to PLAIN rows (TRL's text and prompt-completion) so they stop
    encoder: Any = field(compare=False, repr=False, default=None)  # plain_text_encoder(tokenizer)

    # Built once here rather than per conversation (they are on the tokenizing hot path):
    # special string -> private-use sentinel, the inverse, and the two regexes that use them.
    escapes: dict[str, str] = field(init=False, compare=False, repr=False)
    unescapes: dict[str, str] = field(init=False, compare=False, repr=False)
    restore_re: re.Pattern = field(init=False, compare=False, repr=False)
    split_re: re.Pattern = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        escapes = {s: chr(_SENTINEL_BASE + i) for i, s in enumerate(self.specials)}
        set_ = object.__setattr__  # frozen dataclass
        set_(self, "escapes", escapes)
        set_(self, "unescapes", {v: k for k, v in escapes.items()})
        set_(self, "restore_re", re.compile("[" + "".join(escapes.values()) + "]"))
        set_(self, "split_re", re.compile("(" + "|".join(map(re.escape, self.specials)) + ")"))


def template_spec(tokenizer) -> TemplateSpec:
    """Find the assistant header and the closing token by rendering a probe conversation."""
    from sftkit.errors import ConfigError

    specials = sorted({t.content for t in tokenizer.added_tokens_decoder.values() if t.special}, key=len, reverse=True)
    if not specials:
        raise ConfigError("the tokenizer has no special tokens; a chat template with special-token turn markers is needed")
    user = [{"role": "user", "content": "PROBE_Q"}]
    base = tokenizer.apply_chat_template(user, tokenize=False)
    with_prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    no_think = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    header = with_prompt[len(base):]
    opener = next((s for s in specials if header.startswith(s)), None)
    full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": "PROBE_A"}], tokenize=False)
    after = full[full.rfind("PROBE_A") + len("PROBE_A"):]
    closer = next((s for s in specials if after.startswith(s)), None)
    if not with_prompt.startswith(base) or opener is None or closer is None:
        raise ConfigError("the chat template does not mark turns with special tokens the way sftkit reads them "
                          "(ChatML: <|im_start|>role ... <|im_end|>); use the model's own template or a ChatML one")
    return TemplateSpec(
        specials=tuple(specials),
        special_ids={s: tokenizer.convert_tokens_to_ids(s) for s in specials},
        block_open=opener,
        assistant_prefix=header[len(opener):],
        block_close=closer,
        no_think_prefix=no_think[len(with_prompt):] if no_think.startswith(with_prompt) else "",
        encoder=plain_text_encoder(tokenizer),
        eos_id=tokenizer.eos_token_id,
    )


def _escape(text: str, table: dict[str, str]) -> str:
    for special, sentinel in table.items():
        if special in text:
            text = text.replace(special, sentinel)
    return text


def prepare_messages(msgs: Conversation, opts: RenderOptions, table: dict[str, str]) -> list[dict[str, Any]]:
    """Apply the reasoning policy and escape special-token strings in every user-provided text."""
    out = []
    for m in msgs:
        m = dict(m)
        m["content"] = _escape(m["content"], table)
        if m.get("reasoning_content") is not None:
            m["reasoning_content"] = _escape(m["reasoning_content"], table)
        if opts.reasoning == "drop" and m["role"] == "assistant":
            m.pop("reasoning_content", None)
            if "</think>" in m["content"]:
                m["content"] = m["content"].split("</think>")[-1].lstrip("\n")
        out.append(m)
    return out


def render_text(msgs: Conversation, tokenizer, spec: TemplateSpec, opts: RenderOptions, tools=None) -> str:
    """The template's text for a whole conversation, special-token strings in content escaped."""
    return tokenizer.apply_chat_template(
        prepare_messages(msgs, opts, spec.escapes), tools=tools, tokenize=False,
        add_generation_prompt=False, enable_thinking=opts.enable_thinking,
    )


@dataclass
class _Piece:
    text: str           # a text piece (special-token strings restored) or a special token
    is_special: bool
    supervised_from: int | None  # char offset where supervision starts; None = not supervised
    block: int = -1     # index of the assistant block this piece belongs to, -1 = none


def split_pieces(text: str, spec: TemplateSpec, opts: RenderOptions) -> list[_Piece]:
    """Cut the rendered text at special tokens and mark which parts belong to assistant replies."""
    unescape, restore = spec.unescapes, spec.restore_re
    pieces: list[_Piece] = []
    in_reply, block, after_open = False, -1, False
    for part in spec.split_re.split(text):
        if not part:
            continue
        if part in spec.special_ids:
            if part == spec.block_open:
                after_open = True
                pieces.append(_Piece(part, True, None))
                continue
            closes = in_reply and part == spec.block_close
            pieces.append(_Piece(part, True, 0 if closes else None, block if closes else -1))
            if closes:
                in_reply = False
        else:
            start = None
            if after_open and part.startswith(spec.assistant_prefix):
                in_reply, block = True, block + 1
                start = len(spec.assistant_prefix)
                if not opts.enable_thinking and spec.no_think_prefix and part.startswith(spec.no_think_prefix, start):
                    start += len(spec.no_think_prefix)
            elif in_reply:
                start = 0
            pieces.append(_Piece(restore.sub(lambda m: unescape[m.group()], part), False, start,
                                 block if start is not None else -1))
        after_open = False
    return pieces


def plain_pieces(conv: Conversation) -> list[_Piece]:
    """A PLAIN row's pieces, no template: each tokenized as written (special-token strings as plain
    characters, as in any text), the `train` ones supervised, all in block 0."""
    return [_Piece(m["content"], False, 0 if m["train"] else None, 0 if m["train"] else -1)
            for m in conv if m["content"]]


def plain_text_encoder(tokenizer):
    """The tokenizer's Rust backend set to read special-token strings as plain text (what
    `split_special_tokens=True` does), without padding or truncation. Calling it directly skips
    transformers' conversion of every piece's ids and offsets to Python lists: ~20% of the time."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_padding()
    backend.no_truncation()
    backend.encode_special_tokens = True
    return backend


def render_batch(convs: list[Conversation], tokenizer, spec: TemplateSpec, opts: RenderOptions,
                 tools: list | None = None) -> list[tuple[list[int], list[int]]]:
    """Render and tokenize many conversations with ONE tokenizer call (the fast path).

    Returns (input_ids, labels) per conversation; labels are IGNORE_INDEX outside replies.
    """
    tools = tools or [None] * len(convs)
    all_pieces = [plain_pieces(c) if c[0]["role"] == PLAIN else split_pieces(render_text(c, tokenizer, spec, opts, t),
                                                                               spec, opts)
                  for c, t in zip(convs, tools)]
    # Each distinct text once: the "\n" between turns is half of all pieces, and a system prompt
    # shared by every row is common; a tiny piece costs the encoder as much as a sentence.
    texts = list(dict.fromkeys(p.text for pieces in all_pieces for p in pieces if not p.is_special))
    encoded = dict(zip(texts, spec.encoder.encode_batch(texts, add_special_tokens=False))) if texts else {}
    out = []
    for conv, pieces in zip(convs, all_pieces):
        n_blocks = 1 + max((p.block for p in pieces), default=-1)
        # replies marked train: False (a conversational prompt-completion's prompt) come first
        prompt_replies = sum(m["role"] == "assistant" and m.get("train") is False for m in conv)
        keep = {n_blocks - 1} if opts.train_on == "last" else set(range(prompt_replies, n_blocks))
        ids: list[int] = []
        labels: list[int] = []
        for p in pieces:
            trained = p.supervised_from is not None and p.block in keep
            if p.is_special:
                ids.append(spec.special_ids[p.text])
                labels.append(ids[-1] if trained else IGNORE_INDEX)
                continue
            enc = encoded[p.text]
            piece_ids = enc.ids
            ids.extend(piece_ids)
            if trained and p.supervised_from == 0:
                labels.extend(piece_ids)
            elif trained:
                # The first supervised token is the first that starts at or after the reply's start;
                # one that starts before it (e.g. "\n\n" across the header) belongs to the prompt.
                first = enc.char_to_token(p.supervised_from)
                if first is None:  # the reply starts at the piece's end: nothing of it is here
                    first = len(piece_ids)
                elif enc.token_to_chars(first)[0] < p.supervised_from:
                    first += 1
                labels.extend([IGNORE_INDEX] * first)
                labels.extend(piece_ids[first:])
            else:
                labels.extend([IGNORE_INDEX] * len(piece_ids))
        if conv[0]["role"] == PLAIN and spec.eos_id is not None:
            ids.append(spec.eos_id)  # TRL appends it too: the model learns where a text or completion ends
            labels.append(spec.eos_id)
        out.append((ids, labels))
    return out
