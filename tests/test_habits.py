"""Everyday habits from other trainers, through the real CLI in subprocesses: torchrun and
accelerate launches that cannot silently train ranks alone, a reused output folder, resuming
(a finished run, a longer schedule), booleans written as HF scripts write them, a quiet terminal,
the demo, and file modes a serving user can read."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys

from conftest import BIN, ROOT, read_metrics, run_cli

SHORT = ["--data_path", "data/sample_alpaca.json", "--use_lora", "--max_length", "512", "--logging_steps", "1",
         "--lora_dropout", "0", "--per_device_train_batch_size", "4"]
TWO = ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def no_sftkit_traceback(stderr: str) -> bool:
    """No frame of sftkit's code (a launcher may print its own traceback for a failed child)."""
    return f'File "{ROOT / "sftkit"}' not in stderr


# ---- launches -----------------------------------------------------------------------------------
def test_torchrun_on_a_cpu_is_a_real_two_rank_run(tmp_path):
    """torchrun sets WORLD_SIZE=2; without a GPU accelerate used to run each rank alone (NO)."""
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
           "--main_process_port", free_port(), "-m", "sftkit", "train", *SHORT, "--output_dir", str(out),
           "--max_steps", "2", "--save_steps", "0"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
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


def test_a_rank_that_diverges_fails_the_run_loudly(tmp_path):
    """Two processes started by hand as a launcher does (RANK, WORLD_SIZE, MASTER_ADDR), rank 1 with
    another learning rate: DDP averages the gradients, but the updates differ, and the end check
    of the ranks' weight fingerprints must stop the run instead of saving rank 0's weights as if."""
    out, port = tmp_path / "diverged", free_port()
    procs = []
    for rank, lr in (("0", "1e-3"), ("1", "2e-3")):
        env = {**os.environ, "RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        cmd = [str(BIN / "sftkit"), "train", *SHORT, "--output_dir", str(out), "--max_steps", "2", "--save_steps", "0",
               "--learning_rate", lr, "--dataloader_num_workers", "0"]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 2, err[-3000:]
        assert "ranks ended with different weights" in err and no_sftkit_traceback(err)
    assert read_metrics(out)[-1]["ranks_in_sync"] is False


