"""Metrics, request logs and visible progress, observed from outside: Prometheus' text format
scraped and parsed, log lines read from a real ``kiapi serve`` process, model loads read
from ``/v1/jobs``."""

import json
import os
import subprocess
import sys
import threading

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from kiapi.app import create_app
from kiapi.config import Settings
from kiapi.runtime.catalog import EMBEDDING
from kiapi.runtime.core import Runtime
from kiapi.runtime.jobs import report_progress
from kiapi.runtime.registry import LoadedModel, ModelSpec, Registry
from tests.support import free_port, wait_until, wait_until_warm


def scrape(client) -> dict[tuple[str, tuple], float]:
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_requests_jobs_batches_and_residents(tmp_path):
    settings = Settings(
        _env_file=None,
        files_root=tmp_path / "files",
        memory_limit_gb=4.0,
        warmup="all-minilm-l6-v2",  # the embedding model alone
    )
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as c:
        wait_until(lambda: c.get("/health").json()["warm"])
        before = scrape(c)
        for text in ("one", "two"):
            assert c.post("/v1/embedding", json={"text": text}).status_code == 200
        assert c.post("/v1/embedding", json={"text": 5}).status_code == 422
        assert c.get("/no/such/path").status_code == 404
        after = scrape(c)

    op = "embedding_v1_embedding_post"
    ok = {"operation": op, "method": "POST", "status": "200"}
    assert (
        value(after, "kiapi_http_requests_total", **ok)
        - value(before, "kiapi_http_requests_total", **ok)
        == 2
    )
    assert value(after, "kiapi_http_request_duration_seconds_count", **ok) == 2
    assert value(after, "kiapi_http_request_duration_seconds_bucket", le="+Inf", **ok) == 2
    assert value(after, "kiapi_http_requests_total", operation=op, method="POST", status="422") == 1
    assert (
        value(after, "kiapi_http_requests_total", operation="unmatched", method="GET", status="404")
        == 1
    )
    jobs = value(after, "kiapi_job_duration_seconds_count", type="embedding", outcome="succeeded")
    assert jobs == 2
    assert value(after, "kiapi_batch_size_count", type="embedding") == 2
    assert value(after, "kiapi_job_duration_seconds_count", type="warmup", outcome="succeeded") == 1
    assert (
        value(after, "kiapi_job_duration_seconds_count", type="model_load", outcome="succeeded")
        == 0
    )
    assert value(after, "kiapi_queue_length") == 0
    assert value(after, "kiapi_model_resident", model="all-minilm-l6-v2") == 1
    assert value(after, "kiapi_models_resident") == 1
    assert 0.05 < value(after, "kiapi_resident_gb") < 0.2
    assert value(after, "kiapi_memory_budget_gb") == 4.0


def instant_loader(spec: ModelSpec) -> LoadedModel:
    return LoadedModel(model=object(), weight_gb=0.5)


def test_ttl_evictions_are_counted_and_logged_with_their_reason(tmp_path, caplog):
    spec = ModelSpec("tiny", EMBEDDING, EMBEDDING, "org/tiny", engine="injected")
    settings = Settings(
        _env_file=None,
        files_root=tmp_path / "files",
        memory_limit_gb=4.0,
        default_ttl_s=0.2,
        ttl_sweep_s=0.05,
        warmup="none",
    )
    runtime = Runtime(settings, registry=Registry([spec]), loader=instant_loader, warmup=[spec])
    caplog.set_level("INFO", logger="kiapi.runtime.memory")
    runtime.start()
    try:
        wait_until(lambda: runtime.memory.evictions["ttl"] == 1, timeout=10)
        text = runtime.metrics.exposition().decode()
    finally:
        runtime.stop()
    assert 'kiapi_model_evictions_total{reason="ttl"} 1.0' in text
    evicted = [r for r in caplog.records if getattr(r, "event", None) == "model_evicted"]
    assert [(r.model, r.reason) for r in evicted][:1] == [("tiny", "ttl")]


