"""SFTConfig: every option of every command, each default written once, with its docstring.

SFTConfig is made of field groups, one dataclass each: model, data (`sftkit.data.options`, the data
package's own), train, lora and log. The docstring under each field documents it: its first
paragraph (two short lines) is the `--help` text, the whole docstring its line in docs/CONFIG.md.
`eval` and `merge-lora` have their own options here too.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftkit.data.options import DataOptions, Mixing
from sftkit.errors import ConfigError, quote
from sftkit.options import (
    AUTO,
    EVAL,
    NOT_IDENTITY,
    PREPARE,
    IntOrAuto,
    above,
    at_least,
    between,
    check_choice,
    check_types,
    declared_in,
    default_of,
    values_of,
)
from sftkit.options import field_docs as docs_of
from sftkit.options import field_help as help_of

SCHEDULERS = ("cosine", "linear", "constant")
TRACKERS = ("none", "tensorboard", "wandb")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")  # torch's own backends that train
ALL_TRACKERS = ("tensorboard", "wandb")  # what report_to `all` names (TRL's word), those installed
# Implementations that transformers feeds the packed layout (position_ids restarting at 0, no mask):
# eager/sdpa build a block-diagonal mask from it, flash-attention turns it into varlen offsets.
# varlen (sftkit.arch.packed_attention) and auto take the offsets directly.
PACKING_ATTENTION = ("auto", "varlen", "sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
# flash-attention turns packed position_ids into varlen offsets, so a packed micro-batch can be one
# row with no padding at all; eager/sdpa would build a block mask quadratic in that row instead.
VARLEN_ATTENTION = ("varlen", "flash_attention_2", "flash_attention_3")
DTYPES = ("float32", "bfloat16", "float16")
VISION_TRAINING = ("frozen", "merger", "tower")
LORA_DROPOUT = 0.05  # lora_dropout's value where no expert parameter is targeted
# loss_chunk_size -1: one chunk's fp32 logits at most this many bytes (cpu, cuda). On a CPU a larger
# chunk runs no faster; on a GPU 1.25 GiB (2048 rows of Qwen3) keeps the lm_head gradient's pass per
# chunk, not the logits, from dominating (bench/loss_memory.py).
LOSS_CHUNK_BYTES = {"cpu": int(0.3 * 2**30), "cuda": int(1.25 * 2**30)}


def loss_chunk_rows(cuda: bool, vocab_size: int) -> int:
    """loss_chunk_size -1 on this device and vocabulary: the most rows, a power of two, whose fp32
    logits fit LOSS_CHUNK_BYTES."""
    rows = LOSS_CHUNK_BYTES["cuda" if cuda else "cpu"] // (4 * vocab_size)
    return 1 << max(rows.bit_length() - 1, 4)


@dataclass
class ModelOptions:
    model_name_or_path: str = "tiny-qwen3"
    """Base model: `tiny-qwen3` (built-in, random init, real Qwen3 tokenizer), a local Hugging Face
    model directory, or a Hub id such as Qwen/Qwen3-0.6B."""
    trust_remote_code: bool = field(default=False, metadata={**EVAL, **NOT_IDENTITY})
    """Run Python code shipped with the model. Off: Qwen3 needs none, and it executes foreign code."""
    attn_implementation: str = field(default="auto", metadata=EVAL)
    """Attention kernel: auto (varlen with packing on a GPU, else sdpa), varlen, sdpa, eager, or
    flash_attention_2 (GPU, needs the flash-attn package).

    varlen runs packed rows as one padding-free row: torch's flash varlen kernel on a GPU,
    flash-attn's if installed, a per-example sdpa loop on a CPU."""
    chat_template: str | None = None
    """A Jinja chat template file that replaces the tokenizer's own. Default: the model's template."""
    train_vision: str = "frozen"
    """With images in the data: what of the vision tower trains. frozen (its default), merger (the
    projection into the language model), or tower (the whole vision tower and merger).

    Under LoRA the merger or tower train in full (PEFT's modules_to_save); LoRA's adapters stay on the
    language model."""


