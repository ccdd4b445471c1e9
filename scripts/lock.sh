#!/usr/bin/env bash
# Regenerate requirements.lock from pyproject.toml: every package of kiapi and of its test, lint
# and vl extras pinned with hashes, for every platform kiapi supports (uv's universal mode).
# CI and scripts/test.sh install from it; scripts/setup.sh (users) keeps pyproject's ranges.
# tests/unit/test_lock.py fails when the lock no longer satisfies pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
UV_VERSION=0.13.9
tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
python3 -m pip install --quiet --target "$tools" "uv==$UV_VERSION"
PYTHONPATH="$tools" python3 -m uv pip compile pyproject.toml \
    --extra test --extra lint --extra vl --universal --python-version 3.11 \
    --generate-hashes --no-header --quiet -o requirements.lock
echo "requirements.lock: $(grep -c '==' requirements.lock) pins"
