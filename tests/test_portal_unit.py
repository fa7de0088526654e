"""The portal's library parts without a browser: accounts and their locks, sessions, set-up links, sheets read
from memory, sites into config.json, the site summary, and the app on an S3 store."""

from __future__ import annotations

import io
import json
import random
import re
import sqlite3
import zipfile
from pathlib import Path

import pyotp
import pytest

from nccid.errors import ConfigError, SheetError
from nccid.portal.accounts import PortalDB, PortalError, Site, create_demo_accounts, password_problem
from nccid.portal.central import config_with_site, save_config_doc, save_site
from nccid.portal.sheets import MAX_ROWS, file_upload, read_sheet_bytes, template_bytes
from nccid.site.isaric import safe_cell, to_csv
from nccid.site.vault import PseudonymKey, Vault
from nccid.stats.site_summary import catalog_reader, site_summary
from nccid.store import LocalStore
from nccid.synth.hospital import filled_template, hospital_patient
from nccid.warehouse.catalog import Catalog
from nccid.warehouse.config import load_config
from nccid.warehouse.loader import load

PASSWORD = "Quiet-Harbour-Lantern-7"


@pytest.fixture
def db(tmp_path):
    with PortalDB(tmp_path / "state" / "portal.sqlite") as portal_db:
        portal_db.save_site(Site("northfield", "Northfield General Hospital", (), "split"), actor="test")
        yield portal_db


@pytest.mark.parametrize(
    ("password", "refused"),
    [
        ("short1!", True),
        ("password1234", True),
        ("aaaaaaaaaaaaaa", True),
        ("abcdefghijklmn", True),
        ("alice-likes-cats-9", True),  # contains the user name
        ("Quiet-Harbour-Lantern-7", False),
    ],
)
def test_password_policy(password, refused):
    assert (password_problem(password, "alice") is not None) is refused


def test_passwords_are_argon2id_hashes_and_never_stored_in_clear(db, tmp_path):
    db.create_account("north-a", "site", site="northfield", actor="test", password=PASSWORD)
    stored = db.db.execute("SELECT pw_hash FROM users WHERE username = 'north-a'").fetchone()[0]
    assert stored.startswith("$argon2id$")
    raw = b"".join(p.read_bytes() for p in (tmp_path / "state").iterdir())
    assert PASSWORD.encode() not in raw
    assert db.authenticate("north-a", PASSWORD, "10.0.0.1").user is not None
    assert db.authenticate("north-a", "Wrong-Harbour-Lantern-7", "10.0.0.1").user is None


def test_site_accounts_need_a_configured_site_and_central_roles_none(db):
    with pytest.raises(PortalError, match="configured site"):
        db.create_account("south-a", "site", site="southgate", actor="test", password=PASSWORD)
    with pytest.raises(PortalError, match="only site uploader"):
        db.create_account("boss", "admin", site="northfield", actor="test", password=PASSWORD)
    with pytest.raises(PortalError, match="user names"):
        db.create_account("Bad Name", "admin", actor="test", password=PASSWORD)


def test_failures_lock_the_account_and_separately_the_address(db):
    db.create_account("north-a", "site", site="northfield", actor="test", password=PASSWORD)
    db.create_account("north-b", "site", site="northfield", actor="test", password=PASSWORD)
    for _ in range(3):
        outcome = db.authenticate("north-a", "nope", "10.0.0.1", account_limit=3, delay_s=0.5)
    assert outcome.delay_s == 2.0  # 0.5, 1, 2: slower at each failure
    assert "locked" in db.authenticate("north-a", PASSWORD, "10.0.0.9", account_limit=3).reason
    assert db.authenticate("north-b", PASSWORD, "10.0.0.1", account_limit=3).user is not None
    for n in range(4):  # many accounts guessed from one address lock that address
        db.authenticate(f"guess-{n}", "nope", "10.0.0.66", address_limit=4)
    assert "locked" in db.authenticate("north-b", PASSWORD, "10.0.0.66", address_limit=4).reason
    assert db.authenticate("north-b", PASSWORD, "10.0.0.2", address_limit=4).user is not None
    actors = {e["actor"] for e in db.audit_log()}
    assert "(unknown account)" in actors and not any(a.startswith("guess-") for a in actors)


