"""Training sets: a prepare-data directory, or raw data prepared on the fly into a cache keyed by
its fingerprint (so a second run, or the other ranks, reuse it)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from sftkit.data import prepare as prep
from sftkit.data.options import DataOptions, Mixing
from sftkit.digest import damage as files_damage
from sftkit.errors import ConfigError, DataError


def prepared_dir(opts: DataOptions, specs: list[str], tokenizer, console=None,
                 mixing: Mixing | None = None, label: str = "data", image_spec=None) -> Path:
    """A directory holding the prepared form of `specs` (mixed by `mixing`), building it if needed.
    With a console, one line says what of it was dropped, cut or is worth a look (see data_note).
    `image_spec`: the model's image processor (sftkit.data.images.ImageSpec) where it takes images."""
    out = _prepared_dir(opts, specs, tokenizer, console, mixing, image_spec)
    note = data_note(prep.read_manifest(out) or {}, opts, label)
    if note and console is not None:
        console.print(f"[yellow]{note}; see {out / prep.MANIFEST}[/yellow]", highlight=False)
    return out


# why each drop happened and its fix, filled from the options the set was prepared with
DROP_WORDS = {
    "too_long": "too long at max_length {max_length} (raise --max_length, or --truncation right to cut them)",
    "bad_row": "bad rows (skipped by --skip_bad_rows; the manifest lists the first)",
    "no_supervised_tokens": "with no reply token to train on",
}


def data_note(manifest: dict, opts: DataOptions, label: str = "data") -> str | None:
    """`data: kept 6 of 8 rows; dropped 2 too long at max_length 24 (...)`: every drop, cut and
    warning of a prepared set in one line; None when every row was kept as written. The manifest
    holds the same counts, but a user of `train` never opens it."""
    dropped = {k: n for k, n in (manifest.get("dropped") or {}).items() if n}
    cut, warned = manifest.get("truncated", 0), {k: n for k, n in (manifest.get("warnings") or {}).items() if n}
    if not (dropped or cut or warned):
        return None
    o = {**opts.example_options(), **(manifest.get("options") or {})}  # a prepared dir's own options win
    parts = [f"dropped {n:,} {DROP_WORDS.get(k, k.replace('_', ' ')).format(**o)}" for k, n in dropped.items()]
    if cut:
        parts.append(f"cut {cut:,} to max_length {o['max_length']} (--truncation {o['truncation']})")
    parts += [f"kept {n:,} with a warning: {k.replace('_', ' ')}" for k, n in warned.items()]
    return f"{label}: kept {manifest['examples_kept']:,} of {manifest['rows_in']:,} rows; " + "; ".join(parts)


def spelled_fingerprint(opts: DataOptions, specs: list[str], tokenizer, mixing: Mixing | None = None) -> str:
    """The training set's fingerprint by the rule of earlier sftkit, which hashed each file's path
    as typed: what a checkpoint of that time recorded (run_dir.spelled_run_identity). A prepared
    directory's is its manifest's, as it always was."""
    if len(specs) == 1 and prep.is_prepared(specs[0]):
        return (prep.read_manifest(Path(specs[0])) or {}).get("fingerprint", "")
    return prep.fingerprint(prep.resolve_sources(specs, opts), tokenizer, opts, mixing, spelled=True)


def lengths(dataset) -> list[int]:
    """Every example's length as one Arrow column read (indices mapping applied): datasets' lazy
    `dataset["length"]` goes example by example, which makes setup of a large set slow."""
    return dataset.with_format("arrow")["length"].to_numpy().tolist()


def hold_out(dataset, size: float, seed: int, console=None):
    """(train, eval): `size` examples (a share below 1, a count from 1) drawn by `seed` for eval,
    the rest for training, each in its original order."""
    import random

    from sftkit.errors import ConfigError

    n = len(dataset)
    k = round(size * n) if size < 1 else int(size)
    if not 1 <= k < n:
        raise ConfigError(f"val_size {size:g} holds out {k} of {n} examples; at least 1 must be held out and 1 left "
                          "to train on")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    if console is not None:
        console.print(f"val: held out {k:,} of {n:,} examples for eval (--val_size {size:g}, seed {seed})",
                      highlight=False)
    return dataset.select(sorted(order[k:])), dataset.select(sorted(order[:k]))


