"""Load and build models and tokenizers: the built-in `tiny-qwen3`, a local directory, a Hub id;
the model as it trains (LoRA, checkpointing, compile); an adapter on its base."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

from sftkit.arch.table import arch_of, decoder_layers, linear_attention_layers, text_config
from sftkit.errors import ConfigError, clip, quote

TINY = "tiny-qwen3"
# Small enough to train on 2 CPU cores in seconds, with the REAL 151,936-row vocabulary so the real
# tokenizer works; the embedding is then 9.7M of its ~10M parameters.
TINY_CONFIG = dict(  # noqa: C408 -- keyword form, to comment each value
    vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, tie_word_embeddings=True,
    rope_theta=1000000.0, rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151645, pad_token_id=151643,
    # 0.5, not Qwen's 0.02: at hidden size 64 the default keeps every logit within about +-0.2, and
    # nothing short of retraining the norms can sharpen the output: LoRA cannot memorise even 4 replies.
    initializer_range=0.5,
)
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")  # owner/name: what may name a model on the Hugging Face Hub
TINY_INIT_SEED = 0  # the preset's weights are the same everywhere, so an adapter's base can be rebuilt


def bundled_tokenizer_dir() -> Path:
    """The official Qwen3 tokenizer files shipped inside the package (Apache-2.0, see LICENSE note)."""
    return Path(str(resources.files("sftkit") / "assets" / "qwen3_tokenizer"))


def resolve_model_path(name: str) -> str:
    """`tiny-qwen3` -> a materialised local directory (built once); anything else unchanged."""
    if name != TINY:
        return name
    import hashlib
    import json

    # keyed by the preset's definition: a changed preset never reuses an old build
    key = hashlib.sha256(json.dumps([TINY_CONFIG, TINY_INIT_SEED], sort_keys=True).encode()).hexdigest()[:12]
    from sftkit.io import cache_dir, check_cache_writable, remove_stale_tmp

    path = cache_dir() / "models" / f"{TINY}-{key}"
    if not (path / "model.safetensors").is_file():
        check_cache_writable(path)
        remove_stale_tmp(path.parent)
        _build_tiny(path)
    return str(path)


def _build_tiny(path: Path) -> None:
    import torch
    from transformers import AutoTokenizer, GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    from sftkit.io import atomic_directory

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_INIT_SEED)
        model = Qwen3ForCausalLM(Qwen3Config(**TINY_CONFIG))
    with atomic_directory(path, replace=False) as tmp:  # a cache entry: first complete writer wins
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(bundled_tokenizer_dir()).save_pretrained(tmp)
        GenerationConfig.from_pretrained(bundled_tokenizer_dir()).save_pretrained(tmp)


def check_model_code(name: str, trust_remote_code: bool) -> None:
    """A local model whose model_type transformers does not know needs code shipped with it
    (auto_map) or a newer transformers: one line before anything of it loads, not a traceback."""
    import json

    config = Path(name) / "config.json"
    if trust_remote_code or name == TINY or not config.is_file():
        return
    import transformers
    from transformers import CONFIG_MAPPING

    try:
        values = json.loads(config.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{config}: not readable JSON ({str(err)[:200]})") from None
    kind = values.get("model_type") if isinstance(values, dict) else None
    if kind in CONFIG_MAPPING:
        return
    if "auto_map" in values:
        raise ConfigError(f"{config}: model_type {quote(kind)} comes with its own Python code (auto_map), which sftkit "
                          "does not run unless asked; read that code, then pass --trust_remote_code")
    raise ConfigError(f"{config}: model_type {quote(kind)} is unknown to transformers {transformers.__version__}; "
                      "pass a Qwen3 model, or upgrade transformers")


def check_chat_template(tok, source: str) -> None:
    """Render one plain exchange with the template now, so that a broken or hostile template is
    one line naming its file before any data or model loads. Jinja's sandbox (which transformers
    renders in) has already refused anything that reaches outside it: nothing was executed."""
    import jinja2

    try:
        tok.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
                                tokenize=False)
        return
    except jinja2.TemplateSyntaxError as err:
        what = f"has a syntax error at line {err.lineno} ({err.message})"
    except jinja2.exceptions.SecurityError as err:
        what = f"reaches outside Jinja's sandbox ({err})"
    except TypeError as err:
        if "no loader" not in str(err):
            raise
        what = "uses {% include %} or {% import %}, which a chat template cannot: no other file is loaded"
    except jinja2.TemplateError as err:
        what = f"fails on a plain user/assistant exchange ({type(err).__name__}: {err})"
    raise ConfigError(f"{source}: the chat template {clip(what)}; fix it, or use the model's own template")


def _bundled_tokenizer():
    """The bundled files as AutoTokenizer loads them, through the class it picks for them: their
    tokenizer_config.json names Qwen2Tokenizer, with no config.json and no auto_map. AutoTokenizer's
    own module imports the model configuration code, and with it torch, which prepare-data needs
    nowhere else."""
    from transformers import Qwen2Tokenizer

    return Qwen2Tokenizer.from_pretrained(bundled_tokenizer_dir())


def load_tokenizer(name: str, trust_remote_code: bool = False, chat_template: str | None = None):
    check_model_code(name, trust_remote_code)
    path = bundled_tokenizer_dir() if name == TINY else name
    try:
        if name == TINY:
            tok = _bundled_tokenizer()
        else:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:  # ValueError: e.g. a tokenizer class that needs its own code
        raise ConfigError(f"cannot load a tokenizer from '{name}': {' '.join(str(err).split())[:200]}; "
                          "pass a local model directory or a Hub id (tiny-qwen3 works offline)") from None
    # the file the template came from, for the error that names it
    source = next((str(p) for p in (Path(path) / "chat_template.jinja", Path(path) / "tokenizer_config.json")
                   if p.is_file()), f"'{name}'")
    if chat_template:
        p = Path(chat_template)
        if not p.is_file():
            raise ConfigError(f"chat_template file not found: {p}")
        tok.chat_template, source = p.read_text(), str(p)
    if not getattr(tok, "chat_template", None):
        raise ConfigError(f"'{name}' has no chat template; pass --chat_template FILE")
    check_chat_template(tok, source)
    if tok.pad_token is None:
        raise ConfigError(f"'{name}' has no pad token; sftkit never reuses eos as pad, since that would hide "
                          "the stop token from the loss. Add a pad token to the tokenizer.")
    return tok


def load_image_spec(name: str, tokenizer):
    """The model's image processor as rendering needs it (sftkit.data.images.ImageSpec; the processor
    itself loads when an image needs it), or None for a text model. transformers picks the
    processor's PIL form where torchvision is absent (same token counts)."""
    from sftkit.data.images import image_spec

    return None if name == TINY else image_spec(model_folder(name), tokenizer)  # the preset is a text model


