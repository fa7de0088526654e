"""The validator's pages in a real browser (Debian's chromium driven by Playwright) against a real portal started
here on loopback, over a small synthetic warehouse (nccid.synth, loaded by the loader).

A validator logs in with TOTP, submits the coin-flip example model from a folder an administrator offered,
runs it dry and sealed in the background, opens the vendor-facing report (its operating-point script allowed by
hash only) and releases it; site uploaders and data managers are refused every validation page, by URL too.
No pseudonym, UID or per-patient row appears on any page a validator sees. Screenshots go to
tests/output/portal/ (or $NCCID_TEST_OUTPUT/portal).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import portal_helpers
import pydicom
import pytest
from portal_helpers import PASSWORD, login, running_portal, shot

from nccid.portal.accounts import PortalDB
from nccid.portal.central import save_site
from nccid.store import LocalStore
from nccid.synth.national import SynthSpec, generate
from nccid.validation.demo import default_models_dir
from nccid.validation.service import Workspace
from nccid.warehouse.catalog import Catalog
from nccid.warehouse.loader import load

browser, page = portal_helpers.browser, portal_helpers.page  # the shared fixtures, used by name
COIN_FLIP = default_models_dir() / "coin-flip"
VALIDATION_URLS = ["/validation", "/validation/job", "/validation/folders", "/validation/runs/x/report.html"]
PSEUDONYM = re.compile(r"Covid\d+")


class World:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.store = LocalStore(root / "store")
        self.state = root / "state"
        self.url = ""
        self.totp: dict[str, str] = {}
        self.identifiers: set[str] = set()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A loaded synthetic warehouse (120 patients, one tiny radiograph each, a planted sign of disease), its
    portal with a site, a site uploader, a data manager, an administrator and two validators."""
    w = World(tmp_path_factory.mktemp("portal-validation"))
    spec = SynthSpec(seed=3, patients=120, scale=0.04, imaged_fraction=1.0, xray_share=1.0, mr_share=0.0)
    generate(w.store, SynthSpec(**{**spec.__dict__, "signal": 1.5, "awkward": False, "days": 1}))
    catalog = Catalog(w.root / "catalog.sqlite")
    try:
        load(w.store, catalog, workers=1)
    finally:
        catalog.close()
    for group in ("training", "validation"):
        for info in w.store.list(f"{group}/"):
            if info.key.endswith(".dcm"):
                ds = pydicom.dcmread(w.store.open(info.key), stop_before_pixels=True)
                w.identifiers |= {ds.PatientID, ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID}
    with PortalDB(w.state / "portal.sqlite") as db:
        save_site(w.store, db, uploader="northfield", name="Northfield General", aliases=[], rule="split", actor="t")
        db.create_account("north-site", "site", site="northfield", actor="t", password=PASSWORD)
        for name, role in [("dm-dana", "data_manager"), ("ada-admin", "admin"), ("ida-admin", "admin"),
                           ("vera-val", "validator"),
                           ("otto-val", "validator")]:  # fmt: skip
            w.totp[name] = db.create_account(name, role, actor="t", password=PASSWORD).totp_secret
    env = {k: v for k, v in os.environ.items() if k != "NCCID_VALIDATION"}
    args = ["--store", w.store.root, "--state", w.state, "--catalog", w.root / "catalog.sqlite"]
    with running_portal(args, w.root / "server.log", env=env) as w.url:
        yield w


def menu(page) -> list[str]:
    return [t.strip() for t in page.locator("nav.menu a, nav.menu button").all_inner_texts()]


def wait_for_run(page, world: World, seen: list[str]) -> str:
    """Reload the status page until the background run has ended; returns its final state line."""
    deadline = time.monotonic() + 120
    while True:
        page.goto(world.url + "/validation/job")
        state = page.inner_text("#job-state")
        if "running" not in state or time.monotonic() > deadline:
            seen.append(page.content())
            return state
        time.sleep(0.5)


