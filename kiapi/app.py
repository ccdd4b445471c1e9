"""The ASGI application: Connexion loads every spec and routes operationIds to handlers.

``create_app(settings)`` builds the app; its lifespan creates the :class:`Runtime`, starts it
before the first request, hands it to handlers through the lifespan state
(``request.state.runtime``) and stops it at shutdown.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial

from connexion import AsyncApp
from connexion.middleware import ConnexionMiddleware
from connexion.middleware.exceptions import ExceptionMiddleware
from connexion.middleware.response_validation import ResponseValidationMiddleware
from connexion.middleware.routing import RoutingMiddleware
from connexion.middleware.security import SecurityMiddleware
from connexion.middleware.swagger_ui import SwaggerUIMiddleware
from connexion.options import SwaggerUIOptions
from connexion.resolver import RelativeResolver
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Mount

from kiapi.config import Settings
from kiapi.http.direct import DirectOperations
from kiapi.http.docs import ASSETS_PATH, doc_routes
from kiapi.http.errors import install_error_handlers
from kiapi.http.guards import BearerAuth, BodyLimit, BrowserGuard, HostAllowList
from kiapi.http.jsonifier import OrjsonJsonifier
from kiapi.http.multipart import is_multipart
from kiapi.http.observe import ObserveRequests
from kiapi.http.quiet import ReleaseWhenQuiet
from kiapi.http.validation import VALIDATOR_MAP
from kiapi.runtime.core import Runtime
from kiapi.specs import (
    PUBLIC_PATHS,
    SPEC_SOURCES,
    multipart_paths,
    served_document,
    to_openapi_30,
)

log = logging.getLogger(__name__)

RuntimeFactory = Callable[[Settings], Runtime]


# Connexion's stack without the layers kiapi does not use: its Swagger UI (kiapi serves each
# spec's docs itself), security (the specs declare no security schemes) and response validation
# (off in the server; the contract tests validate every response against the 3.1 specs). Each
# layer costs every request a pass through its router.
class ChainedRoutingMiddleware(RoutingMiddleware):
    """Connexion's routing with APIs on one base path chained in the order they were added.

    Connexion 3.3 makes *every* earlier API on the same base path fall through to the newest
    one, so with three APIs on ``""`` the first skipped the second (``/v1/embedding`` answered
    404 once ``specs/openai.json`` was added). Here each API on a base path falls through to
    the next one added on it, and the last to the next middleware.
    """

    def add_api(self, *args, **kwargs) -> None:
        super().add_api(*args, **kwargs)
        mounts = [r for r in self.router.routes if isinstance(r, Mount)]
        same_path = [m for m in mounts if m.path == mounts[-1].path]
        for earlier, later in zip(same_path, same_path[1:], strict=False):
            earlier.app.default = later.app


MIDDLEWARES = [
    ChainedRoutingMiddleware if m is RoutingMiddleware else m
    for m in ConnexionMiddleware.default_middlewares
    if m not in (SwaggerUIMiddleware, SecurityMiddleware, ResponseValidationMiddleware)
]


def middlewares(settings: Settings, doc_paths: list[str]) -> list:
    """:data:`MIDDLEWARES` with kiapi's guards just inside the exception middleware (what they
    raise is mapped like any error): without a token the browser guard (Host, Origin), with
    one the bearer token first, so an anonymous body is never
    read, then the body limit. Outermost, :class:`ObserveRequests` (log line, metrics) and
    :class:`ReleaseWhenQuiet` see every request.
    ``doc_paths``: the documentation routes, public like :data:`PUBLIC_PATHS`."""
    guards: list = []
    if not settings.token:
        guards.append(
            partial(
                BrowserGuard,
                hosts=HostAllowList(settings.host, settings.allowed_hosts),
                allowed_origins=settings.allowed_origins,
            )
        )
    if settings.token:
        public = frozenset(PUBLIC_PATHS | set(doc_paths))
        guards.append(partial(BearerAuth, token=settings.token, is_public=public_path(public)))
    uploads = multipart_paths()
    guards.append(
        partial(
            BodyLimit,
            max_bytes=settings.max_body_bytes,
            exempt=lambda scope: scope["path"] in uploads and is_multipart(scope),
        )
    )
    position = MIDDLEWARES.index(ExceptionMiddleware) + 1
    # With a token, browsers may call from the configured origins (CORS; preflights need no
    # token). Without one, BrowserGuard refuses other origins outright.
    cors = (
        [
            partial(
                CORSMiddleware,
                allow_origins=settings.allowed_origins,
                allow_methods=["GET", "POST", "DELETE"],
                allow_headers=["Authorization", "Content-Type"],
                expose_headers=["X-Kiapi-Job-Id", "Retry-After"],
            )
        ]
        if settings.token and settings.allowed_origins
        else []
    )
    return [
        ObserveRequests,
        ReleaseWhenQuiet,
        *cors,
        *MIDDLEWARES[:position],
        *guards,
        DirectOperations,
        *MIDDLEWARES[position:],
    ]


def public_path(public: frozenset[str]):
    """A predicate for public paths; doc assets are the one templated route."""
    assets = f"{ASSETS_PATH}/"

    def is_public(path: str) -> bool:
        return path in public or path.startswith(assets)

    return is_public


def create_app(
    settings: Settings | None = None, *, runtime_factory: RuntimeFactory = Runtime
) -> AsyncApp:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(_app) -> AsyncIterator[dict]:
        runtime = runtime_factory(settings)
        runtime.start()
        log.info(
            "kiapi ready: files in %s, memory budget %.2f GB",
            settings.files_root,
            settings.memory_limit_gb,
        )
        try:
            yield {"runtime": runtime}
        finally:
            runtime.stop()

    docs = doc_routes(auth=bool(settings.token))
    app = AsyncApp(
        "kiapi",
        lifespan=lifespan,
        validator_map=VALIDATOR_MAP,
        jsonifier=OrjsonJsonifier(),
        middlewares=middlewares(settings, [path for path, _view in docs]),
        # We serve each spec's docs ourselves: Connexion would serve the 3.0 conversion, and two
        # APIs on one base path hide each other's docs.
        swagger_ui_options=SwaggerUIOptions(serve_spec=False, swagger_ui=False),
    )
    for source in SPEC_SOURCES:
        app.add_api(
            to_openapi_30(served_document(source.name, auth=bool(settings.token))),
            name=source.name,
            resolver=RelativeResolver(source.handler_module),
        )
    for path, view in docs:
        app.add_url_rule(path, endpoint=path, view_func=view, methods=["GET"])
    install_error_handlers(app)
    return app
