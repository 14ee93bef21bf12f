"""File digests for checkpoint checksums: xxh3-128, several files at once.

xxh3-128 hashed 22 GB/s on one core of the 2-core CI machine, blake3 4.1 (6.5 on its threads) and
sha256 1.8 (bench/RESULTS.md, "Checkpoint bench"): at that speed the disk, not the hash, sets
the time of a save or a resume. It is not a cryptographic hash, and needs not be one here: it
finds damage (a copy cut short, a flipped block); what a checkpoint may hold at all is decided by
its loaders (safetensors, torch.load with weights_only=True). xxhash comes with datasets.

A digest is written "xxh3_128:<hex>"; checkpoints before state version 4 hold a bare sha256 hex
digest, which still verifies.
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
