"""The catalog's public face: a read-only query contract, one store per catalog, one load at a time."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from helpers import SPLIT_SITE, configure, listing, put_clinical, put_image

from nccid.errors import CatalogBusy, CatalogError
from nccid.stats.summary import compute, publish
from nccid.store import LocalStore
from nccid.synth.national import SynthSpec, generate
from nccid.warehouse.catalog import STORE_ID_KEY, Catalog, catalog_for, default_catalog_path
from nccid.warehouse.loader import load
from nccid.warehouse.rebuild import rebuild_catalog

S1, SE1 = "1.2.826.1", "1.2.826.1.1"


def small_upload(store) -> None:
    configure(store)
    put_clinical(store, "Covid1", centre=SPLIT_SITE)
    put_image(store, "Covid1", S1, SE1, "1.2.826.1.1.1")
    put_image(store, "Covid1", S1, SE1, "1.2.826.1.1.2")


def processed(store) -> dict:
    return {k: v for k, v in listing(store).items() if k.startswith(("training/", "validation/"))}


# -- the read-only query contract ------------------------------------------------------------------------
def test_sql_query_reads_the_documented_tables(local_store, catalog):
    small_upload(local_store)
    load(local_store, catalog, workers=1)
    assert catalog.sql_query("SELECT pseudonym, grp FROM patients") == [("Covid1", "training")]
    assert catalog.sql_query("SELECT COUNT(*) FROM instances WHERE patient = ?", ("Covid1",)) == [(2,)]
    assert catalog.sql_query("SELECT outcome, COUNT(*) FROM raw_objects GROUP BY outcome") == [("filed", 3)]
    with_cte = "WITH p AS (SELECT patient FROM instances) SELECT COUNT(DISTINCT patient) FROM p"
    assert catalog.sql_query(with_cte) == [(1,)]
    assert catalog.sql_query("SELECT COUNT(*) FROM runs") == [(1,)]


@pytest.mark.parametrize(
    "sql",
    [
        "DELETE FROM instances",
        "UPDATE patients SET grp = 'validation'",
        "INSERT INTO patients VALUES ('Covid9', 'training', 'x', 'y')",
        "DROP TABLE runs",
        "CREATE TABLE mine (a)",
        "ATTACH DATABASE ':memory:' AS other",
        "PRAGMA journal_mode=DELETE",
        "WITH x AS (SELECT 1) DELETE FROM raw_objects",
    ],
)
def test_sql_query_refuses_every_write_and_changes_nothing(local_store, catalog, sql):
    small_upload(local_store)
    load(local_store, catalog, workers=1)
    before = catalog.sizes()
    with pytest.raises(CatalogError, match="catalog queries are read-only"):
        catalog.sql_query(sql)
    assert catalog.sizes() == before
    assert catalog.sql_query("SELECT grp FROM patients") == [("training",)]
    catalog.commit()  # the catalog's own writes still work after a refused query
    assert catalog.outcome_counts() == {"filed": 3}


# -- a catalog belongs to one store ----------------------------------------------------------------------
def test_a_catalog_refuses_another_store(make_store, tmp_path):
    first, second = make_store("local", "first"), make_store("local", "second")
    small_upload(first)
    small_upload(second)
    cat = Catalog(tmp_path / "first.sqlite")
    load(first, cat, workers=1)
    load(second, Catalog(tmp_path / "second.sqlite"), workers=1)  # the second store has its own identity
    before = listing(second)
    with pytest.raises(CatalogError, match="belongs to another store") as caught:
        load(second, cat, workers=1)
    assert "\n" not in str(caught.value) and "rebuild-catalog" in str(caught.value)
    assert listing(second) == before
    cat.close()


def test_a_new_store_with_the_same_uploads_is_not_believed_to_be_loaded(store, make_store, tmp_path):
    """The S3 case of issue 14: a fresh, empty deployment under the same name must not report 'filed 0'."""
    small_upload(store)
    path = tmp_path / "catalog.sqlite"
    cat = Catalog(path)
    assert load(store, cat, workers=1).counts == {"filed": 3}
    cat.close()

    fresh = make_store("local" if store.url.startswith("file://") else "s3", "fresh")
    small_upload(fresh)
    cat = Catalog(path)
    with pytest.raises(CatalogError, match="identity this store does not hold"):
        load(fresh, cat, workers=1)
    cat.close()
    assert processed(fresh) == {}

    rebuild_catalog(fresh, path, workers=1)  # what the message says to do
    cat = Catalog(path)
    report = load(fresh, cat, workers=1)
    cat.close()
    assert report.counts == {"filed": 3}
    assert sorted(processed(fresh)) == sorted(processed(store))


def test_a_catalog_that_claims_objects_the_store_lost_is_refused(local_store, tmp_path):
    small_upload(local_store)
    cat = Catalog(tmp_path / "catalog.sqlite")
    load(local_store, cat, workers=1)
    report_key = cat.sql_query("SELECT report_key FROM runs")[0][0]
    local_store.delete(report_key)
    with pytest.raises(CatalogError, match="lists processed objects this store does not hold"):
        load(local_store, cat, workers=1)
    cat.close()


def test_an_empty_catalog_for_a_loaded_store_is_refused_and_zeros_are_never_published(local_store, tmp_path):
    small_upload(local_store)
    cat = catalog_for(local_store, writing=True)
    load(local_store, cat, workers=1)
    published = compute(local_store, cat, "2020-05-01").summary
    cat.close()
    assert published["all"]["xray_images"] == 2

    elsewhere = tmp_path / "elsewhere.sqlite"  # e.g. the demo's folder against the CLI's default
    with pytest.raises(CatalogError, match="holds processed data") as caught:
        catalog_for(local_store, elsewhere)
    assert "rebuild-catalog" in str(caught.value)
    assert not elsewhere.exists()  # a reader does not leave an empty catalog behind

    empty = Catalog(elsewhere)
    with pytest.raises(CatalogError, match="is empty, but the store already holds processed data"):
        compute(local_store, empty, "2020-05-02")
    with pytest.raises(CatalogError, match="is empty"):
        load(local_store, empty, workers=1)
    empty.close()
    assert not any(k.startswith("stats/") for k in listing(local_store))

    rebuild_catalog(local_store, elsewhere, workers=1)
    rebuilt = catalog_for(local_store, elsewhere)
    stats = compute(local_store, rebuilt, "2020-05-03")
    publish(local_store, stats)
    rebuilt.close()
    assert stats.summary == published


def test_the_store_leads_to_its_catalog(local_store):
    small_upload(local_store)
    cat = catalog_for(local_store, writing=True)
    assert cat.path == default_catalog_path(local_store.url)
    load(local_store, cat, workers=1)
    cat.close()
    assert STORE_ID_KEY in listing(local_store)
    again = catalog_for(local_store)  # no path: the same catalog, found from the store alone
    assert again.path == default_catalog_path(local_store.url)
    assert again.outcome_counts() == {"filed": 3}
    assert load(local_store, again, workers=1).counts == {}
    again.close()


def test_a_reader_on_an_empty_store_gets_an_empty_catalog(local_store, tmp_path):
    configure(local_store)
    cat = catalog_for(local_store, tmp_path / "c.sqlite")
    assert cat.is_empty() and cat.store_id is None  # a reader never writes the store's identity
    cat.close()
    assert STORE_ID_KEY not in listing(local_store)


# -- one load at a time ----------------------------------------------------------------------------------
SPEC = SynthSpec(seed=11, patients=120, imaged_fraction=0.9, scale=0.25, ct_slices=(10, 20), mr_slices=(3, 5))


def _cli_load(store, catalog_path, workers: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "nccid.cli", "warehouse", "load", "--store", store.url]
    cmd += ["--catalog", str(catalog_path), "--workers", str(workers)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _active_run(catalog_path) -> str:
    if not catalog_path.exists():
        return ""
    cat = Catalog(catalog_path)
    try:
        rows = cat.sql_query("SELECT value FROM catalog_meta WHERE name = 'active_run'")
    finally:
        cat.close()
    return rows[0][0] if rows else ""


def test_a_second_load_on_a_busy_catalog_is_refused_naming_the_first(make_store, tmp_path):
    clean = make_store("local", "clean")
    generate(clean, SPEC)
    clean_cat = Catalog(tmp_path / "clean.sqlite")
    load(clean, clean_cat, workers=1)
    expected_outcomes = clean_cat.outcome_counts()
    clean_cat.close()

    store = make_store("local")
    generate(store, SPEC)
    catalog_path = tmp_path / "catalog.sqlite"
    first = _cli_load(store, catalog_path, workers=1)
    try:
        deadline = time.monotonic() + 60
        while first.poll() is None and time.monotonic() < deadline and not _active_run(catalog_path):
            time.sleep(0.02)
        active = _active_run(catalog_path)
        assert active, "the first load finished before the second could start; make the data set larger"
        second = Catalog(catalog_path)
        with pytest.raises(CatalogBusy, match="is in use by load") as caught:
            load(store, second, workers=1)
        assert active.split()[0] in str(caught.value) and "\n" not in str(caught.value)
        _, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    assert first.returncode == 0, err
    # the first load's end state is an uninterrupted load's; the refused one wrote nothing (one report only)
    strip = (STORE_ID_KEY, "reports/load/")
    assert {k: v for k, v in listing(store).items() if not k.startswith(strip)} == {
        k: v for k, v in listing(clean).items() if not k.startswith(strip)
    }
    assert len(list(store.list("reports/load/"))) == 1
    assert second.outcome_counts() == expected_outcomes
    assert load(store, second, workers=1).counts == {}  # once the first is done, the second may run: nothing to do
    second.close()
    assert _active_run(catalog_path) == ""


# -- nothing outlives the loader -------------------------------------------------------------------------
def test_killing_the_loader_leaves_no_worker_alive(make_store, tmp_path):
    store = make_store("local")
    generate(store, SPEC)
    proc = _cli_load(store, tmp_path / "catalog.sqlite", workers=2)
    workers: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline and len(workers) < 2:
            workers = psutil.Process(proc.pid).children(recursive=True)
            time.sleep(0.02)
        assert len(workers) >= 2, "the load finished before its workers could be seen; make the data set larger"
        os.kill(proc.pid, signal.SIGKILL)  # the main process only, as `kill -9 <pid>` does
        proc.wait()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(_alive(w) for w in workers):
            time.sleep(0.05)
        assert [w.pid for w in workers if _alive(w)] == []
    finally:
        for worker in workers:
            if _alive(worker):
                worker.kill()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# -- one object that fails in an unforeseen way is quarantined, never stops the load ---------------------
class _OneObjectBreaks(LocalStore):
    """A store whose reader fails for one object in a way no rule foresaw (fault injection)."""

    broken = ""

    def open(self, key, size=None):
        handle = super().open(key, size)
        if key == self.broken:
            handle.read = _fails  # the header parser meets an error while reading this object
        return handle


def _fails(*args):
    raise RuntimeError("something no rule foresaw\non two lines")


def test_an_unforeseen_failure_on_one_image_quarantines_it_and_files_the_rest(tmp_path):
    store = _OneObjectBreaks(tmp_path / "store")
    small_upload(store)
    store.broken = put_image(store, "Covid1", S1, SE1, "1.2.826.1.1.3")
    cat = Catalog(tmp_path / "catalog.sqlite")
    report = load(store, cat, workers=1)
    cat.close()
    assert report.counts == {"filed": 3, "quarantined": 1}
    [item] = report.items
    assert item["key"] == store.broken
    assert "RuntimeError" in item["reason"] and "\n" not in item["reason"]


def test_a_failure_past_the_header_reader_is_still_that_objects_quarantine(tmp_path, monkeypatch):
    """Defence in depth: whatever escapes the hardened reader (here: from the metadata export) stays with its object."""
    import nccid.contracts.dicom as dicom

    store = LocalStore(tmp_path / "store")
    small_upload(store)
    broken = put_image(store, "Covid1", S1, SE1, "1.2.826.1.1.3")
    real = dicom.metadata_json

    def export(ds):
        if ds.SOPInstanceUID == "1.2.826.1.1.3":
            raise RecursionError("maximum recursion depth exceeded")
        return real(ds)

    monkeypatch.setattr(dicom, "metadata_json", export)  # what the loader's workers call
    cat = Catalog(tmp_path / "catalog.sqlite")
    report = load(store, cat, workers=1)
    cat.close()
    assert report.counts == {"filed": 3, "quarantined": 1}
    assert report.items[0]["reason"].startswith("could not be read: unexpected RecursionError in test_catalog.py:")
    assert report.items == [
        {
            "key": broken,
            "kind": "image",
            "outcome": "quarantined",
            "reason": report.items[0]["reason"],
            "dest": "",
        }
    ]


def test_status_lists_what_is_outstanding_with_its_reason(local_store, catalog):
    small_upload(local_store)
    put_image(local_store, "Covid77", "1.5", "1.5.1", "1.5.1.1")
    put_image(local_store, "Covid78", "1.6", "1.6.1", "1.6.1.1")
    load(local_store, catalog, workers=1)
    counts, items = catalog.status(limit=1)
    assert counts == {"filed": 3, "pending": 2}
    assert [(r.key, r.outcome, r.reason) for r in items] == [
        ("raw-site/2020-04-01/images/1.5.1.1.dcm", "pending", "no clinical record for Covid77 yet")
    ]


def test_rebuild_replaces_a_damaged_catalog(local_store, tmp_path):
    small_upload(local_store)
    path = tmp_path / "catalog.sqlite"
    cat = Catalog(path)
    load(local_store, cat, workers=1)
    cat.close()
    path.write_bytes(b"not a database at all" * 100)
    with pytest.raises(CatalogError, match="rebuild-catalog"):
        Catalog(path)
    rebuild_catalog(local_store, path, workers=1)
    rebuilt = catalog_for(local_store, path)
    assert rebuilt.outcome_counts() == {"filed": 3}
    rebuilt.close()


def test_the_stats_command_refuses_an_empty_catalog_in_one_line_and_writes_nothing(local_store, tmp_path):
    from helpers import run_cli

    small_upload(local_store)
    cat = catalog_for(local_store, writing=True)
    load(local_store, cat, workers=1)
    cat.close()
    done = run_cli("stats", "--store", local_store.root, "--catalog", tmp_path / "new.sqlite", check=False)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "rebuild-catalog" in lines[0] and "Traceback" not in done.stderr
    assert not any(k.startswith("stats/") for k in listing(local_store))
