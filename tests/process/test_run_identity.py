"""Which run a checkpoint belongs to, through the CLI: a used folder is refused, overwritten on request
and never resumed by another run; a resume says what changed and refuses to bend the schedule; the
same bytes typed another way from another folder are the same run; a checkpoint of the earlier,
path-spelled identity resumes as typed then; a base that changed, or is of another size, is named
in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import LORA, ROOT, SAMPLE, one_error, read_metrics, run_cli, steps, stopped_at

from sftkit.checkpoint import checksums, damage, read_state


def test_a_used_folder_is_refused_overwritten_on_request_and_never_resumed_by_another_run(tmp_path):
    out, other = tmp_path / "a", tmp_path / "b"
    first = [*LORA, "--data_path", SAMPLE, "--max_steps", "2", "--save_steps", "1", "--learning_rate", "1e-3"]
    run_cli("train", *first, "--output_dir", str(out))
    proc = run_cli("train", *first, "--output_dir", str(out), check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "holds another run (checkpoint-1, checkpoint-2, final/)" in proc.stderr
    assert "--overwrite_output_dir" in proc.stderr and "--resume_from_checkpoint latest" in proc.stderr
    proc = run_cli("train", *first[:-1], "3e-3", "--output_dir", str(out), "--resume_from_checkpoint", "latest",
                   check=False)
    assert proc.returncode == 2 and "belong to another run (changed: learning_rate 0.001 -> 0.003)" in proc.stderr
    # latest skips a checkpoint of another run that sits in the folder (a newer step, copied in)
    run_cli("train", *LORA, "--data_path", SAMPLE, "--max_steps", "3", "--save_steps", "1", "--learning_rate", "2e-3",
            "--output_dir", str(other))
    shutil.copytree(other / "checkpoint-3", out / "checkpoint-9")
    proc = run_cli("train", *first, "--output_dir", str(out), "--resume_from_checkpoint", "latest")
    assert f"{out}/checkpoint-2 is step 2, and these options give 2 steps: the run has finished" in proc.stdout
    run_cli("train", *first, "--output_dir", str(out), "--overwrite_output_dir", "true")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert read_metrics(out)[0]["resumed_from_step"] is None


def test_resume_says_what_it_continues_and_refuses_to_bend_the_schedule(tmp_path):
    out = tmp_path / "r"
    args = [*LORA, "--data_path", SAMPLE, "--lr_scheduler_type", "cosine", "--output_dir", str(out),
            "--save_steps", "2"]
    run_cli("train", *args, "--max_steps", "4")
    proc = run_cli("train", *args, "--max_steps", "4", "--resume_from_checkpoint", "latest")
    assert proc.returncode == 0 and "the run has finished; nothing to resume" in proc.stdout
    proc = run_cli("train", *args, "--max_steps", "6", "--resume_from_checkpoint", str(out / "checkpoint-2"),
                   check=False)
    assert proc.returncode == 2 and "resuming would bend the learning-rate schedule" in proc.stderr
    assert "--max_steps 4" in proc.stderr
    # a constant schedule without warm-up can run longer: nothing bends
    flat = [*args, "--lr_scheduler_type", "constant"]
    run_cli("train", *flat, "--max_steps", "2", "--overwrite_output_dir")
    proc = run_cli("train", *flat, "--max_steps", "4", "--resume_from_checkpoint", "latest", "--logging_steps", "2")
    assert f"resuming from {out}/checkpoint-2: step 2 of 4" in proc.stdout
    assert "changed since that checkpoint: max_steps 2 -> 4; logging_steps 1 -> 2" in proc.stdout


DATA = ROOT / SAMPLE
SAVING = [*LORA, "--save_steps", "2"]  # a checkpoint every 2 steps


def _said_changed(proc) -> str:
    lines = [x for x in proc.stdout.splitlines() if "changed" in x]
    assert len(lines) == 1, proc.stdout
    return lines[0]


def _set_run_id(checkpoint: Path, run_id: str) -> None:
    """Give a checkpoint another run id, its checksums rewritten so that it stays intact."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    (checkpoint / "trainer_state.json").write_text(json.dumps({**state, "run_id": run_id}))
    (checkpoint / "checksums.json").unlink()
    (checkpoint / "checksums.json").write_text(json.dumps(checksums(checkpoint)))
    assert damage(checkpoint) is None


def test_the_same_bytes_typed_another_way_from_another_folder_are_the_same_run(tmp_path):
    """The trial: data.jsonl typed relative in one folder, then absolute from another, was
    'another run' (its path was in the identity), so `latest` refused; and config.yaml held the
    relative path, so the printed resume command worked only from the first folder."""
    a, b, c = (tmp_path / n for n in "abc")
    for d in (a, b, c):
        d.mkdir()
    shutil.copy(DATA, a / "data.json")
    run_cli("train", *SAVING, "--data_path", "data.json", "--output_dir", "out", "--max_steps", "2", cwd=a)
    out = a / "out"
    first = read_state(out / "checkpoint-2").run_id

    proc = run_cli("train", *SAVING, "--data_path", str(a / "data.json"), "--output_dir", str(out),
                   "--max_steps", "4", "--resume_from_checkpoint", "latest", cwd=b)
    assert f"resuming from {out / 'checkpoint-2'}: step 2 of 4" in proc.stdout
    # the length is all that changed: not the data, not its path
    assert _said_changed(proc) == "changed since that checkpoint: max_steps 2 -> 4" and "warning" not in proc.stdout
    assert read_state(out / "checkpoint-4").run_id == first
    assert [r["step"] for r in steps(out)] == [1, 2, 3, 4]

    # the resume command a stop prints, typed from a third folder: config.yaml holds absolute paths
    saved = (out / "config.yaml").read_text()
    assert f"- {a / 'data.json'}" in saved and f"output_dir: {out}" in saved
    (c / "link.json").symlink_to(a / "data.json")  # and a symlink to the same bytes is the same run too
    proc = run_cli("train", "--config", str(out / "config.yaml"), "--data_path", "link.json",
                   "--resume_from_checkpoint", "latest", "--max_steps", "6", cwd=c)
    assert f"resuming from {out / 'checkpoint-4'}: step 4 of 6" in proc.stdout
    assert _said_changed(proc) == "changed since that checkpoint: max_steps 4 -> 6"
    assert read_state(out / "checkpoint-6").run_id == first