def test_totp_codes_work_once(db):
    made = db.create_account("boss", "admin", actor="test", password=PASSWORD)
    assert made.totp_secret and db.user("boss").needs_totp
    code = pyotp.TOTP(made.totp_secret).now()
    assert db.verify_totp("boss", code, "10.0.0.1")
    assert not db.verify_totp("boss", code, "10.0.0.1")  # replayed
    assert not db.verify_totp("boss", "12345", "10.0.0.1")


def test_totp_secrets_are_stored_sealed_under_a_key_kept_apart(db, tmp_path):
    made = db.create_account("boss", "admin", actor="test", password=PASSWORD)
    key = db.path.with_name("totp.key")
    assert key.stat().st_mode & 0o777 == 0o600 and len(key.read_bytes()) == 32
    stored = db.db.execute("SELECT totp_secret FROM users WHERE username = 'boss'").fetchone()[0]  # as stored
    assert stored.startswith("aesgcm:") and made.totp_secret not in stored
    assert db.verify_totp("boss", pyotp.TOTP(made.totp_secret).now(), "10.0.0.1")
    # a copy of the database without its key file (a backup, a leaked file) opens no second factor
    elsewhere = tmp_path / "copy" / "portal.sqlite"
    elsewhere.parent.mkdir()
    source, copy = sqlite3.connect(db.path), sqlite3.connect(elsewhere)
    source.backup(copy)  # as a backup is made
    source.close()
    copy.close()
    with pytest.raises(PortalError, match=r"totp.key is missing: the second-factor secrets in portal.sqlite"):
        PortalDB(elsewhere)
    # a sealed secret moved onto another account does not open there
    other = db.create_account("deputy", "admin", actor="test", password=PASSWORD)
    db.db.execute("UPDATE users SET totp_secret = ? WHERE username = 'deputy'", (stored,))
    with pytest.raises(PortalError, match="second-factor secret of deputy cannot be opened"):
        db.verify_totp("deputy", pyotp.TOTP(other.totp_secret).now(), "10.0.0.1")


def test_a_damaged_or_exposed_totp_key_is_refused_with_its_reason(tmp_path):
    path = tmp_path / "state" / "portal.sqlite"
    with PortalDB(path) as first:
        first.create_account("boss", "admin", actor="test", password=PASSWORD)
    key = path.with_name("totp.key")
    whole = key.read_bytes()
    key.write_bytes(whole[:5])  # cut short
    with pytest.raises(PortalError, match=r"totp.key is not a whole key \(5 bytes, not 32\)"):
        PortalDB(path)
    key.write_bytes(whole)
    key.chmod(0o644)
    with pytest.raises(PortalError, match="may be read by others: make it owner-only"):
        PortalDB(path)
    key.chmod(0o600)
    PortalDB(path).close()
    assert [p.name for p in key.parent.iterdir() if p.name.startswith(".totp.key")] == []  # no partial key left


def test_plain_totp_secrets_of_an_older_database_are_sealed_when_it_opens(tmp_path):
    path = tmp_path / "state" / "portal.sqlite"
    with PortalDB(path) as first:
        made = first.create_account("boss", "admin", actor="test", password=PASSWORD)
        first.db.execute("UPDATE users SET totp_secret = ? WHERE username = 'boss'", (made.totp_secret,))
    path.with_name("totp.key").unlink()  # as a portal.sqlite from before: plain secrets, no key file
    with PortalDB(path) as reopened:
        stored = reopened.db.execute("SELECT totp_secret FROM users WHERE username = 'boss'").fetchone()[0]
        assert stored.startswith("aesgcm:") and made.totp_secret not in stored
        assert reopened.verify_totp("boss", pyotp.TOTP(made.totp_secret).now(), "10.0.0.1")


