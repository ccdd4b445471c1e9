"""POST /v1/rerank over HTTP: tiny BERT and XLM-RoBERTa cross-encoders written by
transformers (tests/fixtures/tiny), added through a catalog file, scored against
sentence-transformers' CrossEncoder on torch (references.json: within 1e-4)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from kiapi.app import create_app
from kiapi.config import Settings
from tests.support import assert_matches_schema

TINY = Path(__file__).resolve().parents[1] / "fixtures" / "tiny"
REFERENCES = json.loads((TINY / "references.json").read_text())
MODELS = {"rr-bert": "bert-reranker", "rr-xlmr": "xlm-roberta-reranker"}


def make_client(root: Path, catalog_text: str, **overrides) -> TestClient:
    catalog = root / "models.toml"
    catalog.write_text(catalog_text)
    settings = Settings(
        _env_file=None, files_root=root / "files", memory_limit_gb=4.0, warmup="none",
        models_file=catalog, **overrides,
    )  # fmt: skip
    return TestClient(create_app(settings), base_url="http://127.0.0.1")


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    text = "".join(f'[[models]]\nname = "{n}"\npath = "{TINY / f}"\n\n' for n, f in MODELS.items())
    with make_client(tmp_path_factory.mktemp("rerank"), text, rerank_max_documents=8) as c:
        yield c


@pytest.mark.parametrize("name", MODELS)
def test_scores_equal_sentence_transformers_and_come_best_first(client, name):
    ref = REFERENCES[MODELS[name]]
    r = client.post(
        "/v1/rerank", json={"model": name, "query": ref["query"], "documents": ref["documents"]}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert_matches_schema("rerank", "RerankResponse", body)
    assert body["model"] == name and body["id"] == r.headers["X-Kiapi-Job-Id"]
    scores = [x["relevance_score"] for x in body["results"]]
    assert scores == sorted(scores, reverse=True)
    assert sorted(x["index"] for x in body["results"]) == list(range(len(ref["documents"])))
    for result in body["results"]:
        assert abs(result["relevance_score"] - ref["scores"][result["index"]]) <= 1e-4
        assert "document" not in result
    assert body["usage"]["prompt_tokens"] > 0
    job = client.get(f"/v1/jobs/{body['id']}").json()
    assert job["type"] == "rerank" and job["status"] == "succeeded"
    assert ref["query"] not in json.dumps(job)  # the record keeps sizes, never the texts


def test_top_n_and_return_documents(client):
    ref = REFERENCES["bert-reranker"]
    best = max(range(len(ref["scores"])), key=lambda i: ref["scores"][i])
    r = client.post(
        "/v1/rerank",
        json={"query": ref["query"], "documents": ref["documents"], "top_n": 1,
              "return_documents": True},
    )  # fmt: skip
    assert r.status_code == 200  # the first catalog entry is the default rerank model
    (result,) = r.json()["results"]
    assert result["index"] == best and result["document"] == {"text": ref["documents"][best]}


def test_limits_and_bad_input_are_refused_before_any_job(client):
    before = len(client.get("/v1/jobs").json()["data"])
    cases = [
        ({"query": "q", "documents": ["d"] * 9}, 413, "at most 8"),
        ({"query": "q", "documents": ["x" * 100_001]}, 413, "documents[0] has 100001"),
        ({"query": " ", "documents": ["d"]}, 400, "query is empty"),
        ({"query": "q", "documents": ["d"], "model": "nope"}, 400, "unknown rerank model"),
        ({"query": "q", "documents": []}, 422, None),
        ({"query": "q", "documents": ["d"], "top_n": 0}, 422, None),
    ]
    for body, status, text in cases:
        r = client.post("/v1/rerank", json=body)
        assert r.status_code == status, (body, r.text)
        if text:
            assert text in r.json()["detail"]
    assert len(client.get("/v1/jobs").json()["data"]) == before


def test_without_a_reranker_the_answer_is_503_with_how_to_add_one(tmp_path):
    with make_client(tmp_path, "") as c:
        r = c.post("/v1/rerank", json={"query": "q", "documents": ["d"]})
        assert r.status_code == 503 and "kiapi models add" in r.json()["hint"]
        assert c.get("/v1/rerank/models").json() == []
        assert c.get("/v1/rerank/docs.html").status_code == 200
