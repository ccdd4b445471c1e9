"""KIAPI_AUTH_TOKEN: every route of every served spec refuses anonymous requests with 401 and a
Bearer challenge, unless it is on the explicit public list below; the token lets them through."""

import re

import pytest
from jsonschema import Draft202012Validator
from starlette.testclient import TestClient

from kiapi.app import create_app
from kiapi.config import Settings
from kiapi.http.docs import doc_routes
from kiapi.specs import SPEC_SOURCES, operations

TOKEN = "correct horse battery staple"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

# Anyone may read these: liveness for probes, the specs and their documentation pages.
PUBLIC = {
    "/health",
    "/openapi.json",
    "/docs",
    "/docs.html",
    "/redoc.html",
    "/v1/embedding/openapi.json",
    "/v1/embedding/docs",
    "/v1/embedding/docs.html",
    "/v1/embedding/redoc.html",
    "/v1/rerank/openapi.json",
    "/v1/rerank/docs",
    "/v1/rerank/docs.html",
    "/v1/rerank/redoc.html",
    "/v1/chat/openapi.json",
    "/v1/chat/docs",
    "/v1/chat/docs.html",
    "/v1/chat/redoc.html",
    "/openai/openapi.json",
    "/openai/docs",
    "/openai/docs.html",
    "/openai/redoc.html",
    "/docs-assets/{name}",
}
SAMPLE_PARAMS = {
    "file_id": "file_" + "0" * 24,
    "job_id": "job_" + "0" * 24,
    "name": "x.css",
    "model": "minilm",
}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    settings = Settings(
        _env_file=None,
        files_root=tmp_path_factory.mktemp("auth") / "files",
        memory_limit_gb=4.0,
        warmup="none",
        auth_token=TOKEN,
    )
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as c:
        yield c


def served_routes(client):
    """``(method, path)`` of every operation in the specs the server serves, fetched from it."""
    routes = []
    for source in SPEC_SOURCES:
        doc = client.get(f"{source.docs_prefix}/openapi.json").json()
        routes += [(method.upper(), path) for method, path, _op in operations(doc)]
    return routes


def concrete(path: str) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: SAMPLE_PARAMS[m.group(1)], path)


def assert_challenge(response, error=None):
    assert response.status_code == 401, (response.request.url, response.text)
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith("Bearer "), challenge
    assert (f'error="{error}"' in challenge) == (error is not None), challenge
    body = response.json()  # kiapi's shape, or OpenAI's on the OpenAI-compatible paths
    assert body["detail"] if "detail" in body else body["error"]["type"] == "authentication_error"


def test_every_route_is_refused_anonymously_or_explicitly_public(client):
    routes = served_routes(client) + [("GET", path) for path, _view in doc_routes()]
    assert len(routes) > 12
    for method, path in routes:
        response = client.request(method, concrete(path))
        if path in PUBLIC:
            assert response.status_code != 401, (method, path)
        else:
            assert_challenge(response)


def test_the_public_list_is_not_wider_than_needed(client):
    doc_paths = {path for path, _view in doc_routes()}
    assert PUBLIC - doc_paths == {"/health"}


def test_the_token_lets_every_route_through(client):
    for method, path in served_routes(client):
        response = client.request(method, concrete(path), headers=AUTH)
        assert response.status_code != 401, (method, path, response.text)


@pytest.mark.parametrize(
    ("header", "error"),
    [
        (f"Bearer {TOKEN}x", "invalid_token"),
        (f"Bearer {TOKEN[:-1]}", "invalid_token"),
        (f"bearer {TOKEN.upper()}", "invalid_token"),
        ("Bearer ", None),
        (f"Basic {TOKEN}", None),
        (TOKEN, None),
    ],
)
def test_wrong_or_malformed_credentials_are_401(client, header, error):
    assert_challenge(client.get("/v1/files", headers={"Authorization": header}), error)


def test_scheme_name_is_case_insensitive(client):
    r = client.get("/v1/jobs", headers={"Authorization": f"bearer {TOKEN}"})
    assert r.status_code == 200, r.text


def test_anonymous_bodies_are_refused_before_they_are_read(client):
    r = client.post("/v1/embedding", content=b"{not json", headers={"content-type": "text/plain"})
    assert_challenge(r)  # not 415 or 422: nothing about the request is looked at
    r = client.post("/v1/files", files={"file": ("a.txt", b"hello")})
    assert_challenge(r)
    assert client.get("/v1/files", headers=AUTH).json()["data"] == []


def test_served_specs_declare_the_scheme_and_every_401(client):
    for source in SPEC_SOURCES:
        doc = client.get(f"{source.docs_prefix}/openapi.json").json()
        scheme = doc["components"]["securitySchemes"]["bearerAuth"]
        assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
        for method, path, op in operations(doc):
            if path in PUBLIC:
                assert op["security"] == [], (method, path)
                assert "401" not in op["responses"]
            else:
                assert op["security"] == [{"bearerAuth": []}], (method, path)
                assert "WWW-Authenticate" in op["responses"]["401"]["headers"]


def test_401_bodies_match_the_documented_schema(client):
    doc = client.get("/openapi.json").json()
    schema = doc["paths"]["/v1/files"]["get"]["responses"]["401"]["content"]["application/json"]
    validator = Draft202012Validator({**schema["schema"], "components": doc["components"]})
    validator.validate(client.get("/v1/files").json())


def test_without_a_token_nothing_is_secured(tmp_path):
    settings = Settings(_env_file=None, files_root=tmp_path / "files", warmup="none")
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as c:
        assert c.get("/v1/files").status_code == 200
        doc = c.get("/openapi.json").json()
        assert "securitySchemes" not in doc.get("components", {})
        assert all("401" not in op["responses"] for _m, _p, op in operations(doc))


def test_an_empty_token_setting_means_no_auth(tmp_path):
    settings = Settings(_env_file=None, files_root=tmp_path / "f", warmup="none", auth_token="")
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as c:
        assert c.get("/v1/files").status_code == 200
