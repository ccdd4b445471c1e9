"""Error shapes at the HTTP edge: 422 detail lists, 404/413/415 bodies, never a 500."""

import json

import pytest
from starlette.testclient import TestClient

from kiapi.app import create_app
from tests.support import assert_matches_schema


def assert_validation_error(response, loc):
    assert response.status_code == 422, response.text
    body = response.json()
    assert_matches_schema("common", "HTTPValidationError", body)
    assert any(e["loc"] == loc for e in body["detail"]), body


def test_path_parameter_violation_is_422(client):
    assert_validation_error(client.get("/v1/jobs/not-a-job"), ["path", "job_id"])
    assert_validation_error(client.delete("/v1/files/file_XYZ"), ["path", "file_id"])
    assert_validation_error(client.get("/v1/files/nope/download"), ["path", "file_id"])


def test_body_type_violation_is_422(client):
    r = client.post("/v1/embedding", json={"text": 5, "model": ["x"]})
    assert_validation_error(r, ["body", "text"])
    assert {tuple(e["loc"]) for e in r.json()["detail"]} == {("body", "text"), ("body", "model")}


def test_body_must_be_an_object(client):
    assert_validation_error(client.post("/v1/embedding", json=[1, 2]), ["body"])


@pytest.mark.parametrize(
    ("content", "headers"),
    [
        (b"{not json", {"content-type": "application/json"}),
        (b"\xff\xfe\x00garbage", {"content-type": "application/json"}),
        (b'{"text": "caf\xe9"}', {"content-type": "application/json; charset=utf-8"}),
        (b"", {"content-type": "application/json"}),
    ],
)
def test_malformed_json_is_422_never_500(client, content, headers):
    r = client.post("/v1/embedding", content=content, headers=headers)
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["type"] in ("json_invalid", "missing")


@pytest.mark.parametrize(
    ("content", "content_type"),
    [
        (b"garbage", "multipart/form-data; boundary=xyz"),
        (
            b"--xyz\r\nContent-Disposition: form-data\r\n\r\nno name\r\n--xyz--\r\n",
            "multipart/form-data; boundary=xyz",
        ),
        (
            b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\ntruncated',
            "multipart/form-data; boundary=xyz",
        ),
        (b"whatever", "multipart/form-data"),
    ],
)
def test_malformed_multipart_is_422_and_leaves_nothing(client, settings, content, content_type):
    r = client.post("/v1/files", content=content, headers={"content-type": content_type})
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"][0] == "body"
    assert client.get("/v1/files").json()["data"] == []
    assert not [p for p in settings.files_root.iterdir() if p.name.startswith(".tmp-")]


def test_upload_without_file_field_is_422(client):
    r = client.post("/v1/files", files={"other": ("a.txt", b"x", "text/plain")})
    assert_validation_error(r, ["body", "file"])


def test_file_part_without_filename_is_still_the_file(client):
    body = b'--b\r\nContent-Disposition: form-data; name="file"\r\n\r\nraw bytes\r\n--b--\r\n'
    r = client.post(
        "/v1/files", content=body, headers={"content-type": "multipart/form-data; boundary=b"}
    )
    assert r.status_code == 200, r.text
    assert (r.json()["filename"], r.json()["size"]) == ("upload.bin", 9)


def test_wrong_content_type_is_415(client):
    r = client.post("/v1/files", content=b"x", headers={"content-type": "text/plain"})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["detail"]


def test_unknown_ids_are_404_with_detail(client):
    for method, path in [
        ("get", "/v1/files/file_0123456789abcdef"),
        ("delete", "/v1/files/file_0123456789abcdef"),
        ("get", "/v1/files/file_0123456789abcdef/download"),
        ("get", "/v1/jobs/job_0123456789abcdef"),
        ("delete", "/v1/jobs/job_0123456789abcdef"),
    ]:
        r = client.request(method, path)
        assert r.status_code == 404, (method, path)
        assert_matches_schema("common", "ErrorResponse", r.json())
        assert "0123456789abcdef" in r.json()["detail"]


def test_unknown_route_and_method(client):
    assert client.get("/v2/nothing").json() == {"detail": "Not Found"}
    r = client.put("/v1/jobs")
    assert r.status_code == 405


def small_cap_client(tmp_path):
    from kiapi.config import Settings

    s = Settings(_env_file=None, files_root=tmp_path / "f", max_upload_mb=1 / 1024)  # 1 KiB
    return TestClient(create_app(s), base_url="http://127.0.0.1"), s


