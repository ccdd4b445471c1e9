import hashlib
import json
from pathlib import Path

import pytest

from kiapi.specs import (
    SPEC_SOURCES,
    SPECS_DIR,
    SpecAdditionConflict,
    add_only_merge,
    load_contract,
    load_served,
    operations,
    to_openapi_30,
)

# sha256 of the supplied contract (../shared/specs); the copies in specs/ must never change.
CONTRACT_SHA256 = {
    "common.json": "b1cfaf8d8a0be56a89d8db90f2a0e49648900f924f82acff5600c6202a5e1bb4",
    "embedding.json": "9f9245c750b97b04270741b3d6e32aa05c454f6fee06714d2b13ee161a1afc7a",
}
ROOT = Path(__file__).resolve().parents[2]
SHARED_SPECS = ROOT.parent / "shared" / "specs"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", sorted(CONTRACT_SHA256))
def test_contract_copies_are_byte_identical(name):
    assert SPECS_DIR.resolve() == (ROOT / "specs").resolve()  # kiapi/_specs links to specs/
    assert sha256(SPECS_DIR / name) == CONTRACT_SHA256[name]
    if SHARED_SPECS.exists():
        assert sha256(SPECS_DIR / name) == sha256(SHARED_SPECS / name)


def is_subset(small, big) -> bool:
    if isinstance(small, dict):
        return isinstance(big, dict) and all(
            k in big and is_subset(v, big[k]) for k, v in small.items()
        )
    return small == big


SUPPLIED = [s for s in SPEC_SOURCES if f"{s.name}.json" in CONTRACT_SHA256]


def test_every_spec_in_specs_is_supplied_or_our_own():
    """specs/ holds the supplied contract and kiapi's own documents, nothing stray."""
    own = {f"{s.name}.json" for s in SPEC_SOURCES} - set(CONTRACT_SHA256)
    assert own == {"openai.json", "chat.json", "rerank.json"}
    assert {p.name for p in SPECS_DIR.glob("*.json")} == set(CONTRACT_SHA256) | own


@pytest.mark.parametrize("source", SUPPLIED, ids=lambda s: s.name)
def test_additions_only_add(source):
    contract, served = load_contract(source.name), load_served(source.name)
    assert is_subset(contract, served)
    assert served != contract  # we do add documentation


def test_add_only_merge_refuses_changes():
    base = {"a": {"b": 1, "l": [1]}, "x": "y"}
    assert add_only_merge(base, {"a": {"c": 2}}) == {"a": {"b": 1, "c": 2, "l": [1]}, "x": "y"}
    assert add_only_merge(base, {"a": {"b": 1}}) == base
    with pytest.raises(SpecAdditionConflict, match=r"\$\.a\.b"):
        add_only_merge(base, {"a": {"b": 2}})
    with pytest.raises(SpecAdditionConflict):
        add_only_merge(base, {"a": {"l": [1, 2]}})
    assert base == {"a": {"b": 1, "l": [1]}, "x": "y"}  # inputs untouched


def test_every_documented_status_is_added_for_what_the_server_returns():
    served = load_served("common")
    responses = {(m, p): set(op["responses"]) for m, p, op in operations(served)}
    assert {"404", "422"} <= responses[("get", "/v1/files/{file_id}")]
    assert {"404", "422"} <= responses[("delete", "/v1/jobs/{job_id}")]
    assert {"413", "415", "422"} <= responses[("post", "/v1/files")]
    embedding = {(m, p): set(op["responses"]) for m, p, op in operations(load_served("embedding"))}
    assert {"400", "409", "422", "503", "504"} <= embedding[("post", "/v1/embedding")]


# --------------------------------------------------------------------------- conversion


def convert_schema(schema: dict) -> dict:
    spec = {
        "openapi": "3.1.0",
        "info": {"title": "t", "version": "1"},
        "paths": {},
        "components": {"schemas": {"S": schema}},
    }
    return to_openapi_30(spec)["components"]["schemas"]["S"]


