"""Security: no remote code unless asked, no pickle weights unless converted, safe YAML, no secret
in logs or outputs, and user text never becomes control tokens (see test_render)."""

from __future__ import annotations

import json

from conftest import ROOT, run_cli

TRAIN = ["train", "--data_path", "data/sample_alpaca.json", "--max_steps", "1", "--save_steps", "1", "--use_lora",
         "--max_length", "512"]


def test_pickle_only_weights_are_refused(tmp_path):
    import torch
    from transformers import AutoTokenizer, Qwen3Config

    from sftkit.models import TINY_CONFIG, bundled_tokenizer_dir

    Qwen3Config(**TINY_CONFIG).save_pretrained(tmp_path / "m")
    AutoTokenizer.from_pretrained(bundled_tokenizer_dir()).save_pretrained(tmp_path / "m")
    torch.save({"x": torch.zeros(1)}, tmp_path / "m" / "pytorch_model.bin")
    proc = run_cli(*TRAIN, "--model_name_or_path", str(tmp_path / "m"), "--output_dir", str(tmp_path / "o"), check=False)
    assert proc.returncode == 2 and "holds only pickle weights" in proc.stderr and "Traceback" not in proc.stderr


def test_remote_code_is_not_run_unless_asked(tmp_path):
    from sftkit.config import SFTConfig
    from sftkit.models import resolve_model_path

    assert SFTConfig().trust_remote_code is False
    model = tmp_path / "m"
    import shutil

    shutil.copytree(resolve_model_path("tiny-qwen3"), model)
    marker = tmp_path / "code_ran"
    (model / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.Config", "AutoModelForCausalLM": "evil.Model"}
    (model / "config.json").write_text(json.dumps(config))
    proc = run_cli(*TRAIN, "--model_name_or_path", str(model), "--output_dir", str(tmp_path / "o"), check=False)
    assert not marker.exists()
    assert "Traceback" not in proc.stderr


def test_yaml_is_loaded_safely(tmp_path):
    marker = tmp_path / "yaml_ran"
    (tmp_path / "c.yaml").write_text(f"learning_rate: !!python/object/apply:os.system ['touch {marker}']\n")
    proc = run_cli("train", "--config", str(tmp_path / "c.yaml"), check=False)
    assert proc.returncode == 2 and "not valid YAML" in proc.stderr and not marker.exists()


def test_no_secret_reaches_logs_config_or_checkpoints(tmp_path):
    secrets = {"HF_TOKEN": "hf_SECRETtoken123456789", "WANDB_API_KEY": "wandbSECRETkey0123456789abcdef"}
    out = tmp_path / "o"
    proc = run_cli(*TRAIN, "--output_dir", str(out), env=secrets)
    for value in secrets.values():
        assert value not in proc.stdout + proc.stderr
        for f in out.rglob("*"):
            if f.is_file():
                assert value.encode() not in f.read_bytes(), f
    assert (out / "checkpoint-1" / "trainer_state.json").is_file()
    assert ROOT.is_dir()