def test_validator_submits_runs_views_and_releases_a_report(page, world, browser):
    seen: list[str] = []  # every page the validator saw, scanned for identifiers at the end

    # an administrator offers the coin flip's folder on the server (a relative path is refused with a reason)
    login(page, world, "ada-admin")
    page.click("nav.menu a:has-text('Model folders')")
    page.fill("#offer input[name=folder]", "examples/models/coin-flip")
    page.click("#offer button")
    assert "absolute path" in page.inner_text(".error")
    page.fill("#offer input[name=folder]", str(COIN_FLIP))
    page.click("#offer button")
    assert "coin-flip 1.0" in page.inner_text(".done") and str(COIN_FLIP) in page.inner_text("#folders")
    shot(page, "v01-model-folders")

    # the validator logs in with their second factor and lands on the validation pages
    page.context.clear_cookies()
    login(page, world, "vera-val")
    assert page.url.endswith("/validation")
    assert menu(page) == ["Validation", "Change Password", "Logout"]
    page.select_option("#submit select[name=folder]", str(COIN_FLIP))
    page.click("#submit button")
    accepted = page.inner_text(".done")
    sub_id = re.search(r"Submission (coin-flip-1\.0-[0-9a-f]{12}) accepted", accepted).group(1)
    assert sub_id in page.inner_text("#submissions")
    seen.append(page.content())

    # a sealed run before any dry run is refused by the service, and the page says why
    page.click(f"#submissions tr:has-text('{sub_id}') button:has-text('Start sealed run')")
    assert "no completed dry run" in wait_for_run(page, world, seen)

    # the dry run, then the sealed run, each in the background with a status page
    page.goto(world.url + "/validation")
    page.click(f"#submissions tr:has-text('{sub_id}') button:has-text('Start dry run')")
    assert page.url.endswith("/validation/job")
    assert "finished" in wait_for_run(page, world, seen)
    page.goto(world.url + "/validation")
    page.click(f"#submissions tr:has-text('{sub_id}') button:has-text('Start sealed run')")
    state = wait_for_run(page, world, seen)
    assert "finished" in state and "sealed run" in state and "metrics computed" in state
    phases = page.locator("#job-phases li").all_inner_texts()
    assert phases[0] == "selecting the cohort of the intended use" and phases[-1] == "writing the report"
    assert re.fullmatch(r"running the model on \d+ cases in the sandbox", phases[2])
    shot(page, "v02-run-status")

    # the runs page lists both runs, and the audit log table holds what `nccid validate runs` prints
    page.goto(world.url + "/validation")
    runs_table = page.inner_text("#runs")
    assert "dry run" in runs_table and "sealed run" in runs_table and "not yet" in runs_table
    events = Workspace(world.state / "validation").events()
    rows = page.locator("#audit tr").all_inner_texts()[1:]
    assert [r.split("\t")[2:4] for r in rows] == [[e["event"], e["who"]] for e in events]
    assert [e["event"] for e in events] == ["submission", "dry_run", "cohort_frozen", "sealed_run"]
    # the sealed run froze its cohort: listed as `nccid validate cohorts` lists it
    [frozen] = Workspace(world.state / "validation").frozen_cohorts()
    cohorts_table = page.inner_text("#cohorts")
    assert frozen.id[:12] in cohorts_table and f"{frozen.cases} ({frozen.positives} positive)" in cohorts_table
    seen.append(page.content())
    shot(page, "v03-validation-overview")

    # the sealed run's page shows its AUC; its report opens under a policy allowing only its own script
    page.click("#runs tr:has-text('sealed run') a")
    auc = page.inner_text("#auc")
    assert re.fullmatch(r"0\.\d{3} \(0\.\d{3}–[01]\.\d{3}\)", auc)
    run_id = page.url.rsplit("/", 1)[1]
    seen.append(page.content())
    violations: list[str] = []
    page.on("console", lambda m: violations.append(m.text) if "Content Security Policy" in m.text else None)
    response = page.goto(page.url + "/report.html")
    policy = response.headers["content-security-policy"]
    script_src = re.search(r"script-src ([^;]*)", policy).group(1)
    assert "'sha256-" in script_src and "unsafe" not in script_src
    assert "frame-ancestors 'none'" in policy
    assert "Sealed validation run: coin-flip 1.0" in page.inner_text("h1")
    assert f"{float(auc.split()[0]):.3f}" in page.inner_text("body")
    total = int(page.inner_text("#op-tp")) + int(page.inner_text("#op-fn"))
    assert total > 0  # the operating-point script ran
    page.fill("#op-t", "0")  # threshold 0: every positive is a true positive
    assert int(page.inner_text("#op-tp")) == total and page.inner_text("#op-fn") == "0"
    assert violations == []
    seen.append(page.content())
    shot(page, "v04-report")

    # release: audited with who and when, in the validation log and the portal's own
    page.goto(f"{world.url}/validation/runs/{run_id}")
    page.click("#release button")
    released = page.inner_text("#released")
    assert released.startswith("by vera-val at 20")
    assert page.locator("#release").count() == 0
    last = Workspace(world.state / "validation").events()[-1]
    assert (last["event"], last["who"], last["run"]) == ("release", "vera-val", run_id)
    assert (world.state / "validation" / "releases" / run_id / "report.html").is_file()
    with PortalDB(world.state / "portal.sqlite") as db:
        assert any(e["action"] == "validation.release" and e["actor"] == "vera-val" for e in db.audit_log(50))
    seen.append(page.content())
    shot(page, "v05-released")
    page.click("#report-link")  # released reports stay viewable
    seen.append(page.content())

    # the validator drops the frozen cohort: gone from the workspace, audited in both logs
    page.goto(world.url + "/validation")
    page.click(f"#cohorts tr:has-text('{frozen.id[:12]}') button:has-text('Drop')")
    assert f"Frozen cohort {frozen.id[:12]} dropped" in page.inner_text(".done")
    assert Workspace(world.state / "validation").frozen_cohorts() == [] and page.locator("#cohorts").count() == 0
    last = Workspace(world.state / "validation").events()[-1]
    assert (last["event"], last["who"], last["cohort"]) == ("cohort_dropped", "vera-val", frozen.id)
    assert f"cohort {frozen.id[:12]}" in page.inner_text("#audit")
    with PortalDB(world.state / "portal.sqlite") as db:
        assert any(e["action"] == "validation.cohort.drop" and e["detail"] == frozen.id for e in db.audit_log(50))
    seen.append(page.content())

    # no page the validator saw holds a pseudonym, a UID or a per-patient identifier of the warehouse
    assert len(world.identifiers) > 100
    for html in seen:
        assert PSEUDONYM.search(html) is None
        assert [s for s in world.identifiers if s in html] == []


