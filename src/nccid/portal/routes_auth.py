"""Logging in and out, the second factor, one-time set-up links and changing one's password."""

from __future__ import annotations

import asyncio
import secrets

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from nccid.portal.accounts import CENTRAL_ROLES, PortalDB, PortalError
from nccid.portal.web import (
    PRE_COOKIE,
    Forbidden,
    address,
    check_csrf,
    check_pre_csrf,
    cookie_name,
    current,
    form_fields,
    portal_db,
    pre_token,
    redirect,
    render,
    set_cookie,
)

router = APIRouter()


def _pre_page(request: Request, name: str, status: int = 200, **context: object) -> Response:
    token = pre_token(request)
    response = render(request, name, status=status, pre_csrf=token, **context)
    set_cookie(response, request.app.state.settings, PRE_COOKIE, token)
    return response


@router.get("/")
def home(request: Request) -> Response:
    """Send each role to its own start page: sites to guidance, the central team to /admin, validators to
    /validation, anyone else to their account; not logged in goes to the log-in page."""
    with portal_db(request) as db:
        who = current(request, db, request.app.state.settings)
    if who.user.role == "site":
        return redirect("/site/guidance")
    if who.user.role in CENTRAL_ROLES:
        return redirect("/admin")
    if who.user.can("validation.pages"):
        return redirect("/validation")
    return redirect("/account")


@router.get("/account")
def account(request: Request) -> Response:
    """The logged-in user's own account page."""
    with portal_db(request) as db:
        who = current(request, db, request.app.state.settings, "account.self")
    return render(request, "account.html", who)


@router.get("/login")
def login_page(request: Request, expired: int = 0, out: int = 0) -> Response:
    """The log-in form with its pre-login CSRF cookie, saying why the user is here (session expired, logged out)."""
    message = "Your session expired: please log in again." if expired else ("You are logged out." if out else "")
    return _pre_page(request, "login.html", message=message)


@router.post("/login")
async def login(request: Request) -> Response:
    """Check a user name and password (with lock-outs and a delay after a wrong guess) and start a session;
    roles that need a second factor go on to /login/totp. 403 when the pre-login CSRF token is wrong."""
    settings = request.app.state.settings
    form = await form_fields(request)
    if not check_pre_csrf(request, form):
        with portal_db(request) as db:
            db.audit("(anonymous)", "csrf", "POST /login", outcome="refused", address=address(request))
        raise Forbidden()
    username = form.get("username", "").strip().lower()
    with portal_db(request) as db:
        outcome = db.authenticate(
            username,
            form.get("password", ""),
            address(request),
            account_limit=settings.account_lock_after,
            address_limit=settings.address_lock_after,
            window_s=settings.lock_window_s,
            lock_s=settings.lock_s,
            delay_s=settings.failure_delay_s,
        )
        if outcome.user is None:
            await asyncio.sleep(outcome.delay_s)
            return _pre_page(request, "login.html", status=401, error=outcome.reason)
        token, _ = db.create_session(outcome.user.username, totp_ok=not outcome.user.needs_totp)
    response = redirect("/login/totp" if outcome.user.needs_totp else "/")
    set_cookie(response, settings, cookie_name(settings), token)
    return response


def _pending(request: Request, db: PortalDB):
    settings = request.app.state.settings
    token = request.cookies.get(cookie_name(settings), "")
    session, _ = db.session(token, idle_s=settings.idle_timeout_s, absolute_s=settings.absolute_timeout_s)
    return (token, session) if session else (token, None)


@router.get("/login/totp")
def totp_page(request: Request) -> Response:
    """The second-factor form for a session that has passed the password; without one, back to log-in."""
    with portal_db(request) as db:
        _, session = _pending(request, db)
    if session is None:
        return redirect("/login")
    return render(request, "totp.html", pending_csrf=session.csrf)


@router.post("/login/totp")
async def totp(request: Request) -> Response:
    """Check the second-factor code and, if right, mark the session as fully logged in; 401 after a delay if not."""
    form = await form_fields(request)
    with portal_db(request) as db:
        token, session = _pending(request, db)
        if session is None:
            return redirect("/login")
        if not secrets.compare_digest(form.get("csrf", ""), session.csrf):
            db.audit(session.username, "csrf", "POST /login/totp", outcome="refused", address=address(request))
            raise Forbidden()
        settings = request.app.state.settings
        try:
            verdict = db.verify_totp(
                session.username,
                form.get("code", ""),
                address(request),
                account_limit=settings.account_lock_after,
                window_s=settings.lock_window_s,
                lock_s=settings.lock_s,
            )
        except PortalError as exc:  # the secret cannot be opened with this server's key file: the server's fault
            db.audit(session.username, "login.totp", str(exc), outcome="failed", address=address(request))
            return render(
                request,
                "totp.html",
                status=503,
                pending_csrf=session.csrf,
                error="Second factors cannot be checked on this server now: tell the portal's administrator.",
            )
        if verdict is None:
            db.end_session(token)
            response = _pre_page(
                request, "login.html", status=401, error="too many wrong codes: the account is locked, try later"
            )
            response.delete_cookie(
                cookie_name(settings), path="/", secure=settings.secure_cookies, httponly=True, samesite="strict"
            )
            return response
        if not verdict:
            await asyncio.sleep(request.app.state.settings.failure_delay_s)
            return render(
                request,
                "totp.html",
                status=401,
                pending_csrf=session.csrf,
                error="That code is not right (or was used already): wait for the next one.",
            )
        db.upgrade_session(token)
    return redirect("/")


