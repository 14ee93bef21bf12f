"""SFTConfig and the options of every command: YAML and flags over it, every value checked against
its range before anything loads (the CLI in this process: typer's CliRunner on build_app(), the same
parsing and checks as the console script), one-line errors, and the documented defaults that --help
shows."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import ROOT
from typer.testing import CliRunner

from sftkit.cli import build_app
from sftkit.config import COMMAND_OPTIONS, SFTConfig, eval_fields, field_docs, prepare_fields
from sftkit.errors import ConfigError
from sftkit.options import Range, field_kind

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
    ({"torch_compile": True, "torch_compile_backend": "tensorrt"}, "'tensorrt' is not one of inductor, aot_eager"),
    ({"torch_compile_backend": "aot_eager"}, "torch_compile_backend aot_eager set without torch_compile; add"),
])
def test_invalid_values_fail_with_the_fix(values, message):
    with pytest.raises(ConfigError, match=message):
        SFTConfig(**values)


def test_wrong_types_are_named(tmp_path):
    (tmp_path / "c.yaml").write_text("lora_r: sixteen\n")
    with pytest.raises(ConfigError, match="lora_r: expected int, got 'sixteen'"):
        SFTConfig.from_yaml(tmp_path / "c.yaml")
    assert SFTConfig(data_path="one.json", learning_rate=1).data_path == ["one.json"]
    (tmp_path / "lr.yaml").write_text("learning_rate: 1e-5\n")  # PyYAML reads this as a string
    assert SFTConfig.from_yaml(tmp_path / "lr.yaml").learning_rate == 1e-5


def test_a_large_value_is_quoted_short(tmp_path):
    """1,000 strings of 100 characters (under the alias limit) given where a number goes: the line
    quotes at most 200 characters of it."""
    word = "x" * 100
    cfg = tmp_path / "big.yaml"
    cfg.write_text(f"seed: [&a1 [&a0 [{', '.join([word] * 10)}], {', '.join(['*a0'] * 9)}], {', '.join(['*a1'] * 9)}]\n")
    with pytest.raises(ConfigError) as err:
        SFTConfig.from_yaml(cfg)
    assert str(err.value).startswith("seed: expected int, got [[[") and len(str(err.value)) < 260


def test_bad_flag_and_bad_yaml_are_one_line_errors(cli, tmp_path):
    proc = cli("train", "--learning_rte", "1")
    assert proc.exit_code == 2 and "No such option" in proc.stderr and "Traceback" not in proc.stderr
    assert "--learning_rate" in proc.stderr  # click suggests the closest flag
    (tmp_path / "c.yaml").write_text("lora_r: [unclosed\n")
    proc = cli("train", "--config", str(tmp_path / "c.yaml"))
    assert proc.exit_code == 2 and "not valid YAML" in proc.stderr and "Traceback" not in proc.stderr


def test_config_reference_is_current():
    from sftkit.config import reference_markdown

    assert (ROOT / "docs" / "CONFIG.md").read_text() == reference_markdown(), \
        "docs/CONFIG.md is stale: run `python -m sftkit.config > docs/CONFIG.md`"


def test_example_configs_load():
    files = sorted((ROOT / "examples").glob("*.yaml"))
    assert len(files) >= 5
    for f in files:
        cfg = SFTConfig.from_yaml(f)
        assert cfg.model_name_or_path


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


# ---- ranges -------------------------------------------------------------------------------------


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
def test_numbers_out_of_range_name_the_option_and_its_range(flags, said):
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


# ---- help ---------------------------------------------------------------------------------------


def test_every_field_has_a_docstring():
    docs = field_docs()
    missing = [f.name for f in dataclasses.fields(SFTConfig) if not docs.get(f.name)]
    assert missing == []


def test_help_lists_commands_and_documents_options(cli):
    top = cli("--help").stdout
    for cmd in ("prepare-data", "train", "eval", "merge-lora"):
        assert cmd in top
    train = cli("train", "--help", env={"COLUMNS": "200"}).stdout
    for flag in ORIGINAL_FLAGS:
        assert flag in train, flag
    assert "Examples per micro-batch" in train
    assert "--inspect" in cli("prepare-data", "--help", env={"COLUMNS": "200"}).stdout
    assert "--model" in cli("eval", "--help", env={"COLUMNS": "200"}).stdout
    assert "--adapter" in cli("merge-lora", "--help", env={"COLUMNS": "200"}).stdout


def test_help_shows_every_default_and_fits_80_columns(cli):
    from sftkit.options import default_of

    text = cli("train", "--help", env={"COLUMNS": "80"}).stdout
    names = [line.split()[1] for line in text.splitlines() if line.startswith("│ --")]
    assert "--per_device_train_batch_size" in names and not [n for n in names if "…" in n]
    squeezed = "".join(text.replace("│", "").split())  # rich wraps help text, even inside a long value
    for f in dataclasses.fields(SFTConfig):
        value = default_of(f)
        if value not in (None, [], ""):
            shown = ",".join(map(str, value)) if isinstance(value, list) else str(value)
            assert f"[default:{shown}]" in squeezed, f.name


def test_help_shows_the_ranges():
    result = CliRunner().invoke(build_app(), ["train", "--help"], env={"COLUMNS": "200"})
    assert "[range: [0, 1)]" in result.output and "[range: >= 1, or -1 (off)]" in result.output
