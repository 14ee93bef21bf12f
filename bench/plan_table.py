"""The README's table of plans: Qwen3-8B and Qwen3.5-9B on one 24 GB GPU, one 80 GB GPU and eight,
from `sftkit plan`'s own model (tests/test_docs.py checks that the README shows what this prints).

    python -m bench.plan_table
"""

from __future__ import annotations

from sftkit.plan import Knobs, Strategy, Workload, config_namespace, duration, family_table, human, parse_device, plan

MODELS = ("Qwen/Qwen3-8B", "Qwen/Qwen3.5-9B")
DEVICES = (("1xA10", "1 x 24 GB (A10)"), ("1xH100", "1 x 80 GB (H100)"), ("8xH100", "8 x 80 GB (H100)"))
# 4096-token packed rows, one per micro-batch, 8 micro-batches a step; 100M tokens for the time
WORK = Workload(max_length=4096, packing=True, tokens=100_000_000, epochs=1.0)
RUN = Strategy(micro_batch=1, accumulation=8)
FLAGS = "--max_length 4096 --packing --per_device_train_batch_size 1 --gradient_accumulation_steps 8"


def best(model: str, spec: str, methods: tuple[str, ...]):
    """The fastest strategy of these methods that fits (the plan lists what fits first, fastest first)."""
    ests = plan(config_namespace(family_table()[model]), RUN, WORK, parse_device(spec), Knobs(bf16=True))
    return next((e for e in ests if e.fits and e.strategy.method in methods), None)


def table() -> str:
    lines = [("| model | devices | LoRA or QLoRA: fastest that fits | peak | tok/s | 100M tokens "
              "| full: fastest that fits | peak | tok/s | 100M tokens |"), "|---|---|---|---:|---:|---:|---|---:|---:|---:|"]
    for model in MODELS:
        for spec, label in DEVICES:
            cells = []
            for methods in (("lora", "qlora"), ("full",)):
                e = best(model, spec, methods)
                cells += ["does not fit", "", "", ""] if e is None else [
                    e.strategy.label(), human(e.peak), f"{e.tokens_per_s:,.0f}", duration(e.dataset_s)]
            lines.append(f"| {model.split('/')[1]} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(table(), end="")
