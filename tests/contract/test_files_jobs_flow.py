"""Stateful flows through the Files and Jobs APIs, each response checked against the spec."""

import threading
import time

import pytest
from starlette.testclient import TestClient

from kiapi.app import create_app
from kiapi.config import Settings
from kiapi.runtime.catalog import EMBEDDING
from kiapi.runtime.core import Runtime
from kiapi.runtime.embedding import EmbeddingVector
from kiapi.runtime.registry import LoadedModel, ModelSpec, Registry
from tests.support import assert_matches_schema


def test_files_sequence_upload_get_list_download_delete(client):
    payload = bytes(range(256)) * 1000
    up = client.post("/v1/files", files={"file": ("pic ü.png", payload, "image/png")})
    assert up.status_code == 200, up.text
    record = up.json()
    assert_matches_schema("common", "FileRecord", record)
    file_id = record["file_id"]
    assert (record["filename"], record["content_type"], record["size"]) == (
        "pic ü.png",
        "image/png",
        len(payload),
    )

    got = client.get(f"/v1/files/{file_id}")
    assert got.status_code == 200 and got.json() == record

    second = client.post("/v1/files", files={"file": ("b.txt", b"second", "text/plain")}).json()
    listing = client.get("/v1/files").json()
    assert_matches_schema("common", "FileListResponse", listing)
    assert [f["file_id"] for f in listing["data"]] == [second["file_id"], file_id]  # newest first

    download = client.get(f"/v1/files/{file_id}/download")
    assert download.status_code == 200 and download.content == payload
    assert download.headers["content-type"] == "image/png"
    assert download.headers["content-disposition"] == (
        "attachment; filename=\"pic _.png\"; filename*=UTF-8''pic%20%C3%BC.png"
    )

    deleted = client.delete(f"/v1/files/{file_id}")
    assert deleted.json() == {"deleted": True, "file_id": file_id}
    assert_matches_schema("common", "FileDeleteResponse", deleted.json())
    for method, path in [
        ("get", f"/v1/files/{file_id}"),
        ("get", f"/v1/files/{file_id}/download"),
        ("delete", f"/v1/files/{file_id}"),
    ]:
        assert client.request(method, path).status_code == 404
    assert [f["file_id"] for f in client.get("/v1/files").json()["data"]] == [second["file_id"]]


def test_files_survive_a_restart(settings):
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as c:
        record = c.post(
            "/v1/files", files={"file": ("keep.bin", b"persist me", "application/octet-stream")}
        ).json()
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as c:
        assert c.get(f"/v1/files/{record['file_id']}").json() == record
        assert c.get(f"/v1/files/{record['file_id']}/download").content == b"persist me"


def test_health_shape(client):
    health = client.get("/health").json()
    assert_matches_schema("common", "HealthResponse", health)
    assert health["status"] == "ok" and health["warm"] is True and health["queue_len"] == 0
    assert health["memory"]["loaded"] == [] and health["memory"]["budget_gb"] == 4.0


def test_embedding_model_not_set_up_is_503_with_hint(client):
    r = client.post("/v1/embedding", json={"text": "hello", "model": "qwen3-embedding-8b"})
    assert r.status_code == 503
    assert_matches_schema("embedding", "ErrorResponse", r.json())
    assert "not set up" in r.json()["detail"] and r.json()["hint"]
    assert client.get("/v1/jobs").json()["data"] == []  # refused before queueing


def test_embedding_semantic_errors_are_400(client):
    assert client.post("/v1/embedding", json={}).status_code == 400
    assert client.post("/v1/embedding", json={"text": "", "image": None}).status_code == 400
    r = client.post("/v1/embedding", json={"text": "x", "image": "aGk="})
    assert r.status_code == 400 and "does not accept image" in r.json()["detail"]
    r = client.post("/v1/embedding", json={"text": "x", "model": "nope", "extra": 1})
    assert r.status_code == 400 and "all-minilm-l6-v2" in r.json()["detail"]
    assert client.get("/v1/jobs").json()["data"] == []  # rejected before a job was made


def test_models_list(client):
    models = client.get("/v1/embedding/models").json()
    for entry in models:
        assert_matches_schema("embedding", "CapabilityModelSpec", entry)
    # the contract's default is not set up here: the first set-up model serves instead
    assert [m["name"] for m in models if m["default"]] == ["all-minilm-l6-v2"]


# --------------------------------------------------------------------------- jobs machinery


