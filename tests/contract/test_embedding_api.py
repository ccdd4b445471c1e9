"""The embedding API over HTTP with real models: the bundled all-MiniLM-L6-v2 (the default
here, because the contract's default is not set up), and tiny Qwen3 / Qwen3-VL models served
through KIAPI_MODEL_PATHS exactly as users point kiapi at downloaded weights."""

import base64
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from starlette.testclient import TestClient

from kiapi.app import create_app
from kiapi.config import Settings
from kiapi.runtime import qmatmul
from tests import tiny_models
from tests.support import (
    ImageServer,
    assert_matches_schema,
    hold_the_worker,
    minilm_weight_bytes,
    png_bytes,
    wait_until,
)

REFERENCE = json.loads(
    (Path(__file__).parent.parent / "fixtures" / "minilm_reference.json").read_text("utf-8")
)
SHORT = REFERENCE["items"][0]


def cosine(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def make_client(tmp_path, **overrides) -> TestClient:
    settings = Settings(
        _env_file=None, files_root=tmp_path / "files", memory_limit_gb=4.0, **overrides
    )
    return TestClient(create_app(settings), base_url="http://127.0.0.1")


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """The out-of-the-box server: default settings, warmup on."""
    with make_client(tmp_path_factory.mktemp("api")) as c:
        wait_until(lambda: c.get("/health").json()["warm"])
        yield c


def embed(client, **body):
    r = client.post("/v1/embedding", json=body)
    assert r.status_code == 200, r.text
    assert_matches_schema("embedding", "EmbeddingResponse", r.json())
    return r.json()


# --------------------------------------------------------------------------- bundled model


def test_default_model_serves_sentence_transformers_vectors(client):
    out = embed(client, text=SHORT["text"])
    assert out["model"] == "all-minilm-l6-v2"
    assert out["dimension"] == len(out["embedding"]) == 384
    assert cosine(out["embedding"], SHORT["vector"]) >= 0.9999
    assert abs(np.linalg.norm(out["embedding"]) - 1) < 1e-6
    assert out["usage"] == {"prompt_tokens": SHORT["tokens"], "total_tokens": SHORT["tokens"]}
    t = out["timings"]
    assert 0 < t["embed_s"] <= t["total_s"] and t["queue_s"] >= 0


def test_every_reference_text_over_http(client):
    for ref in REFERENCE["items"]:
        out = embed(client, text=ref["text"], model="minilm")
        assert cosine(out["embedding"], ref["vector"]) >= 0.9999, ref["name"]
        assert out["usage"]["prompt_tokens"] == ref["tokens"], ref["name"]


def test_oversize_text_is_truncated_as_documented_never_a_crash(client):
    long = next(r for r in REFERENCE["items"] if r["name"] == "long_over_256_tokens")
    text = long["text"] + " filler" * 300_000  # ~2 MB, under KIAPI_MAX_BODY_MB
    out = embed(client, text=text)
    assert out["usage"]["prompt_tokens"] == 256
    assert cosine(out["embedding"], long["vector"]) >= 0.9999  # the same first 256 tokens
    assert client.get("/health").json()["status"] == "ok"


@pytest.mark.parametrize(
    "name",
    [
        "all-minilm-l6-v2",
        "minilm",
        "all-minilm",
        "sentence-transformers/all-MiniLM-L6-v2",
        "ALL-MiniLM-L6-v2",
    ],
)
def test_names_aliases_and_repo_resolve(client, name):
    assert embed(client, text="hello", model=name)["model"] == "all-minilm-l6-v2"


def test_extra_fields_are_ignored(client):
    out = embed(client, text=SHORT["text"], input=["ignored"], encoding_format="base64", x=1)
    assert cosine(out["embedding"], SHORT["vector"]) >= 0.9999


def test_each_request_is_an_embedding_job(client):
    out = embed(client, text="job record please")
    jobs = client.get("/v1/jobs").json()["data"]
    job = next(j for j in jobs if j["params"].get("text") == "job record please")
    assert_matches_schema("common", "Job", job)
    assert job["type"] == "embedding" and job["status"] == "succeeded"
    assert job["params"] == {
        "model": "all-minilm-l6-v2",
        "text": "job record please",
        "image": None,
    }
    assert job["result"]["embedding"] == out["embedding"]


def test_health_shows_the_warm_resident_model(client):
    health = client.get("/health").json()
    assert_matches_schema("common", "HealthResponse", health)
    assert health["warm"] is True
    residents = {m["name"]: m for m in health["memory"]["loaded"]}
    assert set(residents) == {"all-minilm-l6-v2", "smollm2-135m-instruct"}  # each default
    resident = residents["all-minilm-l6-v2"]
    assert resident["family"] == "embedding"
    # the server's FastBert runs bfloat16 products where this process would (same CPU, env)
    expected = minilm_weight_bytes(qmatmul.bf16_products())
    assert resident["weight_gb"] == pytest.approx(expected / 1024**3, rel=0.01)
    warmup = [j for j in client.get("/v1/jobs").json()["data"] if j["type"] == "warmup"]
    loaded = ["all-minilm-l6-v2", "smollm2-135m-instruct"]
    assert warmup[0]["result"] == {"loaded": loaded, "skipped": {}}


def test_models_list_marks_the_effective_default(client):
    models = client.get("/v1/embedding/models").json()
    assert [m["name"] for m in models] == [
        "qwen3-embedding-8b",
        "qwen3-vl-embedding-2b",
        "all-minilm-l6-v2",
    ]
    assert [m["name"] for m in models if m["default"]] == ["all-minilm-l6-v2"]
    by_name = {m["name"]: m for m in models}
    assert by_name["qwen3-vl-embedding-2b"]["features"] == ["text", "image"]
    assert {"text", "vl", "minilm"} <= {a for m in models for a in m["aliases"]}


@pytest.mark.parametrize("model", ["qwen3-embedding-8b", "text", "vl"])
def test_models_without_weights_answer_503_saying_how_to_set_them_up(client, model):
    r = client.post("/v1/embedding", json={"text": "x", "model": model})
    assert r.status_code == 503
    assert_matches_schema("embedding", "ErrorResponse", r.json())
    body = r.json()
    assert "not set up" in body["detail"] or "not installed" in body["detail"]
    assert "KIAPI_MODEL_PATHS" in body["hint"] or "[vl]" in body["hint"]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({}, "at least one non-empty input"),
        ({"text": "", "image": None}, "at least one non-empty input"),
        ({"text": "x", "image": "aGk="}, "does not accept image"),
        ({"image": "aGk=", "model": "minilm"}, "does not accept image"),
        ({"text": "x", "model": "gpt-9"}, "valid choices: qwen3-embedding-8b"),
    ],
)
def test_semantic_errors_are_400(client, body, fragment):
    r = client.post("/v1/embedding", json=body)
    assert r.status_code == 400 and fragment in r.json()["detail"], r.text
    assert_matches_schema("embedding", "ErrorResponse", r.json())


