"""prepare-data: sources -> validated conversations -> ids and labels -> a saved, fingerprinted set.

Every row read is accounted for in manifest.json: kept, or dropped with a reason.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftkit._version import __version__
from sftkit.data import formats, registry, sources
from sftkit.data.columns import Columns, arrow_lists, concat, fit_lengths, pack
from sftkit.data.options import (
    AUTO_CORES_PER_PROC,
    AUTO_MAX_PROCS,
    AUTO_PROCS,
    AUTO_ROWS_PER_PROC,
    DataOptions,
    Mixing,
)
from sftkit.data.render import (
    Refused,
    RenderOptions,
    TemplateSpec,
    render_batch,
    reply_opening,
    template_reads,
    template_spec,
)
from sftkit.digest import record as record_files
from sftkit.errors import ConfigError, DataError

MANIFEST = "manifest.json"
DATASET_DIR = "dataset"
CHUNK = 512  # conversations per tokenizer call: big enough that the Rust tokenizer batches well
BAD_ROWS_LISTED = 5
FORMAT = 2  # layout of the saved set (2: input_ids, labels, length); part of the fingerprint
# how rows become examples, in the fingerprint so a cached set of older rules is never reused:
# 2 = TRL's {"text"} and {"prompt", "completion"} rows (were refused, or rendered as chat turns)
ROW_RULES = 2


@dataclass
class Loaded:
    """Validated conversations plus the accounting of what was read."""

    convs: list[list[dict]] = field(default_factory=list)
    tools: list[Any] = field(default_factory=list)
    switches: list[dict | None] = field(default_factory=list)  # the row's own template switches
    origin: list[int] = field(default_factory=list)  # which data_path entry each came from
    source: list[int] = field(default_factory=list)  # which per_source entry (file) each came from
    where: list[str] = field(default_factory=list)   # its line or row there, for a later error
    rows_in: int = 0
    bad_rows: int = 0
    bad_examples: list[str] = field(default_factory=list)
    per_source: list[dict] = field(default_factory=list)
    too_long: int = 0  # dropped by their length in characters, before tokenizing (see bound_text)
    warnings: Counter = field(default_factory=Counter)  # kept rows worth a look, by kind (formats.warnings)
    read: list[tuple[int, sources.Source]] = field(default_factory=list)  # each source with the digest of the bytes read

    def keep(self, indices: list[int]) -> None:
        """Only the conversations at `indices`, with everything recorded beside each."""
        for name in ("convs", "tools", "switches", "origin", "source", "where"):
            values = getattr(self, name)
            setattr(self, name, [values[i] for i in indices])

    def skip_bad(self, i: int, error: DataError) -> None:
        """Count conversation i's row as bad (found after reading: the template refused it)."""
        self.bad_rows += 1
        self.per_source[self.source[i]]["bad_rows"] += 1
        if len(self.bad_examples) < BAD_ROWS_LISTED:
            self.bad_examples.append(str(error))


def render_options(opts: DataOptions) -> RenderOptions:
    return RenderOptions(train_on=opts.train_on, reasoning=opts.reasoning, **opts.template_switches())


def check_switches(tokenizer, spec: TemplateSpec, opts: RenderOptions) -> None:
    """The run's template switches, before any row is read: each must be one the template reads
    (Qwen3's ignores reasoning_effort: setting it would change nothing, silently), with a value
    the template takes (Qwen3.8 refuses reasoning_effort 'high' with its own message)."""
    import jinja2

    switches = opts.switches()
    unread = ", ".join(k for k in switches if k not in spec.reads)
    if unread:
        raise ConfigError(f"the chat template never reads {unread}, so setting it would change nothing "
                          f"({template_reads(spec)}); unset {unread}")
    try:
        reply_opening(tokenizer, spec, switches)
    except jinja2.TemplateError as err:
        said = ", ".join(f"{k}={v!r}" for k, v in switches.items())
        raise ConfigError(f"the chat template refuses {said}: {err}") from None


