"""Load-and-soak test: a long mixed workload against a live ``kiapi serve``, checking every answer.

    .venv/bin/python bench/soak.py [--requests 5000] [--concurrency 32] [--time-limit-s 600]
                                   [--warmup 400] [--port N] [--token T] [--no-overload]

What it measures, on a ``kiapi serve`` subprocess on loopback (``bench/_common.start_server``)
with a fresh temporary ``KIAPI_FILES_ROOT``, ``KIAPI_MAX_UPLOAD_MB=2`` and
``KIAPI_MAX_BODY_MB=1`` (so that 413 answers are cheap to provoke), the rest at defaults:

1. **Warm-up** (not counted in the main table): one embedding of each length class, three
   bursts of ``--concurrency`` simultaneous 300-400-word texts (the largest batches the mix
   makes), ``--warmup`` requests (default 400) of the main phase's mix, then short
   embeddings until the server has made ``KIAPI_MAX_FINISHED_JOBS`` jobs. The server's RSS
   right after start (``warm: true``) and after this warm-up are both printed; the baseline
   for the memory criterion is the one after the warm-up: the steady state of what is bounded
   by design (the job store at its retention bound; the C allocator's arenas at the
   high-water mark of the largest batch). The RSS at each tenth of the main phase is printed
   to show the curve is flat rather than climbing.
2. **Main phase**: ``--requests`` requests from ``--concurrency`` concurrent clients (asyncio
   tasks sharing one keep-alive ``httpx.AsyncClient``), each picking a request kind at random
   with fixed weights (``MIX``): embeddings of texts from one word to a few hundred tokens
   (200, vector length = ``dimension``, finite, unit norm), uploads of 1 byte to 1 MiB of
   random bytes (200, ``meta.sha256`` = what was sent), downloads of uploaded files (sha256
   byte for byte), file metadata, the file list (every file uploaded before it was asked
   for is listed, no deleted file is), deletes (then 404 on every path), the job list, jobs
   seen in it, ``/health``, the model list, and bad inputs that must get their documented
   answer: malformed JSON and schema violations 422, empty input / unknown model / an image
   for a text-only model 400, unknown file and job ids 404, uploads over the upload limit
   (declared and chunked) and a JSON body over the body limit 413, wrong Content-Type 415,
   and with a token, requests without one 401. Every answer is classified as expected or
   unexpected for its kind; a 503 with ``Retry-After`` is overload (counted apart), any
   other 5xx or a transport error is unexpected.
3. **Final check**: the file list against what the clients know (zero lost, zero
   resurrected), every file that should exist downloaded and verified by sha256, every
   deleted one 404, and the store folder itself (one ``.bin`` and one ``.json`` per file, no
   ``.tmp-*`` left over).
4. **Memory**: the server's VmRSS (``/proc/<pid>/status``) after the warm-up and after the
   main phase, each read the same way: 3 s idle, three ``/health`` calls, then read. The goal
   is growth within 10%. The peak during the run is printed too.
5. **Overload** (on by default, ``--no-overload`` skips it; ~20 s): a second server with
   ``KIAPI_MAX_QUEUE=4`` (a separate server so that the small queue does not turn the main
   phase's embeddings into 503s) gets three bursts of 128 simultaneous long-text embeddings.
   Expected: 200s and 503s with a positive integer ``Retry-After``, at least one 503, and a
   healthy server afterwards (empty queue, an embedding answers 200). Its RSS before and
   after is printed (for information, not judged: the burst's 256-token batches are its
   first).

With ``--token`` (or ``KIAPI_AUTH_TOKEN`` in the environment) the servers get
``KIAPI_AUTH_TOKEN`` and every request carries ``Authorization: Bearer <token>``; the mix
then also sends requests without it, which must get 401 (``/health`` stays public).

Bounded: no new requests after ``--time-limit-s`` less a reserve for the final check and the
overload phase, and the whole run is cancelled at ``--time-limit-s``; the servers are stopped
in every case. Prints markdown tables. Exit status: 0 when clean; 1 on any unexpected answer,
a lost or corrupted file, stray store files, RSS growth over 10% or an overload phase that
misbehaved; 2 when the time limit cut the run short. Loopback only. ~3-5 minutes at the
defaults on 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import math
import os
import random
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
from _common import free_port, machine, percentile, start_server, stop_server

MAX_UPLOAD_MB = 2  # the server's KIAPI_MAX_UPLOAD_MB in this run
MAX_BODY_MB = 1  # the server's KIAPI_MAX_BODY_MB in this run
MAX_FINISHED_JOBS = 1000  # the server's KIAPI_MAX_FINISHED_JOBS in this run (its default)
MAX_UPLOAD_BYTES = MAX_UPLOAD_MB * 2**20
LARGEST_GOOD_UPLOAD = 2**20
RSS_GROWTH_LIMIT = 0.10
OVERLOAD_QUEUE = 4
OVERLOAD_BURST = 128
OVERLOAD_ROUNDS = 3

# request kind -> weight (share of the main phase)
MIX: dict[str, float] = {
    "embed": 30,
    "upload": 13,
    "download": 12,
    "file_meta": 5,
    "files_list": 2,
    "delete": 5,
    "deleted_404": 3,
    "jobs_list": 0.5,
    "job_get": 3,
    "health": 3,
    "models": 2,
    "bad_json_422": 2,
    "schema_422": 3,
    "bad_input_400": 3,
    "unknown_404": 3,
    "too_large_413": 1,
    "content_type_415": 1,
    "no_token_401": 2,  # only with a token
}

_WORD_TEXT = (
    "the of and to in is was for on that with as by at from his her an which are this be had "
    "not but were have it they their one all been has more there when who will would time "
    "people year city river music house school water market system light history science "
    "language morning evening garden window mountain journey letter summer winter station "
    "island village forest engine number street question answer company paper picture family "
    "student teacher country animal ocean coffee bridge camera signal network memory server "
    "protocol request response vector model token weight layer matrix kernel thread process "
    "quickly slowly brightly quietly rarely often almost never always perhaps carefully "
    "green ancient modern simple complex narrow distant heavy gentle sudden hidden silver "
    "walks builds writes reads carries opens closes measures follows returns remembers"
)
WORDS = _WORD_TEXT.split()
NON_ASCII = [
    "今日の天気は晴れです",
    "Ça va très bien, merci beaucoup",
    "Grüße aus München und Köln",
    "Привет, как дела сегодня?",
    "emoji 😀🚀🎉 in a sentence",
    "مرحبا بالعالم",
    "   whitespace\t\theavy \n\n text   ",
]
CONTENT_TYPES = ["application/octet-stream", "image/png", "text/plain", "application/pdf"]


def random_text(rng: random.Random, words: int | None = None) -> str:
    """A text of one word to a few hundred tokens (MiniLM truncates at 256)."""
    if words is None:
        roll = rng.random()
        if roll < 0.05:
            return rng.choice(NON_ASCII) + " " + " ".join(rng.choices(WORDS, k=rng.randint(0, 20)))
        if roll < 0.40:
            words = rng.randint(1, 8)
        elif roll < 0.70:
            words = rng.randint(9, 64)
        elif roll < 0.90:
            words = rng.randint(65, 200)
        else:
            words = rng.randint(201, 400)
    return " ".join(rng.choices(WORDS, k=words))


def upload_size(rng: random.Random) -> int:
    """Log-uniform from 1 byte to 1 MiB (mostly small, some large)."""
    return max(1, min(LARGEST_GOOD_UPLOAD, int(math.exp(rng.uniform(0, math.log(2**20 + 1))))))


# --------------------------------------------------------------------------- server


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def server_pid(popen_pid: int) -> int:
    """The process that really serves: the spawned one, or the child of a wrapper."""
    process = psutil.Process(popen_pid)
    if "kiapi" in " ".join(process.cmdline()):
        return popen_pid
    for child in process.children(recursive=True):
        if "kiapi" in " ".join(child.cmdline()):
            return child.pid
    return popen_pid


class StderrDrain:
    """Reads the server's stderr (a pipe that would otherwise fill and block the server) and
    keeps the last lines and the count of error-level lines and tracebacks."""

    def __init__(self, stream) -> None:
        self.tail: deque[str] = deque(maxlen=40)
        self.errors = 0
        self.lines = 0
        self.thread = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self.thread.start()

    def _run(self, stream) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip()
            self.lines += 1
            if " ERROR " in line or " CRITICAL " in line or line.startswith("Traceback"):
                self.errors += 1
            self.tail.append(line)


@dataclass
class Server:
    popen: object
    pid: int
    url: str
    root: Path
    start_to_warm_s: float
    drain: StderrDrain


def launch(port: int, root: Path, env: dict[str, str]) -> Server:
    popen, warm_s = start_server(port, str(root), env)
    drain = StderrDrain(popen.stderr)
    return Server(popen, server_pid(popen.pid), f"http://127.0.0.1:{port}", root, warm_s, drain)


# --------------------------------------------------------------------------- bookkeeping


@dataclass
class KindStats:
    count: int = 0
    expected: int = 0
    unexpected: int = 0
    overload: int = 0
    latencies: list[float] = field(default_factory=list)


@dataclass
class FileEntry:
    file_id: str
    sha256: str
    size: int
    content_type: str
    readers: int = 0
    deleting: bool = False


class Outcome(Exception):
    """An unexpected answer, with what was wrong."""


class Overload(Exception):
    """A 503 with ``Retry-After``: the server shedding load, counted apart."""


@dataclass
class State:
    rng: random.Random
    headers: dict[str, str]
    token: str | None
    concurrency: int
    max_finished_jobs: int = MAX_FINISHED_JOBS
    stats: dict[str, KindStats] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)
    unexpected_5xx: int = 0
    transport_errors: int = 0
    live: dict[str, FileEntry] = field(default_factory=dict)
    deleted: dict[str, FileEntry] = field(default_factory=dict)
    uncertain: set[str] = field(default_factory=set)  # a transport error hid the outcome
    uploads_ok: int = 0
    embeds_ok: int = 0
    sent: int = 0  # requests sent so far in the current load
    seen_jobs: list[tuple[str, int]] = field(default_factory=list)  # (id, embeds_ok - index)
    dimension: int | None = None
    model: str | None = None

    def kind(self, name: str) -> KindStats:
        return self.stats.setdefault(name, KindStats())

    def note(self, kind: str, what: str) -> None:
        if len(self.examples) < 40:
            self.examples.append(f"{kind}: {what}")

    def pick_live(self) -> FileEntry | None:
        ids = [fid for fid, e in self.live.items() if not e.deleting]
        return self.live[self.rng.choice(ids)] if ids else None


def snippet(response: httpx.Response) -> str:
    try:
        text = response.text
    except Exception:  # noqa: BLE001 - a body that is not text
        text = repr(response.content[:200])
    return f"{response.request.method} {response.request.url.path} -> {response.status_code} " + (
        text[:300].replace("\n", " ")
    )


def expect(response: httpx.Response, *statuses: int) -> None:
    if response.status_code in statuses:
        return
    if response.status_code == 503 and response.headers.get("retry-after", "").isdigit():
        raise Overload(snippet(response))
    if response.status_code not in statuses:
        raise Outcome(f"expected {'/'.join(map(str, statuses))}: {snippet(response)}")


def expect_detail(response: httpx.Response, *statuses: int, listed: bool = False) -> None:
    """An error answer with the documented status and a ``detail`` (a list for 422)."""
    expect(response, *statuses)
    try:
        detail = response.json()["detail"]
    except (ValueError, KeyError, TypeError):
        raise Outcome(f"error body without detail: {snippet(response)}") from None
    if listed and not (isinstance(detail, list) and detail and "loc" in detail[0]):
        raise Outcome(f"422 detail is not a list of errors: {snippet(response)}")
    if not listed and not isinstance(detail, str):
        raise Outcome(f"detail is not a string: {snippet(response)}")


# --------------------------------------------------------------------------- request kinds


async def op_embed(c: httpx.AsyncClient, s: State, text: str | None = None) -> None:
    text = text if text is not None else random_text(s.rng)
    r = await c.post("/v1/embedding", json={"text": text})
    expect(r, 200)
    body = r.json()
    vector = body.get("embedding")
    if not isinstance(vector, list) or len(vector) != body.get("dimension"):
        raise Outcome(f"vector length {len(vector or [])} != dimension {body.get('dimension')}")
    if s.dimension is None:
        s.dimension, s.model = len(vector), body.get("model")
    if len(vector) != s.dimension or body.get("model") != s.model:
        raise Outcome(f"model/dimension changed: {body.get('model')} {len(vector)}")
    if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in vector):
        raise Outcome("non-finite value in the vector")
    norm = math.sqrt(sum(x * x for x in vector))
    if abs(norm - 1.0) > 1e-3:
        raise Outcome(f"vector norm {norm:.5f}, not 1")
    tokens = body.get("usage", {}).get("prompt_tokens", -1)
    if not 0 < tokens <= 512:
        raise Outcome(f"prompt_tokens {tokens}")
    s.embeds_ok += 1


async def op_upload(c: httpx.AsyncClient, s: State) -> None:
    data = s.rng.randbytes(upload_size(s.rng))
    digest = hashlib.sha256(data).hexdigest()
    content_type = s.rng.choice(CONTENT_TYPES)
    name = s.rng.choice(["a.bin", "données ü.bin", "photo.png", "notes.txt", "x"])
    r = await c.post("/v1/files", files={"file": (name, data, content_type)})
    expect(r, 200)
    record = r.json()
    fid = record.get("file_id", "")
    s.live[fid] = FileEntry(fid, digest, len(data), content_type)
    s.uploads_ok += 1
    if record.get("size") != len(data) or record.get("meta", {}).get("sha256") != digest:
        raise Outcome(f"upload record does not match what was sent: {snippet(r)}")
    if record.get("content_type") != content_type:
        raise Outcome(f"content_type {record.get('content_type')!r} != {content_type!r}")


async def with_reader(s: State, body: Callable[[FileEntry], object]) -> None:
    entry = s.pick_live()
    if entry is None:
        return
    entry.readers += 1
    try:
        await body(entry)
    finally:
        entry.readers -= 1


async def op_download(c: httpx.AsyncClient, s: State) -> None:
    async def body(entry: FileEntry) -> None:
        r = await c.get(f"/v1/files/{entry.file_id}/download")
        expect(r, 200)
        if len(r.content) != entry.size or hashlib.sha256(r.content).hexdigest() != entry.sha256:
            raise Outcome(f"download of {entry.file_id} differs from the upload (CORRUPTED)")
        if r.headers.get("content-type", "").split(";")[0] != entry.content_type:
            raise Outcome(f"download content-type {r.headers.get('content-type')!r}")

    await with_reader(s, body)


async def op_file_meta(c: httpx.AsyncClient, s: State) -> None:
    async def body(entry: FileEntry) -> None:
        r = await c.get(f"/v1/files/{entry.file_id}")
        expect(r, 200)
        record = r.json()
        if record.get("size") != entry.size or record["meta"].get("sha256") != entry.sha256:
            raise Outcome(f"metadata of {entry.file_id} does not match: {snippet(r)}")

    await with_reader(s, body)


async def op_files_list(c: httpx.AsyncClient, s: State) -> None:
    must_list = {fid for fid, e in s.live.items() if not e.deleting}
    must_not = set(s.deleted)
    r = await c.get("/v1/files")
    expect(r, 200)
    listed = {record["file_id"] for record in r.json()["data"]}
    # a delete sent after this list request may be served before it
    gone_since = {fid for fid in must_list if fid not in s.live or s.live[fid].deleting}
    missing, back = must_list - listed - gone_since, must_not & listed
    if missing or back:
        raise Outcome(f"file list: {len(missing)} missing (LOST?), {len(back)} deleted listed")


async def op_delete(c: httpx.AsyncClient, s: State) -> None:
    candidates = [e for e in s.live.values() if not e.deleting and e.readers == 0]
    if not candidates:
        return
    entry = s.rng.choice(candidates)
    entry.deleting = True
    try:
        r = await c.delete(f"/v1/files/{entry.file_id}")
    except httpx.HTTPError:
        s.live.pop(entry.file_id, None)
        s.uncertain.add(entry.file_id)
        raise
    expect(r, 200)
    if r.json() != {"deleted": True, "file_id": entry.file_id}:
        raise Outcome(f"delete answer: {snippet(r)}")
    s.deleted[entry.file_id] = s.live.pop(entry.file_id)


async def op_deleted_404(c: httpx.AsyncClient, s: State) -> None:
    if not s.deleted:
        return
    fid = s.rng.choice(list(s.deleted))
    method, path = s.rng.choice(
        [
            ("GET", f"/v1/files/{fid}"),
            ("GET", f"/v1/files/{fid}/download"),
            ("DELETE", f"/v1/files/{fid}"),
        ]
    )
    expect_detail(await c.request(method, path), 404)


async def op_jobs_list(c: httpx.AsyncClient, s: State) -> None:
    done_before = s.embeds_ok
    r = await c.get("/v1/jobs")
    expect(r, 200)
    jobs = r.json()["data"]
    for index, job in enumerate(jobs[:20]):  # newest first
        kind = job.get("type")
        if not str(job.get("id", "")).startswith("job_") or kind not in ("embedding", "warmup"):
            raise Outcome(f"odd job in the list: {str(job)[:200]}")
        s.seen_jobs.append((job["id"], done_before - index))
    del s.seen_jobs[:-200]


async def op_job_get(c: httpx.AsyncClient, s: State) -> None:
    if not s.seen_jobs:
        await op_jobs_list(c, s)
        return
    job_id, mark = s.rng.choice(s.seen_jobs)
    r = await c.get(f"/v1/jobs/{job_id}")
    if r.status_code == 404:
        # retention keeps MAX_FINISHED_JOBS finished jobs: a job that was the index-th newest
        # is dropped after at least MAX_FINISHED_JOBS - index more jobs finish
        if s.embeds_ok - mark >= s.max_finished_jobs - 2 * s.concurrency:
            return
        raise Outcome(f"job {job_id} 404 after only {s.embeds_ok - mark} more jobs")
    expect(r, 200)
    job = r.json()
    if job.get("id") != job_id or job.get("status") not in ("queued", "running", "succeeded"):
        raise Outcome(f"job answer: {snippet(r)}")


async def op_health(c: httpx.AsyncClient, s: State) -> None:
    r = await c.get("/health")
    expect(r, 200)
    if r.json().get("warm") is not True:
        raise Outcome(f"health not warm: {snippet(r)}")


async def op_models(c: httpx.AsyncClient, s: State) -> None:
    r = await c.get("/v1/embedding/models")
    expect(r, 200)
    if sum(1 for m in r.json() if m.get("default")) != 1:
        raise Outcome(f"model list without exactly one default: {snippet(r)}")


JSON = {"Content-Type": "application/json"}


async def op_bad_json_422(c: httpx.AsyncClient, s: State) -> None:
    body = s.rng.choice(
        [b'{"text": "unterminated', b'{"text": "x",}', b"{text: 'x'}", b"", b"\xff\xfe{}", b"nul"]
    )
    expect_detail(await c.post("/v1/embedding", content=body, headers=JSON), 422, listed=True)


async def op_schema_422(c: httpx.AsyncClient, s: State) -> None:
    variant = s.rng.randrange(8)
    if variant < 4:
        body = [{"text": 5}, [1, 2], "just a string", {"text": "x", "model": 7}][variant]
        r = await c.post("/v1/embedding", json=body)
    elif variant == 4:
        r = await c.get("/v1/files/not_an_id")
    elif variant == 5:
        r = await c.get("/v1/jobs/JOB-1")
    elif variant == 6:
        r = await c.delete("/v1/files/file_XYZ")
    else:  # multipart without the file field
        r = await c.post("/v1/files", files={"other": ("a.bin", b"x", "text/plain")})
    expect_detail(r, 422, listed=True)


async def op_bad_input_400(c: httpx.AsyncClient, s: State) -> None:
    body = s.rng.choice(
        [
            {},
            {"text": ""},
            {"text": None},
            {"text": "hello", "model": "no-such-model"},
            {"image": "aGVsbG8="},  # an image for the text-only default model
        ]
    )
    expect_detail(await c.post("/v1/embedding", json=body), 400)


async def op_unknown_404(c: httpx.AsyncClient, s: State) -> None:
    hex_id = s.rng.randbytes(12).hex()
    method, path = s.rng.choice(
        [
            ("GET", f"/v1/files/file_{hex_id}"),
            ("GET", f"/v1/files/file_{hex_id}/download"),
            ("DELETE", f"/v1/files/file_{hex_id}"),
            ("GET", f"/v1/jobs/job_{hex_id[:16]}"),
            ("DELETE", f"/v1/jobs/job_{hex_id[:16]}"),
        ]
    )
    expect_detail(await c.request(method, path), 404)


async def op_too_large_413(c: httpx.AsyncClient, s: State) -> None:
    variant = s.rng.randrange(3)
    if variant == 0:  # declared Content-Length over the upload limit
        data = s.rng.randbytes(MAX_UPLOAD_BYTES + 300_000)
        r = await c.post("/v1/files", files={"file": ("big.bin", data, "application/octet-stream")})
    elif variant == 1:  # chunked, so that only the streaming check can catch it
        boundary = "soakboundary" + s.rng.randbytes(6).hex()
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.bin"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        chunk = s.rng.randbytes(256 * 1024)

        async def stream():
            yield head
            for _ in range(MAX_UPLOAD_BYTES // len(chunk) + 2):
                yield chunk
            yield f"\r\n--{boundary}--\r\n".encode()

        r = await c.post(
            "/v1/files",
            content=stream(),
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
    else:  # a JSON body over KIAPI_MAX_BODY_MB
        text = "word " * (MAX_BODY_MB * 2**20 // 5 + 1000)
        r = await c.post("/v1/embedding", json={"text": text})
    expect_detail(r, 413)


async def op_content_type_415(c: httpx.AsyncClient, s: State) -> None:
    if s.rng.random() < 0.5:
        r = await c.post("/v1/embedding", content=b"text=x", headers={"Content-Type": "text/plain"})
    else:
        r = await c.post("/v1/files", data={"x": "y"})
    expect_detail(r, 415)


async def op_no_token_401(c: httpx.AsyncClient, s: State) -> None:
    anonymous = {"Authorization": ""}
    if s.rng.random() < 0.2:  # /health stays public
        expect(await c.get("/health", headers=anonymous), 200)
        return
    path = s.rng.choice(["/v1/files", "/v1/jobs", "/v1/embedding/models"])
    r = await c.get(path, headers=anonymous)
    expect_detail(r, 401)
    if not r.headers.get("www-authenticate", "").lower().startswith("bearer"):
        raise Outcome(f"401 without WWW-Authenticate: Bearer: {snippet(r)}")


OPS = {
    "embed": op_embed,
    "upload": op_upload,
    "download": op_download,
    "file_meta": op_file_meta,
    "files_list": op_files_list,
    "delete": op_delete,
    "deleted_404": op_deleted_404,
    "jobs_list": op_jobs_list,
    "job_get": op_job_get,
    "health": op_health,
    "models": op_models,
    "bad_json_422": op_bad_json_422,
    "schema_422": op_schema_422,
    "bad_input_400": op_bad_input_400,
    "unknown_404": op_unknown_404,
    "too_large_413": op_too_large_413,
    "content_type_415": op_content_type_415,
    "no_token_401": op_no_token_401,
}


async def run_one(c: httpx.AsyncClient, s: State, kind: str, op: Callable | None = None) -> None:
    """One request of ``kind``, timed and classified."""
    stats = s.kind(kind)
    started = time.perf_counter()
    try:
        await (op or OPS[kind])(c, s)
    except Overload:
        stats.overload += 1
    except Outcome as exc:
        stats.unexpected += 1
        s.note(kind, str(exc))
    except (httpx.HTTPError, OSError) as exc:
        stats.unexpected += 1
        s.transport_errors += 1
        s.note(kind, f"transport error {type(exc).__name__}: {exc}")
    else:
        stats.expected += 1
    finally:
        stats.count += 1
        stats.latencies.append(time.perf_counter() - started)


class Classifier(httpx.AsyncBaseTransport):
    """Wraps the transport to see every response: a 503 with Retry-After is overload and a
    5xx is counted before the op judges the status."""

    def __init__(self, inner: httpx.AsyncBaseTransport, s: State) -> None:
        self.inner = inner
        self.s = s
        self.overload = 0
        self.fivexx = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if response.status_code >= 500:
            if response.status_code == 503 and response.headers.get("retry-after"):
                self.overload += 1
                request.extensions["soak_overload"] = True
            else:
                self.fivexx += 1
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


def make_client(url: str, s: State, connections: int) -> tuple[httpx.AsyncClient, Classifier]:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    transport = Classifier(httpx.AsyncHTTPTransport(limits=limits), s)
    client = httpx.AsyncClient(
        base_url=url,
        transport=transport,
        headers=s.headers,
        timeout=httpx.Timeout(120.0, connect=10.0),
    )
    return client, transport


LONG_BURSTS = 3


async def long_bursts(c: httpx.AsyncClient, s: State, concurrency: int) -> int:
    """``LONG_BURSTS`` bursts of ``concurrency`` simultaneous texts of 300-400 words: the
    largest batches the mix makes, so the allocators reach their high-water mark before the
    baseline (measured: without them the first such batches of the main phase added ~40 MiB
    of glibc arena that then stayed flat). Returns the requests sent."""
    for _ in range(LONG_BURSTS):
        texts = [random_text(s.rng, s.rng.randint(300, 400)) for _ in range(concurrency)]
        await asyncio.gather(
            *(run_one(c, s, "embed", lambda c, s, t=t: op_embed(c, s, t)) for t in texts)
        )
    return LONG_BURSTS * concurrency


async def fill_job_store(c: httpx.AsyncClient, s: State, concurrency: int) -> int:
    """Short embeddings until the server has made ``max_finished_jobs`` jobs, so its job store
    is at its retention bound (its steady size) when the baseline is read. Returns the
    requests sent."""
    missing = max(0, s.max_finished_jobs - s.embeds_ok)
    gate = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with gate:
            await run_one(c, s, "embed", lambda c, s: op_embed(c, s, random_text(s.rng, 8)))

    await asyncio.gather(*(one() for _ in range(missing)))
    return missing


async def load(
    c: httpx.AsyncClient, s: State, requests: int, concurrency: int, stop_at: float
) -> tuple[int, float]:
    """``requests`` requests of the mix from ``concurrency`` clients; stops issuing at
    ``stop_at`` (monotonic). Returns how many were sent and the wall time."""
    kinds = [k for k in MIX if k != "no_token_401" or s.token]
    weights = [MIX[k] for k in kinds]
    s.sent = 0

    async def client() -> None:
        while s.sent < requests and time.monotonic() < stop_at:
            s.sent += 1
            await run_one(c, s, s.rng.choices(kinds, weights)[0])

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return s.sent, time.perf_counter() - started


async def settled_rss(c: httpx.AsyncClient, pid: int, idle_s: float = 3.0) -> float:
    """RSS read the same way each time: ``idle_s`` idle, three light requests, then read."""
    await asyncio.sleep(idle_s)
    for _ in range(3):
        await c.get("/health")
    return rss_mib(pid)


async def sample_rss(pid: int, s: State, timeline: list, stop: asyncio.Event) -> None:
    """Every 0.5 s: (requests sent so far, RSS MiB), for the peak and the growth curve."""
    while not stop.is_set():
        try:
            timeline.append((s.sent, rss_mib(pid)))
        except (OSError, RuntimeError):
            return
        await asyncio.sleep(0.5)


# --------------------------------------------------------------------------- final check


@dataclass
class FinalCheck:
    expected_files: int = 0
    listed: int = 0
    verified: int = 0
    lost: list[str] = field(default_factory=list)
    corrupted: list[str] = field(default_factory=list)
    resurrected: list[str] = field(default_factory=list)
    unknown_listed: list[str] = field(default_factory=list)
    deleted_checked: int = 0
    deleted_not_gone: list[str] = field(default_factory=list)
    stray_on_disk: list[str] = field(default_factory=list)
    requests: int = 0
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return bool(
            self.lost
            or self.corrupted
            or self.resurrected
            or self.unknown_listed
            or self.deleted_not_gone
            or self.stray_on_disk
        )


async def final_check(c: httpx.AsyncClient, s: State, root: Path) -> FinalCheck:
    out = FinalCheck(expected_files=len(s.live))
    started = time.perf_counter()
    r = await c.get("/v1/files")
    out.requests += 1
    r.raise_for_status()
    listed = {record["file_id"]: record for record in r.json()["data"]}
    out.listed = len(listed)
    for fid, entry in s.live.items():
        record = listed.get(fid)
        if record is None:
            out.lost.append(fid)
        elif record["size"] != entry.size or record["meta"].get("sha256") != entry.sha256:
            out.corrupted.append(f"{fid} (listed record)")
    out.resurrected = [fid for fid in s.deleted if fid in listed]
    out.unknown_listed = [
        fid
        for fid in listed
        if fid not in s.live and fid not in s.deleted and fid not in s.uncertain
    ]
    gate = asyncio.Semaphore(8)

    async def verify(entry: FileEntry) -> None:
        async with gate:
            r = await c.get(f"/v1/files/{entry.file_id}/download")
            out.requests += 1
            if r.status_code != 200:
                out.lost.append(f"{entry.file_id} (download {r.status_code})")
            elif hashlib.sha256(r.content).hexdigest() != entry.sha256:
                out.corrupted.append(entry.file_id)
            else:
                out.verified += 1

    async def gone(fid: str) -> None:
        async with gate:
            for path in (f"/v1/files/{fid}", f"/v1/files/{fid}/download"):
                r = await c.get(path)
                out.requests += 1
                if r.status_code != 404:
                    out.deleted_not_gone.append(f"{path} -> {r.status_code}")
            out.deleted_checked += 1

    await asyncio.gather(*(verify(e) for e in s.live.values()), *(gone(f) for f in s.deleted))
    # the store folder: one .bin and one .json per live file, nothing else
    on_disk = sorted(p.name for p in root.iterdir())
    expected = {f"{fid}{ext}" for fid in listed for ext in (".bin", ".json")}
    out.stray_on_disk = [name for name in on_disk if name not in expected]
    out.stray_on_disk += [f"missing {name}" for name in sorted(expected - set(on_disk))]
    out.seconds = time.perf_counter() - started
    return out


# --------------------------------------------------------------------------- overload


@dataclass
class OverloadResult:
    rss_before: float = 0.0
    rss_after: float = 0.0
    ok: int = 0
    overloaded: int = 0
    bad: list[str] = field(default_factory=list)
    healthy_after: bool = False
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return bool(self.bad) or self.overloaded == 0 or not self.healthy_after


async def overload_phase(url: str, pid: int, s: State) -> OverloadResult:
    out = OverloadResult()
    started = time.perf_counter()
    rng = random.Random(7)
    texts = [random_text(rng, 380) for _ in range(OVERLOAD_BURST)]
    c, _ = make_client(url, s, OVERLOAD_BURST + 8)
    async with c:
        for text in texts[:3]:  # warm this server's long-text path once
            await c.post("/v1/embedding", json={"text": text})
        out.rss_before = await settled_rss(c, pid)

        async def one(text: str) -> None:
            try:
                r = await c.post("/v1/embedding", json={"text": text})
            except httpx.HTTPError as exc:
                out.bad.append(f"transport error {type(exc).__name__}: {exc}")
                return
            if r.status_code == 200:
                out.ok += 1
            elif r.status_code == 503 and r.headers.get("retry-after", "").isdigit():
                if int(r.headers["retry-after"]) < 1 or "detail" not in r.json():
                    out.bad.append(snippet(r))
                else:
                    out.overloaded += 1
            else:
                out.bad.append(f"{snippet(r)} retry-after={r.headers.get('retry-after')!r}")

        for _ in range(OVERLOAD_ROUNDS):
            await asyncio.gather(*(one(t) for t in texts))
            await asyncio.sleep(0.5)
        health = (await c.get("/health")).json()
        after = await c.post("/v1/embedding", json={"text": "still alive?"})
        out.healthy_after = health.get("queue_len") == 0 and after.status_code == 200
        out.rss_after = await settled_rss(c, pid)
    out.seconds = time.perf_counter() - started
    return out


# --------------------------------------------------------------------------- main


@dataclass
class Run:
    args: argparse.Namespace
    s: State
    rss_start: float = 0.0
    rss_warm: float = 0.0
    rss_after: float = 0.0
    rss_peak: float = 0.0
    timeline: list[tuple[int, float]] = field(default_factory=list)
    warmup_sent: int = 0
    warmup_s: float = 0.0
    warmup_unexpected: int = 0
    sent: int = 0
    wall_s: float = 0.0
    start_to_warm_s: float = 0.0
    overload_503_main: int = 0
    fivexx_seen: int = 0
    final: FinalCheck | None = None
    overload: OverloadResult | None = None
    stderr_errors: int = 0
    stderr_tail: list[str] = field(default_factory=list)
    incomplete: str = ""


def server_env(run: Run, extra: dict[str, str] | None = None) -> dict[str, str]:
    token = run.args.token
    env = {
        "KIAPI_MAX_UPLOAD_MB": str(MAX_UPLOAD_MB),
        "KIAPI_MAX_BODY_MB": str(MAX_BODY_MB),
        "KIAPI_MAX_FINISHED_JOBS": str(MAX_FINISHED_JOBS),
        **dict(item.split("=", 1) for item in run.args.server_env),
        **(extra or {}),
    }
    if token:
        env["KIAPI_AUTH_TOKEN"] = token
    return env


async def main_phase(run: Run, server: Server, deadline: float) -> None:
    args, s = run.args, run.s
    run.start_to_warm_s = server.start_to_warm_s
    c, classifier = make_client(server.url, s, args.concurrency + 4)
    async with c:
        run.rss_start = rss_mib(server.pid)
        # warm-up: each length class once, full-concurrency bursts of the longest texts, the
        # mix, then short embeddings until the job store holds as many records as it keeps
        started = time.perf_counter()
        for words in (1, 8, 32, 64, 128, 200, 300):
            text = random_text(s.rng, words)
            await run_one(c, s, "embed", lambda c, s, text=text: op_embed(c, s, text))
        sent = 7 + await long_bursts(c, s, args.concurrency)
        mixed, _ = await load(c, s, args.warmup, args.concurrency, deadline)
        sent += mixed + await fill_job_store(c, s, args.concurrency)
        run.warmup_sent, run.warmup_s = sent, time.perf_counter() - started
        run.warmup_unexpected = sum(st.unexpected for st in s.stats.values())
        s.stats.clear()  # the table counts the main phase only
        warm_examples = list(s.examples)
        s.examples.clear()
        s.examples.extend(f"(warm-up) {e}" for e in warm_examples)
        run.rss_warm = await settled_rss(c, server.pid)

        stop = asyncio.Event()
        sampler = asyncio.create_task(sample_rss(server.pid, s, run.timeline, stop))
        try:
            run.sent, run.wall_s = await load(c, s, args.requests, args.concurrency, deadline)
        finally:
            stop.set()
            await sampler
        run.rss_peak = max([run.rss_warm] + [rss for _, rss in run.timeline])
        if run.sent < args.requests:
            run.incomplete = f"time limit: {run.sent} of {args.requests} requests sent"
        run.final = await final_check(c, s, server.root)
        run.rss_after = await settled_rss(c, server.pid)
        run.overload_503_main = classifier.overload
        run.fivexx_seen = classifier.fivexx


def fmt_ms(values: list[float], q: float) -> str:
    return f"{percentile(values, q) * 1000:.1f}" if values else "-"


def report(run: Run) -> bool:
    """Print the tables; return True when the run is clean."""
    args, s = run.args, run.s
    print(f"machine: {machine()}")
    print(
        f"server: kiapi serve on loopback, model {s.model} (dimension {s.dimension}); "
        f"KIAPI_MAX_UPLOAD_MB={MAX_UPLOAD_MB}, KIAPI_MAX_BODY_MB={MAX_BODY_MB}, "
        f"auth {'on' if s.token else 'off'}; start to warm {run.start_to_warm_s:.2f} s"
        + (f"; extra: {' '.join(args.server_env)}" if args.server_env else "")
    )
    print(
        f"load: {args.requests} requests, {args.concurrency} concurrent clients, seed {args.seed}; "
        f"warm-up: {run.warmup_sent} requests of the same mix in {run.warmup_s:.1f} s "
        "before the RSS baseline\n"
    )
    print("| kind | count | expected | unexpected | 503 overload | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|---|")
    total = KindStats()
    for kind in MIX:
        st = s.stats.get(kind)
        if st is None:
            continue
        print(
            f"| {kind} | {st.count} | {st.expected} | {st.unexpected} | {st.overload} "
            f"| {fmt_ms(st.latencies, 50)} | {fmt_ms(st.latencies, 99)} |"
        )
        total.count += st.count
        total.expected += st.expected
        total.unexpected += st.unexpected
        total.latencies += st.latencies
    print(
        f"| **all** | {total.count} | {total.expected} | {total.unexpected} "
        f"| {run.overload_503_main} | {fmt_ms(total.latencies, 50)} "
        f"| {fmt_ms(total.latencies, 99)} |"
    )
    f = run.final or FinalCheck()
    growth = (run.rss_after - run.rss_warm) / run.rss_warm if run.rss_warm else float("nan")
    print("\n| measure | value |")
    print("|---|---|")
    rows = [
        ("requests (main phase)", f"{run.sent}"),
        ("wall time s", f"{run.wall_s:.1f}"),
        ("req/s", f"{run.sent / run.wall_s:.1f}" if run.wall_s else "-"),
        (
            "unexpected answers (main phase / warm-up)",
            f"{total.unexpected} / {run.warmup_unexpected}",
        ),
        ("unexpected 5xx", f"{run.fivexx_seen}"),
        ("transport errors", f"{s.transport_errors}"),
        ("503 + Retry-After (overload) in main phase", f"{run.overload_503_main}"),
        ("server log lines at error level / tracebacks", f"{run.stderr_errors}"),
        ("files uploaded (warm-up + main)", f"{s.uploads_ok}"),
        ("files deleted", f"{len(s.deleted)}"),
        ("files expected at the end / listed", f"{f.expected_files} / {f.listed}"),
        ("files verified by sha256", f"{f.verified}"),
        ("files lost", f"{len(f.lost)}"),
        ("files corrupted", f"{len(f.corrupted)}"),
        ("deleted files listed again", f"{len(f.resurrected)}"),
        (
            "deleted files checked 404 / not gone",
            f"{f.deleted_checked} / {len(f.deleted_not_gone)}",
        ),
        ("unknown files listed", f"{len(f.unknown_listed)}"),
        ("stray entries in the store folder", f"{len(f.stray_on_disk)}"),
        ("final check requests / s", f"{f.requests} / {f.seconds:.1f}"),
        ("RSS at warm (server start) MiB", f"{run.rss_start:.1f}"),
        ("RSS after the warm-up mix (baseline) MiB", f"{run.rss_warm:.1f}"),
        ("RSS peak during the main phase MiB", f"{run.rss_peak:.1f}"),
        ("RSS after the run MiB", f"{run.rss_after:.1f}"),
        ("RSS change vs baseline", f"{growth * 100:+.1f}% (goal <= +{RSS_GROWTH_LIMIT:.0%})"),
        (
            "RSS change vs server start (not judged)",
            f"{(run.rss_after - run.rss_start) / run.rss_start * 100:+.1f}%",
        ),
    ]
    ov = run.overload
    if ov is not None:
        rows += [
            (
                f"overload: 503 + Retry-After / 200 / other "
                f"({OVERLOAD_ROUNDS} bursts of {OVERLOAD_BURST}, KIAPI_MAX_QUEUE={OVERLOAD_QUEUE})",
                f"{ov.overloaded} / {ov.ok} / {len(ov.bad)}",
            ),
            ("overload: healthy afterwards", "yes" if ov.healthy_after else "NO"),
            (
                "overload: RSS before / after MiB (not judged)",
                f"{ov.rss_before:.1f} / {ov.rss_after:.1f} "
                f"({(ov.rss_after - ov.rss_before) / ov.rss_before * 100:+.1f}%)",
            ),
            ("overload phase s", f"{ov.seconds:.1f}"),
        ]
    for name, value in rows:
        print(f"| {name} | {value} |")
    if run.timeline and run.sent:
        # RSS while the load runs (not settled: includes in-flight work), at tenths of the run
        marks = []
        for tenth in range(1, 11):
            upto = [rss for sent, rss in run.timeline if sent <= run.sent * tenth / 10]
            marks.append(f"{upto[-1]:.0f}" if upto else "-")
        print(
            f"\nRSS MiB during the main phase at 10%, 20%, ... 100% of requests: {', '.join(marks)}"
        )

    problems = []
    if total.unexpected or run.warmup_unexpected:
        problems.append(f"{total.unexpected + run.warmup_unexpected} unexpected answers")
    if run.fivexx_seen:
        problems.append(f"{run.fivexx_seen} unexpected 5xx")
    if f.failed:
        problems.append("file store check failed")
    if not growth <= RSS_GROWTH_LIMIT:
        problems.append(f"RSS grew {growth * 100:.1f}%")
    if ov is not None and ov.failed:
        problems.append("overload phase misbehaved")
    if s.examples:
        print("\nUnexpected answers (first ones):")
        for example in s.examples:
            print(f"  {example}")
    for name, items in [
        ("lost", f.lost),
        ("corrupted", f.corrupted),
        ("resurrected", f.resurrected),
        ("unknown listed", f.unknown_listed),
        ("deleted not gone", f.deleted_not_gone),
        ("stray on disk", f.stray_on_disk),
    ]:
        if items:
            print(f"\n{name}: {items[:20]}")
    if ov is not None and ov.bad:
        print(f"\noverload phase, unexpected: {ov.bad[:10]}")
    if run.stderr_errors:
        print("\nserver stderr (last lines):")
        for line in run.stderr_tail[-20:]:
            print(f"  {line}")
    if run.incomplete:
        print(f"\nINCOMPLETE: {run.incomplete}")
    print(f"\nresult: {'PASS' if not problems else 'FAIL: ' + '; '.join(problems)}")
    return not problems


async def run_all(run: Run, deadline: float) -> None:
    args = run.args
    reserve = 60.0 + (30.0 if args.overload else 0.0)
    with tempfile.TemporaryDirectory(prefix="kiapi-soak-") as tmp:
        root = Path(tmp) / "files"
        port = args.port or free_port()
        server = launch(port, root, server_env(run))
        try:
            await main_phase(run, server, deadline - reserve)
        finally:
            stop_server(server.popen)
            server.drain.thread.join(5)
            run.stderr_errors += server.drain.errors
            run.stderr_tail += list(server.drain.tail)
        if args.overload:
            root2 = Path(tmp) / "files-overload"
            env = server_env(run, {"KIAPI_MAX_QUEUE": str(OVERLOAD_QUEUE)})
            server2 = launch(free_port(), root2, env)
            try:
                run.overload = await overload_phase(server2.url, server2.pid, run.s)
            finally:
                stop_server(server2.popen)
                server2.drain.thread.join(5)
                run.stderr_errors += server2.drain.errors
                run.stderr_tail += list(server2.drain.tail)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000, help="main-phase requests")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent clients")
    parser.add_argument("--time-limit-s", type=float, default=600.0, help="hard limit, all in")
    parser.add_argument("--warmup", type=int, default=400, help="warm-up requests of the mix")
    parser.add_argument("--port", type=int, default=0, help="main server port (default: free)")
    parser.add_argument(
        "--token",
        default=os.environ.get("KIAPI_AUTH_TOKEN") or None,
        help="bearer token for the servers and every request (default: $KIAPI_AUTH_TOKEN)",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="KIAPI_X=VALUE",
        help="extra server setting (repeatable), e.g. KIAPI_MAX_FINISHED_JOBS=50 to isolate "
        "the job store's share of the RSS growth",
    )
    parser.add_argument(
        "--no-overload", dest="overload", action="store_false", help="skip the overload phase"
    )
    args = parser.parse_args()
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    if any("=" not in item for item in args.server_env):
        parser.error("--server-env takes KIAPI_X=VALUE")
    state = State(random.Random(args.seed), headers, args.token, args.concurrency)
    env = dict(item.split("=", 1) for item in args.server_env)
    state.max_finished_jobs = int(env.get("KIAPI_MAX_FINISHED_JOBS", MAX_FINISHED_JOBS))
    run = Run(args, state)
    started = time.monotonic()
    deadline = started + args.time_limit_s
    try:
        asyncio.run(asyncio.wait_for(run_all(run, deadline), args.time_limit_s))
    except TimeoutError:
        run.incomplete = f"cancelled at the {args.time_limit_s:g} s time limit"
    clean = report(run)
    print(f"runtime: {time.monotonic() - started:.1f} s")
    if run.incomplete:
        return 2
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