@dataclass
class TrainOptions:
    output_dir: str = field(default="outputs/sft", metadata={**PREPARE, **NOT_IDENTITY})
    """Where checkpoints, metrics.jsonl, config.yaml and final/ go."""
    num_train_epochs: float = field(default=1.0, metadata={**NOT_IDENTITY, **above(0, unless="max_steps")})
    """Passes over the training data (fractions allowed). Ignored when max_steps > 0."""
    max_steps: int = field(default=-1, metadata={**NOT_IDENTITY, **at_least(1, off=-1)})
    """Optimizer steps to run; -1 means as many as num_train_epochs takes."""
    per_device_train_batch_size: IntOrAuto = field(default=4, metadata=at_least(1, off=AUTO, off_means="auto"))
    """Examples per micro-batch on each process; auto: the largest that fits (see below).

    auto: the largest micro-batch the memory model (`sftkit plan`) says fits, with the accumulation
    that keeps the step at 4 x gradient_accumulation_steps examples per process (what the default
    micro-batch of 4 gives), so a step holds the same examples as with the default; said once at
    the start."""
    per_device_eval_batch_size: int = field(default=8, metadata={**EVAL, **NOT_IDENTITY, **at_least(1)})
    """Examples per evaluation batch on each process."""
    gradient_accumulation_steps: int = field(default=1, metadata=at_least(1))
    """Micro-batches per optimizer step. The loss is the token mean over all of them, all ranks."""
    learning_rate: float = field(default=2e-5, metadata=above(0))
    """Peak learning rate (after warm-up). LoRA usually wants about 10x a full fine-tune's."""
    lr_scheduler_type: str = "cosine"
    """Decay after warm-up: cosine, linear, or constant."""
    warmup_ratio: float = field(default=0.03, metadata=between(0, 1, hi_open=True))
    """Fraction of the optimizer steps spent warming the learning rate up from 0."""
    warmup_steps: int = field(default=0, metadata=at_least(0))
    """Optimizer steps of warm-up; above 0 it is used instead of warmup_ratio (said at the start)."""
    weight_decay: float = field(default=0.0, metadata=at_least(0))
    """AdamW weight decay."""
    adam_beta1: float = field(default=0.9, metadata=between(0, 1, hi_open=True))
    """AdamW beta1."""
    adam_beta2: float = field(default=0.999, metadata=between(0, 1, hi_open=True))
    """AdamW beta2."""
    adam_epsilon: float = field(default=1e-8, metadata=above(0))
    """AdamW epsilon."""
    max_grad_norm: float = field(default=1.0, metadata=at_least(0))
    """Clip the global gradient norm to this; 0 turns clipping off."""
    seed: int = field(default=42, metadata=between(0, 2**32 - 1))
    """Seed for initialisation, data order and dropout. Data order is a function of seed and epoch.
    numpy takes seeds below 2^32."""
    bf16: bool = field(default=False, metadata=EVAL)
    """bfloat16 mixed precision."""
    fp16: bool = False
    """float16 mixed precision with loss scaling (GPU only)."""
    gradient_checkpointing: bool = field(default=False, metadata=NOT_IDENTITY)
    """Recompute activations in the backward pass: less memory, about 30% more compute."""
    checkpoint_every_n_layers: int = field(default=1, metadata={**NOT_IDENTITY, **at_least(1)})
    """With gradient_checkpointing: recompute only every n-th decoder layer (1: all); the gradients
    are the same.

    2 keeps half the layers' activations and skips half the recompute."""
    loss_chunk_size: int = field(default=-1, metadata={**NOT_IDENTITY, **at_least(0, off=-1, off_means="by device")})
    """Rows of logits the fused loss head computes at once. -1: by the device; 0: off (the plain
    head keeps every supervised position's logits for the backward).

    -1 takes the most rows (a power of two) whose fp32 logits fit 0.3 GiB on a CPU or 1.25 GiB on a
    GPU: 512 and 2048 rows at Qwen3's 151,936 words, 256 and 1024 at Qwen3.5's 248,320. ZeRO-3, fp16
    and a LoRA/modules_to_save lm_head take the plain head too."""
    fused_adamw: bool = field(default=True, metadata=NOT_IDENTITY)
    """torch's fused AdamW (one kernel per step, CPU and GPU); False: the foreach implementation."""
    torch_compile: bool = field(default=False, metadata=NOT_IDENTITY)
    """Compile each decoder layer with torch.compile (inductor). The first steps are slower while
    it compiles; helps most on GPU with packing."""
    torch_compile_backend: str = field(default="inductor", metadata=NOT_IDENTITY)
    """torch.compile's backend with --torch_compile: inductor, aot_eager or eager.

    inductor generates fused kernels (the speed). aot_eager traces the forward and backward as
    inductor does but runs them eagerly: no compiler needed and seconds to start, for telling a
    tracing problem from a kernel problem. eager traces the forward alone."""
    dataloader_num_workers: int = field(default=1, metadata={**NOT_IDENTITY, **at_least(0)})
    """Processes that collate the next steps' micro-batches while this one trains (0: in the
    training process). Batches are pinned for the copy to the GPU."""
    ddp_timeout_minutes: float = field(default=30.0, metadata={**NOT_IDENTITY, **above(0)})
    """How long each process waits for the others at the rendezvous and at any collective before it
    stops, naming what it waited for.

    Rank 0 prepares raw data while the others wait: for millions of rows run prepare-data first."""
    mfu_peak_tflops: float = field(default=0.0, metadata={**NOT_IDENTITY, **at_least(0)})
    """The device's dense bf16 peak for MFU in metrics.jsonl. 0 looks it up for known GPUs
    (H100/H200 989, A100 312); on a CPU or an unknown GPU MFU is then not reported."""
    router_aux_loss_coef: float = field(default=-1.0, metadata=at_least(0, off=-1, off_means="the model config's"))
    """MoE models: weight of the routers' load-balancing loss (logged as aux_loss). -1: the model
    config's router_aux_loss_coef; 0: off.

    The released Qwen3 MoE, Qwen3-Next and Qwen3.5 MoE configs say 0.001 (their
    output_router_logits is not read). The loss is added to the token loss, computed per example
    and weighted by tokens, so a step's value does not depend on how it is cut into micro-batches
    and ranks (sftkit/arch/moe.py). A dense model has none."""
    skip_nan_steps: bool = False
    """Skip an optimizer step whose gradient norm is NaN or inf (counted in metrics.jsonl) instead
    of stopping the run. Not with DeepSpeed, whose engine steps by itself."""
    packing: bool = False
    """Pack examples into rows of max_length; each example attends only to itself.
    per_device_train_batch_size then counts rows.

    Rows are filled best-fit decreasing; position_ids restart at each example, and no attention
    crosses from one example to another."""
    memory_check: bool = field(default=True, metadata=NOT_IDENTITY)
    """Stop before the model loads when the memory model predicts the run will not fit; false: train anyway.

    The memory model (`sftkit plan`) predicts this process's peak; a run predicted above the device's
    memory (a GPU's, or this machine's shared by its processes) stops with one line naming the
    strategies that fit.

    The prediction, and the best strategy's, are in metrics.jsonl's start line (memory_forecast);
    the end line has the measured peak beside it."""
    packing_check: bool = field(default=True, metadata=NOT_IDENTITY)
    """With packing: before step 1, a few examples go through the model packed and one at a time;
    a difference beyond round-off (examples that see each other) stops the run.

    Every layer's output is compared, so the error names the kind of layer that leaked. It costs
    a few forward passes; the result is in metrics.jsonl's start line (packing_check)."""
    sequence_parallel_size: int = field(default=1, metadata={**NOT_IDENTITY, **at_least(1)})
    """Split each packed row's tokens over this many processes (Ulysses sequence parallelism), for
    rows longer than one device holds. Needs packing. 1: off.

    At each attention layer an all-to-all gives every process all the row's tokens for its share of
    the heads, so the rest of the model keeps 1/N of the row's activations. The packed rows need
    varlen attention (auto picks it); N divides the processes (data parallelism runs over
    processes / N) and the model's attention heads. Gated DeltaNet hybrids (Qwen3-Next, Qwen3.5)
    and the MoE balance loss are refused."""
    val_size: float = field(default=0.0, metadata=at_least(0))
    """Hold out part of the training data for eval (instead of eval_data_path): below 1 a share
    (0.1: a tenth), from 1 a count of examples. 0: off.

    The examples are picked by `seed`, the same on every rank and resume, and never trained on."""
    neftune_noise_alpha: float = field(default=0.0, metadata=at_least(0))
    """NEFTune: uniform noise of scale alpha / sqrt(sequence length x hidden size) on the input
    embeddings while training; 5 is the paper's common value. 0: off.

    Training steps only: no noise in eval, in generation or in the saved model."""
    group_by_length: bool = True
    """Without packing: put examples of similar length in the same micro-batch (less padding).

    Examples move only between steps of a window of 64 steps, so which examples a step trains on
    depends on seed, epoch and the global batch, never on how it is split into micro-batches."""