# ---- one folder, one run ------------------------------------------------------------------------
def test_a_used_folder_is_refused_overwritten_on_request_and_never_resumed_by_another_run(tmp_path):
    out, other = tmp_path / "a", tmp_path / "b"
    first = [*SHORT, "--max_steps", "2", "--save_steps", "1", "--learning_rate", "1e-3"]
    run_cli("train", *first, "--output_dir", str(out))
    proc = run_cli("train", *first, "--output_dir", str(out), check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "holds another run (checkpoint-1, checkpoint-2, final/)" in proc.stderr
    assert "--overwrite_output_dir" in proc.stderr and "--resume_from_checkpoint latest" in proc.stderr
    proc = run_cli("train", *first[:-1], "3e-3", "--output_dir", str(out), "--resume_from_checkpoint", "latest",
                   check=False)
    assert proc.returncode == 2 and "belong to another run (changed: learning_rate 0.001 -> 0.003)" in proc.stderr
    # latest skips a checkpoint of another run that sits in the folder (a newer step, copied in)
    run_cli("train", *SHORT, "--max_steps", "3", "--save_steps", "1", "--learning_rate", "2e-3", "--output_dir", str(other))
    shutil.copytree(other / "checkpoint-3", out / "checkpoint-9")
    proc = run_cli("train", *first, "--output_dir", str(out), "--resume_from_checkpoint", "latest")
    assert f"{out}/checkpoint-2 is step 2, and these options give 2 steps: the run has finished" in proc.stdout
    run_cli("train", *first, "--output_dir", str(out), "--overwrite_output_dir", "true")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert read_metrics(out)[0]["resumed_from_step"] is None


def test_resume_says_what_it_continues_and_refuses_to_bend_the_schedule(tmp_path):
    out = tmp_path / "r"
    args = [*SHORT, "--output_dir", str(out), "--save_steps", "2", "--learning_rate", "1e-3"]
    run_cli("train", *args, "--max_steps", "4")
    proc = run_cli("train", *args, "--max_steps", "4", "--resume_from_checkpoint", "latest")
    assert proc.returncode == 0 and "the run has finished; nothing to resume" in proc.stdout
    proc = run_cli("train", *args, "--max_steps", "6", "--resume_from_checkpoint", str(out / "checkpoint-2"),
                   check=False)
    assert proc.returncode == 2 and "resuming would bend the learning-rate schedule" in proc.stderr
    assert "--max_steps 4" in proc.stderr
    # a constant schedule without warm-up can run longer: nothing bends
    flat = [*args, "--lr_scheduler_type", "constant", "--warmup_ratio", "0"]
    run_cli("train", *flat, "--max_steps", "2", "--overwrite_output_dir")
    proc = run_cli("train", *flat, "--max_steps", "4", "--resume_from_checkpoint", "latest", "--logging_steps", "2")
    assert f"resuming from {out}/checkpoint-2: step 2 of 4" in proc.stdout
    assert "changed since that checkpoint: max_steps 2 -> 4; logging_steps 1 -> 2" in proc.stdout


# ---- inputs, flags, help ------------------------------------------------------------------------
def test_custom_columns_it_does_not_know_and_an_output_dir_that_is_a_file(tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"ask": "hi", "reply": "hello"}) + "\n")
    proc = run_cli("prepare-data", "--data_path", str(data), "--format_type", "custom",
                   "--output_dir", str(tmp_path / "p"), check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert f"{data}:line 1:" in proc.stderr and "--field_map instruction=COLUMN,output=COLUMN" in proc.stderr
    (tmp_path / "taken").write_text("a file")
    for command in (["train", *SHORT], ["prepare-data", "--data_path", "data/sample_alpaca.json"]):
        proc = run_cli(*command, "--output_dir", str(tmp_path / "taken"), check=False)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
        assert f"--output_dir {tmp_path / 'taken'} is a file" in proc.stderr


def test_booleans_as_hf_scripts_write_them_and_devices_that_cannot_work(tmp_path):
    out = tmp_path / "b"
    run_cli("train", "--data_path", "data/sample_alpaca.json", "--use_lora", "True", "--fused_adamw", "false",
            "--max_steps", "1", "--save_steps", "0", "--output_dir", str(out), "--max_length", "512")
    saved = (out / "config.yaml").read_text()
    assert "use_lora: true" in saved and "fused_adamw: false" in saved
    proc = run_cli("train", "--data_path", "data/sample_alpaca.json", "--use_lora", "maybe", check=False)
    assert proc.returncode == 2 and "--use_lora maybe: expected true or false" in proc.stderr
    proc = run_cli("train", *SHORT, "--fp16", "--output_dir", str(tmp_path / "f"), check=False)
    assert proc.returncode == 2 and "--fp16 needs a CUDA GPU" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("train", *SHORT, "--bf16", "--max_steps", "1", "--save_steps", "0", "--output_dir", str(tmp_path / "h"))
    assert "note: bf16 on a CPU is emulated" in proc.stdout


def test_help_shows_every_default_and_fits_80_columns():
    import dataclasses

    from sftkit.config import SFTConfig
    from sftkit.options import default_of

    text = run_cli("train", "--help", env={"COLUMNS": "80"}).stdout
    names = [line.split()[1] for line in text.splitlines() if line.startswith("│ --")]
    assert "--per_device_train_batch_size" in names and not [n for n in names if "…" in n]
    squeezed = "".join(text.replace("│", "").split())  # rich wraps help text, even inside a long value
    for f in dataclasses.fields(SFTConfig):
        value = default_of(f)
        if value not in (None, [], ""):
            shown = ",".join(map(str, value)) if isinstance(value, list) else str(value)
            assert f"[default:{shown}]" in squeezed, f.name


# ---- quiet, honest output -----------------------------------------------------------------------
def test_a_train_run_prints_no_third_party_warnings(tmp_path):
    """LoRA on the tied tiny model with a checkpoint: accelerate's 'Removed shared tensor', PEFT's
    deprecation warning, DeepSpeed's 'Setting accelerator to CPU' and the weight-loading bars all
    used to print. --verbose shows them again (so this test can fail)."""
    args = [*SHORT, "--max_steps", "2", "--save_steps", "1"]
    quiet = run_cli("train", *args, "--output_dir", str(tmp_path / "q"), fresh=True)  # import-time lines too
    assert quiet.stderr.strip() == "", quiet.stderr
    for noise in ("Setting accelerator to CPU", "Removed shared tensor", "Loading weights", "Writing model shards",
                  "Failed to load CPU gemm_4bit_forward"):  # the last: bitsandbytes, when installed, imported by PEFT
        assert noise not in quiet.stdout
    loud = run_cli("train", *args, "--output_dir", str(tmp_path / "v"), "--verbose", fresh=True)
    # a LoRA checkpoint no longer holds the tied (frozen) embedding, so accelerate's "Removed shared
    # tensor" is gone from this run; DeepSpeed's line at import still shows that --verbose lets noise through
    assert "Setting accelerator to CPU" in loud.stdout + loud.stderr


def test_saved_models_are_readable_by_other_users(tmp_path):
    """Under the usual umask 022: 0644 files and 0755 folders, as save_pretrained alone would make."""
    mask = os.umask(0o022)
    try:
        out = tmp_path / "m"
        run_cli("train", *SHORT, "--max_steps", "1", "--save_steps", "1", "--output_dir", str(out))
        run_cli("merge-lora", "--adapter", str(out / "final"), "--output_dir", str(tmp_path / "merged"))
    finally:
        os.umask(mask)
    for d in (out / "final", out / "checkpoint-1", tmp_path / "merged"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o755, d
        for f in d.rglob("*"):
            assert stat.S_IMODE(f.stat().st_mode) == (0o755 if f.is_dir() else 0o644), f


def test_the_demo_shows_that_the_chain_learned(tmp_path):
    """README's first command after setup: the merged model answers the trained prompts with the
    trained replies (the base model does not), and nothing third-party is printed."""
    proc = subprocess.run(["bash", "scripts/demo.sh"], cwd=ROOT, env={**os.environ, "OUT": str(tmp_path / "demo")},
                          capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.strip() == "", proc.stderr
    assert "the base model vs the merged (fine-tuned) model" in proc.stdout
    # the demo's last line is computed from its numbers, and the README quotes what it prints
    sys.path.insert(0, str(ROOT / "scripts"))
    from demo_compare import describe, run_numbers

    said = describe(*run_numbers(tmp_path / "demo" / "run"))
    assert said in " ".join(proc.stdout.split())
    quoted = re.search(r"\n((?:> .*\n)+)", (ROOT / "README.md").read_text()).group(1)
    assert " ".join(quoted.replace("> ", " ").split()) == said
    rows = json.loads((tmp_path / "demo" / "compare.json").read_text())
    assert len(rows) == 4 and all(r["merged"] == r["trained_reply"] for r in rows)
    assert not any(r["base"] == r["trained_reply"] for r in rows)