def resolve_sources(specs: list[str], opts: DataOptions) -> list[tuple[int, sources.Source]]:
    """(index of the data_path entry, source) for every file or dataset the entries name."""
    if not specs and opts.dataset_info and registry.split_spec(opts.dataset_info):
        specs = [opts.dataset_info]  # --dataset_info REGISTRY.json:NAME alone names the data
    if not specs:
        raise ConfigError("no data given; pass --data_path FILE (JSON, JSONL, Parquet, CSV, a directory or a dataset name)")
    return [(i, s) for i, spec in enumerate(specs)
            for s in sources.resolve(spec, opts.dataset_config, opts.dataset_split, opts.dataset_info)]


def load_conversations(srcs: list[tuple[int, sources.Source]], opts: DataOptions, progress=None,
                       limit: int | None = None) -> Loaded:
    """Read and validate every row (the first `limit` of each source). A bad row stops here unless
    opts.skip_bad_rows."""
    base_map = formats.parse_field_map(opts.field_map)
    out = Loaded()
    for origin, src in srcs:
        field_map = {**base_map, **dict(src.field_map)}  # a dataset_info.json entry's own columns and tags
        fmt = src.format_type or (None if opts.format_type == "auto" else opts.format_type)
        fmt = fmt or formats.mapped_format(field_map)
        n_in = n_bad = 0
        reading = sources.read(src, head=limit)
        out.read.append((origin, reading.source))
        for where, row in itertools.islice(reading.rows, limit):
            n_in += 1
            try:
                fmt = fmt or formats.detect_format(row)
                msgs, tools = formats.to_conversation(row, fmt, field_map)
                switches = formats.row_switches(row)
            except formats.RowError as err:
                error = DataError(src.path, where, err.field, err.problem)
                if not opts.skip_bad_rows:
                    raise error from None
                n_bad += 1
                if len(out.bad_examples) < BAD_ROWS_LISTED:
                    out.bad_examples.append(str(error))
                continue
            out.convs.append(msgs)
            out.tools.append(tools)
            out.switches.append(switches)
            out.warnings.update(formats.warnings(msgs))
            out.origin.append(origin)
            out.source.append(len(out.per_source))
            out.where.append(where)
        if n_in == 0:
            raise DataError(src.path, "", None, "holds no rows")
        out.rows_in += n_in
        out.bad_rows += n_bad
        out.per_source.append({"path": src.path, "format": fmt, "rows": n_in, "bad_rows": n_bad})
        if progress:
            progress(n_in)
    return out


def usable_cores(cpu_max: str = "/sys/fs/cgroup/cpu.max") -> int:
    """The cores this process may run on: its affinity mask (taskset, a SLURM or container CPU set),
    which can be fewer than the machine has, and at most its CPU quota (cgroup v2 cpu.max,
    "QUOTA PERIOD" or "max PERIOD": a container given 2 CPUs of 64 sees all 64 in its mask)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity call
        cores = os.cpu_count() or 1
    try:
        quota, period = Path(cpu_max).read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(quota) // int(period)))
    except (OSError, ValueError):  # no cgroup v2 here, or a line we do not know
        pass
    return cores


def processes_for(num_proc: int, rows: int) -> int:
    """How many processes tokenize `rows` conversations: `num_proc`, or for AUTO_PROCS one per
    AUTO_ROWS_PER_PROC rows and per AUTO_CORES_PER_PROC usable cores, at most AUTO_MAX_PROCS;
    never more than the chunks of CHUNK rows there are to hand out."""
    if num_proc == AUTO_PROCS:
        num_proc = min(usable_cores() // AUTO_CORES_PER_PROC, AUTO_MAX_PROCS, rows // AUTO_ROWS_PER_PROC)
    return max(1, min(num_proc, -(-rows // CHUNK)))


def tokenize_all(loaded: Loaded, tokenizer, opts: RenderOptions, procs: int = 1, progress=None,
                 spec: TemplateSpec | None = None) -> Columns:
    """Every conversation's input_ids and labels as columns, in order; the rows the template
    refused in `refused`. procs > 1: rendered in that many child processes
    (sftkit.data.workers), chunk by chunk, put back in row order."""
    spec = spec or template_spec(tokenizer)
    chunks = [(loaded.convs[i:i + CHUNK], loaded.tools[i:i + CHUNK], loaded.switches[i:i + CHUNK])
              for i in range(0, len(loaded.convs), CHUNK)]
    if procs > 1 and len(chunks) > 1:
        from sftkit.data.workers import render_in_children

        parts = render_in_children(chunks, procs, (tokenizer, opts, spec), progress)
    else:
        parts = []
        for convs, tools, switches in chunks:
            parts.append(pack(render_batch(convs, tokenizer, spec, opts, tools, switches)))
            if progress:
                progress(len(parts[-1]))
    return concat(parts)


def max_token_chars(tokenizer) -> int:
    """The most characters one token can stand for: its longest vocabulary entry. In a byte-level
    BPE (Qwen3's) an entry has one symbol per byte, and a character is at least one byte."""
    return max(map(len, tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True)))


