"""Schemathesis over every operation of every served spec (positive and negative data), and
stateful sequences over the Files and Jobs APIs, with KIAPI_AUTH_TOKEN set.

The served documents are the supplied 3.1 contract plus our additions and the bearer-token
scheme, fetched from the live server, so every status the server returns must be documented
there. Checks: no 5xx other than the documented 503/504, status codes, content types, headers
and bodies conform, and (``ignored_auth``) operations that declare the token refuse requests
without it. Every request the tests themselves make carries the token, so a 401 there fails.

Stateful: Schemathesis infers links from the specs (an upload's ``file_id`` feeds get,
download and delete; a listed job's ``id`` feeds get and delete) and walks random sequences of
them with Schemathesis' own engine (its CLI); jobs exist because the fixture runs a few
embeddings first.
"""

import re
import subprocess
import sys

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, seed, settings
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import negative_data_rejection

from kiapi.app import create_app
from kiapi.config import Settings
from tests.support import LiveServer, wait_until

MAX_EXAMPLES = 60
TOKEN = "fuzz-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SCHEMATHESIS_CLI = [sys.executable, "-m", "schemathesis.cli"]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    app = create_app(
        Settings(
            _env_file=None,
            files_root=root / "files",
            memory_limit_gb=4.0,
            max_upload_mb=1,
            auth_token=TOKEN,
            chat_max_tokens=2,  # every fuzzed completion is short
        )
    )
    with LiveServer(app) as server:
        wait_until(lambda: httpx.get(f"{server.url}/health").json()["warm"], timeout=120)
        for text in ("seed one", "seed two"):  # jobs for the stateful walks to find
            r = httpx.post(f"{server.url}/v1/embedding", json={"text": text}, headers=AUTH)
            assert r.status_code == 200, r.text
        yield server


# 503 (model not set up, budget, overload) and 504 (sync timeout) are documented answers, not
# server errors; 400 is the contract's answer to schema-valid but meaningless input (an empty
# item, an unknown model, an image for a text-only model).
CONFIG = SchemathesisConfig.from_dict(
    {
        "auth": {"openapi": {"bearerAuth": {"bearer": TOKEN}}},
        "checks": {
            "not_a_server_error": {"expected-statuses": ["2xx", "3xx", "4xx", "503", "504"]},
            "positive_data_acceptance": {
                "expected-statuses": ["2xx", "400", "404", "409", "413", "503", "504"]
            },
            # Schemathesis' list plus 413: a body over KIAPI_MAX_BODY_MB is refused before it is
            # parsed (a negative case with a string past a 1M-character maxLength can be 45 MB).
            "negative_data_rejection": {
                "expected-statuses": [
                    *("400", "401", "403", "404", "405", "406", "409", "413", "415"),
                    *("422", "428", "429"),
                ]
            },
        },
    }
)


@pytest.fixture(scope="module")
def common_schema(live):
    return schemathesis.openapi.from_url(f"{live.url}/openapi.json", config=CONFIG)


@pytest.fixture(scope="module")
def embedding_schema(live):
    return schemathesis.openapi.from_url(f"{live.url}/v1/embedding/openapi.json", config=CONFIG)


@pytest.fixture(scope="module")
def openai_schema(live):
    return schemathesis.openapi.from_url(f"{live.url}/openai/openapi.json", config=CONFIG)


@pytest.fixture(scope="module")
def chat_schema(live):
    return schemathesis.openapi.from_url(f"{live.url}/v1/chat/openapi.json", config=CONFIG)


@pytest.fixture(autouse=True)
def progress_counts_each_test_once(request):
    """Schemathesis adds every operation of a ``from_fixture`` test to pytest's collected
    count while the test runs, and reports a subtest per operation, but at the default
    verbosity it hides passing subtests, so they are never counted as done and the suite's
    progress ended short of 100% (93%). There the count is put back when the test ends;
    with -q or -v the subtests are shown and counted, and nothing is changed."""
    collected = request.session.testscollected
    yield
    if request.config.get_verbosity() == 0:
        request.session.testscollected = collected


common = schemathesis.pytest.from_fixture("common_schema")
chat = schemathesis.pytest.from_fixture("chat_schema")
embedding = schemathesis.pytest.from_fixture("embedding_schema")
openai_compatible = schemathesis.pytest.from_fixture("openai_schema")

FUZZ_SETTINGS = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
    database=None,
)


def assert_authenticated(case, response):
    """Positive cases carry the token, so a 401 means it was not sent or not accepted.
    (Negative cases may drop the security header on purpose: 401 is their right answer.)"""
    if case.meta is None or case.meta.generation.mode.is_positive:
        assert response.status_code != 401, (case.operation.label, response.request.headers)


@common.parametrize()
@FUZZ_SETTINGS
@seed(20261122)
def test_common_api(case):
    excluded = []
    if case.operation.method.upper() == "POST" and case.operation.path == "/v1/files":
        # Every multipart part is bytes: a "file" part that Schemathesis generated from a
        # non-string value is still a valid file, so "negative" uploads cannot be rejected.
        excluded.append(negative_data_rejection)
    response = case.call_and_validate(headers=AUTH, excluded_checks=excluded)
    assert_authenticated(case, response)


@embedding.parametrize()
@FUZZ_SETTINGS
@seed(20261122)
def test_embedding_api(case):
    response = case.call_and_validate(headers=AUTH)
    assert_authenticated(case, response)


@openai_compatible.parametrize()
@FUZZ_SETTINGS
@seed(20261122)
def test_openai_compatible_api(case):
    response = case.call_and_validate(headers=AUTH)
    assert_authenticated(case, response)


@chat.parametrize()
@FUZZ_SETTINGS
@seed(20261122)
def test_chat_api(case):
    response = case.call_and_validate(headers=AUTH)
    assert_authenticated(case, response)


STATEFUL_CONFIG = f"""
[auth.openapi.bearerAuth]
bearer = "{TOKEN}"
[checks.not_a_server_error]
expected-statuses = ["2xx", "3xx", "4xx", "503", "504"]
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "400", "404", "409", "413", "503", "504"]
"""


def test_files_and_jobs_stateful(live, tmp_path):
    """Schemathesis' own engine walks the inferred links (its pytest state machine cannot:
    Hypothesis takes bundles that follow the server's state for flaky data generation)."""
    config = tmp_path / "schemathesis.toml"
    config.write_text(STATEFUL_CONFIG)
    run = subprocess.run(
        [
            *SCHEMATHESIS_CLI,
            "--config-file",
            str(config),
            "run",
            f"{live.url}/openapi.json",
            "--phases=stateful",
            "--max-examples=40",
            "--seed=20261123",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = run.stdout + run.stderr
    assert run.returncode == 0, report
    links = re.search(r"API Links:\s+(\d+) covered / (\d+) selected", report)
    assert links, report
    covered, inferred = map(int, links.groups())
    # upload -> get / download / delete, list -> get / delete, for files and jobs
    assert inferred >= 10 and covered >= inferred - 3, report
    assert "No issues found" in report, report
