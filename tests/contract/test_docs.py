"""Served documentation: each spec's JSON, Swagger UI and ReDoc pages, all assets local."""

import re

import pytest

from kiapi.specs import SPEC_SOURCES, load_served, operations

PAGES = [
    (f"{s.docs_prefix}/{page}", s) for s in SPEC_SOURCES for page in ("docs.html", "redoc.html")
]


@pytest.mark.parametrize("source", SPEC_SOURCES, ids=lambda s: s.name)
def test_openapi_json_is_the_served_31_document(client, source):
    r = client.get(f"{source.docs_prefix}/openapi.json")
    assert r.status_code == 200 and r.json()["openapi"] == "3.1.0"
    served, contract = r.json(), load_served(source.name)
    # the contract and our additions, plus the 403 of the token-less browser guard everywhere
    for method, path, op in operations(contract):
        responses = served["paths"][path][method]["responses"]
        assert set(responses) == {*op["responses"], "403"}
        assert "KIAPI_ALLOWED_HOSTS" in responses["403"]["description"]
        del served["paths"][path][method]["responses"]["403"]
    assert served == contract


def test_with_a_token_the_document_declares_401_not_403(settings):
    from pydantic import SecretStr
    from starlette.testclient import TestClient

    from kiapi.app import create_app

    settings = settings.model_copy(update={"auth_token": SecretStr("s3cret-docs")})
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as c:
        served = c.get("/v1/embedding/openapi.json").json()
    responses = served["paths"]["/v1/embedding"]["post"]["responses"]
    assert "401" in responses and "403" not in responses


def test_root_docs_alias(client):
    r = client.get("/docs")
    assert r.status_code == 200 and '"/openapi.json"' in r.text


@pytest.mark.parametrize(("path", "source"), PAGES, ids=[p for p, _ in PAGES])
def test_pages_use_only_local_assets(client, path, source):
    r = client.get(path)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert f"{source.docs_prefix}/openapi.json" in r.text
    urls = re.findall(r'(?:src|href)="([^"]+)"', r.text)
    assert urls and all(u.startswith("/docs-assets/") for u in urls), urls
    for url in urls:
        asset = client.get(url)
        assert asset.status_code == 200 and len(asset.content) > 500, url


def test_root_description_links_the_embedding_docs(client):
    description = client.get("/openapi.json").json()["info"]["description"]
    for link in ("v1/embedding/docs.html", "v1/embedding/redoc.html", "v1/embedding/openapi.json"):
        assert link in description
        assert client.get("/" + link).status_code == 200


def test_unknown_asset_is_404(client):
    assert client.get("/docs-assets/nope.js").status_code == 404