def test_default_fallback_is_logged_at_startup(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="kiapi"), make_client(tmp_path, warmup="none"):
        pass
    text = caplog.text
    assert "'qwen3-embedding-8b' is not set up; 'all-minilm-l6-v2' serves as the default" in text
    assert "default embedding model: all-minilm-l6-v2" in text


def test_sync_timeout_504_names_the_job_whose_result_stays_readable(tmp_path):
    with make_client(tmp_path, warmup="none", sync_timeout_s=0.001) as c:
        r = c.post("/v1/embedding", json={"text": SHORT["text"]})
        assert r.status_code == 504, r.text
        assert_matches_schema("embedding", "ErrorResponse", r.json())
        job_id = r.json()["job_id"]
        assert job_id in r.json()["detail"] and f"/v1/jobs/{job_id}" in r.json()["hint"]
        wait_until(lambda: c.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded")
        result = c.get(f"/v1/jobs/{job_id}").json()["result"]
        assert result["model"] == "all-minilm-l6-v2"
        assert cosine(result["embedding"], SHORT["vector"]) >= 0.9999


def test_concurrent_requests_share_a_forward_pass_and_keep_their_own_results(client):
    texts = [ref["text"] for ref in REFERENCE["items"]]
    release = hold_the_worker(client.app_state["runtime"])
    with ThreadPoolExecutor(len(texts)) as pool:
        futures = [pool.submit(embed, client, text=text) for text in texts]
        runtime = client.app_state["runtime"]
        wait_until(lambda: runtime.worker.queue_len() == len(texts))
        release.set()
        outs = [f.result(60) for f in futures]
    assert {out["timings"]["batch_size"] for out in outs} == {len(texts)}
    for ref, out in zip(REFERENCE["items"], outs, strict=True):
        assert cosine(out["embedding"], ref["vector"]) >= 0.9999, ref["name"]
        assert out["usage"]["prompt_tokens"] == ref["tokens"], ref["name"]
        assert cosine(out["embedding"], embed(client, text=ref["text"])["embedding"]) >= 0.9999
    jobs = {j["params"].get("text"): j for j in client.get("/v1/jobs").json()["data"]}
    assert all(jobs[t]["status"] == "succeeded" for t in texts)


def test_batching_can_be_turned_off(tmp_path):
    with make_client(tmp_path, batch_max_items=1) as c:
        wait_until(lambda: c.get("/health").json()["warm"])
        release = hold_the_worker(c.app_state["runtime"])
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(embed, c, text=f"text {i}") for i in range(4)]
            wait_until(lambda: c.app_state["runtime"].worker.queue_len() == 4)
            release.set()
            assert {f.result(60)["timings"]["batch_size"] for f in futures} == {1}