def test_sessions_end_when_idle_or_too_old_and_store_only_digests(db):
    db.create_account("north-a", "site", site="northfield", actor="test", password=PASSWORD)
    token, _ = db.create_session("north-a", totp_ok=True)
    assert db.session(token, idle_s=60, absolute_s=3600)[0].username == "north-a"
    assert not db.db.execute("SELECT 1 FROM sessions WHERE token_hash = ?", (token,)).fetchone()
    db.db.execute("UPDATE sessions SET last_seen = last_seen - 120")
    session, why = db.session(token, idle_s=60, absolute_s=3600)
    assert session is None and "expired" in why
    token, _ = db.create_session("north-a", totp_ok=True)
    db.db.execute("UPDATE sessions SET created = created - 7200")
    assert db.session(token, idle_s=60, absolute_s=3600)[0] is None


def test_set_up_links_work_once_and_enrol_totp(db):
    made = db.create_account("dm-new", "data_manager", actor="admin")
    assert made.setup_token and not made.password
    _, secret = db.setup_account(made.setup_token)
    with pytest.raises(PortalError, match="authenticator"):
        db.complete_setup(made.setup_token, "Orchard-Falcon-Meadow-3", "000000")
    db.complete_setup(made.setup_token, "Orchard-Falcon-Meadow-3", pyotp.TOTP(secret).now())
    assert db.user("dm-new").totp_enabled and db.setup_account(made.setup_token) is None
    with pytest.raises(PortalError, match="not valid"):
        db.complete_setup(made.setup_token, "Another-Falcon-Meadow-4")
    assert made.setup_token not in json.dumps(db.audit_log())


def test_demo_accounts_come_with_passwords_once(db):
    made = create_demo_accounts(db, [Site("southgate", "Southgate Infirmary", (), "training")])
    roles = {m.role for m in made}
    assert roles == {"site", "data_manager", "validator", "admin"}
    for account in made:
        assert db.authenticate(account.username, account.password, "10.0.0.1").user is not None
        assert bool(account.totp_secret) == (account.role != "site")


def _xlsx(rows) -> bytes:
    import openpyxl

    book = openpyxl.Workbook()
    for row in rows:
        book.active.append(row)
    buffer = io.BytesIO()
    book.save(buffer)
    return buffer.getvalue()


def test_sheets_are_read_from_memory_and_bad_files_refused_with_a_message():
    assert read_sheet_bytes(_xlsx([["a", "b"], [1, 2]]), "x.xlsx") == [["a", "b"], [1, 2]]
    assert read_sheet_bytes(b"a,b\n1,2\n", "x.csv") == [["a", "b"], ["1", "2"]]
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("xl/workbook.xml", "<workbook/>")
        archive.writestr("xl/worksheets/sheet1.xml", b"0" * (70 * 1024 * 1024))
    for data, name, message in [
        (bomb.getvalue(), "b.xlsx", "zip bomb"),
        (b"PK\x03\x04garbage", "b.xlsx", "not a readable XLSX"),
        ("é".encode("latin-1") + b",x\n", "b.csv", "not UTF-8"),
        (b"%PDF-1.4", "b.pdf", "neither .xlsx nor .csv"),
        (("a\n" * (MAX_ROWS + 5)).encode(), "b.csv", "more than"),
    ]:
        with pytest.raises(SheetError, match=message):
            read_sheet_bytes(data, name)


def test_formula_injection_is_neutralised_in_exports():
    assert safe_cell('=HYPERLINK("http://x")') == '\'=HYPERLINK("http://x")'
    assert safe_cell("+1") == "'+1" and safe_cell("@SUM(A1)") == "'@SUM(A1)" and safe_cell(3) == 3
    assert to_csv(["k"], [["=1+1"], ["Covid1"]]).splitlines() == ["k", "'=1+1", "Covid1"]
    import openpyxl

    headers = [c.value for c in openpyxl.load_workbook(io.BytesIO(template_bytes("isaric", "xlsx"))).active[1]]
    assert headers[0] == "NHS/CHI Number" and not any(str(h).startswith("=") for h in headers)


