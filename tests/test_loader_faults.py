"""Faults under the loader: a full disk while filing or at the catalog, the S3 server gone mid-load.

Each ends in a one-line error naming the cause and what to do, leaves no 0-byte catalog or temporary file
behind, and a re-run once the cause is fixed ends exactly as an uninterrupted load does (listing, checksums,
catalog counts).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
from helpers import free_port, listing

from nccid.errors import CatalogError, StoreError
from nccid.store import LocalStore
from nccid.synth.national import SynthSpec, generate
from nccid.warehouse.catalog import STORE_ID_KEY, Catalog
from nccid.warehouse.loader import load

SPEC = SynthSpec(seed=5, patients=30, imaged_fraction=0.9, scale=0.05, ct_slices=(4, 8), mr_slices=(2, 3))
SKIP = (STORE_ID_KEY, "reports/load/")


def _state(store) -> dict:
    """Everything a user sees in the store except what is per run or per store (reports, the identity)."""
    return {k: v for k, v in listing(store).items() if not k.startswith(SKIP)}


@pytest.fixture
def small_disk(tmp_path):
    """A real, small filesystem (tmpfs) that fills up; needs the right to mount, as root in CI containers."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here: {made.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def _fill(folder, leave: int):
    """Fill the filesystem of `folder` until `leave` bytes are free; returns the filler's path."""
    filler = folder / "filler"
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    with open(filler, "wb") as out:
        out.truncate(0)
        remaining = max(0, free - leave)
        while remaining > 0:
            chunk = min(remaining, 1 << 20)
            out.write(b"\0" * chunk)
            remaining -= chunk
    return filler


def _uninterrupted(tmp_path) -> tuple[dict, dict]:
    clean = LocalStore(tmp_path / "clean")
    generate(clean, SPEC)
    cat = Catalog(tmp_path / "clean.sqlite")
    load(clean, cat, workers=1)
    counts = cat.outcome_counts()
    cat.close()
    return _state(clean), counts


def _no_temp_files(store: LocalStore) -> list[str]:
    return [str(p) for p in store.root.rglob("*.part")]


def test_disk_full_while_filing_then_rerun_equals_an_uninterrupted_load(tmp_path, small_disk):
    expected, expected_counts = _uninterrupted(tmp_path)
    store = LocalStore(small_disk / "store")
    generate(store, SPEC)
    raw_bytes = sum(v[0] for v in listing(store).values())
    filler = _fill(small_disk, leave=raw_bytes // 3)  # room for some of the processed copies, not all
    catalog_path = tmp_path / "catalog.sqlite"  # the catalog on another disk: only filing fails
    cat = Catalog(catalog_path)
    with pytest.raises(StoreError) as caught:
        load(store, cat, workers=2)
    cat.close()
    message = str(caught.value)
    assert "the disk is full" in message and "run the same" in message and "\n" not in message
    assert _no_temp_files(store) == []

    filler.unlink()
    cat = Catalog(catalog_path)
    load(store, cat, workers=2)
    assert _state(store) == expected
    assert cat.outcome_counts() == expected_counts
    assert load(store, cat, workers=2).counts == {}
    cat.close()
    assert _no_temp_files(store) == []


def test_disk_full_at_the_catalog_leaves_no_empty_catalog_and_the_rerun_completes(tmp_path, small_disk):
    expected, expected_counts = _uninterrupted(tmp_path)
    store = LocalStore(tmp_path / "store")
    generate(store, SPEC)
    filler = _fill(small_disk, leave=0)
    catalog_path = small_disk / "catalog.sqlite"
    with pytest.raises(CatalogError, match="the disk is full") as caught:
        Catalog(catalog_path)
    assert "\n" not in str(caught.value)
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]  # no 0-byte catalog, no -wal, no -shm

    filler.unlink()
    cat = Catalog(catalog_path)  # the catalog starts with room, then the disk fills during the load
    _fill(small_disk, leave=0)
    with pytest.raises(CatalogError, match="the disk is full") as caught:
        load(store, cat, workers=1)
    assert "\n" not in str(caught.value)
    with contextlib.suppress(CatalogError):
        cat.close()

    (small_disk / "filler").unlink()
    cat = Catalog(catalog_path)
    load(store, cat, workers=1)
    assert _state(store) == expected
    assert cat.outcome_counts() == expected_counts
    cat.close()


# -- the S3 server gone mid-load -------------------------------------------------------------------------
def test_s3_server_gone_mid_load_then_rerun_equals_an_uninterrupted_load(tmp_path, seaweed, monkeypatch):
    from nccid.s3server.seaweedfs import SeaweedFS
    from nccid.store.s3 import S3Store

    server = SeaweedFS(tmp_path / "own-server", s3_port=free_port())  # its own server: this one is killed
    state = server.start()
    try:
        for name, value in server.admin_env().items():
            monkeypatch.setenv(name, value)  # restored after the test, whatever happens
        env = dict(os.environ)
        clean = S3Store("outage", prefix=f"clean-{uuid.uuid4().hex[:8]}", endpoint_url=state.endpoint)
        victim = S3Store("outage", prefix=f"victim-{uuid.uuid4().hex[:8]}", endpoint_url=state.endpoint)
        clean.create_bucket()
        generate(clean, SPEC)
        generate(victim, SPEC)
        clean_cat = Catalog(tmp_path / "clean.sqlite")
        load(clean, clean_cat, workers=2)
        expected, expected_counts = _state(clean), clean_cat.outcome_counts()
        clean_cat.close()

        catalog_path = tmp_path / "victim.sqlite"
        cmd = [sys.executable, "-m", "nccid.cli", "warehouse", "load", "--store", victim.url]
        cmd += ["--catalog", str(catalog_path), "--workers", "2"]
        proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if any(True for _ in victim.list("training/")):  # filing has begun: most of the load is ahead
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the load finished before the server could be stopped"
        os.killpg(server.state().weed_pid, signal.SIGKILL)  # the server dies, as kill -9 of weed does
        try:
            _, err = proc.communicate(timeout=180)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        assert proc.returncode != 0
        assert "Traceback" not in err
        [message] = [line for line in err.splitlines() if "run the same load again" in line]
        assert "connect" in message.lower() or "stopped answering" in message, message

        server.stop()
        server.start()
        cat = Catalog(catalog_path)
        load(victim, cat, workers=2)
        assert _state(victim) == expected
        assert cat.outcome_counts() == expected_counts
        cat.close()
    finally:
        server.stop()
