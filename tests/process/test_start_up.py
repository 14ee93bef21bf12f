"""What a fresh `sftkit` process does before any work (the console script itself, not a warm fork):
a mistake that needs no model fails before torch is imported, the bundled tokenizer loads without
torch, no third-party line is printed, --version, and a run file as the argument."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import BIN, LORA, ROOT, SAMPLE, predicted_peak_holds, run_cli

DEMO = ROOT / "data" / "demo_alpaca.json"  # 8 rows; at max_length 40 one of them is too long


# Each mistake that needs no model, and the start of its one line; the process must not have
# imported torch (8-20 s on 2 busy cores) when it reports it. bench/time_to_error.py times them.
BAD_ROW = "error: {bad}:line 2: field 'messages': expected a list of messages, got a number"


NO_MODEL_MISTAKES = {
    "missing data file": (["train", "--data_path", "mydata/nope.jsonl"], "error: mydata/nope.jsonl: no such file"),
    "no --data_path": (["train"], "error: no data given; pass --data_path"),
    "missing eval file": (["train", "--data_path", str(DEMO), "--eval_data_path", "nope/e.jsonl"],
                          "error: nope/e.jsonl: no such file"),
    "output folder under a file": (["train", "--data_path", str(DEMO), "--output_dir", "{file}/o"],
                                   "error: --output_dir {file}/o: {file} is a file"),
    "unreadable data file": (["prepare-data", "--data_path", "{locked}", "--output_dir", "{tmp}/p"],
                             "error: {locked}: cannot be read (permission denied)"),
    "bad row, train": (["train", "--data_path", "{bad}"], BAD_ROW),
    "bad row, prepare-data": (["prepare-data", "--data_path", "{bad}", "--output_dir", "{tmp}/p"], BAD_ROW),
    "bad row, eval": (["eval", "--model", "tiny-qwen3", "--data_path", "{bad}", "--output_dir", "{tmp}/e"], BAD_ROW),
    "eval without data": (["eval", "--model", "{tmp}"], "error: no data given"),
    "eval output over its data": (["eval", "--model", "tiny-qwen3", "--data_path", str(DEMO), "--output_dir",
                                   str(DEMO.parent)], f"error: --output_dir {DEMO.parent} would overwrite an input"),
    # port 9 of this machine refuses at once: a Hub that cannot be reached, without HF_HUB_OFFLINE
    "unreachable Hub": (["train", "--data_path", str(DEMO), "--model_name_or_path", "Qwen/Qwen3-0.6B"],
                        ("error: --model_name_or_path Qwen/Qwen3-0.6B: not a local folder, and the Hugging Face Hub "
                        "(http://127.0.0.1:9/Qwen/Qwen3-0.6B) cannot be reached (Connection refused); set "
                        "HF_HUB_OFFLINE=1 to load it from the local Hugging Face cache, or pass a local model folder")),
}


OFFLINE_UNSET = {"HF_HUB_OFFLINE": "", "HF_ENDPOINT": "http://127.0.0.1:9", "HTTPS_PROXY": "", "https_proxy": "",
                 "HTTP_PROXY": "", "http_proxy": ""}


CHECK_ONE = """
import sys
from sftkit.cli import build_app
try:
    build_app()(sys.argv[1:], prog_name="sftkit")
except SystemExit as done:
    print(f"exit {done.code}; torch imported: {'torch' in sys.modules}", file=sys.stderr)
"""


def test_mistakes_that_need_no_model_fail_before_torch_imports(tmp_path):
    (tmp_path / "a_file").write_text("")
    locked = tmp_path / "locked.jsonl"
    locked.write_text('{"instruction": "a", "output": "b"}\n')
    locked.chmod(0)
    if os.access(locked, os.R_OK):  # root reads anything: nothing to check there
        locked.chmod(0o644)
    bad = tmp_path / "bad.jsonl"  # read before the tokenizer: the first rows are checked with the files
    bad.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'
                   '{"messages": 5}\n')
    names = {"file": tmp_path / "a_file", "locked": locked, "tmp": tmp_path, "bad": bad}
    for name, (argv, said) in NO_MODEL_MISTAKES.items():
        if name == "unreadable data file" and os.access(locked, os.R_OK):
            continue
        args = [a.format(**names) for a in argv]
        if args[0] == "train" and "--output_dir" not in args:
            args += ["--output_dir", str(tmp_path / "out")]
        proc = subprocess.run([sys.executable, "-c", CHECK_ONE, *args], check=False, cwd=tmp_path, capture_output=True, text=True,
                              env={**os.environ, **(OFFLINE_UNSET if name == "unreachable Hub" else {})}, timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 2 and lines[0].startswith(said.format(**names)), (name, proc.stderr)
        assert lines[1] == "exit 2; torch imported: False", (name, proc.stderr)
    assert not any((tmp_path / d).exists() for d in ("out", "p", "e"))


def test_version_and_a_run_file_as_the_argument(tmp_path):
    from sftkit._version import __version__

    assert BIN.joinpath("sftkit").exists()
    version = subprocess.run([str(BIN / "sftkit"), "--version"], capture_output=True, text=True, check=False)
    assert (version.returncode, version.stdout) == (0, f"sftkit {__version__}\n")
    run = tmp_path / "run.yaml"
    run.write_text("max_steps: 1\nwarmup_ratio: 2\n")  # out of range: the error proves the file was read
    proc = subprocess.run([str(BIN / "sftkit"), "train", str(run), "--data_path", str(DEMO), "--use_lora",
                           "--output_dir", str(tmp_path / "o")], capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: warmup_ratio must be "), proc.stderr


def test_a_train_run_prints_no_third_party_warnings(tmp_path):
    """LoRA on the tied tiny model with a checkpoint: accelerate's 'Removed shared tensor', PEFT's
    deprecation warning, DeepSpeed's 'Setting accelerator to CPU' and the weight-loading bars all
    used to print. --verbose shows them again (so this test can fail)."""
    args = [*LORA, "--data_path", SAMPLE, "--max_steps", "2", "--save_steps", "1"]
    quiet = run_cli("train", *args, "--output_dir", str(tmp_path / "q"), fresh=True)  # import-time lines too
    assert quiet.stderr.strip() == "", quiet.stderr
    predicted_peak_holds(tmp_path / "q")  # a fresh LoRA run: the memory model's prediction holds here too
    for noise in ("Setting accelerator to CPU", "Removed shared tensor", "Loading weights", "Writing model shards",
                  "Failed to load CPU gemm_4bit_forward"):  # the last: bitsandbytes, when installed, imported by PEFT
        assert noise not in quiet.stdout
    # forked from the warm server (the imports' lines are the quiet run's to show): transformers'
    # FutureWarning (is_gradient_checkpointing) shows that --verbose lets noise through. (A LoRA
    # checkpoint no longer holds the tied embedding, so accelerate's "Removed shared tensor" is gone
    # from this run; the weight-loading bar is not asserted: a clean clone's run did not show it.)
    loud = run_cli("train", *args, "--output_dir", str(tmp_path / "v"), "--verbose")
    assert "FutureWarning" in loud.stderr, loud.stderr


def test_the_bundled_tokenizer_loads_without_torch():
    """load_tokenizer('tiny-qwen3') in a fresh interpreter: torch is never imported (prepare-data
    needs none). That it is the tokenizer AutoTokenizer loads: tests/test_render.py."""
    code = "import sys; from sftkit.models import load_tokenizer; load_tokenizer('tiny-qwen3'); print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert done.stdout.strip() == "False", done.stderr
