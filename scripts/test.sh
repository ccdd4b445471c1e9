#!/usr/bin/env bash
# Set up (if needed) and run every test suite: tox envs lint, unit and contract.
# Extra arguments go to tox (e.g. -e unit, or -- -k files).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test,lint,vl
.venv/bin/python -m pip install --quiet "tox>=4.11,<5"
exec .venv/bin/tox "$@"
