#!/usr/bin/env bash
# Set up (if anything changed) and serve kiapi. Extra arguments go to `kiapi serve`
# (e.g. --port 9000). When pyproject.toml and the set-up script are unchanged since the last
# set-up, and `kiapi setup` finds everything in place, it serves at once (no pip run).
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=.venv/.kiapi-serve-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! .venv/bin/kiapi setup >/dev/null 2>&1; then
  scripts/setup.sh
  echo "$want" > "$stamp"
fi
exec .venv/bin/kiapi serve "$@"
