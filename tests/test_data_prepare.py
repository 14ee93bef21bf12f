"""prepare(): length policies and their accounting, the cache and its fingerprint, the folder it
writes, how many processes it takes, the columns it reads, the held-out share, SFTDataset."""

from __future__ import annotations

import io
import json
import os

import pytest
from conftest import ROOT, write_jsonl

from sftkit.data.options import DataOptions
from sftkit.data.prepare import prepare
from sftkit.data.render import IGNORE_INDEX
from sftkit.errors import ConfigError

DEMO = ROOT / "data" / "demo_alpaca.json"  # 8 rows


def test_length_policies_and_accounting(tmp_path, tok):
    rows = [{"instruction": "short", "output": "ok"}, {"instruction": "long " * 200, "output": "fine"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    man = prepare(DataOptions(max_length=64), [str(path)], tmp_path / "drop", tok)
    assert man["examples_kept"] == 1 and man["dropped"]["too_long"] == 1
    # cutting from the right removes the reply: nothing left to learn, dropped and counted
    man = prepare(DataOptions(max_length=64, truncation="right"), [str(path)], tmp_path / "right", tok)
    assert man["examples_kept"] == 1 and man["dropped"]["no_supervised_tokens"] == 1
    man = prepare(DataOptions(max_length=64, truncation="left"), [str(path)], tmp_path / "left", tok)
    assert man["examples_kept"] == 2 and man["length"]["max"] == 64
    for m in (man,):
        assert m["rows_in"] == m["examples_kept"] + sum(m["dropped"].values())


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


def test_repeat_run_is_cached_and_options_change_the_fingerprint(tmp_path, tok):
    path = ROOT / "data" / "sample_sharegpt.json"
    first = prepare(DataOptions(max_length=512), [str(path)], tmp_path / "o", tok)
    again = prepare(DataOptions(max_length=512), [str(path)], tmp_path / "o", tok)
    assert not first["cached"] and again["cached"] and again["fingerprint"] == first["fingerprint"]
    other = prepare(DataOptions(max_length=512, train_on="last"), [str(path)], tmp_path / "o", tok)
    assert not other["cached"] and other["supervised_tokens"] < first["supervised_tokens"]
    assert (tmp_path / "o" / "lengths.png").stat().st_size > 1000


def test_refuses_to_overwrite_a_foreign_directory(tmp_path, tok):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(Exception, match="not a prepare-data output"):
        prepare(DataOptions(), [str(ROOT / "data" / "sample_alpaca.json")], tmp_path / "mine", tok)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_processes_for_rows_and_cores(tmp_path):
    from sftkit.data.options import AUTO_CORES_PER_PROC, AUTO_MAX_PROCS, AUTO_ROWS_PER_PROC
    from sftkit.data.prepare import processes_for, usable_cores

    assert DataOptions().num_proc == 0  # auto
    assert processes_for(0, 50) == 1 and processes_for(0, 2 * AUTO_ROWS_PER_PROC - 1) == 1
    assert processes_for(0, 10**7) == max(1, min(usable_cores() // AUTO_CORES_PER_PROC, AUTO_MAX_PROCS))
    mask = len(os.sched_getaffinity(0))
    for text, cores in (("max 100000\n", mask), ("150000 100000\n", 1), ("50000 100000\n", 1),
                        (f"{100000 * (mask + 4)} 100000\n", mask), ("garbled", mask)):
        (tmp_path / "cpu.max").write_text(text)  # cgroup v2: a quota of 1.5 CPUs is 1 core, none is the mask
        assert usable_cores(str(tmp_path / "cpu.max")) == cores, text
    assert usable_cores(str(tmp_path / "absent")) == mask
    assert processes_for(4, 600) == 2  # never more processes than chunks of 512 rows
    assert processes_for(3, 10**7) == 3  # a number given is taken as given
    with pytest.raises(ConfigError, match="num_proc must be at least 1, or 0 \\(auto\\)"):
        DataOptions(num_proc=-1)


def test_lengths_reads_the_column_through_a_selection():
    import datasets

    from sftkit.data.dataset import hold_out, lengths
    ds = datasets.Dataset.from_dict({"length": [5, 3, 9, 1, 7, 2, 8]})
    train, held = hold_out(ds, 2, seed=0)
    assert lengths(train) == list(train["length"]) and lengths(held) == list(held["length"])
    assert sorted(lengths(train) + lengths(held)) == sorted(ds["length"])


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


def test_sft_dataset_api(tok):
    from sftkit import SFTDataset

    ds = SFTDataset(data_path=str(ROOT / "data" / "sample_alpaca.json"), tokenizer=tok, max_length=512,
                    format_type="alpaca", use_chat_template=True)
    assert len(ds) == 50
    ex = ds[0]
    assert set(ex) == {"input_ids", "attention_mask", "labels"}
    assert len(ex["input_ids"]) == len(ex["labels"]) == len(ex["attention_mask"])
    sup = [t for t in ex["labels"] if t != IGNORE_INDEX]
    assert sup and tok.decode(sup).endswith("<|im_end|>")
    # unshifted: a supervised label equals the input id at the same position
    assert all(lab == i for lab, i in zip(ex["labels"], ex["input_ids"]) if lab != IGNORE_INDEX)


def test_multi_turn_expand_trains_each_reply_as_served(tmp_path, tok):
    """A conversation with reasoning in each reply: as_is, the template drops the reasoning of the
    replies before the last question, prepare-data counts them and names --multi_turn expand; expand
    gives one example a reply, each supervising its own reasoning and answer, counted per row."""
    from rich.console import Console

    from sftkit.data.prepare import load_prepared

    def a(text, why):
        return {"role": "assistant", "content": text, "reasoning_content": why}

    three = [{"role": "user", "content": "q1"}, a("a1", "why one"), {"role": "user", "content": "q2"},
             a("a2", "why two"), {"role": "user", "content": "q3"}, a("a3", "why three")]
    one = [{"role": "user", "content": "hi"}, a("hello", "greet back")]
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": three}, {"messages": one}])

    def run(folder, **kw):
        con = Console(file=io.StringIO(), width=400)
        man = prepare(DataOptions(**kw), [str(path)], tmp_path / folder, tok, con)
        texts = [tok.decode([t for t in ex["labels"] if t != IGNORE_INDEX]) for ex in load_prepared(tmp_path / folder)]
        return man, texts, con.file.getvalue()

    man, texts, said = run("as_is")
    assert man["replies_unlike_served"] == 2 and "examples_per_row" not in man and "multi_turn" not in man["options"]
    assert "2 supervised replies are rendered without the reasoning" in said and "--multi_turn expand" in said
    assert "why one" not in texts[0] and "why three" in texts[0]
    assert run("as_is_single", train_on="last")[0]["replies_unlike_served"] == 0  # the last reply is as served

    man, texts, said = run("expand", multi_turn="expand")
    assert man["replies_unlike_served"] == 0 and "rendered without" not in said
    assert (man["rows_in"], man["examples_kept"], man["examples_per_row"]) == (2, 4, {"1": 1, "3": 1})
    assert man["options"]["multi_turn"] == "expand"
    for why, answer in (("why one", "a1"), ("why two", "a2"), ("why three", "a3"), ("greet back", "hello")):
        assert sum(why in t and answer in t for t in texts) == 1 and sum(why in t for t in texts) == 1, (why, texts)
    assert run("drop", reasoning="drop")[0]["replies_unlike_served"] == 0  # no reasoning anywhere: nothing unlike
