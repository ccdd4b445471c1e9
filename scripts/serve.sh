#!/usr/bin/env bash
# Set up (if needed) and serve kiapi. Extra arguments go to `kiapi serve` (e.g. --port 9000).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/kiapi serve "$@"
