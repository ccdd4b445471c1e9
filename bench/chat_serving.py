"""Chat through HTTP, kiapi beside llama-cpp-python's server on the same GGUF, and kiapi's chat
and embeddings sharing one worker.

    .venv/bin/python bench/chat_serving.py [--new-tokens 128] [--seconds 8] [--no-peer]
    .venv/bin/python bench/chat_serving.py --shares 0.15,0.2,0.25
    .venv/bin/python bench/chat_serving.py --http-cost

SmolLM2-135M-Instruct (the bundled ``SmolLM2-135M-Instruct.Q4_1.gguf``), greedy, streamed
(``stream: true``, OpenAI's chunks): a token is a chunk with text. Both servers get 2 threads
and the same prompts. Measured per server:

* one stream: decode tokens/s (tokens after the first over the time after the first) and
  time to first token, for a short prompt (median and range of 5 runs) and for a 256-token
  one (median of 3; each prompt different, so no server reuses a cached prefix);
* 8 streams started together: aggregate tokens/s (all tokens over the wall time from the
  first request to the last answer) and the median time to first token.

llama-cpp-python's server (``peers.py`` builds it in its own venv) answers one request at a
time (it has no ``--parallel``); kiapi runs concurrent streams in one continuous batch.

Then kiapi alone, both bundled models in one server: embedding p50 at 8 clients and chat
aggregate tokens/s of 4 looping streams, each alone and both at once (issue 16, item 4);
with ``--shares``, only that, once per interlude share, each on a fresh server. With
``--http-cost``, what embedding requests cost the chat before any reaches the worker (see
:func:`http_cost`).
Loopback only; every request has a timeout; prints markdown tables.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    free_port,
    machine,
    smollm2_gguf,
    start_peer,
    start_server,
    stop_server,
)

CHAT_MODEL = "smollm2-135m-instruct"
EMBED_MODEL = "all-minilm-l6-v2"
THREADS = 2
LONG_PROMPT_TOKENS = 256
REQUEST_TIMEOUT_S = 300
SINGLE_RUNS = 5
TOPICS = ["a cat", "the sea", "a lighthouse", "a robot", "winter", "a city", "a garden", "a fox"]


def make_long_prompts(count: int) -> list[str]:
    """User messages that make chat prompts of about ``LONG_PROMPT_TOKENS`` tokens (SmolLM2's
    tokenizer and template), each different. Run in this script's ``--prompts-only``
    subprocess, so that the load generator's process holds no model and no MLX threads."""
    from kiapi.runtime.llm_engine import load_gguf

    chat = load_gguf(smollm2_gguf())
    words = ["river", "stone", "lantern", "meadow", "copper", "signal", "harbor", "orbit"]
    out = []
    for index in range(count):
        text = f"Request {index}: summarise these notes."
        while (
            len(chat.encode(chat.render([{"role": "user", "content": text}]))) < LONG_PROMPT_TOKENS
        ):
            text += " " + words[(index + len(text)) % len(words)]
        out.append(text)
    return out