# --------------------------------------------------------------------------- tiny Qwen3


def test_qwen3_through_model_paths_becomes_the_default(tmp_path, tiny_qwen3):
    with make_client(tmp_path, model_paths={"qwen3-embedding-8b": tiny_qwen3}) as c:
        wait_until(lambda: c.get("/health").json()["warm"])
        models = c.get("/v1/embedding/models").json()
        assert [m["name"] for m in models if m["default"]] == ["qwen3-embedding-8b"]
        text = "the quick brown fox"
        out = embed(c, text=text)
        assert out["model"] == "qwen3-embedding-8b" and out["dimension"] == 64
        from tokenizers import Tokenizer

        ids = Tokenizer.from_file(str(tiny_qwen3 / "tokenizer.json")).encode(text).ids
        assert out["usage"]["prompt_tokens"] == len(ids)
        assert cosine(out["embedding"], tiny_models.qwen3_reference(tiny_qwen3, ids)) >= 0.9999
        loaded = c.get("/health").json()["memory"]["loaded"]
        assert [m["name"] for m in loaded if m["family"] == "embedding"] == ["qwen3-embedding-8b"]


def test_default_model_setting_overrides_the_contract_default(tmp_path, tiny_qwen3):
    with make_client(
        tmp_path,
        warmup="none",
        model_paths={"qwen3-embedding-8b": tiny_qwen3},
        embedding_default_model="minilm",
    ) as c:
        assert embed(c, text="hi")["model"] == "all-minilm-l6-v2"
        assert embed(c, text="hi", model="text")["model"] == "qwen3-embedding-8b"


# --------------------------------------------------------------------------- tiny Qwen3-VL


@pytest.fixture(scope="module")
def vl_client(tmp_path_factory, tiny_qwen3_vl):
    root = tmp_path_factory.mktemp("vl")
    (root / "pictures").mkdir()
    (root / "pictures" / "red.png").write_bytes(png_bytes())
    with (
        ImageServer({"/red.png": png_bytes()}) as server,
        make_client(
            root,
            warmup="vl",
            model_paths={"vl": tiny_qwen3_vl},
            local_input_roots=[root / "pictures"],
            allow_private_urls=True,  # the image server is on loopback
        ) as c,
    ):
        wait_until(lambda: c.get("/health").json()["warm"])
        yield c, root, server.url("/red.png")


