"""docs/python-api.md's Python snippets run as written, in order (in a subprocess, from the repo root)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import ROOT


def test_api_page_python_snippets_run(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "python-api.md").read_text(), re.DOTALL)
    assert blocks
    code = "\n".join(blocks).replace('"outputs/api"', repr(str(tmp_path / "api")))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ), capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "'loss':" in proc.stdout and "perplexity" in proc.stdout
    # the API is as quiet as the CLI (SFTTrainer(verbose=False)): these printed on every run before
    for noise in ("Setting accelerator to CPU", "FutureWarning", "Loading weights", "Removed shared tensor"):
        assert noise not in proc.stdout + proc.stderr, noise
    assert (tmp_path / "api" / "final" / "adapter_model.safetensors").is_file()
