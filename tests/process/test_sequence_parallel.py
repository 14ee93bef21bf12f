"""Sequence parallelism (Ulysses, --sequence_parallel_size): a packed row's tokens split over the
processes of a group, attention over heads by all-to-all, on this CPU over gloo. Sequence
parallel 2 must train what sequence parallel 1 trains: the loss and every gradient of a packed
row of several examples (2 ranks under torchrun), and a whole run under `accelerate launch`."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import (
    BIN,
    EXACT,
    RANK_MODULE,
    ROOT,
    SAMPLE,
    TWO,
    rank_env,
    read_metrics,
    run_cli,
    stopped_at,
    warm_server,
)
from safetensors.torch import load_file


def test_sequence_parallel_2_gives_the_loss_and_every_gradient_of_1(tmp_path):
    """2 ranks, one packed row of 5 examples (103 tokens, one of them a single token), float64 on
    the plain loss path: loss and every parameter's gradient (summed over the ranks) against the
    unsplit row. The same shards with the row's boundaries dropped must give another loss."""
    out = tmp_path / "check.json"
    # torchrun (its console script is this module's main()) and its ranks forked from the warm server
    proc = warm_server().run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", RANK_MODULE,
                              "--script", str(ROOT / "tests" / "sequence_parallel_check.py"), str(out)],
                             rank_env(), ROOT, 600, module="torch.distributed.run")
    assert proc.returncode == 0, proc.stderr[-5000:]
    got = json.loads(out.read_text())
    assert got["row_tokens"] == 103 and got["shard_tokens"] == 52
    assert got["targets"] == got["want_targets"] > 0
    assert got["loss"] == pytest.approx(got["want_loss"], rel=1e-12)
    assert got["grad_names"] == got["want_names"] and len(got["grad_names"]) == 24
    assert got["worst_grad_rel"] < 1e-10, got["worst_grad_rel"]  # measured 7.7e-16
    assert abs(got["blind_loss"] - got["want_loss"]) > 1e-3 * got["want_loss"], got


TRAIN = ["--data_path", SAMPLE, "--use_lora", "--max_steps", "3", "--logging_steps", "1", *EXACT, "--save_steps", "0",
         "--lora_dropout", "0", "--max_length", "256", "--packing", "--per_device_train_batch_size", "2"]


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    """The reference: one process, micro-batch 2 rows (packed into one padding-free row)."""
    out = tmp_path_factory.mktemp("sp") / "one"
    run_cli("train", *TRAIN, "--attn_implementation", "varlen", "--output_dir", str(out))
    return out


def test_a_run_with_sequence_parallel_2_trains_the_steps_of_one_process(one, tmp_path):
    two = tmp_path / "two"
    # with gradient checkpointing too: the recompute runs the all-to-alls again, in the same order on both ranks
    run_cli("train", *TRAIN, "--sequence_parallel_size", "2", "--gradient_checkpointing", "--output_dir", str(two),
            launch=["--config_file", "accelerate_configs/multi_gpu.yaml", *TWO], env={"ACCELERATE_USE_CPU": "true"})
    start, end = read_metrics(two)[0], read_metrics(two)[-1]
    assert start["world_size"] == 2 and start["sequence_parallel_size"] == 2 and start["attention"] == "varlen"
    assert start["packing_check"] == {"skipped": "sequence parallelism: each row is split over processes"}
    assert end["event"] == "end" and end["step"] == 3 and end["ranks_in_sync"] is True
    losses = [[r["loss"] for r in read_metrics(o) if "loss" in r] for o in (one, two)]
    assert len(losses[0]) == 3 and losses[1] == pytest.approx(losses[0], rel=1e-5)
    # each rank held half of every row: the ranks' tokens add up to the row's (copies would double them)
    counts = [[(r["tokens"], r["supervised_tokens"]) for r in read_metrics(o) if "loss" in r] for o in (one, two)]
    assert counts[1] == counts[0]
    norms = [[r["grad_norm"] for r in read_metrics(o) if "grad_norm" in r] for o in (one, two)]
    assert norms[1] == pytest.approx(norms[0], rel=1e-5)
    got, want = (load_file(o / "final" / "adapter_model.safetensors") for o in (two, one))
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-7)