def _prepared_dir(opts: DataOptions, specs: list[str], tokenizer, console=None,
                  mixing: Mixing | None = None, image_spec=None) -> Path:
    from sftkit.io import cache_dir, check_cache_writable, remove_stale_tmp

    if any(prep.is_prepared(s) for s in specs) and (len(specs) > 1 or mixing):
        raise ConfigError("a prepared directory cannot be mixed with other sources or weighted; "
                          "pass the raw files with --data_path and --data_weights, or prepare them together")
    if len(specs) == 1 and prep.is_prepared(specs[0]):
        problem = damage(Path(specs[0]))  # first: a manifest cut short is damage too
        if problem:
            name, _, what = problem.partition(": ")
            raise DataError(str(Path(specs[0]) / name), "", None, f"the prepared set is damaged ({what}); run "
                            f"prepare-data again into {specs[0]} to rebuild it")
        manifest = prep.read_manifest(Path(specs[0]))
        if manifest.get("format") != prep.FORMAT:
            raise ConfigError(f"{specs[0]} was prepared by an older sftkit; run prepare-data again")
        if manifest.get("tokenizer_sha256") != prep.tokenizer_fingerprint(tokenizer):
            raise ConfigError(f"{specs[0]} was prepared with another tokenizer or chat template "
                              f"({manifest.get('tokenizer')}); run prepare-data again with this model")
        if image_spec is not None and prep.processor_changed(manifest, image_spec):
            raise ConfigError(f"{specs[0]} was prepared with another image processor, whose images are another "
                              "number of tokens; run prepare-data again with this model")
        return Path(specs[0])
    srcs = prep.resolve_sources(specs, opts)
    fp = prep.fingerprint(srcs, tokenizer, opts, mixing)  # names the entry; prepare reuses it
    out = cache_dir() / "prepared" / fp[:20]
    if out.exists():
        inode, problem = out.stat().st_ino, damage(out)
        if problem:
            if console is not None:
                console.print(f"note: prepared cache {out} was damaged ({problem}); rebuilding", markup=False,
                              highlight=False)
            discard(out, inode)
        elif image_spec is not None and prep.images_changed(prep.read_manifest(out) or {}, image_spec):
            if console is not None:
                console.print(f"note: an image of prepared cache {out} changed on disk since; preparing again",
                              markup=False, highlight=False)
            discard(out, inode)
    if not prep.is_prepared(out):
        check_cache_writable(out)
        remove_stale_tmp(out.parent)
    prep.prepare(opts, specs, out, tokenizer, console, mixing, cache=True, fp=fp, image_spec=image_spec)
    return out


def damage(folder: Path) -> str | None:
    """What is wrong with a prepared set, `NAME: what` (None: intact), checked before each use: a
    truncated .arrow file would fail every later run on that data with ArrowInvalid. Sizes and
    digests against the manifest's record of its files (sftkit.digest.damage); a set written before
    that record is checked as far as it can be: every Arrow file of it must read to its end."""
    manifest = prep.read_manifest(folder)
    if manifest is None:
        return f"{prep.MANIFEST}: missing or not JSON"
    if "files" in manifest:
        return files_damage(folder, manifest["files"])
    for path in sorted((folder / prep.DATASET_DIR).glob("*.arrow")):
        problem = _unreadable_arrow(path)
        if problem:
            return f"{path.relative_to(folder).as_posix()}: {problem}"
    return None if (folder / prep.DATASET_DIR).is_dir() else f"{prep.DATASET_DIR}/: missing"


def _unreadable_arrow(path: Path) -> str | None:
    import pyarrow as pa

    try:
        with pa.memory_map(str(path)) as source:
            pa.ipc.open_stream(source).read_all()  # memory-mapped: the buffers are not copied
    except (OSError, pa.ArrowException) as err:
        return f"cannot be read as Arrow ({str(err).splitlines()[0][:200] if str(err) else type(err).__name__})"
    return None


def discard(entry: Path, inode: int) -> None:
    """Move a damaged cache entry aside and remove it. Another process may be doing the same, or
    have rebuilt it already: what was moved is put back when it is not the damaged folder (`inode`)."""
    from sftkit.io import _writer_tag

    aside = entry.with_name(f".{entry.name}.{_writer_tag()}-damaged.tmp")
    try:
        os.rename(entry, aside)
    except FileNotFoundError:
        return  # moved by another process first
    if aside.stat().st_ino != inode:
        try:
            os.rename(aside, entry)  # a rebuilt, intact entry: back where its readers look for it
            return
        except OSError:
            pass  # a third copy is there by now; this one is not needed
    shutil.rmtree(aside, ignore_errors=True)


class SFTDataset:
    """Tokenized SFT examples: `ds[i]` -> input_ids, attention_mask, labels (lists of int).

    labels are -100 where the model is not trained and are NOT shifted (the Hugging Face
    convention: the model shifts them). Built with the same code as `sftkit prepare-data`. Rows
    with images need the vision-language model's folder (`model`, else the tokenizer's own folder):
    its image processor counts their tokens; `ds[i]["images"]` then lists each example's image files.
    """

    def __init__(self, data_path: str | list[str], tokenizer, max_length: int | None = None,
                 format_type: str | None = None, use_chat_template: bool = True, model: str | None = None,
                 **options):
        if not use_chat_template:
            raise ConfigError("SFTDataset renders with the chat template only; pass use_chat_template=True")
        specs = [data_path] if isinstance(data_path, (str, Path)) else list(data_path)
        values = dict(options)
        if max_length is not None:
            values["max_length"] = max_length
        if format_type is not None:
            values["format_type"] = format_type
        opts = DataOptions(data_path=[str(s) for s in specs], **values)
        from sftkit.data.images import image_spec

        self.path = prepared_dir(opts, opts.data_path, tokenizer,
                                 image_spec=image_spec(model or getattr(tokenizer, "name_or_path", ""), tokenizer))
        self.manifest = prep.read_manifest(self.path)
        self._data = prep.load_prepared(self.path)

    def __len__(self) -> int:
        return len(self._data)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        row = self._data[i]
        out = {"input_ids": row["input_ids"], "attention_mask": [1] * len(row["input_ids"]), "labels": row["labels"]}
        return {**out, "images": row["images"]} if "images" in row else out
