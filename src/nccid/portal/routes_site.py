"""A site's pages: guidance, FAQ, summary, the three uploads and the template downloads.

The site is always the logged-in account's own: no page takes a site name from the URL or the form, so a site
cannot ask for another site's data however it edits a request.
"""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from nccid.errors import NccidError
from nccid.portal.accounts import PortalDB, Site
from nccid.portal.sheets import TEMPLATE_NAMES, file_upload, read_sheet_bytes, template_bytes
from nccid.portal.web import (
    Forbidden,
    Redirect,
    TooLarge,
    Who,
    check_csrf,
    current,
    parse_multipart,
    portal_db,
    read_body,
    render,
)
from nccid.site.isaric import ISARIC_COLUMNS, SUBJECT_ID
from nccid.site.templates import TEMPLATES

router = APIRouter(prefix="/site")


def _site_user(request: Request, db: PortalDB, permission: str = "site.pages") -> tuple[Who, Site]:
    who = current(request, db, request.app.state.settings, permission)
    site = db.site(who.user.site)
    if site is None:
        raise Forbidden()
    return who, site


@router.get("/guidance")
def guidance(request: Request) -> Response:
    """How the logged-in site takes part: what to send, how, and the template columns. 403 for a non-site account."""
    with portal_db(request) as db:
        who, site = _site_user(request, db)
    return render(request, "site_guidance.html", who, site=site, page="guidance")


@router.get("/faq")
def faq(request: Request) -> Response:
    """Answers to the questions sites ask most, for the logged-in site."""
    with portal_db(request) as db:
        who, site = _site_user(request, db)
    return render(request, "site_faq.html", who, site=site, page="faq")


@router.get("/summary")
def summary(request: Request) -> Response:
    """What the logged-in site has sent, what of it waits and why, and its recent sheet uploads."""
    with portal_db(request) as db:
        who, site = _site_user(request, db)
        uploads = db.uploads(site.uploader)
    facts = request.app.state.summaries(site)
    return render(request, "site_summary.html", who, site=site, summary=facts, uploads=uploads, page="summary")


@router.get("/upload/{template}")
def upload_page(request: Request, template: str) -> Response:
    """The upload form for one clinical template with this site's last ten uploads of it (permission
    site.upload); an unknown template goes back to guidance."""
    if template not in TEMPLATE_NAMES:
        raise Redirect("/site/guidance")
    with portal_db(request) as db:
        who, site = _site_user(request, db, "site.upload")
        uploads = [u for u in db.uploads(site.uploader) if u["template"] == template][:10]
    return render(
        request,
        "site_upload.html",
        who,
        site=site,
        template=template,
        name=TEMPLATE_NAMES[template],
        uploads=uploads,
        page=template,
        key_missing=request.app.state.key is None,
        max_mb=f"{request.app.state.settings.max_upload_bytes / 1048576:g}",
    )


@router.post("/upload/{template}")
async def upload(request: Request, template: str) -> Response:
    """Take a filled clinical sheet from the logged-in site (parsed in memory; the sheet itself is not kept) and
    file its valid rows, showing rows accepted, held and why. 413 past the size limit, 503 without the site key,
    400 for a missing or unreadable sheet."""
    settings = request.app.state.settings
    if template not in TEMPLATE_NAMES:
        raise Redirect("/site/guidance")
    with PortalDB(settings.db_path) as db:
        who, site = _site_user(request, db, "site.upload")
    context = {
        "site": site,
        "template": template,
        "name": TEMPLATE_NAMES[template],
        "page": template,
        "max_mb": f"{settings.max_upload_bytes / 1048576:g}",
        "uploads": [],
    }
    too_large = f"The file is larger than {context['max_mb']} MiB: split the sheet into several uploads."
    try:
        body = await read_body(request, settings.max_upload_bytes + 64 * 1024)
    except TooLarge:
        return render(request, "site_upload.html", who, status=413, **context, error=too_large)
    fields, files = parse_multipart(body, request.headers.get("content-type", ""))
    del body
    with PortalDB(settings.db_path) as db:
        check_csrf(who, fields, db, request)
    filename, data = files.get("sheet", ("", b""))
    if not data:
        return render(request, "site_upload.html", who, status=400, **context, error="Choose a sheet to upload.")
    if len(data) > settings.max_upload_bytes:
        return render(request, "site_upload.html", who, status=413, **context, error=too_large)
    if request.app.state.key is None:
        return render(request, "site_upload.html", who, status=503, **context, key_missing=True)
    try:
        outcome = await run_in_threadpool(request.app.state.file_sheet, data, filename, template, site, who)
    except NccidError as exc:
        return render(request, "site_upload.html", who, status=400, **context, error=str(exc))
    finally:
        del data
    return render(request, "site_upload.html", who, outcome=outcome, **context)


@router.get("/templates/{template}.{fmt}")
def download_template(request: Request, template: str, fmt: str) -> Response:
    """A blank template as an .xlsx or .csv download, so sites fill in exactly the columns the loader reads."""
    with portal_db(request) as db:
        _site_user(request, db)
    if template not in TEMPLATE_NAMES or fmt not in ("xlsx", "csv"):
        raise Redirect("/site/guidance")
    media = "text/csv" if fmt == "csv" else "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
    name = {"positive": "nccid-positive-v1.5", "negative": "nccid-negative", "isaric": "nccid-isaric"}[template]
    return Response(
        template_bytes(template, fmt),
        media_type=media,
        headers={"Content-Disposition": f'attachment; filename="{name}.{fmt}"'},
    )


def template_help() -> dict[str, object]:
    """Columns of each template for the guidance page."""
    return {
        "positive": TEMPLATES["positive"]["columns"],
        "negative": TEMPLATES["negative"]["columns"],
        "isaric": ISARIC_COLUMNS,
        "isaric_id": SUBJECT_ID.pattern,
    }


def upload_into(app_state: object):
    """The function an upload calls (in a worker thread): parse from memory, validate, pseudonymise, file."""

    def file_sheet(data: bytes, filename: str, template: str, site: Site, who: Who):
        from nccid.site.vault import Vault

        rows = read_sheet_bytes(data, filename)
        settings = app_state.settings  # type: ignore[attr-defined]
        with PortalDB(settings.db_path) as db, Vault(settings.vault) as vault:
            return file_upload(
                rows,
                template,
                site,
                store=app_state.store,
                db=db,
                vault=vault,  # type: ignore[attr-defined]
                key=app_state.key,
                username=who.user.username,
            )  # type: ignore[attr-defined]

    return file_sheet
