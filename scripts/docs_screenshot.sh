#!/usr/bin/env bash
# Render the served documentation pages in headless Chromium with no network and save PNGs.
# Needs Debian's chromium (apt-get install chromium). Usage: scripts/docs_screenshot.sh [outdir]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-artifacts/docs-screenshots}
mkdir -p "$out"
port=${KIAPI_DOCS_PORT:-8765}
export KIAPI_FILES_ROOT=${KIAPI_FILES_ROOT:-$(mktemp -d)}
.venv/bin/kiapi serve --port "$port" >"$out/server.log" 2>&1 &
server=$!
trap 'kill $server' EXIT
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.1; done
for page in docs.html v1/embedding/docs.html v1/embedding/redoc.html; do
  name=$(echo "$page" | tr '/.' '__')
  chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --user-data-dir="$(mktemp -d)" --proxy-server=127.0.0.1:9 --proxy-bypass-list='127.0.0.1' \
    --window-size=1280,1600 --virtual-time-budget=8000 \
    --screenshot="$out/$name.png" "http://127.0.0.1:$port/$page" 2>/dev/null
  echo "$out/$name.png"
done
