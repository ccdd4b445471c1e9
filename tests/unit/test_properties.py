"""Property-based tests (Hypothesis) of kiapi's pure parts.

* the 3.1 -> 3.0 spec conversion and the add-only merge (:mod:`kiapi.specs`);
* the id patterns of files and jobs, and lookups of ids that do not exist;
* image inputs (:mod:`kiapi.runtime.images`) and embedding requests (``parse_request``);
* the memory manager as a state machine (acquire/release/use, clock, TTL sweep).

Every test is derandomized (the same examples on every run) and small enough for CI. The
explicit regression tests after some properties pin down bugs these properties found.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import re
import string
from collections import Counter
from contextlib import ExitStack
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from jsonschema import Draft202012Validator
from openapi_schema_validator import OAS30Validator
from PIL import Image

from kiapi.runtime.catalog import EMBEDDING
from kiapi.runtime.embedding import MODALITIES, parse_request
from kiapi.runtime.errors import BadRequest, BudgetExceeded, NotFound, Unavailable
from kiapi.runtime.files import FILE_ID_RE, FileStore, new_file_id
from kiapi.runtime.images import (
    ImageLoader,
    ImagePolicy,
    base64_bytes,
    data_url_bytes,
    decode_image,
    looks_like_image,
)
from kiapi.runtime.jobs import JobStore
from kiapi.runtime.memory import MemoryManager
from kiapi.runtime.registry import LoadedModel, ModelSpec, Registry
from kiapi.specs import (
    SpecAdditionConflict,
    add_only_merge,
    load_contract,
    operations,
    served_document,
    to_openapi_30,
)
from tests.support import FakeClock, png_bytes

PROPS = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

numbers = st.integers(-100, 100) | st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)
json_scalars = st.none() | st.booleans() | numbers | st.text(max_size=4)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=3), children, max_size=3)
    ),
    max_leaves=12,
)


# =========================================================================== 3.1 -> 3.0

TYPES = ("string", "integer", "number", "boolean", "object", "array")
REFS = ("#/components/schemas/A", "#/components/schemas/B")


def null_schema() -> st.SearchStrategy[dict]:
    return st.builds(dict, type=st.just("null"))  # a fresh dict each time


schema_keywords = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from([*TYPES, "null"])
        | st.lists(st.sampled_from([*TYPES, "null"]), min_size=1, max_size=3, unique=True),
        "examples": st.lists(json_scalars, max_size=3),
        "exclusiveMinimum": numbers,
        "exclusiveMaximum": numbers,
        "minimum": numbers,
        "const": json_scalars,
        "contentMediaType": st.sampled_from(["image/png", "application/octet-stream"]),
        "contentEncoding": st.sampled_from(["base64", "7bit"]),
        "$ref": st.sampled_from(REFS),
        "description": st.text(max_size=4),
    },
)


def with_subschemas(children: st.SearchStrategy[dict]) -> st.SearchStrategy[dict]:
    # Property names that are also keywords: the converter must treat them as names.
    names = st.sampled_from(["a", "b", "type", "examples", "const", "$ref"])
    nested = st.fixed_dictionaries(
        {},
        optional={
            "properties": st.dictionaries(names, children, max_size=3),
            "items": children,
            "anyOf": st.lists(children | null_schema(), min_size=1, max_size=3),
            "oneOf": st.lists(children | null_schema(), min_size=1, max_size=3),
            "allOf": st.lists(children, min_size=1, max_size=2),
            "not": children,
            "additionalProperties": children | st.booleans(),
            "prefixItems": st.lists(children, min_size=1, max_size=2),
        },
    )
    return st.builds(lambda own, sub: {**own, **sub}, schema_keywords, nested)


schemas_31 = st.recursive(schema_keywords, with_subschemas, max_leaves=10)


@st.composite
def openapi_31_documents(draw) -> dict[str, Any]:
    """A minimal 3.1 document with a generated schema at every place an operation or the
    components can hold one (the places kiapi's contract uses)."""

    def schema() -> dict:
        return draw(schemas_31)

    doc: dict[str, Any] = {
        "openapi": draw(st.sampled_from(["3.1.0", "3.1.1"])),
        "info": {"title": "t", "version": "1", "license": {"name": "MIT", "identifier": "MIT"}},
        "paths": {
            "/x/{id}": {
                "post": {
                    "operationId": "x",
                    "parameters": [
                        {"name": "id", "in": "path", "required": True, "schema": schema()}
                    ],
                    "requestBody": {"content": {"application/json": {"schema": schema()}}},
                    "responses": {
                        "200": {
                            "description": "ok",
                            "headers": {"X-H": {"schema": schema()}},
                            "content": {"application/json": {"schema": schema()}},
                        }
                    },
                }
            }
        },
        "components": {
            "schemas": {"A": schema(), "B": schema()},
            "parameters": {"P": {"name": "p", "in": "query", "schema": schema()}},
            "headers": {"H": {"schema": schema()}},
        },
    }
    if draw(st.booleans()):
        doc["jsonSchemaDialect"] = "https://spec.openapis.org/oas/3.1/dialect/base"
    if draw(st.booleans()):
        doc["webhooks"] = {"w": {"post": {"responses": {"200": {"description": "ok"}}}}}
    return doc


def top_level_schemas(doc: dict[str, Any]) -> list[tuple[str, Any]]:
    """``(where, schema)`` for every schema place :func:`openapi_31_documents` fills, found
    independently of the converter's own traversal."""
    op = doc["paths"]["/x/{id}"]["post"]
    response = op["responses"]["200"]
    components = doc["components"]
    return [
        ("param", op["parameters"][0]["schema"]),
        ("body", op["requestBody"]["content"]["application/json"]["schema"]),
        ("response", response["content"]["application/json"]["schema"]),
        ("response header", response["headers"]["X-H"]["schema"]),
        ("schemas.A", components["schemas"]["A"]),
        ("schemas.B", components["schemas"]["B"]),
        ("parameters.P", components["parameters"]["P"]["schema"]),
        ("headers.H", components["headers"]["H"]["schema"]),
    ]


def walk_schema(schema: Any, where: str):
    """Every schema object under ``schema`` (itself included), with its JSON-ish path."""
    if not isinstance(schema, dict):
        return
    yield where, schema
    for key in ("allOf", "anyOf", "oneOf", "prefixItems"):
        for i, sub in enumerate(schema.get(key) or []):
            yield from walk_schema(sub, f"{where}.{key}[{i}]")
    for key in ("items", "not", "additionalProperties", "contains"):
        yield from walk_schema(schema.get(key), f"{where}.{key}")
    for key in ("properties", "patternProperties"):
        for name, sub in (schema.get(key) or {}).items():
            yield from walk_schema(sub, f"{where}.{key}[{name!r}]")


def leftovers_31(schema: dict[str, Any]) -> list[str]:
    """The 3.1-only spellings ``schema`` (one object, not its children) still uses."""
    found = []
    type_ = schema.get("type")
    if isinstance(type_, list):
        found.append(f"type list {type_}")
    if type_ == "null":
        found.append("type null")
    for key in ("examples", "const", "contentMediaType"):
        if key in schema:
            found.append(key)
    for key in ("exclusiveMinimum", "exclusiveMaximum"):
        if key in schema and not isinstance(schema[key], bool):
            found.append(f"numeric {key}")
    if "$ref" in schema and len(schema) > 1:
        found.append(f"$ref with siblings {sorted(schema)}")
    for key in ("anyOf", "oneOf"):
        if any(option == {"type": "null"} for option in schema.get(key) or []):
            found.append(f"null option in {key}")
    return found


def admits_null(schema: dict[str, Any]) -> bool:
    """Whether a 3.1 schema says, at its own level, that null is allowed."""
    type_ = schema.get("type")
    if type_ == "null" or (isinstance(type_, list) and "null" in type_):
        return True
    return any(o == {"type": "null"} for key in ("anyOf", "oneOf") for o in schema.get(key) or [])


@PROPS
@given(openapi_31_documents())
def test_to_openapi_30_leaves_no_31_keyword_and_is_pure_and_idempotent(doc):
    snapshot = copy.deepcopy(doc)
    converted = to_openapi_30(doc)

    assert doc == snapshot  # the input is not modified
    assert re.fullmatch(r"3\.0\.\d+", converted["openapi"])
    assert "webhooks" not in converted and "jsonSchemaDialect" not in converted
    assert "identifier" not in converted["info"]["license"]
    for where, schema in top_level_schemas(converted):
        for path, sub in walk_schema(schema, where):
            assert not leftovers_31(sub), (path, leftovers_31(sub), sub)
    # Nothing is lost or renamed around the schemas.
    assert set(converted["components"]["schemas"]) == {"A", "B"}
    assert [(m, p) for m, p, _ in operations(converted)] == [("post", "/x/{id}")]
    # A schema that allowed null still does, in the 3.0 way.
    for (where, before), (_, after) in zip(
        top_level_schemas(doc), top_level_schemas(converted), strict=True
    ):
        if admits_null(before):
            assert after.get("nullable") is True, (where, before, after)

    again = to_openapi_30(converted)
    assert again == converted  # converting a converted document changes nothing


PLACES = {
    # place -> (where the schema goes in the document, what holds it there)
    "path-item parameters": (
        ("paths", "/x/{id}", "parameters", 0),
        {"name": "id", "in": "path", "required": True},
    ),
    "components.responses": (
        ("components", "responses", "R", "content", "application/json"),
        {},
    ),
    "components.requestBodies": (
        ("components", "requestBodies", "Q", "content", "text/plain"),
        {},
    ),
}


@pytest.mark.parametrize("place", sorted(PLACES))
def test_to_openapi_30_converts_schemas_in_every_place_a_31_document_may_hold_them(place):
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "t", "version": "1"},
        "paths": {"/x/{id}": {"get": {"responses": {"200": {"description": "ok"}}}}},
        "components": {
            "responses": {"R": {"description": "r", "content": {}}},
            "requestBodies": {"Q": {"content": {}}},
        },
    }
    doc["paths"]["/x/{id}"]["parameters"] = [{}]
    where, holder = PLACES[place]
    node = doc
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = {**holder, "schema": {"type": ["string", "null"], "examples": ["x"]}}
    converted = to_openapi_30(doc)
    for key in where:
        converted = converted[key]
    assert leftovers_31(converted["schema"]) == []


