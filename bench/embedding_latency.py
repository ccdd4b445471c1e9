"""One short sentence, embedded directly in-process and through the HTTP server, side by side.

    .venv/bin/python bench/embedding_latency.py [--requests 50] [--rounds 12] [--model minilm]

Starts ``kiapi serve`` as a subprocess on a free loopback port, waits for ``warm: true``, then
alternates short rounds of direct calls (the same loader and ``embed`` the server runs, in this
process) and of sequential HTTP requests (one keep-alive ``http.client`` connection: the
lightest client, so that the figure is the server's), so that machine noise hits both alike.
(Alternating single calls would not do: each process's BLAS threads spin for a while after a
call and would compete with the other process on 2 cores.) Prints p50/p99 for each, the
server's own timings, and the HTTP overhead (target: server p50 <= direct p50 + 2 ms).
Loopback only; bounded by ``--rounds x --requests`` per side (~30 s at the defaults).
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import tempfile
import time

from _common import free_port, machine, percentile, start_server, stop_server

SENTENCE = "A man is eating food on the street today."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=50, help="per round and side")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--model", default="all-minilm-l6-v2")
    args = parser.parse_args()

    from kiapi.runtime import blas

    status = blas.activate()
    from kiapi.runtime.catalog import default_registry
    from kiapi.runtime.embedding import EmbeddingItem
    from kiapi.runtime.mlx_engine import load_embedding_model

    spec = default_registry().resolve("embedding", args.model)
    model = load_embedding_model(spec).model
    item = [EmbeddingItem(text=SENTENCE)]
    for _ in range(20):
        model.embed(item)

    port = free_port()
    direct, http_s = [], []
    server_side: dict[str, list[float]] = {"total_s": [], "queue_s": [], "embed_s": []}
    with tempfile.TemporaryDirectory() as files_root:
        server, _ = start_server(port, files_root, {"KIAPI_WARMUP": spec.name})
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            body = json.dumps({"text": SENTENCE, "model": spec.name})
            headers = {"Content-Type": "application/json"}

            def post() -> bytes:
                connection.request("POST", "/v1/embedding", body, headers)
                response = connection.getresponse()
                payload = response.read()
                if response.status != 200:
                    raise SystemExit(f"HTTP {response.status}: {payload[:500]!r}")
                return payload

            for _ in range(20):
                post()
            for _ in range(args.rounds):
                for _ in range(args.requests):
                    started = time.perf_counter()
                    model.embed(item)
                    direct.append(time.perf_counter() - started)
                for _ in range(args.requests):
                    started = time.perf_counter()
                    payload = post()
                    http_s.append(time.perf_counter() - started)
                    timings = json.loads(payload)["timings"]
                    for key in server_side:
                        server_side[key].append(timings[key])
            connection.close()
        finally:
            stop_server(server)

    def row(name: str, values: list[float]) -> str:
        ms = [v * 1000 for v in values]
        return (
            f"| {name:<44} | {percentile(ms, 50):7.2f} | {percentile(ms, 99):7.2f} "
            f"| {statistics.fmean(ms):7.2f} |"
        )

    overhead = (percentile(http_s, 50) - percentile(direct, 50)) * 1000

    print(f"machine: {machine()}")
    print(f"BLAS: {status.describe()}")
    print(f"model: {spec.name}; text: {SENTENCE!r}")
    print(f"{args.rounds} rounds of {args.requests} requests per side\n")
    print(f"| {'measurement (one short sentence)':<44} | p50 ms  | p99 ms  | mean ms |")
    print(f"|{'-' * 46}|---------|---------|---------|")
    print(row("direct, in-process (same loader and embed)", direct))
    print(row("HTTP end to end (kiapi serve, keep-alive)", http_s))
    print(row("server-side timings.total_s", server_side["total_s"]))
    print(row("  of which: request in, until the worker runs", server_side["queue_s"]))
    print(row("  of which: worker (model.embed, result)", server_side["embed_s"]))
    verdict = "met" if overhead <= 2.0 else "MISSED"
    print(f"\nHTTP p50 - direct p50 = {overhead:.2f} ms (target <= 2 ms: {verdict})")


if __name__ == "__main__":
    main()