def _text_size(msg: dict) -> int:
    calls = msg.get("tool_calls")
    return len(msg.get("content") or "") + len(msg.get("reasoning_content") or "") + (len(str(calls)) if calls else 0)


def bound_text(loaded: Loaded, max_length: int, truncation: str, chars_per_token: int) -> None:
    """Rows too long to fit, found by their characters before any tokenizing, which would spend
    seconds and gigabytes on a huge row only to drop it. Text of more than max_length x
    chars_per_token characters (262,144 for 2048 tokens of Qwen3) has more than max_length tokens.
    `drop`: such a conversation is dropped here (counted too_long). `right`/`left`: each longer
    text keeps its first/last 2x that many characters, which still hold every token the truncation
    keeps (the margin keeps the cut away from them); the ids are then cut exactly as before."""
    limit = max_length * chars_per_token
    if truncation != "drop":
        cut = (lambda t: t[:2 * limit]) if truncation == "right" else (lambda t: t[-2 * limit:])
        for conv in loaded.convs:
            for m in conv:
                for key in ("content", "reasoning_content"):
                    if len(m.get(key) or "") > 2 * limit:
                        m[key] = cut(m[key])
        return
    keep = [i for i, conv in enumerate(loaded.convs) if sum(map(_text_size, conv)) <= limit]
    if len(keep) < len(loaded.convs):
        loaded.too_long += len(loaded.convs) - len(keep)
        loaded.keep(keep)


def refused_rows(refused: dict[int, Refused], loaded: Loaded, skip_bad_rows: bool) -> None:
    """Rows the chat template refused (Refused from render_batch) are bad rows: the first is the
    error, naming its file and line, unless skip_bad_rows; then each is counted and listed."""
    for i in sorted(refused):
        r = refused[i]
        error = DataError(loaded.per_source[loaded.source[i]]["path"], loaded.where[i], r.field, r.problem)
        if not skip_bad_rows:
            raise error
        loaded.skip_bad(i, error)


def fingerprint(srcs: list[tuple[int, sources.Source]], tokenizer, opts: DataOptions, mixing: Mixing | None,
                tokenizer_fp: str | None = None, spelled: bool = False) -> str:
    """Changes whenever the data bytes, the tokenizer, the template or a data option changes, and
    never with where a file lies or how its path is spelled: data.jsonl, /abs/data.jsonl and a
    symlink to it are one set, so a resume typed with another spelling is the same run. A local
    file counts by its bytes and by its suffix, which picks the reader; a Hub dataset by its name,
    config, split and datasets' own fingerprint. `spelled`: the rule of earlier sftkit, which
    hashed each file's path as resolved from the spelling, kept to recognise the checkpoints of
    that time (run_dir.spelled_run_identity)."""
    h = hashlib.sha256()
    weights, seed = (mixing.weights, mixing.seed) if mixing else ([], "")
    h.update(f"sftkit {__version__} format {FORMAT} rows {ROW_RULES} weights={weights} seed={seed}\n".encode())
    for i, s in srcs:
        h.update(f"{i}|".encode())
        name = s.path if s.hub or spelled else f"file {_read_as(s.path)}"
        h.update(f"{name}|{s.config}|{s.split}|{s.fingerprint()}\n".encode())
    h.update((tokenizer_fp or tokenizer_fingerprint(tokenizer)).encode())
    h.update(json.dumps(opts.example_options(), sort_keys=True).encode())
    return h.hexdigest()