def test_every_image_spelling_gives_the_same_vector(vl_client):
    c, root, url = vl_client
    data = png_bytes()
    b64 = base64.b64encode(data).decode()
    file_id = c.post("/v1/files", files={"file": ("red.png", data, "image/png")}).json()["file_id"]
    vectors = {}
    for kind, image in {
        "base64": b64,
        "data URL": f"data:image/png;base64,{b64}",
        "URL": url,
        "file id": file_id,
        "local path": str(root / "pictures" / "red.png"),
    }.items():
        out = embed(c, model="vl", image=image)
        assert out["model"] == "qwen3-vl-embedding-2b", kind
        vectors[kind] = out["embedding"]
    for kind, vector in vectors.items():
        assert cosine(vector, vectors["base64"]) >= 0.9999, kind


def test_text_and_image_fuse_into_one_vector(vl_client):
    c, _, _ = vl_client
    b64 = base64.b64encode(png_bytes()).decode()
    text = embed(c, model="vl", text="a red picture")
    image = embed(c, model="vl", image=b64)
    both = embed(c, model="vl", text="a red picture", image=b64)
    assert both["dimension"] == text["dimension"] == image["dimension"] == 32
    assert both["usage"]["prompt_tokens"] > text["usage"]["prompt_tokens"]
    assert cosine(both["embedding"], text["embedding"]) < 0.9999
    assert cosine(both["embedding"], image["embedding"]) < 0.9999


def test_image_params_are_redacted_in_the_job_record(vl_client):
    c, _, _ = vl_client
    data_url = "data:image/png;base64," + base64.b64encode(png_bytes(color=(1, 2, 3))).decode()
    embed(c, model="vl", image=data_url, text="redact me")
    job = next(
        j for j in c.get("/v1/jobs").json()["data"] if j["params"].get("text") == "redact me"
    )
    assert job["params"]["image"] == f"<redacted: data:image/png, {len(data_url)} chars>"


@pytest.mark.parametrize(
    ("image", "fragment"),
    [
        ("data:image/png;base64,!!!", "not valid base64"),
        (base64.b64encode(b"definitely not a picture").decode(), "could not be decoded"),
        ("file_0123456789abcdef0123", "not in the Files API"),
        ("/etc/hostname", "outside KIAPI_LOCAL_INPUT_ROOTS"),
        ("just some words!", "must be base64"),
    ],
)
def test_bad_images_are_400_with_the_reason(vl_client, image, fragment):
    c, _, _ = vl_client
    before = len(c.get("/v1/jobs").json()["data"])
    r = c.post("/v1/embedding", json={"model": "vl", "image": image})
    assert r.status_code == 400 and fragment in r.json()["detail"], r.text
    assert len(c.get("/v1/jobs").json()["data"]) == before  # refused before a job was made


def test_loopback_image_urls_are_refused_by_default(tmp_path, tiny_qwen3_vl):
    with (
        ImageServer({"/red.png": png_bytes()}) as server,
        make_client(tmp_path, warmup="none", model_paths={"vl": tiny_qwen3_vl}) as c,
    ):
        r = c.post("/v1/embedding", json={"model": "vl", "image": server.url("/red.png")})
        assert r.status_code == 400, r.text
        assert "loopback" in r.json()["detail"]
        assert "KIAPI_ALLOW_PRIVATE_URLS" in r.json()["hint"]
        assert c.get("/v1/jobs").json()["data"] == []


def test_local_paths_are_refused_by_default(tmp_path, tiny_qwen3_vl):
    picture = tmp_path / "red.png"
    picture.write_bytes(png_bytes())
    with make_client(tmp_path, warmup="none", model_paths={"vl": tiny_qwen3_vl}) as c:
        r = c.post("/v1/embedding", json={"model": "vl", "image": str(picture)})
        assert r.status_code == 400 and "KIAPI_LOCAL_INPUT_ROOTS" in r.json()["detail"]