@router.post("/logout")
async def logout(request: Request) -> Response:
    """End the session on the server and delete its cookie."""
    settings = request.app.state.settings
    form = await form_fields(request)
    with portal_db(request) as db:
        who = current(request, db, settings)
        check_csrf(who, form, db, request)
        db.end_session(who.token)
        db.audit(who.user.username, "logout", address=address(request))
    response = redirect("/login?out=1")
    response.delete_cookie(
        cookie_name(settings), path="/", secure=settings.secure_cookies, httponly=True, samesite="strict"
    )
    return response


@router.get("/account/password")
def password_page(request: Request) -> Response:
    """The form to change one's own password."""
    with portal_db(request) as db:
        who = current(request, db, request.app.state.settings, "account.self")
    return render(request, "password.html", who, page="password")


@router.post("/account/password")
async def change_password(request: Request) -> Response:
    """Change one's password (the current one is needed) and end one's other sessions; a refusal is shown with 400."""
    form = await form_fields(request)
    with portal_db(request) as db:
        who = current(request, db, request.app.state.settings, "account.self")
        check_csrf(who, form, db, request)
        if form.get("new", "") != form.get("confirm", ""):
            return render(
                request, "password.html", who, page="password", status=400, error="The two new passwords differ."
            )
        try:
            db.change_password(
                who.user.username, form.get("current", ""), form.get("new", ""), address=address(request)
            )
        except PortalError as exc:
            return render(request, "password.html", who, page="password", status=400, error=str(exc))
        db.end_other_sessions(who.user.username, who.token)
    return render(
        request, "password.html", who, page="password", done="Your password is changed; your other sessions are ended."
    )


def _invalid_setup_link(request: Request) -> Response:
    """The 404 page for a set-up link used already or expired, saying how to get a new one."""
    return render(
        request,
        "message.html",
        status=404,
        title="Set-up link not valid",
        message="This set-up link was used already or has expired: ask an administrator for a new one.",
    )


@router.get("/setup/{token}")
def setup_page(request: Request, token: str) -> Response:
    """The one-time set-up form of a new account (choose a password, enrol TOTP where the role needs it);
    404 with a plain message for a link used already or expired."""
    with portal_db(request) as db:
        found = db.setup_account(token)
    if found is None:
        return _invalid_setup_link(request)
    user, secret = found
    return _pre_page(
        request, "setup.html", account=user, secret=secret, token=token, otpauth=_otpauth(user.username, secret)
    )


@router.post("/setup/{token}")
async def setup(request: Request, token: str) -> Response:
    """Complete a new account with a set-up link: choose the password (and confirm the TOTP code where needed);
    404 for a link used or expired, 400 with the reason for a refused password or code."""
    form = await form_fields(request)
    if not check_pre_csrf(request, form):
        raise Forbidden()
    with portal_db(request) as db:
        found = db.setup_account(token)
        if found is None:
            return _invalid_setup_link(request)
        user, secret = found
        try:
            if form.get("password", "") != form.get("confirm", ""):
                raise PortalError("the two passwords differ")
            db.complete_setup(token, form.get("password", ""), form.get("code", ""), address=address(request))
        except PortalError as exc:
            return _pre_page(
                request,
                "setup.html",
                status=400,
                account=user,
                secret=secret,
                token=token,
                otpauth=_otpauth(user.username, secret),
                error=str(exc),
            )
    return render(
        request,
        "message.html",
        title="Account ready",
        message="Your account is ready: log in with your new password.",
        link="/login",
    )


def _otpauth(username: str, secret: str) -> str:
    if not secret:
        return ""
    import pyotp

    return pyotp.TOTP(secret).provisioning_uri(name=username, issuer_name="nccid portal")


@router.get("/account/totp")
def totp_setup_page(request: Request) -> Response:
    """Start enrolling a second factor: a fresh TOTP secret and its QR link; says so if it is already on."""
    with portal_db(request) as db:
        who = current(request, db, request.app.state.settings, "account.self")
        if who.user.totp_enabled:
            return render(request, "password.html", who, page="password", done="Your second factor is on.")
        secret = db.begin_totp(who.user.username)
    return render(
        request, "totp_setup.html", who, page="password", secret=secret, otpauth=_otpauth(who.user.username, secret)
    )


@router.post("/account/totp")
async def totp_setup(request: Request) -> Response:
    """Confirm the code of a second factor being enrolled, which turns it on for every later log-in."""
    form = await form_fields(request)
    with portal_db(request) as db:
        who = current(request, db, request.app.state.settings, "account.self")
        check_csrf(who, form, db, request)
        if not db.confirm_totp(who.user.username, form.get("code", ""), address=address(request)):
            return render(
                request,
                "message.html",
                who,
                status=400,
                title="Code not right",
                message="That code did not match: open the page again for a new key.",
                link="/account/totp",
            )
        db.upgrade_session(who.token)
    return render(
        request, "password.html", who, page="password", done="Your second factor is on: log-ins now ask for a code."
    )