def convert_one(schema: dict[str, Any]) -> dict[str, Any]:
    doc = {"openapi": "3.1.0", "info": {"title": "t", "version": "1"}, "paths": {}}
    doc["components"] = {"schemas": {"S": schema}}
    return to_openapi_30(doc)["components"]["schemas"]["S"]


INSTANCES = (None, "", "x", 0, 5, 1.5, True, [], {})


@pytest.mark.parametrize(
    "schema",
    [
        # was {"nullable": true, "anyOf": []}: an empty anyOf, invalid and matching nothing
        {"type": ["null"]},
        {"type": ["string", "null"]},
        # was the type list's anyOf replacing this one, dropping minLength
        {"type": ["string", "integer"], "anyOf": [{"minLength": 1}]},
        {"type": ["integer", "string", "null"], "anyOf": [{"minimum": 1}, {"maxLength": 0}]},
    ],
)
def test_type_lists_accept_the_same_values_after_conversion(schema):
    converted = convert_one(copy.deepcopy(schema))
    for leftover in (sub for _, sub in walk_schema(converted, "S")):
        assert leftovers_31(leftover) == []
    for combinator in ("allOf", "anyOf", "oneOf"):
        for _, sub in walk_schema(converted, "S"):
            assert sub.get(combinator, [None]) != [], (combinator, converted)
    before, after = Draft202012Validator(schema), OAS30Validator(converted)
    for instance in INSTANCES:
        assert before.is_valid(instance) == after.is_valid(instance), (instance, converted)


