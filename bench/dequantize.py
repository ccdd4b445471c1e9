"""What expanding SmolLM2's 4-bit weights to float32 costs at load, two ways, on this machine.

    .venv/bin/python bench/dequantize.py

Reads the bundled GGUF and expands its 211 quantized matrices with ``mx.dequantize`` (then
float32) and with kiapi's element-wise ``dequantized_float32``, each evaluated matrix by matrix
as the loader does; prints the seconds (best of 2) and the largest difference between the two.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, smollm2_gguf  # noqa: E402

from kiapi.runtime.llm_engine import GGUF_GROUP_SIZE  # noqa: E402
from kiapi.runtime.mlx_import import import_mlx  # noqa: E402
from kiapi.runtime.mlx_quantized import dequantized_float32  # noqa: E402


def main() -> None:
    mx = import_mlx()
    tensors = mx.load(str(smollm2_gguf()))
    mx.eval(list(tensors.values()))
    layers = []
    for name in sorted(k.removesuffix(".scales") for k in tensors if k.endswith(".scales")):
        packed, scales = tensors[f"{name}.weight"], tensors[f"{name}.scales"]
        bits = packed.shape[-1] * 32 // (scales.shape[-1] * GGUF_GROUP_SIZE)
        layers.append((packed, scales, tensors[f"{name}.biases"], bits))

    def mlx_dequantize(packed, scales, biases, bits):
        return mx.dequantize(packed, scales, biases, GGUF_GROUP_SIZE, bits).astype(mx.float32)

    def kiapi_expansion(packed, scales, biases, bits):
        return dequantized_float32(packed, scales, biases, GGUF_GROUP_SIZE, bits)

    def timed(expand) -> float:
        best = float("inf")
        for _ in range(2):
            started = time.perf_counter()
            for layer in layers:
                mx.eval(expand(*layer))
            best = min(best, time.perf_counter() - started)
        return best

    difference = max(
        mx.abs(mlx_dequantize(*layer) - kiapi_expansion(*layer)).max().item() for layer in layers
    )
    print(f"machine: {machine()}; {len(layers)} quantized matrices of SmolLM2-135M (Q4_1)\n")
    print("| expansion to float32 | seconds |")
    print("|---|---|")
    print(f"| mx.dequantize (float16), then float32 | {timed(mlx_dequantize):.2f} |")
    print(f"| kiapi dequantized_float32 | {timed(kiapi_expansion):.2f} |")
    print(f"\nlargest difference between the two: {difference:.2e} (mx.dequantize's float16)")


if __name__ == "__main__":
    main()
