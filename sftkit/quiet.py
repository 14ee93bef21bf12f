"""Third-party output that is expected, and therefore noise, switched off at its source.

Each line below is printed by a plain `sftkit train` (most of them on a CPU) and says nothing
the user must act on. Only these exact messages are dropped: any other warning of the same
libraries still shows. `--verbose` keeps all of them. Called by the CLI for its own process,
never at import time: a user's program that imports sftkit keeps its settings.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

# logger name -> a message that is expected
EXPECTED_LOG_LINES = {
    # DeepSpeed on a machine without a GPU, at import (accelerate imports it): the CPU is what we use
    "DeepSpeed": "Setting accelerator to CPU",
    # accelerate.save_state on a model whose lm_head is tied to the embedding (Qwen3 0.6B-4B, our
    # tiny preset): the tie is restored on load, which the reload tests check
    "accelerate.utils.other": "Removed shared tensor",
    # bitsandbytes 0.50 on a CPU without the optional `kernels` package, when peft imports it: its
    # 4-bit CPU kernel, which no sftkit command uses, falls back to a plain one
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward",
    # Qwen3-Next / Qwen3.5 without flash-linear-attention or causal-conv1d (every CPU): one line per
    # kernel that transformers' exact PyTorch reference stands in for. It names causal-conv1d, which
    # sftkit does not use; on CUDA without fla the run's start prints sftkit's own line instead
    # (kernel_warning in sftkit/arch/packed_linear_attention.py), naming sftkit's extra and the cost
    "transformers.integrations.hub_kernels": "is falling back to its reference PyTorch implementation",
}
# warnings raised inside libraries by calls of other libraries, not by sftkit's use of them
EXPECTED_WARNINGS = [
    # PEFT asks transformers 5.2x for is_gradient_checkpointing, deprecated there
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
    # DeepSpeed ZeRO gathers and reduces its partitions with collectives torch 2.13 deprecates, a
    # line each time (ZeRO-3: several a step)
    (FutureWarning, r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"),
]


class _DropExpected(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return self.start not in str(record.msg)  # accelerate prefixes "[RANK 0] "


def quiet_third_party() -> None:
    """Drop the expected lines above and the per-file progress bars of model loading and saving
    ("Loading weights", "Writing model shards"): sftkit shows its own progress."""
    for name, start in EXPECTED_LOG_LINES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropExpected) and f.start == start for f in logger.filters):
            logger.addFilter(_DropExpected(start))
    for category, message in EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    # read by huggingface_hub, whose switch transformers' own bars follow; set before they import
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # a program that imported them first (the Python API) has read the variable already
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()