# --------------------------------------------------------------------------- add-only merge

json_docs = st.dictionaries(st.text(max_size=3), json_values, max_size=5)


@st.composite
def sub_dicts(draw, doc: dict[str, Any]) -> dict[str, Any]:
    """A random part of ``doc``: some keys dropped at any depth, the rest equal."""
    part = {}
    for key, value in doc.items():
        if not draw(st.booleans()):
            continue
        recurse = isinstance(value, dict) and draw(st.booleans())
        part[key] = draw(sub_dicts(value)) if recurse else copy.deepcopy(value)
    return part


@st.composite
def additions(draw, base: dict[str, Any]) -> dict[str, Any]:
    """A sub-dict of ``base`` plus new keys at random object levels (never a changed value).
    New keys are 4+ characters, longer than any key of ``base``."""
    extra: dict[str, Any] = {}
    for key, value in base.items():
        choice = draw(st.sampled_from(["drop", "same", "recurse"]))
        if choice == "same":
            extra[key] = copy.deepcopy(value)
        elif choice == "recurse" and isinstance(value, dict):
            extra[key] = draw(additions(value))
    new_keys = st.text(min_size=1, max_size=3).map(lambda k: f"new:{k}")
    extra.update(draw(st.dictionaries(new_keys, json_values, max_size=2)))
    return extra


def is_subset(small: Any, big: Any) -> bool:
    if isinstance(small, dict):
        return isinstance(big, dict) and all(
            k in big and is_subset(v, big[k]) for k, v in small.items()
        )
    return small == big


