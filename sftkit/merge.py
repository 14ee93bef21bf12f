"""merge-lora: fold a LoRA adapter into its base and save a standalone model users can serve.

Before it reports success it reloads the saved model and compares its logits with base + adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sftkit.errors import ConfigError

PROBES = ["Hello! What can you do?", "2 + 2 = ?", "Translate to French: good morning", "写一首关于春天的诗"]


@dataclass
class MergeReport:
    adapter: Path
    base: str
    dtype: str            # the merged model's dtype, e.g. "bfloat16"
    untied: bool          # lm_head was saved apart from embed_tokens
    max_logit_diff: float  # reloaded merged model vs base + adapter, over PROBES


def _tolerance(dtype, scale: float) -> float:
    """The largest logit difference that is round-off, for logits up to `scale` in size. In float32
    it grows with the logits and the depth: a tiny Qwen3 merged within 3.6e-7, but MoE models,
    whose merged expert stacks are summed in another order than PEFT's parametrized forward, within
    5.8e-5 (Qwen3 MoE) and 2.0e-4 (Qwen3.5 MoE) on logits up to 21: 5e-5 of the scale, plus 1e-4."""
    import torch

    return 1e-4 + 5e-5 * scale if dtype == torch.float32 else 5e-2


def merge_adapter(adapter: Path, output_dir: Path, opts) -> MergeReport:
    """Merge, save into `output_dir` (atomically), reload and compare; `opts` is a MergeOptions."""
    from sftkit.checkpoint import ensure_stop_token, model_in
    from sftkit.io import atomic_directory, check_free_output, check_free_space, check_not_an_input, remove_stale_tmp
    from sftkit.lock import check_unlocked
    from sftkit.models import adapter_base, load_model, load_tokenizer, min_saved_bytes

    check_unlocked(Path(output_dir))  # first: a live run's folder is refused for that, whatever else is wrong
    given, adapter = adapter, Path(model_in(str(adapter)))
    if not (adapter / "adapter_config.json").is_file():
        raise ConfigError(f"{adapter} holds no adapter_config.json; --adapter takes a LoRA run's final/ or checkpoint")
    base_name = adapter_base(adapter)
    output_dir = Path(output_dir)
    check_not_an_input(output_dir, [given, adapter, base_name])
    check_free_output(output_dir, opts.overwrite_output_dir)
    check_free_space(output_dir, min_saved_bytes(base_name))
    remove_stale_tmp(output_dir.parent)  # what a merge killed mid-write left
    import torch  # the checks above come first: peft's import alone takes ~8 s here
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sftkit.arch.layout import restore as restore_layout

    tokenizer = load_tokenizer(str(adapter) if (adapter / "tokenizer_config.json").is_file() else base_name)
    base = load_model(base_name, getattr(torch, opts.dtype) if opts.dtype else "auto")
    if getattr(base.config, "quantization_config", None):
        raise ConfigError(f"{base_name} is quantized; merge into the full-precision base (load it without "
                          "quantization), since merged low-bit weights lose the adapter's update")
    dtype = base.dtype
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    batch = _probe_batch(tokenizer)
    with torch.no_grad():
        expected = model(**batch).logits.float()
    merged = model.merge_and_unload()
    untied = _untie_if_needed(merged)
    with atomic_directory(Path(output_dir)) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True, max_shard_size=opts.max_shard_size)
        restore_layout(tmp, base_name)  # a Qwen3.5 base: written as the vision-language model it came as
        tokenizer.save_pretrained(tmp)
        gen = merged.generation_config
        ensure_stop_token(gen, tokenizer)
        gen.save_pretrained(tmp)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).eval()
        with torch.no_grad():
            got = reloaded(**batch).logits.float()
        diff = (got - expected).abs().max().item()
        tolerance = _tolerance(dtype, expected.abs().max().item())
        if diff > tolerance:
            raise ConfigError(f"the merged model's logits differ from base + adapter by {diff:.3g} "
                              f"(tolerance {tolerance:.3g}); nothing was written to {output_dir}")
    return MergeReport(adapter, base_name, str(dtype).replace("torch.", ""), untied, diff)


def _probe_batch(tokenizer):
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in PROBES]
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def _untie_if_needed(model) -> bool:
    """A tied model whose embedding and lm_head were trained apart (modules_to_save) must be saved
    untied; otherwise reloading overwrites lm_head with embed_tokens and the model is garbage."""
    import torch

    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if not getattr(model.config, "tie_word_embeddings", False) or head is None:
        return False
    if emb.weight is head.weight or torch.equal(emb.weight, head.weight):
        return False
    head.weight = torch.nn.Parameter(head.weight.detach().clone())
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False
    return True
