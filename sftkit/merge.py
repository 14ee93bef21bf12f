"""merge-lora: fold a LoRA adapter into its base and save a standalone model users can serve.

Before it reports success it compares the merged model's logits with base + adapter's (both in
float32), and the saved model's, reloaded, with the merged model's in the dtype it is saved in.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sftkit.arch.table import text_config
from sftkit.errors import ConfigError
from sftkit.fit import tensor_headers
from sftkit.io import disk_full, free_bytes

PROBES = ["Hello! What can you do?", "2 + 2 = ?", "Translate to French: good morning", "写一首关于春天的诗"]


@dataclass
class MergeReport:
    adapter: Path
    base: str
    dtype: str            # the merged model's dtype, e.g. "bfloat16"
    untied: bool          # lm_head was saved apart from embed_tokens
    max_logit_diff: float  # the merged model vs base + adapter, both in float32, over PROBES


def _tolerance(dtype, scale: float) -> float:
    """The largest logit difference that is round-off, for logits up to `scale` in size. In float32
    it grows with the logits and the depth, most in MoE models, whose merged expert stacks are
    summed in another order than PEFT's parametrized forward: 5e-5 of the scale, plus 1e-4. In a
    half-precision dtype (the saved model against itself before saving): two steps of the dtype's
    spacing at the logits' size (0.25 for bfloat16 logits of 16-32)."""
    import math

    import torch

    if dtype == torch.float32:
        return 1e-4 + 5e-5 * scale
    return 2 * torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(max(scale, 1.0)))


def merge_adapter(adapter: Path, output_dir: Path, opts) -> MergeReport:
    """Merge, save into `output_dir` (atomically), reload and compare; `opts` is a MergeOptions."""
    from sftkit.checkpoint import ensure_stop_token, model_in
    from sftkit.fit import check_adapter_fits
    from sftkit.io import atomic_directory, check_free_output, check_free_space, check_not_an_input, remove_stale_tmp
    from sftkit.lock import check_unlocked
    from sftkit.models import adapter_base, load_adapter, load_model, load_tokenizer, model_folder

    check_unlocked(Path(output_dir))  # first: a live run's folder is refused for that, whatever else is wrong
    given, adapter = adapter, Path(model_in(str(adapter)))
    if not (adapter / "adapter_config.json").is_file():
        raise ConfigError(f"{adapter} holds no adapter_config.json; --adapter takes a LoRA run's final/ or checkpoint")
    base_name = adapter_base(adapter)
    output_dir = Path(output_dir)
    check_not_an_input(output_dir, [given, adapter, base_name])
    check_free_output(output_dir, opts.overwrite_output_dir)
    check_adapter_fits(adapter, base_name)
    tokenizer_source = str(adapter) if (adapter / "tokenizer_config.json").is_file() else base_name
    check_free_space(output_dir, merged_bytes(adapter, base_name, opts.dtype, tokenizer_source))
    remove_stale_tmp(output_dir.parent)  # what a merge killed mid-write left
    import torch  # the checks above come first: peft's import alone takes seconds
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from sftkit.arch.layout import adapter_on_vision_model, copy_processor_files
    from sftkit.arch.layout import restore as restore_layout

    tokenizer = load_tokenizer(tokenizer_source)
    # an adapter trained on images: merged into the vision-language model it was trained on
    vision = adapter_on_vision_model(adapter)
    folder = model_folder(base_name)  # a Hub id: its snapshot in the cache
    base = load_model(base_name, getattr(torch, opts.dtype) if opts.dtype else "auto", vision=vision)
    if getattr(base.config, "quantization_config", None):
        raise ConfigError(f"{base_name} is quantized; merge into the full-precision base (load it without "
                          "quantization), since merged low-bit weights lose the adapter's update")
    dtype = base.dtype
    # Merged in float32 and cast once: a half-precision merge's logits differ from base + adapter's
    # by the dtype's round-off over every layer (bfloat16 logits near 20 are 0.125 apart), more than
    # a wrong merge may move them; in float32 a wrong merge stands out (twice the memory, briefly).
    model = load_adapter(base, adapter, base_name).float().eval()
    batch = _probe_batch(tokenizer)
    with torch.no_grad():
        expected = model(**batch).logits
        merged = model.merge_and_unload()
        diff = (merged(**batch).logits - expected).abs().max().item()
    tolerance = _tolerance(torch.float32, expected.abs().max().item())
    if diff > tolerance:
        raise ConfigError(f"the merged model's logits differ from base + adapter by {diff:.3g} in float32 "
                          f"(tolerance {tolerance:.3g}); nothing was written to {output_dir}")
    for p in merged.parameters():  # the weights alone, as loading gives them: rotary buffers stay float32
        p.data = p.data.to(dtype)
    with torch.no_grad():
        cast = merged(**batch).logits.float()  # what the saved model must give again
    untied = _untie_if_needed(merged)
    try:
        with atomic_directory(Path(output_dir)) as tmp:  # a failure removes tmp: no half-written folder stays
            merged.save_pretrained(tmp, safe_serialization=True, max_shard_size=opts.max_shard_size)
            restore_layout(tmp, folder)  # a Qwen3.5 base: written as the vision-language model it came as
            copy_processor_files(folder, tmp)
            tokenizer.save_pretrained(tmp)
            gen = merged.generation_config
            ensure_stop_token(gen, tokenizer)
            gen.save_pretrained(tmp)
            reloaded = (AutoModelForImageTextToText if vision else AutoModelForCausalLM).from_pretrained(
                tmp, dtype=dtype).eval()
            with torch.no_grad():
                saved = (reloaded(**batch).logits.float() - cast).abs().max().item()
            tolerance = _tolerance(dtype, cast.abs().max().item())
            if saved > tolerance:
                raise ConfigError(f"the saved model's logits differ from the merged model's by {saved:.3g} "
                                  f"(tolerance {tolerance:.3g}); nothing was written to {output_dir}")
    except Exception as err:  # a full disk is an OSError, safetensors' SafetensorError or a RuntimeError
        if not disk_full(err):
            raise
        raise ConfigError(f"--output_dir {output_dir}: the disk filled while the merged model was written (No space "
                          f"left on device, {free_bytes(output_dir):,} bytes free now); the partial copy was removed "
                          "and nothing was written there: free some space or choose another place") from None
    return MergeReport(adapter, base_name, str(dtype).replace("torch.", ""), untied, diff)