def model_folder(name: str) -> str:
    """A folder on disk holding the model's config and processor files: `name` itself, or a Hub id's
    snapshot in the Hugging Face cache (those small files fetched there where they are missing)."""
    if name == TINY:
        return resolve_model_path(name)
    if Path(name).is_dir() or not HUB_ID.fullmatch(name):
        return name
    from transformers.utils import cached_file

    from sftkit.arch.layout import PROCESSOR_FILES

    try:
        config = cached_file(name, "config.json")
        for file in PROCESSOR_FILES:
            cached_file(name, file, _raise_exceptions_for_missing_entries=False)
    except (OSError, ValueError):  # not a Hub id, or unreachable: read as a folder (none, so a text model)
        return name
    return str(Path(config).parent) if config else name


def min_saved_bytes(name: str) -> int:
    """The least a saved copy of a local model's weights takes: half its safetensors files (float32
    saved as bfloat16 is the largest shrink); 0 where the weights are not local files."""
    p = Path(name)
    return sum(f.stat().st_size for f in p.glob("*.safetensors")) // 2 if p.is_dir() else 0


def check_weights_format(path: str, allow_pickle: bool = False) -> None:
    """Refuse a local model directory that only holds pickle weights (they can run code on load)."""
    p = Path(path)
    if not p.is_dir() or allow_pickle:
        return
    has_safe = any(p.glob("*.safetensors"))
    has_pickle = any(p.glob("*.bin")) or any(p.glob("*.pt"))
    if has_pickle and not has_safe:
        raise ConfigError(f"{p} holds only pickle weights (.bin), which can execute code when loaded; "
                          "convert them to safetensors first")