def keys_come_from(result: Any, base: Any, extra: Any) -> bool:
    """Every key of ``result``, at every depth, is a key of ``base`` or of ``extra`` there."""
    if not isinstance(result, dict):
        return True
    base = base if isinstance(base, dict) else {}
    extra = extra if isinstance(extra, dict) else {}
    return all(
        (k in base or k in extra) and keys_come_from(v, base.get(k), extra.get(k))
        for k, v in result.items()
    )


@PROPS
@given(st.data(), json_docs)
def test_merging_a_part_of_a_document_gives_the_document(data, doc):
    part = data.draw(sub_dicts(doc))
    snapshot = copy.deepcopy(doc), copy.deepcopy(part)
    merged = add_only_merge(doc, part)
    assert merged == doc
    assert merged is not doc
    assert (doc, part) == snapshot


@PROPS
@given(st.data(), json_docs)
def test_merging_only_adds_keys(data, base):
    extra = data.draw(additions(base))
    snapshot = copy.deepcopy(base), copy.deepcopy(extra)
    merged = add_only_merge(base, extra)
    assert is_subset(base, merged)  # every key path of base is there, with the same value
    assert is_subset(extra, merged)  # and every addition
    assert keys_come_from(merged, base, extra)  # and nothing else
    assert (base, extra) == snapshot
    # The result shares no object with the inputs: changing it changes neither.
    json.dumps(merged)  # still JSON
    for key in merged:
        if isinstance(merged[key], dict | list):
            assert merged[key] is not base.get(key) and merged[key] is not extra.get(key)


@st.composite
def a_changed_leaf(draw, base: dict[str, Any]) -> tuple[list[str], Any]:
    """A key path of ``base`` and a value that ``add_only_merge`` must refuse there: a different
    leaf value, or an object where base has a leaf, or a leaf where base has an object."""
    path: list[str] = []
    node = base
    while True:
        key = draw(st.sampled_from(sorted(node)))
        path.append(key)
        value = node[key]
        if isinstance(value, dict) and value and draw(st.booleans()):
            node = value
            continue
        new = draw(
            json_values.filter(
                lambda v, old=value: (
                    v != old and not (isinstance(v, dict) and isinstance(old, dict))
                )
            )
        )
        return path, new


@PROPS
@given(st.data(), json_docs.filter(bool))
def test_a_changed_leaf_value_is_always_refused(data, base):
    extra = data.draw(additions(base))  # valid additions around the conflict
    path, new = data.draw(a_changed_leaf(base))
    node = extra
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = new
    snapshot = copy.deepcopy(base)
    with pytest.raises(SpecAdditionConflict) as err:
        add_only_merge(base, extra)
    assert "$." + ".".join(path) in str(err.value)
    assert base == snapshot


# =========================================================================== ids


def path_parameter_pattern(path: str, name: str) -> re.Pattern:
    """The pattern the contract gives a path parameter (the same in every operation)."""
    item = load_contract("common")["paths"][path]
    patterns = {
        param["schema"]["pattern"]
        for _method, op_path, op in operations({"paths": {path: item}})
        if op_path == path
        for param in op.get("parameters", [])
        if param["name"] == name
    }
    (pattern,) = patterns
    return re.compile(pattern)


JOB_ID_PATTERN = path_parameter_pattern("/v1/jobs/{job_id}", "job_id")
FILE_ID_PATTERN = path_parameter_pattern("/v1/files/{file_id}", "file_id")


def id_like(prefix: str) -> st.SearchStrategy[str]:
    """Strings near an id: random text, the prefix plus random text, wrong case, hex ids."""
    hexes = st.text("0123456789abcdef", min_size=1, max_size=70)
    return st.one_of(
        st.text(),
        st.builds(lambda t: prefix + t, st.text()),
        st.builds(lambda h: (prefix + h).upper(), hexes),
        st.builds(lambda h, pad: pad + prefix + h + pad, hexes, st.sampled_from(["", " ", "\n"])),
        st.builds(lambda h: prefix + h, hexes),
    )


def test_new_ids_match_the_contract_patterns(tmp_path):
    file_ids = {new_file_id() for _ in range(300)}
    job_ids = {JobStore().create("t", {}).id for _ in range(300)}
    store = FileStore(tmp_path, max_upload_bytes=100).open()
    file_ids.add(store.put_bytes(b"x", filename="x", content_type="text/plain").file_id)
    assert len(file_ids) == 301 and len(job_ids) == 300  # random enough not to collide
    for file_id in file_ids:
        assert FILE_ID_RE.match(file_id) and FILE_ID_PATTERN.search(file_id), file_id
    for job_id in job_ids:
        assert JOB_ID_PATTERN.search(job_id), job_id


