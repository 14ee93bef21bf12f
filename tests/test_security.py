"""Untrusted input never runs, in every command: hostile chat templates and models that ship code are
refused in one line before anything loads (the CLI in this process). The console script's refusals
of pickles, remote code and unsafe YAML: tests/process/test_security_cli.py."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from conftest import chat_rows
from typer.testing import CliRunner

from sftkit.cli import build_app

HOSTILE = {
    "sandbox.j2": ("{{ cycler.__init__.__globals__.os.popen('touch MARKER').read() }}", "outside Jinja's sandbox"),
    "include.j2": ("{% include 'other.j2' %}", "{% include %} or {% import %}"),
    "import.j2": ("{% import 'other.j2' as other %}{{ other.x }}", "{% include %} or {% import %}"),
    "syntax.j2": ("{% for %}{% endfor %}", "syntax error at line 1"),
}


def test_hostile_templates_are_one_line_in_every_command(tmp_path):
    marker = tmp_path / "pwned"
    data = chat_rows(tmp_path)
    app, runner = build_app(), CliRunner()
    for name, (text, said) in HOSTILE.items():
        template = tmp_path / name
        template.write_text(text.replace("MARKER", str(marker)))
        for command in (["prepare-data", "--output_dir", str(tmp_path / "p")],
                        ["train", "--output_dir", str(tmp_path / "t"), "--max_steps", "1"]):
            result = runner.invoke(app, [*command, "--data_path", str(data), "--chat_template", str(template)],
                                   catch_exceptions=False)
            lines = [x for x in result.output.splitlines() if x.strip()]
            assert result.exit_code == 2 and len(lines) == 1, result.output
            assert lines[0].startswith(f"error: {template}: the chat template ") and said in lines[0], lines[0]
    # eval takes the template of the model it is given: a model folder whose own template is hostile
    from sftkit.models import resolve_model_path

    model = tmp_path / "model"
    shutil.copytree(resolve_model_path("tiny-qwen3"), model)
    (model / "chat_template.jinja").write_text(HOSTILE["sandbox.j2"][0].replace("MARKER", str(marker)))
    result = runner.invoke(app, ["eval", "--model", str(model), "--data_path", str(data)], catch_exceptions=False)
    assert result.exit_code == 2 and result.output.strip().startswith(
        f"error: {model}/chat_template.jinja: the chat template reaches outside Jinja's sandbox"), result.output
    assert not marker.exists() and not (tmp_path / "p").exists() and not (tmp_path / "t").exists()


def test_a_model_that_ships_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    model = tmp_path / "custom"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "model_type": "sftkit-test-custom",
        "auto_map": {"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomModel"}}))
    (model / "custom.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(sys.modules["sftkit"].__file__).parent / "assets" / "qwen3_tokenizer" / name, model / name)
    data = chat_rows(tmp_path)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(model)}))
    app, runner = build_app(), CliRunner()
    for args in (["train", "--model_name_or_path", str(model), "--data_path", str(data), "--output_dir",
                  str(tmp_path / "t")],
                 ["prepare-data", "--model_name_or_path", str(model), "--data_path", str(data), "--output_dir",
                  str(tmp_path / "p")],
                 ["eval", "--model", str(model), "--data_path", str(data)],
                 ["merge-lora", "--adapter", str(adapter), "--output_dir", str(tmp_path / "m")]):
        result = runner.invoke(app, args, catch_exceptions=False)
        lines = [x for x in result.output.splitlines() if x.strip()]
        assert result.exit_code == 2 and len(lines) == 1, (args[0], result.output)
        assert f"{model}/config.json: model_type 'sftkit-test-custom'" in lines[0] and "--trust_remote_code" in lines[0]
    assert not marker.exists()
