#!/usr/bin/env bash
# Download, here, the wheels a lent GPU machine lacks into .whl/ (ignored by git; pass it to the
# device with carry: [".whl"]); bench/gpu_check.sh installs them there into a temporary folder.
#
# The device image: Python 3.12, torch 2.11 + CUDA 13, accelerate, peft, typer, rich, pyarrow,
# pandas, tokenizers 0.23; no datasets, trl, liger-kernel, pytest, deepspeed (not needed: the check
# runs one process); transformers 5.17, older than constraints.txt's. Nothing can be downloaded
# there. Pure-Python wheels, and cp312 manylinux ones for the packages with compiled parts (regex,
# xxhash), each pinned as constraints.txt pins it.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-$REPO/.venv/bin/python}
DEST="$REPO/.whl"
WHEELS=(
    transformers==5.24.0   # the image's 5.17 is older than what sftkit is tested with
    peft==0.21.2
    datasets==5.2.0        # sftkit's prepared sets; and its pure-Python dependencies below
    dill==0.4.1
    multiprocess==0.70.19
    fsspec==2026.9.0
    xxhash==4.1.0
    regex==2026.11.19      # transformers' tokenization utilities
    trl==1.16.0            # the peer in bench/train_bench.py
    liger-kernel==0.8.5    # TRL + Liger (use_liger_kernel), a peer in bench/train_bench.py
    pytest==9.2.0          # pytest -m gpu
    pluggy==1.7.0
    iniconfig==2.3.1
    flash-linear-attention==0.6.0  # sftkit[gdn]: Gated DeltaNet kernels (its modules are in fla-core)
    fla-core==0.6.0
    einops==0.8.2                  # fla-core's one dependency (Triton comes with the CUDA torch)
)
mkdir -p "$DEST"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST" "${WHEELS[@]}"
cd "$REPO"
wheels=$(du -cb .whl/*.whl | tail -1 | cut -f1)
tree=$( { git ls-files; git ls-files --others --exclude-standard; } | sort -u | while read -r f; do
    [ -f "$f" ] && stat -c %s "$f"; done | awk '{s += $1} END {print s + 0}')
total=$((wheels + tree))
printf '%s wheels in .whl/: %.1f MiB; the tree a device call copies: %.1f MiB; together %.1f MiB (limit 64 MiB)\n' \
    "$(ls .whl/*.whl | wc -l)" "$(echo "$wheels / 1048576" | bc -l)" "$(echo "$tree / 1048576" | bc -l)" \
    "$(echo "$total / 1048576" | bc -l)"
if [ "$total" -ge $((64 * 1024 * 1024)) ]; then
    echo "over the 64 MiB a device call carries" >&2
    exit 1
fi
