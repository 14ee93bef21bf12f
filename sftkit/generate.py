"""Generation for eval: completions for held-out prompts (sharded over ranks), and simple reference
metrics.

The prompt is the conversation up to its last assistant reply, rendered by the chat template with
the generation prompt (and the template switches set for the run, e.g. `enable_thinking`), exactly
as a server would render it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sftkit.data.images import ImageSpec, pictures_of, pixels

THINK = re.compile(r"^\s*<think>.*?</think>\s*", re.DOTALL)


def split_prompt(msgs: list[dict]) -> tuple[list[dict], str]:
    """(messages before the last assistant reply, that reply's text)."""
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    return msgs[:last], msgs[last]["content"]


def sample_pairs(convs: list[list[dict]], n: int) -> list[tuple[list[dict], str]]:
    """The first n (prompt, reference reply) pairs. A conversation whose only reply comes first has
    no prompt to generate from (the template renders it for training, not for generation): skipped."""
    return [pair for pair in map(split_prompt, convs) if pair[0]][:n]


def generate(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, switches: dict,
             do_sample: bool, temperature: float, top_p: float, batch_size: int, device,
             images: Images | None = None) -> list[str]:
    """`switches`: the chat-template switches to pass (DataOptions.template_switches()). `images`:
    the prompts' images (their parts hold Pictures), for a vision-language model."""
    import torch

    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True, **switches)
             for p in prompts]
    if images is not None:  # each image's placeholder expanded to its tokens, as the processor does
        texts = [images.expand(t, pictures_of(p)) for t, p in zip(texts, prompts)]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the right edge of every row
    out: list[str] = []
    try:
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=False)
            if images is not None:
                batch.update(images.inputs(batch["input_ids"], prompts[start:start + batch_size]))
            batch = batch.to(device)
            with torch.no_grad():
                ids = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                     temperature=temperature if do_sample else None,
                                     top_p=top_p if do_sample else None, top_k=None,
                                     pad_token_id=tokenizer.pad_token_id)
            new = ids[:, batch["input_ids"].shape[1]:]
            out += [THINK.sub("", t).strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
    return out


@dataclass
class Images:
    """The images of the prompts generated from: their bytes by sha256, the model's image processor
    and image token."""

    data: dict[str, bytes]
    spec: ImageSpec
    token_id: int

    def expand(self, text: str, pictures: list) -> str:
        """The rendered prompt with each image placeholder repeated to its image's tokens."""
        pieces = text.split(self.spec.token)
        if len(pieces) != len(pictures) + 1:
            raise ValueError(f"the prompt places {len(pieces) - 1} images for its {len(pictures)}")
        return pieces[0] + "".join(self.spec.token * p.tokens + rest for p, rest in zip(pictures, pieces[1:]))

    def inputs(self, ids, prompts: list[list[dict]]) -> dict:
        """pixel_values, image_grid_thw and mm_token_type_ids (which positions are image tokens, for
        the model's M-RoPE) of a batch of prompts."""
        found = [self.data[p.sha256] for prompt in prompts for p in pictures_of(prompt)]
        out = {"mm_token_type_ids": (ids == self.token_id).long()}
        return {**out, **pixels(found, self.spec.processor)} if found else out


def token_f1(pred: str, ref: str) -> float:
    from collections import Counter

    p, r = pred.split(), ref.split()
    common = sum((Counter(p) & Counter(r)).values())
    if not p or not r or not common:
        return float(p == r)
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F1 over whitespace tokens (longest common subsequence)."""
    p, r = pred.split(), ref.split()
    if not p or not r:
        return float(p == r)
    prev = [0] * (len(r) + 1)
    for a in p:
        cur = [0]
        for j, b in enumerate(r):
            cur.append(prev[j] + 1 if a == b else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if not lcs:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def reference_metrics(samples: list[dict]) -> dict:
    n = max(len(samples), 1)
    return {
        "exact_match": sum(s["completion"].strip() == s["reference"].strip() for s in samples) / n,
        "token_f1": sum(token_f1(s["completion"], s["reference"]) for s in samples) / n,
        "rouge_l": sum(rouge_l(s["completion"], s["reference"]) for s in samples) / n,
    }


def shown(prompt: list[dict]) -> list[dict]:
    """A prompt as samples.jsonl records it: an image as {"type": "image", "sha256": ...}."""
    return [{**m, "content": [{"type": "image", "sha256": p["picture"].sha256} if p["type"] == "image" else p
                              for p in m["content"]]} if isinstance(m["content"], list) else m for m in prompt]


def generate_samples(accelerator, model, tokenizer, cfg, gen, image_spec: ImageSpec | None = None) -> list[dict]:
    """Completions for the first gen.num_samples conversations of cfg.data_path, sharded over
    ranks and gathered in order; each with its prompt and its reference reply. `image_spec`: the
    model's image processor, for prompts with images."""
    from accelerate.utils import gather_object

    from sftkit.data.prepare import ImageSink, load_conversations, resolve_sources

    opts = cfg.data_options()
    sink = ImageSink(image_spec) if image_spec is not None else None
    loaded = load_conversations(resolve_sources(cfg.data_path, opts), opts, sink=sink)
    pairs = sample_pairs(loaded.convs, gen.num_samples)
    mine = list(range(accelerator.process_index, len(pairs), accelerator.num_processes))
    images = Images(sink.data, image_spec, tokenizer.convert_tokens_to_ids(image_spec.token)) if sink else None
    completions = generate(model, tokenizer, [pairs[i][0] for i in mine], gen.max_new_tokens,
                           opts.template_switches(), gen.do_sample, gen.temperature, gen.top_p,
                           cfg.per_device_eval_batch_size, accelerator.device, images)
    rows = gather_object([{"index": i, "prompt": shown(pairs[i][0]), "reference": pairs[i][1], "completion": c}
                          for i, c in zip(mine, completions)])
    return sorted(rows, key=lambda r: r["index"])
