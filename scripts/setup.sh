#!/usr/bin/env bash
# Create .venv and install sftkit with the tested pins. Idempotent; about 2 minutes when new.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
step() { echo "setup: $*" >&2; }
[ -x .venv/bin/python ] || { step "creating .venv"; "$PY" -m venv .venv; }
# torch alone first, pinned: the constraint keeps pip from pulling a CUDA build.
step "installing torch 2.13.0, CPU build (about 45 s when new)"
.venv/bin/pip install -q --disable-pip-version-check -c constraints.txt torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
step "installing sftkit and its pinned dependencies (about 80 s when new)"
.venv/bin/pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import sftkit, torch; print(f'sftkit {sftkit.__version__} ready (torch {torch.__version__})')"
