"""The contract: loading the supplied OpenAPI 3.1 documents, our additions, and the 3.0 view.

Three views of each spec exist, and only this module builds them:

* the **contract** – ``specs/<name>.json`` exactly as supplied (byte-identical to
  ``../shared/specs``; never edited). ``specs/openai.json`` is kiapi's own document (the
  OpenAI-compatible surface), written contract-first like the others;
* the **served** document – the contract deep-merged with ``specs/additions/<name>.json``.
  Additions may only *add* keys (new responses, schemas, headers); :func:`add_only_merge`
  refuses to change anything the contract already says. This is what ``/openapi.json`` serves
  and what Schemathesis fuzzes, so every status the server returns is documented;
* the **Connexion** document – the served one converted in memory to OpenAPI 3.0, because
  Connexion 3.3 refuses 3.1 and some 3.1-only schema keywords (:func:`to_openapi_30`).
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

SPECS_DIR = Path(__file__).resolve().parent / "_specs"  # links to the repository's specs/


@dataclass(frozen=True)
class SpecSource:
    """One contract document and where it lives in the server.

    ``name`` names the files (``specs/<name>.json``, ``specs/additions/<name>.json``) and the
    handler module (``kiapi.handlers.<name>``); ``docs_prefix`` is where its documentation is
    mounted (``<prefix>/openapi.json``, ``<prefix>/docs.html``, ``<prefix>/redoc.html``).
    ``error_style``: the shape of its error bodies — ``kiapi`` (``{"detail": ...}``, schema
    ``ErrorResponse``) or ``openai`` (``{"error": {...}}``, schema ``OpenAIErrorResponse``).
    """

    name: str
    docs_prefix: str
    error_style: str = "kiapi"

    @property
    def error_schema(self) -> str:
        return "OpenAIErrorResponse" if self.error_style == "openai" else "ErrorResponse"

    @property
    def handler_module(self) -> str:
        return f"kiapi.handlers.{self.name}"


SPEC_SOURCES: tuple[SpecSource, ...] = (
    SpecSource("common", ""),
    SpecSource("embedding", "/v1/embedding"),
    SpecSource("chat", "/v1/chat", error_style="openai"),
    SpecSource("rerank", "/v1/rerank"),
    SpecSource("openai", "/openai", error_style="openai"),
)
SOURCES_BY_NAME = {source.name: source for source in SPEC_SOURCES}

HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


class SpecAdditionConflict(ValueError):
    """An additions file tried to change a value the contract already defines."""


def read_json(path: Path) -> dict[str, Any]:
    with path.open("rb") as fh:
        return json.load(fh)


def add_only_merge(base: Any, extra: Any, _where: str = "$") -> Any:
    """Return ``base`` deep-merged with ``extra``; ``extra`` may add keys but never change one.

    Objects merge key by key; any other value must be equal in both or the merge fails with
    :class:`SpecAdditionConflict` naming the JSON path. Neither input is modified.
    """
    if isinstance(base, dict) and isinstance(extra, dict):
        merged = copy.deepcopy(base)
        for key, value in extra.items():
            where = f"{_where}.{key}"
            merged[key] = (
                add_only_merge(base[key], value, where) if key in base else copy.deepcopy(value)
            )
        return merged
    if base != extra or type(base) is not type(extra):  # True == 1, yet not the same value
        raise SpecAdditionConflict(f"additions would change {_where}: {base!r} -> {extra!r}")
    return copy.deepcopy(base)


def load_contract(name: str, specs_dir: Path = SPECS_DIR) -> dict[str, Any]:
    """The supplied 3.1 document, untouched."""
    return read_json(specs_dir / f"{name}.json")


def load_served(name: str, specs_dir: Path = SPECS_DIR) -> dict[str, Any]:
    """The contract plus our additions (3.1): the document the server serves and is tested on."""
    contract = load_contract(name, specs_dir)
    additions_path = specs_dir / "additions" / f"{name}.json"
    if not additions_path.exists():
        return contract
    return add_only_merge(contract, read_json(additions_path))


@cache
def served_document(name: str, *, auth: bool = False) -> dict[str, Any]:
    """Cached served document for the installed ``specs/`` (treat it as read-only).

    ``auth``: the server requires a bearer token (``KIAPI_AUTH_TOKEN``), so the document also
    declares the security scheme and the 401 answers (:func:`with_bearer_auth`); without one,
    the 403 of the browser guard (:func:`with_browser_guard`).
    """
    served = load_served(name)
    error_schema = SOURCES_BY_NAME[name].error_schema
    return (
        with_bearer_auth(served, error_schema) if auth else with_browser_guard(served, error_schema)
    )


def with_browser_guard(spec: dict[str, Any], error_schema: str = "ErrorResponse") -> dict[str, Any]:
    """``spec`` plus the 403 a token-less server answers to a foreign ``Host`` or a cross-site
    ``Origin`` (``kiapi.http.guards.BrowserGuard``), on every operation. Added with
    :func:`add_only_merge`, so nothing the document says is changed."""
    forbidden = {
        "description": "The server has no token, so it serves only its own address and origin: "
        "the Host header is not a loopback name, the bound host or in KIAPI_ALLOWED_HOSTS, or "
        "the Origin header is a site other than the server's own and not in "
        "KIAPI_ALLOWED_ORIGINS (DNS rebinding and cross-site requests, see SECURITY.md).",
        "content": {
            "application/json": {"schema": {"$ref": f"#/components/schemas/{error_schema}"}}
        },
    }
    paths: dict[str, Any] = {}
    for method, path, _operation in operations(spec):
        paths.setdefault(path, {})[method] = {"responses": {"403": forbidden}}
    return add_only_merge(spec, {"paths": paths})


# Operations anyone may call when a token is required (besides the documentation pages).
PUBLIC_PATHS = frozenset({"/health"})
BEARER_SCHEME = "bearerAuth"


def with_bearer_auth(spec: dict[str, Any], error_schema: str = "ErrorResponse") -> dict[str, Any]:
    """``spec`` plus bearer-token security: the scheme, ``security`` on every operation (empty on
    :data:`PUBLIC_PATHS`) and a documented 401 whose body is ``error_schema``. Added with
    :func:`add_only_merge`, so nothing the document says is changed."""
    unauthorized = {
        "description": "No valid `Authorization: Bearer <token>` header; the server was started "
        "with KIAPI_AUTH_TOKEN.",
        "headers": {
            "WWW-Authenticate": {
                "description": 'The challenge: `Bearer realm="kiapi"`, with '
                '`error="invalid_token"` when a wrong token was sent.',
                "schema": {"type": "string"},
            }
        },
        "content": {
            "application/json": {"schema": {"$ref": f"#/components/schemas/{error_schema}"}}
        },
    }
    paths: dict[str, Any] = {}
    for method, path, _operation in operations(spec):
        if path in PUBLIC_PATHS:
            addition: dict[str, Any] = {"security": []}
        else:
            addition = {"security": [{BEARER_SCHEME: []}], "responses": {"401": unauthorized}}
        paths.setdefault(path, {})[method] = addition
    overlay = {
        "components": {
            "securitySchemes": {
                BEARER_SCHEME: {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The value of KIAPI_AUTH_TOKEN, compared in constant time.",
                }
            }
        },
        "paths": paths,
    }
    return add_only_merge(spec, overlay)


def multipart_paths() -> frozenset[str]:
    """Paths of the served operations that take ``multipart/form-data`` bodies (uploads)."""
    return frozenset(
        path
        for source in SPEC_SOURCES
        for _method, path, op in operations(served_document(source.name))
        if "multipart/form-data" in op.get("requestBody", {}).get("content", {})
    )


def operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """``(method, path, operation)`` for every operation in ``spec``, in document order."""
    found = []
    for path, item in spec.get("paths", {}).items():
        for method in HTTP_METHODS:
            if method in item:
                found.append((method, path, item[method]))
    return found


@dataclass(frozen=True)
class Route:
    """One path of a served spec: its matcher, its source and ``{METHOD: operationId}``."""

    pattern: re.Pattern
    source: SpecSource
    operations: dict[str, str]


@cache
def _route_table() -> tuple[Route, ...]:
    table = []
    for source in SPEC_SOURCES:
        for path, item in served_document(source.name).get("paths", {}).items():
            pattern = re.sub(r"\\{[^/]+?\\}", "[^/]+", re.escape(path))
            ops = {m.upper(): item[m].get("operationId", "") for m in HTTP_METHODS if m in item}
            table.append(Route(re.compile(f"^{pattern}$"), source, ops))
    return tuple(table)


def allowed_methods(path: str) -> list[str]:
    """Every method the served specs define for ``path`` (plus HEAD wherever GET is)."""
    methods: set[str] = set()
    for route in _route_table():
        if route.pattern.match(path):
            methods |= set(route.operations)
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods)


def source_of(path: str) -> SpecSource | None:
    """The served spec that defines ``path`` (None for paths no spec defines)."""
    return next((r.source for r in _route_table() if r.pattern.match(path)), None)


def operation_id(method: str, path: str) -> str | None:
    """The operationId serving ``method path`` (HEAD counts as GET), or None."""
    method = "GET" if method == "HEAD" else method
    for route in _route_table():
        if route.pattern.match(path) and method in route.operations:
            return route.operations[method]
    return None


# --------------------------------------------------------------------------- 3.1 -> 3.0


def to_openapi_30(spec: dict[str, Any]) -> dict[str, Any]:
    """Convert an OpenAPI 3.1 document to the 3.0 dialect Connexion 3.3 accepts.

    Handled: the version string; list-valued ``examples`` in schemas -> ``example`` (first
    item); ``anyOf``/``oneOf`` with ``{"type": "null"}`` and ``type: [..., "null"]`` ->
    ``nullable``; numeric ``exclusiveMinimum``/``exclusiveMaximum`` -> ``minimum``/``maximum``
    plus the boolean flag; ``contentMediaType`` -> ``format: binary``; ``const`` -> one-item
    ``enum``; ``$ref`` with sibling keywords -> ``allOf: [$ref]`` plus the siblings. 3.1-only
    top-level members (``webhooks``, ``jsonSchemaDialect``) are dropped. The input is not
    modified.
    """
    converted = copy.deepcopy(spec)
    converted["openapi"] = "3.0.3"
    converted.pop("webhooks", None)
    converted.pop("jsonSchemaDialect", None)
    license_ = converted.get("info", {}).get("license")
    if isinstance(license_, dict):
        license_.pop("identifier", None)
    for schema in _schemas(converted):
        _convert_schema_in_place(schema)
    return converted


def _schemas(spec: dict[str, Any]):
    """Yield every top-level schema object of ``spec`` (nested ones are reached recursively)."""
    components = spec.get("components", {})
    yield from components.get("schemas", {}).values()
    for name in ("parameters", "headers"):
        for obj in components.get(name, {}).values():
            if "schema" in obj:
                yield obj["schema"]
    for body in components.get("requestBodies", {}).values():
        yield from _content_schemas(body)
    for response in components.get("responses", {}).values():
        yield from _response_schemas(response)
    for item in spec.get("paths", {}).values():
        for param in item.get("parameters", []):  # shared by the path's operations
            if "schema" in param:
                yield param["schema"]
    for _method, _path, op in operations(spec):
        for param in op.get("parameters", []):
            if "schema" in param:
                yield param["schema"]
        yield from _content_schemas(op.get("requestBody", {}))
        for response in op.get("responses", {}).values():
            yield from _response_schemas(response)


def _content_schemas(obj: dict[str, Any]):
    for media in obj.get("content", {}).values():
        if "schema" in media:
            yield media["schema"]


def _response_schemas(response: dict[str, Any]):
    yield from _content_schemas(response)
    for header in response.get("headers", {}).values():
        if "schema" in header:
            yield header["schema"]


_SUBSCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems")
_SUBSCHEMA_ONE = ("items", "not", "additionalProperties", "contains")
_SUBSCHEMA_MAPS = ("properties", "patternProperties")


def _is_null_schema(schema: Any) -> bool:
    return isinstance(schema, dict) and schema == {"type": "null"}


def _convert_schema_in_place(schema: Any) -> None:
    if not isinstance(schema, dict):
        return
    # Nullable unions first (they hoist a sub-schema), then the children, then this level.
    for combinator in ("anyOf", "oneOf"):
        options = schema.get(combinator)
        if isinstance(options, list) and any(_is_null_schema(o) for o in options):
            rest = [o for o in options if not _is_null_schema(o)]
            del schema[combinator]
            schema["nullable"] = True
            if len(rest) == 1 and "$ref" not in rest[0]:
                for key, value in rest[0].items():
                    schema.setdefault(key, value)
            elif len(rest) == 1:
                schema["allOf"] = schema.get("allOf", []) + rest
            elif rest:
                schema[combinator] = rest

    for key in _SUBSCHEMA_LISTS:
        for sub in schema.get(key, []) or []:
            _convert_schema_in_place(sub)
    for key in _SUBSCHEMA_ONE:
        _convert_schema_in_place(schema.get(key))
    for key in _SUBSCHEMA_MAPS:
        for sub in (schema.get(key) or {}).values():
            _convert_schema_in_place(sub)

    examples = schema.get("examples")
    if isinstance(examples, list):
        del schema["examples"]
        if examples:
            schema.setdefault("example", examples[0])

    type_ = schema.get("type")
    if isinstance(type_, list):
        kinds = [t for t in type_ if t != "null"]
        if len(kinds) < len(type_):
            schema["nullable"] = True
        if len(kinds) == 1:
            schema["type"] = kinds[0]
        elif not kinds:  # ["null"]: only null
            del schema["type"]
            schema["enum"] = [None]
        else:
            del schema["type"]
            alternatives: list[dict[str, Any]] = [{"type": t} for t in kinds]
            if len(kinds) < len(type_):  # null among the alternatives, where nullable reaches
                alternatives.append({"nullable": True, "enum": [None]})
            if "anyOf" in schema:  # keep both: the value must match one of each list
                schema["allOf"] = [*schema.get("allOf", []), {"anyOf": alternatives}]
            else:
                schema["anyOf"] = alternatives
    elif type_ == "null":
        del schema["type"]
        schema["nullable"] = True
        schema["enum"] = [None]

    for exclusive, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        value = schema.get(exclusive)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            schema[bound] = value
            schema[exclusive] = True

    if "contentMediaType" in schema:
        del schema["contentMediaType"]
        schema.pop("contentEncoding", None)
        schema["format"] = "binary"
    elif schema.get("contentEncoding") == "base64":
        del schema["contentEncoding"]
        schema["format"] = "byte"

    if "const" in schema:
        schema["enum"] = [schema.pop("const")]

    if "$ref" in schema and len(schema) > 1:
        ref = schema.pop("$ref")
        schema["allOf"] = [{"$ref": ref}, *schema.get("allOf", [])]
