#!/usr/bin/env bash
# The prepared GPU check: bash bench/gpu_check.sh OUTDIR
#
# On a lent GPU machine, in one call of at most 9 minutes (540 s) with everything below: installs
# the wheels that scripts/gpu_wheels.sh put in .whl/ (the device image lacks datasets, trl,
# liger-kernel, flash-linear-attention, pytest and has an older transformers) into a temporary
# folder first on PYTHONPATH, then runs `python -m bench.gpu_check`: GPU warm-up, then by budget and in order
# of value Qwen3.5-2B-shaped LoRA and full fine-tuning, a reduced Qwen3-30B-A3B-shaped MoE with
# LoRA on its experts, Qwen3-0.6B, pytest -m gpu and the TRL comparisons; what no longer fits is
# skipped and says so. The summary: OUTDIR/summary.md, OUTDIR/summary.json.
# Without CUDA the same steps run as a dry run on tiny stand-ins (CI runs it), and nothing is
# installed: the wheels are for the device's Python 3.12.
set -euo pipefail
# the budget counts from here, installs included (gpu_check.py reads both times)
export GPU_CHECK_START=$(date +%s.%N)
OUT=${1:?usage: bash bench/gpu_check.sh OUTDIR}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-$(command -v python3 || command -v python)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SITE=$(mktemp -d)
# models (16 GB for the reduced MoE), prepared data and runs: not under OUTDIR, whose files a device call returns
CACHE=""
if [ -z "${SFTKIT_CACHE:-}" ]; then
    CACHE=$(mktemp -d)  # ours to remove; a cache the caller set is left alone
    export SFTKIT_CACHE=$CACHE
fi
trap 'rm -rf "$SITE" ${CACHE:+"$CACHE"}' EXIT
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    if compgen -G "$REPO/.whl/*.whl" > /dev/null; then
        "$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$REPO"/.whl/*.whl
        echo "installed $(ls "$REPO"/.whl/*.whl | wc -l) wheels from .whl/ into $SITE"
    else
        echo "no .whl/ here: using what is installed (run scripts/gpu_wheels.sh before lending the tree to a device)"
    fi
fi
export GPU_CHECK_INSTALLED=$(date +%s.%N)
export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
# flash-linear-attention autotunes its Triton kernels on first use: keep the results on disk, so
# that the second Qwen3.5 run (full fine-tuning, a new process) reuses what the first one measured
export TRITON_CACHE_AUTOTUNING=1
cd "$REPO"
"$PY" -m bench.gpu_check "$OUT"
