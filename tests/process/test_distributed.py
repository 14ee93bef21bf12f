"""Two processes on this CPU under the real `accelerate launch`: DDP over gloo, DeepSpeed ZeRO-2,
ZeRO-3 (every parameter partitioned) and ZeRO-3 with CPU offload, and two machines on loopback.
Each must match one process that sees the same global batch: losses and final weights."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import (
    BIN,
    EXACT,
    RANK_MODULE,
    ROOT,
    SAMPLE,
    TWO,
    built_once,
    final_weights,
    free_port,
    losses,
    predicted_peak_holds,
    rank_env,
    read_metrics,
    run_cli,
    warm_server,
)

TRAIN = ["--use_lora", "--max_steps", "4", "--logging_steps", "1", *EXACT, "--save_steps", "0", "--lora_dropout", "0",
         "--max_length", "512"]  # EXACT: rtol 1e-5 on the weights is meaningful


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process with micro-batch 8: the reference for two processes with micro-batch 4."""
    def build(folder):
        run_cli("train", "--data_path", SAMPLE, "--output_dir", str(folder / "run"), "--per_device_train_batch_size",
                "8", *TRAIN)

    return built_once(tmp_path_factory, "single", build) / "run"


@pytest.fixture(scope="module")
def single_plain(tmp_path_factory):
    """The reference for ZeRO-3, which always takes the plain loss path (its lm_head weight is a
    partition outside the module's forward): the fused path differs by float round-off (1e-5)."""
    def build(folder):
        run_cli("train", "--data_path", SAMPLE, "--output_dir", str(folder / "run"), "--per_device_train_batch_size",
                "8", "--loss_chunk_size", "0", *TRAIN)

    return built_once(tmp_path_factory, "single_plain", build) / "run"


