"""The central team's pages: overview, sites, accounts, config.json, loads and their reports, the queues of
what waits, and the audit log. Data managers and administrators; accounts and the audit log are
administrators' only."""

from __future__ import annotations

import contextlib
import json
import re

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from nccid.errors import NccidError
from nccid.portal.accounts import ROLES, PortalError
from nccid.portal.central import read_config_doc, save_config_doc, save_site
from nccid.portal.web import Redirect, check_csrf, current, form_fields, portal_db, redirect, render
from nccid.site.isaric import to_csv
from nccid.stats.site_summary import WAITING_OUTCOMES, load_runs, waiting_everywhere
from nccid.store import ObjectNotFound

router = APIRouter(prefix="/admin")
_RUN_ID = re.compile(r"[0-9TZ]{16}-[0-9a-f]{6}")


@router.get("")
def overview(request: Request) -> Response:
    """The central team's start page: sites, raw objects per outcome, the latest loads and any running job."""
    with portal_db(request) as db:
        who = current(request, db, request.app.state.settings, "admin.pages")
        sites = db.sites()
    counts = request.app.state.read_catalog(
        lambda q: dict(q("SELECT outcome, COUNT(*) FROM raw_objects GROUP BY outcome", ())), {}
    )
    runs = request.app.state.read_catalog(lambda q: load_runs(q, 5), [])
    return render(
        request,
        "admin_overview.html",
        who,
        page="overview",
        sites=sites,
        counts=counts,
        runs=runs,
        job=request.app.state.runner.job,
        catalog_problem=request.app.state.catalog_problem,
    )


@router.get("/sites")
def sites_page(request: Request, edit: str = "") -> Response:
    """The list of submitting sites, with the form to add one or edit `edit` (permission admin.sites)."""
    with portal_db(request) as db:
        who = current(request, db, request.app.state.settings, "admin.sites")
        sites = db.sites()
        editing = db.site(edit) if edit else None
    return render(request, "admin_sites.html", who, page="sites", sites=sites, editing=editing)


@router.post("/sites")
async def sites_save(request: Request) -> Response:
    """Add or change a site (also in config.json); a refusal is shown on the sites page with status 400."""
    form = await form_fields(request)
    with portal_db(request) as db:
        who = current(request, db, request.app.state.settings, "admin.sites")
        check_csrf(who, form, db, request)
        try:
            save_site(
                request.app.state.store,
                db,
                uploader=form.get("uploader", "").strip(),
                name=form.get("name", ""),
                aliases=form.get("aliases", "").split(","),
                hospitals=form.get("hospitals", "").split(","),
                rule=form.get("rule", ""),
                actor=who.user.username,
            )
        except NccidError as exc:
            return render(
                request,
                "admin_sites.html",
                who,
                page="sites",
                status=400,
                sites=db.sites(),
                editing=None,
                error=str(exc),
                form=form,
            )
    return redirect("/admin/sites")


@router.get("/sites/{uploader}/summary")
def site_summary_page(request: Request, uploader: str) -> Response:
    """What one site has sent and what of it waits, as the site itself sees it; an unknown site goes back to
    the sites page."""
    with portal_db(request) as db:
        who = current(request, db, request.app.state.settings, "admin.pages")
        site = db.site(uploader)
        if site is None:
            raise Redirect("/admin/sites")
        uploads = db.uploads(site.uploader)
    facts = request.app.state.summaries(site)
    return render(
        request, "site_summary.html", who, page="sites", site=site, summary=facts, uploads=uploads, central=True
    )


@router.get("/accounts")
def accounts_page(request: Request) -> Response:
    """Every account and the form to make one (administrators only: permission admin.accounts)."""
    with portal_db(request) as db:
        who = current(request, db, request.app.state.settings, "admin.accounts")
        return render(
            request, "admin_accounts.html", who, page="accounts", users=db.users(), sites=db.sites(), roles=ROLES
        )


@router.post("/accounts")
async def accounts_create(request: Request) -> Response:
    """Make an account and show its one-time set-up link once; a refusal (bad name, role) is shown with 400."""
    form = await form_fields(request)
    with portal_db(request) as db:
        who = current(request, db, request.app.state.settings, "admin.accounts")
        check_csrf(who, form, db, request)
        role = form.get("role", "")
        try:
            made = db.create_account(
                form.get("username", "").strip().lower(),
                role,
                site=form.get("site", "") if role == "site" else "",
                actor=who.user.username,
            )
        except PortalError as exc:
            return render(
                request,
                "admin_accounts.html",
                who,
                page="accounts",
                status=400,
                users=db.users(),
                sites=db.sites(),
                roles=ROLES,
                error=str(exc),
            )
        link = str(request.base_url).rstrip("/") + f"/setup/{made.setup_token}"
        return render(
            request,
            "admin_accounts.html",
            who,
            page="accounts",
            users=db.users(),
            sites=db.sites(),
            roles=ROLES,
            made=made,
            link=link,
        )


