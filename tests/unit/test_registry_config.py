from pathlib import Path

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


def test_capability_models_shape_and_effective_default():
    reg = default_registry()
    assert [e["default"] for e in reg.capability_models("embedding")] == [True, False, False]
    reg.choose_default("embedding", "minilm")
    entries = reg.capability_models("embedding")
    assert [e["default"] for e in entries] == [False, False, True]
    assert set(entries[0]) == {"name", "family", "domain", "aliases", "default", "features"}


def spec(name, *, set_up, default=False):
    engine = "mlx-lm" if set_up else None  # no source: set up means it names an engine
    return ModelSpec(
        name=name, family="f", domain="f", repo=f"r/{name}", default=default, engine=engine
    )


def test_default_falls_back_to_the_first_set_up_model_in_catalog_order():
    reg = Registry(
        [
            spec("a", set_up=False),
            spec("b", set_up=False, default=True),
            spec("c", set_up=True),
            spec("d", set_up=True),
        ]
    )
    note = reg.choose_default("f")
    assert reg.default("f").name == "c" and reg.resolve("f", None).name == "c"
    assert "'b' is not set up" in note and "'c'" in note and "KIAPI_F_DEFAULT_MODEL" in note


def test_default_override_and_nothing_set_up():
    reg = Registry([spec("a", set_up=True, default=True), spec("b", set_up=True)])
    assert reg.choose_default("f", "r/b") is None and reg.default("f").name == "b"
    nothing = Registry([spec("a", set_up=False, default=True), spec("b", set_up=False)])
    assert nothing.choose_default("f") is None and nothing.default("f").name == "a"
    with pytest.raises(ValueError, match="KIAPI_F_DEFAULT_MODEL.*unknown f model 'zzz'"):
        reg.choose_default("f", "zzz")


def test_settings_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("KIAPI_MAX_QUEUE", "7")
    monkeypatch.setenv("KIAPI_FILES_ROOT", str(tmp_path))
    monkeypatch.setenv("KIAPI_MAX_UPLOAD_MB", "2")
    s = Settings(_env_file=None)
    assert s.max_queue == 7 and s.files_root == tmp_path and s.max_upload_bytes == 2 * 1024 * 1024
    assert 0 < s.memory_limit_gb <= physical_memory_gb()


def test_settings_for_models_and_inputs(monkeypatch, tmp_path):
    monkeypatch.setenv("KIAPI_MODEL_PATHS", '{"minilm": "/models/minilm"}')
    monkeypatch.setenv("KIAPI_LOCAL_INPUT_ROOTS", f"{tmp_path}/a:{tmp_path}/b")
    monkeypatch.setenv("KIAPI_EMBEDDING_DEFAULT_MODEL", "minilm")
    monkeypatch.setenv("KIAPI_WARMUP", " minilm , vl ")
    s = Settings(_env_file=None)
    assert s.model_paths == {"minilm": Path("/models/minilm")}
    assert s.local_input_roots == [tmp_path / "a", tmp_path / "b"]
    assert s.embedding_default_model == "minilm" and s.warmup_names() == ["minilm", "vl"]
    monkeypatch.setenv("KIAPI_LOCAL_INPUT_ROOTS", f'["{tmp_path}/c"]')
    monkeypatch.setenv("KIAPI_WARMUP", "none")
    s = Settings(_env_file=None)
    assert s.local_input_roots == [tmp_path / "c"] and s.warmup_names() == []
    monkeypatch.delenv("KIAPI_WARMUP")
    assert Settings(_env_file=None).warmup_names() is None  # the effective default


def test_settings_reject_nonsense(monkeypatch):
    monkeypatch.setenv("KIAPI_MAX_QUEUE", "0")
    with pytest.raises(ValueError):
        Settings(_env_file=None)


def test_warmup_setting_is_resolved_at_start_up(tmp_path):
    from kiapi.runtime.core import Runtime

    def runtime(**overrides):
        return Runtime(Settings(_env_file=None, files_root=tmp_path, **overrides))

    # each capability's effective default that is set up
    assert [s.name for s in runtime()._warmup] == ["all-minilm-l6-v2", "smollm2-135m-instruct"]
    assert runtime(warmup="none")._warmup == []
    assert [s.name for s in runtime(warmup="minilm, vl")._warmup] == [
        "all-minilm-l6-v2",
        "qwen3-vl-embedding-2b",
    ]
    with pytest.raises(ValueError, match="KIAPI_WARMUP names unknown model 'nope'"):
        runtime(warmup="nope")


def test_auth_token_and_body_limit_settings(monkeypatch):
    from kiapi.config import Settings

    assert Settings(_env_file=None).token is None
    assert Settings(_env_file=None, auth_token="").token is None
    monkeypatch.setenv("KIAPI_AUTH_TOKEN", "s3cret")
    monkeypatch.setenv("KIAPI_MAX_BODY_MB", "2")
    settings = Settings(_env_file=None)
    assert settings.token == "s3cret" and "s3cret" not in repr(settings)
    assert settings.max_body_bytes == 2 * 1024 * 1024


def test_serve_warns_only_off_loopback_without_a_token():
    from kiapi.cli import is_loopback

    for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "192.168.1.5", "example.com"):
        assert not is_loopback(host), host