def zero3_config(tmp_path, ds_name: str) -> str:
    """Our zero3 JSON with stage3_param_persistence_threshold 0: on a tiny model the default
    (10 x hidden) would keep every small tensor whole on each rank, and partitioning go untested."""
    ds = json.loads((ROOT / "ds_configs" / f"{ds_name}.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    yaml_text = (ROOT / "accelerate_configs" / "deepspeed_zero3.yaml").read_text()
    (tmp_path / "accelerate.yaml").write_text(yaml_text.replace("ds_configs/zero3.json", str(tmp_path / "ds.json")))
    return str(tmp_path / "accelerate.yaml")


@pytest.mark.parametrize("config, kind, rtol", [
    ("multi_gpu", "MULTI_CPU", 1e-5),
    ("deepspeed_zero2", "DEEPSPEED", 1e-4),
    ("zero3", "DEEPSPEED", 1e-4),
    ("zero3_offload", "DEEPSPEED", 1e-4),
])
def test_two_processes_match_one(config, kind, rtol, request, tmp_path):
    out = tmp_path / config
    single = request.getfixturevalue("single_plain" if config.startswith("zero3") else "single")
    config_file = zero3_config(tmp_path, config) if config.startswith("zero3") else f"accelerate_configs/{config}.yaml"
    env = {"ACCELERATE_USE_CPU": "true"} if config == "multi_gpu" else {}
    # DDP as 2 ranks x 2 x 2 accumulation: the split of the global batch 8 must not change a step
    split = ["2", "--gradient_accumulation_steps", "2"] if config == "multi_gpu" else ["4"]
    # DDP's ranks are the fresh processes accelerate launch starts, as a user's are (the others are
    # forked from the warm server: the same code after the same imports)
    proc = run_cli("train", "--data_path", SAMPLE, "--output_dir", str(out), "--per_device_train_batch_size", *split,
                   *TRAIN, launch=["--config_file", config_file, *TWO], env=env, fresh=config == "multi_gpu")
    assert "FutureWarning" not in proc.stderr, proc.stderr[-2000:]  # DeepSpeed's deprecated collectives are quiet
    assert "shm_comm" not in proc.stdout + proc.stderr  # nor does DeepSpeed compile its inference all-reduce
    records = read_metrics(out)
    assert records[0]["world_size"] == 2 and records[0]["distributed_type"] == kind
    assert records[0]["fused_loss"] is not config.startswith("zero3")
    end = records[-1]
    assert end["event"] == "end" and end["step"] == 4
    if not config.startswith("zero3"):  # under ZeRO-3 each rank holds a slice, not a copy
        assert len(end["param_fingerprints"]) == 2 and end["ranks_in_sync"] is True
    if config == "multi_gpu":  # fresh ranks: their resident memory is a user's (tests/process/test_plan_memory.py)
        assert "buckets" in predicted_peak_holds(out)["parts_mb"]
    assert losses(out) == pytest.approx(losses(single), rel=rtol)
    got, ref = final_weights(out), final_weights(single)
    assert got.keys() == ref.keys() and all(t.numel() > 0 for t in got.values())
    for name, tensor in ref.items():
        torch.testing.assert_close(got[name], tensor, rtol=rtol, atol=1e-7)
    if config == "zero3":  # the gathered ZeRO-3 adapter is a real adapter: merge-lora takes it
        proc = run_cli("merge-lora", "--adapter", str(out / "final"), "--output_dir", str(tmp_path / "merged"))
        assert "max |logit difference|" in proc.stdout


def test_one_process_with_accumulation_matches(single, tmp_path):
    """1 x 8 accumulation trains what 8 x 1 trains (and 2 ranks x 2 x 2 above), with length
    grouping on (the default): 50 examples, 7 steps an epoch, so grouping could move examples
    between steps (8x1 and 1x8 were 8% apart over 3 steps before grouping was bounded by steps)."""
    out = tmp_path / "accumulated"
    run_cli("train", "--data_path", SAMPLE, "--output_dir", str(out),
            "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "8", *TRAIN)
    assert losses(out) == pytest.approx(losses(single), rel=1e-5)
    # atol 1e-5 of each tensor's largest entry: 1 x 8 pads nothing and 8 x 1 pads to the longest,
    # so the kernels sum in other orders; the round-off measured 3.6e-7 of 0.135 (2.7e-6)
    ref = final_weights(single)
    for name, tensor in final_weights(out).items():
        torch.testing.assert_close(tensor, ref[name], rtol=1e-5, atol=1e-5 * ref[name].abs().max().item())


def test_two_machines_on_loopback(single, tmp_path):
    """Multi-node through accelerate's own launcher: two launches, machine rank 0 and 1, one
    process each, rendezvous on 127.0.0.1. They train together and match the single process."""
    port = free_port()
    out = tmp_path / "nodes"
    env = rank_env({**os.environ, "ACCELERATE_USE_CPU": "true"})
    procs = []
    for machine_rank in ("0", "1"):  # each launcher and its rank forked from the warm server
        cmd = [str(BIN / "accelerate"), "launch", "--config_file", "accelerate_configs/multi_gpu.yaml",
               "--num_processes", "2", "--num_machines", "2", "--machine_rank", machine_rank,
               "--main_process_ip", "127.0.0.1", "--main_process_port", port, "--mixed_precision", "no",
               "--dynamo_backend", "no", "-m", RANK_MODULE, "train", "--data_path", SAMPLE,
               "--output_dir", str(out), "--per_device_train_batch_size", "4", *TRAIN]
        procs.append(warm_server().start(cmd, env, ROOT, None, module="accelerate.commands.accelerate_cli"))
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    records = read_metrics(out)
    assert records[0]["world_size"] == 2 and records[0]["distributed_type"] == "MULTI_CPU"
    assert records[-1]["ranks_in_sync"] is True
    assert losses(out) == pytest.approx(losses(single), rel=1e-5)
    for name, tensor in final_weights(single).items():
        torch.testing.assert_close(final_weights(out)[name], tensor, rtol=1e-5, atol=1e-7)