@router.post("/accounts/{username}/{action}")
async def accounts_toggle(request: Request, username: str, action: str) -> Response:
    """Enable or disable another account (never one's own, so an administrator cannot lock themselves out)."""
    form = await form_fields(request)
    with portal_db(request) as db:
        who = current(request, db, request.app.state.settings, "admin.accounts")
        check_csrf(who, form, db, request)
        if action in ("enable", "disable") and username != who.user.username:
            with contextlib.suppress(PortalError):
                db.set_active(username, action == "enable", actor=who.user.username)
    return redirect("/admin/accounts")


@router.get("/config")
def config_page(request: Request) -> Response:
    """The warehouse's config.json for editing; a config that cannot be read is shown as the error instead."""
    with portal_db(request) as db:
        who = current(request, db, request.app.state.settings, "admin.config")
    try:
        text = json.dumps(read_config_doc(request.app.state.store), indent=2)
        error = ""
    except NccidError as exc:
        text, error = "", str(exc)
    return render(request, "admin_config.html", who, page="config", text=text, error=error)


@router.post("/config")
async def config_save(request: Request) -> Response:
    """Save an edited config.json after checking it; invalid JSON or a refused config is shown with 400 and
    audited."""
    form = await form_fields(request)
    with portal_db(request) as db:
        who = current(request, db, request.app.state.settings, "admin.config")
        check_csrf(who, form, db, request)
        text = form.get("config", "")
        try:
            try:
                doc = json.loads(text)
            except json.JSONDecodeError as exc:
                raise PortalError(
                    f"config.json: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
                ) from None
            save_config_doc(request.app.state.store, doc, db=db, actor=who.user.username)
        except NccidError as exc:
            db.audit(who.user.username, "config.save", str(exc), outcome="refused")
            return render(request, "admin_config.html", who, page="config", status=400, text=text, error=str(exc))
    return render(
        request, "admin_config.html", who, page="config", text=json.dumps(doc, indent=2), done="config.json saved."
    )


@router.get("/loads")
def loads_page(request: Request) -> Response:
    """The load runs with their counts per outcome, the running load if any, and a button to start one."""
    with portal_db(request) as db:
        who = current(request, db, request.app.state.settings, "admin.load")
    runs = request.app.state.read_catalog(lambda q: load_runs(q), [])
    for run in runs:
        run["counts"] = json.loads(run["summary"] or "{}")
    return render(request, "admin_loads.html", who, page="loads", runs=runs, job=request.app.state.runner.job)


@router.post("/loads/start")
async def loads_start(request: Request) -> Response:
    """Start a warehouse load in the background (one at a time) and go back to the loads page."""
    form = await form_fields(request)
    with portal_db(request) as db:
        who = current(request, db, request.app.state.settings, "admin.load")
        check_csrf(who, form, db, request)
        request.app.state.runner.start(who.user.username, db)
    return redirect("/admin/loads")


@router.get("/loads/{run_id}")
def load_report(request: Request, run_id: str) -> Response:
    """One load's report from reports/load/<run_id>.json; a malformed or unknown run id goes back to the list."""
    with portal_db(request) as db:
        who = current(request, db, request.app.state.settings, "admin.load")
    if not _RUN_ID.fullmatch(run_id):
        raise Redirect("/admin/loads")
    try:
        report = json.loads(request.app.state.store.read(f"reports/load/{run_id}.json"))
    except ObjectNotFound:
        raise Redirect("/admin/loads") from None
    return render(request, "admin_report.html", who, page="loads", report=report)


@router.get("/queues")
def queues_page(request: Request, outcome: str = "") -> Response:
    """Everything waiting across all sites (held, quarantined, ...), optionally of one outcome, with reasons."""
    with portal_db(request) as db:
        who = current(request, db, request.app.state.settings, "admin.queues")
    outcome = outcome if outcome in WAITING_OUTCOMES else ""
    items = request.app.state.read_catalog(lambda q: waiting_everywhere(q, outcome or None), [])
    return render(
        request, "admin_queues.html", who, page="queues", items=items, outcome=outcome, outcomes=WAITING_OUTCOMES
    )


@router.get("/queues.csv")
def queues_csv(request: Request, outcome: str = "") -> Response:
    """The same queues as a CSV download (up to 100,000 rows), for working through them in a spreadsheet."""
    with portal_db(request) as db:
        current(request, db, request.app.state.settings, "admin.queues")
    outcome = outcome if outcome in WAITING_OUTCOMES else ""
    items = request.app.state.read_catalog(lambda q: waiting_everywhere(q, outcome or None, limit=100_000), [])
    text = to_csv(["key", "kind", "outcome", "reason"], [(i.key, i.kind, i.outcome, i.reason) for i in items])
    return Response(
        text, media_type="text/csv", headers={"Content-Disposition": 'attachment; filename="nccid-queues.csv"'}
    )


@router.get("/audit")
def audit_page(request: Request) -> Response:
    """The latest 500 entries of the portal's audit log (administrators only: permission admin.audit)."""
    with portal_db(request) as db:
        who = current(request, db, request.app.state.settings, "admin.audit")
        return render(request, "admin_audit.html", who, page="audit", entries=db.audit_log(500))
