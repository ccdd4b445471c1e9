"""The README's marked examples (``<!-- example: NAME -->`` before a fenced block), run for real
against a live server: the ``openai`` client and LangChain snippets with their printed output
checked against the comments in them, the Prometheus scrape config scraped as Prometheus
would (with and without its bearer-token option), and every ``kiapi`` command of the CLI
block run as a subprocess."""

import os
import re
import subprocess
import sys
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from kiapi.app import create_app
from kiapi.config import Settings
from tests import tiny_models
from tests.support import LiveServer, put_in_hf_cache, wait_until

README = Path(__file__).resolve().parents[2] / "README.md"
EXAMPLE = re.compile(r"<!-- example: ([\w-]+) -->\n```(\w+)\n(.*?)```", re.S)
DEFAULT_URL = "http://127.0.0.1:8000"
TOKEN = "readme-token"


def examples() -> dict[str, str]:
    return {m.group(1): m.group(3) for m in EXAMPLE.finditer(README.read_text(encoding="utf-8"))}


def test_every_marked_example_is_run_here():
    assert set(examples()) == {
        "openai-client",
        "openai-chat",
        "langchain",
        "prometheus",
        "models-cli",
        "common-sh",
        "embedding-sh",
        "own-models-sh",
        "rerank-client",
        "rerank-cohere",
    }


def start(tmp_path_factory, **extra) -> LiveServer:
    settings = Settings(
        _env_file=None,
        files_root=tmp_path_factory.mktemp("readme") / "files",
        memory_limit_gb=4.0,
        **extra,
    )
    return LiveServer(create_app(settings))


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    with start(tmp_path_factory) as server:
        wait_until(lambda: httpx.get(f"{server.url}/health").json()["warm"])
        yield server


def run_python(code: str, url: str) -> list[str]:
    out = StringIO()
    with redirect_stdout(out):
        exec(compile(code.replace(DEFAULT_URL, url), "README.md", "exec"), {})
    return out.getvalue().splitlines()


def expected_outputs(code: str) -> list[str]:
    """The comment after each ``print(...)`` line, less any ``(remark)``: what it prints."""
    comments = [line.split("#", 1)[1] for line in code.splitlines() if "print(" in line]
    return [re.sub(r"\s*\([^)]*\)$", "", comment.strip()) for comment in comments]


# Runs curl as written and, for the block's own curl commands (not those inside "$(...)",
# where BASH_SUBSHELL > 0), appends the HTTP status to $STATUSES.
CURL_WRAPPER = r"""
curl() {
  local depth=$BASH_SUBSHELL out
  out=$(command curl -w '\n%{http_code}' "$@") || return
  printf '%s\n' "${out%$'\n'*}"
  if [ "$depth" = 0 ]; then echo "${out##*$'\n'}" >> "$STATUSES"; fi
}
"""


def direct_curls(block: str) -> list[tuple[str, int | None]]:
    """The block's own curl commands, each with the status its next-line comment names
    (``# 404 {...}``, ``# 503 (...)``), or None for a 2xx."""
    lines = block.replace("\\\n", " ").splitlines()
    found = []
    for line, following in zip(lines, [*lines[1:], ""], strict=True):
        if line.startswith("curl "):
            named = re.match(r"# ([45]\d\d) ", following)
            found.append((line, int(named.group(1)) if named else None))
    return found


def png(path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (8, 8), (200, 30, 30)).save(path)


TINY = Path(__file__).resolve().parents[1] / "fixtures" / "tiny"


@pytest.fixture(scope="module")
def own_models(tmp_path_factory):
    """A server whose catalog file names the README's my-embedder and my-reranker (the tiny
    BERT embedder and cross-encoder of tests/fixtures/tiny)."""
    catalog = tmp_path_factory.mktemp("own-models") / "models.toml"
    catalog.write_text(
        f'[[models]]\nname = "my-embedder"\npath = "{TINY / "bert-embedding"}"\n\n'
        f'[[models]]\nname = "my-reranker"\npath = "{TINY / "bert-reranker"}"\n'
    )
    with start(tmp_path_factory, warmup="none", models_file=catalog) as server:
        yield server