# bytes per element of the dtypes a merged model is saved in, by torch's and safetensors' names
ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8,
                 "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def merged_bytes(adapter: Path, base_name: str, dtype: str | None, tokenizer_source: str) -> int:
    """What merge-lora writes, from the safetensors headers of a local base (no weight is read):
    each tensor's elements x the bytes of the dtype it is saved in (--dtype, else the base's), an
    embedding saved twice where a tied model is untied, their headers, and the tokenizer's and
    config files at their source's sizes, plus 64 KiB for file system blocks. Where the base is no
    local safetensors: half its weight files, or 0 (not checked)."""
    from sftkit.models import min_saved_bytes

    headers = tensor_headers(Path(base_name))
    if not headers:
        return min_saved_bytes(base_name)
    config = _read_json(Path(base_name) / "config.json")
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    saved_as = dtype or text.get("dtype") or text.get("torch_dtype")
    total = 0
    for name, (shape, own) in headers.items():
        elements = 1
        for n in shape:
            elements *= n
        size = ELEMENT_BYTES.get(saved_as if own in ("F32", "BF16", "F16") and saved_as else own, 4)
        total += elements * size
        if text.get("tie_word_embeddings") and name.endswith("embed_tokens.weight") and _trains_embeddings(adapter):
            total += elements * size  # untied: lm_head is written too (_untie_if_needed)
    source = Path(tokenizer_source)
    files = [Path(base_name) / "config.json", Path(base_name) / "generation_config.json",
             *(source / name for name in TOKENIZER_FILES)]
    if not (source / "tokenizer.json").is_file():
        files += [source / "vocab.json", source / "merges.txt"]
    total += sum(f.stat().st_size for f in files if f.is_file())
    return total + sum(_header_size(f) for f in Path(base_name).glob("*.safetensors")) + 64 * 2**10


def _trains_embeddings(adapter: Path) -> bool:
    config = _read_json(adapter / "adapter_config.json")
    names = [config.get("modules_to_save") or [], config.get("target_modules") or []]
    names = [n for group in names for n in ([group] if isinstance(group, str) else group)]  # a regex is a str
    return any("embed_tokens" in n or "lm_head" in n for n in names if isinstance(n, str))


def _read_json(path: Path) -> dict:
    import json

    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _header_size(file: Path) -> int:
    try:
        with open(file, "rb") as f:
            return 8 + int.from_bytes(f.read(8), "little")
    except OSError:
        return 0


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
    text_config(model.config).tie_word_embeddings = False
    return True