@pytest.mark.parametrize("username", ["north-site", "dm-dana"])
def test_site_uploaders_and_data_managers_are_refused_every_validation_page(page, world, username):
    login(page, world, username)
    assert "Validation" not in menu(page) and "Model folders" not in menu(page)
    for url in VALIDATION_URLS:
        response = page.goto(world.url + url)
        assert response.status == 403, url
        assert "Not allowed" in page.inner_text("h1")
    shot(page, f"v06-refused-{username}")
    page.goto(world.url + "/")  # the account's own start page: its forms carry the session's real CSRF token
    token = page.locator("input[name=csrf]").first.get_attribute("value")
    assert token
    for url in ("/validation/submit", "/validation/start", "/validation/folders", "/validation/runs/x/release",
                "/validation/cohorts/drop"):  # fmt: skip
        form = {"csrf": token, "folder": str(COIN_FLIP), "kind": "dry_run"}
        assert page.request.post(world.url + url, form=form).status == 403, url  # refused by role, not by token


def test_validators_are_kept_to_their_pages_and_their_forms(page, world):
    assert page.goto(world.url + "/validation").url.endswith("/login")  # not logged in: to the log-in page
    login(page, world, "otto-val")
    assert page.url.endswith("/validation")
    for url in ("/validation/folders", "/admin", "/admin/accounts", "/site/summary"):
        assert page.goto(world.url + url).status == 403, url
    # a form without the session's CSRF token is refused
    refused = page.request.post(world.url + "/validation/start", form={"csrf": "wrong", "kind": "dry_run"})
    assert refused.status == 403
    # a folder no administrator offered cannot be submitted, however it is named
    page.goto(world.url + "/validation")
    token = page.locator("input[name=csrf]").first.get_attribute("value")
    answer = page.request.post(world.url + "/validation/submit", form={"csrf": token, "folder": "/etc"})
    assert answer.status == 400 and "not a model folder offered on this server" in answer.text()
    # dropping a frozen cohort that does not exist is refused with the reason
    answer = page.request.post(world.url + "/validation/cohorts/drop", form={"csrf": token, "cohort": "feedface0000"})
    assert answer.status == 400 and "no frozen cohort feedface0000" in answer.text()
    assert not any(
        e["event"] == "submission" and e["who"] == "otto-val" for e in Workspace(world.state / "validation").events()
    )


def test_administrators_offer_only_folders_holding_a_manifest_and_can_withdraw_them(page, world, tmp_path):
    import shutil

    empty = tmp_path / "no-manifest"
    empty.mkdir()
    model = tmp_path / "vendor-delivery"
    shutil.copytree(COIN_FLIP, model)
    login(page, world, "ida-admin")
    page.goto(world.url + "/validation/folders")
    page.fill("#offer input[name=folder]", str(empty))
    page.click("#offer button")
    assert page.inner_text(".error") == f"{empty / 'nccid-model.json'}: missing; every submission needs its manifest"
    page.fill("#offer input[name=folder]", str(model))
    page.click("#offer button")
    assert str(model) in page.inner_text("#folders") and str(empty) not in page.inner_text("#folders")
    page.click(f"#folders tr:has-text('{model}') button:has-text('Withdraw')")
    assert "no longer offered" in page.inner_text(".done")
    assert str(model) not in {str(f) for f in Workspace(world.state / "validation").model_folders()}
    # withdrawing it again (a second tab, a stale page) is refused, not reported as done
    token = page.locator("input[name=csrf]").first.get_attribute("value")
    again = page.request.post(
        world.url + "/validation/folders", form={"csrf": token, "folder": str(model), "action": "withdraw"}
    )
    assert again.status == 400 and "not a model folder offered on this server" in again.text()
    assert "no longer offered" not in again.text()
    with PortalDB(world.state / "portal.sqlite") as db:
        actions = [(e["actor"], e["action"], e["detail"], e["outcome"]) for e in db.audit_log(50)]
    assert ("ida-admin", "validation.folder.withdraw", str(model), "ok") in actions
    refusals = [a for a in actions if a[1] == "validation.folder.withdraw" and a[3] == "refused"]
    assert len(refusals) == 1 and "not a model folder offered" in refusals[0][2]
