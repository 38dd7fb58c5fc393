#!/usr/bin/env bash
# Create (or reuse) .venv with the project and its test tools installed. Safe to run repeatedly.
# CPU PyTorch 2.13.0 is pinned first because pip takes it from a local wheel on the project's machines;
# an unpinned torch would pull a multi-GB CUDA build. On a GPU host install the CUDA torch you want first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.installed-$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  python -m pip install --quiet --upgrade pip
  python -c "import torch" 2>/dev/null || python -m pip install --quiet "torch==2.13.0"
  python -m pip install --quiet -e ".[test]"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
