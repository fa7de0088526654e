"""The FastAPI application: routers for logging in, the sites, the central team (and, in later issues, the
access committee, the dashboard and validation), one layout, one set of security headers.

`create_app(settings)` is all a server needs; `serve` runs it with uvicorn on 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response
from starlette.staticfiles import StaticFiles

from nccid.errors import NccidError, PortalError
from nccid.portal.accounts import Site
from nccid.portal.central import LoadRunner
from nccid.portal.settings import PortalSettings
from nccid.portal.web import HERE, BadRequest, Forbidden, Redirect, TooLarge, redirect, render, security_headers
from nccid.stats.site_summary import SiteSummary, catalog_reader, site_summary
from nccid.store import ObjectStore, open_store

T = TypeVar("T")
_LOG = logging.getLogger("nccid.portal")


def _load_key(settings: PortalSettings):
    from nccid.site.vault import PseudonymKey

    try:
        return PseudonymKey.load(settings.key_file)
    except (NccidError, OSError):
        return None


def create_app(settings: PortalSettings) -> FastAPI:
    """The portal for these settings. Creates the state folder (owner-only) and portal.sqlite if needed."""
    from nccid.portal import routes_admin, routes_auth, routes_site, routes_validation
    from nccid.portal.accounts import PortalDB
    from nccid.portal.validation_jobs import ValidationRunner
    from nccid.validation.service import Workspace

    settings.state_dir.mkdir(parents=True, exist_ok=True)
    PortalDB(settings.db_path).close()
    app = FastAPI(title="nccid portal", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings = settings
    app.state.store = open_store(settings.store_url)
    app.state.key = _load_key(settings)
    app.state.runner = LoadRunner(
        settings.store_url, settings.catalog_path, settings.db_path, workers=settings.load_workers
    )
    # the validators' workspace: $NCCID_VALIDATION (shared with `nccid validate`), else beside the portal's state
    app.state.validation = Workspace(
        Path(os.environ.get("NCCID_VALIDATION") or settings.state_dir / "validation"), create=True
    )
    app.state.validation_runner = ValidationRunner(app.state.validation, settings.store_url, settings.db_path)
    app.state.catalog_problem = ""
    catalog_path = settings.catalog()

    def read_catalog(fn: Callable[[Callable], T], default: T) -> T:
        """Run read-only queries on a fresh, checked connection to the store's catalog (`default` before the
        first load, or when the catalog cannot be believed: `catalog_problem` then says why, for the team)."""
        from nccid.warehouse.catalog import catalog_for

        if not catalog_path.exists() and not _holds_processed(app.state.store):
            return default  # before the first load: nothing to read, and a reader creates no catalog
        try:
            catalog = catalog_for(app.state.store, settings.catalog_path)
        except NccidError as exc:
            app.state.catalog_problem = str(exc)
            return default
        app.state.catalog_problem = ""
        try:
            return fn(catalog_reader(catalog))
        finally:
            catalog.close()

    def summaries(site: Site) -> SiteSummary:
        empty = SiteSummary(site.prefix, site.centres)
        return read_catalog(lambda q: site_summary(q, site.prefix, site.centres), empty)

    app.state.read_catalog = read_catalog
    app.state.summaries = summaries
    app.state.file_sheet = routes_site.upload_into(app.state)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    app.include_router(routes_auth.router)
    app.include_router(routes_site.router)
    app.include_router(routes_admin.router)
    app.include_router(routes_validation.router)

    @app.middleware("http")
    async def headers(request: Request, call_next: Callable) -> Response:
        response = await call_next(request)
        security_headers(response, settings, request.url.path.startswith("/static/"))
        return response

    @app.exception_handler(Redirect)
    async def on_redirect(request: Request, exc: Redirect) -> Response:
        return redirect(exc.url)

    @app.exception_handler(Forbidden)
    async def on_forbidden(request: Request, exc: Forbidden) -> Response:
        return render(
            request,
            "message.html",
            status=403,
            title="Not allowed",
            message="Your account may not open this page, or the form had expired: go back and reload.",
        )

    @app.exception_handler(BadRequest)
    async def on_bad_request(request: Request, exc: BadRequest) -> Response:
        return render(request, "message.html", status=400, title="Bad request", message=str(exc))

    @app.exception_handler(TooLarge)
    async def on_too_large(request: Request, exc: TooLarge) -> Response:
        return render(request, "message.html", status=413, title="Too large", message="The request is too large.")

    @app.exception_handler(404)
    async def on_missing(request: Request, exc: Exception) -> Response:
        return render(request, "message.html", status=404, title="Not found", message="There is no such page.")

    @app.exception_handler(Exception)
    async def on_error(request: Request, exc: Exception) -> Response:
        route = request.scope.get("route")  # the template (/setup/{token}), never the path with its secrets
        where = getattr(route, "path", None) or "(no route)"
        _LOG.error("portal error %s on %s %s", type(exc).__name__, request.method, where)
        return render(
            request,
            "message.html",
            status=500,
            title="Something went wrong",
            message="The portal could not answer this request; the team has the error in its log.",
        )

    return app


def _holds_processed(store: ObjectStore) -> bool:
    return any(next(iter(store.list(f"{group}/")), None) is not None for group in ("training", "validation"))


def serve(
    settings: PortalSettings,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    ssl_keyfile: str | None = None,
    ssl_certfile: str | None = None,
    ready: Callable[[str], None] | None = None,
) -> None:
    """Run the portal with uvicorn until interrupted. Behind a TLS reverse proxy keep host 127.0.0.1 and set
    `secure_cookies`; or give uvicorn the key and certificate directly.

    The socket is bound here first, so that `ready` receives the address really served (port 0 picks a free
    one). Raises PortalError when a key file was named but cannot be read (uploads would all be refused), and
    OSError when the address cannot be bound."""
    import socket

    import uvicorn

    if settings.key_file is not None and _load_key(settings) is None:
        raise PortalError(f"cannot read the pseudonym key {settings.key_file}: uploads would all be refused")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound = sock.getsockname()[1]
    scheme = "https" if ssl_keyfile and ssl_certfile else "http"
    if ready is not None:
        ready(f"{scheme}://{host}:{bound}/")
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings),
            ssl_keyfile=ssl_keyfile,
            ssl_certfile=ssl_certfile,
            log_level="warning",
            access_log=False,
            server_header=False,
            proxy_headers=False,
        )
    )
    server.run(sockets=[sock])