def test_sites_go_into_config_json_validated_like_the_loader(tmp_path, db):
    store = LocalStore(tmp_path / "store")
    site = save_site(
        store, db, uploader="eastfield", name="Eastfield", aliases=["Eastfield Hosp."], rule="validation", actor="dm"
    )
    config = load_config(store)
    assert "raw-eastfield/" in config.raw_prefixes and {"Eastfield", "Eastfield Hosp."} <= config.validation_sites
    moved = config_with_site(json.loads(store.read("config.json")), Site("eastfield", "Eastfield", (), "split"), site)
    assert moved["sites"]["split"] == ["Eastfield"] and moved["sites"]["validation"] == []
    with pytest.raises(ConfigError, match="training_percentage"):
        save_config_doc(store, {**moved, "training_percentage": 101}, db=db, actor="dm")
    db.save_site(Site("other", "Other", ("Eastfield Hosp.",), "split"), actor="dm")
    with pytest.raises(PortalError, match="already belongs"):
        save_site(store, db, uploader="eastfield2", name="Eastfield Hosp.", aliases=[], rule="split", actor="dm")


def test_uploads_are_pseudonymised_filed_once_and_summarised(tmp_path, db):
    store = LocalStore(tmp_path / "store")
    site = save_site(
        store, db, uploader="northfield", name="Northfield General Hospital", aliases=[], rule="split", actor="dm"
    )
    rng = random.Random(5)
    people = [hospital_patient(rng) for _ in range(4)]
    sheet = filled_template(people, str(tmp_path / "sheet.xlsx"), defects=False)
    rows = read_sheet_bytes(Path(sheet.path).read_bytes(), "sheet.xlsx")
    key = PseudonymKey.generate()
    with Vault(tmp_path / "vault.sqlite") as vault:
        first = file_upload(rows, "positive", site, store=store, db=db, vault=vault, key=key, username="north-a")
        again = file_upload(rows, "positive", site, store=store, db=db, vault=vault, key=key, username="north-a")
    assert (first.accepted, first.written, first.held_rows) == (4, 4, 0)
    assert (again.written, again.unchanged) == (0, 4)
    keys = [o.key for o in store.list("raw-northfield/")]
    assert len(keys) == 4 and all(
        re.fullmatch(r"raw-northfield/\d{4}-\d\d-\d\d/data/Covid\d+_data\.json", k) for k in keys
    )
    catalog = Catalog(tmp_path / "catalog.sqlite")
    load(store, catalog, workers=1)
    summary = site_summary(catalog_reader(catalog), site.prefix, site.centres)
    assert summary.patients == 4 and summary.clinical_records == {"data": 4}
    assert summary.by_date == [{"date": first.upload_date, "clinical": 4, "xray": 0, "ct": 0, "mri": 0}]
    other = site_summary(catalog_reader(catalog), "raw-southgate/", ["Southgate Infirmary"])
    assert other.patients == 0 and other.clinical_records == {}
    catalog.close()
    with sqlite3.connect(db.path) as raw:
        dump = "\n".join(raw.iterdump())
    assert not any(p.nhs.replace(" ", "") in dump.replace(" ", "") for p in people)


def _form_token(client, url: str) -> str:
    """The CSRF token of the form on the page at `url`."""
    return re.search(r'name="csrf" value="([^"]+)"', client.get(url).text).group(1)


def _login(client, username: str) -> None:
    """Send `username`'s password through the app's login form (a TOTP account then waits at /login/totp)."""
    client.post("/login", data={"username": username, "password": PASSWORD, "csrf": _form_token(client, "/login")})


def _upload_form_token(client, username: str) -> str:
    """Log `username` in through the app's login form and open the positive-sheet upload form; returns the
    form's CSRF token."""
    _login(client, username)
    return _form_token(client, "/site/upload/positive")


