"""The portal in a real browser (Debian's chromium driven by Playwright) against a real server started here.

Each test starts from a fresh browser context (no cookies) on the one portal of this module, started as its
own process on a free loopback port and stopped by PID at teardown. Screenshots of the main pages go to
tests/output/portal/ (or $NCCID_TEST_OUTPUT/portal) for a reviewer.
"""

from __future__ import annotations

import csv
import json
import random
import re
import sqlite3
import time
from pathlib import Path

import portal_helpers
import pyotp
import pytest
from portal_helpers import PASSWORD, login, running_portal, shot

from nccid.portal.accounts import PortalDB
from nccid.portal.central import save_site
from nccid.site.vault import PseudonymKey
from nccid.store import LocalStore
from nccid.synth.hospital import filled_template, hospital_patient

playwright_api = pytest.importorskip("playwright.sync_api")
browser, page = portal_helpers.browser, portal_helpers.page  # the shared fixtures, used by name
SITE_MENU = [
    "Guidance And Documentation",
    "FAQ",
    "Summary",
    "Upload Covid (Positive) Data",
    "Upload Covid Status (Negative) Data",
    "Upload Covid ISARIC Data",
    "Change Password",
    "Logout",
]


class Portal:
    """What the tests know about the running portal: its URL, folders, accounts and the people of the sheets."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.store_dir = root / "store"
        self.state = root / "state"
        self.hospital = root / "hospital"  # the site's own files: sheets with NHS numbers, never server-side
        self.log = root / "server.log"
        self.url = ""
        self.totp: dict[str, str] = {}
        self.people: list = []

    def sheet(
        self, name: str, count: int, *, kind: str = "positive", defects: bool = False, seed: int = 0, hospital: str = ""
    ) -> Path:
        """A filled sheet of new synthetic people (CSV or XLSX by the name), its Hospital column set if asked."""
        rng = random.Random(seed)
        people = [hospital_patient(rng) for _ in range(count)]
        self.people.extend(people)
        path = self.hospital / name
        filled_template(people, str(path), kind=kind, defects=defects, seed=seed)
        if hospital:
            rows = list(csv.reader(path.open(newline="")))
            column = rows[0].index("Hospital")
            for row in rows[1:]:
                row[column] = hospital
            with path.open("w", newline="") as handle:
                csv.writer(handle).writerows(rows)
        return path


@pytest.fixture(scope="module")
def portal(tmp_path_factory) -> Portal:
    root = tmp_path_factory.mktemp("portal")
    p = Portal(root)
    p.hospital.mkdir()
    store = LocalStore(p.store_dir)
    key_file = PseudonymKey.generate().save(root / "programme.key")
    with PortalDB(p.state / "portal.sqlite") as db:
        save_site(
            store, db, uploader="northfield", name="Northfield General Hospital", aliases=[], rule="split", actor="test"
        )
        save_site(
            store, db, uploader="southgate", name="Southgate Infirmary", aliases=[], rule="training", actor="test"
        )
        for name, site in [
            ("north-a", "northfield"),
            ("north-b", "northfield"),
            ("north-c", "northfield"),
            ("north-lock", "northfield"),
            ("north-totp", "northfield"),
            ("south-a", "southgate"),
        ]:
            db.create_account(name, "site", site=site, actor="test", password=PASSWORD)
        for name in ("admin-totp", "admin-load", "admin-accounts"):
            p.totp[name] = db.create_account(name, "admin", actor="test", password=PASSWORD).totp_secret
        p.totp["dm-config"] = db.create_account(
            "dm-config", "data_manager", actor="test", password=PASSWORD
        ).totp_secret
    with running_portal(["--store", p.store_dir, "--state", p.state, "--key-file", key_file], p.log) as p.url:
        yield p


def upload(page, portal: Portal, template: str, sheet: Path) -> None:
    page.goto(f"{portal.url}/site/upload/{template}")
    page.set_input_files("input[name=sheet]", str(sheet))
    page.click("main form button[type=submit]")
    page.wait_for_selector("#result, .error")


def test_login_right_and_wrong_password_shows_the_site_menu(page, portal):
    login(page, portal, "north-a", "Not-The-Password-9")
    assert "wrong user name or password" in page.inner_text("main")
    assert "/login" in page.url
    shot(page, "01-login-failed")
    login(page, portal, "north-a")
    page.wait_for_url("**/site/guidance")
    menu = [t.strip() for t in page.locator("nav.menu a, nav.menu button").all_inner_texts()]
    assert menu == SITE_MENU
    assert "Northfield General Hospital" in page.inner_text("header")
    shot(page, "02-guidance")
    page.click("text=FAQ")
    assert "Frequently asked questions" in page.inner_text("h1")
    shot(page, "03-faq")


def test_account_locks_after_repeated_failures(page, portal):
    for _ in range(5):
        login(page, portal, "north-lock", "Wrong-Guess-Again-1")
        assert "wrong user name or password" in page.inner_text("main")
    login(page, portal, "north-lock")  # the right password, but locked now
    assert "locked" in page.inner_text("main")
    assert "/login" in page.url
    shot(page, "04-locked")
    login(page, portal, "north-b")  # another account from the same address still gets in
    page.wait_for_url("**/site/guidance")


def test_administrators_need_their_totp_code(page, portal):
    login(page, portal, "admin-totp", code=False)
    page.wait_for_url("**/login/totp")
    page.goto(portal.url + "/admin")  # the password alone opens nothing
    assert page.url.endswith("/login/totp")
    page.fill("input[name=code]", "000000" if pyotp.TOTP(portal.totp["admin-totp"]).now() != "000000" else "111111")
    page.click("form button[type=submit]")
    assert "not right" in page.inner_text("main")
    shot(page, "05-totp")
    page.fill("input[name=code]", pyotp.TOTP(portal.totp["admin-totp"]).now())
    page.click("form button[type=submit]")
    page.wait_for_url("**/admin")
    assert "Central team overview" in page.inner_text("h1")
    shot(page, "06-admin-overview")


def test_a_site_may_switch_on_totp_and_then_needs_it(page, portal):
    login(page, portal, "north-totp")
    page.wait_for_url("**/site/guidance")
    page.click("text=Change Password")
    page.click("text=Set up an authenticator app")
    secret = page.inner_text("#totp-secret")
    page.fill("input[name=code]", pyotp.TOTP(secret).now())
    page.click("main form button[type=submit]")
    assert "second factor is on" in page.inner_text(".done")
    page.click("nav.menu button:has-text('Logout')")
    login(page, portal, "north-totp")
    page.wait_for_url("**/login/totp")
    page.goto(portal.url + "/site/summary")
    assert page.url.endswith("/login/totp")
    page.fill("input[name=code]", pyotp.TOTP(secret).at(time.time() + 30))  # the next code: each works once
    page.click("form button[type=submit]")
    page.wait_for_url("**/site/guidance")


def test_a_form_without_its_csrf_token_is_refused(page, portal):
    login(page, portal, "north-c")
    page.wait_for_url("**/site/guidance")
    forged = page.request.post(
        portal.url + "/account/password",
        form={"csrf": "forged", "current": PASSWORD, "new": "Brand-New-Lantern-42", "confirm": "Brand-New-Lantern-42"},
    )
    assert forged.status == 403
    no_cookie = page.context.browser.new_context()
    try:
        answer = no_cookie.request.post(portal.url + "/login", form={"username": "north-c", "password": PASSWORD})
        assert answer.status == 403
    finally:
        no_cookie.close()
    page.goto(portal.url + "/site/summary")  # still logged in, the password unchanged: log in again with it
    page.click("nav.menu button:has-text('Logout')")
    login(page, portal, "north-c")
    page.wait_for_url("**/site/guidance")


def test_a_site_sees_only_its_own_data_even_by_url(page, portal, browser):
    other = browser.new_context()
    try:
        south = other.new_page()
        login(south, portal, "south-a")
        upload(
            south,
            portal,
            "negative",
            portal.sheet("south-negative.csv", 3, kind="negative", seed=7, hospital="Southgate Infirmary"),
        )
        assert south.inner_text("#accepted") == "3"
    finally:
        other.close()
    login(page, portal, "north-a")
    page.wait_for_url("**/site/guidance")
    for url in ("/admin/sites/southgate/summary", "/admin", "/admin/queues"):
        answer = page.goto(portal.url + url)
        assert answer.status == 403, url
        assert "Southgate" not in page.content()
    page.goto(portal.url + "/site/guidance")  # the site's own page: its forms carry the session's real CSRF token
    token = page.locator("input[name=csrf]").first.get_attribute("value")
    assert token
    assert page.request.post(portal.url + "/admin/loads/start", form={"csrf": token}).status == 403
    page.goto(portal.url + "/site/summary?site=southgate&uploader=southgate")
    text = page.inner_text("main")
    assert "Summary: Northfield General Hospital" in text and "Southgate" not in text
    assert "south-a" not in text  # the other site's upload history is not listed


def test_an_upload_with_errors_lists_them_by_row_and_column(page, portal):
    sheet = portal.sheet("north-defects.xlsx", 6, defects=True, seed=3)
    login(page, portal, "north-a")
    upload(page, portal, "positive", sheet)
    rows = [[c.strip() for c in r.split("\t")] for r in page.locator("#errors tr").all_inner_texts()[1:]]
    found = {(int(r[0]), r[1]) for r in rows}
    assert (3, "NHS/CHI Number") in found  # the invalid NHS number
    assert (8, "NHS/CHI Number") in found  # the duplicated person
    assert all(r[2] for r in rows)  # each with its reason
    assert int(page.inner_text("#held")) == len({r for r, _ in found})
    shot(page, "07-upload-errors")
    page.goto(portal.url + "/site/upload/positive")  # the errors were shown once, not kept
    assert page.locator("#errors").count() == 0
    assert_no_identifier_server_side(portal)


def test_a_good_sheet_is_pseudonymised_filed_and_loaded_from_the_admin_page(page, portal, browser):
    sheet = portal.sheet("north-good.xlsx", 5, seed=11)
    login(page, portal, "north-b")
    upload(page, portal, "positive", sheet)
    assert page.inner_text("#accepted") == "5" and page.inner_text("#held") == "0"
    shot(page, "08-upload-good")
    raw = sorted((portal.store_dir / "raw-northfield").glob("*/data/*_data.json"))
    assert len(raw) >= 5
    for path in raw:
        record = json.loads(path.read_text())
        assert re.fullmatch(r"Covid[0-9]+", record["Pseudonym"]) and path.name == f"{record['Pseudonym']}_data.json"
        assert record["SubmittingCentre"] == "Northfield General Hospital"
        assert "NHS/CHI Number" not in record and "Hospital (Internal) Number" not in record
    upload(page, portal, "positive", sheet)  # the same sheet again: nothing duplicated
    assert "0 record(s) written" in page.inner_text("#result")
    assert len(sorted((portal.store_dir / "raw-northfield").glob("*/data/*_data.json"))) == len(raw)

    admin_context = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        admin = admin_context.new_page()
        login(admin, portal, "admin-load")
        admin.goto(portal.url + "/admin/loads")
        admin.click("text=Start a load")
        playwright_api.expect(admin.locator("#job-state")).to_contain_text("finished", timeout=60_000)
        shot(admin, "09-admin-loads")
        admin.click("#job-state a")
        assert "Load " in admin.inner_text("h1")
        shot(admin, "10-load-report")
        admin.goto(portal.url + "/admin/queues")
        shot(admin, "11-queues")
        admin.goto(portal.url + "/admin/sites")
        shot(admin, "12-sites")
        admin.goto(portal.url + "/admin/audit")
        audit = admin.inner_text("#audit")
        assert "load.start" in audit and "positive sheet for northfield: 5 row(s) accepted" in audit
        shot(admin, "12b-audit")
    finally:
        admin_context.close()
    pseudonyms = {json.loads(p.read_text())["Pseudonym"] for p in raw}
    filed = {
        p.parent.name for g in ("training", "validation") for p in (portal.store_dir / g / "data").glob("*/data_*.json")
    }
    assert pseudonyms <= filed
    page.goto(portal.url + "/site/summary")
    assert int(page.inner_text("#patients")) >= len(pseudonyms)
    assert int(page.inner_text("#clinical")) >= len(pseudonyms)
    shot(page, "13-site-summary")
    assert_no_identifier_server_side(portal)


def test_isaric_upload_keeps_links_in_the_vault_only(page, portal):
    rng = random.Random(21)
    people = [hospital_patient(rng) for _ in range(3)]
    portal.people.extend(people)
    sheet = portal.hospital / "isaric.csv"
    sheet.write_text(
        "NHS/CHI Number,Hospital (Internal) Number,ISARIC-CCP Subject ID,Date of enrolment\n"
        + "".join(f"{p.nhs},{p.hospital_number},RYJ01-{n:04d},2020-04-0{n + 1}\n" for n, p in enumerate(people))
        + "4010232137,X1,not-an-id,2020-04-01\n"
    )
    login(page, portal, "north-a")
    upload(page, portal, "isaric", sheet)
    assert page.inner_text("#accepted") == "3"
    assert "ISARIC-CCP Subject ID" in page.inner_text("#errors")
    shot(page, "14-upload-isaric")
    with sqlite3.connect(portal.state / "vault.sqlite") as vault:
        assert vault.execute("SELECT COUNT(*) FROM links WHERE dataset = 'isaric'").fetchone()[0] == 3
    assert not list(portal.store_dir.rglob("*isaric*")) and "RYJ01" not in _all_text(portal.store_dir)
    assert_no_identifier_server_side(portal)


def test_config_is_validated_like_the_loader_and_sites_are_added(page, portal):
    login(page, portal, "dm-config")
    page.goto(portal.url + "/admin/config")
    before = (portal.store_dir / "config.json").read_text()
    doc = json.loads(before)
    page.fill("textarea[name=config]", json.dumps({**doc, "training_percentage": 140}))
    page.click("main form button[type=submit]")
    assert "training_percentage" in page.inner_text(".error")
    assert (portal.store_dir / "config.json").read_text() == before
    shot(page, "15-config-refused")
    page.goto(portal.url + "/admin/sites")
    page.fill("input[name=uploader]", "eastfield")
    page.fill("input[name=name]", "Eastfield Hospital")
    page.fill("input[name=aliases]", "Eastfield Hosp.")
    page.select_option("select[name=rule]", "validation")
    page.click("main form button[type=submit]")
    assert "Eastfield Hospital" in page.inner_text("#sites")
    saved = json.loads((portal.store_dir / "config.json").read_text())
    assert "raw-eastfield/" in saved["raw_prefixes"]
    assert {"Eastfield Hospital", "Eastfield Hosp."} <= set(saved["sites"]["validation"])
    page.goto(portal.url + "/admin/accounts")  # accounts are administrators' only
    assert "Not allowed" in page.inner_text("h1")


def test_an_administrator_creates_an_account_with_a_one_time_link(page, portal, browser):
    login(page, portal, "admin-accounts")
    page.goto(portal.url + "/admin/accounts")
    page.fill("input[name=username]", "north-new")
    page.select_option("select[name=role]", "site")
    page.select_option("select[name=site]", "northfield")
    page.click("form[action='/admin/accounts'] button[type=submit]")
    link = page.inner_text("#setup-link")
    shot(page, "16-accounts")
    newcomer = browser.new_context()
    try:
        fresh = newcomer.new_page()
        fresh.goto(link)
        fresh.fill("input[name=password]", "password1234")
        fresh.fill("input[name=confirm]", "password1234")
        fresh.click("form button[type=submit]")
        assert "at least 12" in fresh.inner_text(".error") or "common" in fresh.inner_text(".error")
        fresh.fill("input[name=password]", "Orchard-Falcon-Meadow-3")
        fresh.fill("input[name=confirm]", "Orchard-Falcon-Meadow-3")
        fresh.click("form button[type=submit]")
        assert "ready" in fresh.inner_text("main")
        fresh.goto(link)  # used once: no second account take-over
        assert "not valid" in fresh.inner_text("h1")
        login(fresh, portal, "north-new", "Orchard-Falcon-Meadow-3")
        fresh.wait_for_url("**/site/guidance")
    finally:
        newcomer.close()


def test_change_password_then_log_out(page, portal):
    login(page, portal, "north-c")
    page.click("text=Change Password")
    page.fill("input[name=current]", PASSWORD)
    page.fill("input[name=new]", "qwertyuiop12")
    page.fill("input[name=confirm]", "qwertyuiop12")
    page.click("main form button[type=submit]")
    assert page.locator(".error").count() == 1
    page.fill("input[name=current]", PASSWORD)
    page.fill("input[name=new]", "Copper-Kettle-Willow-8")
    page.fill("input[name=confirm]", "Copper-Kettle-Willow-8")
    page.click("main form button[type=submit]")
    assert "password is changed" in page.inner_text(".done")
    shot(page, "17-password-changed")
    page.click("nav.menu button:has-text('Logout')")
    page.wait_for_url("**/login?out=1")
    page.goto(portal.url + "/site/summary")
    assert "/login" in page.url
    login(page, portal, "north-c", PASSWORD)
    assert "wrong user name or password" in page.inner_text("main")
    login(page, portal, "north-c", "Copper-Kettle-Willow-8")
    page.wait_for_url("**/site/guidance")


def test_an_idle_session_expires(page, portal):
    login(page, portal, "south-a")
    page.wait_for_url("**/site/guidance")
    with sqlite3.connect(portal.state / "portal.sqlite") as db:  # two hours pass without a click
        db.execute("UPDATE sessions SET last_seen = last_seen - 7200 WHERE username = 'south-a'")
    page.goto(portal.url + "/site/summary")
    assert "/login" in page.url and "session expired" in page.inner_text("main")


def test_security_headers_and_refused_files(page, portal, tmp_path):
    answer = page.goto(portal.url + "/login")
    headers = answer.headers
    assert "default-src 'none'" in headers["content-security-policy"]
    assert headers["x-frame-options"] == "DENY" and headers["x-content-type-options"] == "nosniff"
    login(page, portal, "south-a")
    page.wait_for_url("**/site/guidance")
    session = next(c for c in page.context.cookies() if c["name"] == "nccid_session")
    assert session["httpOnly"] and session["sameSite"] == "Strict"
    bomb = tmp_path / "bomb.xlsx"
    import zipfile

    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("xl/workbook.xml", "<workbook/>")
        archive.writestr("xl/worksheets/sheet1.xml", b"0" * (80 * 1024 * 1024))
    upload(page, portal, "positive", bomb)
    assert "zip bomb" in page.inner_text(".error")
    broken = tmp_path / "broken.xlsx"
    broken.write_bytes(b"PK\x03\x04 this is not a workbook")
    upload(page, portal, "positive", broken)
    assert "not a readable XLSX" in page.inner_text(".error")
    shot(page, "18-refused-file")


def _all_text(folder: Path) -> str:
    return "\n".join(p.read_bytes().decode("latin-1") for p in folder.rglob("*") if p.is_file())


def assert_no_identifier_server_side(portal: Portal) -> None:
    """The portal's database, vault, store, catalog and server log hold no NHS or hospital number of any sheet
    uploaded so far (with or without spaces)."""
    assert portal.people
    folders = [portal.state, portal.store_dir]
    haystack = "\n".join(_all_text(f) for f in folders if f.exists()) + portal.log.read_text(errors="replace")
    haystack += "".join(p.read_bytes().decode("latin-1") for p in portal.root.glob("store.catalog.sqlite*"))
    squeezed = re.sub(r"[ -]", "", haystack)
    for person in portal.people:
        assert re.sub(r"\D", "", person.nhs) not in squeezed
        assert person.hospital_number not in haystack
