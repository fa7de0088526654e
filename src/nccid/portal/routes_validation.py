"""The validator's pages (`/validation/...`): submissions and runs, submitting a model, starting the dry and
the sealed run (in the background, one at a time), the vendor-facing report, and its release. Validators and
administrators; administrators also choose which model folders on the server are offered (`/validation/folders`).

Models are never uploaded through the browser: a validator submits one of the folders an administrator has
offered on the server (the vendor's delivery reached the server by the agreed route, outside the portal). The
pages show only what the validation library's vendor-facing outputs hold: submission and run ids, hashes,
aggregate metrics; never a pseudonym, a UID or a per-patient row.
"""

from __future__ import annotations

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from nccid.errors import NccidError
from nccid.portal.validation_jobs import KINDS
from nccid.portal.web import Who, check_csrf, current, form_fields, portal_db, redirect, render
from nccid.validation.report import inline_script_hashes
from nccid.validation.service import Workspace

router = APIRouter(prefix="/validation")


def _space(request: Request) -> Workspace:
    return request.app.state.validation


def _overview(request: Request, who: Who, *, status: int = 200, **context: object) -> Response:
    space = _space(request)
    try:
        events = space.events()
        runs = space.runs(events)
    except NccidError as exc:  # an edited audit log: say so instead of showing it
        events, runs, context["error"] = [], [], str(exc)
    submissions = []
    for sub_id in space.submissions():
        try:
            submissions.append(space.submission(sub_id))
        except NccidError:
            continue
    return render(
        request,
        "validation/overview.html",
        who,
        status=status,
        page="validation",
        events=events,
        runs=runs,
        submissions=submissions,
        folders=space.model_folders(),
        cohorts=space.frozen_cohorts(),
        job=request.app.state.validation_runner.job,
        elapsed=request.app.state.validation_runner.elapsed(),
        kinds=KINDS,
        **context,
    )


@router.get("")
def overview(request: Request) -> Response:
    """Submissions, runs, the audit events and the offered model folders, with the forms to submit and start runs;
    an edited audit log is reported on the page instead of shown."""
    with portal_db(request) as db:
        who = current(request, db, request.app.state.settings, "validation.pages")
    return _overview(request, who)


@router.post("/submit")
async def submit(request: Request) -> Response:
    """Submit one of the offered model folders; the refusal, if any, is shown with 400 and audited."""
    form = await form_fields(request)
    with portal_db(request) as db:
        who = current(request, db, request.app.state.settings, "validation.pages")
        check_csrf(who, form, db, request)
        try:
            sub = _space(request).submit_offered(form.get("folder", ""), who.user.username)
        except NccidError as exc:
            db.audit(who.user.username, "validation.submit", str(exc), outcome="refused")
            return _overview(request, who, status=400, error=str(exc))
        db.audit(who.user.username, "validation.submit", sub.id)
    return _overview(request, who, done=f"Submission {sub.id} accepted (model SHA-256 {sub.model_hash}).")


@router.post("/start")
async def start(request: Request) -> Response:
    """Start a dry or sealed run of a submission in the background; 409 while another run is in progress."""
    form = await form_fields(request)
    with portal_db(request) as db:
        who = current(request, db, request.app.state.settings, "validation.pages")
        check_csrf(who, form, db, request)
        kind, sub_id = form.get("kind", ""), form.get("submission", "")
        try:
            _space(request).submission(sub_id)
        except NccidError as exc:
            return _overview(request, who, status=400, error=str(exc))
        if kind not in KINDS:
            return _overview(request, who, status=400, error=f"unknown kind of run {kind!r}")
        if not request.app.state.validation_runner.start(kind, sub_id, who.user.username, db):
            return _overview(request, who, status=409, error="A run is in progress: wait for it to finish.")
    return redirect("/validation/job")


@router.post("/cohorts/drop")
async def drop_cohort(request: Request) -> Response:
    """Drop a frozen cohort (the next sealed run of its intended use freezes it anew); audited in the validation
    log and the portal's own; a refusal (unknown, or being read by a run) with 400."""
    form = await form_fields(request)
    with portal_db(request) as db:
        who = current(request, db, request.app.state.settings, "validation.pages")
        check_csrf(who, form, db, request)
        try:
            dropped = _space(request).drop_cohort(form.get("cohort", ""), who.user.username)
        except NccidError as exc:
            db.audit(who.user.username, "validation.cohort.drop", str(exc), outcome="refused")
            return _overview(request, who, status=400, error=str(exc))
        db.audit(who.user.username, "validation.cohort.drop", dropped)
    done = f"Frozen cohort {dropped[:12]} dropped: the next sealed run of its intended use freezes it anew."
    return _overview(request, who, done=done)


