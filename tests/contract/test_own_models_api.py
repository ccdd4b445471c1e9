"""Bring-your-own models over HTTP: a catalog file (KIAPI_MODELS_FILE) naming tiny models of
three architectures in the sentence-transformers layout, served next to the built-in ones;
truncation and named prompts on both embedding endpoints, checked against the vectors
sentence-transformers computed on torch (tests/fixtures/tiny/references.json)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from starlette.testclient import TestClient

from kiapi.app import create_app
from kiapi.config import Settings
from tests.support import assert_matches_schema

TINY = Path(__file__).resolve().parents[1] / "fixtures" / "tiny"
REFERENCES = json.loads((TINY / "references.json").read_text())


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    root = tmp_path_factory.mktemp("own")
    catalog = root / "models.toml"
    catalog.write_text(
        f'[[models]]\nname = "tiny-bert"\npath = "{TINY / "bert-embedding"}"\n\n'
        f'[[models]]\nname = "tiny-xlmr"\npath = "{TINY / "xlm-roberta-embedding"}"\n\n'
        '[[models]]\nname = "broken"\npath = "/nowhere"\n'
    )
    settings = Settings(
        _env_file=None, files_root=root / "files", memory_limit_gb=4.0, warmup="none",
        models_file=catalog,
    )  # fmt: skip
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as c:
        yield c


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_catalog_models_are_listed_and_the_bad_entry_is_not(client):
    names = [m["name"] for m in client.get("/v1/embedding/models").json()]
    assert {"tiny-bert", "tiny-xlmr", "all-minilm-l6-v2"} <= set(names)
    assert "broken" not in names
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert "tiny-bert" in ids and "tiny-xlmr" in ids


def test_prompt_names_and_usage_on_the_contract_endpoint(client):
    ref = REFERENCES["bert-embedding"]
    r = client.post(
        "/v1/embedding",
        json={"model": "tiny-bert", "text": ref["texts"][1], "prompt_name": "query"},
    )
    assert r.status_code == 200, r.text
    assert_matches_schema("embedding", "EmbeddingResponse", r.json())
    assert cosine(r.json()["embedding"], ref["prompt:query"][1]) >= 0.9999
    assert r.json()["usage"]["prompt_tokens"] > ref["tokens"][1]  # the prompt's tokens count
    r = client.post(
        "/v1/embedding", json={"model": "tiny-bert", "text": "x", "prompt_name": "nope"}
    )
    assert r.status_code == 400 and "its prompts: query, document" in r.json()["detail"]


def test_truncate_false_is_a_400_with_the_count_and_the_limit(client):
    long_text = REFERENCES["bert-embedding"]["texts"][2]
    r = client.post(
        "/v1/embedding", json={"model": "tiny-bert", "text": long_text, "truncate": False}
    )
    assert r.status_code == 400
    assert "tokens but the model's limit is 24" in r.json()["detail"]
    r = client.post("/v1/embedding", json={"model": "tiny-bert", "text": long_text})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 24
    r = client.post(
        "/v1/embeddings",
        json={"model": "tiny-bert", "input": ["short", long_text], "truncate": False},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "truncate"


def test_openai_endpoint_honours_a_pipeline_without_normalize(client):
    ref = REFERENCES["xlm-roberta-embedding"]
    r = client.post("/v1/embeddings", json={"model": "tiny-xlmr", "input": ref["texts"]})
    assert r.status_code == 200, r.text
    for item, expected in zip(r.json()["data"], ref["plain"], strict=True):
        np.testing.assert_allclose(item["embedding"], expected, atol=2e-4)  # not unit length
    assert abs(np.linalg.norm(ref["plain"][0]) - 1) > 0.1
    r = client.post("/v1/embedding", json={"model": "tiny-xlmr", "text": ref["texts"][0]})
    assert abs(np.linalg.norm(r.json()["embedding"]) - 1) < 1e-5  # the contract: L2-normalized
    bert = REFERENCES["bert-embedding"]
    r = client.post(
        "/v1/embeddings",
        json={"model": "tiny-bert", "input": bert["texts"][:2], "prompt_name": "document"},
    )
    for item, expected in zip(r.json()["data"], bert["prompt:document"][:2], strict=True):
        assert cosine(item["embedding"], expected) >= 0.9999
