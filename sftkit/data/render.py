"""Render a conversation with the chat template into input_ids and labels. Pure functions.

How the supervised span is found without `{% generation %}` markers: the template's own text is
split at its special tokens (`<|im_start|>`, `<|im_end|>`, ...). A block that opens with the
reply header is an assistant reply. The header is the role name and the separator the template
writes after every role name, read off a rendered user turn: `assistant\\n` in every Qwen template.
In a reply, what the model is NOT trained to produce is what it is given at inference: the header,
and then the text the template's generation prompt adds after the header (its "opening": `<think>\\n`
in Qwen3-Thinking-2507 and Qwen3.5 with thinking on, `<think>\\n\\n</think>\\n\\n` with thinking off,
nothing in Qwen2.5, or in Qwen3 with thinking on), when the block starts with it. Everything after, through the closing
`<|im_end|>`, is supervised (so the model learns to stop); the `\\n` after it is not. A reply whose
reasoning the template drops (an earlier turn) does not start with the opening: only its header is
prompt. The opening is read off the template with the row's own switches (`enable_thinking`, ...).

Template switches (`SWITCHES`) are passed to the template only when set: unset means the
template's own default (Qwen3.5-2B's template thinks only when enable_thinking is passed true).

Special-token injection: before rendering, every special-token string inside user-provided text
is swapped for a private-use character and swapped back inside its text piece, which is then
tokenized with `split_special_tokens=True`. So a user who writes "<|im_end|>" gets the plain
characters, never the control token. Without such text the ids equal
`tokenizer.apply_chat_template(messages, tokenize=True, **switches)` exactly.

The template is rendered by sftkit/data/template.py, which gives `apply_chat_template(...,
tokenize=False)`'s text without its per-call wrapper, most of the render's cost.

A row the template refuses (Qwen3.5: "System message must be at the beginning.") comes back as
`Refused` with the template's message, for prepare-data to report as a bad row.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from sftkit.data.formats import IMAGE, PLAIN, Conversation
from sftkit.data.images import pictures_of
from sftkit.data.options import SWITCHES
from sftkit.data.template import apply

IGNORE_INDEX = -100
"""Label of a token the model is not trained to produce (Hugging Face's convention)."""

_SENTINEL_BASE = 0xF0000  # Unicode plane 15, private use: absent from real text


@dataclass(frozen=True)
class RenderOptions:
    train_on: str = "all"
    reasoning: str = "template"
    enable_thinking: bool | None = None  # the switches: None = not passed (the template's default)
    preserve_thinking: bool | None = None
    reasoning_effort: str | None = None
    # the last reply after the generation prompt of the turns before it, as it is served (multi_turn
    # expand): a template may render an earlier turn otherwise when it is the last one (Qwen3 gives
    # a last reply an empty think block)
    as_served: bool = False

    def switches(self) -> dict[str, Any]:
        """The template switches that are set, as apply_chat_template keyword arguments."""
        return {k: getattr(self, k) for k in SWITCHES if getattr(self, k) is not None}


@dataclass(frozen=True)
class Refused:
    """A row the chat template cannot render: `field` (a switch, or None) and the problem."""

    field: str | None
    problem: str


@dataclass(frozen=True)
class TemplateSpec:
    """What rendering needs to know about a tokenizer's template, read off it once."""

    specials: tuple[str, ...]      # special-token strings, longest first
    special_ids: dict[str, int]
    block_open: str                # "<|im_start|>"
    reply_header: str              # "assistant\n": text after block_open that marks a reply
    block_close: str               # "<|im_end|>"
    reads: frozenset[str]          # the SWITCHES the template's source names
    eos_id: int | None = None      # appended to PLAIN rows (TRL's text and prompt-completion) so they stop
    image_token: str | None = None  # "<|image_pad|>" where the model takes images: each expands to its tokens
    encoder: Any = field(compare=False, repr=False, default=None)  # plain_text_encoder(tokenizer)
    # the generation prompt's text after the header, per set of switches (see reply_opening)
    openings: dict = field(compare=False, repr=False, default_factory=dict)

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


_NOT_CHATML = ("the chat template does not mark turns with special tokens the way sftkit reads them "
               "(ChatML: <|im_start|>role ... <|im_end|>); use the model's own template or a ChatML one")


def template_spec(tokenizer, serialised: str | None = None) -> TemplateSpec:
    """Find the turn markers, the reply header and the switches the template reads, by rendering
    probe conversations (with no switch set). `serialised`: the backend's `to_str()` when the
    caller has it already (prepare hashes it too; 0.2 CPU-s each time for the 11 MB JSON)."""
    from sftkit.errors import ConfigError

    specials = special_tokens(tokenizer)
    if not specials:
        raise ConfigError("the tokenizer has no special tokens; a chat template with special-token turn markers is needed")
    user = [{"role": "user", "content": "PROBE_Q"}]
    base = apply(tokenizer, user)
    with_prompt = apply(tokenizer, user, add_generation_prompt=True)
    opener = next((s for s in specials if with_prompt.startswith(s, len(base))), None)
    closer = reply_close(tokenizer, specials)
    user_at = base.rfind(f"{opener}user")
    if not with_prompt.startswith(base) or opener is None or closer is None or user_at < 0:
        raise ConfigError(_NOT_CHATML)
    # the separator after a role name, as the user turn shows it: "\n" in "<|im_start|>user\nPROBE_Q"
    header = "assistant" + base[user_at + len(opener) + len("user"):base.rfind("PROBE_Q")]
    if not with_prompt.startswith(header, len(base) + len(opener)):
        raise ConfigError(_NOT_CHATML)
    template = tokenizer.get_chat_template()
    return TemplateSpec(
        specials=tuple(specials),
        special_ids={s: tokenizer.convert_tokens_to_ids(s) for s in specials},
        block_open=opener,
        reply_header=header,
        block_close=closer,
        reads=frozenset(s for s in SWITCHES if re.search(rf"\b{s}\b", template)),
        encoder=plain_text_encoder(tokenizer, serialised),
        eos_id=tokenizer.eos_token_id,
    )


def special_tokens(tokenizer) -> list[str]:
    """The tokenizer's special-token strings, longest first."""
    return sorted({t.content for t in tokenizer.added_tokens_decoder.values() if t.special}, key=len, reverse=True)


def reply_close(tokenizer, specials: list[str] | None = None) -> str | None:
    """The special token the chat template ends a reply with (`<|im_end|>` in ChatML, so the one
    generation must stop at), read off a rendered exchange; None where none follows the reply."""
    full = apply(tokenizer, [{"role": "user", "content": "PROBE_Q"}, {"role": "assistant", "content": "PROBE_A"}])
    after = full[full.rfind("PROBE_A") + len("PROBE_A"):]
    return next((s for s in specials or special_tokens(tokenizer) if after.startswith(s)), None)


def template_reads(spec: TemplateSpec) -> str:
    """Which switches the template reads, as an error says it."""
    return f"it reads {', '.join(sorted(spec.reads))}" if spec.reads else f"it reads none of {', '.join(SWITCHES)}"


def reply_opening(tokenizer, spec: TemplateSpec, switches: dict[str, Any]) -> str:
    """The text the generation prompt puts after the reply header under these switches (e.g.
    "<think>\n"): what a reply is given at inference, so prompt, not supervised. Read once per set
    of switches. Raises the template's own error for a switch value it refuses."""
    key = tuple(sorted(switches.items()))
    opening = spec.openings.get(key)
    if opening is None:
        from sftkit.errors import ConfigError

        user = [{"role": "user", "content": "PROBE_Q"}]
        base = apply(tokenizer, user, switches=switches)
        prompt = apply(tokenizer, user, add_generation_prompt=True, switches=switches)
        lead = base + spec.block_open + spec.reply_header
        if not prompt.startswith(lead) or spec.split_re.search(prompt, len(lead)):
            # a special token after the header would be cut into its own piece, where the
            # opening could not be found: refused rather than silently supervised
            raise ConfigError(f"with {switches or 'no switches'}, the chat template's generation prompt "
                              f"{prompt[len(base):]!r} is not {spec.block_open + spec.reply_header!r} "
                              "followed by plain text; sftkit cannot tell its reply apart")
        opening = spec.openings[key] = prompt[len(lead):]
    return opening


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
        if isinstance(m["content"], list):  # text and images: the template renders each image's placeholder
            m["content"] = [{"type": "text", "text": _escape(p["text"], table)} if p["type"] == "text"
                            else {"type": IMAGE} for p in m["content"]]
        else:
            m["content"] = _escape(m["content"], table)
        if m.get("reasoning_content") is not None:
            m["reasoning_content"] = _escape(m["reasoning_content"], table)
        if opts.reasoning == "drop" and m["role"] == "assistant":
            m.pop("reasoning_content", None)
            if "</think>" in m["content"]:
                m["content"] = m["content"].split("</think>")[-1].lstrip("\n")
        out.append(m)
    return out


def render_text(msgs: Conversation, tokenizer, spec: TemplateSpec, opts: RenderOptions, tools=None,
                switches: dict[str, Any] | None = None) -> str:
    """The template's text for a whole conversation, special-token strings in content escaped.
    `switches`: the template variables to pass; by default the run's (opts.switches()). as_served:
    the conversation before the last reply as its generation prompt renders it, then that reply."""
    msgs = prepare_messages(msgs, opts, spec.escapes)
    switches = opts.switches() if switches is None else switches
    text = apply(tokenizer, msgs, tools, switches=switches)
    if not (opts.as_served and len(msgs) > 1 and msgs[-1]["role"] == "assistant"):
        return text
    prompt = apply(tokenizer, msgs[:-1], tools, add_generation_prompt=True, switches=switches)
    header = spec.block_open + spec.reply_header  # special strings in content are escaped: the last one is the reply's
    return prompt[:prompt.rindex(header)] + text[text.rindex(header):]


@dataclass
class _Piece:
    text: str           # a text piece (special-token strings restored) or a special token
    is_special: bool
    supervised_from: int | None  # char offset where supervision starts; None = not supervised
    block: int = -1     # index of the assistant block this piece belongs to, -1 = none


def split_pieces(text: str, spec: TemplateSpec, opening: str = "") -> list[_Piece]:
    """Cut the rendered text at special tokens and mark which parts belong to assistant replies.
    `opening`: the generation prompt's text after the header (reply_opening), prompt when a reply
    starts with it."""
    unescape, restore, header = spec.unescapes, spec.restore_re, spec.reply_header
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
            if after_open and part.startswith(header):
                in_reply, block = True, block + 1
                start = len(header)
                if opening and part.startswith(opening, start):
                    start += len(opening)
            elif in_reply:
                start = 0
            pieces.append(_Piece(restore.sub(lambda m: unescape[m.group()], part), False, start,
                                 block if start is not None else -1))
        after_open = False
    return pieces


def row_pieces(msgs: Conversation, tokenizer, spec: TemplateSpec, opts: RenderOptions, tools,
               row_switches: dict[str, Any] | None) -> list[_Piece] | Refused:
    """One row's pieces under the run's switches with the row's own on top, or Refused: a switch
    the template never reads, or the template's own error (jinja2 raises TypeError from a filter
    given the wrong type, e.g. Qwen3.5's `arguments|items` on a tool call's JSON string)."""
    import jinja2

    switches = opts.switches()
    if row_switches:
        unread = next((k for k in row_switches if k not in spec.reads), None)
        if unread:
            return Refused(unread, f"the chat template never reads {unread}, so this row would render as if it "
                           f"were not set ({template_reads(spec)}); remove it from the row")
        switches = {**switches, **row_switches}
    try:
        text = render_text(msgs, tokenizer, spec, opts, tools, switches)
        opening = reply_opening(tokenizer, spec, switches)
    except (jinja2.TemplateError, TypeError) as err:
        return Refused(None, f"the chat template refuses this row: {err}")
    pieces = split_pieces(text, spec, opening)
    images = len(pictures_of(msgs))
    placed = sum(p.is_special and p.text == spec.image_token for p in pieces) if images else 0
    if placed != images:
        return Refused("images", f"the chat template places {placed} image(s) for the row's {images}; use the "
                       "vision-language model's own template, which places each image")
    return pieces


def plain_pieces(conv: Conversation) -> list[_Piece]:
    """A PLAIN row's pieces, no template: each tokenized as written (special-token strings as plain
    characters, as in any text), the `train` ones supervised, all in block 0."""
    return [_Piece(m["content"], False, 0 if m["train"] else None, 0 if m["train"] else -1)
            for m in conv if m["content"]]


def plain_text_encoder(tokenizer, serialised: str | None = None):
    """The tokenizer's Rust backend set to read special-token strings as plain text (what
    `split_special_tokens=True` does), without padding or truncation. Calling it directly skips
    transformers' conversion of every piece's ids and offsets to Python lists: ~20% of the time.
    A copy (from `serialised`, the backend's `to_str()`), so the caller's tokenizer is not changed."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str() if serialised is None else serialised)
    backend.no_padding()
    backend.no_truncation()
    backend.encode_special_tokens = True
    return backend


def render_batch(convs: list[Conversation], tokenizer, spec: TemplateSpec, opts: RenderOptions,
                 tools: list | None = None, switches: list | None = None) -> list[tuple[list[int], list[int]] | Refused]:
    """Render and tokenize many conversations with ONE tokenizer call (the fast path).

    Returns (input_ids, labels) per conversation, labels IGNORE_INDEX outside replies; or Refused
    for a row the template cannot render. `switches`: per row, the row's own switches or None.
    """
    rendered = render_pieces(convs, tokenizer, spec, opts, tools, switches)
    return rendered.assemble(encode(spec, rendered.texts))


@dataclass
class Rendered:
    """A batch of conversations rendered and cut into pieces, before their text is tokenized."""

    convs: list[Conversation]
    pieces: list[list[_Piece] | Refused]
    texts: list[str]  # each distinct text piece once, what `encode` tokenizes
    spec: TemplateSpec
    train_on: str
    unserved: int = 0  # supervised replies rendered otherwise than as served (unserved_replies)

    def assemble(self, encoded: list) -> list[tuple[list[int], list[int]] | Refused]:
        """(input_ids, labels) per conversation, or its Refused, from the encodings of `texts`."""
        by_text = dict(zip(self.texts, encoded))
        return [p if isinstance(p, Refused) else _ids_and_labels(c, p, self.spec, by_text, self.train_on)
                for c, p in zip(self.convs, self.pieces)]

    def flat(self, encoded: list) -> tuple[list[int], list[int], list[int], dict[int, Refused]]:
        """assemble's ids and labels end to end in two lists (no list a row), each row's length (0
        for a refused one), and the refused rows by index: what int32 columns are built from."""
        by_text = dict(zip(self.texts, encoded))
        ids: list[int] = []
        labels: list[int] = []
        lengths, refused = [], {}
        for i, (c, p) in enumerate(zip(self.convs, self.pieces)):
            before = len(ids)
            if isinstance(p, Refused):
                refused[i] = p
            else:
                _ids_and_labels(c, p, self.spec, by_text, self.train_on, ids, labels)
            lengths.append(len(ids) - before)
        return ids, labels, lengths, refused


def render_pieces(convs: list[Conversation], tokenizer, spec: TemplateSpec, opts: RenderOptions,
                  tools: list | None = None, switches: list | None = None) -> Rendered:
    """The Python half of render_batch: each conversation rendered by the template and cut at its
    special tokens (a PLAIN row as its own pieces), and the distinct texts to tokenize."""
    n = len(convs)
    all_pieces = [plain_pieces(c) if c[0]["role"] == PLAIN else row_pieces(c, tokenizer, spec, opts, t, s)
                  for c, t, s in zip(convs, tools or [None] * n, switches or [None] * n)]
    # Each distinct text once: the "\n" between turns is half of all pieces, and a system prompt
    # shared by every row is common; a tiny piece costs the encoder as much as a sentence.
    texts = list(dict.fromkeys(p.text for pieces in all_pieces if not isinstance(pieces, Refused)
                               for p in pieces if not p.is_special))
    unserved = 0 if opts.reasoning == "drop" else sum(
        unserved_replies(c, p, tokenizer, spec, opts, t, sw)
        for c, p, t, sw in zip(convs, all_pieces, tools or [None] * n, switches or [None] * n)
        if not isinstance(p, Refused) and c[0]["role"] != PLAIN)
    return Rendered(convs, all_pieces, texts, spec, opts.train_on, unserved)


def reasoning_of(msg: dict) -> str:
    """A reply's reasoning in the data: its reasoning_content, or what its content holds in <think>."""
    if msg.get("reasoning_content"):
        return msg["reasoning_content"].strip()
    content = msg.get("content") or ""
    if "</think>" in content:
        return content.split("</think>")[0].split("<think>")[-1].strip()
    return ""


def unserved_replies(conv: Conversation, pieces: list[_Piece], tokenizer, spec: TemplateSpec, opts: RenderOptions,
                     tools, row_switches) -> int:
    """Supervised replies rendered otherwise than as they are served: the reasoning a reply has in
    the data is missing from its turn here, but there when the conversation ends with it (as when it
    is the reply generated). A template that drops the reasoning of turns before the last user
    message does that; one that keeps it (Qwen3.8), or never renders it (Qwen2.5), does not."""
    at = [i for i, m in enumerate(conv) if m["role"] == "assistant"]
    if not at:
        return 0
    prompt_replies = sum(conv[i].get("train") is False for i in at)
    supervised = [len(at) - 1] if opts.train_on == "last" else range(prompt_replies, len(at))
    # a reply with reasoning before the last turn (the last turn is as served): none on most rows
    candidates = {b: why for b in supervised if at[b] != len(conv) - 1 and (why := reasoning_of(conv[at[b]]))}
    if not candidates:
        return 0
    text: dict[int, str] = {}
    for p in pieces:
        if p.block >= 0 and not p.is_special:
            text[p.block] = text.get(p.block, "") + p.text
    if len(text) != len(at):  # turns and replies not one to one: nothing to say
        return 0
    count = 0
    for b, reasoning in candidates.items():
        if reasoning in text[b]:
            continue
        served = row_pieces(conv[:at[b] + 1], tokenizer, spec, opts, tools, row_switches)
        if not isinstance(served, Refused) and reasoning in "".join(
                p.text for p in served if p.block == b and not p.is_special):
            count += 1
    return count


def encode(spec: TemplateSpec, texts: list[str]) -> list:
    """The Rust half: one encode_batch call, which releases the GIL while it runs on its threads."""
    return spec.encoder.encode_batch(texts, add_special_tokens=False) if texts else []


def _ids_and_labels(conv: Conversation, pieces: list[_Piece], spec: TemplateSpec, encoded: dict,
                    train_on: str, ids: list | None = None, labels: list | None = None) -> tuple[list, list]:
    """The row's input_ids and labels, appended to `ids` and `labels` where given (a batch's, end to end)."""
    n_blocks = 1 + max((p.block for p in pieces), default=-1)
    # replies marked train: False (a conversational prompt-completion's prompt) come first
    prompt_replies = sum(m["role"] == "assistant" and m.get("train") is False for m in conv)
    keep = {n_blocks - 1} if train_on == "last" else set(range(prompt_replies, n_blocks))
    ids = [] if ids is None else ids
    labels = [] if labels is None else labels
    pictures = iter(pictures_of(conv))
    for p in pieces:
        trained = p.supervised_from is not None and p.block in keep
        if p.is_special and p.text == spec.image_token:
            # the processor's expansion: one token per merged patch, never supervised
            n = next(pictures).tokens
            ids.extend([spec.special_ids[p.text]] * n)
            labels.extend([IGNORE_INDEX] * n)
            continue
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
    return ids, labels