@dataclass
class LoraOptions:
    use_lora: bool = False
    """Train a LoRA adapter (PEFT) instead of all weights."""
    lora_r: int = field(default=16, metadata=at_least(1))
    """LoRA rank."""
    lora_alpha: int = field(default=32, metadata=at_least(1))
    """LoRA scaling numerator: the update is scaled by lora_alpha / lora_r."""
    lora_dropout: float | None = field(default=None, metadata=between(0, 1, hi_open=True))
    """Dropout on the LoRA input. Default: 0.05, or 0 where LoRA reaches expert parameters (MoE
    models).

    PEFT applies no dropout to a parameter, so a value above 0 leaves the experts frozen."""
    lora_target_modules: list[str] = field(default_factory=list)
    """Module names that get LoRA weights. Empty: the architecture's own list (Qwen3: q/k/v/o_proj
    and gate/up/down_proj).

    The architectures' lists are in sftkit/arch/table.py: q/k/v/o_proj and gate/up/down_proj
    (Qwen3, Qwen3.5); on Gated DeltaNet layers in_proj_qkv, in_proj_z and out_proj (Qwen3.5,
    Qwen3.5-MoE) or in_proj_qkvz and out_proj (Qwen3-Next); on MoE models the shared expert
    (Qwen3.5-MoE; none on Qwen3-Next and Qwen3 MoE, where PEFT maps gate/up/down_proj onto the
    routed experts: see lora_target_parameters). The one-number-per-head gates (in_proj_a/b,
    in_proj_ba, shared_expert_gate) are left out; name them here to train them."""
    lora_target_parameters: list[str] = field(default_factory=list)
    """Parameters that get LoRA weights (PEFT target_parameters, matched by name suffix). Empty: the
    architecture's own; `none`: none.

    E.g. the fused expert tensors mlp.experts.gate_up_proj. The architecture's own: on MoE models the
    routed experts, and Qwen3-Next's shared expert, unless lora_dropout is set above 0. Each expert
    gets its own rank-r pair."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full beside the adapter, e.g. embed_tokens and lm_head for new tokens."""
    use_dora: bool = False
    """DoRA (PEFT): each adapted weight is split into a magnitude and a direction, LoRA updating the
    direction. Slower steps; merge-lora folds it in like LoRA."""
    use_rslora: bool = False
    """Rank-stabilised LoRA (PEFT): the update is scaled by lora_alpha / sqrt(lora_r) instead of
    lora_alpha / lora_r, which keeps high ranks from learning slower."""
    load_in_4bit: bool = False
    """QLoRA: load the frozen base quantized to 4 bits through bitsandbytes
    (`pip install 'sftkit[qlora]'`). Not with DeepSpeed.

    nf4, double quantization, bf16 compute; the adapter trains in fp32. merge-lora merges the
    adapter into the 16-bit base."""