def test_upload_over_cap_is_413_by_content_length(tmp_path):
    client, s = small_cap_client(tmp_path)
    with client:
        r = client.post(
            "/v1/files",
            files={"file": ("big.bin", b"x" * (2 * 1024 * 1024), "application/octet-stream")},
        )
        assert r.status_code == 413 and "KIAPI_MAX_UPLOAD_MB" in r.json()["hint"]
        assert client.get("/v1/files").json()["data"] == []
    assert list(s.files_root.iterdir()) == []


def test_chunked_upload_over_cap_is_413_while_streaming(tmp_path):
    client, s = small_cap_client(tmp_path)
    body = (
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="x"\r\n\r\n'
        + b"y" * 4096
        + b"\r\n--b--\r\n"
    )

    def chunks():
        for i in range(0, len(body), 512):
            yield body[i : i + 512]

    with client:
        r = client.post(
            "/v1/files",
            content=chunks(),
            headers={"content-type": "multipart/form-data; boundary=b"},
        )
        assert r.status_code == 413, r.text
        assert client.get("/v1/files").json()["data"] == []
    assert list(s.files_root.iterdir()) == []


def test_chunked_upload_under_cap_is_stored(client):
    body = (
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.bin"\r\n'
        b"Content-Type: application/x-thing\r\n\r\n" + bytes(range(256)) + b"\r\n--b--\r\n"
    )
    r = client.post(
        "/v1/files",
        content=iter([body[:100], body[100:]]),
        headers={"content-type": "multipart/form-data; boundary=b"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["size"] == 256 and r.json()["content_type"] == "application/x-thing"
    download = client.get(f"/v1/files/{r.json()['file_id']}/download")
    assert download.content == bytes(range(256))


@pytest.fixture
def small_body_client(tmp_path):
    from kiapi.config import Settings

    s = Settings(_env_file=None, files_root=tmp_path / "f", warmup="none", max_body_mb=1 / 1024)
    with TestClient(create_app(s), base_url="http://127.0.0.1") as c:
        yield c


def json_chunks(text: str, size: int = 100):
    body = b'{"text": ' + json.dumps(text).encode() + b"}"
    return (body[i : i + size] for i in range(0, len(body), size))


def test_json_body_over_the_limit_is_413_by_content_length(small_body_client):
    r = small_body_client.post("/v1/embedding", json={"text": "a" * 2000})
    assert r.status_code == 413, r.text
    assert_matches_schema("embedding", "ErrorResponse", r.json())
    assert "KIAPI_MAX_BODY_MB" in r.json()["hint"]


def test_chunked_json_body_over_the_limit_is_413_while_streaming(small_body_client):
    r = small_body_client.post(
        "/v1/embedding",
        content=json_chunks("a" * 4000),
        headers={"content-type": "application/json"},
    )
    assert r.request.headers.get("transfer-encoding") == "chunked"
    assert r.status_code == 413, r.text


def test_chunked_json_body_under_the_limit_is_read_and_validated(small_body_client):
    # Connexion alone takes a body without Content-Length for no body ("RequestBody is
    # required"); the limit guard hands it on with its length, so it is validated as sent.
    r = small_body_client.post(
        "/v1/embedding",
        content=iter([b'{"text": ', b'5, "model": [1]}']),
        headers={"content-type": "application/json"},
    )
    assert r.request.headers.get("transfer-encoding") == "chunked"
    assert_validation_error(r, ["body", "text"])


def test_uploads_are_governed_by_the_upload_cap_not_the_body_limit(small_body_client):
    r = small_body_client.post("/v1/files", files={"file": ("big.bin", b"z" * 8192)})
    assert r.status_code == 200, r.text
    assert r.json()["size"] == 8192


def test_deeply_nested_json_is_422_not_a_crash(client):
    body = '{"text": "a", "x": ' + "[" * 50_000 + "]" * 50_000 + "}"
    r = client.post("/v1/embedding", content=body, headers={"content-type": "application/json"})
    assert_validation_error(r, ["body"])
    assert "nested too deeply" in r.json()["detail"][0]["msg"]


def test_lone_surrogates_are_422_where_they_are(client):
    r = client.post(
        "/v1/embedding",
        content=b'{"text": "ok \\ud800 then", "extra": {"\\udfff": 1}}',
        headers={"content-type": "application/json"},
    )
    assert_validation_error(r, ["body", "text"])
    assert {tuple(e["loc"]) for e in r.json()["detail"]} == {("body", "text"), ("body", "extra")}
    assert {e["type"] for e in r.json()["detail"]} == {"string_unicode"}


def test_surrogate_pairs_are_just_text(client):
    r = client.post(
        "/v1/embedding",
        content=b'{"text": "\\ud83d\\ude00 \\\\ud800", "model": "no-such-model"}',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400 and "no-such-model" in r.json()["detail"], r.text  # validated
