"""The `nccid` command as users type it."""

from __future__ import annotations

import json
import re

from helpers import configure, put_clinical, put_image, run_cli


def nccid(*args, check=True, env=None):
    return run_cli(*args, check=check, env=env)


def test_demo_goes_from_identifiable_hospital_data_to_a_clean_warehouse(tmp_path):
    demo = tmp_path / "demo"
    out = nccid("demo", "--dir", demo, "--patients", 40, "--scale", 0.05).stdout
    # the site side: defects held back, burned-in annotation held, the node holding then releasing
    assert "sheet positive-sheet-1.xlsx: 9 record(s), 2 row(s) held back" in out
    assert "read '25/04/2020', wrote '2020-04-25'" in out  # month 25 cannot be: converted, not held (issue 10.3)
    assert "BurnedInAnnotation (0028,0301) is YES" in out
    assert "received 16 image(s) over 2 associations: 12 filed, 4 held for 3 patient(s)" in out
    assert "4 held image(s) released" in out
    assert out.count("checked against 10 patients' identifiers: no identifiers found") == 4
    # the warehouse side
    assert "second load: 0 objects with a new outcome" in out and "Total patients" in out
    store = demo / "store"
    assert (store / "stats" / "latest.json").exists() and list((store / "reports" / "load").glob("*.json"))
    assert {p.name for p in store.iterdir() if p.name.startswith("raw-")} == {
        "raw-northfield", "raw-riverside", "raw-kingsbridge", "raw-westcliff",
    }  # fmt: skip
    assert (store / "training" / "data").is_dir() and (store / "validation" / "data").is_dir()
    assert "checked against the identifiers of all 40 patients" in out and "zero identifiers found" in out
    # the portal: one account per site and two for the central team, and the command that serves it
    assert all(f"{site}-uploader" in out for site in ("northfield", "riverside", "kingsbridge", "westcliff"))
    assert out.count("TOTP secret") == 3 and f"nccid portal serve --store {store}" in out
    from nccid.portal.accounts import PortalDB

    with PortalDB(demo / "portal" / "portal.sqlite") as db:
        assert {u.username for u in db.users()} >= {"admin", "datamanager", "validator", "northfield-uploader"}

    # the demo's own "try:" commands find the demo's catalog through the store alone (no --catalog)
    assert f"nccid stats --store {store}" in out and f"nccid validate demo --store {store}" in out
    again_stats = nccid("stats", "--store", store).stdout
    total = re.compile(r"Total patients\s*│\s*\d+\s*│\s*\d+\s*│\s*([1-9]\d*)\s*│")
    assert total.search(again_stats) and total.search(again_stats)[1] == total.search(out)[1], again_stats
    status = nccid("warehouse", "status", "--store", store).stdout
    assert re.search(r"filed\s*│\s*[1-9]\d*\s*│", status), status

    # the verdict is real: plant one identifier in the warehouse and the same check, as a command, finds it
    person = next(iter((demo / "hospitals" / "kingsbridge" / "pas-extract.csv").read_text().splitlines()[1:]))
    nhs = person.split(",")[0]
    record = next((store / "training" / "data").rglob("*.json"))
    record.write_text(record.read_text().replace('"Pseudonym"', f'"Notes": "NHS {nhs}", "Pseudonym"', 1))
    args = ["--key-file", demo / "site.key", "--vault", demo / "vault.sqlite"]
    for site in ("northfield", "riverside", "kingsbridge", "westcliff"):
        args += ["--identifiers", demo / "hospitals" / site / "pas-extract.csv"]
    found = nccid("site", "check", "--store", store, *args, check=False)
    assert found.returncode == 1 and f"{record.relative_to(store).as_posix()}: a known NHS/CHI" in found.stderr
    assert nhs not in found.stderr + found.stdout

    # a second demo run starts fresh in its own folder, but refuses to delete someone else's
    nccid("demo", "--dir", demo, "--patients", 16, "--scale", 0.03)
    (tmp_path / "mine").mkdir()
    refused = nccid("demo", "--dir", tmp_path / "mine", check=False)
    assert refused.returncode != 0 and (tmp_path / "mine").exists()


