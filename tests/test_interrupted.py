"""Kill the loader (SIGKILL) at several moments, run it again: the store ends exactly as after one clean run."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import listing

from nccid.synth.national import SynthSpec, generate
from nccid.warehouse.catalog import Catalog
from nccid.warehouse.loader import load

SPEC = SynthSpec(seed=11, patients=120, imaged_fraction=0.9, scale=0.25, ct_slices=(10, 20), mr_slices=(3, 5))


def _without_reports(store) -> dict:
    return {k: v for k, v in listing(store).items() if not k.startswith("reports/")}


_EXPECTED: dict[str, tuple[dict, dict]] = {}


def _expected(make_store, backend: str, tmp_path) -> tuple[dict, dict]:
    """The store and outcomes after one uninterrupted load of the same raw uploads (once per backend)."""
    if backend not in _EXPECTED:
        clean = make_store(backend, "clean")
        generate(clean, SPEC)
        cat = Catalog(tmp_path / "clean.sqlite")
        report = load(clean, cat, workers=2)
        outcomes = dict(cat.outcome_counts())
        cat.close()
        assert report.images_filed > 100
        _EXPECTED[backend] = (_without_reports(clean), outcomes)
    return _EXPECTED[backend]


@pytest.mark.parametrize("kill_after_objects", [1, 40, 250])
@pytest.mark.parametrize("backend", ["local", "local-as-arrived", "s3"])
def test_killed_load_then_rerun_equals_an_uninterrupted_load(tmp_path, make_store, backend, kill_after_objects):
    kind = backend.split("-")[0]
    expected, expected_outcomes = _expected(make_store, kind, tmp_path)
    store = make_store(kind)
    generate(store, SPEC)
    if backend == "local-as-arrived":  # no cached checksums, as after `cp -r`: the workers hash the raw files
        _forget_cached_checksums(store.root)
    catalog_path = tmp_path / "catalog.sqlite"
    cmd = [
        sys.executable,
        "-m",
        "nccid.cli",
        "warehouse",
        "load",
        "--store",
        store.url,
        "--catalog",
        str(catalog_path),
        "--workers",
        "2",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    killed_mid_run = False
    while time.monotonic() < deadline and proc.poll() is None:
        filed = sum(1 for _ in store.list("training/")) + sum(1 for _ in store.list("validation/"))
        if filed >= kill_after_objects:
            os.killpg(proc.pid, signal.SIGKILL)  # the loader and its worker processes, mid-write
            killed_mid_run = True
            break
        time.sleep(0.005)
    proc.wait()
    assert killed_mid_run, "the load finished before it could be interrupted; make the data set larger"
    assert _without_reports(store) != expected  # it really was cut short

    catalog = Catalog(catalog_path)
    load(store, catalog, workers=2)
    assert _without_reports(store) == expected
    assert catalog.outcome_counts() == expected_outcomes
    again = load(store, catalog, workers=2)
    assert again.counts == {} and again.images_filed == 0 and again.images_examined == 0
    catalog.close()


def _forget_cached_checksums(root) -> None:
    for path in root.glob("raw-*/**/*"):
        with contextlib.suppress(OSError):
            os.removexattr(path, "user.nccid.md5")
