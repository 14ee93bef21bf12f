"""Issue 23, round two, Build 6/7 leftovers through the real CLI: a base model of another size
under an adapter or a checkpoint is one line naming both shapes (torch printed 83), and
merge-lora's free-space check counts what it writes, and a disk that fills while it writes
leaves no half-written folder."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import run_cli, tmpfs
from family import build

WIDE = {"hidden_size": 96}  # the tiny qwen3 is 64 wide: q_proj [64, 64] there, [64, 96] here


def _one_error(proc) -> str:
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Two real tiny bases, 64 and 96 wide, and a LoRA adapter (random, untrained: only its
    shapes matter) made on the 64-wide one, which names it as its base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    d = tmp_path_factory.mktemp("bases")
    narrow, wide = build("qwen3", d / "narrow"), build("qwen3", d / "wide", overrides=WIDE)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(narrow),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(d / "adapter")
    return narrow, wide, d / "adapter"


def _swap_base(bases, tmp_path) -> Path:
    """The adapter, its base now the 96-wide model at the same path (a base re-downloaded as another size)."""
    _, wide, adapter = bases
    base = tmp_path / "base"
    shutil.copytree(wide, base)
    moved = shutil.copytree(adapter, tmp_path / "adapter")
    config = (moved / "adapter_config.json").read_text()
    (moved / "adapter_config.json").write_text(config.replace(str(bases[0]), str(base)))
    return moved


def test_merge_and_eval_name_both_shapes_of_a_base_of_another_size(bases, tmp_path):
    adapter = _swap_base(bases, tmp_path)
    base = tmp_path / "base"
    expected = (f"error: {adapter} was trained on a base of another size: its model.layers.0.self_attn.q_proj."
                f"lora_A.weight is [4, 64], and the base {base} needs [4, 96] (model.layers.0.self_attn.q_proj.weight "
                "[64, 96]); pass the base it was trained on")
    for args in (("merge-lora", "--adapter", str(adapter), "--output_dir", str(tmp_path / "merged")),
                 ("eval", "--model", str(adapter), "--data_path", "data/sample_alpaca.json",
                  "--output_dir", str(tmp_path / "eval"))):
        proc = run_cli(*args, check=False)
        assert proc.returncode == 2 and _one_error(proc) == expected, args
    assert not (tmp_path / "merged").exists() and not (tmp_path / "eval").exists()


def test_a_mismatch_the_headers_could_not_show_is_one_line_at_load(bases):
    """Where the base is no local folder (a Hub id), the load itself: torch's 8 lines become one."""
    from transformers import AutoModelForCausalLM

    from sftkit.errors import ConfigError
    from sftkit.models import load_adapter

    _, wide, adapter = bases
    with pytest.raises(ConfigError) as err:
        load_adapter(AutoModelForCausalLM.from_pretrained(wide), adapter, "Qwen/some-hub-id")
    assert str(err.value) == (f"{adapter} was trained on a base of another size: its model.layers.0."
                              "self_attn.q_proj.lora_A.weight is [4, 64], and the base Qwen/some-hub-id needs [4, 96] "
                              "(and 3 more tensors); pass the base it was trained on")


TRAIN = ["--data_path", "data/sample_alpaca.json", "--max_steps", "1", "--save_steps", "1", "--max_length", "256",
         "--per_device_train_batch_size", "2"]


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_a_resume_on_a_base_of_another_size_names_both_shapes(bases, tmp_path, lora):
    narrow, wide, _ = bases
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
    assert proc.returncode == 2 and _one_error(proc) == (
        f"error: {ckpt / 'model'} was trained on a base of another size: its {said}; pass the base it was trained on")


# ---- merge-lora's disk space ---------------------------------------------------------------------
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_merge_refuses_a_disk_smaller_than_what_it_writes(bases, tmp_path):
    """The trial: 24 MB free passed the old check (half the base's 39.2 MB of weights) and then
    failed in safetensors. The merge writes 39.2 MB of weights and 11.4 MB of tokenizer."""
    _, _, adapter = bases
    with tmpfs(tmp_path / "disk", "size=24m") as disk:
        proc = run_cli("merge-lora", "--adapter", str(adapter), "--output_dir", str(disk / "merged"), check=False)
        assert proc.returncode == 2
        assert _one_error(proc) == (f"error: --output_dir {disk / 'merged'}: 24.0 MiB free on its file system, and "
                                    "what is written there needs at least 48.3 MiB; free some space or choose another "
                                    "place")
        assert not os.listdir(disk)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_disk_that_fills_during_the_merge_leaves_nothing(bases, tmp_path):
    """Room for the bytes but only 4 files (tmpfs nr_inodes: its root, the temporary folder and
    two files): the third file written fails with ENOSPC, as a full disk does."""
    _, _, adapter = bases
    with tmpfs(tmp_path / "disk", "size=200m,nr_inodes=4") as disk:
        proc = run_cli("merge-lora", "--adapter", str(adapter), "--output_dir", str(disk / "merged"), check=False)
        assert proc.returncode == 2
        line = _one_error(proc)
        assert line.startswith(f"error: --output_dir {disk / 'merged'}: the disk filled while the merged model was "
                               "written (No space left on device, "), line
        assert line.endswith("bytes free now); the partial copy was removed and nothing was written there: free some "
                             "space or choose another place"), line
        assert not os.listdir(disk)