def test_demo_runs_on_s3_and_refuses_a_store_with_data(make_store, tmp_path):
    store = make_store("s3")
    out = nccid("demo", "--dir", tmp_path / "demo", "--store", store.url, "--patients", 30, "--scale", 0.03).stdout
    assert "second load: 0 objects with a new outcome" in out and f"store:       {store.url}" in out
    assert "zero identifiers found" in out
    assert store.exists("stats/latest.json") and any(True for _ in store.list("training/data/"))
    again = nccid("demo", "--dir", tmp_path / "demo", "--store", store.url, check=False)
    assert again.returncode != 0 and "is not empty" in again.stderr + again.stdout


def test_load_ls_cat_centres_status_and_stats(store, tmp_path):
    configure(store)
    put_clinical(store, "Covid1")
    put_clinical(store, "Covid2", centre="Unlisted Trust")
    put_image(store, "Covid1", "1.2", "1.2.3", "1.2.3.4")
    cat = tmp_path / "cat.sqlite"
    dry = nccid("warehouse", "load", "--store", store.url, "--catalog", cat, "--dry-run", "--json")
    assert json.loads(dry.stdout)["counts"] == {"filed": 2, "held": 1}
    assert not list(store.list("training/"))
    out = nccid("warehouse", "load", "--store", store.url, "--catalog", cat).stdout
    assert "images filed: 1," in out and f"report: {store.url.rstrip('/')}/reports/load/" in out
    assert "not configured" in out
    centres = nccid("warehouse", "centres", "--store", store.url, "--catalog", cat).stdout
    assert "Unlisted Trust" in centres and "NOT CONFIGURED" in centres
    status = nccid("warehouse", "status", "--store", store.url, "--catalog", cat).stdout
    assert "raw-site/2020-04-01/data/Covid2_data.json" in status
    listing = nccid("ls", "training/", "--store", store.url).stdout
    assert "PRE training/data/" in listing and "PRE training/xray/" in listing
    rec = nccid("ls", "training/", "-r", "--store", store.url).stdout
    assert "training/xray/Covid1/1.2/1.2.3/1.2.3.4.dcm" in rec
    header = nccid("cat", "training/xray/Covid1/1.2/1.2.3/1.2.3.4.dcm", "--header", "--store", store.url).stdout
    assert "(0010,0020) Patient ID" in header and "Covid1" in header
    record = json.loads(nccid("cat", "training/data/Covid1/data_2020-04-01.json", "--store", store.url).stdout)
    assert record["Pseudonym"] == "Covid1"
    stats = nccid("stats", "--store", store.url, "--catalog", cat).stdout
    assert "Total patients" in stats and "stats/latest.json" in stats
    missing = nccid("cat", "training/nope.json", "--store", store.url, check=False)
    assert missing.returncode == 1 and "training/nope.json" in missing.stderr


def test_clear_errors_for_a_missing_store_or_config(tmp_path):
    import os

    env = {k: v for k, v in os.environ.items() if k != "NCCID_STORE"}
    no_store = nccid("warehouse", "load", check=False, env=env)
    assert no_store.returncode == 2 and "--store" in no_store.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    no_config = nccid("warehouse", "load", "--store", empty, "--catalog", tmp_path / "c.sqlite", check=False)
    assert no_config.returncode == 1 and "config.json" in no_config.stderr
    (empty / "config.json").write_text('{"raw_prefixes": ["raw-a/"], "training_percentage": 150}')
    bad = nccid("warehouse", "load", "--store", empty, "--catalog", tmp_path / "c.sqlite", check=False)
    assert bad.returncode == 1 and "training_percentage" in bad.stderr


def test_structured_log_has_counts_and_no_identifiers(store, tmp_path):
    import os

    configure(store)
    put_clinical(store, "Covid1")
    put_image(store, "Covid1", "1.2", "1.2.3", "1.2.3.4")
    put_image(store, "Covid77", "1.5", "1.5.1", "1.5.1.1")  # pending: its reason names the patient
    env = {**os.environ, "NCCID_LOG": "info"}
    proc = nccid("warehouse", "load", "--store", store.url, "--catalog", tmp_path / "c.sqlite", env=env)
    lines = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    (run,) = [line for line in lines if line["event"] == "warehouse.load"]
    assert run["counts"] == {"filed": 2, "pending": 1} and run["level"] == "info" and run["run_id"]
    assert "Covid" not in proc.stderr
