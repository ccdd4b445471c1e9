"""Request validators that report schema violations the way the contract does.

Connexion's stock validators answer 400 problem+json with one message; the contract promises
422 ``{"detail": [{"loc": [...], "msg": ..., "type": ...}]}`` listing every violation (the
FastAPI shape). These subclasses plug into Connexion's ``validator_map`` and raise
:class:`~kiapi.runtime.errors.RequestInvalid` instead.
"""

from __future__ import annotations

import typing as t

from connexion.datastructures import MediaTypeDict
from connexion.utils import is_null, is_nullable
from connexion.validators import JSONRequestBodyValidator, ParameterValidator
from jsonschema import Draft4Validator, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope

from kiapi.http.bounded_schema import BoundedRequestValidator, BoundedValidator, excerpt
from kiapi.http.guards import has_body, replay_body
from kiapi.http.jsonbody import ValueCounter, check_surrogates, parse
from kiapi.http.multipart import StreamingMultipartValidator
from kiapi.runtime.errors import RequestInvalid

PARAMETER_LOCATIONS = ("path", "query", "header", "cookie")
EXCERPT_INPUT_CHARS = 100  # a 422 shows at most this much of a rejected string


def schema_errors(
    validator: Draft4Validator, instance: t.Any, loc_prefix: list[t.Any]
) -> list[dict[str, t.Any]]:
    """Every violation of ``instance`` as ``{loc, msg, type, input}`` (FastAPI-style)."""
    errors = []
    for error in sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path)):
        errors.extend(_describe(error, loc_prefix))
    return errors


def _describe(error: ValidationError, loc_prefix: list[t.Any]) -> list[dict[str, t.Any]]:
    loc = [*loc_prefix, *error.absolute_path]
    if error.validator == "required" and isinstance(error.instance, dict):
        return [
            {"loc": [*loc, name], "msg": "Field required", "type": "missing"}
            for name in error.validator_value
            if name not in error.instance
        ]
    entry: dict[str, t.Any] = {"loc": loc, "msg": error.message, "type": str(error.validator)}
    if isinstance(error.instance, str) and len(error.instance) > EXCERPT_INPUT_CHARS:
        entry["input"] = error.instance[:EXCERPT_INPUT_CHARS] + "..."
    elif isinstance(error.instance, int):  # bool too: True < 10**30
        entry["input"] = _short_int(error.instance)
    elif isinstance(error.instance, (str, float)) or error.instance is None:
        entry["input"] = error.instance
    return [entry]


def _short_int(value: int) -> int | str:
    return value if abs(value) < 10**30 else excerpt(value)


def missing_body_error() -> RequestInvalid:
    return RequestInvalid([{"loc": ["body"], "msg": "Field required", "type": "missing"}])


class ContractParameterValidator(ParameterValidator):
    def validate(self, scope) -> None:
        if not self.strict_validation and not any(
            self.parameters.get(location) for location in PARAMETER_LOCATIONS
        ):
            return  # nothing to check (e.g. POST /v1/embedding): skip building a request view
        super().validate(scope)

    def validate_request(self, request) -> None:
        errors: list[dict[str, t.Any]] = []
        sources = {
            "path": lambda name: request.path_params.get(name.replace("-", "_")),
            "query": request.query_params.get,
            "header": request.headers.get,
            "cookie": request.cookies.get,
        }
        for location in PARAMETER_LOCATIONS:
            for param in self.parameters.get(location, []):
                value = sources[location](param["name"])
                errors.extend(self._param_errors(location, value, param))
        if errors:
            raise RequestInvalid(errors)

    @staticmethod
    def _param_errors(location: str, value: t.Any, param: dict) -> list[dict[str, t.Any]]:
        loc = [location, param["name"]]
        if is_nullable(param) and is_null(value):
            return []
        if value is None:
            if param.get("required"):
                return [{"loc": loc, "msg": "Field required", "type": "missing"}]
            return []
        return schema_errors(validator_for(param.get("schema", param)), value, loc)