def test_the_app_uploads_to_an_s3_store_and_loads_it(tmp_path, make_store):
    from fastapi.testclient import TestClient

    from nccid.portal import PortalSettings, create_app

    store = make_store("s3")
    state = tmp_path / "state"
    with PortalDB(state / "portal.sqlite") as portal_db:
        save_site(
            store,
            portal_db,
            uploader="northfield",
            name="Northfield General Hospital",
            aliases=[],
            rule="split",
            actor="test",
        )
        portal_db.create_account("north-a", "site", site="northfield", actor="test", password=PASSWORD)
    key_file = PseudonymKey.generate().save(tmp_path / "key")
    settings = PortalSettings(
        store_url=store.url,
        state_dir=state,
        key_file=key_file,
        failure_delay_s=0.01,
        catalog_path=tmp_path / "catalog.sqlite",
    )
    people = [hospital_patient(random.Random(9)) for _ in range(1)]
    sheet = filled_template(people, str(tmp_path / "s.csv"), defects=False)
    app = create_app(settings)
    with TestClient(app) as client:
        csrf = _upload_form_token(client, "north-a")
        answer = client.post(
            "/site/upload/positive",
            data={"csrf": csrf},
            files={"sheet": ("s.csv", Path(sheet.path).read_bytes(), "text/csv")},
        )
        assert answer.status_code == 200 and 'id="accepted">1<' in answer.text
        forged = client.post(
            "/site/upload/positive",
            data={"csrf": "forged"},
            files={"sheet": ("s.csv", Path(sheet.path).read_bytes(), "text/csv")},
        )
        assert forged.status_code == 403
    assert len([o for o in store.list("raw-northfield/") if o.key.endswith("_data.json")]) == 1
    with PortalDB(state / "portal.sqlite") as portal_db:
        assert app.state.runner.start("admin", portal_db)
    app.state.runner.wait()
    job = app.state.runner.job
    assert not job.error and job.counts.get("filed") == 1
    filed = [o.key for g in ("training", "validation") for o in store.list(f"{g}/data/")]
    assert len(filed) == 1 and re.fullmatch(r"(training|validation)/data/Covid\d+/data_\d{4}-\d\d-\d\d\.json", filed[0])


def test_demo_portal_accounts_and_command(tmp_path):
    from nccid.portal.demo import set_up_demo_portal

    sites = [Site("northfield", "Northfield General Hospital", (), "split")]
    made, command = set_up_demo_portal(
        str(tmp_path / "store"), sites, key_file=tmp_path / "k", vault=tmp_path / "v.sqlite", state_dir=tmp_path / "s"
    )
    assert [m.role for m in made] == ["site", "data_manager", "validator", "admin"] and all(m.password for m in made)
    assert command.startswith("nccid portal serve --store ") and "--vault" in command
    again, _ = set_up_demo_portal(
        str(tmp_path / "store"), sites, key_file=tmp_path / "k", vault=tmp_path / "v.sqlite", state_dir=tmp_path / "s"
    )
    assert again == []  # a second run keeps the accounts (and never shows a password again)


def test_uploads_past_the_size_limit_are_refused_with_a_message(tmp_path):
    client, _ = _portal_client(tmp_path, max_upload_bytes=4096)
    store = LocalStore(tmp_path / "store")
    with client:
        csrf = _upload_form_token(client, "north-a")
        answer = client.post(
            "/site/upload/positive", data={"csrf": csrf}, files={"sheet": ("big.csv", b"a,b\n" * 50_000, "text/csv")}
        )
        assert answer.status_code == 413 and "larger than" in answer.text
        assert "Traceback" not in answer.text
    assert not list(store.list("raw-northfield/"))