def _read_as(path: str) -> str:
    """The part of a file's name that decides how its bytes are read: its suffix (the last two
    for a compressed file, `.jsonl.gz`), lower-cased as sources reads it."""
    suffixes = [x.lower() for x in Path(path).suffixes]
    return "".join(suffixes[-2:] if suffixes[-1:] == [".gz"] else suffixes[-1:])


def tokenizer_fingerprint(tokenizer, serialised: str | None = None) -> str:
    """Hash of what decides the ids: vocabulary, merges, normalizer, added tokens, template.
    The serialised backend lists truncation and padding first and the rest from "added_tokens" on;
    saving a tokenizer changes padding, not the ids, so the hash starts there, on the text as it
    is (parsing and re-dumping the 11 MB JSON costs far more). `serialised`: the backend's
    `to_str()`, if at hand."""
    text = tokenizer.backend_tokenizer.to_str() if serialised is None else serialised
    h = hashlib.sha256(text[max(text.find('"added_tokens"'), 0):].encode())
    h.update((tokenizer.chat_template or "").encode())
    return h.hexdigest()


def read_manifest(path: Path) -> dict | None:
    try:
        return json.loads((path / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def is_prepared(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file() and (Path(path) / DATASET_DIR).is_dir()


def mix(origins: list[int], weights: list[float], seed: int) -> list[int]:
    """Indices of the kept examples after weighting each source: weight 2 repeats every example
    twice, 0.5 keeps a seeded half, 1.5 keeps all once plus a seeded half again."""
    import random

    rng = random.Random(seed)
    picked: list[int] = []
    for src, w in enumerate(weights):
        idx = [i for i, o in enumerate(origins) if o == src]
        whole, frac = divmod(w, 1)
        picked += idx * int(whole) + sorted(rng.sample(idx, round(frac * len(idx))))
    return picked


def percentiles(values: list[int]) -> dict[str, int]:
    if not values:
        return {}
    s = sorted(values)
    return {f"p{q}": s[min(len(s) - 1, int(q / 100 * len(s)))] for q in (50, 90, 99)} | {"max": s[-1], "min": s[0]}


def prepare(opts: DataOptions, specs: list[str], out_dir: Path, tokenizer, console=None,
            mixing: Mixing | None = None, cache: bool = False, fp: str | None = None) -> dict:
    """Build `out_dir` (dataset + manifest.json + lengths.png) unless it already holds this
    fingerprint. `mixing`: one weight per entry of `specs` (see `mix`). `cache`: out_dir is a
    content-addressed cache entry that other processes may be building or reading at once.
    `fp`: the fingerprint when the caller has computed it (it reads every byte of the data)."""
    from sftkit.io import atomic_directory, atomic_write_json
    from sftkit.progress import progress_bar

    srcs = resolve_sources(specs, opts)
    if fp is None:  # each file's digest kept, so that its read can be checked against it (sources.read)
        srcs = [(i, s.hashed()) for i, s in srcs]
    for spec in specs:
        left = sources.skipped(spec)
        if left and console is not None:
            console.print(f"note: {spec}: skipped {len(left)} file(s): {', '.join(left)}; "
                          f"read are {', '.join(sources.SUFFIXES)}", markup=False, highlight=False)
    serialised = tokenizer.backend_tokenizer.to_str()  # once, for the hash and the spec's encoder
    tokenizer_fp = tokenizer_fingerprint(tokenizer, serialised)
    fp = fp or fingerprint(srcs, tokenizer, opts, mixing, tokenizer_fp)
    old = read_manifest(out_dir)
    if old and old.get("fingerprint") == fp and is_prepared(out_dir):
        old["cached"] = True
        return old
    if out_dir.exists() and any(out_dir.iterdir()) and old is None:
        raise ConfigError(f"{out_dir} exists and is not a prepare-data output; choose another --output_dir")
    start = time.time()
    template, render_opts = template_spec(tokenizer, serialised), render_options(opts)
    check_switches(tokenizer, template, render_opts)
    with gc_paused(), progress_bar("reading", console) as bar:
        loaded = load_conversations(srcs, opts, progress=bar)
    if fingerprint(loaded.read, tokenizer, opts, mixing, tokenizer_fp) != fp:  # the rows are not of the key's bytes
        raise sources.changed(", ".join(s.path for _, s in srcs))
    bound_text(loaded, opts.max_length, opts.truncation, max_token_chars(tokenizer))
    procs = processes_for(opts.num_proc, len(loaded.convs))
    label = f"tokenizing ({procs} processes)" if procs > 1 else "tokenizing"
    with gc_paused(), progress_bar(label, console, total=len(loaded.convs)) as bar:
        rendered = tokenize_all(loaded, tokenizer, render_opts, procs, progress=bar, spec=template)
    refused_rows(rendered.refused, loaded, opts.skip_bad_rows)
    kept = keep_fitting(rendered, loaded, opts)
    del rendered
    if not len(kept.columns):
        raise DataError(", ".join(s.path for _, s in srcs), "", None, nothing_left(kept.dropped, loaded, opts))
    saved, mixed = weigh(kept, specs, mixing)
    lengths = saved.lengths.tolist()
    manifest = {
        "sftkit_version": __version__, "fingerprint": fp, "format": FORMAT, "sources": loaded.per_source,
        "rows_in": loaded.rows_in, "examples_kept": len(kept.columns),
        "dropped": {k: kept.dropped.get(k, 0) for k in ("bad_row", "too_long", "no_supervised_tokens")},
        "truncated": kept.truncated, "warnings": {k: loaded.warnings.get(k, 0) for k in ("empty_reply",)},
        "bad_rows_first": loaded.bad_examples, "mixing": mixed, "examples_saved": len(saved),
        "tokens": sum(lengths), "supervised_tokens": saved.supervised(),
        "length": percentiles(lengths), "tokenizer": getattr(tokenizer, "name_or_path", ""),
        "tokenizer_sha256": tokenizer_fp,
        "chat_template_sha256": hashlib.sha256((tokenizer.chat_template or "").encode()).hexdigest(),
        "options": opts.example_options(), "seconds": round(time.time() - start, 2),
    }
    assert manifest["rows_in"] == manifest["examples_kept"] + sum(manifest["dropped"].values())
    with atomic_directory(out_dir, replace=not cache) as tmp:
        _save_dataset(tmp / DATASET_DIR, saved)
        _plot_lengths(tmp / "lengths.png", lengths, opts.max_length)
        manifest["files"] = record_files(tmp, DATASET_DIR)  # checked before each use: dataset.damage
        atomic_write_json(tmp / MANIFEST, manifest)
    manifest["cached"] = False
    return manifest


@dataclass
class Kept:
    """The examples that fit, where each came from, and the count of the others by reason."""

    columns: Columns
    origin: list[int]  # the data_path entry of each kept example
    dropped: Counter = field(default_factory=Counter)
    truncated: int = 0  # kept, cut to max_length by --truncation left/right


def keep_fitting(rendered: Columns, loaded: Loaded, opts: DataOptions) -> Kept:
    """Apply the length policy to every rendered example; bad rows are counted as dropped too
    (the refused ones by refused_rows, as bad rows)."""
    fitted = fit_lengths(rendered, opts.max_length, opts.truncation)
    dropped = Counter(bad_row=loaded.bad_rows, too_long=loaded.too_long + fitted.too_long,
                      no_supervised_tokens=fitted.no_supervised)
    origin = [o for o, keep in zip(loaded.origin, fitted.kept.tolist()) if keep]
    return Kept(fitted.columns, origin, dropped, fitted.truncated)


def nothing_left(dropped: Counter, loaded: Loaded, opts: DataOptions) -> str:
    """Why no example is left, reason by reason, each with its own fix."""
    why = []
    if dropped["bad_row"]:
        why.append(f"{dropped['bad_row']} bad row(s) skipped, the first: {loaded.bad_examples[0]}; fix the rows")
    if dropped["too_long"]:
        why.append(f"{dropped['too_long']} longer than --max_length {opts.max_length}; raise --max_length or "
                   "use --truncation left/right")
    if dropped["no_supervised_tokens"]:
        cut = (f" after --truncation {opts.truncation} to {opts.max_length} tokens; raise --max_length"
               if opts.truncation != "drop" else "")
        why.append(f"{dropped['no_supervised_tokens']} with no reply token left to train on{cut}")
    return "no example is left: " + "; ".join(why)


def weigh(kept: Kept, specs: list[str], mixing: Mixing | None) -> tuple[Columns, list[dict] | None]:
    """(the examples, what each weight did) after mixing; unchanged without weights."""
    if not mixing:
        return kept.columns, None
    order = mix(kept.origin, mixing.weights, mixing.seed)
    report = [{"data_path": spec, "weight": w, "examples": kept.origin.count(i),
               "after_weighting": sum(kept.origin[j] == i for j in order)}
              for i, (spec, w) in enumerate(zip(specs, mixing.weights))]
    if not order:
        raise ConfigError("data_weights leave no example; give at least one source a positive weight")
    return kept.columns.take(order), report


@contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic collector off while rows are read and tokenized, then back as it was. The
    lists and dicts built there hold no cycles, yet each full collection walks all of them again,
    freeing nothing."""
    import gc

    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


@contextmanager
def quiet_datasets() -> Iterator[None]:
    """datasets' own progress bars off for this call only: they are a process-wide switch, and a
    user's own code in the same process keeps whatever it had set."""
    import datasets

    was_off = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_off:
            datasets.enable_progress_bars()


def _save_dataset(path: Path, examples: Columns) -> None:
    import datasets
    import pyarrow as pa

    features = datasets.Features({
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "labels": datasets.Sequence(datasets.Value("int32")),
        "length": datasets.Value("int32"),  # for batching without reading every example
    })
    # Arrow arrays built directly from the columns: Dataset.from_dict checks and encodes every
    # example in Python against the features, most of the save's time
    table = pa.table({"input_ids": arrow_lists(examples.ids, examples.offsets),
                      "labels": arrow_lists(examples.labels, examples.offsets),
                      "length": pa.array(examples.lengths.astype("int32"), pa.int32())})
    with quiet_datasets():
        datasets.Dataset(table, info=datasets.DatasetInfo(features=features)).save_to_disk(str(path))


def load_prepared(path: str | Path):
    """The saved examples of a prepare-data output (a `datasets.Dataset` with input_ids, labels)."""
    import datasets

    with quiet_datasets():
        return datasets.load_from_disk(str(Path(path) / DATASET_DIR))


def _plot_lengths(path: Path, lengths: list[int], max_length: int) -> None:
    import numpy as np
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure registry

    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    # one filled outline, not ax.hist's 50 bar patches: the same picture, drawn faster
    counts, edges = np.histogram(lengths, bins=min(50, max(5, len(set(lengths)))))
    ax.stairs(counts, edges, fill=True, color="#4477aa")
    ax.axvline(max_length, color="#cc3311", linestyle="--", label=f"max_length {max_length}")
    ax.set_xlabel("tokens per example")
    ax.set_ylabel("examples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