_validators: dict[tuple[int, type], tuple[dict, Draft4Validator]] = {}


def validator_for(schema: dict, cls: type[Draft4Validator] = BoundedValidator) -> Draft4Validator:
    """The jsonschema validator of ``schema``, built on its first use.

    Connexion creates validator objects per request but hands them the operation's same
    schema dicts; building a jsonschema validator per request cost more than validating. The
    cache is keyed by the schema object (the entry keeps it alive, so its id is never reused)
    and holds one entry per parameter and body schema of the served specs.
    """
    key = (id(schema), cls)
    cached = _validators.get(key)
    if cached is None or cached[0] is not schema:
        cached = _validators[key] = (
            schema,
            cls(schema, format_checker=Draft4Validator.FORMAT_CHECKER),
        )
    return cached[1]


PARSED_BODY = "kiapi.json_body"
"""Scope key of the JSON body as the validator parsed it. Handlers read it from there
(``kiapi.handlers.json_body``) rather than take a ``body`` argument, which Connexion would parse
a second time, on the event loop."""

INLINE_BYTES = 64 * 1024
INLINE_VALUES = 1000
"""Bodies up to this size and value count are parsed and checked on the event loop (a thread
hop costs more than the work, at most ~2 ms); others in a worker thread, so the loop keeps
serving other requests."""


class ContractJSONBodyValidator(JSONRequestBodyValidator):
    """JSON bodies: values counted while the bytes arrive (:class:`ValueCounter`), then parsed
    and checked against the schema with bounded messages, off the event loop when large.

    The bytes are kept once (not Connexion's per-message copies beside the joined body) and
    replayed to the handler as one message."""

    @property
    def _validator(self):
        return validator_for(self._schema, BoundedRequestValidator)

    async def wrap_receive(self, receive: Receive, *, scope: Scope):
        if not has_body(scope):
            if self._required:
                raise missing_body_error()
            return await super().wrap_receive(receive, scope=scope)
        chunks, values = await self._read(receive)
        if sum(map(len, chunks)) > INLINE_BYTES or values > INLINE_VALUES:
            raw, body = await run_in_threadpool(self._join_and_check, chunks, values)
        else:
            raw, body = self._join_and_check(chunks, values)
        return replay_body(raw, receive), {**scope, PARSED_BODY: body}

    @staticmethod
    async def _read(receive: Receive) -> tuple[list[bytes], int]:
        """The body's chunks and (an upper bound of) its value count, counted as the chunks
        arrive. They are joined off the loop: a join of megabytes is a memcpy that CPython
        runs without the GIL, which helps only on another thread."""
        chunks, counter = [], ValueCounter()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                raise RequestInvalid(
                    [
                        {
                            "loc": ["body"],
                            "msg": "client disconnected during the body",
                            "type": "incomplete",
                        }
                    ]
                )
            chunk = message.get("body", b"")
            counter.feed(chunk)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks, counter.values

    def _join_and_check(self, chunks: list[bytes], values: int) -> tuple[bytes, t.Any]:
        raw = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()  # the joined copy is the only one kept
        body = parse(raw, self._encoding, values)
        check_surrogates(raw, body)
        self._validate(body)
        return raw, body

    def _validate(self, body: t.Any) -> None:
        if body is None:
            if not self._nullable:
                raise missing_body_error()
            return
        errors = schema_errors(self._validator, body, ["body"])
        if errors:
            raise RequestInvalid(errors)


VALIDATOR_MAP = {
    "parameter": ContractParameterValidator,
    # Must be a MediaTypeDict: a plain dict silently disables body validation in Connexion.
    "body": MediaTypeDict(
        {
            "*/*json": ContractJSONBodyValidator,
            "multipart/form-data": StreamingMultipartValidator,
        }
    ),
}