class GatedModel:
    """Stands in for a loaded model to drive the job machinery (queueing, timeouts, cancel).

    It is not an embedding model and proves nothing about vectors: it returns a fixed vector
    once the test opens its gate.
    """

    def __init__(self):
        self.gate = threading.Event()
        self.calls = []

    def embed(self, items):
        self.calls.extend(item.text for item in items)
        assert self.gate.wait(10)
        return [EmbeddingVector(vector=[3.0, 4.0], prompt_tokens=2) for _ in items]


@pytest.fixture
def gated(tmp_path):
    model = GatedModel()
    spec = ModelSpec(
        name="gated",
        family=EMBEDDING,
        domain=EMBEDDING,
        repo="test/gated",
        features=("text",),
        default=True,
        weight_gb=0.5,
        engine="injected",  # the runtime below loads it with its own loader
    )
    settings = Settings(
        _env_file=None,
        files_root=tmp_path / "f",
        sync_timeout_s=0.3,
        max_queue=2,
        memory_limit_gb=2,
        warmup="none",
    )

    def runtime(s):
        return Runtime(
            s,
            registry=Registry([spec]),
            loader=lambda _spec: LoadedModel(model=model, weight_gb=0.5),
        )

    with TestClient(
        create_app(settings, runtime_factory=runtime), base_url="http://127.0.0.1"
    ) as client:
        yield client, model
        model.gate.set()


def post_in_background(client, body):
    result = {}
    thread = threading.Thread(
        target=lambda: result.setdefault("r", client.post("/v1/embedding", json=body))
    )
    thread.start()
    return thread, result


def wait_for(predicate, timeout=5):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_sync_timeout_is_504_naming_the_job_which_keeps_running(gated):
    client, model = gated
    r = client.post("/v1/embedding", json={"text": "slow"})
    assert r.status_code == 504
    body = r.json()
    assert_matches_schema("embedding", "ErrorResponse", body)
    job_id = body["job_id"]
    assert job_id in body["detail"] and f"/v1/jobs/{job_id}" in body["hint"]
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "running"
    model.gate.set()
    wait_for(lambda: client.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded")
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert_matches_schema("common", "Job", job)
    assert (
        job["result"]["embedding"] == pytest.approx([0.6, 0.8])
        and job["result"]["model"] == "gated"
    )
    assert job["params"] == {"model": "gated", "text": "slow", "image": None}
    health = client.get("/health").json()
    assert [m["name"] for m in health["memory"]["loaded"]] == ["gated"]
    assert health["memory"]["resident_gb"] == 0.5


def test_success_response_shape(gated):
    client, model = gated
    model.gate.set()
    r = client.post("/v1/embedding", json={"text": "fast", "model": "test/gated"})
    assert r.status_code == 200
    assert_matches_schema("embedding", "EmbeddingResponse", r.json())
    assert r.json()["dimension"] == 2 and r.json()["usage"] == {
        "prompt_tokens": 2,
        "total_tokens": 2,
    }


def test_queue_full_503_and_delete_semantics(gated):
    client, model = gated
    running_thread, _ = post_in_background(client, {"text": "first"})
    wait_for(lambda: model.calls == ["first"])
    queued = [post_in_background(client, {"text": f"q{i}"}) for i in range(2)]
    wait_for(lambda: client.get("/health").json()["queue_len"] == 2)

    overflow = client.post("/v1/embedding", json={"text": "overflow"})
    assert overflow.status_code == 503 and int(overflow.headers["retry-after"]) >= 1
    assert "KIAPI_MAX_QUEUE" in overflow.json()["hint"]

    listed = client.get("/v1/jobs").json()["data"]
    jobs = {j["params"]["text"]: j for j in listed if j["type"] == "embedding"}
    assert "overflow" not in jobs
    assert jobs["first"]["status"] == "running" and jobs["q0"]["status"] == "queued"

    r = client.delete(f"/v1/jobs/{jobs['q0']['id']}")
    assert r.json() == {"deleted": True, "job_id": jobs["q0"]["id"], "was_running": False}
    r = client.delete(f"/v1/jobs/{jobs['first']['id']}")
    assert r.json() == {"deleted": True, "job_id": jobs["first"]["id"], "was_running": True}
    assert client.get(f"/v1/jobs/{jobs['first']['id']}").status_code == 404
    assert client.get("/health").json()["queue_len"] == 1

    model.gate.set()
    for thread, _ in [(running_thread, None), *queued]:
        thread.join(10)
    canceled = queued[0][1]["r"]
    assert canceled.status_code == 409 and canceled.json()["job_id"] == jobs["q0"]["id"]
    assert queued[1][1]["r"].status_code == 200
    assert model.calls == ["first", "q1"]  # the canceled job never ran
