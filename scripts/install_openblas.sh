#!/usr/bin/env bash
# MLX's Linux wheel runs matmuls on the reference BLAS (~5 GFLOP/s); kiapi loads OpenBLAS
# instead (~180 GFLOP/s here, kiapi/runtime/blas.py): the ngsolve-openblas wheel's 0.3.33 (a
# pip dependency on x86-64), which needs the system's libgfortran5, or the system's OpenBLAS.
# When neither loads, installs Debian's libopenblas0-pthread (which brings libgfortran5) if
# apt-get can run (as root, or with password-less sudo); otherwise says how. Nothing to do on
# macOS (Metal/Accelerate).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(uname -s)" = Linux ] || exit 0
found() { .venv/bin/python -c 'import sys; from kiapi.runtime.blas import loadable_openblas as f; sys.exit(0 if f() else 1)'; }
found && exit 0
if command -v apt-get >/dev/null; then
  if [ "$(id -u)" = 0 ]; then sudo=""; elif sudo -n true 2>/dev/null; then sudo="sudo -n"; else sudo=none; fi
  if [ "$sudo" != none ]; then
    echo "installing OpenBLAS for MLX (libopenblas0-pthread)"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get install -y -qq --no-install-recommends libopenblas0-pthread >/dev/null 2>&1 \
      || { $sudo apt-get update -qq && $sudo apt-get install -y -qq --no-install-recommends libopenblas0-pthread >/dev/null; }
    found && exit 0
  fi
fi
echo "WARNING: no OpenBLAS found: MLX will run on its reference BLAS, ~20-35x slower." >&2
echo "         Install it (Debian/Ubuntu: sudo apt-get install libopenblas0-pthread; Fedora:" >&2
echo "         sudo dnf install openblas) or set KIAPI_BLAS to a library exporting cblas_sgemm." >&2