@router.get("/job")
def job_page(request: Request) -> Response:
    """The background run in progress (or the last one) and how long it has taken."""
    with portal_db(request) as db:
        who = current(request, db, request.app.state.settings, "validation.pages")
    runner = request.app.state.validation_runner
    return render(request, "validation/job.html", who, page="validation", job=runner.job, elapsed=runner.elapsed())


@router.get("/runs/{run}")
def run_page(request: Request, run: str) -> Response:
    """One run's hashes, metrics and release state; 404 on the overview for an unknown run id."""
    with portal_db(request) as db:
        who = current(request, db, request.app.state.settings, "validation.pages")
    try:
        info = next(iter(_space(request).runs(only=run)), None)
    except NccidError as exc:
        return _overview(request, who, status=409, error=str(exc))
    if info is None:
        return _overview(request, who, status=404, error=f"no run {run!r}; the list below shows every run")
    return render(request, "validation/run.html", who, page="validation", run=info)


@router.get("/runs/{run}/report.html")
def report_page(request: Request, run: str) -> Response:
    """The vendor-facing report as the vendor receives it, under a policy that runs its own inline scripts
    (the operating-point view, allowed by their SHA-256) and nothing else."""
    with portal_db(request) as db:
        who = current(request, db, request.app.state.settings, "validation.pages")
    try:
        html = _space(request).report_html(run)
    except NccidError as exc:
        return _overview(request, who, status=404, error=str(exc))
    scripts = " ".join(inline_script_hashes(html)) or "'none'"
    policy = (
        f"default-src 'none'; script-src {scripts}; style-src 'unsafe-inline'; img-src data:; "
        "form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
    )
    return HTMLResponse(html, headers={"Content-Security-Policy": policy})


@router.post("/runs/{run}/release")
async def release(request: Request, run: str) -> Response:
    """Release a run's report to the vendor (audited); a refusal, such as a report released already, with 400."""
    form = await form_fields(request)
    with portal_db(request) as db:
        who = current(request, db, request.app.state.settings, "validation.pages")
        check_csrf(who, form, db, request)
        try:
            _space(request).release(run, who.user.username)
        except NccidError as exc:
            db.audit(who.user.username, "validation.release", str(exc), outcome="refused")
            return _overview(request, who, status=400, error=str(exc))
        db.audit(who.user.username, "validation.release", run)
    return redirect(f"/validation/runs/{run}")


@router.get("/folders")
def folders_page(request: Request) -> Response:
    """The model folders on the server that validators may submit, and the form to offer or withdraw one
    (permission validation.folders: administrators)."""
    with portal_db(request) as db:
        who = current(request, db, request.app.state.settings, "validation.folders")
    return render(request, "validation/folders.html", who, page="folders", folders=_space(request).model_folders())


@router.post("/folders")
async def folders_save(request: Request) -> Response:
    """Offer a model folder on the server to validators, or withdraw one; refusals are shown with 400 and audited."""
    form = await form_fields(request)
    with portal_db(request) as db:
        who = current(request, db, request.app.state.settings, "validation.folders")
        check_csrf(who, form, db, request)
        space = _space(request)
        folder = form.get("folder", "").strip()
        withdraw = form.get("action") == "withdraw"
        action = "validation.folder.withdraw" if withdraw else "validation.folder.offer"
        try:
            if withdraw:
                space.withdraw_model_folder(folder)
                done = f"{folder} is no longer offered."
            else:
                manifest = space.offer_model_folder(folder)
                done = f"{folder} offered: {manifest.name} {manifest.version} by {manifest.vendor}."
            db.audit(who.user.username, action, folder)
        except NccidError as exc:
            db.audit(who.user.username, action, str(exc), outcome="refused")
            return render(
                request,
                "validation/folders.html",
                who,
                page="folders",
                status=400,
                folders=space.model_folders(),
                error=str(exc),
            )
    return render(request, "validation/folders.html", who, page="folders", folders=space.model_folders(), done=done)
