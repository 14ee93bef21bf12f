"""File digests for checkpoint checksums and prepared sets: xxh3-128, several files at once.

xxh3-128 hashes several times faster than blake3 and sha256 (bench/RESULTS.md, "Checkpoint
bench"): at its speed the disk, not the hash, sets the time of a save or a resume. It is not a
cryptographic hash, and needs not be one here: it
finds damage (a copy cut short, a flipped block); what a checkpoint may hold at all is decided by
its loaders (safetensors, torch.load with weights_only=True). xxhash comes with datasets.

A digest is written "xxh3_128:<hex>"; checkpoints before state version 4 hold a bare sha256 hex
digest, which still verifies. A folder's record (`record`, checked by `damage`) holds each file's
size and digest: sizes are compared first, for nothing, and the files hashed only if all match.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

FAST = "xxh3_128"
BLOCK = 1 << 24  # 16 MiB reads: large enough that the per-call cost is nothing, small in memory
# Threads overlap one file's reads with another's hashing (file reads release the GIL); more than
# the cores buys nothing when the hash runs at memory speed.
MAX_THREADS = 8


def _hasher(algo: str):
    if algo == FAST:
        import xxhash

        return xxhash.xxh3_128()
    return hashlib.sha256()


def algo_of(digest: str) -> str:
    """The hash a digest was made with: a prefix names it; none is sha256 (older checkpoints)."""
    return digest.split(":", 1)[0] if ":" in digest else "sha256"


def of_bytes(data: bytes, algo: str = FAST) -> str:
    """The digest of bytes about to be written (a file hashed while it is written, not reread)."""
    h = _hasher(algo)
    h.update(data)
    return _format(h, algo)


def of_file(path: Path, algo: str = FAST) -> str:
    h = _hasher(algo)
    with open(path, "rb", buffering=0) as fh:
        for block in iter(lambda: fh.read(BLOCK), b""):
            h.update(block)
    return _format(h, algo)


def of_files(paths: list[Path], algos: list[str] | None = None) -> list[str]:
    """The digests of several files, in parallel threads; `algos` per file (default: the fast one)."""
    algos = algos or [FAST] * len(paths)
    threads = max(1, min(MAX_THREADS, os.cpu_count() or 1, len(paths)))
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(of_file, paths, algos))


def _format(h, algo: str) -> str:
    return h.hexdigest() if algo == "sha256" else f"{algo}:{h.hexdigest()}"


def record(root: Path, under: str) -> dict[str, dict]:
    """{path relative to root: {"size": bytes, "digest": ...}} for every file under root/under (the
    file itself where it is one; nothing where it is missing)."""
    top = root / under
    files = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())
    return {p.relative_to(root).as_posix(): {"size": p.stat().st_size, "digest": d}
            for p, d in zip(files, of_files(files))}


def damage(root: Path, files: dict[str, dict]) -> str | None:
    """What differs from the `record` of root: `NAME: size X, expected Y` for the first file that
    is missing or of another size (a copy cut short), then `NAME: its bytes changed` for one whose
    digest differs (read only once every size matched); None when every file is as recorded."""
    for name, want in files.items():
        try:
            size = (root / name).stat().st_size
        except OSError:
            return f"{name}: missing"
        if size != want["size"]:
            return f"{name}: size {size:,}, expected {want['size']:,}"
    got = of_files([root / name for name in files], [algo_of(w["digest"]) for w in files.values()])
    for (name, want), digest in zip(files.items(), got):
        if digest != want["digest"]:
            return f"{name}: its bytes changed (digest {digest}, expected {want['digest']})"
    return None