def test_a_model_load_is_a_job_with_progress_while_it_runs(tmp_path):
    gate, halfway = threading.Event(), threading.Event()

    def slow_loader(spec: ModelSpec) -> LoadedModel:
        report_progress(0.5, "reading weights (1 of 2 files)")
        halfway.set()
        gate.wait(10)
        return LoadedModel(model=object(), weight_gb=0.25)

    spec = ModelSpec("slow", EMBEDDING, EMBEDDING, "org/slow", engine="injected")
    settings = Settings(_env_file=None, files_root=tmp_path / "files", warmup="none")
    runtime = Runtime(settings, registry=Registry([spec]), loader=slow_loader, warmup=[spec])
    runtime.start()
    try:
        assert halfway.wait(10)
        jobs = {j["type"]: j for j in runtime.jobs.list()}
        load = jobs["model_load"]
        assert load["status"] == "running" and load["params"] == {"model": "slow"}
        assert load["progress"] == 0.5
        assert load["progress_label"] == "reading weights (1 of 2 files)"
        assert jobs["warmup"]["progress_label"] == f"waiting for slow to load ({load['id']})"
        gate.set()
        wait_until(lambda: runtime.warm)
        load = runtime.jobs.snapshot(load["id"])
        assert load["status"] == "succeeded" and load["progress"] == 1.0
        assert load["result"] == {"model": "slow", "weight_gb": 0.25}
    finally:
        gate.set()
        runtime.stop()


def test_the_real_loader_reports_its_phases(tmp_path):
    settings = Settings(
        _env_file=None,
        files_root=tmp_path / "files",
        memory_limit_gb=4.0,
        warmup="all-minilm-l6-v2",  # the embedding model alone
    )
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as c:
        wait_until(lambda: c.get("/health").json()["warm"])
        jobs = c.get("/v1/jobs").json()["data"]
    load = next(j for j in jobs if j["type"] == "model_load")
    assert load["params"] == {"model": "all-minilm-l6-v2"}
    assert load["status"] == "succeeded" and load["progress_label"] == "done"
    warmup = next(j for j in jobs if j["type"] == "warmup")
    assert warmup["result"]["loaded"] == ["all-minilm-l6-v2"]


MISSING_FILE = "file_" + "0" * 24


@pytest.mark.slow
def test_json_request_lines_from_a_real_server(tmp_path):
    port = free_port()
    env = {
        **os.environ,
        "KIAPI_FILES_ROOT": str(tmp_path / "files"),
        "KIAPI_LOG_FORMAT": "json",
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "kiapi", "serve", "--port", str(port)],
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_warm(url, server)
        r = httpx.post(f"{url}/v1/embedding", json={"text": "log me"}, timeout=30)
        job_id = r.headers["X-Kiapi-Job-Id"]
        httpx.get(f"{url}/v1/files/{MISSING_FILE}")
        httpx.get(f'{url}/v1/files%0d%0a{{"logger":"forged"}}')
    finally:
        server.terminate()
        _, stderr = server.communicate(timeout=30)
    lines = [json.loads(line) for line in stderr.splitlines() if line.strip()]
    access = [x for x in lines if x["logger"] == "kiapi.access"]
    post = next(x for x in access if x["path"] == "/v1/embedding")
    assert post["method"] == "POST" and post["status"] == 200 and post["job_id"] == job_id
    assert post["operation"] == "embedding_v1_embedding_post" and post["duration_ms"] > 0
    assert post["level"] == "info" and post["ts"].endswith("Z")
    missing = next(x for x in access if x["path"] == f"/v1/files/{MISSING_FILE}")
    assert missing["status"] == 404 and missing["job_id"] is None
    loaded = next(x for x in lines if x.get("event") == "model_loaded")
    assert loaded["model"] == "all-minilm-l6-v2" and loaded["weight_gb"] > 0
    assert any(x.get("event") == "model_evicted" and x["reason"] == "shutdown" for x in lines)
    assert not any(x["logger"] == "uvicorn.access" for x in lines)  # one line per request
    # a CRLF in the path stays inside its line's JSON string (every line above parsed)
    assert any(x["path"].startswith("/v1/files\r\n{") for x in access)
    assert not any(x["logger"] == "forged" for x in lines)
    assert any(x["logger"].startswith("uvicorn") for x in lines)  # uvicorn's lines are JSON too
