"""JSON operations on fixed paths, served without Connexion's per-request routing.

For a ``POST /v1/embedding`` Connexion's stack routes the request three times (its routing
middleware, then the app's router behind two more middlewares, each matching the path against
every mounted API in turn), then builds the handler's decorator chain anew for the request
(``functools.update_wrapper``, ``inspect.signature``) and a fresh ``ConnexionRequest`` at every
``connexion.request`` access. At 12-token embeddings that is most of a request's event-loop time
(``bench/request_path.py``).

:class:`DirectOperations` takes the operations that need none of it: a fixed path (no path
template), no declared parameters, a JSON request body and a coroutine handler that takes no
arguments (it reads the body with ``kiapi.handlers.json_body()``). For a request with exactly that
method and path and a JSON content type (or none: Connexion then assumes the operation's
first), it runs what Connexion's stack would: the same body validator (``VALIDATOR_MAP``), the
same context variables the handler reads, the same response decorator and JSON serialiser.
Every other request (another content type, a templated path, the docs, any request under a
``root_path``: Connexion routes those without the prefix) goes on to Connexion unchanged, which
also answers 404, 405 and 415.

It sits where Connexion's routing middleware sits: inside the exception middleware (what it
raises is mapped like any error) and kiapi's guards (Host, Origin, token, body size).

It leans on Connexion 3.3 internals, pinned in the lock: ``SpecMiddleware.add_api``'s
arguments, ``operation_cls.from_spec``, the context variables of ``connexion.context``, and
``AsyncResponseDecorator``. ``tests/contract/test_direct_operations.py`` checks the seam:
every operation taken here answers as through Connexion.
"""

from __future__ import annotations

import inspect
import typing as t
from dataclasses import dataclass

from connexion import utils
from connexion.context import _context, _operation, _receive, _scope
from connexion.decorators.response import AsyncResponseDecorator
from connexion.frameworks.starlette import Starlette as StarletteFramework
from connexion.http_facts import METHODS
from connexion.middleware.abstract import ROUTING_CONTEXT, SpecMiddleware
from connexion.operations import AbstractOperation
from connexion.resolver import ResolverError
from starlette.types import ASGIApp, Receive, Scope, Send

JSON = "application/json"


@dataclass(frozen=True)
class DirectOperation:
    """One operation served directly: its Connexion operation, body checks and handler."""

    operation: AbstractOperation
    base_path: str
    validator_cls: type
    schema: dict
    required: bool
    nullable: bool
    respond: t.Callable[[], t.Awaitable[t.Any]]


def takes_direct(operation: AbstractOperation) -> bool:
    """Whether an operation needs nothing of Connexion's routing, parameters or decorators."""
    if "{" in operation.path or operation.parameters:
        return False
    if list(operation.consumes) != [JSON] or not operation.body_schema(JSON):
        return False
    function = inspect.unwrap(operation.function)
    return inspect.iscoroutinefunction(function) and not inspect.signature(function).parameters


class DirectOperations(SpecMiddleware):
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.routes: dict[tuple[str, str], DirectOperation] = {}

    def add_api(self, specification, *, base_path: str | None = None, **kwargs) -> None:
        """Called by Connexion for every API with ``add_api``'s options (resolver, jsonifier,
        validator map...)."""
        if base_path is None:  # as Connexion's APIs: the spec's own (its first server's path)
            base_path = specification.base_path or ""
        validator_cls = (kwargs.get("validator_map") or {}).get("body", {}).get(JSON)
        if validator_cls is None:
            return
        decorator = AsyncResponseDecorator(
            framework=StarletteFramework, jsonifier=kwargs["jsonifier"]
        )
        for path, methods in specification.get("paths", {}).items():
            for method in methods:
                if method not in METHODS:
                    continue
                try:
                    operation = specification.operation_cls.from_spec(
                        specification,
                        path=path,
                        method=method,
                        resolver=kwargs["resolver"],
                        uri_parser_class=kwargs.get("uri_parser_class"),
                    )
                except ResolverError:
                    continue
                if not takes_direct(operation):
                    continue
                key = (method.upper(), base_path + path)
                self.routes.setdefault(
                    key,
                    DirectOperation(
                        operation=operation,
                        base_path=base_path,
                        validator_cls=validator_cls,
                        schema=operation.body_schema(JSON),
                        required=operation.request_body.get("required", False),
                        nullable=utils.is_nullable(operation.body_definition(JSON)),
                        respond=decorator(operation.function),
                    ),
                )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope.get("root_path"):
            direct = self.routes.get((scope["method"], scope["path"]))
            if direct is not None:
                mime_type, encoding = utils.split_content_type(
                    utils.extract_content_type(scope["headers"])
                )
                if mime_type is None or mime_type == JSON:  # BodyLimit lowered it
                    encoding = "utf-8" if encoding is None else encoding  # as Connexion
                    await self._serve(direct, encoding, scope, receive, send)
                    return
        await self.app(scope, receive, send)

    @staticmethod
    async def _serve(
        direct: DirectOperation, encoding: str, scope: Scope, receive: Receive, send: Send
    ) -> None:
        operation = direct.operation
        scope.setdefault("extensions", {})[ROUTING_CONTEXT] = {
            "api_base_path": direct.base_path,
            "operation_id": operation.operation_id,
        }
        validator = direct.validator_cls(
            schema=direct.schema,
            required=direct.required,
            nullable=direct.nullable,
            encoding=encoding,
            strict_validation=False,
        )
        receive, scope = await validator.wrap_receive(receive, scope=scope)
        _context.set(scope["extensions"].get("connexion_context", {}))
        _operation.set(operation)
        _receive.set(receive)
        _scope.set(scope)
        response = await direct.respond()
        await response(scope, receive, send)