def test_sequence_parallel_under_fsdp2_with_cpu_offload_trains_the_steps_of_one_process(one, tmp_path):
    """FSDP2 (fsdp2_offload.yaml: the shards in CPU memory, the optimizer stepping there) sharding
    the weights over the 2 processes that also split each row."""
    two = tmp_path / "fsdp2"
    run_cli("train", *TRAIN, "--sequence_parallel_size", "2", "--output_dir", str(two),
            launch=["--config_file", "accelerate_configs/fsdp2_offload.yaml", *TWO], env={"ACCELERATE_USE_CPU": "true"})
    start = read_metrics(two)[0]
    assert start["distributed_type"] == "FSDP" and start["fsdp_cpu_offload"] is True
    assert start["sequence_parallel_size"] == 2
    steps = [[(r["tokens"], r["supervised_tokens"], r["loss"]) for r in read_metrics(o) if "loss" in r] for o in (one, two)]
    assert [s[:2] for s in steps[1]] == [s[:2] for s in steps[0]]
    assert [s[2] for s in steps[1]] == pytest.approx([s[2] for s in steps[0]], rel=1e-5)
    got, want = (load_file(o / "final" / "adapter_model.safetensors") for o in (two, one))
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-7)


def test_four_processes_are_two_data_parallel_groups_of_two(one, tmp_path):
    """4 processes with --sequence_parallel_size 2: ranks 0-1 share one row, ranks 2-3 the next;
    the step's 2 rows are those one process with micro-batch 2 trains."""
    four = tmp_path / "four"
    base = [x for x in TRAIN if x != "2"] + ["1"]  # micro-batch 1 row a data-parallel group
    assert base.count("--per_device_train_batch_size") == 1 and base[-2:] == ["--per_device_train_batch_size", "1"]
    run_cli("train", *base, "--sequence_parallel_size", "2", "--output_dir", str(four),
            launch=["--config_file", "accelerate_configs/multi_gpu.yaml", *TWO[:1], "4", *TWO[2:]],
            env={"ACCELERATE_USE_CPU": "true"})
    start, end = read_metrics(four)[0], read_metrics(four)[-1]
    assert start["world_size"] == 4 and start["sequence_parallel_size"] == 2
    assert end["step"] == 3 and end["ranks_in_sync"] is True and len(end["param_fingerprints"]) == 4
    steps = [[(r["tokens"], r["supervised_tokens"], r["loss"]) for r in read_metrics(o) if "loss" in r] for o in (one, four)]
    assert [s[:2] for s in steps[1]] == [s[:2] for s in steps[0]]
    assert [s[2] for s in steps[1]] == pytest.approx([s[2] for s in steps[0]], rel=1e-5)


def test_a_sequence_parallel_run_resumes_exactly(tmp_path):
    """Resumed from checkpoint-2 of 4, steps 3-4 and the final adapter are the uninterrupted run's, bit for bit."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    args = [*TRAIN, "--max_steps", "4", "--save_steps", "2", "--learning_rate", "1e-3", "--sequence_parallel_size", "2"]
    launch = {"launch": ["--config_file", "accelerate_configs/multi_gpu.yaml", *TWO],
              "env": {"ACCELERATE_USE_CPU": "true"}}
    run_cli("train", *args, "--output_dir", str(whole), **launch)
    stopped_at(whole, resumed, 2)  # as a crash after step 2 left it
    proc = run_cli("train", *args, "--output_dir", str(resumed), "--resume_from_checkpoint", "latest", **launch)
    assert f"resuming from {resumed / 'checkpoint-2'}: step 2 of 4" in proc.stdout
    losses = [[(r["step"], r["loss"]) for r in read_metrics(o) if "loss" in r] for o in (whole, resumed)]
    assert losses[1] == losses[0] and len(losses[0]) == 4
    assert (resumed / "final" / "adapter_model.safetensors").read_bytes() == \
        (whole / "final" / "adapter_model.safetensors").read_bytes()


def test_what_sequence_parallelism_cannot_split_is_one_line(tmp_path):
    proc = run_cli("train", *TRAIN, "--sequence_parallel_size", "2", "--output_dir", str(tmp_path / "o"), check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        "error: --sequence_parallel_size 2 must divide the 1 processes; launch a multiple of 2 (--num_processes) "
        "or pick a divisor of 1") and "Traceback" not in proc.stderr, proc.stderr
    no_packing = [x for x in TRAIN if x != "--packing"]
    proc = run_cli("train", *no_packing, "--sequence_parallel_size", "2", "--output_dir", str(tmp_path / "o"),
                   check=False)
    assert proc.returncode == 2 and "add --packing" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()
