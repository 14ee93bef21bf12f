"""Two processes on this CPU under the real `accelerate launch`: DDP over gloo and DeepSpeed
ZeRO-2/3. Ranks must end in sync, and must match one process that sees the same global batch."""

from __future__ import annotations

import pytest

from conftest import read_metrics, run_cli

TRAIN = ["--use_lora", "--max_steps", "4", "--logging_steps", "1", "--learning_rate", "0.01",
         "--warmup_ratio", "0", "--save_steps", "0", "--lora_dropout", "0", "--max_length", "512"]
TWO = ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process with micro-batch 4: the reference for two processes with micro-batch 2."""
    out = tmp_path_factory.mktemp("dist") / "single"
    run_cli("train", "--data_path", "data/sample_alpaca.json", "--output_dir", str(out),
            "--per_device_train_batch_size", "4", *TRAIN)
    return read_metrics(out)


@pytest.mark.parametrize("config, env, kind", [
    ("multi_gpu", {"ACCELERATE_USE_CPU": "true"}, "MULTI_CPU"),
    ("deepspeed_zero2", {}, "DEEPSPEED"),
    ("deepspeed_zero3", {}, "DEEPSPEED"),
])
def test_two_processes(config, env, kind, single, tmp_path):
    out = tmp_path / config
    launch = ["--config_file", f"accelerate_configs/{config}.yaml", *TWO]
    run_cli("train", "--data_path", "data/sample_alpaca.json", "--output_dir", str(out),
            "--per_device_train_batch_size", "2", *TRAIN, launch=launch, env=env)
    records = read_metrics(out)
    assert records[0]["world_size"] == 2 and records[0]["distributed_type"] == kind
    end = records[-1]
    assert end["event"] == "end" and end["step"] == 4
    if config != "deepspeed_zero3":  # under ZeRO-3 each rank holds a slice, not a copy
        assert len(end["param_fingerprints"]) == 2 and end["ranks_in_sync"] is True
        assert end["param_fingerprints"][0] == pytest.approx(single[-1]["param_fingerprints"][0], rel=1e-5)
    losses = [r["loss"] for r in records if "loss" in r]
    reference = [r["loss"] for r in single if "loss" in r]
    assert losses == pytest.approx(reference, rel=1e-5)
    assert (out / "final" / "adapter_model.safetensors").is_file()
