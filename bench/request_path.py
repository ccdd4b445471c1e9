"""What the HTTP stack costs per embedding request, apart from the model and the sockets.

    .venv/bin/python bench/request_path.py [--requests 3000] [--clients 32] [--runs 3]

In one process, with the bundled all-MiniLM-L6-v2 and kiapi's real worker, 12-token texts
sent as ASGI calls (no sockets, no HTTP parsing) by ``--clients`` concurrent callers, in two
ways, alternating ``--runs`` times:

* **full app**: ``kiapi.app.create_app`` as ``kiapi serve`` runs it (kiapi's middlewares,
  Connexion's routing, body validation, parameter and response decorators, the handler);
* **bare**: the same runtime calls the handler makes (``parse_request``, ``run_sync`` of an
  embedding job, the result as JSON) in a plain ASGI function, with none of the above.

Prints requests/s and the event loop thread's CPU time per request for each: the difference
is the share of a request's event-loop time that the framework takes, which bounds the
12-token, 32-client throughput (the closed loop alternates that time with the worker's
batch). The bare path checks nothing (no Host/Origin guard, no schema validation): it is a
measurement, not a server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402
from throughput import make_texts  # noqa: E402

PATH = "/v1/embedding"


def scope_for(body: bytes, state: dict) -> dict:
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": PATH, "raw_path": PATH.encode(), "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000), "state": dict(state),
    }  # fmt: skip


def bare_app(runtime):
    """The handler's runtime calls, and nothing else, as an ASGI app."""
    import orjson

    from kiapi.runtime.catalog import EMBEDDING
    from kiapi.runtime.embedding import EmbeddingItem, embedding_job, parse_request

    async def app(scope, receive, send) -> None:
        body = orjson.loads((await receive())["body"])
        received = time.perf_counter()
        request = parse_request(runtime.registry, body)
        runtime.require_runnable(request.spec)
        item = EmbeddingItem(text=request.text, truncate=request.truncate)
        job = embedding_job(runtime.memory, request.spec, item, received)
        (done,) = await runtime.run_sync(EMBEDDING, [(request.params(), job)])
        out = orjson.dumps(done.output.result, option=orjson.OPT_SERIALIZE_NUMPY)
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(out))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": out})

    return app


async def drive(app, bodies: list[bytes], state: dict, requests: int, clients: int) -> dict:
    """``requests`` calls from ``clients`` concurrent callers; req/s and event-loop CPU."""
    statuses: dict[int, int] = {}

    async def one(index: int) -> None:
        body = bodies[index % len(bodies)]
        delivered = False

        async def receive() -> dict:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()  # never disconnects
            return {}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                statuses[message["status"]] = statuses.get(message["status"], 0) + 1

        await app(scope_for(body, state), receive, send)

    async def caller(first: int) -> None:
        for index in range(first, first + requests // clients):
            await one(index)

    started, cpu = time.perf_counter(), time.thread_time()
    await asyncio.gather(*(caller(c * requests) for c in range(clients)))
    wall, cpu = time.perf_counter() - started, time.thread_time() - cpu
    done = requests // clients * clients
    if set(statuses) != {200}:
        raise SystemExit(f"unexpected statuses: {statuses}")
    return {"rps": done / wall, "cpu_ms": cpu / done * 1e3}


async def measure(requests: int, clients: int, runs: int) -> dict[str, list[dict]]:
    from kiapi.app import create_app
    from kiapi.config import Settings

    os.environ["KIAPI_FILES_ROOT"] = tempfile.mkdtemp(prefix="kiapi-bench-")
    os.environ["KIAPI_LOG_LEVEL"] = "warning"
    app = create_app(Settings())
    inbox: asyncio.Queue = asyncio.Queue()
    outbox: asyncio.Queue = asyncio.Queue()
    state: dict = {}
    lifespan = asyncio.create_task(
        app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": state}, inbox.get, outbox.put)
    )
    await inbox.put({"type": "lifespan.startup"})
    if (await outbox.get())["type"] != "lifespan.startup.complete":
        raise SystemExit("the app did not start")
    bodies = [json.dumps({"text": t}).encode() for t in make_texts(12, 512, seed=12)]
    ways = {"full app": app, "bare": bare_app(state["runtime"])}
    for way in ways.values():  # warm: the model loads, the kernel compiles
        await drive(way, bodies, state, 64, 1)
    results: dict[str, list[dict]] = {name: [] for name in ways}
    for _ in range(runs):
        for name, way in ways.items():
            results[name].append(await drive(way, bodies, state, requests, clients))
    await inbox.put({"type": "lifespan.shutdown"})
    await outbox.get()
    await lifespan
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    results = asyncio.run(measure(args.requests, args.clients, args.runs))
    print(f"machine: {machine()}")
    print(f"12-token texts, {args.clients} concurrent ASGI callers, {args.runs} runs (median):\n")
    print("| path | req/s | event-loop CPU per request |")
    print("|---|---|---|")
    for name, runs in results.items():
        rps = statistics.median(r["rps"] for r in runs)
        cpu = statistics.median(r["cpu_ms"] for r in runs)
        print(f"| {name} | {rps:.0f} | {cpu:.3f} ms |")


if __name__ == "__main__":
    main()