def test_a_checkpoint_of_the_path_spelled_identity_resumes_as_typed_then_or_is_refused_in_one_line(tmp_path,
                                                                                                   monkeypatch, tok):
    """Checkpoints written before run ids held no path (a bare 16-hex id) must not become
    unresumable silently: typed as then, from the same folder, they resume; otherwise one line
    says why and how."""
    from sftkit.config import SFTConfig
    from sftkit.data.dataset import spelled_fingerprint
    from sftkit.run_dir import spelled_run_identity

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    shutil.copy(DATA, a / "data.json")
    run_cli("train", *SAVING, "--data_path", "data.json", "--output_dir", "out", "--max_steps", "2", cwd=a)
    out = a / "out"
    # the id the earlier sftkit wrote for this run (checked against that code: see the commit)
    monkeypatch.chdir(a)
    cfg = SFTConfig.from_dict({"data_path": ["data.json"], "use_lora": True, "per_device_train_batch_size": 2,
                               "lr_scheduler_type": "constant", "warmup_ratio": 0.0, "learning_rate": 1e-3,
                               "max_length": 512, "seed": 7})
    _set_run_id(out / "checkpoint-2", spelled_run_identity(cfg, spelled_fingerprint(cfg.data_options(),
                                                                                   cfg.data_path, tok), 1))

    refused = run_cli("train", *SAVING, "--data_path", str(a / "data.json"), "--output_dir", str(out),
                      "--max_steps", "4", "--resume_from_checkpoint", "latest", cwd=b, check=False)
    assert "written by an earlier sftkit, whose run identity held the data's and the model's paths as typed" in \
        one_error(refused) and f"--resume_from_checkpoint {out / 'checkpoint-2'}" in one_error(refused)

    proc = run_cli("train", *SAVING, "--data_path", "data.json", "--output_dir", "out", "--max_steps", "4",
                   "--resume_from_checkpoint", "latest", cwd=a)
    assert "resuming from out/checkpoint-2: step 2 of 4" in proc.stdout
    assert _said_changed(proc) == "changed since that checkpoint: max_steps 2 -> 4" and "warning" not in proc.stdout
    assert read_state(out / "checkpoint-4").run_id.startswith("v2:")  # written by this identity from now on


def test_resume_refuses_a_base_that_changed(reference_run, tmp_path):
    from sftkit.models import resolve_model_path

    base = Path(resolve_model_path("tiny-qwen3"))  # what the reference run trained
    out = stopped_at(reference_run, tmp_path / "run", 2)
    changed = tmp_path / "base"
    shutil.copytree(base, changed)
    config = json.loads((changed / "config.json").read_text())
    (changed / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    proc = run_cli("train", *LORA, "--data_path", SAMPLE, "--save_steps", "1", "--max_steps", "3",
                   "--model_name_or_path", str(changed), "--output_dir", str(out), "--resume_from_checkpoint",
                   str(out / "checkpoint-2"), check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"error: {out / 'checkpoint-2'} was trained on the base model {base}" in proc.stderr
    assert "its config or weight files changed" in proc.stderr
    # the same base, moved: its identity is its content, not its path; the run continues
    moved = tmp_path / "moved"
    shutil.copytree(base, moved)
    run_cli("train", *LORA, "--data_path", SAMPLE, "--save_steps", "1", "--max_steps", "3", "--model_name_or_path",
            str(moved), "--output_dir", str(out), "--resume_from_checkpoint", str(out / "checkpoint-2"))
    assert [r["step"] for r in steps(out)] == [1, 2, 3]


TRAIN = ["--data_path", "data/sample_alpaca.json", "--max_steps", "1", "--save_steps", "1", "--max_length", "256",
         "--per_device_train_batch_size", "2"]


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_a_resume_on_a_base_of_another_size_names_both_shapes(other_size, tmp_path, lora):
    narrow, wide, _ = other_size
    out = tmp_path / "run"
    extra = ["--use_lora"] if lora else []
    run_cli("train", *TRAIN, *extra, "--model_name_or_path", str(narrow), "--output_dir", str(out))
    ckpt = out / "checkpoint-1"
    proc = run_cli("train", *TRAIN, *extra, "--max_steps", "2", "--model_name_or_path", str(wide), "--output_dir",
                   str(out), "--resume_from_checkpoint", str(ckpt), check=False)
    # the first tensor by name that differs, with the base's own tensor where the checkpoint holds an adapter
    said = ("model.layers.0.mlp.down_proj.lora_B.weight is [64, 16], and the base {} needs [96, 16] "
            "(model.layers.0.mlp.down_proj.weight [96, 128])" if lora else
            "model.embed_tokens.weight is [151936, 64], and the base {} needs [151936, 96]").format(wide)
    assert proc.returncode == 2 and one_error(proc) == (
        f"error: {ckpt / 'model'} was trained on a base of another size: its {said}; pass the base it was trained on")