@dataclass
class LogOptions:
    logging_steps: int = field(default=10, metadata=at_least(1))
    """Log metrics every N optimizer steps (and at the first and the last step)."""
    save_steps: int = field(default=500, metadata=at_least(0))
    """Save a checkpoint every N optimizer steps; 0 saves only the final model."""
    save_total_limit: int | None = field(default=None, metadata=at_least(1))
    """Keep only the last K checkpoints."""
    eval_steps: int = field(default=0, metadata=at_least(0))
    """Evaluate on eval_data_path every N optimizer steps; 0 evaluates only at the end."""
    resume_from_checkpoint: str | None = None
    """A checkpoint directory to continue from, or `latest` for the newest in output_dir."""
    run_name: str | None = None
    """Name of the run in trackers. Default: the output directory's name."""
    report_to: str = "none"
    """Trackers, comma-separated: none, tensorboard, wandb (`pip install 'sftkit[wandb]'`), or all
    (those of tensorboard and wandb that are installed). metrics.jsonl is always written."""
    overwrite_output_dir: bool = False
    """Replace another run's checkpoints, final/ and metrics in output_dir. Without it a new run
    (no resume) refuses a directory that holds them."""


@dataclass
class SFTConfig(LogOptions, LoraOptions, TrainOptions, DataOptions, ModelOptions):
    """Every option of `sftkit train` (and of prepare-data, which takes the model and data groups).
    The fields come in the order model, data, train, lora, log (dataclasses collect the bases'
    fields from the last base to the first)."""

    def validate(self) -> None:
        """Reject values and combinations that cannot work; each message names the fix."""
        DataOptions.validate(self)  # every field's type, then the data group's values
        check_choice(self, "lr_scheduler_type", SCHEDULERS)
        check_choice(self, "torch_compile_backend", COMPILE_BACKENDS)
        check_choice(self, "train_vision", VISION_TRAINING)
        backend = next(f for f in dataclasses.fields(self) if f.name == "torch_compile_backend")
        if self.torch_compile_backend != default_of(backend) and not self.torch_compile:
            raise ConfigError(f"torch_compile_backend {self.torch_compile_backend} set without torch_compile; add "
                              "--torch_compile or drop --torch_compile_backend")
        for name in self.report_to.split(","):
            if name.strip() not in (*TRACKERS, "all"):
                raise ConfigError(f"report_to: {quote(name)} is not one of {', '.join(TRACKERS)}, all "
                                  "(several: comma-separated, e.g. tensorboard,wandb)")
        if self.val_size and self.eval_data_path:
            raise ConfigError("val_size and eval_data_path both name the eval set; pass one of them")
        if self.val_size >= 1 and self.val_size != int(self.val_size):
            raise ConfigError(f"val_size {self.val_size}: a share is below 1 (0.1), a count a whole number (200)")
        if self.bf16 and self.fp16:
            raise ConfigError("bf16 and fp16 are both set; choose one (--bf16 or --fp16)")
        if not self.use_lora:
            changed = [f.name for f in declared_in(LoraOptions)
                       if f.name != "use_lora" and getattr(self, f.name) != default_of(f)]
            if changed:
                raise ConfigError(f"{', '.join(changed)} set without use_lora; add --use_lora (use_lora: true) "
                                  "or drop the LoRA options")
        if self.lora_target_parameters not in ([], ["none"]) and self.lora_dropout:
            raise ConfigError(f"lora_target_parameters {', '.join(self.lora_target_parameters)}: PEFT cannot apply "
                              f"dropout to a parameter (lora_dropout={self.lora_dropout}); add --lora_dropout 0")
        if self.sequence_parallel_size > 1 and not (self.packing and self.attn_implementation in ("auto", "varlen")):
            raise ConfigError(f"sequence_parallel_size {self.sequence_parallel_size} splits packed rows and needs "
                              "varlen attention; add --packing and leave --attn_implementation auto (or varlen)")
        if self.packing and self.attn_implementation not in PACKING_ATTENTION:
            raise ConfigError(f"packing needs an attention implementation that keeps packed examples apart "
                              f"({', '.join(PACKING_ATTENTION)}); set --attn_implementation sdpa or drop --packing")

    # ---- derived values ----------------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        """The options that decide what each step computes: the model, the optimizer, the batch
        geometry, LoRA. The data's part of a run's identity is its prepared set's fingerprint, and
        the log group only says how a run is watched and saved."""
        groups = ("model", "train", "lora")
        return {f.name: getattr(self, f.name) for g in groups for f in declared_in(GROUPS[g])
                if f.metadata.get("identity", True)}

    def data_options(self) -> DataOptions:
        """The data group alone: what the data package is given."""
        return DataOptions(**values_of(DataOptions, self))

    def mixing(self) -> Mixing | None:
        """data_weights with the seed that picks their fractional shares; None without weights."""
        return Mixing(self.data_weights, self.seed) if self.data_weights else None

    @property
    def mixed_precision(self) -> str:
        """accelerate's name for the precision: bf16, fp16 or no."""
        return "bf16" if self.bf16 else "fp16" if self.fp16 else "no"

    def attention(self, cuda: bool) -> str:
        """The attention kernel this run uses: auto is varlen when packing on a GPU or with sequence
        parallelism, sdpa otherwise (on a CPU the varlen path is a per-example loop, slower than
        sdpa's block mask)."""
        if self.attn_implementation != "auto":
            return self.attn_implementation
        return "varlen" if self.packing and (cuda or self.sequence_parallel_size > 1) else "sdpa"

    def loss_chunk(self, cuda: bool, vocab_size: int) -> int:
        """loss_chunk_size, with -1 resolved for the device and the vocabulary (see its docstring)."""
        return self.loss_chunk_size if self.loss_chunk_size >= 0 else loss_chunk_rows(cuda, vocab_size)

    def padding_free(self, cuda: bool) -> bool:
        """Packed micro-batches become one row with no padding (attention that takes varlen offsets)."""
        return self.packing and self.attention(cuda) in VARLEN_ATTENTION

    @property
    def trackers(self) -> list[str] | None:
        """The trackers to log to, or None: `all` is those of ALL_TRACKERS that are installed."""
        import importlib.util

        names = [n.strip() for n in self.report_to.split(",") if n.strip() != "none"]
        if "all" in names:
            names = [n for n in ALL_TRACKERS if importlib.util.find_spec(n) is not None]
        return list(dict.fromkeys(names)) or None

    # ---- YAML ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> SFTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise ConfigError(f"{source}: unknown option '{key}'{hint}")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> SFTConfig:
        """Load a YAML run file; `overrides` (e.g. command-line flags) win over its values."""
        from sftkit.io import read_yaml

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        values = read_yaml(path) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of option: value at the top level")
        return cls.from_dict({**values, **(overrides or {})}, source=str(path))

    def save_yaml(self, path: str | os.PathLike) -> None:
        import yaml

        from sftkit.io import atomic_write_text

        atomic_write_text(Path(path), yaml.safe_dump(self.to_dict(), sort_keys=False))


