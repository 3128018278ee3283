#!/usr/bin/env bash
# Creates .venv in the project root and installs detailpp (torch 2.13.0) with its test, bench and demo extras.
# torch comes from pip's default index: on Linux that is the CUDA build (about 19 nvidia-* packages, several GB),
# right for a GPU. For the CPU-only build (~200 MB) name another index:
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/setup.sh
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  .venv/bin/python -m pip install -q --index-url "$TORCH_INDEX_URL" "torch==2.13.0"
else
  .venv/bin/python -m pip install -q "torch==2.13.0"
fi
.venv/bin/python -m pip install -q -e ".[test,bench,demo]"
