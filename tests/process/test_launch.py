"""Launchers and the rendezvous, on this CPU: torchrun and accelerate launch of two ranks, launches
that would train each rank alone, a rank that diverges, a launch environment with no launcher, a
rank that never comes or never reaches the first collective, and a DeepSpeed config that
contradicts the flags."""

from __future__ import annotations

import os
import socket
import subprocess
import time

import pytest
from conftest import (
    BIN,
    LORA,
    RANK_MODULE,
    ROOT,
    SAMPLE,
    TWO,
    free_port,
    one_error,
    rank_env,
    read_metrics,
    run_cli,
    start_cli,
    start_python,
)

SHORT = [*LORA, "--data_path", SAMPLE, "--lora_dropout", "0"]


def no_sftkit_traceback(stderr: str) -> bool:
    """No frame of sftkit's code (a launcher may print its own traceback for a failed child)."""
    return f'File "{ROOT / "sftkit"}' not in stderr


def test_torchrun_on_a_cpu_is_a_real_two_rank_run(tmp_path):
    """torchrun sets WORLD_SIZE=2; without a GPU accelerate used to run each rank alone (NO). Each
    rank is the fresh `python -m sftkit` torchrun starts, as a user's are (most launcher tests fork
    their ranks from the warm server)."""
    out = tmp_path / "torchrun"
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", free_port(), "-m", "sftkit", "train",
           *SHORT, "--output_dir", str(out), "--max_steps", "2", "--save_steps", "0"]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_metrics(out)
    assert records[0]["world_size"] == 2 and records[0]["distributed_type"] == "MULTI_CPU"
    assert len(records[-1]["param_fingerprints"]) == 2 and records[-1]["ranks_in_sync"] is True


