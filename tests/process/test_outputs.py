"""What a run leaves its user: progress lines in a log file while it runs, the data's accounting and an
end line with the numbers and places; TensorBoard, W&B and the loss plot; eval during training;
files other users can read."""

from __future__ import annotations

import os
import re
import stat
import time

import pytest
from conftest import LORA, ROOT, SAMPLE, read_metrics, run_cli, start_cli, steps

DEMO = ROOT / "data" / "demo_alpaca.json"  # 8 rows; at max_length 40 one of them is too long


def _wait_for_line(proc, log, pattern: str, metrics, deadline: float) -> tuple[str, bool]:
    """The log's text once it holds `pattern`, and whether the run had ended by then."""
    while time.time() < deadline and proc.poll() is None:
        text = log.read_text() if log.exists() else ""
        if re.search(pattern, text, re.MULTILINE):
            ended = metrics.exists() and '"event": "end"' in metrics.read_text()
            return text, ended
        time.sleep(0.05)
    return (log.read_text() if log.exists() else ""), True


def test_train_to_a_log_file(tmp_path):
    """One run, stdout and stderr to a file as nohup or a scheduler leaves them: a progress line is
    there while the run still goes (a bar wrote nothing there until the end), one line per logged
    step and per eval, the dropped row on the console, no control characters, and an end line with
    the steps, both losses, the model and the TensorBoard folder."""
    out, log = tmp_path / "run", tmp_path / "log"
    proc = start_cli("train", "--data_path", str(DEMO), "--eval_data_path", str(DEMO), "--max_length", "40",
                     "--output_dir", str(out), "--max_steps", "4", "--logging_steps", "1", "--eval_steps", "2",
                     "--save_steps", "0", "--per_device_train_batch_size", "2", "--report_to", "tensorboard",
                     output=log)
    early, ended = _wait_for_line(proc, log, r"^step 1/4  loss \d", out / "metrics.jsonl", time.time() + 300)
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    assert not ended, f"no progress line before the run ended:\n{early}"
    text = log.read_text()
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", text), "control characters in a log file"
    lines = text.splitlines()
    assert [ln.split()[1] for ln in lines if ln.startswith("step ")] == ["1/4", "2/4", "3/4", "4/4"]
    records = read_metrics(out)
    evals = [r for r in records if "eval_loss" in r]
    start, end = records[0], records[-1]
    assert start["num_examples"] == 7  # 8 rows, one longer than 40 tokens
    assert "data: kept 7 of 8 rows; dropped 1 too long at max_length 40" in text
    assert "eval data: kept 7 of 8 rows" in text
    assert any(ln.startswith(f"eval at step 2: loss {evals[0]['eval_loss']:.4f}") for ln in lines)
    done = [ln for ln in lines if ln.startswith("done:")]
    assert done == [(f"done: 4 steps in {end['elapsed_s']:.1f}s; train loss {end['train_loss']:.4f}; "
                    f"eval loss {end['eval_loss']:.4f} (perplexity {end['eval_ppl']:.4g}); model in {out / 'final'}; "
                    f"tensorboard logs in {out / out.name}")]
    assert end["train_loss"] == steps(out)[-1]["loss"]
    assert any(p.name.startswith("events.out.tfevents") for p in (out / out.name).iterdir())
    card = (out / "final" / "README.md").read_text()  # not PEFT's empty card naming a cache path
    assert "a fully fine-tuned model of `tiny-qwen3`" in card and f"`{DEMO}`" in card
    assert os.environ["SFTKIT_CACHE"] not in card


FULL = ["--max_length", "512", "--learning_rate", "1e-3", "--warmup_ratio", "0", "--logging_steps", "1",
        "--seed", "7"]


def test_eval_during_training_tensorboard_and_loss_plot(eight, tmp_path):
    out = tmp_path / "tb"
    run_cli("train", "--data_path", str(eight), "--eval_data_path", "data/sample_sharegpt.json", "--output_dir",
            str(out), "--max_steps", "4", "--eval_steps", "2", "--save_steps", "2", "--save_total_limit", "1",
            "--report_to", "tensorboard", "--use_lora", *FULL)
    evals = [r for r in read_metrics(out) if "eval_loss" in r and "event" not in r]
    assert [r["step"] for r in evals] == [2, 4] and all(r["eval_ppl"] > 1 for r in evals)
    assert list(out.rglob("events.out.tfevents.*"))
    assert (out / "loss.png").stat().st_size > 1000
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-4"]  # save_total_limit 1


def test_wandb_offline(eight, tmp_path):
    """--report_to wandb with WANDB_MODE=offline needs no network (runs where the wandb extra is installed)."""
    pytest.importorskip("wandb")
    out = tmp_path / "wb"
    run_cli("train", "--data_path", str(eight), "--output_dir", str(out), "--max_steps", "2", "--save_steps", "0",
            "--report_to", "wandb", "--use_lora", *FULL, env={"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path)})
    assert list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(steps(out)) == 2


def test_saved_models_are_readable_by_other_users(tmp_path):
    """Under the usual umask 022: 0644 files and 0755 folders, as save_pretrained alone would make."""
    mask = os.umask(0o022)
    try:
        out = tmp_path / "m"
        run_cli("train", *LORA, "--data_path", SAMPLE, "--max_steps", "1", "--save_steps", "1", "--output_dir",
                str(out))
        run_cli("merge-lora", "--adapter", str(out / "final"), "--output_dir", str(tmp_path / "merged"))
    finally:
        os.umask(mask)
    for d in (out / "final", out / "checkpoint-1", tmp_path / "merged"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o755, d
        for f in d.rglob("*"):
            assert stat.S_IMODE(f.stat().st_mode) == (0o755 if f.is_dir() else 0o644), f
