"""Training sets: a prepare-data directory, or raw data prepared on the fly into a cache keyed by
its fingerprint (so a second run, or the other ranks, reuse it)."""

from __future__ import annotations

from pathlib import Path

from sftkit.data import prepare as prep
from sftkit.data.options import DataOptions, Mixing
from sftkit.errors import ConfigError


def prepared_dir(opts: DataOptions, specs: list[str], tokenizer, console=None,
                 mixing: Mixing | None = None, label: str = "data") -> Path:
    """A directory holding the prepared form of `specs` (mixed by `mixing`), building it if needed.
    With a console, one line says what of it was dropped, cut or is worth a look (see data_note)."""
    out = _prepared_dir(opts, specs, tokenizer, console, mixing)
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
    holds the same counts, but a user of `train` never opens it (2 of 8 rows once vanished so)."""
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
    """Every example's length as one Arrow column read (indices mapping applied). Indexing
    datasets' lazy `dataset["length"]` per example cost ~0.5 ms a row: 60k rows took 30 s of setup."""
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
                  mixing: Mixing | None = None) -> Path:
    from sftkit.io import cache_dir, check_cache_writable, remove_stale_tmp

    if any(prep.is_prepared(s) for s in specs) and (len(specs) > 1 or mixing):
        raise ConfigError("a prepared directory cannot be mixed with other sources or weighted; "
                          "pass the raw files with --data_path and --data_weights, or prepare them together")
    if len(specs) == 1 and prep.is_prepared(specs[0]):
        manifest = prep.read_manifest(Path(specs[0]))
        if manifest.get("format") != prep.FORMAT:
            raise ConfigError(f"{specs[0]} was prepared by an older sftkit; run prepare-data again")
        if manifest.get("tokenizer_sha256") != prep.tokenizer_fingerprint(tokenizer):
            raise ConfigError(f"{specs[0]} was prepared with another tokenizer or chat template "
                              f"({manifest.get('tokenizer')}); run prepare-data again with this model")
        return Path(specs[0])
    srcs = prep.resolve_sources(specs, opts)
    fp = prep.fingerprint(srcs, tokenizer, opts, mixing)  # names the entry; prepare reuses it
    out = cache_dir() / "prepared" / fp[:20]
    if not prep.is_prepared(out):
        check_cache_writable(out)
        remove_stale_tmp(out.parent)
    prep.prepare(opts, specs, out, tokenizer, console, mixing, cache=True, fp=fp)
    return out


class SFTDataset:
    """Tokenized SFT examples: `ds[i]` -> input_ids, attention_mask, labels (lists of int).

    labels are -100 where the model is not trained and are NOT shifted (the Hugging Face
    convention: the model shifts them). Built with the same code as `sftkit prepare-data`.
    """

    def __init__(self, data_path: str | list[str], tokenizer, max_length: int | None = None,
                 format_type: str | None = None, use_chat_template: bool = True, **options):
        if not use_chat_template:
            raise ConfigError("SFTDataset renders with the chat template only; pass use_chat_template=True")
        specs = [data_path] if isinstance(data_path, (str, Path)) else list(data_path)
        values = dict(options)
        if max_length is not None:
            values["max_length"] = max_length
        if format_type is not None:
            values["format_type"] = format_type
        opts = DataOptions(data_path=[str(s) for s in specs], **values)
        self.path = prepared_dir(opts, opts.data_path, tokenizer)
        self.manifest = prep.read_manifest(self.path)
        self._data = prep.load_prepared(self.path)

    def __len__(self) -> int:
        return len(self._data)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        row = self._data[i]
        return {"input_ids": row["input_ids"], "attention_mask": [1] * len(row["input_ids"]), "labels": row["labels"]}
