"""Researcher access: ls / read / headers / clinical JSON through the API, and `sync`."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import configure, put_clinical, put_image

import nccid
from nccid.access.api import Folder
from nccid.access.sync import MANIFEST_NAME, PART_SUFFIX, sync
from nccid.store import StoreError
from nccid.warehouse.loader import load


def _files(folder) -> dict[str, str]:
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if rel != MANIFEST_NAME:
                with open(path, "rb") as handle:
                    out[rel] = hashlib.md5(handle.read()).hexdigest()
    return out


def _fill(store, n: int, size: int = 1000) -> None:
    for i in range(n):
        store.write(f"training/ct/Covid{i}/obj{i:03d}.bin", os.urandom(size))


def test_api_lists_reads_headers_and_clinical_json(store, catalog):
    configure(store)
    put_clinical(store, "Covid1", Age=71)
    put_image(store, "Covid1", "1.2.3", "1.2.3.4", "1.2.3.4.5")
    load(store, catalog, workers=1)
    wh = nccid.open_warehouse(store.url)
    top = list(wh.ls("training/"))
    assert [e.key for e in top if isinstance(e, Folder)] == [
        "training/data/",
        "training/xray-metadata/",
        "training/xray/",
    ]
    keys = [o.key for o in wh.ls("training/", recursive=True)]
    assert "training/xray/Covid1/1.2.3/1.2.3.4/1.2.3.4.5.dcm" in keys
    header = wh.dicom_header("training/xray/Covid1/1.2.3/1.2.3.4/1.2.3.4.5.dcm")
    assert header.PatientID == "Covid1" and "PixelData" not in header
    assert wh.clinical("training/data/Covid1/data_2020-04-01.json")["Age"] == 71
    meta = wh.metadata("training/xray-metadata/Covid1/1.2.3/1.2.3.4/1.2.3.4.5.json")
    assert meta.SOPInstanceUID == "1.2.3.4.5"


def test_sync_fetches_verifies_and_writes_a_manifest(store, tmp_path):
    _fill(store, 12)
    store.write("training/xray/other.bin", b"not in the prefix")
    dest = tmp_path / "ct"
    result = sync(store, "training/ct/", dest)
    assert (result.fetched, result.skipped) == (12, 0)
    expected = {i.key[len("training/ct/") :]: i.checksum for i in store.list("training/ct/")}
    assert _files(dest) == expected
    entries = [json.loads(line) for line in (dest / MANIFEST_NAME).read_text().splitlines()]
    assert {e["path"] for e in entries} == set(expected)
    assert all(e["checksum"] == expected[e["path"]] and e["size"] == 1000 for e in entries)
    assert {e["key"] for e in entries} == {i.key for i in store.list("training/ct/")}


def test_sync_skips_unchanged_files_and_refetches_changed_ones(store, tmp_path):
    _fill(store, 5)
    dest = tmp_path / "ct"
    sync(store, "training/ct/", dest)
    again = sync(store, "training/ct/", dest)
    assert (again.fetched, again.skipped) == (0, 5)
    victim = dest / "Covid2" / "obj002.bin"
    victim.write_bytes(b"x" * 1000)  # same size, different content: a checksum catches it
    store.write("training/ct/Covid4/obj004.bin", b"new version")
    third = sync(store, "training/ct/", dest)
    assert (third.fetched, third.skipped) == (2, 3)
    assert _files(dest) == {i.key[len("training/ct/") :]: i.checksum for i in store.list("training/ct/")}


class FailingStore:
    """Wraps a store; the connection breaks after a number of downloads, half-way through a file."""

    def __init__(self, inner, fail_after: int) -> None:
        self.inner, self.left = inner, fail_after

    def list(self, prefix):
        return self.inner.list(prefix)

    def download(self, key, dest, size=None):
        self.left -= 1
        if self.left < 0:
            dest.write(self.inner.read(key)[:100])
            raise StoreError(f"{key}: connection reset")
        self.inner.download(key, dest, size)


def test_sync_survives_an_interruption_and_resumes(store, tmp_path):
    _fill(store, 20)
    dest = tmp_path / "ct"
    with pytest.raises(StoreError, match="connection reset"):
        sync(FailingStore(store, fail_after=7), "training/ct/", dest, workers=1)
    partial = _files(dest)
    assert 0 < len(partial) < 20
    expected = {i.key[len("training/ct/") :]: i.checksum for i in store.list("training/ct/")}
    assert all(expected[p] == c for p, c in partial.items())  # nothing half-written under a real name
    result = sync(store, "training/ct/", dest, workers=1)
    assert result.fetched == 20 - len(partial) and result.skipped == len(partial)
    assert _files(dest) == expected


def test_sync_killed_mid_run_resumes_without_partial_files(store, tmp_path):
    _fill(store, 400, size=250_000)
    dest = tmp_path / "ct"
    cmd = [sys.executable, "-m", "nccid.cli", "sync", "training/ct/", str(dest), "--store", store.url, "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if dest.exists() and sum(not p.endswith(PART_SUFFIX) for p in _files(dest)) >= 10:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "sync finished before it could be interrupted"
    expected = {i.key[len("training/ct/") :]: i.checksum for i in store.list("training/ct/")}
    result = sync(store, "training/ct/", dest)
    assert result.skipped >= 10 and result.fetched + result.skipped == 400
    assert _files(dest) == expected
    assert not [n for _, _, names in os.walk(dest) for n in names if n.endswith(PART_SUFFIX)]
