"""prepare-data: sources -> validated conversations -> ids and labels -> a saved, fingerprinted set.

Every row read is accounted for in manifest.json: kept, or dropped with a reason.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import time
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sftkit._version import __version__
from sftkit.data import formats, images, registry, sources
from sftkit.data.columns import Columns, fit_lengths, from_rendered
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
    encode,
    render_pieces,
    reply_opening,
    template_reads,
    template_spec,
)
from sftkit.data.store import SPOOL, Spool, percentiles, plot_lengths
from sftkit.digest import record as record_files
from sftkit.errors import ConfigError, DataError

MANIFEST = "manifest.json"
DATASET_DIR = "dataset"
IMAGES_DIR = "images"  # the set's images, a file each, named by the sha256 of its bytes
IMAGE_INDEX = "images.arrow"  # each saved example's images (their sha256), in order: beside dataset/
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
    refused_examples: list[str] = field(default_factory=list)
    per_source: list[dict] = field(default_factory=list)
    too_long: int = 0  # dropped by their length in characters, before tokenizing (see bound_text)
    warnings: Counter = field(default_factory=Counter)  # kept rows worth a look, by kind (formats.warnings)
    examples_per_row: Counter = field(default_factory=Counter)  # multi_turn expand: rows by the examples they gave
    unserved: int = 0  # supervised replies rendered otherwise than as served (render.Rendered.unserved)
    read: list[tuple[int, sources.Source]] = field(default_factory=list)  # each source with the digest of the bytes read

    def add(self, row: Row) -> None:
        self.convs.append(row.conv)
        self.tools.append(row.tools)
        self.switches.append(row.switches)
        self.origin.append(row.origin)
        self.source.append(row.source)
        self.where.append(row.where)

    def keep(self, indices: list[int]) -> None:
        """Only the conversations at `indices`, with everything recorded beside each."""
        for name in ("convs", "tools", "switches", "origin", "source", "where"):
            values = getattr(self, name)
            setattr(self, name, [values[i] for i in indices])

    def count_bad(self, source: int, error: DataError, refused: bool = False) -> None:
        """Count a bad row of per_source entry `source`: not a valid row, or (`refused`) one the
        chat template refused."""
        self.bad_rows += 1
        self.per_source[source]["bad_rows"] += 1
        listed = self.refused_examples if refused else self.bad_examples
        if len(listed) < BAD_ROWS_LISTED:
            listed.append(str(error))

    def bad_rows_first(self) -> list[str]:
        """The first bad rows: those that are not rows, then those the template refused."""
        return (self.bad_examples + self.refused_examples)[:BAD_ROWS_LISTED]


@dataclass
class Row:
    """One valid row as a conversation, with where it came from."""

    conv: list[dict]
    tools: Any
    switches: dict | None
    origin: int  # the data_path entry
    source: int  # the per_source entry (file)
    where: str   # its line or row there


def render_options(opts: DataOptions) -> RenderOptions:
    """How rows are rendered: an expanded row (multi_turn expand) supervises its last reply alone."""
    expand = opts.multi_turn == "expand"
    return RenderOptions(train_on="last" if expand else opts.train_on, reasoning=opts.reasoning, as_served=expand,
                         **opts.template_switches())


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


@dataclass
class ImageSink:
    """Where prepare-data puts the images of the rows it reads: the model's ImageSpec (None: a text
    model, which a row with images is an error for) and a folder of image files named by their
    sha256, each written once."""

    spec: images.ImageSpec | None
    folder: Path | None = None  # None: the bytes kept in `data` instead (generation's prompts)
    count: int = 0        # image parts read
    stored: int = 0       # distinct images written
    nbytes: int = 0
    files: dict = field(default_factory=dict)  # local image file read -> (size, mtime_ns): images_changed
    data: dict = field(default_factory=dict)   # sha256 -> bytes, where there is no folder

    def put(self, picture: images.Picture) -> None:
        self.count += 1
        if self.folder is None:
            self.data[picture.sha256] = picture.data
            return
        target = self.folder / picture.sha256
        if not target.exists():
            self.folder.mkdir(parents=True, exist_ok=True)
            target.write_bytes(picture.data)
            self.stored += 1
            self.nbytes += len(picture.data)


def read_rows(srcs: list[tuple[int, sources.Source]], opts: DataOptions, tally: Loaded,
              limit: int | None = None, sink: ImageSink | None = None) -> Iterator[Row]:
    """Every valid row, read and validated as it is taken (the first `limit` of each source); what
    was read, and each bad row, is counted in `tally`. A bad row stops here unless
    opts.skip_bad_rows. `sink`: where the rows' images go (each read and checked); None leaves
    image parts unread (the checks before the imports)."""
    base_map = formats.parse_field_map(opts.field_map)
    for origin, src in srcs:
        field_map = {**base_map, **dict(src.field_map)}  # a dataset_info.json entry's own columns and tags
        fmt = src.format_type or (None if opts.format_type == "auto" else opts.format_type)
        fmt = fmt or formats.mapped_format(field_map)
        reading = sources.read(src, head=limit)
        index = len(tally.per_source)
        counts = {"path": src.path, "format": fmt, "rows": 0, "bad_rows": 0}
        tally.per_source.append(counts)
        for where, row in itertools.islice(reading.rows, limit):
            counts["rows"] += 1
            tally.rows_in += 1
            try:
                fmt = counts["format"] = fmt or formats.detect_format(row)
                msgs, tools = formats.to_conversation(row, fmt, field_map)
                switches = formats.row_switches(row)
                if sink is not None and isinstance(row, dict) and images.has_images(row):
                    base = None if src.hub else Path(src.path).parent
                    images.gather(msgs, row, base, sink.spec, sink.put, sink.files)
            except formats.RowError as err:
                error = DataError(src.path, where, err.field, err.problem)
                if not opts.skip_bad_rows:
                    raise error from None
                tally.count_bad(index, error)
                continue
            tally.warnings.update(formats.warnings(msgs))
            if opts.multi_turn == "expand" and msgs[0]["role"] != formats.PLAIN:
                yield from expanded(Row(msgs, tools, switches, origin, index, where), tally)
            else:
                yield Row(msgs, tools, switches, origin, index, where)
        if counts["rows"] == 0:
            raise DataError(src.path, "", None, "holds no rows")
        tally.read.append((origin, reading.source))


def expanded(row: Row, tally: Loaded) -> Iterator[Row]:
    """multi_turn expand: one row a supervised reply, the conversation up to and including it
    (replies marked train: False, a prompt-completion's prompt, are context, not examples)."""
    made = 0
    for j, m in enumerate(row.conv):
        if m["role"] == "assistant" and m.get("train") is not False:
            made += 1
            yield dataclasses.replace(row, conv=row.conv[:j + 1])
    tally.examples_per_row[made] += 1


def load_conversations(srcs: list[tuple[int, sources.Source]], opts: DataOptions, limit: int | None = None,
                       sink: ImageSink | None = None) -> Loaded:
    """Every valid row in memory (read_rows), for the callers that need them all at once."""
    loaded = Loaded()
    for row in read_rows(srcs, opts, loaded, limit, sink):
        loaded.add(row)
    return loaded


def chunks(rows: Iterator[Row], size: int = CHUNK) -> Iterator[Loaded]:
    """The rows in chunks of `size`, each a Loaded of its own rows (the accounting is the reader's)."""
    while True:
        chunk = Loaded()
        for row in itertools.islice(rows, size):
            chunk.add(row)
        if not chunk.convs:
            return
        yield chunk


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


def overlapped(chunked: Iterator[Loaded], tokenizer, opts: RenderOptions, spec: TemplateSpec
               ) -> Iterator[tuple[Loaded, Columns]]:
    """render_batch of each chunk in this process, the halves of two chunks at once: the template
    renders (and the reader reads) chunk k + 1 in Python while the tokenizer encodes chunk k on its
    own threads (encode_batch releases the GIL), then chunk k's ids and labels are put together."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="sftkit-encode") as pool:
        waiting = None
        for chunk in chunked:
            rendered = render_pieces(chunk.convs, tokenizer, spec, opts, chunk.tools, chunk.switches)
            encoding = pool.submit(encode, spec, rendered.texts)
            if waiting is not None:
                yield waiting[0], from_rendered(waiting[1], waiting[2].result())
            waiting = (chunk, rendered, encoding)
        if waiting is not None:
            yield waiting[0], from_rendered(waiting[1], waiting[2].result())


def max_token_chars(tokenizer) -> int:
    """The most characters one token can stand for: its longest vocabulary entry. In a byte-level
    BPE (Qwen3's) an entry has one symbol per byte, and a character is at least one byte."""
    return max(map(len, tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True)))


def _text_size(msg: dict) -> int:
    calls = msg.get("tool_calls")
    return len(msg.get("content") or "") + len(msg.get("reasoning_content") or "") + (len(str(calls)) if calls else 0)


def bound_text(loaded: Loaded, max_length: int, truncation: str, chars_per_token: int) -> int:
    """Rows too long to fit, found by their characters before any tokenizing, which would spend
    seconds and gigabytes on a huge row only to drop it. Text of more than max_length x
    chars_per_token characters (262,144 for 2048 tokens of Qwen3) has more than max_length tokens.
    `drop`: such a conversation is dropped here (counted too_long). `right`/`left`: each longer
    text keeps its first/last 2x that many characters, which still hold every token the truncation
    keeps (the margin keeps the cut away from them); the ids are then cut exactly as before.
    Returns how many were dropped."""
    limit = max_length * chars_per_token
    if truncation != "drop":
        cut = (lambda t: t[:2 * limit]) if truncation == "right" else (lambda t: t[-2 * limit:])
        for conv in loaded.convs:
            for m in conv:
                for key in ("content", "reasoning_content"):
                    if len(m.get(key) or "") > 2 * limit:
                        m[key] = cut(m[key])
        return 0
    keep = [i for i, conv in enumerate(loaded.convs) if sum(map(_text_size, conv)) <= limit]
    dropped = len(loaded.convs) - len(keep)
    if dropped:
        loaded.keep(keep)
    return dropped


def refused_rows(refused: dict[int, Refused], chunk: Loaded, skip_bad_rows: bool, tally: Loaded) -> None:
    """Rows the chat template refused (Refused from render_batch) are bad rows: the first is the
    error, naming its file and line, unless skip_bad_rows; then each is counted and listed."""
    for i in sorted(refused):
        r = refused[i]
        error = DataError(tally.per_source[chunk.source[i]]["path"], chunk.where[i], r.field, r.problem)
        if not skip_bad_rows:
            raise error
        tally.count_bad(chunk.source[i], error, refused=True)


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


def prepare(opts: DataOptions, specs: list[str], out_dir: Path, tokenizer, console=None,
            mixing: Mixing | None = None, cache: bool = False, fp: str | None = None,
            image_spec: images.ImageSpec | None = None) -> dict:
    """Build `out_dir` (dataset + manifest.json + lengths.png) unless it already holds this
    fingerprint. `mixing`: one weight per entry of `specs` (see `mix`). `cache`: out_dir is a
    content-addressed cache entry that other processes may be building or reading at once.
    `fp`: the fingerprint when the caller has computed it (it reads every byte of the data).
    `image_spec`: the model's image processor where it takes images (rows with images need one)."""
    from sftkit.io import atomic_directory, atomic_write_json
    from sftkit.progress import progress_bar

    srcs = resolve_sources(specs, opts)
    if fp is None:  # each file's digest kept, so that its read can be checked against it (sources.read)
        srcs = [(i, s.hashed()) for i, s in srcs]
    not_read = files_not_read(specs, console)
    serialised = tokenizer.backend_tokenizer.to_str()  # once, for the hash and the spec's encoder
    tokenizer_fp = tokenizer_fingerprint(tokenizer, serialised)
    fp = fp or fingerprint(srcs, tokenizer, opts, mixing, tokenizer_fp)
    old = read_manifest(out_dir)
    if old and data_fingerprint(old) == fp and is_prepared(out_dir) and not images_changed(old, image_spec):
        old["cached"] = True
        return old
    if out_dir.exists() and any(out_dir.iterdir()) and old is None:
        raise ConfigError(f"{out_dir} exists and is not a prepare-data output; choose another --output_dir")
    start = time.time()
    template, render_opts = with_image_token(template_spec(tokenizer, serialised), image_spec), render_options(opts)
    check_switches(tokenizer, template, render_opts)
    chars_per_token = max_token_chars(tokenizer)
    tally, dropped, truncated = Loaded(), Counter(), 0
    with atomic_directory(out_dir, replace=not cache) as tmp:
        spool = Spool(tmp / SPOOL)
        sink = ImageSink(image_spec, tmp / IMAGES_DIR)
        try:
            rows = read_rows(srcs, opts, tally, sink=sink)
            procs, ahead = processes_ahead(opts.num_proc, rows)
            label = f"preparing ({procs} processes)" if procs > 1 else "preparing"
            with gc_paused(), progress_bar(label, console) as bar:
                for chunk, rendered in render_chunks(chunks(itertools.chain(ahead, rows)), tokenizer, render_opts,
                                                     template, procs, chars_per_token, opts, tally):
                    refused_rows(rendered.refused, chunk, opts.skip_bad_rows, tally)
                    tally.unserved += rendered.unserved
                    truncated += keep_chunk(chunk, rendered, opts, spool, sink.count > 0, dropped)
                    bar(len(chunk.convs))
        finally:
            spool.close()
        if fingerprint(tally.read, tokenizer, opts, mixing, tokenizer_fp) != fp:  # the rows are not of the key's bytes
            raise sources.changed(", ".join(s.path for _, s in srcs))
        dropped.update(bad_row=tally.bad_rows, too_long=tally.too_long)
        if not len(spool):
            raise DataError(", ".join(s.path for _, s in srcs), "", None, nothing_left(dropped, tally, opts))
        order, mixed = weigh(spool.origins, specs, mixing)
        shown = spool.save_images(tmp / IMAGE_INDEX, order) if spool.has_images else None
        set_fp = fp if shown is None else images_fingerprint(fp, shown, image_spec)
        saved = spool.save(tmp / DATASET_DIR, set_fp, order)
        manifest = {
            "sftkit_version": __version__, "fingerprint": set_fp, "format": FORMAT, "sources": tally.per_source,
            "files_not_read": not_read, "rows_in": tally.rows_in, "examples_kept": len(spool),
            "dropped": {k: dropped.get(k, 0) for k in ("bad_row", "too_long", "no_supervised_tokens")},
            "truncated": truncated, "warnings": {k: tally.warnings.get(k, 0) for k in ("empty_reply",)},
            "replies_unlike_served": tally.unserved,
            "bad_rows_first": tally.bad_rows_first(), "mixing": mixed, "examples_saved": len(saved.lengths),
            "tokens": saved.tokens, "supervised_tokens": saved.supervised,
            "length": percentiles(saved.lengths), "tokenizer": getattr(tokenizer, "name_or_path", ""),
            "tokenizer_sha256": tokenizer_fp,
            "chat_template_sha256": hashlib.sha256((tokenizer.chat_template or "").encode()).hexdigest(),
            "options": opts.example_options(), "seconds": round(time.time() - start, 2),
        }
        manifest.update(images_manifest(fp, shown, sink) if shown else {})
        if opts.multi_turn == "expand":
            manifest["examples_per_row"] = {str(k): v for k, v in sorted(tally.examples_per_row.items())}
        extra = sum((k - 1) * v for k, v in tally.examples_per_row.items())  # examples beyond one a row
        assert manifest["rows_in"] + extra == manifest["examples_kept"] + sum(manifest["dropped"].values())
        plot_lengths(tmp / "lengths.png", saved.lengths, opts.max_length)
        manifest["files"] = {name: entry for under in (DATASET_DIR, IMAGES_DIR, IMAGE_INDEX)  # checked before each
                             for name, entry in record_files(tmp, under).items()}  # use: dataset.damage
        atomic_write_json(tmp / MANIFEST, manifest)
    if tally.unserved and console is not None:
        console.print(unserved_note(tally.unserved), markup=False, highlight=False)
    manifest["cached"] = False
    return manifest


def with_image_token(template: TemplateSpec, spec: images.ImageSpec | None) -> TemplateSpec:
    """The template spec, with the image token it expands where the model takes images."""
    if spec is None:
        return template
    if spec.token not in template.special_ids:
        raise ConfigError(f"the image processor's token {spec.token!r} is not a special token of the "
                          "tokenizer; use the vision-language model's own tokenizer")
    return dataclasses.replace(template, image_token=spec.token)


def keep_chunk(chunk: Loaded, rendered: Columns, opts: DataOptions, spool: Spool, with_images: bool,
               dropped: Counter) -> int:
    """A rendered chunk through the length policy into the spool (with each kept example's images,
    which are never cut: an example with images longer than max_length is dropped); its drops
    counted in `dropped`; returns how many were cut."""
    shown = [images.pictures_of(c) for c in chunk.convs] if with_images else None
    whole = np.array([bool(p) for p in shown], dtype=bool) if shown else None
    fitted = fit_lengths(rendered, opts.max_length, opts.truncation, whole)
    dropped.update(too_long=fitted.too_long, no_supervised_tokens=fitted.no_supervised)
    kept = fitted.kept.tolist()
    spool.add(fitted.columns, [o for o, k in zip(chunk.origin, kept) if k],
              [[p.sha256 for p in ps] for ps, k in zip(shown, kept) if k] if shown else None)
    return fitted.truncated


def images_manifest(fp: str, shown: dict, sink: ImageSink) -> dict:
    """What manifest.json says of a set's images: the rows' fingerprint (the set's own holds the
    images too), their counts, the processor that counted their tokens, and the local image files
    read (images_changed)."""
    return {"data_fingerprint": fp, "images": {
        "examples_with_images": shown["examples"], "images": shown["images"], "stored": sink.stored,
        "bytes": sink.nbytes, "processor_sha256": sink.spec.digest},
        "image_files": {path: list(stat) for path, stat in sorted(sink.files.items())}}


def data_fingerprint(manifest: dict) -> str | None:
    """The fingerprint of a prepared set's rows, data files and options: its set's fingerprint, or
    for a set with images, what that was built on (the images' bytes go in too: images_fingerprint)."""
    return manifest.get("data_fingerprint", manifest.get("fingerprint"))


def images_fingerprint(fp: str, shown: dict, spec: images.ImageSpec) -> str:
    """A set's fingerprint with its images: the rows' fingerprint, the image processor's config and
    every saved example's images by their bytes' sha256, in order."""
    h = hashlib.sha256(f"{fp}|images|{spec.config}|".encode())
    h.update(shown["digest"].encode())
    return h.hexdigest()


def processor_changed(manifest: dict, spec: images.ImageSpec | None) -> bool:
    """Whether a prepared set's images were counted in tokens by another image processor than
    `spec` (or there is none now). A set without images: False."""
    shown = manifest.get("images")
    return bool(shown) and (spec is None or shown.get("processor_sha256") != spec.digest)


def images_changed(manifest: dict, spec: images.ImageSpec | None) -> bool:
    """Whether a prepared set with images no longer holds what its rows name: the model's image
    processor is another (processor_changed), or an image file read for it is gone or has another
    size or time since (said conservatively: a file only touched is prepared again too). A set
    without images: False."""
    if not manifest.get("images"):
        return False
    if processor_changed(manifest, spec):
        return True
    for path, (size, mtime) in (manifest.get("image_files") or {}).items():
        try:
            st = os.stat(path)
        except OSError:
            return True
        if (st.st_size, st.st_mtime_ns) != (size, mtime):
            return True
    return False


def files_not_read(specs: list[str], console) -> list[str]:
    """Every file of a directory input that is not read, named once on the console (and returned
    for the manifest)."""
    not_read = []
    for spec in specs:
        left = sources.skipped(spec)
        not_read += [str(Path(spec) / name) for name in left]
        if left and console is not None:
            console.print(f"note: {spec}: skipped {len(left)} file(s): {', '.join(left)}; "
                          f"read are {', '.join(sources.SUFFIXES)}", markup=False, highlight=False)
    return not_read


def unserved_note(n: int) -> str:
    return (f"note: {n} supervised repl{'y is' if n == 1 else 'ies are'} rendered without the reasoning they "
            "have in the data (the chat template drops it from turns before the last user message), a context "
            "serving never gives them; --multi_turn expand trains each reply as it is served")


def processes_ahead(num_proc: int, rows: Iterator[Row]) -> tuple[int, list[Row]]:
    """How many processes tokenize (processes_for), and the rows read ahead to tell: for
    AUTO_PROCS, as many as it takes to know whether there are enough for the most processes
    auto could give (none on a machine that gives one)."""
    if num_proc != AUTO_PROCS:
        return processes_for(num_proc, 10**12), []
    most = processes_for(AUTO_PROCS, 10**12)
    ahead = list(itertools.islice(rows, AUTO_ROWS_PER_PROC * most if most > 1 else 0))
    return (processes_for(AUTO_PROCS, len(ahead)) if len(ahead) < AUTO_ROWS_PER_PROC * most else most), ahead


def render_chunks(chunked: Iterator[Loaded], tokenizer, opts: RenderOptions, spec: TemplateSpec, procs: int,
                  chars_per_token: int, data: DataOptions, tally: Loaded) -> Iterator[tuple[Loaded, Columns]]:
    """Each chunk with its rows rendered and tokenized as columns (the rows the template refused in
    `refused`), in order; rows too long to fit are cut or dropped first (bound_text). procs > 1:
    rendered in that many child processes (sftkit.data.workers), a few chunks ahead."""
    def bounded() -> Iterator[Loaded]:
        for chunk in chunked:
            tally.too_long += bound_text(chunk, data.max_length, data.truncation, chars_per_token)
            yield chunk

    if procs <= 1:
        yield from overlapped(bounded(), tokenizer, opts, spec)
        return
    from sftkit.data.workers import render_in_children

    sent: deque[Loaded] = deque()  # chunks handed out whose results have not come back, in order

    def tasks() -> Iterator[tuple]:
        for chunk in bounded():
            sent.append(chunk)
            yield chunk.convs, chunk.tools, chunk.switches

    for rendered in render_in_children(tasks(), procs, (tokenizer, opts, spec)):
        yield sent.popleft(), rendered


def nothing_left(dropped: Counter, loaded: Loaded, opts: DataOptions) -> str:
    """Why no example is left, reason by reason, each with its own fix."""
    why = []
    if dropped["bad_row"]:
        why.append(f"{dropped['bad_row']} bad row(s) skipped, the first: {loaded.bad_rows_first()[0]}; fix the rows")
    if dropped["too_long"]:
        why.append(f"{dropped['too_long']} longer than --max_length {opts.max_length}; raise --max_length or "
                   "use --truncation left/right")
    if dropped["no_supervised_tokens"]:
        cut = (f" after --truncation {opts.truncation} to {opts.max_length} tokens; raise --max_length"
               if opts.truncation != "drop" else "")
        why.append(f"{dropped['no_supervised_tokens']} with no reply token left to train on{cut}")
    return "no example is left: " + "; ".join(why)


def weigh(origins: np.ndarray, specs: list[str], mixing: Mixing | None) -> tuple[np.ndarray | None, list[dict] | None]:
    """(the order of the saved examples, what each weight did) after mixing; (None, None) without
    weights: every kept example once, in order."""
    if not mixing:
        return None, None
    order = np.asarray(mix(origins.tolist(), mixing.weights, mixing.seed), dtype=np.int64)
    picked = np.bincount(origins[order], minlength=len(specs)) if len(order) else np.zeros(len(specs), np.int64)
    kept = np.bincount(origins, minlength=len(specs))
    report = [{"data_path": spec, "weight": w, "examples": int(kept[i]), "after_weighting": int(picked[i])}
              for i, (spec, w) in enumerate(zip(specs, mixing.weights))]
    if not len(order):
        raise ConfigError("data_weights leave no example; give at least one source a positive weight")
    return order, report


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


def load_prepared(path: str | Path):
    """The saved examples of a prepare-data output (a `datasets.Dataset` with input_ids, labels;
    in a set with images, `images` too: each example's image files, in order)."""
    import datasets

    with quiet_datasets():
        dataset = datasets.load_from_disk(str(Path(path) / DATASET_DIR))
        index = Path(path) / IMAGE_INDEX
        if not index.is_file():
            return dataset
        import pyarrow as pa

        with pa.memory_map(str(index)) as source:
            names = pa.ipc.open_file(source).read_all().column("images").to_pylist()
        folder = (Path(path) / IMAGES_DIR).absolute()
        return dataset.add_column("images", [[str(folder / n) for n in row] for row in names],
                                  feature=datasets.Sequence(datasets.Value("string")))
