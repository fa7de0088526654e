"""The web plumbing every router shares: security headers, sessions and CSRF, in-memory form parsing with a
size limit, and page rendering. No rules of the programme live here."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.templating import Jinja2Templates

from nccid.portal.accounts import PortalDB, Session, User

try:  # python-multipart >= 0.0.13 names its module python_multipart; older releases called it multipart
    from python_multipart.multipart import MultipartParseError, MultipartParser, parse_options_header
except ImportError:  # pragma: no cover - depends on the installed release
    from multipart.multipart import MultipartParseError, MultipartParser, parse_options_header
from nccid.portal.settings import PortalSettings

HERE = Path(__file__).parent
TEMPLATES = Jinja2Templates(directory=str(HERE / "templates"))
PRE_COOKIE = "nccid_pre"  # the double-submit CSRF token of forms shown before logging in
CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; "
    "base-uri 'none'"
)


class Redirect(Exception):
    """Answer with a redirect (to the log-in page, usually)."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.url = url


class Forbidden(Exception):
    """Answer 403: the account may not see this page (or this site's data)."""


class TooLarge(Exception):
    """Answer 413: the request body is larger than the portal accepts."""


class BadRequest(Exception):
    """Answer 400 with a one-line reason: the request body could not be read (e.g. a broken multipart form)."""


@dataclass(frozen=True)
class Who:
    """The logged-in person of a request."""

    user: User
    session: Session
    token: str


def cookie_name(settings: PortalSettings) -> str:
    """The session cookie's name: `__Host-` prefixed behind HTTPS, so browsers bind it to this exact origin."""
    return "__Host-nccid_session" if settings.secure_cookies else "nccid_session"


def set_cookie(response: Response, settings: PortalSettings, name: str, value: str) -> None:
    """Set a cookie scripts cannot read and other sites cannot send (HttpOnly, SameSite=Strict; Secure on HTTPS)."""
    response.set_cookie(
        name,
        value,
        httponly=True,
        samesite="strict",
        secure=settings.secure_cookies,
        path="/",
    )


def portal_db(request: Request) -> PortalDB:
    """The portal's database, opened for this request (use it as a context manager)."""
    return PortalDB(request.app.state.settings.db_path)


def security_headers(response: Response, settings: PortalSettings, static: bool) -> None:
    """Add the headers every answer carries: a strict CSP (unless the page set its own, stricter one), no
    framing, no referrer, no caching of pages (static files may be cached an hour), and HSTS when the portal is
    behind HTTPS."""
    headers = response.headers
    headers.setdefault("Content-Security-Policy", CSP)
    headers["X-Content-Type-Options"] = "nosniff"
    headers["X-Frame-Options"] = "DENY"
    headers["Referrer-Policy"] = "no-referrer"
    headers["Cross-Origin-Opener-Policy"] = "same-origin"
    headers["Cross-Origin-Resource-Policy"] = "same-origin"
    headers["Permissions-Policy"] = "camera=(), microphone=(), geolocation=(), interest-cohort=()"
    headers["Cache-Control"] = "public, max-age=3600" if static else "no-store"
    if settings.secure_cookies:
        headers["Strict-Transport-Security"] = "max-age=31536000; includeSubDomains"


def address(request: Request) -> str:
    """The client's IP address for the audit log ('unknown' when the server does not know it)."""
    return request.client.host if request.client else "unknown"


def current(request: Request, db: PortalDB, settings: PortalSettings, permission: str | None = None) -> Who:
    """The logged-in user with a live session (and their second factor, where needed) holding `permission`;
    otherwise raise Redirect to the log-in page or Forbidden."""
    token = request.cookies.get(cookie_name(settings), "")
    session, why = db.session(token, idle_s=settings.idle_timeout_s, absolute_s=settings.absolute_timeout_s)
    if session is None:
        raise Redirect("/login?expired=1" if why else "/login")
    user = db.user(session.username)
    if user is None or not user.active:
        db.end_session(token)
        raise Redirect("/login")
    if user.needs_totp and not session.totp_ok:
        raise Redirect("/login/totp")
    if permission and not user.can(permission):
        db.audit(
            user.username, "denied", f"{request.method} {request.url.path}", outcome="refused", address=address(request)
        )
        raise Forbidden()
    return Who(user, session, token)


def check_csrf(who: Who, form: dict[str, str], db: PortalDB, request: Request) -> None:
    """Every form posted by a logged-in user carries its session's token; otherwise 403 (and audited)."""
    if not secrets.compare_digest(form.get("csrf", ""), who.session.csrf):
        db.audit(
            who.user.username,
            "csrf",
            f"{request.method} {request.url.path}",
            outcome="refused",
            address=address(request),
        )
        raise Forbidden()


def check_pre_csrf(request: Request, form: dict[str, str]) -> bool:
    """Forms before log-in: the token in the form must equal the one in the pre-login cookie."""
    cookie = request.cookies.get(PRE_COOKIE, "")
    return bool(cookie) and secrets.compare_digest(form.get("csrf", ""), cookie)


def pre_token(request: Request) -> str:
    """The CSRF token for forms shown before log-in: the pre-login cookie's, or a fresh one to set."""
    return request.cookies.get(PRE_COOKIE) or secrets.token_urlsafe(32)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (TooLarge) past `limit` bytes: by Content-Length first, then as it streams."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise TooLarge()
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise TooLarge()
        chunks.append(chunk)
    return b"".join(chunks)


async def form_fields(request: Request, limit: int = 64 * 1024) -> dict[str, str]:
    """A URL-encoded form, parsed from memory (small forms only)."""
    from urllib.parse import parse_qsl

    body = await read_body(request, limit)
    return dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))


def parse_multipart(body: bytes, content_type: str) -> tuple[dict[str, str], dict[str, tuple[str, bytes]]]:
    """Fields and files of a multipart/form-data body, entirely in memory: (fields, {name: (filename, bytes)}).
    Raises BadRequest (a 400) when the body is not well-formed multipart."""
    kind, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        return {}, {}
    fields: dict[str, str] = {}
    files: dict[str, tuple[str, bytes]] = {}
    state: dict = {"headers": {}, "field": b"", "value": b"", "data": []}

    def on_part_begin() -> None:
        state["headers"], state["data"] = {}, []

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def on_header_end() -> None:
        state["headers"][state["field"].lower()] = state["value"]
        state["field"], state["value"] = b"", b""

    def on_part_data(data: bytes, start: int, end: int) -> None:
        state["data"].append(data[start:end])

    def on_part_end() -> None:
        _, disposition = parse_options_header(state["headers"].get(b"content-disposition", b""))
        name = disposition.get(b"name", b"").decode("utf-8", "replace")
        payload = b"".join(state["data"])
        if b"filename" in disposition:
            files[name] = (disposition[b"filename"].decode("utf-8", "replace"), payload)
        else:
            fields[name] = payload.decode("utf-8", "replace")

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
        },
    )
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise BadRequest(f"the uploaded form is not valid multipart/form-data: {exc}") from None
    return fields, files


def render(
    request: Request, template_file: str, who: Who | None = None, status: int = 200, **context: object
) -> HTMLResponse:
    """A page from templates/, given the user and their CSRF token besides `context`, with HTTP `status`."""
    context = {"who": who, "user": who.user if who else None, "csrf": who.session.csrf if who else "", **context}
    return TEMPLATES.TemplateResponse(request, template_file, context, status_code=status)


def redirect(url: str) -> RedirectResponse:
    """A 303 See Other, so the browser follows a posted form with a GET (no re-post on reload)."""
    return RedirectResponse(url, status_code=303)
