#!/usr/bin/env bash
# Set up ./.venv from the committed lock (requirements.lock, requirements-nodeps.txt; every
# package pinned with its hash, so every fresh machine tests the same versions) and run the
# suites: lint (ruff), unit and contract (pytest), in that one environment.
# Usage: scripts/test.sh [lint|unit|contract ...] [-- pytest arguments]
#   scripts/test.sh unit -- -k files
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
suites=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do suites+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
[ ${#suites[@]} -gt 0 ] || suites=(lint unit contract)

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=.venv/.kiapi-test-lock
want=$(cat requirements.lock requirements-nodeps.txt pyproject.toml | sha256sum)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install --quiet "pip==26.3"
  .venv/bin/python -m pip install --quiet --require-hashes -r requirements.lock
  .venv/bin/python -m pip install --quiet --no-deps -e .
  .venv/bin/python -m pip install --quiet --no-deps -r requirements-nodeps.txt
  scripts/install_openblas.sh
  echo "$want" > "$stamp"
fi

for suite in "${suites[@]}"; do
  echo "== $suite"
  case "$suite" in
    lint)
      .venv/bin/ruff check kiapi tests scripts bench
      .venv/bin/ruff format --check kiapi tests scripts bench ;;
    unit|contract)
      .venv/bin/python -m pytest "tests/$suite" "$@" ;;
    *) echo "unknown suite $suite (lint, unit, contract)" >&2; exit 2 ;;
  esac
done
