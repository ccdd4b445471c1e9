"""Documentation pages: each served spec at ``<prefix>/openapi.json`` with Swagger UI and ReDoc.

The pages load their JavaScript and CSS from this server (``/docs-assets/...``), taken from the
``drf-spectacular-sidecar`` package's static folder (fetched by ``kiapi setup`` or installed
without its Django dependency; it is only a carrier of the swagger-ui-dist and redoc bundles),
so they render with no internet access. The package is located without importing it (its
``__init__`` imports Django), at each request: a ``kiapi setup`` run beside a live server
takes effect at once.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, Response

from kiapi.runtime import pinned
from kiapi.runtime.errors import NotFound, Unavailable
from kiapi.specs import SPEC_SOURCES, SpecSource, served_document

ASSETS_PACKAGE = "drf_spectacular_sidecar"
ASSETS = {
    "swagger-ui.css": ("swagger-ui-dist/swagger-ui.css", "text/css"),
    "swagger-ui-bundle.js": ("swagger-ui-dist/swagger-ui-bundle.js", "text/javascript"),
    "favicon-32x32.png": ("swagger-ui-dist/favicon-32x32.png", "image/png"),
    "redoc.standalone.js": ("redoc/bundles/redoc.standalone.js", "text/javascript"),
}
ASSETS_PATH = "/docs-assets"


_found_assets: Path | None = None


def assets_dir() -> Path | None:
    """The Swagger UI / ReDoc assets folder, or None while it is not set up. A folder once
    found is remembered (one ``stat`` per request, not a package lookup); a missing one is
    looked up again each time, so that ``kiapi setup`` beside a live server takes effect."""
    global _found_assets
    if _found_assets is None or not _found_assets.is_dir():
        found = pinned.package_folder(ASSETS_PACKAGE)
        _found_assets = found / "static" / ASSETS_PACKAGE if found is not None else None
    return _found_assets


SWAGGER_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title} – Swagger UI</title>
<link rel="icon" type="image/png" href="{assets}/favicon-32x32.png">
<link rel="stylesheet" href="{assets}/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="{assets}/swagger-ui-bundle.js"></script>
<script>
window.ui = SwaggerUIBundle({{url: {spec_url}, dom_id: "#swagger-ui", deepLinking: true}});
</script>
</body></html>
"""

REDOC_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title} – ReDoc</title>
<link rel="icon" type="image/png" href="{assets}/favicon-32x32.png">
<style>body {{ margin: 0; padding: 0; }}</style></head>
<body><redoc spec-url={spec_url_attr}></redoc>
<script src="{assets}/redoc.standalone.js"></script>
</body></html>
"""


def _page(template: str, source: SpecSource) -> HTMLResponse:
    spec_url = f"{source.docs_prefix}/openapi.json"
    title = served_document(source.name)["info"]["title"]
    return HTMLResponse(
        template.format(
            title=html.escape(title),
            assets=ASSETS_PATH,
            spec_url=json.dumps(spec_url),
            spec_url_attr=f'"{html.escape(spec_url)}"',
        )
    )


def _spec_view(source: SpecSource, auth: bool):
    body = json.dumps(served_document(source.name, auth=auth)).encode()

    async def view(_request: Request) -> Response:
        return Response(body, media_type="application/json")

    return view


def _page_view(template: str, source: SpecSource):
    page = _page(template, source)  # rendered once, when the routes are built

    async def view(_request: Request) -> Response:
        return page

    return view


async def asset_view(request: Request) -> Response:
    name = request.path_params["name"]
    if name not in ASSETS:
        raise NotFound(f"no documentation asset {name!r}")
    root = assets_dir()
    if root is None:
        raise Unavailable(
            "documentation assets are not set up",
            hint="run `kiapi setup` (it fetches them from the package index)",
        )
    relative, media_type = ASSETS[name]
    return FileResponse(root / relative, media_type=media_type)


def doc_routes(*, auth: bool = False) -> list[tuple[str, object]]:
    """``(path, view)`` for every documentation page, spec document and asset; ``auth``: the
    spec documents declare the bearer token (:func:`kiapi.specs.with_bearer_auth`)."""
    routes: list[tuple[str, object]] = [(f"{ASSETS_PATH}/{{name}}", asset_view)]
    for source in SPEC_SOURCES:
        prefix = source.docs_prefix
        routes.append((f"{prefix}/openapi.json", _spec_view(source, auth)))
        routes.append((f"{prefix}/docs.html", _page_view(SWAGGER_PAGE, source)))
        routes.append((f"{prefix}/redoc.html", _page_view(REDOC_PAGE, source)))
        routes.append((f"{prefix}/docs", _page_view(SWAGGER_PAGE, source)))
    return routes