def load_model(name: str, dtype=None, attn_implementation: str = "sdpa", trust_remote_code: bool = False,
               extra: dict | None = None, vision: bool = False):
    """`extra`: more arguments for from_pretrained (a quantization config and its device map).
    `vision`: the vision-language model (its image-text class, vision tower and all), for data with
    images; otherwise a vision-language checkpoint loads as its text model alone."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    path = resolve_model_path(name)
    check_model_code(path, trust_remote_code)
    check_weights_format(path)
    if attn_implementation == "varlen":
        from sftkit.arch.packed_attention import register

        attn_implementation = register()
    try:
        return (AutoModelForImageTextToText if vision or image_text_only(path) else AutoModelForCausalLM).from_pretrained(
            path, dtype=dtype or torch.float32, attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code, use_safetensors=True if Path(path).is_dir() else None,
            **(extra or {}),
        )
    except (OSError, ValueError) as err:  # ValueError: e.g. custom code refused without trust_remote_code
        raise ConfigError(f"cannot load model '{name}': {' '.join(str(err).split())[:300]}") from None


def image_text_only(path: str) -> bool:
    """Whether a local checkpoint's architecture has no text-only class in transformers (Qwen3-VL:
    only `Qwen3VLForConditionalGeneration`), so that even text data trains it whole; Qwen3.5 has
    one (`Qwen3_5ForCausalLM`, its text model alone)."""
    import json

    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    try:
        kind = json.loads((Path(path) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return False
    return kind in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def build_for_training(cfg, cuda: bool = False, sequence=None, vision: bool = False):
    """The model as it trains: base weights, then LoRA or not, gradient checkpointing, no cache.
    `cuda`: it trains on a GPU, which decides what attn_implementation auto means. `sequence`: the
    process's SequenceGroup under sequence parallelism (its attention then splits heads). `vision`:
    the data has images: the vision-language model, its vision tower trained as cfg.train_vision says."""
    attention = cfg.attention(cuda)
    model = load_model(cfg.model_name_or_path, base_dtype(cfg), attention, cfg.trust_remote_code, quantized(cfg, cuda),
                       vision)
    # a vision tower that text data never reaches (Qwen3-VL loads whole) stays frozen
    freeze_vision(model, cfg.train_vision if vision else "frozen")
    if attention == "varlen":
        from sftkit.arch.packed_attention import check_model

        check_model(model.config)
    if sequence is not None:
        from sftkit.sequence_parallel import check_model as check_split
        from sftkit.sequence_parallel import register as register_split

        check_split(model.config, sequence.size)
        model.set_attn_implementation(register_split(sequence))
    model.config.use_cache = False
    keep_linear_attention_apart(model, cfg.packing)
    if cfg.gradient_checkpointing:
        # Non-reentrant: works with frozen inputs (LoRA) without enable_input_require_grads.
        every = cfg.checkpoint_every_n_layers
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x: selective built in
            model.activation_checkpointing_enable({"use_reentrant": False}, every_n_layers=every)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            for i, layer in enumerate(decoder_layers(model)):  # selective: only every n-th layer recomputes
                layer.gradient_checkpointing = i % every == 0
    if cfg.use_lora:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=lora_dropout(cfg, model.config),
                          use_dora=cfg.use_dora, use_rslora=cfg.use_rslora,
                          target_modules=lora_targets(cfg, model.config),
                          target_parameters=lora_parameters(cfg, model.config) or None,
                          modules_to_save=list(cfg.modules_to_save) + vision_modules_to_save(cfg, vision) or None,
                          task_type="CAUSAL_LM")
        try:
            model = get_peft_model(model, lora)
        except ValueError as err:
            raise ConfigError(lora_error(str(err).splitlines()[0])) from None
        trainable_in_fp32(model)
    if cfg.torch_compile:
        compile_layers(model, cfg.torch_compile_backend)
    return model


def freeze_vision(model, train_vision: str) -> None:
    """The vision tower's parameters frozen, all of them ("frozen"), all but the mergers ("merger"),
    or none ("tower")."""
    from sftkit.arch.vision import VISION_MERGERS, VISION_TOWER

    for name, param in model.named_parameters():
        parts = name.split(".")
        if VISION_TOWER not in parts:
            continue
        merger = any(m in parts for m in VISION_MERGERS)
        param.requires_grad_(train_vision == "tower" or (train_vision == "merger" and merger))


def vision_modules_to_save(cfg, vision: bool) -> list[str]:
    """Under LoRA, what of the vision tower trains in full (PEFT's modules_to_save)."""
    from sftkit.arch.vision import VISION_MERGERS, VISION_TOWER

    if not vision or cfg.train_vision == "frozen":
        return []
    return [f"{VISION_TOWER}.{m}" for m in VISION_MERGERS] if cfg.train_vision == "merger" else [VISION_TOWER]


def compile_layers(model, backend: str) -> None:
    """Layer by layer (regional): one graph serves every layer, so compiling takes seconds, not
    minutes, and state_dict keys, PEFT and DDP see the same modules as without compile."""
    for layer in decoder_layers(model):
        layer.compile(backend=backend, dynamic=True)


def keep_linear_attention_apart(model, packing: bool) -> None:
    """Gated DeltaNet layers get sftkit's forward (flash-linear-attention's kernels on CUDA where
    installed; packed examples kept apart: sftkit/arch/packed_linear_attention.py). With `packing`,
    a model whose config names linear-attention layers but that has no Gated DeltaNet module sftkit
    can drive stops here (they would run their recurrence across examples, silently)."""
    from sftkit.arch.packed_linear_attention import install

    if install(model) or not packing:
        return
    if linear_attention_layers(model.config):
        raise ConfigError(f"packing: {text_config(model.config).model_type} has linear-attention layers that sftkit "
                          "cannot hand the example boundaries to (no Gated DeltaNet layer found), so packed examples "
                          "would share their state; set packing: false")


def lora_targets(cfg, config) -> list[str]:
    """The modules LoRA wraps: the user's list, else the architecture's (sftkit/arch/table.py)."""
    return list(cfg.lora_target_modules) or list(arch_of(config).lora_modules)


def lora_parameters(cfg, config) -> list[str]:
    """The parameters LoRA wraps (PEFT target_parameters): the user's list, else the architecture's
    expert tensors, which only PEFT's ParamWrapper reaches, and it refuses lora_dropout != 0 and
    DoRA: so not when the user set either."""
    if cfg.lora_target_parameters == ["none"]:
        return []
    if cfg.lora_target_parameters or cfg.lora_dropout or cfg.use_dora:
        return list(cfg.lora_target_parameters)
    return list(arch_of(config).lora_expert_parameters)


def lora_dropout(cfg, config) -> float:
    """lora_dropout as set, else 0 where LoRA wraps parameters (PEFT gives them no dropout) and the
    default elsewhere."""
    from sftkit.config import LORA_DROPOUT

    if cfg.lora_dropout is not None:
        return cfg.lora_dropout
    return 0.0 if lora_parameters(cfg, config) else LORA_DROPOUT


def experts_note(cfg, config) -> str | None:
    """One line for the start of a LoRA run on an MoE model: what its default does to the experts."""
    experts = arch_of(config).lora_expert_parameters
    if not (cfg.use_lora and experts and not cfg.lora_target_parameters):
        return None
    if cfg.use_dora:
        return (f"note: DoRA leaves the experts ({', '.join(experts)}) frozen: PEFT has no DoRA for expert "
                "parameters; without --use_dora, LoRA trains them too")
    if cfg.lora_dropout:
        return (f"note: LoRA leaves the experts ({', '.join(experts)}) frozen: PEFT applies no dropout to them and "
                f"lora_dropout is {cfg.lora_dropout}; leave --lora_dropout unset (or 0) to train them too")
    return (f"LoRA adapts the experts too ({', '.join(experts)}; a rank-{cfg.lora_r} pair per expert) with "
            "lora_dropout 0, since PEFT applies no dropout to them; --lora_target_parameters none leaves them frozen")


def lora_error(message: str) -> str:
    """PEFT's refusal as one line that names the fix."""
    if "lora_dropout" in message:  # a ParamWrapper: a target that PEFT reaches as a parameter
        return (f"LoRA: {message} PEFT reaches expert weights as parameters, which take no dropout; pass "
                "--lora_dropout 0, or leave gate_proj/up_proj/down_proj out of --lora_target_modules (PEFT reads "
                "them as the fused routed experts on Qwen3 MoE and Qwen3-Next)")
    if "use_dora" in message:
        return (f"LoRA: {message} PEFT reaches expert weights as parameters, which take no DoRA; drop --use_dora or "
                "--lora_target_parameters")
    return f"LoRA: {message}; check --lora_target_modules and --lora_target_parameters"


def base_dtype(cfg):
    """The dtype the base model loads in. A LoRA run's base is frozen: it takes the compute dtype
    (bf16 with --bf16, fp16 with --fp16, bf16 under --load_in_4bit), which halves its memory (Qwen3-8B:
    16 GB instead of 33); what trains is fp32 (trainable_in_fp32). A full fine-tune keeps fp32
    weights (autocast computes in bf16/fp16), so that AdamW updates fp32 values."""
    import torch

    if not cfg.use_lora:
        return torch.float32
    if cfg.load_in_4bit or cfg.bf16:
        return torch.bfloat16
    return torch.float16 if cfg.fp16 else torch.float32


def quantized(cfg, cuda: bool) -> dict | None:
    """from_pretrained's arguments for --load_in_4bit (QLoRA: nf4, double quantization, bf16
    compute), on this process's device; None without it."""
    if not cfg.load_in_4bit:
        return None
    import torch
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16)
    return {"quantization_config": config, "device_map": {"": torch.cuda.current_device() if cuda else "cpu"}}


def trainable_in_fp32(model) -> None:
    """Parameters that train are fp32 (AdamW's updates of ~1e-7 relative size vanish in bf16's
    8 bits of mantissa); PEFT makes the adapter fp32 but modules_to_save copy the base's dtype."""
    import torch

    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def load_adapter(base_model, adapter: Path, base_name: str):
    """PeftModel of `adapter` on `base_model`; a base of another size (where check_adapter_fits
    could not read it first: a Hub id) is one line naming a tensor and both shapes."""
    from peft import PeftModel

    from sftkit.fit import mismatch_error

    try:
        return PeftModel.from_pretrained(base_model, str(adapter))
    except RuntimeError as err:
        line = mismatch_error(err, adapter, base_name)
        if line is None:
            raise
        raise line from None


def adapter_base(adapter: Path) -> str:
    """The base model an adapter was trained on, from its adapter_config.json."""
    import json

    base = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{adapter}/adapter_config.json names no base model (base_model_name_or_path)")
    return base


def count_parameters(model) -> tuple[int, int]:
    def numel(p):  # ZeRO-3 partitions at load time: ds_numel is the full size
        return getattr(p, "ds_numel", p.numel())

    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(numel(p) for p in model.parameters())
    return trainable, total