def test_version_and_input_untouched():
    original = load_contract("common")
    snapshot = json.dumps(original, sort_keys=True)
    converted = to_openapi_30(original)
    assert converted["openapi"] == "3.0.3" and original["openapi"] == "3.1.0"
    assert json.dumps(original, sort_keys=True) == snapshot


def test_examples_list_becomes_example():
    assert convert_schema({"type": "string", "examples": ["a", "b"]}) == {
        "type": "string",
        "example": "a",
    }
    assert convert_schema({"type": "string", "examples": []}) == {"type": "string"}


def test_anyof_null_becomes_nullable():
    assert convert_schema({"anyOf": [{"type": "number"}, {"type": "null"}], "title": "T"}) == {
        "type": "number",
        "nullable": True,
        "title": "T",
    }
    ref = convert_schema({"anyOf": [{"$ref": "#/components/schemas/X"}, {"type": "null"}]})
    assert ref == {"nullable": True, "allOf": [{"$ref": "#/components/schemas/X"}]}
    multi = convert_schema({"anyOf": [{"type": "string"}, {"type": "integer"}, {"type": "null"}]})
    assert multi == {"nullable": True, "anyOf": [{"type": "string"}, {"type": "integer"}]}
    assert convert_schema({"type": ["string", "null"]}) == {"type": "string", "nullable": True}


def test_numeric_exclusive_bounds():
    assert convert_schema({"type": "number", "exclusiveMinimum": 0.0, "exclusiveMaximum": 5}) == {
        "type": "number",
        "minimum": 0.0,
        "exclusiveMinimum": True,
        "maximum": 5,
        "exclusiveMaximum": True,
    }


def test_content_media_type_becomes_binary():
    assert convert_schema({"type": "string", "contentMediaType": "application/octet-stream"}) == {
        "type": "string",
        "format": "binary",
    }


def test_const_and_ref_siblings():
    assert convert_schema({"const": "list"}) == {"enum": ["list"]}
    assert convert_schema(
        {"$ref": "#/components/schemas/X", "description": "d", "examples": ["e"]}
    ) == {"allOf": [{"$ref": "#/components/schemas/X"}], "description": "d", "example": "e"}


def test_nested_schemas_are_converted():
    out = convert_schema(
        {
            "type": "object",
            "properties": {
                "p": {
                    "anyOf": [{"type": "number", "minimum": 0.0, "maximum": 1.0}, {"type": "null"}]
                },
                "items": {"type": "array", "items": {"type": "string", "examples": ["x"]}},
            },
        }
    )
    assert out["properties"]["p"] == {
        "type": "number",
        "minimum": 0.0,
        "maximum": 1.0,
        "nullable": True,
    }
    assert out["properties"]["items"]["items"] == {"type": "string", "example": "x"}


@pytest.mark.parametrize("source", SPEC_SOURCES, ids=lambda s: s.name)
def test_converted_specs_have_no_31_leftovers(source):
    text = json.dumps(to_openapi_30(load_served(source.name)))
    assert '"examples": [' not in text
    assert '{"type": "null"}' not in text
    assert "contentMediaType" not in text
    converted = to_openapi_30(load_served(source.name))
    ops = [op["operationId"] for _m, _p, op in operations(converted)]
    assert ops == [op["operationId"] for _m, _p, op in operations(load_served(source.name))]


def test_connexion_accepts_the_converted_specs():
    from connexion.spec import Specification

    for source in SPEC_SOURCES:
        spec = Specification.load(to_openapi_30(load_served(source.name)))  # validates
        assert spec.version == (3, 0, 3)


def test_additions_cannot_swap_a_value_for_an_equal_one_of_another_type():
    with pytest.raises(SpecAdditionConflict):
        add_only_merge({"a": True}, {"a": 1})
    with pytest.raises(SpecAdditionConflict):
        add_only_merge({"a": 1}, {"a": 1.0})
