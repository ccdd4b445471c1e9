"""The bfloat16 encoder's own costs on this CPU: its AMX products and where a batch goes.

    .venv/bin/python bench/encoder_kernel.py [--rounds 5]

In one process, nothing else running, alternating the variants ``--rounds`` times (the host
is noisy: compare figures from one run). Prints:

1. kiapi's bfloat16 product (``qmatmul.gemm_bf16``) on all-MiniLM-L6-v2's shapes for a
   512-token chunk and a 4096-token batch, TFLOP/s, with its buffers starting cache lines
   (as kiapi allocates them, ``qmatmul.aligned_empty``) and 16 bytes past one (NumPy's own
   alignment);
2. the bundled all-MiniLM-L6-v2, 32 texts of 128 tokens and 8 of 12, ms per batch: the whole
   batch per layer at once against ``ENCODER_CHUNK_TOKENS`` chunks, and the share of a
   chunked batch each part takes (the products, attention, layer norms, the rest:
   tokenizing, embedding, pooling, Python).

Needs AMX (Intel Sapphire Rapids or later) and kiapi's kernel; says so and stops otherwise.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402
from throughput import make_texts  # noqa: E402

SHAPES = {  # MiniLM's products: (inputs, outputs)
    "q, k, v": (384, 1152),
    "output": (384, 384),
    "up": (384, 1536),
    "down": (1536, 384),
}


def misaligned(shape, dtype, offset: int = 16):
    """An array ``offset`` bytes past a cache line (NumPy guarantees only 16)."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape))
    raw = np.empty(count * dtype.itemsize + 128, dtype=np.uint8)
    start = -raw.ctypes.data % 64 + offset
    return raw[start : start + count * dtype.itemsize].view(dtype).reshape(shape)


def product_rates(rounds: int) -> list[str]:
    from kiapi.runtime import qmatmul

    mx = qmatmul.import_mlx()
    rng = np.random.default_rng(0)
    lines = ["| product | rows | aligned TFLOP/s | 16 bytes off TFLOP/s |", "|---|---|---|---|"]
    for name, (inputs, outputs) in SHAPES.items():
        linear = qmatmul.Bf16Linear(mx.array(rng.standard_normal((outputs, inputs), "f") * 0.05))
        for rows in (512, 4096):
            x = rng.standard_normal((rows, inputs), dtype=np.float32)
            ways = {}
            for label, alloc in (("aligned", qmatmul.aligned_empty), ("off", misaligned)):
                tiles = alloc(linear.tiles.shape, np.uint16)
                tiles[:] = linear.tiles
                ways[label] = (tiles, alloc((rows, outputs), np.float32))
            rates: dict[str, list[float]] = defaultdict(list)
            repeats = max(3, int(2e9 / (2 * rows * inputs * outputs)))
            for _ in range(rounds):
                for label, (tiles, out) in ways.items():
                    if label == "off":  # x's tiles in a work buffer off a line, as NumPy left it
                        work = misaligned(((rows + 31) // 32 * 32 * inputs,), np.uint16)
                        qmatmul._buffers.by_name["x_tiles"] = work
                    else:
                        qmatmul.release_scratch()
                    qmatmul.gemm_bf16(x, tiles, outputs, out=out)
                    started = time.perf_counter()
                    for _ in range(repeats):
                        qmatmul.gemm_bf16(x, tiles, outputs, out=out)
                    seconds = (time.perf_counter() - started) / repeats
                    rates[label].append(2 * rows * inputs * outputs / seconds / 1e12)
            qmatmul.release_scratch()
            aligned, off = (statistics.median(rates[k]) for k in ("aligned", "off"))
            lines.append(f"| {name} ({inputs} -> {outputs}) | {rows} | {aligned:.2f} | {off:.2f} |")
    return lines


def batch_parts(rounds: int) -> list[str]:
    from kiapi.config import Settings
    from kiapi.runtime import blas, mlx_engine, qmatmul

    settings = Settings(_env_file=None)
    blas.activate(settings.blas)
    from kiapi.runtime.catalog import default_registry
    from kiapi.runtime.embedding import EmbeddingItem

    model = mlx_engine.load_embedding_model(
        default_registry().resolve("embedding", "all-minilm-l6-v2")
    ).model
    chunk = mlx_engine.ENCODER_CHUNK_TOKENS
    lines = [
        f"| batch | whole batch per layer, ms | {chunk}-token chunks, ms | products | attention "
        "| layer norms | the rest |",
        "|---|---|---|---|---|---|---|",
    ]
    timed = ("gemm_bf16", "gemm_bf16_gelu_rows", "attention", "add_layer_norm")
    originals = {name: getattr(qmatmul, name) for name in timed}
    spent: dict[str, float] = defaultdict(float)

    def timing(name):
        def call(*args, **kwargs):
            started = time.perf_counter()
            try:
                return originals[name](*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - started

        return call

    for count, tokens in ((32, 128), (8, 12)):
        items = [EmbeddingItem(text=t) for t in make_texts(tokens, count, seed=tokens)]
        repeats = 10 if tokens > 100 else 100
        per: dict[int, list[float]] = defaultdict(list)
        parts: dict[str, list[float]] = defaultdict(list)
        for _ in range(rounds):
            for size in (10**9, chunk):
                mlx_engine.ENCODER_CHUNK_TOKENS = size
                model.embed(items)
                spent.clear()
                for name in timed:
                    setattr(qmatmul, name, timing(name))
                started = time.perf_counter()
                for _ in range(repeats):
                    model.embed(items)
                seconds = (time.perf_counter() - started) / repeats
                for name in timed:
                    setattr(qmatmul, name, originals[name])
                per[size].append(seconds * 1e3)
                if size == chunk:
                    products = spent["gemm_bf16"] + spent["gemm_bf16_gelu_rows"]
                    parts["products"].append(products / repeats / seconds)
                    parts["attention"].append(spent["attention"] / repeats / seconds)
                    parts["norms"].append(spent["add_layer_norm"] / repeats / seconds)
        mlx_engine.ENCODER_CHUNK_TOKENS = chunk
        share = {k: statistics.median(v) for k, v in parts.items()}
        rest = 1 - sum(share.values())
        lines.append(
            f"| {count} x {tokens} tokens | {statistics.median(per[10**9]):.1f} "
            f"| {statistics.median(per[chunk]):.1f} | {share['products']:.0%} "
            f"| {share['attention']:.0%} | {share['norms']:.0%} | {rest:.0%} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    from kiapi.runtime import qmatmul

    if not qmatmul.bf16_products():
        raise SystemExit("no bfloat16 products here (no AMX, no kernel, or float32 precision)")
    print(f"machine: {machine()}\n")
    print("\n".join(product_rates(args.rounds)))
    print()
    print("\n".join(batch_parts(args.rounds)))


if __name__ == "__main__":
    main()