@PROPS
@given(id_like("job_"))
def test_unknown_job_ids_are_not_found(value):
    store = JobStore()
    job = store.create("t", {"x": 1})
    assume(value != job.id)
    for lookup in (store.snapshot, store.forget):
        with pytest.raises(NotFound) as err:
            lookup(value)
        assert err.value.status == 404
    assert store.snapshot(job.id)["id"] == job.id  # the lookups changed nothing


@pytest.fixture(scope="module")
def file_store(tmp_path_factory):
    return FileStore(tmp_path_factory.mktemp("files"), max_upload_bytes=10**6).open()


@PROPS
@given(id_like("file_"))
def test_unknown_file_ids_are_not_found(file_store, value):
    record = file_store.put_bytes(b"kept", filename="k.bin", content_type="text/plain")
    assume(value != record.file_id)
    for lookup in (file_store.get, file_store.path, file_store.delete):
        with pytest.raises(NotFound) as err:
            lookup(value)
        assert err.value.status == 404
    # As an image input, an id-shaped value that is not stored is a 400 that says so.
    if FILE_ID_RE.match(value.strip()):
        with pytest.raises(BadRequest, match="not in the Files API"):
            ImageLoader(ImagePolicy(), file_store).read_bytes(value)
    assert file_store.path(record.file_id).read_bytes() == b"kept"
    file_store.delete(record.file_id)


# =========================================================================== image inputs


@st.composite
def small_images(draw) -> tuple[bytes, Image.Image]:
    """A small PNG (RGB, RGBA or greyscale, random pixels) and the image it was made from."""
    mode = draw(st.sampled_from(["RGB", "RGBA", "L"]))
    size = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    n = size[0] * size[1] * len(mode)
    image = Image.frombytes(mode, size, draw(st.binary(min_size=n, max_size=n)))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue(), image


def insert_whitespace(text: str, spots: list[tuple[int, str]]) -> str:
    for position, space in sorted(spots, reverse=True):
        position %= len(text) + 1
        text = text[:position] + space + text[position:]
    return text


whitespace_spots = st.lists(
    st.tuples(st.integers(0, 10**6), st.sampled_from([" ", "\n", "\r\n", "\t", "  \n"])),
    min_size=1,
    max_size=8,
)


@PROPS
@given(small_images(), whitespace_spots)
def test_every_spelling_of_an_image_reads_the_same_bytes(file_store, png_and_image, spots):
    data, image = png_and_image
    std = base64.b64encode(data).decode()
    url_safe = base64.urlsafe_b64encode(data).decode()
    plain = {
        "standard": std,
        "url-safe": url_safe,
        "unpadded": std.rstrip("="),
        "url-safe unpadded": url_safe.rstrip("="),
        "with whitespace": insert_whitespace(std, spots),
    }
    data_urls = {
        "data URL": f"data:image/png;base64,{std}",
        "data URL, upper case": f"DATA:image/png;BASE64,{std}",
        "data URL, url-safe unpadded": f"data:image/png;base64,{url_safe.rstrip('=')}",
        "data URL with whitespace": f"data:image/png;base64,{insert_whitespace(std, spots)}",
    }
    record = file_store.put_bytes(data, filename="x.png", content_type="image/png")
    stored = {"file id": record.file_id, "file id, padded": f" {record.file_id}\n"}

    loader = ImageLoader(ImagePolicy(), file_store)
    for name, value in {**plain, **data_urls, **stored}.items():
        assert loader.read_bytes(value) == data, name
    for name, value in plain.items():
        assert base64_bytes(value) == data, name
    for name, value in data_urls.items():
        assert data_url_bytes(value) == data, name

    decoded = decode_image(data, max_pixels=image.width * image.height)
    assert decoded.mode == "RGB" and decoded.size == image.size
    assert decoded.tobytes() == image.convert("RGB").tobytes()
    if image.mode == "RGB":
        assert decoded.tobytes() == image.tobytes()
    with pytest.raises(BadRequest, match="pixels"):
        decode_image(data, max_pixels=image.width * image.height - 1)
    file_store.delete(record.file_id)


def not_a_url(value: str) -> bool:
    # http(s) URLs are fetched; that path is tested elsewhere (and being rewritten).
    return not value.strip().lower().startswith("http")


