#!/usr/bin/env bash
# Set up kiapi in ./.venv (idempotent). Needs only Python >= 3.11 with pip.
# Usage: scripts/setup.sh [extras]   e.g. scripts/setup.sh test,lint,vl   (vl: Qwen3-VL engine)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
extras=${1:-}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".${extras:+[$extras]}"
.venv/bin/python -m pip install --quiet --no-deps -r requirements-nodeps.txt
scripts/install_openblas.sh
