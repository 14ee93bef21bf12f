"""SFTConfig: YAML round trip, flag overrides, clear errors; the CLI's help."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import run_cli

from sftkit.config import SFTConfig, field_docs
from sftkit.errors import ConfigError

ORIGINAL_FLAGS = ["--data_path", "--eval_data_path", "--output_dir", "--model_name_or_path", "--num_train_epochs", "--max_steps", "--per_device_train_batch_size", "--gradient_accumulation_steps", "--learning_rate", "--max_length", "--use_lora", "--lora_r", "--lora_alpha", "--lora_dropout", "--bf16", "--fp16", "--gradient_checkpointing", "--format_type", "--resume_from_checkpoint", "--run_name", "--report_to", "--seed", "--save_steps", "--logging_steps"]


def test_yaml_round_trip(tmp_path):
    cfg = SFTConfig(data_path=["a.json", "b.jsonl"], use_lora=True, lora_r=4, learning_rate=3e-4)
    cfg.save_yaml(tmp_path / "c.yaml")
    assert SFTConfig.from_yaml(tmp_path / "c.yaml") == cfg


def test_overrides_win_over_yaml(tmp_path):
    (tmp_path / "c.yaml").write_text("learning_rate: 0.1\nuse_lora: true\nlora_r: 4\n")
    cfg = SFTConfig.from_yaml(tmp_path / "c.yaml", {"lora_r": 8})
    assert cfg.learning_rate == 0.1 and cfg.lora_r == 8


def test_unknown_key_suggests_the_closest(tmp_path):
    (tmp_path / "c.yaml").write_text("learning_rte: 0.1\n")
    with pytest.raises(ConfigError, match="unknown option 'learning_rte'; did you mean 'learning_rate'"):
        SFTConfig.from_yaml(tmp_path / "c.yaml")


@pytest.mark.parametrize("values, message", [
    ({"bf16": True, "fp16": True}, "choose one"),
    ({"format_type": "xml"}, "format_type"),
    ({"per_device_train_batch_size": 0}, "at least 1"),
    ({"truncation": "middle"}, "truncation"),
    ({"lora_r": 64}, "lora_r set without use_lora; add --use_lora"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save set without use_lora"),
    ({"packing": True, "attn_implementation": "sdpa_paged"}, "packing needs an attention implementation"),
])
def test_invalid_values_fail_with_the_fix(values, message):
    with pytest.raises(ConfigError, match=message):
        SFTConfig(**values)


def test_every_field_has_a_docstring():
    docs = field_docs()
    missing = [f.name for f in dataclasses.fields(SFTConfig) if not docs.get(f.name)]
    assert missing == []


def test_help_lists_commands_and_documents_options():
    top = run_cli("--help").stdout
    for cmd in ("prepare-data", "train", "eval", "merge-lora"):
        assert cmd in top
    train = run_cli("train", "--help", env={"COLUMNS": "200"}).stdout
    for flag in ORIGINAL_FLAGS:
        assert flag in train, flag
    assert "Examples per micro-batch" in train
    assert "--inspect" in run_cli("prepare-data", "--help", env={"COLUMNS": "200"}).stdout
    assert "--model" in run_cli("eval", "--help", env={"COLUMNS": "200"}).stdout
    assert "--adapter" in run_cli("merge-lora", "--help", env={"COLUMNS": "200"}).stdout


def test_bad_flag_and_bad_yaml_are_one_line_errors(tmp_path):
    proc = run_cli("train", "--learning_rte", "1", check=False)
    assert proc.returncode == 2 and "No such option" in proc.stderr and "Traceback" not in proc.stderr
    assert "--learning_rate" in proc.stderr  # click suggests the closest flag
    (tmp_path / "c.yaml").write_text("lora_r: [unclosed\n")
    proc = run_cli("train", "--config", str(tmp_path / "c.yaml"), check=False)
    assert proc.returncode == 2 and "not valid YAML" in proc.stderr and "Traceback" not in proc.stderr


def test_wrong_types_are_named(tmp_path):
    (tmp_path / "c.yaml").write_text("lora_r: sixteen\n")
    with pytest.raises(ConfigError, match="lora_r: expected int, got 'sixteen'"):
        SFTConfig.from_yaml(tmp_path / "c.yaml")
    assert SFTConfig(data_path="one.json", learning_rate=1).data_path == ["one.json"]
    (tmp_path / "lr.yaml").write_text("learning_rate: 1e-5\n")  # PyYAML reads this as a string
    assert SFTConfig.from_yaml(tmp_path / "lr.yaml").learning_rate == 1e-5


def test_config_reference_is_current():
    from conftest import ROOT

    from sftkit.config import reference_markdown

    assert (ROOT / "docs" / "CONFIG.md").read_text() == reference_markdown(), \
        "docs/CONFIG.md is stale: run `python -m sftkit.config > docs/CONFIG.md`"


def test_example_configs_load():
    from conftest import ROOT

    files = sorted((ROOT / "examples").glob("*.yaml"))
    assert len(files) >= 5
    for f in files:
        cfg = SFTConfig.from_yaml(f)
        assert cfg.model_name_or_path


def test_deepspeed_batch_size_that_contradicts_the_flags(tmp_path):
    import json

    from conftest import ROOT

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
