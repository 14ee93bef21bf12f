"""The memory and time model of one training process, from a model config alone (no weights, no
torch): what `sftkit plan` prints for every strategy, and what `train` checks before the model loads.

Peak memory of one process is the largest of three moments:
  load   the weights being built, while the safetensors file they are read from is mapped (a CPU
         process counts those pages in its resident memory until the load ends);
  step   weights, AdamW moments and gradients as the backend shards them, plus the activations
         autograd keeps for the backward, plus the loss head's chunk at the end of the forward;
  save   final/ and each checkpoint: safetensors serialises a model's tensors into one buffer.
Each is a sum of named parts (`Estimate.parts`), so a prediction says what it is made of.
Per-token activation counts are the tensors a decoder layer keeps for its backward, counted per
layer type from the config (attention, Gated DeltaNet, dense MLP, routed experts), times
`ACTIVATION_FACTOR`, measured on this code (bench/plan_check.py, bench/RESULTS.md "The planner").
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

from sftkit.arch.flops import attention, delta_net, flops_per_step_fn, head_dim, is_moe_layer, peak_flops
from sftkit.arch.table import arch_of, linear_attention_layers
from sftkit.config import loss_chunk_rows

GiB = 2**30
FAMILY_FILE = "family_configs.json"  # in sftkit/assets: the published configs of every family size

# A CPU process's resident memory is what glibc's allocator holds, not what tensors are alive: chunks
# under its 32 MB mmap threshold go back to the heap when freed, and a later tensor of another size
# (the next micro-batch's, the next layer's) often cannot reuse them. Measured on this code
# (bench/plan_check.py, bench/RESULTS.md "The planner"): the activations' resident share is
# ACTIVATION_FACTOR of the counted bytes; a step of several micro-batches holds CPU_ACCUMULATED
# times one micro-batch's; with gradient checkpointing the heap keeps CPU_CHECKPOINT_KEPT of what
# the layers would keep without it (full fine-tuning; LoRA). A GPU's caching allocator reuses its
# blocks: there the counted bytes stand (an assumption until a GPU run measures them).
ACTIVATION_FACTOR = {"cpu": 1.15, "cuda": 1.0}
CPU_ACCUMULATED = 1.6
CPU_CHECKPOINT_KEPT = {"full": 0.3, "lora": 0.6}
# QLoRA on a CPU (bitsandbytes' CPU backend): its 4-bit matmuls cast each input to bf16 and back,
# which keeps this multiple of LoRA's activations (measured once: h768, 2 x 1024 tokens)
CPU_QLORA_ACTIVATIONS = 1.35
# Resident memory of a CPU training process before its model loads: the Python, torch,
# transformers, accelerate and datasets imports, the tokenizer and the prepared set (`train`
# measures its own instead); peft's import for LoRA; and what the first steps add whatever the
# model (kernels' code and scratch, thread pools).
FRAMEWORK_BYTES = 0.46 * GiB
LORA_IMPORT_BYTES = 0.05 * GiB
RUNTIME_BYTES = 0.1 * GiB
CUDA_CONTEXT_BYTES = 1.0 * GiB  # the CUDA context and kernels of a GPU process, which no allocator counter sees
QLORA_BYTES = 0.52  # a 4-bit weight with its double-quantised scales, bytes per parameter
FILE_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# A GPU is never filled to the last byte: the caching allocator's fragmentation (5%).
USABLE_FRACTION = 0.95

# GPU kinds: memory in GB (10^9, as sold), and the MFU sftkit reaches there. Measured where a GPU
# ran sftkit's own step (bench/RESULTS.md names the run); elsewhere the H100's figure, marked assumed.
GPUS = {  # name: (memory GB, measured MFU or None)
    "H100": (80, 0.165), "H200": (141, None), "B200": (180, None), "A100": (80, None), "A100-40": (40, None),
    "L40S": (48, None), "A10": (24, None), "L4": (24, None), "RTX4090": (24, None), "RTX3090": (24, None),
}
ASSUMED_MFU = 0.165  # the H100's measured figure (Qwen3-1.7B, full fine-tuning, packed; 2026-11-27)
CPU_TFLOPS = 0.05  # what one training process sustains on this CPU (tiny Qwen3 runs, 2 cores)
PCIE_BYTES_PER_S = 25e9  # offload: gradients and weights cross PCIe each step (assumed)
CPU_ADAM_PARAMS_PER_S = 4e9  # offload: DeepSpeed's CPU AdamW (assumed)
LINK_BYTES_PER_S = 150e9  # ZeRO-3 / FSDP2 gathers and reduce-scatters over NVLink (assumed)
OVERLAP = 0.7  # the share of that traffic hidden behind compute (assumed)
QLORA_SLOWDOWN = 0.75  # dequantising 4-bit weights on every matmul (assumed)


# ---- the model's shape ---------------------------------------------------------------------------
def config_namespace(values: dict) -> SimpleNamespace:
    """A config.json's values (its text model's, for a vision-language one) as attributes, with
    transformers' defaults for the fields the model reads (layer_types from full_attention_interval)."""
    if isinstance(values.get("text_config"), dict):
        values = {**values["text_config"], "model_type": values["text_config"].get("model_type", values.get("model_type"))}
    v = dict(values)
    if "num_local_experts" in v:  # transformers 5 saves num_experts under this name
        v.setdefault("num_experts", v["num_local_experts"])
    v.setdefault("head_dim", v["hidden_size"] // v["num_attention_heads"])
    v.setdefault("num_key_value_heads", v["num_attention_heads"])
    if "layer_types" not in v and v.get("full_attention_interval") and "linear_num_value_heads" in v:
        every = v["full_attention_interval"]
        v["layer_types"] = ["full_attention" if (i + 1) % every == 0 else "linear_attention"
                            for i in range(v["num_hidden_layers"])]
    v.setdefault("tie_word_embeddings", False)
    return SimpleNamespace(**v)


def family_table() -> dict[str, dict]:
    """The built-in configs: Hub id -> the text model's config values."""
    from importlib import resources

    return json.loads((resources.files("sftkit") / "assets" / FAMILY_FILE).read_text())


def read_config(name: str) -> SimpleNamespace | None:
    """A model's config without loading it: a local folder's config.json, the tiny preset, or the
    built-in table (by Hub id, case-insensitive, with or without `Qwen/`). None where none is known."""
    from sftkit.models import TINY, TINY_CONFIG

    if name == TINY:
        return config_namespace({"model_type": "qwen3", **TINY_CONFIG})
    path = Path(name).expanduser()
    if (path / "config.json").is_file():
        return config_namespace(json.loads((path / "config.json").read_text()))
    if path.suffix == ".json" and path.is_file():
        return config_namespace(json.loads(path.read_text()))
    table = {k.lower(): v for k, v in family_table().items()}
    key = name.lower()
    found = table.get(key) or table.get(f"qwen/{key}")
    return config_namespace(found) if found else None


@dataclass(frozen=True)
class Params:
    total: int
    embedding: int
    lm_head: int      # 0 when tied to the embedding
    layer_linear: int  # nn.Linear and expert weights inside the decoder layers (what 4-bit quantises)


def count_params(c) -> Params:
    """Parameters as transformers builds the text model (Qwen3*ForCausalLM)."""
    h, linear = c.hidden_size, set(linear_attention_layers(c))
    gated = arch_of(c).gated_attention
    layer_linear = other = 0
    for i in range(c.num_hidden_layers):
        if i in linear:
            w, _ = delta_net(c)
            conv = c.linear_conv_kernel_dim * (2 * c.linear_num_key_heads * c.linear_key_head_dim
                                               + c.linear_num_value_heads * c.linear_value_head_dim)
            layer_linear += w - conv
            other += conv + 2 * c.linear_num_value_heads + c.linear_value_head_dim  # conv, A_log, dt_bias, norm
        else:
            layer_linear += attention(c, gated)
            other += 2 * head_dim(c)  # q_norm, k_norm
        if is_moe_layer(c, i):
            shared = getattr(c, "shared_expert_intermediate_size", 0) or 0
            layer_linear += h * c.num_experts + c.num_experts * 3 * h * c.moe_intermediate_size
            layer_linear += 3 * h * shared + (h if shared else 0)
        else:
            layer_linear += 3 * h * c.intermediate_size
        other += 2 * h  # the two RMSNorms
    embedding = c.vocab_size * h
    head = 0 if c.tie_word_embeddings else c.vocab_size * h
    return Params(embedding + head + layer_linear + other + h, embedding, head, layer_linear)


def linear_shapes(c) -> dict[str, tuple[int, int, int]]:
    """LoRA target name -> (in, out, how many modules), for the nn.Linear layers LoRA can wrap."""
    h, hd, layers = c.hidden_size, head_dim(c), c.num_hidden_layers
    lin = len(linear_attention_layers(c))
    full = layers - lin
    q = c.num_attention_heads * hd
    kv = c.num_key_value_heads * hd
    dense = sum(1 for i in range(layers) if not is_moe_layer(c, i))
    shapes = {"q_proj": (h, q * (2 if arch_of(c).gated_attention else 1), full), "k_proj": (h, kv, full),
              "v_proj": (h, kv, full), "o_proj": (q, h, full)}
    if dense:
        shapes.update(gate_proj=(h, c.intermediate_size, dense), up_proj=(h, c.intermediate_size, dense),
                      down_proj=(c.intermediate_size, h, dense))
    shared = getattr(c, "shared_expert_intermediate_size", 0) or 0
    if shared:
        moe = layers - dense
        shapes.update({"shared_expert.gate_proj": (h, shared, moe), "shared_expert.up_proj": (h, shared, moe),
                       "shared_expert.down_proj": (shared, h, moe)})
    if lin:
        k = c.linear_num_key_heads * c.linear_key_head_dim
        v = c.linear_num_value_heads * c.linear_value_head_dim
        shapes.update(in_proj_qkvz=(h, 2 * k + 2 * v, lin), in_proj_qkv=(h, 2 * k + v, lin), in_proj_z=(h, v, lin),
                      in_proj_ba=(h, 2 * c.linear_num_value_heads, lin), out_proj=(v, h, lin))
    return shapes


def lora_params(c, r: int, modules: list[str], parameters: list[str]) -> int:
    """Trainable parameters of LoRA rank r on these target modules and expert parameters."""
    shapes, total = linear_shapes(c), 0
    for name in dict.fromkeys(modules):
        key = next((k for k in shapes if k == name or name.endswith("." + k) or k.endswith("." + name)), None)
        if key:
            i, o, n = shapes[key]
            total += r * (i + o) * n
    moe_layers = sum(1 for i in range(c.num_hidden_layers) if is_moe_layer(c, i))
    for name in parameters:  # PEFT's ParamWrapper: rank r per expert on a [experts, out, in] tensor
        if name.endswith("gate_up_proj"):
            total += r * c.num_experts * (c.hidden_size + 2 * c.moe_intermediate_size) * moe_layers
        elif name.endswith("experts.down_proj"):
            total += r * c.num_experts * (c.moe_intermediate_size + c.hidden_size) * moe_layers
        elif "shared_expert" in name:
            total += r * (c.hidden_size + c.shared_expert_intermediate_size) * moe_layers
    return total


def activation_elements(c, i: int) -> int:
    """Elements per token that decoder layer i keeps for its backward: each RMSNorm its input, its
    normalised value and its output; every projection's output; what attention, the recurrence and
    the MLP's activation keep (counted on transformers' Qwen3 / Qwen3.5 / MoE modules)."""
    h = c.hidden_size
    norm = 3 * h  # the layer's input, x / rms(x) and the weighted output
    if i in set(linear_attention_layers(c)):
        heads, dk, dv = c.linear_num_value_heads, c.linear_key_head_dim, c.linear_value_head_dim
        k = c.linear_num_key_heads * dk
        v, kv = heads * dv, heads * dk  # q and k repeated to the value heads
        # projections, the causal conv's input, output and SiLU, fp32 copies and l2-normalised q and k,
        # beta-scaled k and v, 64-token chunks' in-chunk attention, the state per chunk, the gated
        # norm and out_proj's input
        mixer = norm + (2 * k + v) + v + 2 * heads + 3 * (2 * k + v) + 5 * kv + 8 * v + 5 * 64 * heads \
            + heads * dk * dv // 64 + 3 * v
    else:
        q, kv = c.num_attention_heads * head_dim(c), c.num_key_value_heads * head_dim(c)
        # q, k, v; q_norm and k_norm (x / rms and output); the rotated q and k; the attention output
        # and o_proj's contiguous input; a gated head (Qwen3-Next, Qwen3.5) adds its gate and product
        mixer = norm + 6 * q + 5 * kv + (3 * q if arch_of(c).gated_attention else 0)
    if is_moe_layer(c, i):
        shared = getattr(c, "shared_expert_intermediate_size", 0) or 0
        # the router's logits and softmax; for each of top-k experts the token's copy, gate/up, SiLU,
        # product, output and weighted output; the shared expert as a dense MLP
        mlp = norm + 2 * c.num_experts + c.num_experts_per_tok * (3 * h + 4 * c.moe_intermediate_size) \
            + (4 * shared + 2 * h if shared else 0)
    else:
        mlp = norm + 4 * c.intermediate_size  # gate, up, SiLU(gate), the product down_proj takes
    return mixer + mlp


# ---- a run ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Strategy:
    """How one run is set up: what `sftkit train` and its launcher are told."""

    method: str = "full"          # full, lora, qlora
    backend: str = "single"       # single, ddp, zero1, zero2, zero3, fsdp2
    offload: bool = False         # ZeRO / FSDP2 with the optimizer (and ZeRO-3's weights) on the CPU
    checkpointing: bool = False
    every_n_layers: int = 1
    micro_batch: int = 4
    accumulation: int = 1
    sequence_parallel: int = 1

    @property
    def sharded(self) -> bool:
        return self.backend in ("zero3", "fsdp2")

    def label(self) -> str:
        parts = [self.method, self.backend + ("+offload" if self.offload else "")]
        if self.checkpointing:
            parts.append("ckpt" if self.every_n_layers == 1 else f"ckpt/{self.every_n_layers}")
        if self.sequence_parallel > 1:
            parts.append(f"sp{self.sequence_parallel}")
        return " ".join(parts)


@dataclass(frozen=True)
class Workload:
    """The data side of a run: rows of the longest micro-batch, and the dataset's size."""

    max_length: int = 2048
    longest: int = 0          # the longest example (0: unknown, max_length)
    packing: bool = False
    tokens: int = 0           # the whole prepared set, one epoch (0: unknown)
    supervised_tokens: int = 0
    epochs: float = 1.0

    @property
    def supervised_fraction(self) -> float:
        """Of a micro-batch's tokens: the prepared set's share, 1 when unknown."""
        return self.supervised_tokens / self.tokens if self.tokens and self.supervised_tokens else 1.0

    @property
    def row_length(self) -> int:
        """Tokens in a row of the largest micro-batch: a packed row is full, a padded one the longest example."""
        return self.max_length if self.packing else min(self.max_length, self.longest or self.max_length)


@dataclass(frozen=True)
class Device:
    kind: str                  # "cpu", or a GPU name of GPUS, or "GPU" for one known only by memory
    count: int = 1             # processes on this machine (one per GPU)
    memory: float = 0.0        # bytes of one device (of the machine, for a CPU)
    peak_tflops: float | None = None
    mfu: float | None = None
    mfu_measured: bool = False

    @property
    def cuda(self) -> bool:
        return self.kind != "cpu"

    @property
    def usable(self) -> float:
        """What one process may hold: a GPU's memory less the context; a CPU's, shared by its processes."""
        if self.cuda:
            return self.memory * USABLE_FRACTION - CUDA_CONTEXT_BYTES
        return self.memory / self.count


@dataclass
class Estimate:
    """Peak memory of one process (bytes), what it is made of, and the step's speed."""

    strategy: Strategy
    peak: float
    moment: str                 # load, step or save: which moment holds the peak
    parts: dict[str, float] = field(default_factory=dict)
    fits: bool = True
    tokens_per_s: float | None = None
    dataset_s: float | None = None

    def record(self) -> dict:
        """For metrics.jsonl and --json: sizes in MB."""
        return {"strategy": self.strategy.label(), "peak_mb": mb(self.peak), "moment": self.moment,
                "parts_mb": {k: mb(v) for k, v in self.parts.items() if v}, "fits": self.fits,
                "tokens_per_s": None if self.tokens_per_s is None else round(self.tokens_per_s, 1),
                "dataset_s": None if self.dataset_s is None else round(self.dataset_s)}


def mb(x: float) -> float:
    return round(x / 2**20, 1)


@dataclass(frozen=True)
class Knobs:
    """The train options the model reads beyond the strategy."""

    bf16: bool = False
    fp16: bool = False
    lora_r: int = 16
    lora_modules: tuple[str, ...] = ()
    lora_parameters: tuple[str, ...] = ()
    loss_chunk: int = -1            # -1: by device
    attention: str = "sdpa"
    framework: float | None = None  # the process's measured resident bytes before the load (train)


def estimate(c, s: Strategy, w: Workload, d: Device, k: Knobs = Knobs()) -> Estimate:
    """The peak memory and speed of one process of this run."""
    p = count_params(c)
    lora = s.method != "full"
    low = k.bf16 or k.fp16
    trainable = trainable_params(c, s, k)
    shard = d.count if s.sharded else 1  # ZeRO-3 and FSDP2 divide the weights
    split = d.count if s.backend in ("zero1", "zero2", "zero3", "fsdp2") else 1  # ... and the optimizer state

    # weights: a full fine-tune's are fp32 (DeepSpeed: bf16/fp16, with an fp32 master copy in the
    # optimizer); LoRA's frozen base is in the compute dtype, QLoRA's layer weights in 4 bits
    if s.method == "qlora":
        base = p.layer_linear * QLORA_BYTES + (p.total - p.layer_linear) * 2
    elif lora:
        base = p.total * (2 if low else 4)
    else:
        base = p.total * (2 if s.backend.startswith("zero") and low else 4)
    parts = {"framework": 0.0 if d.cuda else  # a GPU's context is taken off Device.usable instead
             (k.framework if k.framework is not None else FRAMEWORK_BYTES + (LORA_IMPORT_BYTES if lora else 0))
             + RUNTIME_BYTES}
    parts["weights"] = (0.0 if s.offload and s.backend == "zero3" else base / shard) + (4 * trainable if lora else 0)
    master = 4 * trainable if s.backend.startswith("zero") and low and not lora else 0
    parts["optimizer"] = 0.0 if s.offload else (8 * trainable + master) / split
    grads = 4 * trainable / (split if s.backend != "zero1" else 1)
    parts["gradients"] = grads
    if s.backend == "ddp":  # DDP's gradient buckets, allocated when the model is wrapped; on a CPU gloo's
        parts["buckets"] = grads * (1 if d.cuda else 2)  # all-reduce adds copies of them (measured)
    if s.sharded:  # the decoder layer being computed, gathered whole, and the next one prefetched
        parts["gathered_layers"] = 2 * base / c.num_hidden_layers

    rows, seq = s.micro_batch, w.row_length
    tokens = rows * seq // s.sequence_parallel
    parts["activations"] = activations(c, s, k, d, rows, seq, tokens, lora)
    parts["loss_head"] = loss_head(c, s, k, d, int(tokens * w.supervised_fraction) or 1, lora)

    static = sum(parts.get(name, 0.0) for name in ("framework", "weights", "optimizer", "buckets", "gathered_layers"))
    held = parts["gradients"] if s.accumulation > 1 else 0.0  # gradients summed over micro-batches
    moments = {"step": static + held + max(parts["activations"] + parts["loss_head"], parts["gradients"])}
    if not d.cuda:  # on a CPU, loading and saving also take this process's memory
        moments["load"] = parts["framework"] - RUNTIME_BYTES + load_bytes(c, s, p, base, k) / shard
        # a checkpoint serialises the trained weights and the optimizer state
        moments["save"] = static + (4 * trainable + parts["optimizer"]) / (shard if lora else split)
    moment = max(moments, key=moments.get)
    est = Estimate(s, moments[moment], moment, {name: v for name, v in parts.items() if v})
    est.fits = est.peak <= d.usable if d.memory else True
    speed(est, c, w, d, trainable, tokens, base, p.total)
    return est


def trainable_params(c, s: Strategy, k: Knobs) -> int:
    if s.method == "full":
        return count_params(c).total
    modules = list(k.lora_modules) or list(arch_of(c).lora_modules)
    experts = list(k.lora_parameters) or ([] if k.lora_modules else list(arch_of(c).lora_expert_parameters))
    return lora_params(c, k.lora_r, modules, experts)


def activations(c, s: Strategy, k: Knobs, d: Device, rows: int, seq: int, tokens: int, lora: bool) -> float:
    """What autograd keeps for the backward of the largest micro-batch, at the end of its forward."""
    size = 2 if (k.bf16 or k.fp16) and d.cuda else 4  # bf16 autocast on a GPU; fp32 on a CPU
    factor = ACTIVATION_FACTOR["cuda" if d.cuda else "cpu"]
    per_layer = [activation_elements(c, i) * size * factor for i in range(c.num_hidden_layers)]
    total = tokens * sum(per_layer)
    if s.checkpointing:  # a checkpointed layer keeps its input only, and recomputes one layer at a time
        stream = c.hidden_size * (2 if lora and (k.bf16 or k.fp16) else 4)
        kept = [stream if i % s.every_n_layers == 0 else per_layer[i] for i in range(len(per_layer))]
        checkpointed = tokens * (sum(kept) + max(per_layer))
        total = checkpointed if d.cuda else max(checkpointed, total * CPU_CHECKPOINT_KEPT["lora" if lora else "full"])
    if not d.cuda and s.accumulation > 1:
        total *= CPU_ACCUMULATED
    if not d.cuda and s.method == "qlora":
        total *= CPU_QLORA_ACTIVATIONS
    if k.attention == "eager":  # the attention probabilities, per head and query-key pair
        full = c.num_hidden_layers - len(linear_attention_layers(c))
        total += rows * full * c.num_attention_heads * seq * seq * 2 * size
    return total + tokens * c.hidden_size * 4 * 2  # the embedding's output and the final norm's


def loss_head(c, s: Strategy, k: Knobs, d: Device, supervised: int, lora: bool) -> float:
    """The loss head's memory at the end of the forward (sftkit/loss.py): one chunk of logits and its
    softmax, the lm_head's gradient where it trains, or the plain path's logits of every supervised token."""
    vocab, h = c.vocab_size, c.hidden_size
    chunk = k.loss_chunk if k.loss_chunk >= 0 else loss_chunk_rows(d.cuda, vocab)
    if chunk <= 0 or s.backend == "zero3" or k.fp16:  # the plain path: fp32 logits, their log-softmax and gradient
        return supervised * vocab * 4 * 3
    rows = min(chunk, supervised)
    # a bf16 matmul (--bf16, or a LoRA base loaded in bf16: QLoRA's) gives bf16 logits, fp32 softmax, bf16 gradient
    low = k.bf16 or s.method == "qlora"
    head = rows * vocab * (8 if low else 4) + supervised * h * 4 * 2  # logits/softmax; rows and their gradient
    if not lora:  # the lm_head's gradient, summed over chunks (fp32 on a CPU: a temporary per chunk under bf16)
        head += vocab * h * 4 * (2 if k.bf16 and not d.cuda else 1)
    if k.bf16 and not lora:
        head += vocab * h * 2  # the fp32 weight cast to bf16 (LoRA's frozen one is bf16 already)
    return head


def load_bytes(c, s: Strategy, p: Params, base: float, k: Knobs) -> float:
    """Resident bytes while the weights load: the safetensors file is mapped, and a weight in the
    file's dtype is used in place (its pages are the weight); one in another dtype is a copy beside them."""
    file_size = p.total * FILE_DTYPE_BYTES.get(str(getattr(c, "dtype", None) or getattr(c, "torch_dtype", None)), 4)
    same = file_size == base
    return file_size if same else file_size + base


def speed(est: Estimate, c, w: Workload, d: Device, trainable: int, tokens: int, base: float, total: int) -> None:
    """Tokens per second of the whole run (all processes) and the time for the dataset. `tokens`: a
    micro-batch's per process; `base`: one process's weights, in the dtype the run holds them;
    `total`: the model's parameters."""
    s = est.strategy
    lora = s.method != "full"
    flops = flops_per_step_fn(c, lora)
    length = w.row_length
    per_token = flops(length, int(length * w.supervised_fraction), length * length) / length
    if s.checkpointing:
        per_token *= 3 / 2 if lora else 4 / 3  # one more forward: LoRA's step is 2 forwards' work, a full one 3
    rate = (d.peak_tflops or (CPU_TFLOPS if not d.cuda else 0)) * 1e12 * (d.mfu or (1 if not d.cuda else 0))
    if not rate:
        return
    step_tokens = tokens * s.accumulation
    compute_s = step_tokens * per_token / rate
    comm_s = 0.0
    if s.offload:
        share = trainable / max(1, d.count)  # gradients down and weights up in 16 bits, AdamW on the CPU
        comm_s += 2 * 2 * share / PCIE_BYTES_PER_S + share / CPU_ADAM_PARAMS_PER_S
    if s.offload and s.backend == "zero3":  # the weights come from the CPU for the forward, recompute and backward
        comm_s += 3 * s.accumulation * base / d.count / PCIE_BYTES_PER_S
    if s.sharded and d.count > 1:
        comm_s += 3 * 2 * total / LINK_BYTES_PER_S * (1 - OVERLAP)
    seconds = compute_s + comm_s
    if s.method == "qlora":
        seconds /= QLORA_SLOWDOWN
    est.tokens_per_s = step_tokens * max(1, d.count // s.sequence_parallel) / seconds  # data-parallel groups
    if w.tokens and w.epochs:
        est.dataset_s = w.tokens * w.epochs / est.tokens_per_s


# ---- devices ---------------------------------------------------------------------------------------
_SPEC = re.compile(r"^(?:(\d+)\s*x\s*)?([A-Za-z0-9-]+?)(?:-(\d+)GB)?$")


def parse_device(spec: str, host_memory: float | None = None) -> Device:
    """`8xH100`, `H200`, `1x24GB` (a GPU known by its memory alone), `cpu` or `2xcpu` (processes on
    this machine's memory). Raises ValueError naming the forms."""
    m = _SPEC.match(spec.strip().replace(" ", ""))
    if not m:
        raise ValueError(spec)
    count, name = int(m.group(1) or 1), m.group(2)
    if count < 1:
        raise ValueError(spec)
    if name.lower() == "cpu":
        return Device("cpu", count, host_memory or 0.0, CPU_TFLOPS, 1.0, True)
    if re.fullmatch(r"\d+GB", name, re.IGNORECASE):
        return Device("GPU", count, int(name[:-2]) * 1e9, None, None)
    key = next((g for g in GPUS if g.lower() == name.lower()), None)
    if key is None:
        raise ValueError(spec)
    memory, mfu = GPUS[key]
    return Device(key, count, memory * 1e9, (peak_flops(key) or 0) / 1e12 or None, mfu or ASSUMED_MFU, mfu is not None)


def gpu_device(name: str, count: int, memory: float) -> Device:
    """A GPU as torch names it ("NVIDIA H100 80GB HBM3"), with its peak and sftkit's MFU where known."""
    key = next((g for g in sorted(GPUS, key=len, reverse=True) if g.lower() in name.lower().replace(" ", "")), None)
    mfu = GPUS[key][1] if key else None
    tflops = peak_flops(name)
    return Device(key or "GPU", count, memory, tflops / 1e12 if tflops else None, mfu or ASSUMED_MFU, mfu is not None)


def host_memory() -> float | None:
    """This machine's physical memory (Linux MemTotal), bytes."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("MemTotal:"))
    except (OSError, StopIteration, ValueError):
        return None


# ---- strategies ------------------------------------------------------------------------------------
BACKENDS = ("ddp", "zero2", "zero3", "fsdp2")


def candidates(base: Strategy, d: Device) -> list[Strategy]:
    """Every sensible strategy for this device: each method on each backend, with and without
    offload where it exists, checkpointing where it is needed; the micro-batch and accumulation as given."""
    backends = [("single", False)] if d.count == 1 else [(b, False) for b in BACKENDS]
    if d.cuda:  # FSDP2 shards over two processes or more; DeepSpeed offloads from one GPU too
        backends += [("zero3", True)] + ([("fsdp2", True)] if d.count > 1 else [])
    out = []
    for method in ("full", "lora", "qlora") if d.cuda else ("full", "lora"):
        for backend, offload in backends:
            if method == "qlora" and backend not in ("single", "ddp"):
                continue  # bitsandbytes' packed 4-bit weights cannot be sharded (train refuses it)
            for ckpt in (False, True):
                out.append(replace(base, method=method, backend=backend, offload=offload, checkpointing=ckpt))
    return out


def plan(c, base: Strategy, w: Workload, d: Device, k: Knobs = Knobs()) -> list[Estimate]:
    """The estimates of every candidate, those that fit first, fastest first; of each (method, backend),
    checkpointing only where the run does not fit without it."""
    ests = [estimate(c, s, w, d, k) for s in candidates(base, d)]
    kept = []
    for e in ests:
        twin = next((o for o in ests if o.strategy == replace(e.strategy, checkpointing=not e.strategy.checkpointing)), None)
        if e.strategy.checkpointing and twin is not None and twin.fits:
            continue
        if not e.strategy.checkpointing and not e.fits and twin is not None and twin.fits:
            continue
        kept.append(e)
    return sorted(kept, key=lambda e: (not e.fits, -(e.tokens_per_s or 0), e.peak))


def largest_micro_batch(c, s: Strategy, w: Workload, d: Device, k: Knobs, step_examples: int) -> int | None:
    """The largest micro-batch that divides the step's examples per process and fits; None if even 1 does not."""
    for b in sorted((b for b in range(1, step_examples + 1) if step_examples % b == 0), reverse=True):
        if estimate(c, replace(s, micro_batch=b, accumulation=step_examples // b), w, d, k).fits:
            return b
    return None


def human(x: float) -> str:
    return f"{x / GiB:.1f} GiB" if x >= GiB else f"{x / 2**20:.0f} MiB"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# ---- from a run's options --------------------------------------------------------------------------
def strategy_of(cfg, backend: str = "single", offload: bool = False) -> Strategy:
    """The strategy a train config asks for, on the backend its launch chose."""
    method = "qlora" if cfg.load_in_4bit else "lora" if cfg.use_lora else "full"
    return Strategy(method, backend, offload, cfg.gradient_checkpointing, cfg.checkpoint_every_n_layers,
                    max(cfg.per_device_train_batch_size, 1), cfg.gradient_accumulation_steps, cfg.sequence_parallel_size)


def knobs_of(cfg, cuda: bool, framework: float | None = None) -> Knobs:
    return Knobs(cfg.bf16, cfg.fp16, cfg.lora_r, tuple(cfg.lora_target_modules), tuple(cfg.lora_target_parameters),
                 cfg.loss_chunk_size, cfg.attention(cuda), framework)


def workload_of(cfg, manifest: dict | None = None) -> Workload:
    """The data side from the options, and from the prepared set's manifest where there is one."""
    m = manifest or {}
    tokens, supervised = m.get("tokens") or 0, m.get("supervised_tokens") or 0
    epochs = cfg.num_train_epochs if cfg.max_steps < 0 else 0.0
    return Workload(cfg.max_length, (m.get("length") or {}).get("max") or 0, cfg.packing, tokens, supervised, epochs)


# ---- the command line of a strategy ---------------------------------------------------------------
LAUNCH = {  # (backend, offload) -> the launcher's arguments (accelerate_configs/, ds_configs/)
    ("ddp", False): ["--config_file", "accelerate_configs/multi_gpu.yaml"],
    ("zero1", False): ["--config_file", "accelerate_configs/deepspeed_zero1.yaml"],
    ("zero2", False): ["--config_file", "accelerate_configs/deepspeed_zero2.yaml"],
    ("zero3", False): ["--config_file", "accelerate_configs/deepspeed_zero3.yaml"],
    ("zero3", True): ["--config_file", "accelerate_configs/deepspeed_zero3.yaml",
                      "--deepspeed_config_file", "ds_configs/zero3_offload.json"],
    ("fsdp2", False): ["--config_file", "accelerate_configs/fsdp2.yaml"],
    ("fsdp2", True): ["--config_file", "accelerate_configs/fsdp2_offload.yaml"],
}
METHOD_FLAGS = {"full": [], "lora": ["--use_lora"], "qlora": ["--use_lora", "--load_in_4bit"]}
DROPPED = {"--use_lora", "--load_in_4bit", "--gradient_checkpointing", "--bf16"}


def command_line(s: Strategy, d: Device, train_args: list[str]) -> str:
    """The command that runs strategy `s`: the launcher, then `train_args` (the user's flags) with the
    method's and checkpointing's flags set as `s` says."""
    import shlex

    args = [a for a in train_args if a not in DROPPED]
    args += METHOD_FLAGS[s.method] + (["--bf16"] if d.cuda else [])
    if s.checkpointing:
        args.append("--gradient_checkpointing")
    if s.backend == "single" and not s.offload:
        head = ["sftkit", "train"]
    else:
        head = ["accelerate", "launch", *LAUNCH[(s.backend, s.offload)], "--num_processes", str(d.count),
                "-m", "sftkit", "train"]
    return shlex.join(head + args)
