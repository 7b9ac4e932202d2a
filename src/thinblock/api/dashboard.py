"""The web dashboard at ``/`` and the offline Swagger UI at ``/docs``.

Everything the browser loads comes from the daemon itself -- no CDN, no internet (the machines
thinblock runs on often have none):

* ``/`` is ``static/index.html``; ``/static/...`` its script and style sheet (plain HTML, CSS and
  JavaScript written for thinblock, packaged with it; no build step).  The page holds no data: it
  asks for the bearer token in a login form, keeps it in the tab's ``sessionStorage``, and does
  everything through the REST API under ``/api/v1`` with ``Authorization: Bearer`` and JSON bodies
  (also ``{}`` for body-less actions), as any other client.
* ``/docs`` is Swagger UI from the packaged copy of the ``swagger-ui-bundle-v2`` distribution,
  served under ``/docs/assets/``; the OpenAPI document declares the bearer scheme, so Swagger
  shows Authorize.

A browser cannot attach a bearer token to a page it navigates to, so these pages, their assets
and the OpenAPI document (a description, no data) are public for GET and HEAD
(``is_public``); the authentication middleware lets them through and guards everything else.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(str(resources.files("thinblock.api") / "static"))
PUBLIC_EXACT = frozenset({"/", "/docs", "/favicon.ico"})
PUBLIC_PREFIXES = ("/static/", "/docs/assets/")


def swagger_ui_dir() -> Path | None:
    """The packaged Swagger UI (swagger-ui-bundle-v2), or None when it is not installed."""
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        return None
    path = Path(swagger_ui_path)
    return path if (path / "swagger-ui-bundle.js").is_file() else None


def is_public(method: str, path: str, openapi_url: str) -> bool:
    """GET/HEAD of the dashboard page, its assets, /docs and the OpenAPI document need no token."""
    if method not in ("GET", "HEAD"):
        return False
    return path in PUBLIC_EXACT or path == openapi_url or path.startswith(PUBLIC_PREFIXES)


def install(app: FastAPI, *, openapi_url: str) -> None:
    """Add ``/``, ``/static``, ``/docs`` and ``/docs/assets`` to ``app`` (create it with
    ``docs_url=None``: this ``/docs`` replaces FastAPI's, which loads Swagger UI from a CDN)."""
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def dashboard() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> FileResponse:
        return FileResponse(STATIC_DIR / "favicon.svg", media_type="image/svg+xml")

    swagger = swagger_ui_dir()
    if swagger is not None:
        app.mount("/docs/assets", StaticFiles(directory=swagger), name="swagger-ui")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> Response:
        if swagger is None:
            return HTMLResponse(
                "<p>Swagger UI is not installed (pip install swagger-ui-bundle-v2); the OpenAPI "
                f'document is at <a href="{openapi_url}">{openapi_url}</a>.</p>',
                status_code=503,
            )
        return get_swagger_ui_html(
            openapi_url=openapi_url,
            title="thinblock API",
            swagger_js_url="/docs/assets/swagger-ui-bundle.js",
            swagger_css_url="/docs/assets/swagger-ui.css",
            swagger_favicon_url="/favicon.ico",
            swagger_ui_parameters={"persistAuthorization": True},
        )


__all__ = ["PUBLIC_PREFIXES", "STATIC_DIR", "install", "is_public", "swagger_ui_dir"]
