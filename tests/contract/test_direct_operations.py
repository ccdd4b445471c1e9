"""Direct operations (``kiapi/http/direct.py``) answer exactly as Connexion's stack does.

The JSON operations on fixed paths skip Connexion's routing and per-request decorators. Here
the same requests go to two apps: the server as it runs, and one whose direct table is empty
(every request through Connexion). Status, body and headers must match, apart from the values
that are new per request (job ids, completion ids, timestamps). The requests cover each direct
operation's success, schema errors, broken JSON, a missing body, content types (upper case,
charset, not JSON: these fall through to Connexion) and unknown models; the chat cases also
stream. A spy checks which requests the direct path served.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from starlette.testclient import TestClient

from kiapi.app import create_app
from kiapi.config import Settings
from kiapi.http import direct
from tests.support import wait_until

JSON = {"content-type": "application/json"}
SMALL_CHAT = {
    "messages": [{"role": "user", "content": "Say hi."}],
    "max_tokens": 3,
    "temperature": 0,
}

# (method, path, headers, body, served directly)
CASES = [
    ("POST", "/v1/embedding", JSON, {"text": "hello world"}, True),
    ("POST", "/v1/embedding", JSON, {"text": 5}, True),
    ("POST", "/v1/embedding", JSON, {"text": "x", "model": "no-such-model"}, True),
    ("POST", "/v1/embedding", JSON, b'{"text": "unterminated', True),
    ("POST", "/v1/embedding", JSON, b"", True),
    ("POST", "/v1/embedding", JSON, b"null", True),
    ("POST", "/v1/embedding", JSON, b"[1, 2]", True),
    ("POST", "/v1/embedding?unknown=1", JSON, {"text": "query strings are ignored"}, True),
    ("POST", "/v1/embedding", {"content-type": "Application/JSON"}, {"text": "hi"}, True),
    (
        "POST",
        "/v1/embedding",
        {"content-type": "application/json; charset=utf-16"},
        '{"text": "sixteen bits"}'.encode("utf-16"),
        True,
    ),
    ("POST", "/v1/embedding", {"content-type": "application/json;charset="}, {"text": 5}, True),
    ("POST", "/v1/embedding", {"content-type": "text/plain"}, b'{"text": "hi"}', False),
    ("POST", "/v1/embedding", {"content-type": "application/merge-patch+json"}, b"{}", False),
    ("POST", "/v1/embeddings", JSON, {"input": ["one", "two"]}, True),
    ("POST", "/v1/embeddings", JSON, {"input": 7}, True),
    ("POST", "/v1/embeddings", JSON, b"{", True),
    ("POST", "/v1/rerank", JSON, {"query": "q"}, True),
    ("POST", "/v1/rerank", JSON, {"query": "q", "documents": ["d"], "model": "nope"}, True),
    ("POST", "/v1/chat/completions", JSON, SMALL_CHAT, True),
    ("POST", "/v1/chat/completions", JSON, {**SMALL_CHAT, "stream": True}, True),
    ("POST", "/v1/chat/completions", JSON, {"messages": []}, True),
    ("POST", "/v1/chat/completions", JSON, {**SMALL_CHAT, "model": "nope"}, True),
    ("GET", "/v1/embedding", {}, None, False),  # 405 from Connexion
    ("POST", "/v1/embedding/", JSON, {"text": "hi"}, False),  # Connexion's redirect
]
IDS = [f"{m} {p} {h.get('content-type', '-')} {i}" for i, (m, p, h, _b, _d) in enumerate(CASES)]

FRESH_KEYS = {"id", "created", "job_id", "created_at", "system_fingerprint", "timings"}
FRESH_HEADERS = {"x-kiapi-job-id", "content-length", "date"}


def settings(tmp_path) -> Settings:
    return Settings(
        _env_file=None,
        files_root=tmp_path / "files",
        memory_limit_gb=4.0,
        warmup="smollm2,all-minilm-l6-v2",
        chat_max_tokens=16,
    )


@pytest.fixture(scope="module")
def clients(tmp_path_factory):
    """(direct, through Connexion, the spy's list of paths the direct path served)."""
    served: list[str] = []
    serve = direct.DirectOperations._serve

    async def spy(route, encoding, scope, receive, send):
        served.append(scope["path"])
        await serve(route, encoding, scope, receive, send)

    spying, plain_only = pytest.MonkeyPatch(), pytest.MonkeyPatch()
    spying.setattr(direct.DirectOperations, "_serve", staticmethod(spy))
    fast_app = create_app(settings(tmp_path_factory.mktemp("direct")))
    plain_app = create_app(settings(tmp_path_factory.mktemp("connexion")))
    try:
        with TestClient(fast_app, base_url="http://127.0.0.1") as fast:
            plain_only.setattr(direct, "takes_direct", lambda _operation: False)
            with TestClient(plain_app, base_url="http://127.0.0.1") as plain:
                plain_only.undo()  # the table is built when the app starts
                for c in (fast, plain):
                    wait_until(lambda c=c: c.get("/health").json()["warm"], timeout=120)
                yield fast, plain, served
    finally:
        plain_only.undo()
        spying.undo()


def without_fresh_values(value):
    if isinstance(value, dict):
        return {k: "*" if k in FRESH_KEYS else without_fresh_values(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_fresh_values(v) for v in value]
    return value


def answer(client: TestClient, method, path, headers, body) -> tuple:
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    r = client.request(method, path, headers=headers, content=body, follow_redirects=False)
    kind = r.headers.get("content-type", "")
    if kind.startswith("text/event-stream"):
        events = [line.removeprefix("data: ") for line in r.text.splitlines() if line]
        content = [e if e == "[DONE]" else without_fresh_values(json.loads(e)) for e in events]
    elif kind.startswith("application/json"):
        content = without_fresh_values(r.json())
    else:
        content = r.text
    kept = sorted((k, v) for k, v in r.headers.items() if k not in FRESH_HEADERS)
    return r.status_code, kept, content, "x-kiapi-job-id" in r.headers


@pytest.mark.parametrize(("method", "path", "headers", "body", "is_direct"), CASES, ids=IDS)
def test_direct_answers_as_connexion(clients, method, path, headers, body, is_direct):
    fast, plain, served = clients
    before = len(served)
    got = answer(fast, method, path, headers, body)
    assert (len(served) > before) == is_direct
    assert got == answer(plain, method, path, headers, body)
    assert got[0] != 500, got


def test_the_direct_operations_are_the_fixed_path_json_posts(clients):
    fast, _plain, _served = clients
    stack = fast.app.middleware.middleware_stack
    (table,) = [m for m in stack if isinstance(m, direct.DirectOperations)]
    assert set(table.routes) == {
        ("POST", "/v1/embedding"),
        ("POST", "/v1/embeddings"),
        ("POST", "/v1/rerank"),
        ("POST", "/v1/chat/completions"),
    }


def test_requests_under_a_root_path_go_to_connexion():
    """Connexion routes a request under a ``root_path`` by its path without the prefix; the
    table, keyed by full paths, leaves those to it."""
    passed = []

    async def connexion(scope, receive, send):
        passed.append(scope["path"])

    table = direct.DirectOperations(connexion)
    table.routes[("POST", "/v1/embedding")] = "served here"
    scope = {"type": "http", "method": "POST", "path": "/v1/embedding", "headers": []}
    asyncio.run(table({**scope, "root_path": "/v1"}, None, None))
    assert passed == ["/v1/embedding"]