arbitrary_image_values = st.one_of(
    st.text(),
    st.text(string.ascii_letters + string.digits + "+/=_- \n", max_size=40),
    st.builds(
        lambda prefix, rest: prefix + rest,
        st.sampled_from(
            ["data:", "data:image/png;base64,", "DATA:,", " data:x;base64", "file_", "/", "/9j/"]
        ),
        st.text(),
    ),
    st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()),
).filter(not_a_url)


def load_or_bad_request(loader: ImageLoader, value: str) -> None:
    """``loader.load(value)`` returns an RGB image or raises BadRequest; nothing else."""
    try:
        data = loader.read_bytes(value)
    except BadRequest as exc:
        assert exc.status == 400 and exc.detail
        return
    assert isinstance(data, bytes)
    try:
        image = loader.load(value)
    except BadRequest as exc:
        assert exc.status == 400 and exc.detail
        return
    assert image.mode == "RGB"


@settings(PROPS, max_examples=200)
@given(arbitrary_image_values)
def test_any_text_is_read_as_bytes_or_refused_with_a_400(file_store, value):
    load_or_bad_request(ImageLoader(ImagePolicy(), file_store), value)


@PROPS
@given(
    arbitrary_image_values
    | st.builds(lambda t: "~" + t, st.text()).filter(not_a_url)
    | st.builds(lambda t: "/" + t, st.text())
)
@example("~kiapi-no-such-user/cat.png")  # was a RuntimeError from Path.expanduser (a 500)
def test_any_text_is_read_as_bytes_or_refused_with_a_400_when_local_roots_are_set(
    file_store, tmp_path_factory, value
):
    root = tmp_path_factory.getbasetemp() / "empty-root"
    root.mkdir(exist_ok=True)
    load_or_bad_request(ImageLoader(ImagePolicy(local_roots=(root,)), file_store), value)


@PROPS
@given(
    st.builds(lambda c, t: c + t, st.sampled_from(["/", "~", "~/", " /"]), st.text())
    | st.just("<existing file>")
)
def test_local_paths_are_refused_while_no_local_root_is_set(file_store, tmp_path_factory, value):
    if value == "<existing file>":  # a real, readable image on this machine
        path = tmp_path_factory.getbasetemp() / "real.png"
        path.write_bytes(png_bytes((3, 3)))
        value = str(path)
    decoded = base64_bytes(value.strip())
    assume(decoded is None or not looks_like_image(decoded))  # that would be a base64 image
    with pytest.raises(BadRequest) as err:
        ImageLoader(ImagePolicy(), file_store).read_bytes(value)
    assert "KIAPI_LOCAL_INPUT_ROOTS" in err.value.detail


# =========================================================================== embedding requests

REGISTRY = Registry(
    [
        ModelSpec(
            name="alpha",
            family=EMBEDDING,
            domain=EMBEDDING,
            repo="org/Alpha-Text",
            aliases=("text", "a"),
            features=("text",),
            default=True,
        ),
        ModelSpec(
            name="beta-vl",
            family=EMBEDDING,
            domain=EMBEDDING,
            repo="org/Beta-VL",
            aliases=("vl",),
            features=("text", "image"),
        ),
    ]
)
EMBED_REQUEST = Draft202012Validator(
    {
        "$ref": "#/components/schemas/EmbedRequest",
        "components": served_document("embedding")["components"],
    }
)

all_names = [n for s in REGISTRY.models(EMBEDDING) for n in s.names]
model_values = st.one_of(
    st.none(),
    st.text(max_size=12),
    st.builds(
        lambda name, upper, pad: pad + (name.upper() if upper else name) + pad,
        st.sampled_from(all_names),
        st.booleans(),
        st.sampled_from(["", " ", "\t"]),
    ),
)
input_values = st.none() | st.just("") | st.text(max_size=20)
embed_bodies = st.builds(
    lambda known, extra: {**extra, **known},
    st.fixed_dictionaries(
        {}, optional={"model": model_values, "text": input_values, "image": input_values}
    ),
    st.dictionaries(st.text(max_size=6), json_values, max_size=3),
)


