#!/usr/bin/env bash
# Set up ./.venv from the committed lock (requirements.lock: every package pinned with its hash,
# so every fresh machine tests the same versions; installed by uv, pinned in requirements-uv.lock,
# which takes 45 s where pip takes 2 min), fetch what pip cannot install with
# `kiapi setup` (pinned by SHA-256 in kiapi/runtime/pinned.py; kept in .venv/kiapi-packages),
# and run the suites: lint (ruff), unit and contract (pytest), in that one environment.
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
want=$(cat requirements-uv.lock requirements.lock pyproject.toml | sha256sum)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --require-hashes \
      -r requirements-uv.lock
  # Bytecode is compiled once here: test servers run as subprocesses, and without .pyc files
  # each would compile transformers' and mlx-lm's sources again.
  uv=(.venv/bin/uv pip install --quiet --python .venv/bin/python --compile-bytecode)
  "${uv[@]}" --require-hashes -r requirements.lock
  "${uv[@]}" --no-deps -e .
  echo "$want" > "$stamp"
fi
export KIAPI_PACKAGES_ROOT="$PWD/.venv/kiapi-packages"
.venv/bin/kiapi setup >/dev/null

for suite in "${suites[@]}"; do
  echo "== $suite"
  case "$suite" in
    lint)
      .venv/bin/ruff check kiapi tests scripts bench
      .venv/bin/ruff format --check kiapi tests scripts bench ;;
    unit)
      .venv/bin/python -m pytest tests/unit "$@" ;;
    contract)
      # Two workers, one test file each: most of this suite waits on servers it starts (module
      # fixtures), so two files at a time take 145 s where one takes 235 s on 2 vCPUs. Progress
      # is a count: xdist counts schemathesis' subtests in the percentage (it ended at 106%).
      .venv/bin/python -m pytest tests/contract -n 2 --dist loadfile \
          -o console_output_style=count "$@" ;;
    *) echo "unknown suite $suite (lint, unit, contract)" >&2; exit 2 ;;
  esac
done
