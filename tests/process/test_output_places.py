"""Where commands write: one writer per output folder (a live run is never harmed by a second
command), never over an input (a glob's files included), eval beside the model it reads."""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import pytest
from conftest import LORA, ROOT, SAMPLE, one_error, run_cli, start_cli, steps, stopped_at

from sftkit.checkpoint import damage, list_checkpoints

STEPS = 12  # long enough (~0.5 s a step here) to outlive the commands tried against it


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """Two trains started at once into one folder; while the winner trains: a resume, a merge
    with --overwrite_output_dir and a prepare-data into its folder. What each said, and the run."""
    out = tmp_path_factory.mktemp("live") / "run"
    train = ["train", *LORA, "--data_path", SAMPLE, "--output_dir", str(out), "--max_steps", str(STEPS),
             "--save_steps", "3", "--save_total_limit", "3"]
    first, second = start_cli(*train), start_cli(*train)
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
    tried = {"resume": start_cli(*train, "--resume_from_checkpoint", "latest"),
             "merge": start_cli("merge-lora", "--adapter", str(list_checkpoints(out)[0]), "--output_dir", str(out),
                                "--overwrite_output_dir"),
             "prepare": start_cli("prepare-data", "--data_path", SAMPLE, "--output_dir", str(out))}
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
    assert refusal in one_error(subprocess.CompletedProcess([], code, "", err))
    assert seen["alive_after"], "the run ended before the other commands were tried: nothing was shown"
    assert seen["checkpoints_before"], "no checkpoint was there to harm"
    for name in ("resume", "merge", "prepare"):
        result = seen[name]
        assert result.returncode == 2, (name, result.stderr[-3000:])
        assert refusal in one_error(result), name
    code, said, err = seen["winner"]
    assert code == 0 and f"done: {STEPS} steps" in said, err[-3000:]
    kept = list_checkpoints(out)
    assert [p.name for p in kept] == [f"checkpoint-{s}" for s in (STEPS - 6, STEPS - 3, STEPS)]
    assert all(damage(p) is None for p in kept) and (out / "final" / "adapter_model.safetensors").is_file()
    # one writer: no line of another run, none twice
    assert [r["step"] for r in steps(out)] == list(range(1, STEPS + 1))
    assert not list(out.glob(".*.tmp")) and not (out / ".sftkit.lock").exists()


def _tree_bytes(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_no_command_writes_over_its_inputs_a_full_folder_or_a_file(reference_run, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(reference_run, adapter)
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(ROOT / "data" / "sample_alpaca.json", data / "rows.json")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    (tmp_path / "a_file").write_text("mine")
    before = {p: _tree_bytes(p) for p in (adapter, data, tmp_path / "notes")}
    attempts = [
        ["merge-lora", "--adapter", str(adapter / "final"), "--output_dir", str(adapter)],          # holds the input
        ["merge-lora", "--adapter", str(adapter / "final"), "--output_dir", str(adapter / "final")],  # is the input
        ["merge-lora", "--adapter", str(adapter / "final"), "--output_dir", str(tmp_path / "notes")],  # not empty
        ["merge-lora", "--adapter", str(adapter / "final"), "--output_dir", str(tmp_path / "a_file")],  # a file
        ["prepare-data", "--data_path", str(data), "--output_dir", str(data / "prepared")],         # inside the input
        ["prepare-data", "--data_path", str(data / "rows.json"), "--output_dir", str(data / "rows.json")],
        ["prepare-data", "--data_path", str(data), "--output_dir", str(tmp_path / "notes")],
        ["train", "--data_path", str(data), "--output_dir", str(data), "--use_lora"],
        ["train", "--data_path", str(data / "rows.json"), "--output_dir", str(tmp_path / "a_file"), "--use_lora"],
    ]
    for args in attempts:
        proc = run_cli(*args, check=False)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, args
    after = {p: _tree_bytes(p) for p in before}
    assert after == before and (tmp_path / "a_file").read_text() == "mine"
    run_cli("merge-lora", "--adapter", str(adapter / "final"), "--output_dir", str(tmp_path / "notes"),
            "--overwrite_output_dir")
    assert (tmp_path / "notes" / "model.safetensors").is_file() and not (tmp_path / "notes" / "keep.txt").exists()


def test_a_glob_input_is_checked_against_the_output(tmp_path):
    proj = tmp_path / "proj"
    proj.mkdir()
    shutil.copy(ROOT / "data" / "sample_alpaca.json", proj / "rows.json")
    (proj / "config.yaml").write_text("mine: true\n")
    for command in ("prepare-data", "train"):
        proc = run_cli(command, "--data_path", f"{proj}/*.json", "--output_dir", str(proj), check=False)
        assert proc.returncode == 2 and f"would overwrite an input ({proj / 'rows.json'})" in one_error(proc), \
            proc.stderr[-3000:]
    assert sorted(p.name for p in proj.iterdir()) == ["config.yaml", "rows.json"]
    assert (proj / "config.yaml").read_text() == "mine: true\n"


def test_eval_writes_beside_the_model_never_into_a_checkpoint_or_onto_its_data(reference_run, tmp_path):
    run = stopped_at(reference_run, tmp_path / "evals", 6, keep=(6,))
    ckpt = run / "checkpoint-6"
    run_cli("eval", "--model", str(ckpt), "--data_path", "data/sample_alpaca.json", "--max_length", "512")
    assert json.loads((run / "eval" / "eval.json").read_text())["model"] == str(ckpt)
    assert damage(ckpt) is None and list_checkpoints(run) == [ckpt]
    # a model named by id, run in the data's folder, with the data named eval.json
    data = tmp_path / "here" / "eval.json"
    data.parent.mkdir()
    shutil.copy(ROOT / "data" / "sample_alpaca.json", data)
    rows = data.read_bytes()
    proc = run_cli("eval", "--model", "tiny-qwen3", "--data_path", "eval.json", "--max_length", "512",
                   cwd=data.parent, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert data.read_bytes() == rows and json.loads((data.parent / "eval" / "eval.json").read_text())["loss"] > 0
    # an --output_dir that is the checkpoint, or the data's own folder, is refused in one line
    for target, inputs in ((ckpt, str(ckpt)), (data.parent, str(data))):
        proc = run_cli("eval", "--model", inputs if target == ckpt else "tiny-qwen3", "--data_path", str(data),
                       "--output_dir", str(target), check=False)
        assert proc.returncode == 2 and "would overwrite an input" in one_error(proc), proc.stderr[-3000:]
    assert damage(ckpt) is None and data.read_bytes() == rows