@settings(PROPS, max_examples=150)
@given(embed_bodies)
def test_parse_request_accepts_or_refuses_with_the_reason(body):
    assert not list(EMBED_REQUEST.iter_errors(body))  # the contract lets this body through
    model = body.get("model")
    if model is None:
        expected = REGISTRY.default(EMBEDDING)
    else:
        wanted = model.strip().lower()
        expected = next(
            (s for s in REGISTRY.models(EMBEDDING) if wanted in [n.lower() for n in s.names]), None
        )
    given_inputs = {m: body.get(m) for m in MODALITIES if body.get(m) not in (None, "")}

    try:
        request = parse_request(REGISTRY, body)
    except BadRequest as exc:
        assert exc.status == 400
        if expected is None:
            assert "unknown embedding model" in exc.detail
        elif not given_inputs:
            assert "at least one non-empty input" in exc.detail
        else:
            assert set(given_inputs) - set(expected.features), exc.detail
            assert "does not accept" in exc.detail
        return
    assert expected is not None and request.spec is expected
    assert given_inputs and set(given_inputs) <= set(expected.features)
    assert (request.text, request.image) == (given_inputs.get("text"), given_inputs.get("image"))
    assert request.params() == {
        "model": expected.name,
        "text": request.text,
        "image": request.image,
    }


# =========================================================================== memory manager


def gb(low: int, high: int) -> st.SearchStrategy[float]:
    """Sizes in multiples of 0.25 GB: their sums and differences are exact in binary floats."""
    return st.integers(low, high).map(lambda q: q / 4)


model_parameters = st.tuples(
    gb(0, 24),  # weight 0..6 GB
    gb(0, 8),  # peak headroom 0..2 GB
    st.integers(-1, 3),  # priority
    st.none() | st.sampled_from([0.0, -1.0]) | st.integers(1, 40).map(float),  # ttl
)


