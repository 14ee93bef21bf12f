#!/usr/bin/env bash
# The prepared GPU check (issue 12): bash bench/gpu_check.sh OUTDIR
#
# On a lent GPU machine, in one call of at most 8 minutes: installs the wheels that
# scripts/gpu_wheels.sh put in .whl/ (the device image lacks datasets, trl, liger-kernel, pytest
# and has an older transformers) into a temporary folder first on PYTHONPATH, then runs
# bench/gpu_check.py: GPU warm-up, pytest -m gpu, train_bench for Qwen3-0.6B/2048 and
# Qwen3-1.7B/4096, and the summary (OUTDIR/summary.md, OUTDIR/summary.json).
# Without CUDA the same steps run as a dry run on the tiny model (CI runs it), and nothing is
# installed: the wheels are for the device's Python 3.12.
set -euo pipefail
OUT=${1:?usage: bash bench/gpu_check.sh OUTDIR}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-$(command -v python3 || command -v python)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SITE=$(mktemp -d)
# models (3.4 GB at 1.7B), prepared data and runs: not under OUTDIR, whose files a device call returns
CACHE=""
if [ -z "${SFTKIT_CACHE:-}" ]; then
    CACHE=$(mktemp -d)  # ours to remove; a cache the caller set is left alone
    export SFTKIT_CACHE=$CACHE
fi
trap 'rm -rf "$SITE" ${CACHE:+"$CACHE"}' EXIT
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    if compgen -G "$REPO/.whl/*.whl" > /dev/null; then
        "$PY" -m pip install --quiet --no-index --no-deps --target "$SITE" "$REPO"/.whl/*.whl
        echo "installed $(ls "$REPO"/.whl/*.whl | wc -l) wheels from .whl/ into $SITE"
    else
        echo "no .whl/ here: using what is installed (run scripts/gpu_wheels.sh before lending the tree to a device)"
    fi
fi
export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
cd "$REPO"
"$PY" bench/gpu_check.py "$OUT"