def test_the_site_summary_lists_what_waits_with_reasons_for_that_site_only(tmp_path, db):
    import numpy as np

    from nccid.synth.dicom import Subject, encode, xray

    store = LocalStore(tmp_path / "store")
    north = save_site(store, db, uploader="northfield", name="Northfield", aliases=[], rule="split", actor="dm")
    south = save_site(store, db, uploader="southgate", name="Southgate", aliases=[], rule="training", actor="dm")
    subject = Subject("Covid424242", "Covid424242", "F", 60, "1.2.826.9", "20200401")
    image = xray(subject, np.random.default_rng(0), scale=0.02, series_uid="1.2.826.9.1", sop_uid="1.2.826.9.1.1")
    store.write("raw-northfield/2020-04-02/images/a.dcm", encode(image))  # no clinical record yet: pending
    store.write("raw-northfield/2020-04-02/images/b.dcm", b"not dicom at all")  # quarantined
    store.write("raw-southgate/2020-04-02/data/Covid7_data.json", b"{broken")  # held
    catalog = Catalog(tmp_path / "catalog.sqlite")
    load(store, catalog, workers=1)
    query = catalog_reader(catalog)
    mine = site_summary(query, north.prefix, north.centres)
    assert mine.waiting_counts == {"pending": 1, "quarantined": 1}
    assert {(w.key.rsplit("/", 1)[1], w.outcome) for w in mine.waiting} == {
        ("a.dcm", "pending"),
        ("b.dcm", "quarantined"),
    }
    assert all(w.reason for w in mine.waiting) and all(w.key.startswith("raw-northfield/") for w in mine.waiting)
    theirs = site_summary(query, south.prefix, south.centres)
    assert theirs.waiting_counts == {"held": 1} and theirs.waiting[0].key.startswith("raw-southgate/")
    with pytest.raises(ValueError, match="raw-"):
        site_summary(query, "training/", [])
    catalog.close()


def test_rows_of_another_hospital_are_held_as_at_the_site(tmp_path, db):
    store = LocalStore(tmp_path / "store")
    site = save_site(
        store,
        db,
        uploader="northfield",
        name="Northfield Trust",
        aliases=[],
        rule="split",
        actor="dm",
        hospitals=["Northfield General Hospital"],
    )
    rng = random.Random(8)
    people = [hospital_patient(rng) for _ in range(3)]
    sheet = filled_template(people, str(tmp_path / "sheet.csv"), defects=False)
    rows = read_sheet_bytes(Path(sheet.path).read_bytes(), "sheet.csv")
    rows[2][rows[0].index("Hospital")] = "Elsewhere Infirmary"
    with Vault(tmp_path / "vault.sqlite") as vault:
        outcome = file_upload(
            rows, "positive", site, store=store, db=db, vault=vault, key=PseudonymKey.generate(), username="north-a"
        )
    assert (outcome.accepted, outcome.held_rows) == (2, 1)
    assert [(row, column) for row, column, _ in outcome.errors] == [(3, "Hospital")]


def test_a_site_is_read_back_with_its_hospitals_so_its_own_rows_are_accepted(db):
    db.save_site(Site("northfield", "Northfield Trust", ("NTH",), "split", ("Northfield General Hospital",)), actor="t")
    site = db.site("northfield")
    assert site.hospitals == ("Northfield General Hospital",) and site.aliases == ("NTH",)
    assert db.sites() == [site]


def test_a_background_runner_runs_one_job_at_a_time():
    import threading
    from dataclasses import dataclass

    from nccid.portal.background import OneAtATimeRunner

    @dataclass
    class Job:
        name: str
        running: bool = True

    release = threading.Event()

    class Runner(OneAtATimeRunner[Job]):
        def _run(self) -> None:
            release.wait(60)
            self.job.running = False

    runner = Runner(Job("idle", running=False), "nccid-test-runner")
    assert runner.begin(Job("first"))
    assert not runner.begin(Job("second"))  # refused while the first runs
    assert runner.job.name == "first" and runner.job.running
    release.set()
    runner.wait()
    assert not runner.job.running
    assert runner.begin(Job("third"))  # free again once the first ended
    runner.wait()
    assert runner.job.name == "third" and not runner.job.running


def test_totp_failures_lock_the_account_and_a_right_password_does_not_clear_them(db):
    made = db.create_account("boss", "admin", actor="test", password=PASSWORD)
    for _ in range(2):
        assert db.verify_totp("boss", "000000", "10.0.0.1", account_limit=3) is False
    assert db.authenticate("boss", PASSWORD, "10.0.0.1", account_limit=3).user is not None
    assert db.verify_totp("boss", "000000", "10.0.0.1", account_limit=3) is False  # the third in a row
    right = pyotp.TOTP(made.totp_secret).now()
    assert db.verify_totp("boss", right, "10.0.0.1", account_limit=3) is None  # locked: not even checked
    assert "locked" in db.authenticate("boss", PASSWORD, "10.0.0.1", account_limit=3).reason