def long_prompts(count: int = 3) -> list[str]:
    done = subprocess.run(
        [sys.executable, __file__, "--prompts-only", str(count)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- one stream


@dataclass
class Stream:
    sent: float
    first: float | None = None
    last: float | None = None
    tokens: int = 0
    arrivals: list[float] = field(default_factory=list)

    @property
    def ttft(self) -> float:
        return self.first - self.sent

    @property
    def decode_tps(self) -> float:
        if self.tokens < 2 or self.last == self.first:
            return float("nan")
        return (self.tokens - 1) / (self.last - self.first)


async def stream_chat(
    client: httpx.AsyncClient, base: str, user: str, max_tokens: int, model: str
) -> Stream:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": user}],
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": True,
    }
    record = Stream(sent=time.perf_counter())
    async with client.stream("POST", f"{base}/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{base}: {response.status_code} {(await response.aread())[:300]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or []
            if choices and choices[0].get("delta", {}).get("content"):
                now = time.perf_counter()
                record.first = record.first or now
                record.last = now
                record.tokens += 1
                record.arrivals.append(now)
    return record


@dataclass
class ChatFigures:
    server: str
    decode_tps: float
    decode_tps_range: tuple[float, float]
    ttft_short_s: float
    ttft_long_s: float
    parallel_tps: float
    parallel_ttft_s: float
    parallel_streams: int


async def chat_figures(
    name: str, base: str, model: str, new_tokens: int, longs_text: list[str]
) -> ChatFigures:
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S)
    async with httpx.AsyncClient(timeout=timeout) as client:
        await stream_chat(client, base, "Hello.", 4, model)  # warm both paths
        singles = [
            await stream_chat(client, base, f"Write a story about {TOPICS[i]}.", new_tokens, model)
            for i in range(SINGLE_RUNS)
        ]
        longs = [await stream_chat(client, base, text, 1, model) for text in longs_text]
        started = time.perf_counter()
        together = await asyncio.gather(
            *(
                stream_chat(client, base, f"Write a story about {topic}.", new_tokens, model)
                for topic in TOPICS
            )
        )
        wall = max(s.last for s in together) - started
    return ChatFigures(
        server=name,
        decode_tps=statistics.median(s.decode_tps for s in singles),
        decode_tps_range=(
            min(s.decode_tps for s in singles),
            max(s.decode_tps for s in singles),
        ),
        ttft_short_s=statistics.median(s.ttft for s in singles),
        ttft_long_s=statistics.median(s.ttft for s in longs),
        parallel_tps=sum(s.tokens for s in together) / wall,
        parallel_ttft_s=statistics.median(s.ttft for s in together),
        parallel_streams=len(together),
    )


# --------------------------------------------------------------------------- servers


def start_llamacpp(python: Path, port: int) -> subprocess.Popen:
    server, _ = start_peer(
        [str(python), "-m", "llama_cpp.server", "--model", str(smollm2_gguf())]
        + ["--n_threads", str(THREADS), "--n_ctx", "4096", "--verbose", "false"]
        # by default a new request cuts the running one short; queue them instead
        + ["--interrupt_requests", "false"]
        + ["--host", "127.0.0.1", "--port", str(port)],
        {},
        f"http://127.0.0.1:{port}/v1/models",
        "llama_cpp.server",
    )
    return server


def kiapi_env() -> dict[str, str]:
    return {"KIAPI_WARMUP": f"{EMBED_MODEL},{CHAT_MODEL}"}


def measure_llamacpp(new_tokens: int, longs: list[str]) -> ChatFigures:
    from peers import python_for

    python = python_for("llamacpp")
    port = free_port()
    server = start_llamacpp(python, port)
    try:
        return asyncio.run(
            chat_figures(
                "llama-cpp-python server", f"http://127.0.0.1:{port}", "x", new_tokens, longs
            )
        )
    finally:
        stop_server(server)


# --------------------------------------------------------------------------- both at once


@dataclass
class Mixed:
    embed_p50_idle_ms: float
    embed_p50_busy_ms: float
    chat_tps_idle: float
    chat_tps_busy: float
    embed_rps_idle: float
    embed_rps_busy: float
    server_cpu_ms_idle: float = float("nan")  # CPU per embedding request, idle (all threads)
    client_cpu_ms_idle: float = float("nan")  # the load generator's, likewise
    interludes: int = 0  # embedding batches run inside chat steps, both at once
    interlude_ms: float = float("nan")  # their mean worker time
    interlude_share: float = float("nan")  # their worker time over the wall time


def interlude_totals(base: str) -> tuple[float, float, float]:
    """The server's embedding interludes so far (count, total seconds), and now."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{base}/metrics", timeout=10).text
    count = total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("type") != "embedding":
                continue
            if sample.name == "kiapi_interlude_duration_seconds_count":
                count = sample.value
            elif sample.name == "kiapi_interlude_duration_seconds_sum":
                total = sample.value
    return count, total, time.perf_counter()


async def chat_loop(base: str, streams: int, seconds: float, new_tokens: int) -> float:
    """``streams`` clients each streaming completions back to back for ``seconds`` + 2 s;
    tokens/s over the last ``seconds`` (the first 2 s are warm-up)."""
    arrivals: list[float] = []
    stop = time.perf_counter() + seconds + 2.0
    window_start = time.perf_counter() + 2.0

    async def one(index: int) -> None:
        async with httpx.AsyncClient(timeout=httpx.Timeout(REQUEST_TIMEOUT_S)) as client:
            n = 0
            while time.perf_counter() < stop:
                topic = TOPICS[(index + n) % len(TOPICS)]
                record = await stream_chat(
                    client, base, f"Write a story about {topic}.", new_tokens, CHAT_MODEL
                )
                arrivals.extend(record.arrivals)
                n += 1

    await asyncio.gather(*(one(i) for i in range(streams)))
    inside = [t for t in arrivals if window_start <= t <= stop]
    return len(inside) / (stop - window_start)


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def measure_mixed(
    base: str, port: int, seconds: float, new_tokens: int, server_pid: int | None = None
) -> Mixed:
    from throughput import load, make_texts, request_bytes

    texts = make_texts(12, 256, seed=12)
    requests = [request_bytes("/v1/embedding", {"text": t}) for t in texts]
    server = psutil.Process(server_pid) if server_pid else None
    me = psutil.Process()
    before = (cpu_seconds(server) if server else 0.0, cpu_seconds(me), time.perf_counter())
    idle = asyncio.run(load(port, requests, 8, seconds))
    answered = idle.rps * (time.perf_counter() - before[2])  # about: warm-up and tail too
    server_ms = (cpu_seconds(server) - before[0]) / answered * 1e3 if server else float("nan")
    client_ms = (cpu_seconds(me) - before[1]) / answered * 1e3
    chat_idle = asyncio.run(chat_loop(base, 4, seconds, new_tokens))

    async def both():
        chat = asyncio.create_task(chat_loop(base, 4, seconds + 2, new_tokens))
        await asyncio.sleep(2.5)  # the chat streams are decoding
        start = await asyncio.to_thread(interlude_totals, base)
        embed = await load(port, requests, 8, seconds)
        end = await asyncio.to_thread(interlude_totals, base)
        return embed, await chat, start, end

    busy, chat_busy, start, end = asyncio.run(both())
    interludes = int(end[0] - start[0])
    return Mixed(
        embed_p50_idle_ms=idle.ms(50),
        embed_p50_busy_ms=busy.ms(50),
        chat_tps_idle=chat_idle,
        chat_tps_busy=chat_busy,
        embed_rps_idle=idle.rps,
        embed_rps_busy=busy.rps,
        server_cpu_ms_idle=server_ms,
        client_cpu_ms_idle=client_ms,
        interludes=interludes,
        interlude_ms=(end[1] - start[1]) / interludes * 1e3 if interludes else float("nan"),
        interlude_share=(end[1] - start[1]) / (end[2] - start[2]),
    )


def measure_kiapi(
    new_tokens: int, seconds: float, longs: list[str]
) -> tuple[ChatFigures, Mixed, float, float]:
    port = free_port()
    with tempfile.TemporaryDirectory() as files_root:
        server, warm_s = start_server(port, files_root, kiapi_env())
        try:
            base = f"http://127.0.0.1:{port}"
            rss_warm = psutil.Process(server.pid).memory_info().rss / 2**20
            figures = asyncio.run(chat_figures("kiapi", base, CHAT_MODEL, new_tokens, longs))
            mixed = measure_mixed(base, port, seconds, new_tokens, server.pid)
        finally:
            stop_server(server)
    return figures, mixed, rss_warm, warm_s


# --------------------------------------------------------------------------- report


def chat_table(rows: list[ChatFigures]) -> list[str]:
    out = [
        "| server | decode tok/s, 1 stream: median (range) | TTFT short prompt "
        "| TTFT 256-token prompt "
        "| 8 streams: aggregate tok/s | 8 streams: median TTFT |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r.server} | {r.decode_tps:.1f} ({r.decode_tps_range[0]:.1f}-"
            f"{r.decode_tps_range[1]:.1f}) | {r.ttft_short_s * 1000:.0f} ms "
            f"| {r.ttft_long_s * 1000:.0f} ms | {r.parallel_tps:.1f} "
            f"| {r.parallel_ttft_s * 1000:.0f} ms |"
        )
    return out


def mixed_table(m: Mixed) -> list[str]:
    return [
        "| kiapi, one server | embeddings p50 (8 clients) | embeddings req/s "
        "| chat aggregate tok/s (4 streams) |",
        "|---|---|---|---|",
        f"| each alone | {m.embed_p50_idle_ms:.1f} ms | {m.embed_rps_idle:.1f} "
        f"| {m.chat_tps_idle:.1f} |",
        f"| both at once | {m.embed_p50_busy_ms:.1f} ms | {m.embed_rps_busy:.1f} "
        f"| {m.chat_tps_busy:.1f} |",
        "",
        *mixed_arithmetic(m),
        "",
        interlude_line(m),
    ]


def mixed_arithmetic(m: Mixed) -> list[str]:
    """What the both-at-once targets ask of the machine: 8 closed-loop clients at 3x their
    idle p50 send a third of their idle rate (Little's law), and each request costs the CPU it
    cost idle; that share of the cores is taken from the chat's two decode threads."""
    per_request = m.server_cpu_ms_idle + m.client_cpu_ms_idle
    if per_request != per_request:  # nan: not measured
        return []
    cores = psutil.cpu_count() or 1
    idle_share = m.embed_rps_idle * per_request / 1e3 / cores
    return [
        f"Idle, each embedding request took {per_request:.2f} core-ms "
        f"(server {m.server_cpu_ms_idle:.2f}, load generator {m.client_cpu_ms_idle:.2f}): "
        f"{idle_share:.0%} of the {cores} cores at {m.embed_rps_idle:.0f} req/s. At 3x the "
        f"idle p50 the 8 clients send a third of that rate, which takes {idle_share / 3:.0%} "
        "of the cores from the chat (the chat target allows it to lose 30%).",
    ]


def interlude_line(m: Mixed) -> str:
    if not m.interludes:
        return "Both at once, the worker ran no embedding batch inside a chat step."
    return (
        f"Both at once, the worker ran {m.interludes} embedding batches inside chat steps "
        f"(interludes), {m.interlude_ms:.1f} ms each on average: {m.interlude_share:.0%} of the "
        "wall time, while the chat's steps waited."
    )


def share_sweep(shares: list[float], new_tokens: int, seconds: float) -> list[str]:
    """The both-at-once figures for each interlude share (``KIAPI_INTERLUDE_SHARE``), a fresh
    server each: what each share trades between the embeddings' p50 and the chat's loss."""
    lines = [
        "| interlude share | embeddings p50 alone | with 4 chat streams | ratio "
        "| chat tok/s alone | with embeddings | change | interludes: mean, share of the time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for share in shares:
        port = free_port()
        with tempfile.TemporaryDirectory() as files_root:
            env = {**kiapi_env(), "KIAPI_INTERLUDE_SHARE": str(share)}
            server, _ = start_server(port, files_root, env)
            try:
                m = measure_mixed(f"http://127.0.0.1:{port}", port, seconds, new_tokens)
            finally:
                stop_server(server)
        lines.append(
            f"| {share:g} | {m.embed_p50_idle_ms:.1f} ms | {m.embed_p50_busy_ms:.1f} ms "
            f"| {m.embed_p50_busy_ms / m.embed_p50_idle_ms:.2f}x | {m.chat_tps_idle:.1f} "
            f"| {m.chat_tps_busy:.1f} | {m.chat_tps_busy / m.chat_tps_idle - 1:+.1%} "
            f"| {m.interlude_ms:.1f} ms, {m.interlude_share:.0%} |"
        )
    return lines


async def paced(port: int, request: bytes, rate: float, seconds: float, conns: int = 8):
    """The same request at ``rate`` requests/s in all for ``seconds``, the way 8 closed-loop
    clients send when a batch answers them together: every ``conns / rate`` seconds each of
    ``conns`` connections sends one at once, and the next burst waits for every answer (and
    for its time: a late burst delays the rest, with no catching up). The statuses answered,
    counted."""
    from throughput import read_response

    period, stop = conns / rate, time.perf_counter() + seconds
    statuses: dict[int, int] = {}
    streams = await asyncio.wait_for(
        asyncio.gather(*(asyncio.open_connection("127.0.0.1", port) for _ in range(conns))),
        REQUEST_TIMEOUT_S,
    )

    async def ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(request)
        status, _ = await read_response(reader)
        statuses[status] = statuses.get(status, 0) + 1

    try:
        due = time.perf_counter()
        while (now := time.perf_counter()) < stop:
            await asyncio.sleep(max(0.0, due - now))
            due = max(due, time.perf_counter()) + period
            await asyncio.wait_for(
                asyncio.gather(*(ask(reader, writer) for reader, writer in streams)),
                REQUEST_TIMEOUT_S,
            )
    finally:
        for _, writer in streams:
            writer.close()
        for _, writer in streams:
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    return statuses


BARE_SERVER = """
import asyncio, sys
REPLY = b"HTTP/1.1 200 OK\\r\\ncontent-length: 2\\r\\n\\r\\n{}"
async def serve(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\\r\\n\\r\\n")
            length = next((int(line[15:]) for line in head.lower().split(b"\\r\\n")
                           if line.startswith(b"content-length:")), 0)
            await reader.readexactly(length)
            writer.write(REPLY)
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
        pass  # the client left, or sent what this server does not read
    finally:
        writer.close()
async def main():
    server = await asyncio.start_server(serve, "127.0.0.1", int(sys.argv[1]))
    await server.serve_forever()
asyncio.run(main())
"""


def http_cost(new_tokens: int, seconds: float) -> list[str]:
    """What embedding requests cost the chat before any reaches the worker.

    On one fresh server: the embeddings' idle p50 at 8 clients gives the rate that the
    both-at-once p50 target implies (8 closed-loop clients at 3x that p50 send 8 / (3 x p50)
    requests/s, Little's law). Then 4 chat streams decode alone, and beside requests sent at
    that rate (:func:`paced`: bursts of 8, as the clients send when one batch answers them all)
    that the server refuses without any worker time: with a ``Host`` it does not serve (its
    first guard answers), and with an unknown model (the whole request path: guards, body
    validation, the handler, the error's JSON). And, for a floor, beside the same requests
    answered at once by :data:`BARE_SERVER` (a plain asyncio server in another process: no
    framework, no GIL shared with the worker). Each row: the chat's tokens/s and, per request,
    the CPU of the server's event-loop thread (the bare server's process) and of this load
    generator, over what each took with the chat alone (beside the requests the chat decodes
    slower and its streaming costs the event loop less, so these are a little low)."""
    from throughput import load, make_texts, request_bytes

    texts = make_texts(12, 256, seed=12)
    port, bare_port = free_port(), free_port()
    # on the way out: kiapi stops, its folder goes, the bare server stops
    with contextlib.ExitStack() as cleanup:
        bare, _ = start_peer(
            [sys.executable, "-c", BARE_SERVER, str(bare_port)],
            {},
            f"http://127.0.0.1:{bare_port}/",
            "the bare server",
            timeout_s=30,
        )
        cleanup.callback(stop_server, bare)
        files_root = cleanup.enter_context(tempfile.TemporaryDirectory())
        server, _ = start_server(port, files_root, kiapi_env())
        cleanup.callback(stop_server, server)
        base = f"http://127.0.0.1:{port}"
        real = [request_bytes("/v1/embedding", {"text": t}) for t in texts]
        idle = asyncio.run(load(port, real, 8, seconds))
        rate = 8 / (3 * idle.ms(50) / 1e3)
        unknown = request_bytes("/v1/embedding", {"text": texts[0], "model": "no-such"})
        foreign = unknown.replace(b"Host: 127.0.0.1", b"Host: rebind.example", 1)
        server_process, me = psutil.Process(server.pid), psutil.Process()
        bare_process = psutil.Process(bare.pid)

        def loop_cpu() -> float:  # kiapi's main thread runs the event loop; the bare server
            main = next(t for t in server_process.threads() if t.id == server.pid)
            return main.user_time + main.system_time + cpu_seconds(bare_process)

        async def chat_beside(request: bytes | None, to: int) -> tuple[float, dict]:
            chat = asyncio.create_task(chat_loop(base, 4, seconds, new_tokens))
            await asyncio.sleep(2.0)  # the streams are decoding
            statuses = await paced(to, request, rate, seconds) if request else {}
            return await chat, statuses

        rows = []
        for name, request, to in (
            ("4 chat streams alone", None, port),
            ("beside requests its Host guard refuses (403)", foreign, port),
            ("beside requests for an unknown model (400)", unknown, port),
            ("beside the same, answered at once by a bare asyncio server", unknown, bare_port),
        ):
            before = (loop_cpu(), cpu_seconds(me), time.perf_counter())
            tps, statuses = asyncio.run(chat_beside(request, to))
            wall = time.perf_counter() - before[2]
            cpu = (loop_cpu() - before[0]) / wall, (cpu_seconds(me) - before[1]) / wall
            rows.append((name, tps, statuses, cpu, wall))
    alone_tps, alone_cpu = rows[0][1], rows[0][3]
    lines = [
        f"Embeddings alone, 8 clients: p50 {idle.ms(50):.1f} ms, so the both-at-once target "
        f"(p50 <= 3x) needs {rate:.0f} requests/s from 8 closed-loop clients. Requests paced "
        "at that rate, none reaching the worker (CPU per request: over the chat alone's):",
        "",
        "| chat | tok/s | change | answered | server's event loop, CPU ms per request "
        "| load generator, CPU ms per request |",
        "|---|---|---|---|---|---|",
    ]
    for name, tps, statuses, cpu, wall in rows:
        count = sum(statuses.values())
        extra = [
            f"{(c - a) * wall / count * 1e3:.2f}" if count else "-"
            for c, a in zip(cpu, alone_cpu, strict=True)
        ]
        answered = ", ".join(f"{n} x {s}" for s, n in sorted(statuses.items())) or "-"
        lines.append(
            f"| {name} | {tps:.1f} | {tps / alone_tps - 1:+.1%} | {answered} "
            f"| {extra[0]} | {extra[1]} |"
        )
    return lines


def measure_in_subprocess(server: str, new_tokens: int, seconds: float, longs: list[str]):
    """One server's measurements in a fresh child process, so that no load generator state
    carries from one server to the next. (llama-cpp-python's single-stream figure still
    ranged 14-77 tokens/s over three runs here; likely, not verified: its two spin-waiting
    threads share the two vCPUs with its HTTP thread and this client. Hence the range in the
    table.)"""
    done = subprocess.run(
        [sys.executable, __file__, "--only", server, "--new-tokens", str(new_tokens)]
        + ["--seconds", str(seconds)],
        input=json.dumps(longs),
        capture_output=True,
        text=True,
        check=True,
        timeout=1800,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_only(server: str, new_tokens: int, seconds: float, longs: list[str]) -> dict:
    if server == "llamacpp":
        return {"figures": asdict(measure_llamacpp(new_tokens, longs))}
    figures, mixed, rss_warm, warm_s = measure_kiapi(new_tokens, seconds, longs)
    return {
        "figures": asdict(figures),
        "mixed": asdict(mixed),
        "rss_mib": rss_warm,
        "warm_s": warm_s,
    }


def run(new_tokens: int, seconds: float, peer: bool) -> dict:
    """Every measurement of this script; the tables as lines and the figures for targets."""
    longs = long_prompts()
    ours = measure_in_subprocess("kiapi", new_tokens, seconds, longs)
    figures, mixed = ChatFigures(**ours["figures"]), Mixed(**ours["mixed"])
    rows = [figures]
    theirs = None
    if peer:
        theirs = ChatFigures(
            **measure_in_subprocess("llamacpp", new_tokens, seconds, longs)["figures"]
        )
        rows.append(theirs)
    return {
        "ours": figures,
        "theirs": theirs,
        "mixed": mixed,
        "rss_warm_mib": ours["rss_mib"],
        "warm_s": ours["warm_s"],
        "lines": chat_table(rows) + [""] + mixed_table(mixed),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--no-peer", action="store_true", help="skip llama-cpp-python")
    parser.add_argument(
        "--shares",
        help="only the both-at-once figures, once per interlude share (comma-separated)",
    )
    parser.add_argument(
        "--http-cost",
        action="store_true",
        help="only what embedding requests refused before the worker cost the chat",
    )
    parser.add_argument("--prompts-only", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--only", choices=["kiapi", "llamacpp"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only:  # the child of measure_in_subprocess; the long prompts come on stdin
        longs = json.loads(sys.stdin.read())
        print(json.dumps(measure_only(args.only, args.new_tokens, args.seconds, longs)))
        return
    if args.prompts_only:
        print(json.dumps(make_long_prompts(args.prompts_only)))
        return
    if args.shares:
        shares = [float(v) for v in args.shares.split(",")]
        print(f"machine: {machine()}; SmolLM2-135M-Instruct Q4_1 GGUF and all-MiniLM-L6-v2\n")
        print("\n".join(share_sweep(shares, args.new_tokens, args.seconds)))
        return
    if args.http_cost:
        print(f"machine: {machine()}; SmolLM2-135M-Instruct Q4_1 GGUF and all-MiniLM-L6-v2\n")
        print("\n".join(http_cost(args.new_tokens, args.seconds)))
        return
    result = run(args.new_tokens, args.seconds, not args.no_peer)
    print(f"machine: {machine()}; SmolLM2-135M-Instruct Q4_1 GGUF, greedy, {THREADS} threads\n")
    print("\n".join(result["lines"]))
    print(
        f"\nkiapi with both bundled models: start to warm {result['warm_s']:.2f} s, "
        f"RSS warm {result['rss_warm_mib']:.0f} MiB"
    )


if __name__ == "__main__":
    main()
