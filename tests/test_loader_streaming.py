"""Raw data as a site's upload arrives (no cached checksums): the listing reads no bytes, the workers hash each
raw file once, and the catalog, duplicates, conflicts and the no-op re-run are exactly as with cached checksums."""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

import pytest
from helpers import configure, listing, put_clinical, put_image

from nccid.store import LocalStore, ObjectNotFound
from nccid.warehouse.catalog import Catalog
from nccid.warehouse.loader import load

S1, SE1, I1 = "1.2.826.1", "1.2.826.1.1", "1.2.826.1.1.1"
CHECKSUM_XATTR = "user.nccid.md5"


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


def as_arrived(store: LocalStore, *keys: str) -> list[Path]:
    """Forget the cached checksum of these raw files (default: all), as for files copied in by `cp` or rsync."""
    files = [store.root / k for k in keys] or [p for p in store.root.glob("raw-*/**/*") if p.is_file()]
    for path in files:
        with contextlib.suppress(OSError):  # none cached already
            os.removexattr(path, CHECKSUM_XATTR)
        with pytest.raises(OSError):
            os.getxattr(path, CHECKSUM_XATTR)
    return files


def test_a_listing_without_hashing_reads_no_bytes_of_a_file_it_has_no_checksum_for(local_store):
    path = local_store.root / "raw-site" / "a.bin"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"first bytes")  # written by something else than the store: no cached checksum

    assert [(i.key, i.size, i.checksum) for i in local_store.list_unhashed()] == [("raw-site/a.bin", 11, "")]
    assert local_store.checksum("raw-site/a.bin") == md5(path)
    # computed once, cached: now the listing knows it without reading
    assert [i.checksum for i in local_store.list_unhashed()] == [md5(path)]

    path.write_bytes(b"other bytes, longer")  # changed behind the store's back: the cache no longer counts
    assert [i.checksum for i in local_store.list_unhashed()] == [""]
    assert [i.checksum for i in local_store.list()] == [md5(path)]  # the hashing listing still hashes
    with pytest.raises(ObjectNotFound):
        local_store.checksum("raw-site/missing.bin")


@pytest.mark.parametrize("workers", [1, 2])
def test_raw_data_as_it_arrives_gets_its_true_checksums_duplicates_and_conflicts(local_store, catalog, workers):
    store = local_store
    configure(store)
    put_clinical(store, "Covid1")
    first = put_image(store, "Covid1", S1, SE1, I1, date="2020-04-01")
    quarantined = "raw-site/2020-04-01/images/notes.dcm"
    store.write(quarantined, b"not DICOM at all")
    as_arrived(store)

    report = load(store, catalog, workers=workers)
    assert report.counts == {"filed": 2, "quarantined": 1}
    raw = {str(p.relative_to(store.root)): md5(p) for p in store.root.glob("raw-site/**/*") if p.is_file()}
    rows = catalog.raw_rows(list(raw))
    assert {key: row.checksum for key, row in rows.items()} == raw  # each raw object's real MD5, bad ones too
    filed = f"training/xray/Covid1/{S1}/{SE1}/{I1}.dcm"
    assert (store.root / filed).read_bytes() == (store.root / first).read_bytes()
    assert listing(store)[filed] == (rows[first].size, raw[first])

    again = put_image(store, "Covid1", S1, SE1, I1, date="2020-04-08", name="again.dcm")
    changed = put_image(store, "Covid1", S1, SE1, I1, date="2020-04-08", name="changed.dcm", seed=99)
    as_arrived(store, again, changed)
    report = load(store, catalog, workers=workers)
    assert {i["key"]: i["outcome"] for i in report.items} == {again: "duplicate", changed: "conflict"}
    assert report.images_examined == 2  # only the new files: the first run cached what it hashed

    # the no-op re-run examines (and so hashes) nothing
    rerun = load(store, catalog, workers=workers)
    assert rerun.counts == {} and rerun.images_examined == 0 and rerun.unchanged == 5


def test_a_raw_file_changed_in_place_is_hashed_again_and_held_as_a_conflict(local_store, catalog):
    store = local_store
    configure(store)
    put_clinical(store, "Covid1")
    first = put_image(store, "Covid1", S1, SE1, I1)
    as_arrived(store)
    load(store, catalog, workers=1)
    path = store.root / first
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes, a later mtime
    path.write_bytes(bytes(data))
    stamp = path.stat()
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 2_000_000_000))

    report = load(store, catalog, workers=1)
    assert {i["key"]: i["outcome"] for i in report.items} == {first: "conflict"}
    assert catalog.raw_rows([first])[first].checksum == md5(path)