@dataclass
class GenerationOptions:
    """`sftkit eval --num_samples N`: completions for held-out prompts."""

    num_samples: int = field(default=0, metadata=at_least(0))
    """Generate completions for this many prompts (the conversations up to their last reply)."""
    max_new_tokens: int = field(default=128, metadata=at_least(1))
    """Longest completion, in tokens."""
    do_sample: bool = field(default=False, metadata={"off_flag": "--greedy"})
    """Sample instead of decoding greedily."""
    temperature: float = field(default=0.7, metadata=above(0))
    """Sampling temperature (with --do_sample)."""
    top_p: float = field(default=0.9, metadata=between(0, 1, lo_open=True))
    """Nucleus sampling mass (with --do_sample)."""

    def __post_init__(self) -> None:
        check_types(self)


@dataclass
class MergeOptions:
    """`sftkit merge-lora`: how the standalone model is written."""

    dtype: str | None = None
    """float32, bfloat16 or float16. Default: the base model's dtype."""
    max_shard_size: str = "5GB"
    """Largest safetensors file, e.g. 2GB or 500MB."""
    overwrite_output_dir: bool = False
    """Replace an output_dir that is not empty. Without it merge-lora refuses one (and a file)."""

    def __post_init__(self) -> None:
        check_types(self)
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigError(f"--dtype {quote(self.dtype)}: choose one of {', '.join(DTYPES)}")
        size = re.fullmatch(r"\s*(\d+)\s*([KMG]i?B)?\s*", self.max_shard_size, re.IGNORECASE)
        if not size or int(size.group(1)) < 1:
            raise ConfigError(f"--max_shard_size {quote(self.max_shard_size)}: expected a size such as 5GB, 500MB "
                              "or 2GiB (at least 1 byte)")