def _portal_client(tmp_path, **overrides):
    """A TestClient on a portal with one site (northfield, uploader north-a) and one admin (boss, with TOTP);
    returns (client, boss's TOTP secret)."""
    from fastapi.testclient import TestClient

    from nccid.portal import PortalSettings, create_app

    store = LocalStore(tmp_path / "store")
    state = tmp_path / "state"
    with PortalDB(state / "portal.sqlite") as portal_db:
        save_site(store, portal_db, uploader="northfield", name="Northfield", aliases=[], rule="split", actor="t")
        portal_db.create_account("north-a", "site", site="northfield", actor="t", password=PASSWORD)
        secret = portal_db.create_account("boss", "admin", actor="t", password=PASSWORD).totp_secret
    key_file = PseudonymKey.generate().save(tmp_path / "key")
    settings = PortalSettings(
        store_url=str(store.root), state_dir=state, key_file=key_file, failure_delay_s=0.01, **overrides
    )
    return TestClient(create_app(settings), raise_server_exceptions=False), secret


def test_the_totp_form_refuses_even_the_right_code_after_too_many_wrong_ones(tmp_path):
    client, secret = _portal_client(tmp_path, account_lock_after=3)
    with client:
        _login(client, "boss")
        csrf = _form_token(client, "/login/totp")
        for _ in range(3):
            assert client.post("/login/totp", data={"csrf": csrf, "code": "000000"}).status_code == 401
        answer = client.post("/login/totp", data={"csrf": csrf, "code": pyotp.TOTP(secret).now()})
        assert answer.status_code == 401 and "locked" in answer.text
        assert client.get("/admin").url.path == "/login"  # not logged in
        assert client.get("/login/totp").url.path == "/login"  # and the pending session is gone


def test_a_totp_key_that_does_not_open_the_secret_is_the_servers_fault_not_a_wrong_code(tmp_path):
    client, secret = _portal_client(tmp_path)
    key = tmp_path / "state" / "totp.key"
    key.write_bytes(bytes(32))  # another key (restored from the wrong backup)
    with client:
        _login(client, "boss")
        csrf = _form_token(client, "/login/totp")
        answer = client.post("/login/totp", data={"csrf": csrf, "code": pyotp.TOTP(secret).now()})
        assert answer.status_code == 503 and "cannot be checked on this server now" in answer.text
        assert "Traceback" not in answer.text and secret not in answer.text
    with PortalDB(tmp_path / "state" / "portal.sqlite") as db:
        [event] = [e for e in db.audit_log(20) if e["action"] == "login.totp"]
    assert event["outcome"] == "failed" and "cannot be opened with this portal's totp.key" in event["detail"]


def test_a_broken_multipart_upload_gets_a_400_with_one_line(tmp_path):
    client, _ = _portal_client(tmp_path)
    with client:
        _upload_form_token(client, "north-a")
        answer = client.post(
            "/site/upload/positive",
            content=b"--xyz\r\nthis is not a part header",
            headers={"content-type": "multipart/form-data; boundary=xyz"},
        )
    assert answer.status_code == 400 and "not valid multipart/form-data" in answer.text
    assert "Traceback" not in answer.text


def test_a_server_error_logs_the_route_template_not_the_secret_in_the_path(tmp_path, caplog):
    client, _ = _portal_client(tmp_path)

    def explode(token: str) -> None:
        raise RuntimeError("boom")

    client.app.add_api_route("/explode/{token}", explode)
    with client, caplog.at_level("ERROR", logger="nccid.portal"):
        answer = client.get("/explode/one-time-secret-123")
    assert answer.status_code == 500
    assert "/explode/{token}" in caplog.text and "one-time-secret-123" not in caplog.text
