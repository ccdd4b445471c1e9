import pytest

from kiapi.config import Settings, physical_memory_gb
from kiapi.runtime.catalog import default_registry
from kiapi.runtime.errors import BadRequest
from kiapi.runtime.registry import ModelSpec, Registry


def test_resolve_by_name_alias_repo_and_default():
    reg = default_registry()
    assert reg.resolve("embedding", None).name == "qwen3-embedding-8b"
    assert reg.resolve("embedding", "VL").name == "qwen3-vl-embedding-2b"
    assert (
        reg.resolve("embedding", "mlx-community/Qwen3-Embedding-8B-mxfp8").name
        == "qwen3-embedding-8b"
    )
    assert reg.resolve("embedding", "minilm").name == "all-minilm-l6-v2"


def test_unknown_model_names_valid_choices():
    with pytest.raises(BadRequest) as err:
        default_registry().resolve("embedding", "gpt-9")
    assert err.value.status == 400
    for name in ("qwen3-embedding-8b", "qwen3-vl-embedding-2b", "all-minilm-l6-v2", "minilm"):
        assert name in err.value.detail


def test_duplicate_names_are_refused():
    reg = Registry([ModelSpec(name="a", family="f", domain="d", repo="r/a", aliases=("x",))])
    with pytest.raises(ValueError, match="already used"):
        reg.register(ModelSpec(name="b", family="f", domain="d", repo="r/b", aliases=("x",)))


def test_capability_models_shape_and_default_override():
    entries = default_registry().capability_models("embedding", default_name="all-minilm-l6-v2")
    assert [e["default"] for e in entries] == [False, False, True]
    assert set(entries[0]) == {"name", "family", "domain", "aliases", "default", "features"}


def test_settings_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("KIAPI_MAX_QUEUE", "7")
    monkeypatch.setenv("KIAPI_FILES_ROOT", str(tmp_path))
    monkeypatch.setenv("KIAPI_MAX_UPLOAD_MB", "2")
    s = Settings(_env_file=None)
    assert s.max_queue == 7 and s.files_root == tmp_path and s.max_upload_bytes == 2 * 1024 * 1024
    assert 0 < s.memory_limit_gb <= physical_memory_gb()


def test_settings_reject_nonsense(monkeypatch):
    monkeypatch.setenv("KIAPI_MAX_QUEUE", "0")
    with pytest.raises(ValueError):
        Settings(_env_file=None)