# The groups of SFTConfig, in its field order; a group's name titles its --help panel and its
# section of docs/CONFIG.md.
GROUPS = {"model": ModelOptions, "data": DataOptions, "train": TrainOptions, "lora": LoraOptions,
          "log": LogOptions}
COMMAND_OPTIONS = {"eval": GenerationOptions, "merge-lora": MergeOptions}


def field_docs(cls: type = SFTConfig) -> dict[str, str]:
    """The whole docstring written under each field of `cls` (default SFTConfig), one line each."""
    return docs_of(cls)


def field_help(cls: type = SFTConfig) -> dict[str, str]:
    """The `--help` text of each field of `cls` (default SFTConfig): its docstring's first paragraph."""
    return help_of(cls)


def group_of(f: dataclasses.Field) -> str:
    """The name of the SFTConfig group that declares the field."""
    return next(g for g, cls in GROUPS.items() if f.name in {x.name for x in declared_in(cls)})


def eval_fields() -> list[dataclasses.Field]:
    """The SFTConfig options `sftkit eval` takes: those marked EVAL."""
    return [f for f in dataclasses.fields(SFTConfig) if f.metadata.get("eval")]


def prepare_fields() -> list[dataclasses.Field]:
    """The SFTConfig options `sftkit prepare-data` takes: the model and data groups, and those marked PREPARE."""
    return [f for f in dataclasses.fields(SFTConfig) if group_of(f) in ("model", "data") or f.metadata.get("prepare")]


def reference_markdown() -> str:
    """docs/CONFIG.md: every option, its default and its docstring, grouped as in the class."""
    lines = ["# Configuration reference", "",
             "Generated from the docstrings in `sftkit/config.py` and `sftkit/data/options.py` by",
             "`python -m sftkit.config > docs/CONFIG.md`; a test fails when this file is stale.",
             "Every option of the first five groups works as a `--flag` and as a YAML key; the last two",
             "are flags of `sftkit eval` and `sftkit merge-lora`. An option's `--help` is the start of its",
             "entry here (its docstring's first paragraph).", ""]
    sections = [(g, declared_in(cls), field_docs()) for g, cls in GROUPS.items()]
    sections += [(f"{cmd} (flags)", dataclasses.fields(cls), field_docs(cls)) for cmd, cls in COMMAND_OPTIONS.items()]
    for title, fields, docs in sections:
        lines += ["", f"## {title}", "", "| option | default | range | meaning |", "|---|---|---|---|"]
        lines += [f"| `{f.name}` | `{default_of(f)}` | {f.metadata['range'].bounds() if 'range' in f.metadata else ''} "
                  f"| {docs.get(f.name, '')} |" for f in fields]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(reference_markdown(), end="")
