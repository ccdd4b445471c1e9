"""The OpenAI-compatible surface, driven by the real ``openai`` client against a live server
(uvicorn on loopback, the bundled MiniLM and a tiny random-weight Qwen3 through the same
loader users get): the same vectors as ``/v1/embedding``, OpenAI's envelope and errors."""

import base64

import httpx
import numpy as np
import openai
import pytest

from kiapi.config import Settings
from tests.support import assert_matches_schema, serving

TEXTS = ["The food was delicious.", "今日の天気は晴れです", "a", "The waiter was friendly " * 20]


@pytest.fixture(scope="module")
def live(tmp_path_factory, tiny_qwen3):
    settings = Settings(
        _env_file=None,
        files_root=tmp_path_factory.mktemp("openai") / "files",
        memory_limit_gb=4.0,
        model_paths={"qwen3-embedding-8b": tiny_qwen3},
        warmup="all-minilm-l6-v2",
        max_queue=4,  # small, so that a long input list must go through in waves
    )
    with serving(settings) as (server, runtime):
        yield server, runtime


@pytest.fixture
def client(live):
    server, _ = live
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def native(server, text, model):
    r = httpx.post(f"{server.url}/v1/embedding", json={"text": text, "model": model}, timeout=60)
    assert r.status_code == 200, r.text
    return np.asarray(r.json()["embedding"], dtype=np.float32)


@pytest.mark.parametrize("encoding_format", [None, "float"], ids=["sdk-default-base64", "float"])
def test_vectors_equal_the_native_endpoint(live, client, encoding_format):
    """Left out, the SDK asks for base64 and decodes it itself."""
    server, _ = live
    extra = {"encoding_format": encoding_format} if encoding_format else {}
    out = client.embeddings.create(model="all-minilm-l6-v2", input=TEXTS, **extra)
    assert out.object == "list"
    assert out.model == "all-minilm-l6-v2"
    assert [d.index for d in out.data] == list(range(len(TEXTS)))
    assert out.usage.prompt_tokens == out.usage.total_tokens > len(TEXTS)
    for text, item in zip(TEXTS, out.data, strict=True):
        got = np.asarray(item.embedding, dtype=np.float32)
        want = native(server, text, "minilm")
        assert got.shape == (384,)
        # batched with its neighbours here, alone there: the same vector up to float rounding
        np.testing.assert_allclose(got, want, atol=2e-6)


def test_a_single_string_alone_gives_the_identical_vector(live, client):
    server, _ = live
    out = client.embeddings.create(model="minilm", input="hello world", encoding_format="float")
    assert len(out.data) == 1
    assert np.array_equal(
        np.asarray(out.data[0].embedding, np.float32), native(server, "hello world", "minilm")
    )


def test_base64_is_little_endian_float32(live):
    server, _ = live
    r = httpx.post(
        f"{server.url}/v1/embeddings",
        json={"input": "hello world", "model": "minilm", "encoding_format": "base64"},
        timeout=60,
    )
    assert r.status_code == 200
    assert_matches_schema("openai", "CreateEmbeddingResponse", r.json())
    raw = base64.b64decode(r.json()["data"][0]["embedding"])
    assert np.array_equal(np.frombuffer(raw, dtype="<f4"), native(server, "hello world", "minilm"))


def test_each_input_is_a_job_named_in_the_header(live):
    server, runtime = live
    texts = [f"job number {i}" for i in range(11)]  # more than max_queue: waves of 2
    r = httpx.post(
        f"{server.url}/v1/embeddings", json={"input": texts, "model": "minilm"}, timeout=60
    )
    assert r.status_code == 200, r.text
    ids = r.headers["X-Kiapi-Job-Id"].split(",")  # the first 8, and the count
    assert len(ids) == len(set(ids)) == 8 and r.headers["X-Kiapi-Job-Count"] == str(len(texts))
    for job_id, text in zip(ids, texts, strict=False):
        job = runtime.jobs.snapshot(job_id)
        assert job["type"] == "embedding" and job["status"] == "succeeded"
        assert job["params"]["text"] == text


