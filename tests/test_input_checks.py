"""Every input is checked before work (issue 16): numbers against their ranges, the places a command
writes, YAML that expands, hostile chat templates, models that ship code, and rows far too long.
Each failure is one line and exit 2, before the model loads, with nothing written.

The range sweep runs the CLI in-process (typer's CliRunner on build_app(): the same parsing and
checks as the console script, ~10 ms a call instead of ~5 s); the rest run the console script.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import BIN, ROOT, read_metrics, run_cli
from typer.testing import CliRunner

from sftkit.cli import build_app
from sftkit.config import COMMAND_OPTIONS, SFTConfig, eval_fields, prepare_fields
from sftkit.data.options import DataOptions
from sftkit.errors import ConfigError
from sftkit.options import Range, field_kind

NUMERIC = ("int", "float", "list[float]")
COMMANDS = {  # merge-lora has no numeric option; its --max_shard_size is checked below
    "train": dataclasses.fields(SFTConfig),
    "prepare-data": prepare_fields(),
    "eval": [*eval_fields(), *dataclasses.fields(COMMAND_OPTIONS["eval"])],
}
# what each command needs besides the option under test, pointing at nothing that exists: if an
# option were checked only after loading, the error would name the missing model instead
REQUIRED = {"train": ["--model_name_or_path", "/nonexistent/model"],
            "prepare-data": ["--model_name_or_path", "/nonexistent/model", "--data_path", "/nonexistent/d.jsonl"],
            "eval": ["--model", "/nonexistent/model", "--data_path", "/nonexistent/d.jsonl"]}


def numeric_fields(fields) -> list[dataclasses.Field]:
    return [f for f in fields if field_kind(f)[0] in NUMERIC]


def test_every_numeric_option_has_a_range():
    """A numeric option without a range would escape the sweep below."""
    classes = [SFTConfig, *COMMAND_OPTIONS.values()]
    missing = [f.name for cls in classes for f in numeric_fields(dataclasses.fields(cls)) if "range" not in f.metadata]
    assert not missing


def edges(rng: Range, kind: str) -> tuple[list, list]:
    """(values at the bounds that are accepted, values at or past them that are refused)."""
    step = 1 if kind == "int" else 0.01
    ok, bad = [], []
    if rng.lo is not None:
        (bad if rng.lo_open else ok).append(rng.lo)
        bad.append(rng.lo - step)
        ok.append(rng.lo + step)
    if rng.hi is not None:
        (bad if rng.hi_open else ok).append(rng.hi)
        bad.append(rng.hi + step)
        ok.append(rng.hi - step)
    if rng.off is not None:
        ok.append(rng.off)
        bad.append(rng.off - 1)
    if kind != "int":
        bad += [float("nan"), float("inf")]
    return ok, [b for b in bad if b != rng.off]


def _cli_text(value) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


@pytest.mark.parametrize("command", COMMANDS)
def test_numbers_past_their_bounds_fail_in_one_line_before_anything_loads(command, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("SFTKIT_CACHE", str(cache))
    runner, app = CliRunner(), build_app()
    fields = numeric_fields(COMMANDS[command])
    for f in fields:
        kind = field_kind(f)[0]
        for value in edges(f.metadata["range"], kind.replace("list[float]", "float"))[1]:
            out = tmp_path / "out"
            extra = ["--use_lora"] if f.name.startswith("lora_") else []
            result = runner.invoke(app, [command, *REQUIRED[command], "--output_dir", str(out), *extra,
                                         f"--{f.name}", _cli_text(value)], catch_exceptions=False)
            lines = [x for x in result.output.splitlines() if x.strip()]
            assert result.exit_code == 2 and len(lines) == 1, (f.name, value, result.output)
            assert lines[0].startswith(f"error: {f.name} must be "), (f.name, value, lines)
            assert not out.exists() and not cache.exists(), (f.name, value)


def test_numbers_at_their_bounds_are_accepted():
    for cls in (SFTConfig, *COMMAND_OPTIONS.values()):
        for f in numeric_fields(dataclasses.fields(cls)):
            kind = field_kind(f)[0]
            for value in edges(f.metadata["range"], kind.replace("list[float]", "float"))[0]:
                extra = {"use_lora": True} if f.name.startswith("lora_") else {}
                if f.name == "data_weights":
                    extra, value = {"data_path": ["a.jsonl"]}, [value]
                if f.name == "sequence_parallel_size":
                    extra = {"packing": True}  # it splits packed rows (SFTConfig.validate)
                cls(**{f.name: int(value) if kind == "int" else value}, **extra)


@pytest.mark.parametrize(("flags", "said"), [
    (["--seed", "-1"], "seed must be in [0, 4294967295], got -1"),
    (["--adam_beta2", "1.5"], "adam_beta2 must be in [0, 1), got 1.5"),
    (["--num_train_epochs", "0"], "num_train_epochs must be above 0 (while max_steps is not set), got 0.0"),
    (["--num_train_epochs", "-3"], "num_train_epochs must be above 0 (while max_steps is not set), got -3.0"),
    (["--save_steps", "-1"], "save_steps must be at least 0, got -1"),
    (["--max_steps", "0"], "max_steps must be at least 1, or -1 (off), got 0"),
    (["--use_lora", "--lora_dropout", "1.5"], "lora_dropout must be in [0, 1), got 1.5"),
    (["--learning_rate", "nan"], "learning_rate must be above 0, got nan"),
])
def test_the_issues_numbers_name_the_option_and_its_range(flags, said):
    result = CliRunner().invoke(build_app(), ["train", *flags], catch_exceptions=False)
    assert result.exit_code == 2 and result.output.strip() == f"error: {said}", result.output


def test_prepare_inspect_and_merge_shard_size_are_checked_too(tmp_path):
    app, runner = build_app(), CliRunner()
    result = runner.invoke(app, ["prepare-data", "--inspect", "-1", "--output_dir", str(tmp_path / "o")])
    assert result.exit_code == 2 and result.output.strip() == "error: --inspect must be at least 0, got -1"
    result = runner.invoke(app, ["merge-lora", "--adapter", str(tmp_path), "--output_dir", str(tmp_path / "m"),
                                 "--max_shard_size", "0GB"])
    assert result.exit_code == 2 and result.output.startswith("error: --max_shard_size '0GB': expected a size")
    assert not (tmp_path / "o").exists() and not (tmp_path / "m").exists()


def test_epochs_may_be_zero_when_max_steps_sets_the_length():
    assert SFTConfig(num_train_epochs=0, max_steps=5).max_steps == 5
    with pytest.raises(ConfigError, match="num_train_epochs"):
        SFTConfig(num_train_epochs=0)
    with pytest.raises(ConfigError, match="--max_shard_size 'lots'"):
        COMMAND_OPTIONS["merge-lora"](max_shard_size="lots")


def test_help_shows_the_ranges():
    result = CliRunner().invoke(build_app(), ["train", "--help"], env={"COLUMNS": "200"})
    assert "[range: [0, 1)]" in result.output and "[range: >= 1, or -1 (off)]" in result.output


# ---- places ---------------------------------------------------------------------------------------
def _data(tmp: Path) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(8)]
    path = tmp / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _one_error(proc, *fragments: str) -> str:
    lines = [x for x in (proc.stdout + proc.stderr).splitlines() if x.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stdout + proc.stderr
    assert all(f in lines[0] for f in fragments), lines[0]
    return lines[0]


def _can_bind_read_only(tmp: Path) -> bool:
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind -o ro {tmp} {tmp} && ! touch {tmp}/x"],
                           capture_output=True, check=False) if shutil.which("unshare") else None
    return probe is not None and probe.returncode == 0


def test_read_only_places_fail_in_one_line_before_the_model_loads(tmp_path):
    ro = tmp_path / "ro"
    (ro / "cache").mkdir(parents=True)
    if not _can_bind_read_only(ro):
        pytest.skip("no read-only bind mount here (needs `unshare -m` and mount rights)")
    data = _data(tmp_path)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/nonexistent/base"}))
    sftkit = BIN / "sftkit"
    cases = {
        "train": (f"train --data_path {data} --output_dir {ro}/run --max_steps 1", f"--output_dir {ro}/run"),
        "prepare-data": (f"prepare-data --data_path {data} --output_dir {ro}/prep", f"--output_dir {ro}/prep"),
        "merge-lora": (f"merge-lora --adapter {adapter} --output_dir {ro}/merged", f"--output_dir {ro}/merged"),
        # the cache (a new data set is prepared into it) on the read-only mount, the output elsewhere
        "cache": (f"train --data_path {data} --output_dir {tmp_path}/run --max_steps 1",
                  "the cache folder", "set SFTKIT_CACHE"),
    }
    for args, *said in cases.values():
        cmd = f"mount --bind -o ro {ro} {ro} && SFTKIT_CACHE={ro}/cache exec {sftkit} {args}"
        proc = subprocess.run(["unshare", "-m", "sh", "-c", cmd], cwd=ROOT, capture_output=True, text=True,
                              timeout=300, check=False)
        _one_error(proc, *said, "Read-only file system")
    assert not (tmp_path / "run" / "final").exists()


def test_a_folder_the_user_cannot_write_fails_in_one_line(tmp_path):
    """A folder without write permission. Root writes anywhere, so the command runs as root without
    the capability that overrides file permissions (setpriv), which is how an ordinary user stands."""
    if os.geteuid() == 0 and not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: permissions cannot be made to bind")
    drop = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    data = _data(tmp_path)
    for args in (["train", "--data_path", str(data), "--max_steps", "1"], ["prepare-data", "--data_path", str(data)]):
        proc = subprocess.run([*drop, str(BIN / "sftkit"), *args, "--output_dir", str(locked / "run")], cwd=ROOT,
                              capture_output=True, text=True, timeout=300, check=False)
        _one_error(proc, f"--output_dir {locked}/run", "Permission denied")
    assert not any(locked.iterdir())


def test_too_little_space_is_one_line(tmp_path):
    """A 1 MB file system for the output of a full fine-tune and a merge of a model whose weights
    are 4 MB: at least 2 MB will be written, so both stop before the model loads."""
    small = tmp_path / "small"
    small.mkdir()
    if not shutil.which("unshare") or subprocess.run(
            ["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {small}"], check=False).returncode:
        pytest.skip("no tmpfs mount here (needs `unshare -m` and mount rights)")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    (model / "model.safetensors").write_bytes(bytes(4 * 2**20))  # only its size is read
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(model)}))
    data = _data(tmp_path)
    for args in (f"train --model_name_or_path {model} --data_path {data} --output_dir {small}/run",
                 f"merge-lora --adapter {adapter} --output_dir {small}/merged"):
        cmd = f"mount -t tmpfs -o size=1m tmpfs {small} && exec {BIN / 'sftkit'} {args}"
        proc = subprocess.run(["unshare", "-m", "sh", "-c", cmd], cwd=ROOT, capture_output=True, text=True,
                              timeout=300, check=False)
        line = _one_error(proc, "MiB free on its file system", "needs at least 2.0 MiB")
        assert line.startswith(f"error: --output_dir {small}/"), line


# ---- YAML -----------------------------------------------------------------------------------------
def _bomb(path: Path, levels: int, key: str = "seed") -> Path:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels + 1)]
    path.write_text("\n".join([*lines, f"{key}: *a{levels}"]) + "\n")
    return path


# Runs a command and prints its exit code and peak RSS (KB). A child's ru_maxrss counts the memory of
# the process it was forked from, and pytest's holds ~800 MB by then: forked from this small
# interpreter instead, the command's own peak is what is read.
_MEASURE = """import os, sys, time
start = time.time()
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss, time.time() - start)
"""


def measured(cmd: list[str], cwd: Path = ROOT) -> tuple[int, str, float, float]:
    """(exit code, stderr, wall seconds, peak RSS in MB) of `cmd`, its stdout and stderr kept apart."""
    proc = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], cwd=cwd, capture_output=True, text=True,
                          timeout=300, check=True)
    code, peak_kb, wall = proc.stdout.splitlines()[-1].split()
    return int(code), proc.stderr, float(wall), int(peak_kb) / 1024


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    bomb = _bomb(tmp_path / "bomb.yaml", 7)
    assert bomb.stat().st_size < 600
    code, err, wall, peak_mb = measured([str(BIN / "sftkit"), "train", "--config", str(bomb)])
    assert code == 2 and len(err.encode()) < 1024 and err.count("\n") == 1, err
    assert "expand to more than 100,000 values" in err
    assert wall < 2 and peak_mb < 300, (wall, peak_mb)


def test_a_large_value_is_quoted_short(tmp_path):
    """1,000 strings of 100 characters (under the alias limit) given where a number goes: the line
    quotes at most 200 characters of it."""
    word = "x" * 100
    cfg = tmp_path / "big.yaml"
    cfg.write_text(f"seed: [&a1 [&a0 [{', '.join([word] * 10)}], {', '.join(['*a0'] * 9)}], {', '.join(['*a1'] * 9)}]\n")
    with pytest.raises(ConfigError) as err:
        SFTConfig.from_yaml(cfg)
    assert str(err.value).startswith("seed: expected int, got [[[") and len(str(err.value)) < 260


# ---- templates and model code -----------------------------------------------------------------------
HOSTILE = {
    "sandbox.j2": ("{{ cycler.__init__.__globals__.os.popen('touch MARKER').read() }}", "outside Jinja's sandbox"),
    "include.j2": ("{% include 'other.j2' %}", "{% include %} or {% import %}"),
    "import.j2": ("{% import 'other.j2' as other %}{{ other.x }}", "{% include %} or {% import %}"),
    "syntax.j2": ("{% for %}{% endfor %}", "syntax error at line 1"),
}


def test_hostile_templates_are_one_line_in_every_command(tmp_path):
    marker = tmp_path / "pwned"
    data = _data(tmp_path)
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
    data = _data(tmp_path)
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


# ---- rows ---------------------------------------------------------------------------------------------
def test_a_50_mb_row_is_dropped_without_tokenizing_it(tmp_path):
    big = tmp_path / "big.jsonl"
    small = _data(tmp_path)
    with big.open("w") as f:
        f.write(json.dumps({"messages": [{"role": "user", "content": "word " * 10_000_000},
                                         {"role": "assistant", "content": "ok"}]}) + "\n")
        f.write(small.read_text())
    assert big.stat().st_size > 50_000_000

    def prepare(data: Path, out: str) -> tuple[float, float]:
        code, err, wall, peak_mb = measured([str(BIN / "sftkit"), "prepare-data", "--data_path", str(data),
                                             "--output_dir", str(tmp_path / out)])
        assert code == 0, err[-2000:]
        return wall, peak_mb

    small_s, _ = prepare(small, "small")
    big_s, big_mb = prepare(big, "big")
    manifest = json.loads((tmp_path / "big" / "manifest.json").read_text())
    assert manifest["dropped"]["too_long"] == 1 and manifest["examples_kept"] == 8
    # tokenizing it took 60 s and 6.8 GB; bounded, it costs what reading 50 MB costs (the issue's
    # 10 s, or the small file's time plus 5 s where the machine is slower at starting up)
    assert big_mb < 1024 and big_s < max(10, small_s + 5), (big_s, small_s, big_mb)


def test_a_long_row_is_cut_before_tokenizing_when_truncating(tmp_path, tok):
    """--truncation right/left: a reply longer than max_length tokens can hold is cut to twice that
    many characters before tokenizing, and the tokens kept are those of tokenizing all of it."""
    from sftkit.data.prepare import load_prepared, prepare

    conv = [{"role": "user", "content": "Count."},
            {"role": "assistant", "content": "".join(f"w{i} " for i in range(40_000))}]  # 250k characters
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"messages": conv}) + "\n")
    full = tok(tok.apply_chat_template(conv, tokenize=False), add_special_tokens=False)["input_ids"]
    for side, kept in (("right", full[:64]), ("left", full[-64:])):
        manifest = prepare(DataOptions(max_length=64, truncation=side), [str(data)], tmp_path / side, tok)
        assert manifest["examples_kept"] == 1 and load_prepared(tmp_path / side)[0]["input_ids"] == kept, side


# ---- options whose effect depends on the data ----------------------------------------------------------
def test_a_step_bigger_than_the_data_is_said_once(tmp_path):
    """50 accumulation steps of 4 on 8 examples: each step is the whole epoch (every epoch ends a
    step), said once with the accumulation that fills the micro-batches; the run trains 2 epochs."""
    data = _data(tmp_path)  # 8 examples
    proc = run_cli("train", "--data_path", str(data), "--output_dir", str(tmp_path / "o"), "--num_train_epochs", "2",
                   "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "50", "--save_steps", "0",
                   "--dataloader_num_workers", "0")
    warning = [x for x in proc.stdout.splitlines() if "warning: one optimizer step" in x]
    assert len(warning) == 1 and "asks for 200 examples" in warning[0] and "an epoch holds 8" in warning[0]
    assert "--gradient_accumulation_steps 2 fills them" in " ".join(proc.stdout.split())
    steps = [r for r in read_metrics(tmp_path / "o") if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2] and steps[-1]["supervised_tokens"] > 0


def test_skipping_most_steps_stops_the_run(tmp_path):
    data = _data(tmp_path)
    # lr 1e30 (as in test_training's NaN test): after a few steps every gradient is nan, every step skipped
    proc = run_cli("train", "--data_path", str(data), "--output_dir", str(tmp_path / "o"), "--max_steps", "30",
                   "--learning_rate", "1e30", "--warmup_ratio", "0", "--max_grad_norm", "0", "--skip_nan_steps",
                   "--per_device_train_batch_size", "4", "--max_length", "512", "--save_steps", "0", check=False)
    errors = [x for x in proc.stderr.splitlines() if x.strip()]  # stdout holds the progress lines
    assert proc.returncode == 2 and len(errors) == 1, proc.stdout[-1500:] + proc.stderr[-1500:]
    assert "of the first 10 steps had a nan or inf gradient and were skipped (--skip_nan_steps allows 10%)" \
        in errors[0]
