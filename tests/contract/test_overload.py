"""Overload and departing clients, against a live uvicorn server and the real MiniLM model:
a full queue answers 503 + Retry-After and keeps no trace of what it refused; what it did
accept is all answered; a client that disconnects while its job waits leaves no queued job
behind and does not hold the worker."""

import json
import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from kiapi.config import Settings
from kiapi.runtime.jobs import CANCELED, QUEUED
from tests.support import hold_the_worker, serving, wait_until

MAX_QUEUE = 4


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    settings = Settings(
        _env_file=None,
        files_root=tmp_path_factory.mktemp("overload") / "files",
        memory_limit_gb=4.0,
        max_queue=MAX_QUEUE,
        batch_max_items=1,  # one job per forward pass: the queue length is what it seems
    )
    with serving(settings) as (server, runtime):
        yield server, runtime


def embedding_jobs(runtime, status=None):
    return [
        j
        for j in runtime.jobs.list()
        if j["type"] == "embedding" and (status is None or j["status"] == status)
    ]


def test_a_full_queue_answers_503_keeps_nothing_and_loses_nothing(live):
    server, runtime = live
    url = f"{server.url}/v1/embedding"
    before = len(runtime.jobs.list())
    release = hold_the_worker(runtime)
    with httpx.Client(timeout=60) as client, ThreadPoolExecutor(MAX_QUEUE) as pool:
        try:
            accepted = [
                pool.submit(client.post, url, json={"text": f"queued {i}"})
                for i in range(MAX_QUEUE)
            ]
            wait_until(lambda: runtime.worker.queue_len() == MAX_QUEUE)
            refused = [client.post(url, json={"text": f"extra {i}"}) for i in range(200)]
        finally:
            release.set()
        answers = [f.result() for f in accepted]
    for r in refused:
        assert r.status_code == 503, r.text
        assert int(r.headers["retry-after"]) >= 1
        assert "KIAPI_MAX_QUEUE" in r.json()["hint"]
    assert [r.status_code for r in answers] == [200] * MAX_QUEUE
    # The refused requests left no job records: the store holds what it accepted, no more.
    assert len(runtime.jobs.list()) == before + 1 + MAX_QUEUE


def raw_post(server_url, body: dict) -> socket.socket:
    host, port = server_url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)))
    sock.sendall(
        b"POST /v1/embedding HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    return sock


def test_a_client_that_leaves_while_queued_leaves_no_job_behind(live):
    server, runtime = live
    release = hold_the_worker(runtime)
    try:
        sock = raw_post(server.url, {"text": "nobody will read this"})
        wait_until(lambda: embedding_jobs(runtime, QUEUED))
        (job,) = embedding_jobs(runtime, QUEUED)
        sock.close()
        wait_until(lambda: runtime.jobs.snapshot(job["id"])["status"] == CANCELED)
        assert runtime.worker.queue_len() == 0
    finally:
        release.set()
    r = httpx.post(f"{server.url}/v1/embedding", json={"text": "the worker is free"}, timeout=30)
    assert r.status_code == 200, r.text
    assert runtime.jobs.snapshot(job["id"])["status"] == CANCELED  # it never ran


def test_a_client_that_leaves_while_its_job_runs_does_not_block_the_worker(live):
    server, runtime = live
    long_text = "a sentence of several words " * 400
    socks = [raw_post(server.url, {"text": long_text}) for _ in range(3)]
    wait_until(lambda: len(embedding_jobs(runtime)) >= 3)
    for sock in socks:
        sock.close()
    r = httpx.post(f"{server.url}/v1/embedding", json={"text": "still served"}, timeout=60)
    assert r.status_code == 200, r.text
    wait_until(lambda: runtime.worker.queue_len() == 0)
    statuses = {j["status"] for j in embedding_jobs(runtime)}
    assert statuses <= {"succeeded", CANCELED}, statuses
