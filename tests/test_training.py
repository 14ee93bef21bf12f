"""Training semantics: exact loss across accumulation, packing without cross-talk, exact resume,
clean stop on SIGTERM, eval during training and trackers. Tiny Qwen3, fp32, fixed seed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import torch
from conftest import BIN, ROOT, read_metrics, run_cli
from safetensors.torch import load_file

FULL = ["--max_length", "512", "--learning_rate", "1e-3", "--warmup_ratio", "0", "--logging_steps", "1",
        "--seed", "7"]


@pytest.fixture(scope="module")
def eight(tmp_path_factory):
    """8 examples of uneven length (19 to 103 tokens), prepared once."""
    d = tmp_path_factory.mktemp("eight")
    rows = json.loads((ROOT / "data" / "sample_alpaca.json").read_text())
    rows = sorted(rows, key=lambda r: len(r["output"]) + len(r["instruction"]))[::6][:8]
    (d / "eight.json").write_text(json.dumps(rows))
    run_cli("prepare-data", "--data_path", str(d / "eight.json"), "--output_dir", str(d / "prep"), "--max_length", "512")
    return d / "prep"


def weights(out):
    return load_file(str(out / "final" / "model.safetensors"))


def test_accumulation_parity(eight, tmp_path):
    """8x1, 2x4 and 1x8 see the same 8 examples per step: same losses, same weights (rtol 1e-5).

    adam_epsilon 1: plain Adam divides near-zero gradients by their own tiny norm and turns float
    round-off (1e-9) into weight differences of 1e-6; with a large epsilon the update is
    proportional to the gradient, so any mis-weighting of micro-batches shows, even a uniform scale.
    """
    runs = {}
    for micro, accum in ((8, 1), (2, 4), (1, 8)):
        out = tmp_path / f"m{micro}a{accum}"
        run_cli("train", "--data_path", str(eight), "--output_dir", str(out), "--max_steps", "3", "--save_steps", "0",
                "--per_device_train_batch_size", str(micro), "--gradient_accumulation_steps", str(accum),
                "--adam_epsilon", "1", "--learning_rate", "1", "--max_length", "512", "--warmup_ratio", "0",
                "--logging_steps", "1", "--seed", "7")
        runs[(micro, accum)] = ([r["loss"] for r in read_metrics(out) if "loss" in r], weights(out))
    ref_losses, ref_weights = runs[(8, 1)]
    assert len(ref_losses) == 3 and ref_losses[2] < ref_losses[0]
    for key, (losses, w) in runs.items():
        assert losses == pytest.approx(ref_losses, rel=1e-5), key
        for name, tensor in ref_weights.items():
            torch.testing.assert_close(w[name], tensor, rtol=1e-5, atol=1e-7, msg=f"{key} {name}")


def test_packing_matches_padding_loss_and_gradients(tok):
    """One packed row vs one padded row per example: same loss, same gradients. Fails if the
    position_ids restart or use_cache=False regress (then the examples attend to each other)."""
    from transformers import AutoModelForCausalLM

    from sftkit.batching import collate
    from sftkit.data.render import RenderOptions, render_batch, template_spec
    from sftkit.loss import token_loss_sum
    from sftkit.models import resolve_model_path

    convs = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}]
             for q, a in (("hi", "hello there"), ("2+2?", "4"), ("name a colour", "blue, or green if you like"))]
    examples = [{"input_ids": i, "labels": lab} for i, lab in render_batch(convs, tok, template_spec(tok), RenderOptions())]
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny-qwen3"), attn_implementation="sdpa")
    results = []
    for rows, packed in (([[e] for e in examples], False), ([examples], True)):
        model.zero_grad()
        batch = collate(rows, tok.pad_token_id, packed)
        loss = token_loss_sum(model, batch) / batch.targets.numel()
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in model.parameters()], batch))
    (padded_loss, padded_grads, _), (packed_loss, packed_grads, packed_batch) = results
    assert packed_batch.inputs["input_ids"].shape[0] == 1 and "attention_mask" not in packed_batch.inputs
    assert packed_loss == pytest.approx(padded_loss, rel=1e-5)
    for a, b in zip(packed_grads, padded_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # the test can fail: with a cache, transformers ignores the packed layout and the loss moves
    with torch.no_grad():
        leaky = model(**packed_batch.inputs, logits_to_keep=packed_batch.keep, use_cache=True).logits
        leaky_loss = torch.nn.functional.cross_entropy(leaky.float(), packed_batch.targets).item()
    assert abs(leaky_loss - packed_loss) > 1e-4


def test_best_fit_decreasing_bins():
    from sftkit.batching import bfd_bins

    lengths = [90, 60, 50, 40, 30, 20, 10]
    bins = bfd_bins(lengths, 100)
    assert sorted(i for b in bins for i in b) == list(range(7))
    assert all(sum(lengths[i] for i in b) <= 100 for b in bins)
    assert len(bins) == 3  # 300 tokens in bins of 100: the minimum


@pytest.mark.parametrize("packing", [False, True])
def test_steps_do_not_depend_on_the_split(packing):
    """Global batch 8 as 8 x 1, 1 x 8, 2 ranks x 4, 2 ranks x 2 x 2: each optimizer step holds the
    same examples, over two epochs of 61 examples (a short last step) with length grouping on."""
    from sftkit.batching import Schedule

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(10, 400, (61,), generator=g).tolist()

    def steps(per_device: int, world: int, accumulation: int) -> list[list[int]]:
        s = Schedule(lengths, per_device, world, accumulation, seed=7, packing=packing, max_length=512)
        out = []
        for step in range(2 * s.steps_per_epoch):
            micro = range(step * accumulation, (step + 1) * accumulation)
            rows = [row for k in micro for r in range(world) for row in s.examples(k, r)]
            out.append(sorted(i for row in rows for i in row))
        return out

    want = steps(8, 1, 1)
    assert sorted(i for step in want[:len(want) // 2] for i in step) == list(range(61))
    for split in ((1, 1, 8), (4, 2, 1), (2, 2, 2), (1, 2, 4)):
        assert steps(*split) == want, split


def test_packed_training_runs_and_logs_padding_efficiency(eight, tmp_path):
    out = tmp_path / "packed"
    run_cli("train", "--data_path", str(eight), "--output_dir", str(out), "--max_steps", "2", "--save_steps", "0",
            "--packing", "--per_device_train_batch_size", "1", *FULL)
    records = read_metrics(out)
    assert records[0]["rows_per_epoch"] < 8  # 8 examples of <= 103 tokens share rows of 512
    assert all(0 < r["padding_efficiency"] <= 1 for r in records if "loss" in r)
    proc = run_cli("train", "--data_path", str(eight), "--output_dir", str(tmp_path / "x"), "--packing",
                   "--attn_implementation", "sdpa_paged", check=False)
    assert proc.returncode == 2 and "packing needs an attention implementation" in proc.stderr


# A constant learning rate: a run stopped by --max_steps 5 must follow the same schedule as the
# 12-step run it is compared with. Micro-batch 1 x 4 accumulation keeps each step long enough
# (~0.3 s) for a SIGTERM to land mid-run.
RESUME = ["--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "4", "--lr_scheduler_type",
          "constant", "--max_length", "512", "--learning_rate", "1e-3", "--warmup_ratio", "0", "--logging_steps", "1",
          "--seed", "7", "--save_steps", "100"]


@pytest.fixture(scope="module")
def straight(eight, tmp_path_factory):
    """12 steps without a stop, on 8 examples (2 steps an epoch: step 5 is in epoch 2) and on 50
    (12.5 steps an epoch: step 5 is in epoch 0)."""
    runs = {}
    for name, data in (("later_epoch", str(eight)), ("epoch_0", "data/sample_alpaca.json")):
        out = tmp_path_factory.mktemp("straight") / name
        run_cli("train", "--data_path", data, "--output_dir", str(out), "--max_steps", "12", *RESUME)
        runs[name] = (data, out)
    return runs


def _losses(out):
    return [(r["step"], r["loss"]) for r in read_metrics(out) if "loss" in r]


def _stop_by_signal(data, out, sig=signal.SIGTERM) -> int:
    """SIGTERM to the whole process group, as SLURM's scancel or a container stop sends it (or
    SIGINT, as Ctrl-C does): the DataLoader worker gets it too, and the run must still save its
    checkpoint, say how to resume, and exit with the documented code 75."""
    cmd = [str(BIN / "sftkit"), "train", "--data_path", data, "--output_dir", str(out), "--max_steps", "12", *RESUME]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and sum('"loss"' in ln for ln in metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, sig)
    stdout, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err.decode()[-3000:]
    stop = [r for r in read_metrics(out) if r.get("event") == "stopped"]
    assert len(stop) == 1, "the run ended before the signal arrived"
    assert stop[0]["signal"] == sig.name
    checkpoint = out / f"checkpoint-{stop[0]['step']}"
    assert (checkpoint / "trainer_state.json").is_file() and not (out / "final").exists()
    said = stdout.decode()
    assert f"stopped at step {stop[0]['step']}: saved {checkpoint}." in said and "done:" not in said
    assert f"sftkit train --config {out / 'config.yaml'} --resume_from_checkpoint latest" in said
    return stop[0]["step"]


@pytest.mark.parametrize("how, where", [("max_steps", "epoch_0"), ("max_steps", "later_epoch"),
                                        ("sigterm", "epoch_0"), ("sigterm", "later_epoch"), ("sigint", "later_epoch")])
def test_resume_continues_exactly(how, where, straight, tmp_path):
    data, reference = straight[where]
    out = tmp_path / "resumed"
    if how == "max_steps":
        run_cli("train", "--data_path", data, "--output_dir", str(out), "--max_steps", "5", *RESUME)
        stopped_at = 5
    else:
        stopped_at = _stop_by_signal(data, out, signal.SIGTERM if how == "sigterm" else signal.SIGINT)
    assert 1 <= stopped_at < 12
    run_cli("train", "--data_path", data, "--output_dir", str(out), "--max_steps", "12",
            "--resume_from_checkpoint", "latest", *RESUME)
    records = read_metrics(out)
    assert records[0]["resumed_from_step"] == stopped_at
    got, want = _losses(out), _losses(reference)
    assert [s for s, _ in got] == list(range(1, 13))
    assert [x for _, x in got] == pytest.approx([x for _, x in want], rel=1e-6)
    for name, tensor in weights(reference).items():
        torch.testing.assert_close(weights(out)[name], tensor, rtol=1e-6, atol=1e-8)


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


def test_nan_loss_stops_with_a_message_or_is_skipped(eight, tmp_path):
    # lr 1e30: Adam moves every weight by ~1e30; a few steps later the loss is NaN
    args = ["--data_path", str(eight), "--max_steps", "4", "--save_steps", "1", "--learning_rate", "1e30", "--warmup_ratio", "0",
            "--max_grad_norm", "0", "--per_device_train_batch_size", "4", "--max_length", "512", "--logging_steps", "1"]
    proc = run_cli("train", "--output_dir", str(tmp_path / "stop"), *args, check=False)
    import re

    # the loss, or before it a weight or optimizer moment checked at the save, is found non-finite
    found = re.search(r"error: training diverged at step (\d+): (the loss became nan|a weight or an optimizer moment)",
                      proc.stderr)
    assert proc.returncode == 2 and found and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    bad = int(found.group(1))
    assert 1 <= bad <= 4  # the checkpoints of the steps before it are kept, none after, and the message names the last
    kept = sorted((tmp_path / "stop").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert [p.name for p in kept] == [f"checkpoint-{i}" for i in range(1, bad)]
    assert (f"The last checkpoint, {kept[-1]}, holds finite weights." if kept else "No checkpoint was written") \
        in proc.stderr
    for checkpoint in kept:  # every checkpoint left on disk is finite
        assert all(torch.isfinite(t).all() for t in load_file(str(checkpoint / "model" / "model.safetensors")).values())
    run_cli("train", "--output_dir", str(tmp_path / "skip"), *args, "--skip_nan_steps")
    last = [r for r in read_metrics(tmp_path / "skip") if "loss" in r][-1]
    assert last["step"] == 4 and last["skipped_steps"] >= 1 and (tmp_path / "skip" / "final").is_dir()


def test_wandb_offline(eight, tmp_path):
    """--report_to wandb with WANDB_MODE=offline needs no network (runs where the wandb extra is installed)."""
    pytest.importorskip("wandb")
    out = tmp_path / "wb"
    run_cli("train", "--data_path", str(eight), "--output_dir", str(out), "--max_steps", "2", "--save_steps", "0",
            "--report_to", "wandb", "--use_lora", *FULL, env={"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path)})
    assert list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    assert len([r for r in read_metrics(out) if "loss" in r]) == 2


def _train_steps(eight, out, steps: int = 2, **options):
    """`steps` calls of train_step in this process (what fit and the bench's bare loop call), on the
    eight examples; returns (losses, weights before, weights after)."""
    from sftkit.config import SFTConfig
    from sftkit.train import setup, step_batches, train_step

    run = setup(SFTConfig(data_path=[str(eight)], output_dir=str(out), max_steps=steps, save_steps=0, max_length=512,
                          learning_rate=1, adam_epsilon=1, warmup_ratio=0, seed=7, **options))
    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    batches = step_batches(run)
    run.model.train()
    losses = [train_step(run, batches[k]).loss(run.accelerator) for k in range(steps)]
    return losses, before, {n: p.detach().clone() for n, p in run.model.named_parameters()}


def test_train_step_parity_across_splits_and_loss_paths(eight, tmp_path):
    """train_step: 8 x 1, 2 x 4 and 1 x 8 micro-batches train the same step (losses and weights
    within rtol 1e-5; adam_epsilon 1 as in test_accumulation_parity), and the plain loss path the
    same as the fused one (loss rtol 1e-5; weights within 1e-4 of each tensor's largest change:
    the two paths' gradients differ by float round-off, about 2e-7 here, see test_performance)."""
    want_losses, before, want = _train_steps(eight, tmp_path / "ref", per_device_train_batch_size=8)
    assert want_losses[1] < want_losses[0]
    for i, split in enumerate(({"per_device_train_batch_size": 2, "gradient_accumulation_steps": 4},
                               {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 8})):
        losses, _, got = _train_steps(eight, tmp_path / f"split{i}", **split)
        assert losses == pytest.approx(want_losses, rel=1e-5), split
        for name, tensor in want.items():
            torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-7, msg=f"{split} {name}")
    losses, _, got = _train_steps(eight, tmp_path / "plain", per_device_train_batch_size=8, loss_chunk_size=0)
    # rel 1e-5, not 1e-6: the plain path's fp32 logits are 1.4e-6 off the float64 value on an AVX2
    # EPYC (the fused one 5e-8, test_performance), and that round-off moves with the CPU's kernels
    assert losses == pytest.approx(want_losses, rel=1e-5)
    for name, tensor in want.items():
        change = (tensor - before[name]).abs().max().item()
        assert change > 0 and (got[name] - tensor).abs().max().item() <= 1e-4 * change, name


def test_checkpoints_of_the_first_state_version_still_resume(eight, tmp_path):
    """trainer_state.json before TrainState had no "version" and no "skipped_steps": a run resumed
    from such a checkpoint continues exactly (same last loss as the uninterrupted run)."""
    from sftkit.checkpoint import TrainState
    from sftkit.config import SFTConfig
    from sftkit.errors import ConfigError
    from sftkit.train import run

    def train(out, steps: int, **extra) -> None:  # in this process: three runs, no start-up cost
        run(SFTConfig(data_path=[str(eight)], output_dir=str(out), max_steps=steps, save_steps=1, max_length=512,
                      per_device_train_batch_size=1, gradient_accumulation_steps=4, lr_scheduler_type="constant",
                      learning_rate=1e-3, warmup_ratio=0, logging_steps=1, seed=7, **extra))

    train(tmp_path / "whole", 3)
    out = tmp_path / "old"
    train(out, 2)
    state_file = out / "checkpoint-2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["version"] == TrainState.VERSION
    v1 = ("step", "micro_index", "tokens", "supervised_tokens", "elapsed_s")  # and the layout of then:
    state_file.write_text(json.dumps({k: v for k, v in state.items() if k in v1}))
    checkpoint = state_file.parent  # no checksums.json, the scheduler in accelerate's pickle
    (checkpoint / "checksums.json").unlink()
    torch.save(json.loads((checkpoint / "scheduler.json").read_text()), checkpoint / "state" / "custom_checkpoint_0.pkl")
    (checkpoint / "scheduler.json").unlink()
    train(out, 3, resume_from_checkpoint="latest")
    assert read_metrics(out)[0]["resumed_from_step"] == 2
    assert _losses(out)[-1] == pytest.approx(_losses(tmp_path / "whole")[-1], rel=1e-6)
    with pytest.raises(ConfigError, match="newer sftkit"):
        TrainState.from_dict({**state, "version": TrainState.VERSION + 1})
