"""Round two of faults (issue 23), each tried as an operator would on the real CLI: one writer per
output folder (a live run is never harmed by a second command), pruning only this run's
checkpoints, eval never writing into what it reads, a glob input checked against the output, a
failed final save that a rerun completes, and a learning rate or max_length changed between
commands that is applied or refused, never ignored.

One live run (`live`, 24 steps) serves every trial that needs a run: the refused commands are
tried while it trains, and the later trials start from copies of its checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import BIN, ROOT, read_metrics, run_cli, tmpfs

from sftkit.checkpoint import checksums, damage, list_checkpoints

ARGS = ["--data_path", "data/sample_alpaca.json", "--use_lora", "--per_device_train_batch_size", "2",
        "--lr_scheduler_type", "constant", "--warmup_ratio", "0", "--learning_rate", "1e-3", "--max_length", "512",
        "--logging_steps", "1", "--seed", "7"]
STEPS = 24  # long enough (~1 s a step here) to outlive the commands tried against it


def _start(out, *extra, new_session: bool = False):
    return subprocess.Popen([str(BIN / "sftkit"), "train", *ARGS, "--output_dir", str(out), *extra], cwd=ROOT,
                            env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=new_session)


def _command(*args):
    return subprocess.Popen([str(BIN / "sftkit"), *args], cwd=ROOT, env=dict(os.environ), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _one_error(result_or_proc) -> str:
    """The one error line. (Only that is asserted: bitsandbytes 0.49 prints a line of its own on
    stderr where the `kernels` package is missing, which is not sftkit's to hide.)"""
    text = getattr(result_or_proc, "stderr", None) or getattr(result_or_proc, "output", "")
    errors = [x for x in text.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in text and text.strip().endswith(errors[0]), text[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """Two trains started at once into one folder; while the winner trains: a resume, a merge
    with --overwrite_output_dir and a prepare-data into its folder. What each said, and the run."""
    d = tmp_path_factory.mktemp("round_two")
    out = d / "run"
    extra = ["--max_steps", str(STEPS), "--save_steps", "3", "--save_total_limit", "3"]
    first, second = _start(out, *extra), _start(out, *extra)
    deadline = time.time() + 300
    while time.time() < deadline and first.poll() is None and second.poll() is None:
        time.sleep(0.05)
    loser = second if second.poll() is not None else first
    _, loser_err = loser.communicate(timeout=120)
    winner = first if loser is second else second
    while time.time() < deadline and not list_checkpoints(out) and winner.poll() is None:
        time.sleep(0.05)
    seen = {"loser": (loser.returncode, loser_err), "winner_pid": winner.pid,
            "checkpoints_before": [p.name for p in list_checkpoints(out)]}
    # the three at once, each a real `sftkit` process, while the winner trains
    tried = {"resume": _start(out, *extra, "--resume_from_checkpoint", "latest"),
             "merge": _command("merge-lora", "--adapter", str(list_checkpoints(out)[0]), "--output_dir", str(out),
                               "--overwrite_output_dir"),
             "prepare": _command("prepare-data", "--data_path", "data/sample_alpaca.json", "--output_dir", str(out))}
    for name, proc in tried.items():
        _, err = proc.communicate(timeout=300)
        seen[name] = subprocess.CompletedProcess([], proc.returncode, "", err)
    seen["alive_after"] = winner.poll() is None
    said, err = winner.communicate(timeout=600)
    seen["winner"] = (winner.returncode, said, err)
    return out, seen


def test_one_writer_per_folder_and_the_live_run_is_unharmed(live):
    out, seen = live
    code, err = seen["loser"]
    assert code == 2, err[-3000:]
    refusal = f"is in use by a live run (sftkit train, pid {seen['winner_pid']} on host "
    assert refusal in _one_error(subprocess.CompletedProcess([], code, "", err))
    assert seen["alive_after"], "the run ended before the other commands were tried: nothing was shown"
    assert seen["checkpoints_before"], "no checkpoint was there to harm"
    for name in ("resume", "merge", "prepare"):
        result = seen[name]
        assert result.returncode == 2, (name, result.stderr[-3000:])
        assert refusal in _one_error(result), name
    code, said, err = seen["winner"]
    assert code == 0 and f"done: {STEPS} steps" in said, err[-3000:]
    kept = list_checkpoints(out)
    assert [p.name for p in kept] == [f"checkpoint-{s}" for s in (18, 21, 24)]
    assert all(damage(p) is None for p in kept) and (out / "final" / "adapter_model.safetensors").is_file()
    steps = [r["step"] for r in read_metrics(out) if "loss" in r]
    assert steps == list(range(1, STEPS + 1))  # one writer: no line of another run, none twice
    assert not list(out.glob(".*.tmp")) and not (out / ".sftkit.lock").exists()


def _copy_run(out, dest, keep: tuple[int, ...]):
    shutil.copytree(out, dest, ignore=shutil.ignore_patterns("final"))
    for ckpt in list_checkpoints(dest):
        if int(ckpt.name.split("-")[1]) not in keep:
            shutil.rmtree(ckpt)
    return dest


def test_pruning_keeps_another_runs_checkpoint_and_this_runs_newest(live, tmp_path):
    """The issue's trial: a foreign checkpoint of a later step beside this run's, then a resume
    with --save_total_limit 1. Before: it deleted this run's checkpoints as soon as written."""
    out, _ = live
    run = _copy_run(out, tmp_path / "prune", keep=(18, 21))
    foreign = run / "checkpoint-30"  # another run's: another identity, intact
    shutil.copytree(out / "checkpoint-24", foreign)
    state = json.loads((foreign / "trainer_state.json").read_text())
    (foreign / "trainer_state.json").write_text(json.dumps({**state, "step": 30, "run_id": "0" * 16}))
    (foreign / "checksums.json").unlink()
    (foreign / "checksums.json").write_text(json.dumps(checksums(foreign)))
    assert damage(foreign) is None
    before = {p.relative_to(foreign): p.read_bytes() for p in foreign.rglob("*") if p.is_file()}
    proc = run_cli("train", *ARGS, "--max_steps", "23", "--save_steps", "1", "--save_total_limit", "1",
                   "--output_dir", str(run), "--resume_from_checkpoint", "latest")
    assert f"resuming from {run / 'checkpoint-21'}: step 21 of 23" in proc.stdout
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-23", "checkpoint-30"]
    assert {p.relative_to(foreign): p.read_bytes() for p in foreign.rglob("*") if p.is_file()} == before


def test_eval_writes_beside_the_model_never_into_a_checkpoint_or_onto_its_data(live, tmp_path):
    out, _ = live
    run = _copy_run(out, tmp_path / "evals", keep=(24,))
    ckpt = run / "checkpoint-24"
    run_cli("eval", "--model", str(ckpt), "--data_path", "data/sample_alpaca.json", "--max_length", "512")
    assert json.loads((run / "eval" / "eval.json").read_text())["model"] == str(ckpt)
    assert damage(ckpt) is None and list_checkpoints(run) == [ckpt]
    # a model named by id, run in the data's folder, with the data named eval.json
    data = tmp_path / "here" / "eval.json"
    data.parent.mkdir()
    shutil.copy(ROOT / "data" / "sample_alpaca.json", data)
    rows = data.read_bytes()
    proc = subprocess.run([str(BIN / "sftkit"), "eval", "--model", "tiny-qwen3", "--data_path", "eval.json",
                           "--max_length", "512"], cwd=data.parent, env=dict(os.environ), capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert data.read_bytes() == rows and json.loads((data.parent / "eval" / "eval.json").read_text())["loss"] > 0
    # an --output_dir that is the checkpoint, or the data's own folder, is refused in one line
    for target, inputs in ((ckpt, str(ckpt)), (data.parent, str(data))):
        proc = run_cli("eval", "--model", inputs if target == ckpt else "tiny-qwen3", "--data_path", str(data),
                       "--output_dir", str(target), check=False)
        assert proc.returncode == 2 and "would overwrite an input" in _one_error(proc), proc.stderr[-3000:]
    assert damage(ckpt) is None and data.read_bytes() == rows


def test_a_glob_input_is_checked_against_the_output(tmp_path):
    proj = tmp_path / "proj"
    proj.mkdir()
    shutil.copy(ROOT / "data" / "sample_alpaca.json", proj / "rows.json")
    (proj / "config.yaml").write_text("mine: true\n")
    for command in ("prepare-data", "train"):
        proc = run_cli(command, "--data_path", f"{proj}/*.json", "--output_dir", str(proj), check=False)
        assert proc.returncode == 2 and f"would overwrite an input ({proj / 'rows.json'})" in _one_error(proc), \
            proc.stderr[-3000:]
    assert sorted(p.name for p in proj.iterdir()) == ["config.yaml", "rows.json"]
    assert (proj / "config.yaml").read_text() == "mine: true\n"


def _size(folder) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs to fill needs root")
def test_a_full_disk_during_the_final_save_is_resumable(live, tmp_path):
    """--save_steps 0: the last step's checkpoint is kept until final/ is complete. The tmpfs holds
    that checkpoint (sized from the live run's, same model) and half of final/."""
    out, _ = live
    need = _size(out / "checkpoint-24") + _size(out / "final") // 2 + 2 * 2**20  # + config, metrics, tmpfs blocks
    with tmpfs(tmp_path / "disk", f"size={need}") as disk:
        run = disk / "run"
        proc = run_cli("train", *ARGS, "--max_steps", "2", "--save_steps", "0", "--output_dir", str(run), check=False)
        assert proc.returncode == 2
        assert _one_error(proc) == (f"error: saving final/ failed (No space left on device); {run / 'checkpoint-2'} "
                                    "is intact: free space and rerun with --resume_from_checkpoint latest, which "
                                    "writes final/")
        assert not list(run.glob(".*")) and not (run / "final").exists() and damage(run / "checkpoint-2") is None
        shutil.copytree(run, tmp_path / "roomy")  # more space: what survived, elsewhere
    roomy = tmp_path / "roomy"
    proc = run_cli("train", *ARGS, "--max_steps", "2", "--save_steps", "0", "--output_dir", str(roomy),
                   "--resume_from_checkpoint", "latest")
    assert "its steps are done but final/ was not written (its save failed): writing it now" in proc.stdout
    assert (roomy / "final" / "adapter_model.safetensors").is_file() and not list_checkpoints(roomy)
    assert [r["step"] for r in read_metrics(roomy) if "loss" in r] == [1, 2]
    again = run_cli("train", *ARGS, "--max_steps", "2", "--save_steps", "0", "--output_dir", str(roomy),
                    "--resume_from_checkpoint", "latest")
    assert "has finished" in again.stdout and "nothing to resume" in again.stdout


def test_a_new_learning_rate_at_resume_is_applied_and_a_short_max_length_refused(live, tmp_path):
    out, _ = live
    run = _copy_run(out, tmp_path / "lr", keep=(21,))
    proc = run_cli("train", *ARGS, "--learning_rate", "5e-4", "--max_steps", str(STEPS),  # the last one counts
                   "--save_steps", "0", "--output_dir", str(run), "--resume_from_checkpoint", str(run / "checkpoint-21"))
    assert proc.stdout.count("these values apply from here on: learning_rate 0.001 -> 0.0005;") == 1  # said once
    lrs = {r["step"]: r["lr"] for r in read_metrics(run) if "loss" in r}
    assert [lrs[s] for s in (20, 21)] == [1e-3, 1e-3] and [lrs[s] for s in (22, 23, 24)] == [5e-4] * 3
    # a prepared set's examples longer than train's --max_length: refused before the model loads
    prepared = tmp_path / "prepared"
    run_cli("prepare-data", "--data_path", "data/sample_alpaca.json", "--max_length", "512", "--output_dir",
            str(prepared))
    longest = json.loads((prepared / "manifest.json").read_text())["length"]["max"]
    proc = run_cli("train", "--data_path", str(prepared), "--max_length", "16", "--output_dir", str(tmp_path / "short"),
                   check=False)
    assert proc.returncode == 2 and f"holds examples of up to {longest} tokens, longer than --max_length 16" \
        in _one_error(proc), proc.stderr[-3000:]
    assert not (tmp_path / "short").exists()


@pytest.mark.parametrize("env", [{"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1"},
                                 {"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "127.0.0.1"},
                                 {"WORLD_SIZE": "2"}])
def test_a_launch_environment_without_a_launcher_is_refused_before_any_collective(env, tmp_path):
    """Left over from a launcher, these waited 2 hours for a rank that never came (or, alone, gave
    a traceback). The refusal comes before any model, process group or output: MASTER_PORT is a
    socket of the test's own, listening, and nothing connects to it (rank 1 would, to rank 0's
    store; rank 0 would fail to bind it and say something else)."""
    import socket

    with socket.socket() as master:
        master.bind(("127.0.0.1", 0))
        master.listen()
        master.setblocking(False)
        if "MASTER_ADDR" in env:
            env = {**env, "MASTER_PORT": str(master.getsockname()[1])}
        for command in (["train", "--data_path", "data/sample_alpaca.json", "--output_dir", str(tmp_path / "o")],
                        ["eval", "--model", "tiny-qwen3", "--data_path", "data/sample_alpaca.json"]):
            proc = run_cli(*command, env=env, check=False, timeout=300)
            line = _one_error(proc)
            assert proc.returncode == 2 and line.startswith("error: WORLD_SIZE=2 is set but no launcher started"), \
                proc.stderr[-3000:]
        with pytest.raises(BlockingIOError):  # no connection is waiting
            master.accept()
    assert not (tmp_path / "o").exists()


def test_a_stuck_data_worker_does_not_hold_a_stopped_run(tmp_path):
    """The worker is stopped (SIGSTOP: it can neither work nor handle SIGTERM); SIGTERM to the
    run then saves the checkpoint, and the run exits 75 instead of joining the worker forever,
    leaving no process behind: its own process group (a session of its own) is empty once it has
    exited, before this test kills anything."""
    out = tmp_path / "stuck"
    proc = _start(out, "--max_steps", "400", "--save_steps", "0", new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not any(r.get("step") for r in _lines(out)) and proc.poll() is None:
        time.sleep(0.1)
    workers = [int(c) for task in (Path("/proc") / str(proc.pid) / "task").iterdir()
               for c in (task / "children").read_text().split()]
    assert workers, "no DataLoader worker found"
    assert {str(w) for w in workers} <= {m.split()[0] for m in _group_members(proc.pid)}  # what is checked below
    for worker in workers:
        os.kill(worker, signal.SIGSTOP)
    time.sleep(3)  # the run uses up the steps already handed over, then waits for the stopped worker
    os.kill(proc.pid, signal.SIGTERM)
    try:
        said, err = proc.communicate(timeout=90)  # torch's own shutdown takes 10 s of it
        # what the run left, seen right after it exited: before the safety net below kills anything
        left_workers = [w for w in workers if Path(f"/proc/{w}").exists()]
        left_in_group = _group_members(proc.pid)
        try:
            os.killpg(proc.pid, 0)
            group_empty = False
        except ProcessLookupError:
            group_empty = True
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        for worker in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGKILL)
        proc.kill()
    assert proc.returncode == 75, err[-3000:]
    step = read_metrics(out)[-1]["step"]
    assert f"stopped at step {step}: saved {out / f'checkpoint-{step}'}" in said and damage(out / f"checkpoint-{step}") is None
    assert not left_workers, f"workers {left_workers} outlived the run"
    assert group_empty and not left_in_group, f"processes of the run left: {left_in_group}"


def _group_members(pgid: int) -> list[str]:
    """'pid state command' of each process in process group `pgid`, from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            text = stat.read_text()
            command, fields = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()
            if int(fields[2]) == pgid:  # fields: state, ppid, pgrp, ...
                found.append(f"{stat.parent.name} {fields[0]} {command}")
    return found


def _lines(out) -> list[dict]:
    try:
        return read_metrics(out)
    except (OSError, ValueError):
        return []


def test_a_lone_surrogate_is_a_bad_row_and_a_duplicate_yaml_key_an_error(tmp_path):
    """A lone "\\ud83d" escape was a TypeError from the tokenizer, naming no file, line or field."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"instruction": "Hi", "output": "Hello"}\n{"instruction": "Smile \\ud83d", "output": "ok"}\n')
    proc = run_cli("prepare-data", "--data_path", str(rows), "--output_dir", str(tmp_path / "p"), check=False)
    assert proc.returncode == 2 and _one_error(proc).startswith(
        f"error: {rows}:line 2: field 'instruction': holds '\\ud83d' at character 6, a lone surrogate"), \
        proc.stderr[-3000:]
    proc = run_cli("prepare-data", "--data_path", str(rows), "--output_dir", str(tmp_path / "p"), "--skip_bad_rows",
                   check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert manifest["rows_in"] == 2 and manifest["examples_kept"] == 1 and manifest["dropped"]["bad_row"] == 1
    run = tmp_path / "run.yaml"
    run.write_text("learning_rate: 1.0e-4\nmax_steps: 3\nlearning_rate: 1.0e-3\n")
    proc = run_cli("train", "--config", str(run), check=False)
    assert proc.returncode == 2 and _one_error(proc) == \
        f"error: {run}:3: key 'learning_rate' is given twice (lines 1 and 3); keep one", proc.stderr[-3000:]


def test_looping_long_and_non_utf8_paths_are_named_in_one_line(tmp_path):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    latin1 = os.fsdecode(bytes(tmp_path) + b"/caf\xe9.json")
    shutil.copy(ROOT / "data" / "sample_alpaca.json", latin1)
    cases = {
        ("data/sample_alpaca.json", str(tmp_path / "loop")): "cannot be resolved (Symlink loop",
        ("data/sample_alpaca.json", str(tmp_path / ("a" * 300))): "is 300 bytes long, and a file system takes at most 255",
        (latin1, str(tmp_path / "out")): f"error: input {tmp_path}/caf\\xe9.json: the name is not valid UTF-8",
    }
    for (data, out), said in cases.items():
        for command in ("prepare-data", "train"):  # argv as bytes: the name is not UTF-8
            proc = run_cli(command, "--data_path", os.fsencode(data), "--output_dir", out, check=False)
            assert proc.returncode == 2 and said in _one_error(proc), (command, out, proc.stderr[-3000:])
    assert sorted(os.listdir(tmp_path)) == sorted(["loop", os.path.basename(latin1)])


def test_a_rank_that_never_comes_times_out_in_the_set_minutes(tmp_path):
    """Rank 0 of two, started as a launcher would (LOCAL_RANK set), with no rank 1: the rendezvous
    gives up after --ddp_timeout_minutes (here 0.1, 6 s; it was 2 hours) with one line."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    proc = run_cli("train", *ARGS, "--max_steps", "1", "--ddp_timeout_minutes", "0.1", "--output_dir",
                   str(tmp_path / "o"), env=env, check=False, timeout=300)
    assert proc.returncode == 2 and _one_error(proc).startswith(
        "error: rank 0 waited 0.1 min at the rendezvous for the other ranks of WORLD_SIZE=2: rank 1 never arrived ("
    ), proc.stderr[-3000:]


# rank 1 as a plain torch process: it joins the process group, then never reaches a collective
PEER = ("import datetime, time, torch.distributed as dist; "
        "dist.init_process_group('gloo', rank=1, world_size=2, timeout=datetime.timedelta(seconds=90)); "
        "print('joined', flush=True); time.sleep(90)")


def test_a_rank_that_joins_but_never_reaches_the_first_collective_is_named(tmp_path):
    """Rank 0 (sftkit) and a rank 1 that joins the group and then hangs: rank 0's first collective,
    a monitored barrier, gives up after --ddp_timeout_minutes (0.1 here, 6 s; it waited the whole
    time-out and printed gloo's traceback naming no rank) with one line naming rank 1. The whole
    rank 0 took 33 s in all here, most of it start-up."""
    import socket
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    peer = subprocess.Popen([sys.executable, "-c", PEER], env={**os.environ, **env, "RANK": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        proc = run_cli("train", *ARGS, "--max_steps", "1", "--ddp_timeout_minutes", "0.1", "--output_dir",
                       str(tmp_path / "o"), env={**env, "RANK": "0", "LOCAL_RANK": "0"}, check=False, timeout=300)
    finally:
        peer.kill()
        said, _ = peer.communicate()
    assert "joined" in said  # it passed the rendezvous: what timed out is the collective
    assert proc.returncode == 2 and _one_error(proc).startswith(
        "error: rank 0 waited 0.1 min at the first collective for rank(s) 1 of 2, which never arrived"), proc.stderr
    assert "ProcessGroupGloo" not in proc.stderr  # gloo's own two lines of the same news are held back
