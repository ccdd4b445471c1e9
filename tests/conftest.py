from __future__ import annotations

import os

import pytest
from starlette.testclient import TestClient

from kiapi.app import create_app
from kiapi.config import Settings
from tests import tiny_models


@pytest.fixture
def settings(tmp_path) -> Settings:
    """Settings for tests that need no model at start-up (warmup off)."""
    return Settings(
        _env_file=None, files_root=tmp_path / "files", memory_limit_gb=4.0, warmup="none"
    )


@pytest.fixture
def client(settings):
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as c:
        yield c


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory):
    """A tiny random-weight Qwen3 embedding model folder (Hugging Face layout)."""
    return tiny_models.build_qwen3(tmp_path_factory.mktemp("tiny") / "qwen3")


@pytest.fixture(scope="session")
def tiny_qwen3_vl(tmp_path_factory):
    """A tiny random-weight Qwen3-VL embedding model folder (MLX conversion layout)."""
    pytest.importorskip("mlx_vlm", reason="the [vl] extra is not installed")
    return tiny_models.build_qwen3_vl(tmp_path_factory.mktemp("tiny") / "qwen3_vl")


@pytest.fixture(autouse=True, scope="session")
def no_user_catalog(tmp_path_factory):
    """Tests never read the developer's ~/.config/kiapi/models.toml: KIAPI_MODELS_FILE names a
    file that does not exist unless a test writes it (servers started as subprocesses too)."""
    saved = os.environ.get("KIAPI_MODELS_FILE")
    os.environ["KIAPI_MODELS_FILE"] = str(tmp_path_factory.mktemp("catalog") / "models.toml")
    yield
    if saved is None:
        os.environ.pop("KIAPI_MODELS_FILE", None)
    else:
        os.environ["KIAPI_MODELS_FILE"] = saved


@pytest.fixture(autouse=True, scope="session")
def empty_hf_cache(tmp_path_factory):
    """Tests see an empty Hugging Face cache, whatever this machine has downloaded: which
    models are set up must not depend on the developer's ~/.cache."""
    import huggingface_hub.constants

    cache = tmp_path_factory.mktemp("hf-hub")
    saved = huggingface_hub.constants.HF_HUB_CACHE
    huggingface_hub.constants.HF_HUB_CACHE = str(cache)
    os.environ["HF_HUB_CACHE"] = str(cache)  # for servers the tests start as subprocesses
    yield cache
    huggingface_hub.constants.HF_HUB_CACHE = saved