def test_dimensions_truncate_and_renormalize_where_the_model_supports_it(live, client):
    server, _ = live
    full = native(server, "matryoshka", "qwen3-embedding-8b")
    out = client.embeddings.create(
        model="qwen3-embedding-8b", input="matryoshka", dimensions=32, encoding_format="float"
    )
    got = np.asarray(out.data[0].embedding, dtype=np.float32)
    assert got.shape == (32,)
    np.testing.assert_allclose(got, full[:32] / np.linalg.norm(full[:32]), atol=1e-6)
    assert abs(float(np.linalg.norm(got)) - 1.0) < 1e-5


def test_dimensions_are_refused_where_the_model_cannot_truncate(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model="minilm", input="x", dimensions=64)
    assert err.value.body["param"] == "dimensions"
    assert "does not support 'dimensions'" in err.value.body["message"]


def test_dimensions_beyond_the_vector_are_a_400(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model="qwen3-embedding-8b", input="x", dimensions=100000)
    assert err.value.body["param"] == "dimensions"


def test_errors_take_openai_envelope(live, client):
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model="text-embedding-3-small", input="x")
    assert err.value.code == "model_not_found"
    assert err.value.body["type"] == "invalid_request_error"
    assert err.value.body["param"] == "model"
    assert "all-minilm-l6-v2" in err.value.body["message"]  # the valid choices

    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model="minilm", input=[[1, 2, 3]])
    assert "check_embedding_ctx_length=False" in err.value.body["hint"]

    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model="minilm", input=["fine", ""])
    assert err.value.body["message"].startswith("input[1] is an empty string")

    server, _ = live
    r = httpx.post(f"{server.url}/v1/embeddings", json={"input": 7}, timeout=10)
    assert r.status_code == 422
    assert_matches_schema("openai", "OpenAIErrorResponse", r.json())
    assert r.json()["error"]["param"] == "input"
    r = httpx.post(
        f"{server.url}/v1/embeddings",
        content=b"{",
        headers={"content-type": "application/json"},
        timeout=10,
    )
    assert r.status_code in (400, 422)
    assert "error" in r.json()
    r = httpx.get(f"{server.url}/v1/embeddings", timeout=10)
    assert r.status_code == 405
    assert r.json()["error"]["code"] == "method_not_allowed"


def test_models_list_and_retrieve(client):
    listed = client.models.list()
    ids = [m.id for m in listed.data]
    # set up here (the VL model is not), embedding models first, then chat models
    assert ids == ["qwen3-embedding-8b", "all-minilm-l6-v2", "smollm2-135m-instruct"]
    minilm = client.models.retrieve("minilm")  # by alias
    assert minilm.id == "all-minilm-l6-v2"
    assert minilm.object == "model" and minilm.created > 0
    assert minilm.owned_by == "sentence-transformers"
    assert client.models.retrieve("qwen3-embedding-8b").dimensions_min == 32
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("qwen3-vl-embedding-2b")


def test_the_langchain_client_embeds_through_kiapi(live):
    langchain_openai = pytest.importorskip("langchain_openai")
    server, _ = live
    embeddings = langchain_openai.OpenAIEmbeddings(
        model="all-minilm-l6-v2",
        base_url=f"{server.url}/v1",
        api_key="unused",
        check_embedding_ctx_length=False,  # send texts, not OpenAI tokenizer ids
    )
    docs = embeddings.embed_documents(["first document", "second document"])
    query = embeddings.embed_query("first document")
    assert len(docs) == 2 and len(docs[0]) == 384
    np.testing.assert_allclose(docs[0], query, atol=2e-6)
    np.testing.assert_allclose(query, native(server, "first document", "minilm"), atol=2e-6)
