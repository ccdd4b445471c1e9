"""fp32 matmul speed of MLX on the CPU with each BLAS, side by side (Linux).

    .venv/bin/python bench/blas_matmul.py [LIBRARY ...]

Each library (default: MLX's bundled reference BLAS, then every OpenBLAS kiapi finds) is loaded
in a fresh process the way kiapi loads it (``KIAPI_BLAS=<path>``), and MLX times three shapes:
a 1024x1024 square, and the matmuls of all-MiniLM-L6-v2's feed-forward layer for a batch of 32
short sentences (384x384 @ 384x1536) and for one (12x384 @ 384x1536). To compare MKL, install
it (``pip install mkl``) and pass ``.venv/lib/libmkl_rt.so.2`` (with ``MKL_THREADING_LAYER=GNU``).
"""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import json, sys, time
from kiapi.runtime import blas
status = blas.activate(sys.argv[1])
from kiapi.runtime.mlx_engine import import_mlx
mx = import_mlx()

def gflops(m, k, n, seconds=1.0):
    a, b = mx.random.normal((m, k)), mx.random.normal((k, n))
    mx.eval(a @ b)
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        mx.eval(a @ b)
        count += 1
    return 2 * m * k * n * count / (time.perf_counter() - started) / 1e9

print(json.dumps({"name": status.describe(), "square": gflops(1024, 1024, 1024),
                  "batch32": gflops(384, 384, 1536), "one": gflops(12, 384, 1536)}))
"""


def measure(setting: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, setting], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    from kiapi.runtime.blas import openblas_candidates

    settings = sys.argv[1:] or ["none", *openblas_candidates()]
    print("| BLAS | 1024^3 GFLOP/s | 384x384x1536 | 12x384x1536 |")
    print("|---|---|---|---|")
    for setting in settings:
        r = measure(setting)
        print(f"| {r['name'][:90]} | {r['square']:.1f} | {r['batch32']:.1f} | {r['one']:.1f} |")


if __name__ == "__main__":
    main()