class MemoryMachine(RuleBasedStateMachine):
    """Random acquire / release / use / clock / sweep against a model of what must hold.

    The loader reports exactly the catalog weight, so every eviction is predictable: an acquire
    first sweeps expired idle models, then evicts idle models in ascending (priority, last
    used) order, as few as needed; a request that cannot fit even with every idle model gone
    is refused with 503 and evicts nothing."""

    @initialize(
        budget=gb(4, 40),
        default_ttl=st.sampled_from([0.0, 5.0, 30.0]),
        models=st.lists(model_parameters, min_size=1, max_size=6),
    )
    def start(self, budget, default_ttl, models):
        self.clock = FakeClock()
        self.budget = budget
        self.default_ttl = default_ttl
        self.specs = [
            ModelSpec(
                name=f"m{i}",
                family="f",
                domain="d",
                repo=f"r/m{i}",
                weight_gb=weight,
                peak_headroom_gb=headroom,
                priority=priority,
                ttl_s=ttl,
            )
            for i, (weight, headroom, priority, ttl) in enumerate(models)
        ]
        self.by_name = {s.name: s for s in self.specs}
        self.mm = MemoryManager(
            budget, default_ttl_s=default_ttl, loader=self.load, clock=self.clock
        )
        self.last_used: dict[str, float] = {}  # the residents as the model sees them
        self.in_use: Counter[str] = Counter()
        self.loads: list[str] = []
        self.unloads: list[str] = []

    # -- the fake loader ------------------------------------------------------------------
    def load(self, spec: ModelSpec) -> LoadedModel:
        assert not self.mm.is_resident(spec.name), f"{spec.name} loaded while resident"
        self.loads.append(spec.name)
        return LoadedModel(
            model=("model", spec.name),
            weight_gb=spec.weight_gb,
            unload=lambda: self.unloaded(spec.name),
        )

    def unloaded(self, name: str) -> None:
        assert self.in_use[name] == 0, f"{name} evicted while in use"
        self.unloads.append(name)

    # -- the model ------------------------------------------------------------------------
    def ttl(self, spec: ModelSpec) -> float | None:
        ttl = self.default_ttl if spec.ttl_s is None else spec.ttl_s
        return ttl if ttl > 0 else None

    def expired(self) -> set[str]:
        now = self.clock()
        return {
            name
            for name, last in self.last_used.items()
            if self.in_use[name] == 0
            and (ttl := self.ttl(self.by_name[name])) is not None
            and now - last >= ttl
        }

    def forget(self, names) -> None:
        for name in names:
            del self.last_used[name]

    def weight(self, names) -> float:
        return sum(self.by_name[n].weight_gb for n in names)

    def checked_acquire(self, spec: ModelSpec, acquire) -> Any:
        expired = self.expired()
        need = spec.weight_gb + spec.peak_headroom_gb
        others = [n for n in self.last_used if n not in expired and n != spec.name]
        busy_gb = self.weight(n for n in others if self.in_use[n])
        can_fit = need <= self.budget and busy_gb + need <= self.budget
        loads, unloads = len(self.loads), len(self.unloads)

        try:
            model = acquire()
        except BudgetExceeded as exc:
            assert isinstance(exc, Unavailable) and exc.status == 503
            assert not can_fit, f"{spec.name} refused though it fits: {exc.detail}"
            # The TTL sweep at the start of acquire is all that went.
            assert sorted(self.unloads[unloads:]) == sorted(expired)
            assert len(self.loads) == loads
            self.forget(expired)
            return None
        assert can_fit, f"{spec.name} ({need} GB) admitted beside {busy_gb} GB in use"

        gone = self.unloads[unloads:]
        assert set(gone[: len(expired)]) == expired
        self.forget(expired)
        victims = gone[len(expired) :]
        idle = [n for n in others if self.in_use[n] == 0]
        assert set(victims) <= set(idle), "only idle models are evicted to make room"
        key = {n: (self.by_name[n].priority, self.last_used[n]) for n in idle}
        assert [key[v] for v in victims] == sorted(key[v] for v in victims)
        kept = [n for n in idle if n not in victims]
        if victims and kept:
            assert max(key[v] for v in victims) <= min(key[n] for n in kept)
        used = self.weight(others)
        assert used - self.weight(victims) + need <= self.budget
        if victims:  # as few as needed: without the last victim it did not fit
            assert used - self.weight(victims[:-1]) + need > self.budget
        self.forget(victims)

        assert self.loads[loads:] == ([] if spec.name in self.last_used else [spec.name])
        assert model == ("model", spec.name)
        self.last_used[spec.name] = self.clock()
        self.in_use[spec.name] += 1
        return model

    # -- rules ----------------------------------------------------------------------------
    @rule(i=st.integers(0, 5))
    def acquire(self, i):
        spec = self.specs[i % len(self.specs)]
        self.checked_acquire(spec, lambda: self.mm.acquire(spec))

    @precondition(lambda self: any(self.in_use.values()))
    @rule(data=st.data())
    def release(self, data):
        name = data.draw(st.sampled_from(sorted(n for n, c in self.in_use.items() if c)))
        self.mm.release(self.by_name[name])
        self.in_use[name] -= 1
        self.last_used[name] = self.clock()

    @rule(i=st.integers(0, 5))
    def release_without_acquire_is_refused(self, i):
        spec = self.specs[i % len(self.specs)]
        if self.in_use[spec.name] == 0:
            with pytest.raises(RuntimeError, match="without acquire"):
                self.mm.release(spec)

    @rule(i=st.integers(0, 5))
    def use_a_model_in_a_failing_block(self, i):
        spec = self.specs[i % len(self.specs)]
        stack = ExitStack()
        model = self.checked_acquire(spec, lambda: stack.enter_context(self.mm.use(spec)))
        if model is None:
            return
        with pytest.raises(ZeroDivisionError), stack:
            raise ZeroDivisionError  # the job fails: the model is released all the same
        self.in_use[spec.name] -= 1
        self.last_used[spec.name] = self.clock()

    @rule(seconds=st.integers(0, 45))
    def advance_clock(self, seconds):
        self.clock.advance(seconds)

    @rule()
    def sweep(self):
        expected = self.expired()
        pinned = {n for n in self.last_used if self.ttl(self.by_name[n]) is None}
        busy = {n for n in self.last_used if self.in_use[n]}
        unloads = len(self.unloads)
        assert set(self.mm.sweep()) == expected
        assert set(self.unloads[unloads:]) == expected
        self.forget(expected)
        assert pinned | busy <= set(self.last_used)  # pinned and busy models stay
        assert not self.expired()

    # -- invariants -----------------------------------------------------------------------
    @invariant()
    def resident_models_fit_and_match_the_model(self):
        snapshot = self.mm.snapshot()
        assert snapshot["resident_gb"] <= self.budget
        assert {e["name"] for e in snapshot["loaded"]} == set(self.last_used)
        assert {n for n, c in self.in_use.items() if c} <= set(self.last_used)
        for entry in snapshot["loaded"]:
            assert (entry["ttl_s"] is None) == (self.ttl(self.by_name[entry["name"]]) is None)
            if self.in_use[entry["name"]]:
                assert entry["idle_s"] == 0.0
        assert sum(self.mm.evictions.values()) == len(self.unloads)
        assert set(self.mm.evictions) <= {"ttl", "budget"}


TestMemoryManagerStateMachine = MemoryMachine.TestCase
TestMemoryManagerStateMachine.settings = settings(
    max_examples=80,
    stateful_step_count=30,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
