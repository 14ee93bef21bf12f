"""Training sets: a prepare-data directory, or raw data prepared on the fly into a cache keyed by
its fingerprint (so a second run, or the other ranks, reuse it)."""

from __future__ import annotations

from pathlib import Path

from sftkit.data import prepare as prep
from sftkit.data.options import DataOptions, Mixing
from sftkit.errors import ConfigError


def prepared_dir(opts: DataOptions, specs: list[str], tokenizer, console=None,
                 mixing: Mixing | None = None) -> Path:
    """A directory holding the prepared form of `specs` (mixed by `mixing`), building it if needed."""
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