def test_multi_gpu_config_without_the_cpu_variable_still_trains_as_one(tmp_path):
    out = tmp_path / "ddp"
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    cmd = [str(BIN / "accelerate"), "launch", "--config_file", "accelerate_configs/multi_gpu.yaml", *TWO,
           "--main_process_port", free_port(), "-m", RANK_MODULE, "train", *SHORT, "--output_dir", str(out),
           "--max_steps", "2", "--save_steps", "0"]
    proc = subprocess.run(cmd, cwd=ROOT, env=rank_env(env), capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_metrics(out)
    assert records[0]["distributed_type"] == "MULTI_CPU" and records[-1]["ranks_in_sync"] is True


def test_accelerate_launch_that_starts_one_process_for_two_refuses(tmp_path):
    """`accelerate launch --num_processes 2` with no config file and no --multi_gpu starts ONE process."""
    proc = run_cli("train", *SHORT, "--output_dir", str(tmp_path / "one"), "--max_steps", "1",
                   launch=["--num_processes", "2"], check=False)
    assert proc.returncode != 0 and no_sftkit_traceback(proc.stderr)
    assert "error: accelerate launch was asked for several processes but started one" in proc.stderr
    assert not (tmp_path / "one" / "final").exists()


def test_deepspeed_batch_size_that_contradicts_the_flags(tmp_path):
    import json

    ds = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    ds["train_micro_batch_size_per_gpu"] = 2
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    yaml_text = (ROOT / "accelerate_configs" / "deepspeed_zero2.yaml").read_text()
    (tmp_path / "a.yaml").write_text(yaml_text.replace("ds_configs/zero2.json", str(tmp_path / "ds.json")))
    proc = run_cli("train", "--data_path", "data/sample_alpaca.json", "--output_dir", str(tmp_path / "o"),
                   "--per_device_train_batch_size", "4", "--max_steps", "1",
                   launch=["--config_file", str(tmp_path / "a.yaml"), "--num_processes", "1"], check=False)
    # accelerate's launcher reports the failed child with its own traceback; sftkit's is absent
    assert proc.returncode != 0 and f'File "{ROOT / "sftkit"}' not in proc.stderr
    assert "the DeepSpeed config sets train_micro_batch_size_per_gpu=2 but the flags give 4" in proc.stderr


def test_a_rank_that_diverges_fails_the_run_loudly(tmp_path):
    """Two processes started by hand as a launcher does (RANK, WORLD_SIZE, MASTER_ADDR), rank 1 with
    another learning rate: DDP averages the gradients, but the updates differ, and the end check
    of the ranks' weight fingerprints must stop the run instead of saving rank 0's weights as if."""
    out, port = tmp_path / "diverged", free_port()
    procs = []
    for rank, lr in (("0", "1e-3"), ("1", "2e-3")):
        env = {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port}
        procs.append(start_cli("train", *SHORT, "--output_dir", str(out), "--max_steps", "2", "--save_steps", "0",
                               "--learning_rate", lr, "--dataloader_num_workers", "0", env=env))
    results = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 2, err[-3000:]
        assert "ranks ended with different weights" in err and no_sftkit_traceback(err)
    assert read_metrics(out)[-1]["ranks_in_sync"] is False


@pytest.mark.parametrize("env", [{"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1"},
                                 {"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "127.0.0.1"},
                                 {"WORLD_SIZE": "2"}])
def test_a_launch_environment_without_a_launcher_is_refused_before_any_collective(env, tmp_path):
    """Left over from a launcher, these waited 2 hours for a rank that never came (or, alone, gave
    a traceback). The refusal comes before any model, process group or output: MASTER_PORT is a
    socket of the test's own, listening, and nothing connects to it (rank 1 would, to rank 0's
    store; rank 0 would fail to bind it and say something else)."""
    with socket.socket() as master:
        master.bind(("127.0.0.1", 0))
        master.listen()
        master.setblocking(False)
        if "MASTER_ADDR" in env:
            env = {**env, "MASTER_PORT": str(master.getsockname()[1])}
        for command in (["train", "--data_path", "data/sample_alpaca.json", "--output_dir", str(tmp_path / "o")],
                        ["eval", "--model", "tiny-qwen3", "--data_path", "data/sample_alpaca.json"]):
            proc = run_cli(*command, env=env, check=False, timeout=300)
            line = one_error(proc)
            assert proc.returncode == 2 and line.startswith("error: WORLD_SIZE=2 is set but no launcher started"), \
                proc.stderr[-3000:]
        with pytest.raises(BlockingIOError):  # no connection is waiting
            master.accept()
    assert not (tmp_path / "o").exists()


def test_a_rank_that_never_comes_times_out_in_the_set_minutes(tmp_path):
    """Rank 0 of two started by a launcher (its variables set: TORCHELASTIC_RUN_ID, as torchrun's
    agent sets it) with no rank 1: the rendezvous gives up after --ddp_timeout_minutes (here 0.05,
    3 s; it was 2 hours) with one line."""
    env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": free_port(),
           "TORCHELASTIC_RUN_ID": "test"}
    proc = run_cli("train", *SHORT, "--max_steps", "1", "--ddp_timeout_minutes", "0.05", "--output_dir",
                   str(tmp_path / "o"), env=env, check=False, timeout=300)
    assert proc.returncode == 2 and one_error(proc).startswith(
        "error: rank 0 waited 0.05 min at the rendezvous for the other ranks of WORLD_SIZE=2: rank 1 never arrived ("
    ), proc.stderr[-3000:]


@pytest.mark.parametrize("rank", ["0", "1"])
def test_a_launchers_variables_left_in_a_shell_stop_within_the_first_wait(rank, tmp_path):
    """WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT left from an earlier job, no launcher:
    rank 0 waits for ranks nobody starts, rank 1 for a store nobody serves; each stops once the
    first wait is over (here the run's 0.05-min time-out, shorter than accel.FIRST_WAIT_S), in one
    line naming the variables to unset, where it waited the whole time-out (30 min by default)."""
    env = {"WORLD_SIZE": "2", "RANK": rank, "LOCAL_RANK": rank, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": free_port()}
    began = time.monotonic()
    proc = run_cli("train", *SHORT, "--max_steps", "1", "--ddp_timeout_minutes", "0.05", "--output_dir",
                   str(tmp_path / "o"), env=env, check=False, timeout=300)
    line = one_error(proc)
    assert proc.returncode == 2 and line.startswith(f"error: WORLD_SIZE=2 and RANK={rank} are set but no launcher "
                                                    "started this process"), proc.stderr[-3000:]
    assert "unset WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT" in line and "within 3 s" in line
    assert time.monotonic() - began < 60


# rank 1 as a plain torch process: it joins the process group, then never reaches a collective
PEER = ("import datetime, time, torch.distributed as dist; "
        "dist.init_process_group('gloo', rank=1, world_size=2, timeout=datetime.timedelta(seconds=90)); "
        "print('joined', flush=True); time.sleep(90)")


def test_a_rank_that_joins_but_never_reaches_the_first_collective_is_named(tmp_path):
    """Rank 0 (sftkit) and a rank 1 that joins the group and then hangs: rank 0's first collective,
    a monitored barrier, gives up after --ddp_timeout_minutes (0.05 here, 3 s; it waited the whole
    time-out and printed gloo's traceback naming no rank) with one line naming rank 1. The whole
    rank 0 took 33 s in all here, most of it start-up."""
    env = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": free_port()}
    peer = start_python(PEER, env={**env, "RANK": "1"})
    try:
        proc = run_cli("train", *SHORT, "--max_steps", "1", "--ddp_timeout_minutes", "0.05", "--output_dir",
                       str(tmp_path / "o"), env={**env, "RANK": "0", "LOCAL_RANK": "0"}, check=False, timeout=300)
    finally:
        peer.kill()
        said, _ = peer.communicate()
    assert "joined" in said  # it passed the rendezvous: what timed out is the collective
    assert proc.returncode == 2 and one_error(proc).startswith(
        "error: rank 0 waited 0.05 min at the first collective for rank(s) 1 of 2, which never arrived"), proc.stderr
    assert "ProcessGroupGloo" not in proc.stderr  # gloo's own two lines of the same news are held back