@pytest.mark.parametrize("name", ["common-sh", "embedding-sh", "own-models-sh"])
def test_shell_examples_answer_what_they_say(live, own_models, name, tmp_path):
    """Each marked shell block runs as written (bash -e, in a folder holding its sample
    images); every curl it runs directly answers 2xx, or the status its comment names."""
    block = examples()[name]
    if name == "own-models-sh":
        live = own_models
    png(tmp_path / "photo.png")
    png(tmp_path / "cat.png")
    statuses = tmp_path / "statuses"
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", CURL_WRAPPER + block.replace(DEFAULT_URL, live.url)],
        cwd=tmp_path,
        env={**os.environ, "STATUSES": str(statuses)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    got = [int(code) for code in statuses.read_text().split()]
    wanted = direct_curls(block)
    assert len(got) == len(wanted), (got, wanted)
    for code, (line, want) in zip(got, wanted, strict=True):
        assert (200 <= code < 300) if want is None else code == want, (line, code, done.stdout)


@pytest.mark.parametrize("name", ["openai-client", "openai-chat", "langchain"])
def test_python_examples_print_what_they_say(live, name):
    code = examples()[name]
    assert run_python(code, live.url) == expected_outputs(code)


@pytest.mark.parametrize("name", ["rerank-client", "rerank-cohere"])
def test_the_rerank_clients_print_what_they_say(own_models, name):
    code = examples()[name]
    assert run_python(code, own_models.url) == expected_outputs(code)


def test_the_truncate_example_names_the_true_token_count(own_models):
    """The README's '# 400 ... the input has N tokens' line is what the server says."""
    block = examples()["own-models-sh"]
    said = re.search(r"the input has (\d+) tokens but the model's limit is (\d+)", block)
    r = httpx.post(
        f"{own_models.url}/v1/embeddings",
        json={"model": "my-embedder", "input": "long text " * 40, "truncate": False},
    )
    assert r.status_code == 400
    assert f"has {said.group(1)} tokens but the model's limit is {said.group(2)}" in r.text


def test_the_prometheus_scrape_config_scrapes(live, tmp_path_factory, tmp_path):
    config = yaml.safe_load(examples()["prometheus"])
    (job,) = config["scrape_configs"]
    (target,) = job["static_configs"][0]["targets"]
    assert f"http://{target}" == DEFAULT_URL
    scraped = httpx.get(f"{live.url}{job['metrics_path']}")
    assert scraped.status_code == 200
    names = {f.name for f in text_string_to_metric_families(scraped.text)}
    assert {"kiapi_http_requests", "kiapi_queue_length", "kiapi_resident_gb"} <= names

    # the commented-out token option, uncommented, against a server that requires the token
    commented = re.findall(r"^    # (.*)$", examples()["prometheus"], re.M)
    assert commented[0] == "with KIAPI_AUTH_TOKEN set:"
    option = yaml.safe_load("\n".join(commented[1:]))
    token_file = tmp_path / "kiapi-token"
    token_file.write_text(TOKEN + "\n")
    option["authorization"]["credentials_file"] = str(token_file)
    credentials = Path(option["authorization"]["credentials_file"]).read_text().strip()
    kind = option["authorization"].get("type", "Bearer")  # Prometheus' default type
    with start(tmp_path_factory, auth_token=TOKEN, warmup="none") as guarded:
        url = f"{guarded.url}{job['metrics_path']}"
        assert httpx.get(url).status_code == 401
        assert httpx.get(url, headers={"Authorization": f"{kind} {credentials}"}).status_code == 200


def test_the_cli_block_runs(live, empty_hf_cache, tmp_path):
    commands = [
        line.split("#", 1)[0].split()
        for line in examples()["models-cli"].splitlines()
        if line.strip()
    ]
    assert [c[:2] for c in commands] == [
        ["kiapi", "models"],
        ["kiapi", "models"],
        ["kiapi", "models"],
        ["kiapi", "doctor"],
    ]
    # the Qwen3 weights as a finished pull leaves them (a tiny model: nothing is downloaded here)
    repo = put_in_hf_cache(
        empty_hf_cache,
        "mlx-community/Qwen3-Embedding-8B-mxfp8",
        tiny_models.build_qwen3(tmp_path / "built"),
    )
    env = {**os.environ, "KIAPI_URL": live.url, "KIAPI_FILES_ROOT": str(tmp_path / "files")}
    outputs = []
    for command in commands:
        done = subprocess.run(
            [sys.executable, "-m", "kiapi", *command[1:]],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        outputs.append(done)
    listed, pulled, removed, doctor = outputs
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line for line in listed.stdout.splitlines()[1:]}
    assert re.search(r"\byes\s+0\.09 GB\s+yes\s+package$", rows["all-minilm-l6-v2"])
    assert re.search(r"\byes\s+0\.00 GB\s+no\s+hf-cache$", rows["qwen3-embedding-8b"])
    assert pulled.returncode == 0 and "already set up" in pulled.stdout
    assert removed.returncode == 0 and "removed qwen3-embedding-8b" in removed.stdout
    assert not repo.exists()
    assert "mlx" in doctor.stdout and "files root" in doctor.stdout, doctor.stdout
    assert doctor.returncode == 0, doctor.stdout
