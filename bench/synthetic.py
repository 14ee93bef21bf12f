"""Synthetic training data for the benchmarks: every row generator, and the JSON Lines writers.

A generator takes a `random.Random` and returns one row; `rows(make, n, seed)` gives n of them and
`write(path, rows)` saves them, one JSON object a line, so the same seed gives the same bytes:
    write(path, rows(CONVERSATIONS["alpaca"], 2000, seed=0))

Conversations (OpenAI `messages`) of varied text, from `text`: English words, ~8% CJK, ~4% emoji,
punctuation and paragraphs:
  multi-turn  1-4 turns, a system message in ~30%, reasoning_content in ~35% of replies
  alpaca      Alpaca-style: 56% single turn, no reasoning, replies of 10-800 tokens (log-uniform)
  messages    issue 24's shape: 1-4 turns with P .55/.25/.12/.08, a system message in 10%, user ~60
              and assistant ~180 tokens, lognormal
  plain       1-4 turns, a system message in ~10%, no reasoning
  long        1-4 turns, a system message in 10%, user ~70 and replies ~200 tokens (lognormal, at most
              ~800), reasoning_content in 30% of replies: ~740 tokens a row
Rows of plain ASCII words, for memory measurements: `alpaca_row` (Alpaca fields), `few_words_alpaca`
and `few_words_messages` (ten words), `long_reply` (a long assistant turn), `long_prompt` (a long
user turn).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

_COMMON = ("the a of to and in is it that for on with as was at by this be from or have an they which you one data "
           "model train loss token batch layer weight gradient learning rate step value function return python code "
           "error file system memory process thread network server client request response query answer question "
           "explain example simple because however therefore result number list table string river mountain city "
           "music history science language people world time year good small large new old first last long great "
           "little right big high different important")
WORDS = _COMMON.split()
"""94 common English words (those of a model's training text)."""
CJK = ("你好", "世界", "模型", "训练", "数据", "学习", "问题", "答案", "こんにちは", "ありがとう", "東京", "日本語",
       "안녕하세요", "감사합니다", "机器学习", "深度神经网络")
EMOJI = ("🙂", "🚀", "🔥", "✅", "🤖", "📈", "🎉", "👍🏽", "❤️", "🇯🇵")
_NOUNS = ("time person year way day thing man world life hand part child eye woman place work week case point "
          "government company number group problem fact water money story month lot right study book job word "
          "business issue side kind head house service friend father power hour game line end member law car "
          "city community name president team minute idea kid body information back parent face others level")
NOUNS = _NOUNS.split()
"""67 common nouns: about 1.2 tokens a word."""
FEW_WORDS = ("alpha", "beta", "gamma", "delta", "tokens", "model", "reply", "a", "of", "the")


# ---- conversations of varied text --------------------------------------------------------------
def text(rng: random.Random, lo: int, hi: int) -> str:
    """lo..hi words: mostly English, ~8% CJK, ~4% emoji, with sentence punctuation and paragraphs."""
    out, start = [], True
    for _ in range(rng.randint(lo, hi)):
        r = rng.random()
        w = rng.choice(CJK) if r < 0.08 else rng.choice(EMOJI) if r < 0.12 else rng.choice(WORDS)
        out.append(w.capitalize() if start else w)
        start = rng.random() < 0.1
        if start:
            out[-1] += rng.choice((".", ".", "?", "!", ".\n\n"))
    return " ".join(out).replace("\n ", "\n")


def multi_turn(rng: random.Random) -> dict:
    """1-4 user/assistant turns, a system message in ~30%, reasoning_content in ~35% of replies."""
    msgs = [{"role": "system", "content": text(rng, 5, 40)}] if rng.random() < 0.3 else []
    for _ in range(rng.randint(1, 4)):
        msgs.append({"role": "user", "content": text(rng, 3, 60)})
        reply = {"role": "assistant", "content": text(rng, 5, 200)}
        if rng.random() < 0.35:
            reply["reasoning_content"] = text(rng, 10, 120)
        msgs.append(reply)
    return {"messages": msgs}


def alpaca(rng: random.Random) -> dict:
    """Alpaca-style: 56% one turn, else 2-3; a system message in ~10%; no reasoning. A reply is
    8-600 words, log-uniform: 8-818 tokens, median 92, mean 180 (measured on the first 3,000 rows)."""
    msgs = [{"role": "system", "content": text(rng, 5, 30)}] if rng.random() < 0.1 else []
    for _ in range(1 if rng.random() < 0.56 else rng.randint(2, 3)):
        msgs.append({"role": "user", "content": text(rng, 3, 60)})
        words = round(math.exp(rng.uniform(math.log(8), math.log(600))))
        msgs.append({"role": "assistant", "content": text(rng, words, words)})
    return {"messages": msgs}


def lognormal_count(rng: random.Random, mean: float, sigma: float = 0.6) -> int:
    """A lognormal word count with this mean (at least 1)."""
    return max(1, round(rng.lognormvariate(math.log(mean) - sigma * sigma / 2, sigma)))


def messages(rng: random.Random) -> dict:
    """Issue 24's hidden set, regenerated with our own seed: 1-4 turns with P .55/.25/.12/.08, a system
    message in 10%, user ~60 and assistant ~180 tokens, lognormal (sigma 0.6). `text` gives ~1.36
    tokens a word (the alpaca set's 8-600 words -> 8-818 tokens), so 44 and 132 words on average."""
    msgs = [{"role": "system", "content": text(rng, 5, 30)}] if rng.random() < 0.1 else []
    for _ in range(rng.choices((1, 2, 3, 4), weights=(0.55, 0.25, 0.12, 0.08))[0]):
        n = lognormal_count(rng, 44)
        msgs.append({"role": "user", "content": text(rng, n, n)})
        n = lognormal_count(rng, 132)
        msgs.append({"role": "assistant", "content": text(rng, n, n)})
    return {"messages": msgs}


def plain(rng: random.Random) -> dict:
    """1-4 user/assistant turns, a system message in ~10%, no reasoning."""
    msgs = [{"role": "system", "content": text(rng, 5, 30)}] if rng.random() < 0.1 else []
    for _ in range(rng.randint(1, 4)):
        msgs.append({"role": "user", "content": text(rng, 3, 60)})
        msgs.append({"role": "assistant", "content": text(rng, 5, 200)})
    return {"messages": msgs}


def long(rng: random.Random) -> dict:
    """Long multi-turn conversations: 1-4 turns, a system message in 10%, user ~50 words and replies
    ~150 words (lognormal; at most 590 words, ~800 tokens), reasoning_content (~60 words) in 30% of
    replies: ~740 tokens a row with Qwen3's tokenizer."""
    msgs = [{"role": "system", "content": text(rng, 10, 60)}] if rng.random() < 0.1 else []
    for _ in range(rng.randint(1, 4)):
        n = lognormal_count(rng, 50)
        msgs.append({"role": "user", "content": text(rng, n, n)})
        n = min(590, lognormal_count(rng, 150))
        reply = {"role": "assistant", "content": text(rng, n, n)}
        if rng.random() < 0.3:
            n = lognormal_count(rng, 60)
            reply["reasoning_content"] = text(rng, n, n)
        msgs.append(reply)
    return {"messages": msgs}


CONVERSATIONS = {"multi-turn": multi_turn, "alpaca": alpaca, "messages": messages, "plain": plain, "long": long}


# ---- rows of plain words -----------------------------------------------------------------------
def _pick(rng: random.Random, words, n: int) -> str:
    return " ".join(rng.choice(words) for _ in range(n))


def alpaca_row(rng: random.Random) -> dict:
    """An Alpaca row (instruction, input, output): instruction 8-60 and output 20-200 common words."""
    return {"instruction": " ".join(rng.choices(WORDS[:66], k=rng.randint(8, 60))), "input": "",
            "output": " ".join(rng.choices(WORDS[:66], k=rng.randint(20, 200)))}


def few_words_alpaca(rng: random.Random) -> dict:
    """An Alpaca row of FEW_WORDS: instruction 5-60 words, output 8-600."""
    return {"instruction": _pick(rng, FEW_WORDS, rng.randint(5, 60)), "input": "",
            "output": _pick(rng, FEW_WORDS, rng.randint(8, 600))}


def few_words_messages(rng: random.Random) -> dict:
    """One user/assistant turn of FEW_WORDS: 5-60 words, then 8-600."""
    return {"messages": [{"role": "user", "content": _pick(rng, FEW_WORDS, rng.randint(5, 60))},
                         {"role": "assistant", "content": _pick(rng, FEW_WORDS, rng.randint(8, 600))}]}


def long_reply(rng: random.Random, words: int = 800) -> dict:
    """A short question and a reply of `words` nouns (the first 52): 800 are ~1,000 tokens."""
    reply = _pick(rng, NOUNS[:52], words)
    return {"messages": [{"role": "user", "content": "Say many words."}, {"role": "assistant", "content": reply}]}


def long_prompt(rng: random.Random, tokens: int) -> dict:
    """A user turn of about 0.9 x `tokens` tokens (1.2 tokens a noun) and a short reply."""
    user = _pick(rng, NOUNS, int(tokens * 0.9 / 1.2))
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": "A short reply."}]}


# ---- writing -----------------------------------------------------------------------------------
def rows(make: Callable[[random.Random], dict], n: int, seed: int = 0) -> Iterator[dict]:
    """n rows of `make`, from one random.Random(seed)."""
    rng = random.Random(seed)
    return (make(rng) for _ in range(n))


def write(path: Path, rows: Iterable[dict]) -> Path:
    """The rows as JSON Lines (UTF-8, non-ASCII kept as is)."""
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def write_mb(path: Path, mb: float, make: Callable[[random.Random], dict], seed: int = 0) -> Path:
    """Rows of `make` until the file holds `mb` million bytes (the last row crosses it)."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        while f.tell() < mb * 1_000_000:
            f.write(json.dumps(make(rng), ensure_ascii=False) + "\n")
    return path


def head(data: Path, out: Path, n: int = 8) -> Path:
    """The first n rows of a JSON Lines file, copied to `out` (a warm-up run's data)."""
    with data.open(encoding="utf-8") as f:
        out.write_text("".join(next(f) for _ in range(n)), encoding="utf-8")
    return out
