"""What a user sees (issue 25): the console of train and eval says what happened to the data,
a log file fills while the run goes, and the end line gives the numbers and the places."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time

import pytest
from conftest import BIN, ROOT, read_metrics

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
    cmd = [str(BIN / "sftkit"), "train", "--data_path", str(DEMO), "--eval_data_path", str(DEMO),
           "--max_length", "40", "--output_dir", str(out), "--max_steps", "4", "--logging_steps", "1",
           "--eval_steps", "2", "--save_steps", "0", "--per_device_train_batch_size", "2",
           "--report_to", "tensorboard"]
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ), stdout=f, stderr=subprocess.STDOUT)
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
    assert end["train_loss"] == [r["loss"] for r in records if "loss" in r][-1]
    assert any(p.name.startswith("events.out.tfevents") for p in (out / out.name).iterdir())
    card = (out / "final" / "README.md").read_text()  # not PEFT's empty card naming a cache path
    assert "a fully fine-tuned model of `tiny-qwen3`" in card and f"`{DEMO}`" in card
    assert os.environ["SFTKIT_CACHE"] not in card


def test_terminal_bar_shows_eval(tmp_path):
    """In a terminal the bar starts with no loss (it showed `loss nan` before step 1), names the
    eval while it runs, and keeps the last eval loss beside the train loss."""
    from rich.console import Console

    from sftkit.progress import train_progress

    buf = io.StringIO()
    con = Console(file=buf, force_terminal=True, width=160, soft_wrap=True)
    with train_progress(4, 0, console=con) as bar:
        bar.prog.refresh()
        first = buf.getvalue()
        bar.update(1, loss=2.5, lr=1e-3, tokens_per_s=100)
        bar.eval_started()
        bar.prog.refresh()
        during = buf.getvalue()[len(first):]
        bar.eval_done(1, 2.25, 9.49)
        bar.update(2, loss=2.0, lr=1e-3, tokens_per_s=100)
        bar.prog.refresh()
        after = buf.getvalue()[len(first) + len(during):]
    assert "train" in first and "loss" not in first and "nan" not in first
    assert "eval" in during and "loss 2.5000" in during
    assert "loss 2.0000" in after and "eval 2.2500" in after


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


# ---- flags TRL users reach for ------------------------------------------------------------------
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


def test_report_to_takes_several_trackers_and_all():
    import importlib.util

    from sftkit.config import SFTConfig
    from sftkit.errors import ConfigError

    assert SFTConfig(report_to="tensorboard,wandb").trackers == ["tensorboard", "wandb"]
    assert SFTConfig(report_to="none").trackers is None
    installed = [n for n in ("tensorboard", "wandb") if importlib.util.find_spec(n) is not None]
    assert SFTConfig(report_to="all").trackers == installed and "tensorboard" in installed
    with pytest.raises(ConfigError, match="'mlflow' is not one of none, tensorboard, wandb, all"):
        SFTConfig(report_to="tensorboard,mlflow")


def test_warmup_steps_win_over_warmup_ratio():
    from sftkit.config import SFTConfig
    from sftkit.train import lr_schedule

    by_ratio = lr_schedule(SFTConfig(warmup_ratio=0.5, lr_scheduler_type="constant"))
    by_steps = lr_schedule(SFTConfig(warmup_ratio=0.5, warmup_steps=2, lr_scheduler_type="constant"))
    assert [by_ratio(10, s) for s in range(6)] == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert [by_steps(10, s) for s in range(4)] == [0, 0.5, 1.0, 1.0]


def test_dora_and_rslora_reach_peft():
    from sftkit.config import SFTConfig
    from sftkit.models import build_for_training

    dora = build_for_training(SFTConfig(use_lora=True, use_dora=True, lora_r=4, lora_alpha=16))
    layer = dora.base_model.model.model.layers[0].self_attn.q_proj
    assert dora.peft_config["default"].use_dora and "default" in layer.lora_magnitude_vector
    assert layer.scaling["default"] == 16 / 4
    rs = build_for_training(SFTConfig(use_lora=True, use_rslora=True, lora_r=4, lora_alpha=16))
    assert rs.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"] == 16 / 4 ** 0.5


def test_neftune_noise_in_training_only():
    """Noise of at most alpha / sqrt(L x d) on each embedding in train mode, none in eval mode; at
    alpha 0 nothing is attached, and the hook never enters the saved weights."""
    import torch

    from sftkit.config import SFTConfig
    from sftkit.models import build_for_training
    from sftkit.neftune import add_neftune

    model = build_for_training(SFTConfig())
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    emb, ids = model.get_input_embeddings(), torch.arange(12).reshape(2, 6)
    plain = emb(ids).detach()
    assert add_neftune(model, 0.0) is None
    model.train()
    assert torch.equal(emb(ids), plain)
    handle = add_neftune(model, 5.0)
    noisy_a, noisy_b = emb(ids).detach(), emb(ids).detach()
    bound = 5.0 / (6 * plain.size(-1)) ** 0.5
    assert not torch.equal(noisy_a, plain) and not torch.equal(noisy_a, noisy_b)
    assert (noisy_a - plain).abs().max() <= bound and (noisy_a - plain).abs().max() > bound / 2
    model.eval()
    assert torch.equal(emb(ids), plain)
    assert model.state_dict().keys() == weights.keys()
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    handle.remove()


# ---- TRL's row formats --------------------------------------------------------------------------
def test_trl_text_and_prompt_completion_rows(tmp_path, tok):
    """{"text"}: the text's own tokens and the tokenizer's EOS, every one supervised (no template).
    {"prompt": str, "completion": str}: prompt and completion tokenized as written, then EOS; only
    the completion and EOS supervised. Message lists: the chat template's ids exactly, and only the
    completion's reply supervised, not the assistant turn inside the prompt."""
    from sftkit.data.options import DataOptions
    from sftkit.data.prepare import load_prepared, prepare
    from sftkit.data.render import IGNORE_INDEX

    text = "The sky is blue. <|im_end|> stays plain text."
    prompt = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
              {"role": "user", "content": "What color is the sky?"}]
    completion = [{"role": "assistant", "content": "It is blue."}]
    rows = {"text.jsonl": {"text": text, "source": "web"},
            "standard.jsonl": {"prompt": "The sky is", "completion": " blue."},
            "conversational.jsonl": {"prompt": prompt, "completion": completion}}
    got = {}
    for name, row in rows.items():
        (tmp_path / name).write_text(json.dumps(row) + "\n")
        out = tmp_path / name.replace(".jsonl", "")
        manifest = prepare(DataOptions(), [str(tmp_path / name)], out, tok)
        got[name] = load_prepared(out)[0]
        assert manifest["sources"][0]["format"] == ("text" if name == "text.jsonl" else "prompt_completion")

    def plain(s):
        return tok(s, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    eos = tok.eos_token_id
    assert got["text.jsonl"]["input_ids"] == plain(text) + [eos] and tok.convert_ids_to_tokens(eos) == "<|im_end|>"
    assert got["text.jsonl"]["labels"] == got["text.jsonl"]["input_ids"]
    p, c = plain("The sky is"), plain(" blue.")
    assert got["standard.jsonl"]["input_ids"] == p + c + [eos]
    assert got["standard.jsonl"]["labels"] == [IGNORE_INDEX] * len(p) + c + [eos]
    conv = got["conversational.jsonl"]
    assert conv["input_ids"] == list(tok.apply_chat_template(prompt + completion, tokenize=True, return_dict=False))
    supervised = tok.decode([t for t in conv["labels"] if t != IGNORE_INDEX])
    assert supervised == "<think>\n\n</think>\n\nIt is blue.<|im_end|>"


def test_val_size_holds_out_a_seeded_share(tmp_path, tok):
    """--val_size: the eval set is drawn from the training data by the seed, never trained on, the
    same on a second call (every rank, every resume); a count works as a share does."""
    from rich.console import Console

    from sftkit.accel import make_accelerator
    from sftkit.config import SFTConfig
    from sftkit.errors import ConfigError
    from sftkit.train import load_sets

    def sets(**kw):
        cfg = SFTConfig(data_path=[str(DEMO)], output_dir=str(tmp_path / "o"), **kw)
        con = Console(file=io.StringIO(), width=200)
        train, ev, _ = load_sets(cfg, make_accelerator(cfg), tok, con)
        return [r["input_ids"] for r in train], [r["input_ids"] for r in ev], con.file.getvalue()

    train, ev, said = sets(val_size=0.25)
    assert (len(train), len(ev)) == (6, 2) and not any(x in train for x in ev)
    assert "val: held out 2 of 8 examples for eval (--val_size 0.25, seed 42)" in said
    assert sets(val_size=0.25)[:2] == (train, ev)
    assert sets(val_size=2)[:2] == (train, ev)
    assert sets(val_size=2, seed=7)[1] != ev
    with pytest.raises(ConfigError, match="val_size and eval_data_path both name the eval set"):
        SFTConfig(val_size=0.1, eval_data_path=str(DEMO))
    with pytest.raises(ConfigError, match="holds out 8 of 8 examples"):
        sets(val_size=8)
