"""SFTConfig: every option of every command, each default written once, with its docstring.

The docstring under each field is its `--help` text and its line in docs/CONFIG.md.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import os
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from sftkit.errors import ConfigError

FORMATS = ("auto", "alpaca", "sharegpt", "messages", "custom")
TRUNCATIONS = ("drop", "left", "right")
TRAIN_ON = ("all", "last")
REASONING = ("template", "drop")
SCHEDULERS = ("cosine", "linear", "constant")
TRACKERS = ("none", "tensorboard", "wandb")
# Implementations that transformers feeds the packed layout (position_ids restarting at 0, no mask):
# eager/sdpa build a block-diagonal mask from it, flash-attention turns it into varlen offsets.
PACKING_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


def _group(name: str) -> dict:
    return {"group": name}


@dataclass
class SFTConfig:
    # ---- model ----------------------------------------------------------------------------
    model_name_or_path: str = field(default="tiny-qwen3", metadata=_group("model"))
    """Base model: `tiny-qwen3` (built-in, random init, real Qwen3 tokenizer), a local Hugging Face
    model directory, or a Hub id such as Qwen/Qwen3-0.6B."""
    trust_remote_code: bool = field(default=False, metadata=_group("model"))
    """Run Python code shipped with the model. Off: Qwen3 needs none, and it executes foreign code."""
    attn_implementation: str = field(default="sdpa", metadata=_group("model"))
    """Attention kernel: sdpa, eager, or flash_attention_2 (GPU, needs the flash-attn package)."""
    chat_template: str | None = field(default=None, metadata=_group("model"))
    """A Jinja chat template file that replaces the tokenizer's own. Default: the model's template."""

    # ---- data ------------------------------------------------------------------------------
    data_path: list[str] = field(default_factory=list, metadata=_group("data"))
    """Training data: .json/.jsonl/.parquet/.csv files, a directory, a glob, a prepared directory
    (from prepare-data), or a Hugging Face dataset name. Repeat the flag for several sources."""
    data_weights: list[float] = field(default_factory=list, metadata=_group("data"))
    """Mixing weight per `data_path` entry, in the same order: 2 repeats a source's examples twice,
    0.5 keeps a seeded half of them. Default: 1 for every source."""
    eval_data_path: str | None = field(default=None, metadata=_group("data"))
    """Evaluation data, in any form `data_path` accepts."""
    format_type: str = field(default="auto", metadata=_group("data"))
    """Row format: auto (detected per file from the first row), alpaca, sharegpt, messages, custom."""
    field_map: str | None = field(default=None, metadata=_group("data"))
    """Custom columns, e.g. `instruction=question,output=answer,system=sys`."""
    dataset_split: str = field(default="train", metadata=_group("data"))
    """Split to read when `data_path` is a Hugging Face dataset name."""
    dataset_config: str | None = field(default=None, metadata=_group("data"))
    """Configuration (subset) name of a Hugging Face dataset."""
    max_length: int = field(default=2048, metadata=_group("data"))
    """Longest example in tokens, prompt and reply together."""
    truncation: str = field(default="drop", metadata=_group("data"))
    """What to do with a longer example: drop it (counted in manifest.json), or cut tokens from
    the left or the right."""
    train_on: str = field(default="all", metadata=_group("data"))
    """Which assistant turns are supervised: all, or only the last one."""
    reasoning: str = field(default="template", metadata=_group("data"))
    """Reasoning (`<think>`) policy: `template` renders exactly as the chat template does at
    inference (Qwen3 drops the reasoning of turns before the last user message); `drop` removes
    all reasoning."""
    enable_thinking: bool = field(default=True, metadata=_group("data"))
    """False for no-think data: the empty `<think></think>` block that Qwen3 puts in the prompt
    at inference is then part of the prompt, not of the supervised reply."""
    skip_bad_rows: bool = field(default=False, metadata=_group("data"))
    """Skip malformed rows (counted, the first few listed) instead of stopping at the first one."""
    num_proc: int = field(default=1, metadata=_group("data"))
    """Processes for tokenization."""

    # ---- optimisation ----------------------------------------------------------------------
    output_dir: str = field(default="outputs/sft", metadata=_group("train"))
    """Where checkpoints, metrics.jsonl, config.yaml and final/ go."""
    num_train_epochs: float = field(default=1.0, metadata=_group("train"))
    """Passes over the training data (fractions allowed). Ignored when max_steps > 0."""
    max_steps: int = field(default=-1, metadata=_group("train"))
    """Optimizer steps to run; -1 means as many as num_train_epochs takes."""
    per_device_train_batch_size: int = field(default=4, metadata=_group("train"))
    """Examples per micro-batch on each process."""
    per_device_eval_batch_size: int = field(default=8, metadata=_group("train"))
    """Examples per evaluation batch on each process."""
    gradient_accumulation_steps: int = field(default=1, metadata=_group("train"))
    """Micro-batches per optimizer step. The loss is the token mean over all of them, all ranks."""
    learning_rate: float = field(default=2e-5, metadata=_group("train"))
    """Peak learning rate (after warm-up). LoRA usually wants about 10x a full fine-tune's."""
    lr_scheduler_type: str = field(default="cosine", metadata=_group("train"))
    """Decay after warm-up: cosine, linear, or constant."""
    warmup_ratio: float = field(default=0.03, metadata=_group("train"))
    """Fraction of the optimizer steps spent warming the learning rate up from 0."""
    weight_decay: float = field(default=0.0, metadata=_group("train"))
    """AdamW weight decay."""
    adam_beta1: float = field(default=0.9, metadata=_group("train"))
    """AdamW beta1."""
    adam_beta2: float = field(default=0.999, metadata=_group("train"))
    """AdamW beta2."""
    adam_epsilon: float = field(default=1e-8, metadata=_group("train"))
    """AdamW epsilon."""
    max_grad_norm: float = field(default=1.0, metadata=_group("train"))
    """Clip the global gradient norm to this; 0 turns clipping off."""
    seed: int = field(default=42, metadata=_group("train"))
    """Seed for initialisation, data order and dropout. Data order is a function of seed and epoch."""
    bf16: bool = field(default=False, metadata=_group("train"))
    """bfloat16 mixed precision."""
    fp16: bool = field(default=False, metadata=_group("train"))
    """float16 mixed precision with loss scaling (GPU only)."""
    gradient_checkpointing: bool = field(default=False, metadata=_group("train"))
    """Recompute activations in the backward pass: less memory, about 30% more compute."""
    checkpoint_every_n_layers: int = field(default=1, metadata=_group("train"))
    """With gradient_checkpointing: recompute only every n-th decoder layer (1: all). 2 keeps half
    the layers' activations and skips half the recompute; the gradients are the same."""
    loss_chunk_size: int = field(default=512, metadata=_group("train"))
    """Rows of logits the fused cross-entropy computes at once (512 rows x 151,936 words: 0.3 GB
    in fp32; on 2 CPU cores 512 and 1024 ran at the same speed, 1024 with 0.6 GB more RSS).
    0 takes the plain path, which keeps every supervised position's logits for the backward.
    ZeRO-3, fp16 and a LoRA/modules_to_save lm_head always take the plain path."""
    fused_adamw: bool = field(default=True, metadata=_group("train"))
    """torch's fused AdamW (one kernel per step, CPU and GPU); False: the foreach implementation."""
    torch_compile: bool = field(default=False, metadata=_group("train"))
    """Compile each decoder layer with torch.compile (inductor). The first steps are slower while
    it compiles; helps most on GPU with packing."""
    dataloader_num_workers: int = field(default=1, metadata=_group("train"))
    """Processes that collate the next steps' micro-batches while this one trains (0: in the
    training process). Batches are pinned for the copy to the GPU."""
    mfu_peak_tflops: float = field(default=0.0, metadata=_group("train"))
    """The device's dense bf16 peak for MFU in metrics.jsonl. 0 looks it up for known GPUs
    (H100/H200 989, A100 312); on a CPU or an unknown GPU MFU is then not reported."""
    skip_nan_steps: bool = field(default=False, metadata=_group("train"))
    """Skip an optimizer step whose gradient norm is NaN or inf (counted in metrics.jsonl) instead
    of stopping the run. Not with DeepSpeed, whose engine steps by itself."""
    packing: bool = field(default=False, metadata=_group("train"))
    """Pack examples into rows of max_length (best-fit decreasing); each example attends only to
    itself (position_ids restart, no cross-example attention). per_device_train_batch_size then
    counts rows."""
    group_by_length: bool = field(default=True, metadata=_group("train"))
    """Without packing: put examples of similar length in the same micro-batch (less padding).
    The order stays random between micro-batches and is a function of seed and epoch."""

    # ---- LoRA ------------------------------------------------------------------------------
    use_lora: bool = field(default=False, metadata=_group("lora"))
    """Train a LoRA adapter (PEFT) instead of all weights."""
    lora_r: int = field(default=16, metadata=_group("lora"))
    """LoRA rank."""
    lora_alpha: int = field(default=32, metadata=_group("lora"))
    """LoRA scaling numerator: the update is scaled by lora_alpha / lora_r."""
    lora_dropout: float = field(default=0.05, metadata=_group("lora"))
    """Dropout on the LoRA input."""
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        metadata=_group("lora"),
    )
    """Module names that get LoRA weights (Qwen3's attention and MLP projections by default)."""
    modules_to_save: list[str] = field(default_factory=list, metadata=_group("lora"))
    """Modules trained in full beside the adapter, e.g. embed_tokens and lm_head for new tokens."""

    # ---- logging and checkpoints -----------------------------------------------------------
    logging_steps: int = field(default=10, metadata=_group("log"))
    """Log metrics every N optimizer steps (and at the first and the last step)."""
    save_steps: int = field(default=500, metadata=_group("log"))
    """Save a checkpoint every N optimizer steps; 0 saves only the final model."""
    save_total_limit: int | None = field(default=None, metadata=_group("log"))
    """Keep only the last K checkpoints."""
    eval_steps: int = field(default=0, metadata=_group("log"))
    """Evaluate on eval_data_path every N optimizer steps; 0 evaluates only at the end."""
    resume_from_checkpoint: str | None = field(default=None, metadata=_group("log"))
    """A checkpoint directory to continue from, or `latest` for the newest in output_dir."""
    run_name: str | None = field(default=None, metadata=_group("log"))
    """Name of the run in trackers. Default: the output directory's name."""
    report_to: str = field(default="none", metadata=_group("log"))
    """Tracker: none, tensorboard, or wandb. metrics.jsonl is always written."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Reject values and combinations that cannot work; each message names the fix."""
        self._check_types()
        choices = {
            "format_type": FORMATS, "truncation": TRUNCATIONS, "train_on": TRAIN_ON,
            "reasoning": REASONING, "lr_scheduler_type": SCHEDULERS, "report_to": TRACKERS,
        }
        for name, allowed in choices.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(f"{name}: '{value}' is not one of {', '.join(allowed)}")
        if self.bf16 and self.fp16:
            raise ConfigError("bf16 and fp16 are both set; choose one (--bf16 or --fp16)")
        positive = ("max_length", "per_device_train_batch_size", "per_device_eval_batch_size",
                    "gradient_accumulation_steps", "logging_steps", "num_proc", "lora_r")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("loss_chunk_size", "dataloader_num_workers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if self.checkpoint_every_n_layers < 1:
            raise ConfigError(f"checkpoint_every_n_layers must be at least 1, got {self.checkpoint_every_n_layers}")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be positive, got {self.learning_rate}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not self.use_lora:
            defaults = {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                        for f in dataclasses.fields(self) if f.metadata.get("group") == "lora" and f.name != "use_lora"}
            changed = [name for name, value in defaults.items() if getattr(self, name) != value]
            if changed:
                raise ConfigError(f"{', '.join(changed)} set without use_lora; add --use_lora (use_lora: true) "
                                  "or drop the LoRA options")
        if self.packing and self.attn_implementation not in PACKING_ATTENTION:
            raise ConfigError(f"packing needs an attention implementation that keeps packed examples apart "
                              f"({', '.join(PACKING_ATTENTION)}); set --attn_implementation sdpa or drop --packing")
        if self.data_weights and len(self.data_weights) != len(self.data_path):
            raise ConfigError(f"data_weights has {len(self.data_weights)} values for {len(self.data_path)} data_path "
                              "entries; give one weight per source, in the same order")
        if any(w < 0 for w in self.data_weights):
            raise ConfigError("data_weights must not be negative")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ConfigError("save_total_limit must be at least 1 (or unset to keep every checkpoint)")

    def _check_types(self) -> None:
        """YAML and the Python API give values of any type: coerce the harmless, reject the rest."""
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), str(f.type)
            if value is None and "None" in kind:
                continue
            if kind.startswith("list"):
                item = (int, float) if kind == "list[float]" else str
                if isinstance(value, (str, int, float)) and not isinstance(value, bool):
                    value = [value]
                ok = isinstance(value, (list, tuple)) and all(
                    isinstance(v, item) and not isinstance(v, bool) for v in value)
                value = [float(v) if item != str else v for v in value] if ok else value
            elif kind.startswith("bool"):
                ok = isinstance(value, bool)
            elif kind.startswith("int"):
                ok = isinstance(value, int) and not isinstance(value, bool)
            elif kind.startswith("float"):
                if isinstance(value, str):  # PyYAML reads 1e-5 (no dot) as a string
                    try:
                        value = float(value)
                    except ValueError:
                        pass
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
                value = float(value) if ok else value
            else:
                ok = isinstance(value, str)
            if not ok:
                want = kind.replace(" | None", "").replace("list[str]", "list of strings").replace(
                    "list[float]", "list of numbers")
                raise ConfigError(f"{f.name}: expected {want}, got {value!r}")
            setattr(self, f.name, value)

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
        import yaml

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f":{mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of option: value at the top level")
        return cls.from_dict({**values, **(overrides or {})}, source=str(path))

    def save_yaml(self, path: str | os.PathLike) -> None:
        import yaml

        from sftkit.io import atomic_write_text

        atomic_write_text(Path(path), yaml.safe_dump(self.to_dict(), sort_keys=False))


@cache
def field_docs() -> dict[str, str]:
    """The docstring written under each SFTConfig field, one line each."""
    tree = ast.parse(inspect.getsource(SFTConfig))
    body = tree.body[0].body
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def fields_in(*groups: str) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(SFTConfig) if f.metadata.get("group") in groups]


def reference_markdown() -> str:
    """docs/CONFIG.md: every option, its default and its docstring, grouped as in the class."""
    docs = field_docs()
    lines = ["# Configuration reference", "",
             "Generated from the docstrings in `sftkit/config.py` by `python -m sftkit.config > docs/CONFIG.md`;",
             "a test fails when this file is stale. Every option works as a `--flag` and as a YAML key.", ""]
    group = None
    for f in dataclasses.fields(SFTConfig):
        if f.metadata.get("group") != group:
            group = f.metadata.get("group")
            lines += ["", f"## {group}", "", "| option | default | meaning |", "|---|---|---|"]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        lines.append(f"| `{f.name}` | `{default}` | {docs.get(f.name, '')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(reference_markdown(), end="")
