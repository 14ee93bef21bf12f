"""The memory and time model (sftkit/plan.py) and `sftkit plan`, against the code they describe:
parameter counts against the models transformers builds, LoRA's against what PEFT makes trainable,
every family size planned offline, and the command lines it prints against the launcher files."""

from __future__ import annotations

import json
import shlex

import pytest
import torch
import transformers
from conftest import ROOT

from sftkit.config import SFTConfig
from sftkit.plan import (
    Knobs,
    Strategy,
    Workload,
    config_namespace,
    count_params,
    estimate,
    family_table,
    largest_micro_batch,
    parse_device,
    trainable_params,
)

CLASSES = {"qwen3": ("Qwen3Config", "Qwen3ForCausalLM"), "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
           "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM"),
           "qwen3_5_text": ("Qwen3_5TextConfig", "Qwen3_5ForCausalLM"),
           "qwen3_5_moe_text": ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM")}
NOT_CONFIG = ("model_type", "params_published", "source")


def built_on_meta(values: dict):
    config_class, model_class = CLASSES[values["model_type"]]
    config = getattr(transformers, config_class)(**{k: v for k, v in values.items() if k not in NOT_CONFIG})
    with torch.device("meta"):
        return getattr(transformers, model_class)(config)


@pytest.mark.parametrize("name", list(family_table()))
def test_every_family_size_counts_the_parameters_transformers_builds(name):
    values = family_table()[name]
    built = sum(p.numel() for p in built_on_meta(values).parameters())
    assert count_params(config_namespace(values)).total == built


@pytest.mark.parametrize("kind", ["qwen3", "qwen3_moe", "qwen3_next", "qwen3_5", "qwen3_5_moe"])
def test_lora_trainable_parameters_are_what_peft_makes_trainable(kind, family_model):
    """The default targets of every architecture (experts included), through sftkit's own model build."""
    from sftkit.models import build_for_training, count_parameters

    folder = family_model(kind)
    cfg = SFTConfig(model_name_or_path=str(folder), use_lora=True, data_path=["x"])
    trainable, total = count_parameters(build_for_training(cfg))
    config = config_namespace(json.loads((folder / "config.json").read_text()))
    assert count_params(config).total == total - trainable  # the adapter is counted in the total
    assert trainable_params(config, Strategy(method="lora"), Knobs(lora_r=cfg.lora_r)) == trainable


def test_a_largest_micro_batch_fits_and_the_next_larger_does_not():
    c = config_namespace(family_table()["Qwen/Qwen3-8B"])
    gpu = parse_device("1x80GB")
    work = Workload(max_length=4096)
    s = Strategy(method="lora", checkpointing=True, micro_batch=1)
    best = largest_micro_batch(c, s, work, gpu, Knobs(bf16=True), 32)
    assert best is not None and 32 % best == 0
    assert estimate(c, Strategy("lora", checkpointing=True, micro_batch=best, accumulation=32 // best),
                    work, gpu, Knobs(bf16=True)).fits
    bigger = min(b for b in range(best + 1, 33) if 32 % b == 0)
    assert not estimate(c, Strategy("lora", checkpointing=True, micro_batch=bigger), work, gpu, Knobs(bf16=True)).fits
    # a full fine-tune of 8B holds 16 bytes a parameter on one GPU: no micro-batch fits 80 GB
    assert largest_micro_batch(c, Strategy(micro_batch=1), work, gpu, Knobs(bf16=True), 32) is None


def test_sharding_divides_what_each_backend_divides():
    c = config_namespace(family_table()["Qwen/Qwen3-8B"])
    work, knobs = Workload(max_length=2048), Knobs(bf16=True)
    one, eight = parse_device("1xH100"), parse_device("8xH100")
    parts = {b: estimate(c, Strategy(backend=b, checkpointing=True, micro_batch=1), work, eight, knobs).parts
             for b in ("ddp", "zero2", "zero3", "fsdp2")}
    single = estimate(c, Strategy(checkpointing=True, micro_batch=1), work, one, knobs).parts
    assert parts["ddp"]["optimizer"] == single["optimizer"]  # DDP replicates everything
    # ZeRO-2 shards AdamW and DeepSpeed's fp32 master copy 8 ways; its bf16 weights are half fp32's
    assert parts["zero2"]["optimizer"] < single["optimizer"] / 4 and parts["zero2"]["weights"] == single["weights"] / 2
    assert parts["zero3"]["weights"] < single["weights"] / 7 and parts["fsdp2"]["weights"] == single["weights"] / 8
    assert parts["ddp"]["activations"] == parts["zero3"]["activations"] == single["activations"]


def test_unknown_device_forms_are_refused():
    for bad in ("8xB9000", "0xH100", "H100x8", ""):
        with pytest.raises(ValueError):
            parse_device(bad)
    assert parse_device("2xcpu", 24e9).usable == 12e9
    assert parse_device("1x24GB").memory == 24e9


@pytest.mark.parametrize("name", list(family_table()))
def test_plan_prints_every_family_size_offline(name, cli, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = cli("plan", "--model", name, "--gpus", "8xH100", "--max_length", "4096", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["strategies"], plan
    for s in plan["strategies"]:
        assert s["peak_mb"] > 0 and s["tokens_per_s"] > 0, s
        args = shlex.split(s["command"])
        # each configuration file the command names is in the repository
        for flag in ("--config_file", "--deepspeed_config_file"):
            if flag in args:
                assert (ROOT / args[args.index(flag) + 1]).is_file(), s["command"]
        assert args[args.index("--model_name_or_path") + 1] == name
    fitting = [s for s in plan["strategies"] if s["fits"]]
    assert plan["strategies"][:len(fitting)] == fitting  # what fits comes first


def test_plan_table_names_the_best_command(cli, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(family_table()["Qwen/Qwen3.5-9B"]))
    result = cli("plan", "--model", str(config), "--gpus", "1x24GB", "--use_lora", "--max_length", "2048")
    assert result.exit_code == 0, result.output
    best = next(line for line in result.output.splitlines() if line.startswith("best: "))
    assert "--use_lora" in best and "sftkit train" in best and "--max_length 2048" in best


def test_plan_refuses_what_it_cannot_read(cli, tmp_path):
    from conftest import one_error

    one_error(cli("plan", "--model", str(tmp_path), "--gpus", "1xH100"), "no config.json")
    one_error(cli("plan", "--model", "Qwen/Qwen3-8B", "--gpus", "9xQ"), "--gpus 9xQ")
    one_error(cli("plan", "--model", "Qwen/Qwen3-8B", "--data", str(tmp_path)), "not a prepared directory")