def test_without_any_cached_checksum_a_rerun_hashes_again_but_changes_nothing(local_store, tmp_path):
    store = local_store
    configure(store)
    put_clinical(store, "Covid1")
    put_image(store, "Covid1", S1, SE1, I1)
    put_image(store, "Covid77", "1.2.826.2", "1.2.826.2.1", "1.2.826.2.1.1")  # pending: no clinical record
    catalog = Catalog(tmp_path / "c.sqlite")
    try:
        load(store, catalog, workers=1)
        before = {k: v for k, v in listing(store).items() if not k.startswith("reports/")}
        as_arrived(store)  # as on a filesystem without extended attributes

        rerun = load(store, catalog, workers=1)
        assert rerun.counts == {} and rerun.images_filed == 0 and rerun.unchanged == 3
        assert rerun.images_examined == 2  # hashed again, found to be what the catalog recorded
        after = {k: v for k, v in listing(store).items() if not k.startswith("reports/")}
        assert after == before
    finally:
        catalog.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_in_one_run_the_first_raw_file_of_a_uid_in_listing_order_is_filed_whatever_the_timing(
    local_store, catalog, workers
):
    """Images stream through the workers in small chunks, so the first file of a SOP Instance UID may still be
    being filed when a later chunk brings the same UID: the later one is still a duplicate (same bytes) or a
    conflict (other bytes), decided against the first, and the run report lists outcomes in listing order."""
    store = local_store
    configure(store)
    put_clinical(store, "Covid1")
    sops = [f"{I1}{n}" for n in range(10, 22)]  # a dozen images: several chunks in flight at once
    keys = [put_image(store, "Covid1", S1, SE1, sop, date="2020-04-01") for sop in sops]
    twin = put_image(store, "Covid1", S1, SE1, sops[0], date="2020-04-01", name="x-twin.dcm")
    rival = put_image(store, "Covid1", S1, SE1, sops[0], date="2020-04-01", name="y-rival.dcm", seed=5)
    as_arrived(store)

    report = load(store, catalog, workers=workers)

    assert report.counts == {"filed": 13, "duplicate": 1, "conflict": 1}  # 12 images and the clinical record
    assert [(i["key"], i["outcome"]) for i in report.items] == [(twin, "duplicate"), (rival, "conflict")]
    filed = store.root / f"training/xray/Covid1/{S1}/{SE1}/{sops[0]}.dcm"
    assert filed.read_bytes() == (store.root / keys[0]).read_bytes()
    assert keys[0] in report.items[0]["reason"]


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_a_raw_image_replaced_after_it_was_examined_is_not_filed_with_its_old_metadata(make_store, tmp_path, backend):
    """The site re-sends a raw key with other bytes while a load is between reading its header and copying it:
    the store's answer to the copy carries the checksum of what it copied, the loader takes the copy and its
    metadata back and records nothing, and the next load files the new bytes with their own metadata."""
    from nccid.contracts.layout import metadata_key
    from nccid.warehouse.catalog import Catalog
    from nccid.warehouse.loader import ImagePlan, file_image

    store = make_store(backend)
    configure(store)
    put_clinical(store, "Covid1")
    key = put_image(store, "Covid1", S1, SE1, I1)
    examined = store.stat(key)
    dest = f"training/xray/Covid1/{S1}/{SE1}/{I1}.dcm"
    plan = ImagePlan(key, examined.checksum, dest, metadata_key(dest), b'{"examined": true}\n')
    put_image(store, "Covid1", S1, SE1, I1, seed=42)  # replaced under the same key, same identity, other bytes

    assert file_image(store, plan, write=True) == "changed"
    assert store.stat(dest) is None and store.stat(plan.meta_key) is None

    catalog = Catalog(tmp_path / "catalog.sqlite")
    report = load(store, catalog, workers=1)
    assert report.images_filed == 1
    assert store.read(dest) == store.read(key)  # the bytes as they are now
    assert b"examined" not in store.read(plan.meta_key)
    catalog.close()


def test_a_duplicate_of_an_image_that_ends_up_not_filed_is_decided_again_not_lost(local_store, tmp_path, monkeypatch):
    """Two raw files with the same SOP Instance UID and bytes in one run: the second is decided a duplicate of the
    first while the first is still being filed. If the first is then not filed (here its raw file is replaced by
    something else between its examination and its copy), the duplicate must not stand: it is not recorded, and
    the next load files it."""
    import nccid.warehouse.loader as loader_module
    from nccid.warehouse.catalog import Catalog

    store = local_store
    configure(store)
    put_clinical(store, "Covid1")
    first = put_image(store, "Covid1", S1, SE1, I1, name="a.dcm")
    twin = put_image(store, "Covid1", S1, SE1, I1, name="b-twin.dcm")
    real_file_image = loader_module.file_image

    def replaced_while_filing(st, plan, write):  # the site overwrites a.dcm at the worst moment
        if plan.key == first:
            st.write(first, b"not DICOM any more")
        return real_file_image(st, plan, write)

    monkeypatch.setattr(loader_module, "file_image", replaced_while_filing)
    catalog = Catalog(tmp_path / "catalog.sqlite")
    report = load(store, catalog, workers=1)
    assert report.images_filed == 0 and "duplicate" not in report.counts
    assert catalog.raw_rows([first, twin]) == {}  # neither is recorded: both are looked at again
    assert any(twin in w and "not filed in the end" in w for w in report.warnings)

    monkeypatch.setattr(loader_module, "file_image", real_file_image)
    again = load(store, catalog, workers=1)
    assert {i["key"]: i["outcome"] for i in again.items} == {first: "quarantined"}
    filed = store.root / f"training/xray/Covid1/{S1}/{SE1}/{I1}.dcm"
    assert filed.read_bytes() == (store.root / twin).read_bytes()
    catalog.close()
