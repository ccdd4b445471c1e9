"""Request validators that report schema violations the way the contract does.

Connexion's stock validators answer 400 problem+json with one message; the contract promises
422 ``{"detail": [{"loc": [...], "msg": ..., "type": ...}]}`` listing every violation (the
FastAPI shape). These subclasses plug into Connexion's ``validator_map`` and raise
:class:`~kiapi.runtime.errors.RequestInvalid` instead.
"""

from __future__ import annotations

import json
import re
import typing as t

from connexion.datastructures import MediaTypeDict
from connexion.json_schema import Draft4RequestValidator
from connexion.utils import is_null, is_nullable
from connexion.validators import JSONRequestBodyValidator, ParameterValidator
from jsonschema import Draft4Validator, ValidationError
from starlette.datastructures import Headers
from starlette.types import Receive, Scope

from kiapi.http.multipart import StreamingMultipartValidator
from kiapi.runtime.errors import RequestInvalid

PARAMETER_LOCATIONS = ("path", "query", "header", "cookie")


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
    if isinstance(error.instance, (str, int, float, bool)) or error.instance is None:
        entry["input"] = error.instance
    return [entry]


def missing_body_error() -> RequestInvalid:
    return RequestInvalid([{"loc": ["body"], "msg": "Field required", "type": "missing"}])


def has_body(scope: Scope) -> bool:
    """True when the request announces a body (a non-zero Content-Length, or chunked)."""
    headers = Headers(scope=scope)
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return True
    try:
        return int(headers.get("content-length", "0")) > 0
    except ValueError:
        return False


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


def validator_for(schema: dict, cls: type[Draft4Validator] = Draft4Validator) -> Draft4Validator:
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


_ESCAPED_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")


def lone_surrogates(value: t.Any, loc: tuple = ()) -> t.Iterator[list[t.Any]]:
    """The location of every string in a parsed JSON value (keys included) that holds a lone
    surrogate: JSON's ``\\ud800`` escapes parse to Python strings no UTF-8 encoder (tokenizer,
    file system, log) accepts."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            yield list(loc)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from lone_surrogates(key, loc)
            yield from lone_surrogates(item, (*loc, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from lone_surrogates(item, (*loc, index))


class ContractJSONBodyValidator(JSONRequestBodyValidator):
    @property
    def _validator(self):
        return validator_for(self._schema, Draft4RequestValidator)

    async def wrap_receive(self, receive: Receive, *, scope: Scope):
        if not has_body(scope) and self._required:
            raise missing_body_error()
        return await super().wrap_receive(receive, scope=scope)

    async def _parse(self, stream, scope: Scope) -> t.Any:
        raw = b"".join([chunk async for chunk in stream])
        if not raw:
            return None
        try:
            body = json.loads(raw.decode(self._encoding))
        except RecursionError:
            raise RequestInvalid(
                [{"loc": ["body"], "msg": "JSON nested too deeply", "type": "json_invalid"}]
            ) from None
        except (UnicodeDecodeError, LookupError) as exc:
            raise RequestInvalid(
                [
                    {
                        "loc": ["body"],
                        "msg": f"body is not valid {self._encoding}: {exc}",
                        "type": "json_invalid",
                    }
                ]
            ) from None
        except json.JSONDecodeError as exc:
            raise RequestInvalid(
                [
                    {
                        "loc": ["body", exc.pos],
                        "msg": f"JSON decode error: {exc.msg}",
                        "type": "json_invalid",
                    }
                ]
            ) from None

        if _ESCAPED_SURROGATE.search(raw):
            errors = [
                {
                    "loc": ["body", *loc],
                    "msg": "lone surrogate: not valid Unicode text",
                    "type": "string_unicode",
                }
                for loc in lone_surrogates(body)
            ]
            if errors:
                raise RequestInvalid(errors)
        return body

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
