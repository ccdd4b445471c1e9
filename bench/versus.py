"""kiapi against its peers on this machine, in one run: the issue 16 table.

    .venv/bin/python bench/versus.py [--seconds 3] [--new-tokens 128]

One command, loopback only, bounded (about 10 minutes once the peers' venvs exist; creating
them the first time costs more, see ``peers.py``). Prints:

1. the machine: its float32 GEMM GFLOP/s through MLX (kiapi's path to BLAS) and its memory
   bandwidth, and the bounds they imply: all-MiniLM-L6-v2 texts/s if every FLOP ran at the
   GEMM rate, SmolLM2 decode tokens/s if every weight were read once per token at that
   bandwidth (float32, as kiapi holds it on the CPU, and 4.5 bits, as Q4_1 stores it);
2. embeddings (``throughput.py``): kiapi, infinity-emb's torch engine and its optimum (ONNX
   Runtime) engine on the same model folder, 12- and 128-token texts, 1 and 32 clients, and
   kiapi's in-process batch-1 latency;
3. chat (``chat_serving.py``): kiapi and llama-cpp-python's server on the same GGUF file,
   and kiapi's chat and embeddings at once in one server;
4. every issue 16 target with its measured figure, met or MISSED.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import chat_serving  # noqa: E402
import throughput  # noqa: E402
from _common import machine, target_row  # noqa: E402

MINILM_LAYERS, MINILM_HIDDEN, MINILM_FFN = 6, 384, 1536
SMOLLM2_PARAMS = 134_515_008  # weights read per decoded token (embeddings tied to the head)


def minilm_gflop(tokens: int) -> float:
    """FLOPs of one all-MiniLM-L6-v2 forward pass over ``tokens`` tokens (matmuls only)."""
    h, f = MINILM_HIDDEN, MINILM_FFN
    per_token = 2 * (4 * h * h + 2 * h * f)  # Q, K, V, O and the two FFN matrices
    attention = 2 * 2 * tokens * tokens * h  # QK^T and AV
    return MINILM_LAYERS * (tokens * per_token + attention) / 1e9


def gemm_gflops_in_subprocess() -> tuple[float, float | None]:
    """:func:`gemm_gflops` and :func:`bf16_gemm_gflops` in a child process: this one, the load
    generator, stays free of MLX and its BLAS threads (see
    ``chat_serving.make_long_prompts``)."""
    import subprocess

    done = subprocess.run(
        [sys.executable, __file__, "--gemm-only"], capture_output=True, text=True, check=True
    )
    float32, bf16 = done.stdout.strip().splitlines()[-1].split()
    return float(float32), None if bf16 == "none" else float(bf16)


def bf16_gemm_gflops(size: int = 1024, repeats: int = 20) -> float | None:
    """kiapi's bfloat16 AMX product (``qmatmul.gemm_bf16``) on the same square matrices, or
    None where it does not run (no AMX, KIAPI_MATMUL_PRECISION=float32)."""
    import numpy as np

    from kiapi.config import Settings
    from kiapi.runtime import qmatmul
    from kiapi.runtime.mlx_import import import_mlx

    qmatmul.configure(Settings(_env_file=None).matmul_precision)
    if not qmatmul.bf16_products():
        return None
    mx = import_mlx()
    linear = qmatmul.Bf16Linear(mx.random.normal((size, size)))
    x = np.random.default_rng(0).standard_normal((size, size)).astype(np.float32)
    out = np.empty((size, size), dtype=np.float32)
    qmatmul.gemm_bf16(x, linear.tiles, size, out=out)
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(repeats):
            qmatmul.gemm_bf16(x, linear.tiles, size, out=out)
        best = min(best, (time.perf_counter() - started) / repeats)
    return 2 * size**3 / best / 1e9


def gemm_gflops(size: int = 1024, repeats: int = 20) -> float:
    from kiapi.config import Settings
    from kiapi.runtime import blas
    from kiapi.runtime.mlx_import import import_mlx

    blas.activate(Settings(_env_file=None).blas)
    mx = import_mlx()
    a = mx.random.normal((size, size))
    b = mx.random.normal((size, size))
    mx.eval(a @ b)
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(repeats):
            mx.eval(a @ b)
        best = min(best, (time.perf_counter() - started) / repeats)
    return 2 * size**3 / best / 1e9


def bandwidth_gbs(megabytes: int = 512) -> float:
    """Read+write GB/s of a large NumPy copy (the memory traffic of a weight sweep)."""
    import numpy as np

    src = np.ones(megabytes * 2**20 // 4, dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - started)
    return 2 * src.nbytes / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--gemm-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.gemm_only:
        bf16 = bf16_gemm_gflops()
        print(gemm_gflops(), "none" if bf16 is None else bf16)
        return

    (gflops, bf16_gflops), gbs = gemm_gflops_in_subprocess(), bandwidth_gbs()
    print(f"machine: {machine()}")
    print(f"float32 GEMM through MLX: {gflops:.0f} GFLOP/s; memory copy: {gbs:.1f} GB/s")
    if bf16_gflops is not None:
        print(f"bfloat16 GEMM through kiapi's AMX kernel: {bf16_gflops:.0f} GFLOP/s")
    print("\n| workload | work per item | bound at that rate |")
    print("|---|---|---|")
    for tokens in (12, 128):
        g = minilm_gflop(tokens)
        print(f"| MiniLM, {tokens}-token text | {g:.3f} GFLOP | {gflops / g:.0f} texts/s |")
        if bf16_gflops is not None:
            print(f"| same, at the bfloat16 rate | {g:.3f} GFLOP | {bf16_gflops / g:.0f} texts/s |")
    for label, bytes_per in (("float32", 4.0), ("Q4_1, 4.5 bits", 4.5 / 8)):
        mb = SMOLLM2_PARAMS * bytes_per / 1e6
        print(f"| SmolLM2 decode, {label} | {mb:.0f} MB read | {gbs * 1e3 / mb:.0f} tokens/s |")

    # --- embeddings
    tokens_list, clients = [12, 128], [1, 32]
    direct = throughput.direct_in_subprocess(tokens_list, min(args.seconds, 2.0))
    texts = {t: throughput.make_texts(t, 512, seed=t) for t in tokens_list}
    ours = throughput.run_kiapi("kiapi", {}, texts, clients, args.seconds)
    peers = [
        throughput.run_infinity(e, texts, clients, args.seconds)
        for e in throughput.INFINITY_ENGINES
    ]
    runs = [ours, *peers]
    print("\nEmbeddings, all-MiniLM-L6-v2, one text per request:\n")
    print("\n".join(throughput.server_tables(runs)))
    direct_ms = 1000 / direct["12"]["1"]
    print(f"\nkiapi in-process, batch 1, 12 tokens: {direct_ms:.1f} ms per text")

    # --- chat
    chat = chat_serving.run(args.new_tokens, max(args.seconds, 6.0), peer=True)
    print(f"\nChat, SmolLM2-135M-Instruct Q4_1 GGUF, greedy, {args.new_tokens} new tokens:\n")
    print("\n".join(chat["lines"]))

    # --- targets
    best_32 = max(peers, key=lambda r: r.results[12, 32].rps)
    best_1 = min(peers, key=lambda r: r.results[12, 1].ms(50))
    best_128 = max(peers, key=lambda r: r.results[128, 32].rps)
    o, t, m = chat["ours"], chat["theirs"], chat["mixed"]
    print("\nIssue 16 targets:\n")
    print("| target | measured | goal | |")
    print("|---|---|---|---|")
    rows = [
        (
            "12 tok, 32 clients req/s vs " + best_32.name,
            ours.results[12, 32].rps,
            ">=",
            2 * best_32.results[12, 32].rps,
        ),
        (
            "12 tok, 32 clients req/s, share of the FLOP bound",
            ours.results[12, 32].rps / (gflops / minilm_gflop(12)),
            ">=",
            0.6,
        ),
        *(
            [
                (
                    "12 tok, 32 clients req/s, share of the bfloat16 FLOP bound",
                    ours.results[12, 32].rps / (bf16_gflops / minilm_gflop(12)),
                    ">=",
                    0.6,
                )
            ]
            if bf16_gflops is not None
            else []
        ),
        (
            "12 tok, 1 client p50 ms vs " + best_1.name,
            ours.results[12, 1].ms(50),
            "<=",
            0.5 * best_1.results[12, 1].ms(50),
        ),
        (
            "12 tok, 1 client p50 ms vs in-process + 1.5 ms",
            ours.results[12, 1].ms(50),
            "<=",
            direct_ms + 1.5,
        ),
        (
            "128 tok, 32 clients req/s vs " + best_128.name,
            ours.results[128, 32].rps,
            ">=",
            1.5 * best_128.results[128, 32].rps,
        ),
        ("chat decode tok/s, 1 stream, vs llama.cpp", o.decode_tps, ">=", t.decode_tps),
        ("chat TTFT s, 256-token prompt, vs llama.cpp", o.ttft_long_s, "<=", t.ttft_long_s),
        ("chat 8 streams aggregate vs 3x 1 stream", o.parallel_tps, ">=", 3 * o.decode_tps),
        ("chat 8 streams aggregate vs llama.cpp's", o.parallel_tps, ">=", t.parallel_tps),
        (
            "embeddings p50 under 4 chat streams, ms",
            m.embed_p50_busy_ms,
            "<=",
            3 * m.embed_p50_idle_ms,
        ),
        (
            "chat aggregate under embeddings load, tok/s",
            m.chat_tps_busy,
            ">=",
            0.7 * m.chat_tps_idle,
        ),
        ("RSS warm, both bundled models, MiB", chat["rss_warm_mib"], "<=", 500),
        ("start to warm, both bundled models, s", chat["warm_s"], "<=", 5),
    ]
    for row in rows:
        print(target_row(*row))


if __name__ == "__main__":
    main()
