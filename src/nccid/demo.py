"""`nccid demo`: synthesise a national dataset, load it, load it again (a no-op), publish the statistics."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from nccid.console import console, human_bytes, progress_bar
from nccid.stats.summary import compute, publish
from nccid.store import LocalStore, ObjectStore, open_store
from nccid.store.s3 import S3Store
from nccid.synth.national import SynthSpec, generate
from nccid.warehouse.catalog import Catalog
from nccid.warehouse.loader import load

MARKER = ".nccid-demo"


def _fresh(directory: Path) -> None:
    """Start clean, but only ever delete a folder an earlier demo made."""
    if directory.exists():
        if not (directory / MARKER).exists():
            raise SystemExit(f"{directory} exists and was not made by `nccid demo`; choose another --dir")
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    (directory / MARKER).write_text("made by nccid demo; deleted and remade by the next demo run\n")


def _empty_store(url: str) -> ObjectStore:
    """A store given by URL must be empty: the demo never mixes its data into a real warehouse."""
    store = open_store(url)
    if isinstance(store, S3Store):
        store.create_bucket()
    if next(iter(store.list()), None) is not None:
        raise SystemExit(
            f"{store.url} is not empty: give the demo an empty bucket or prefix, e.g. s3://nccid-demo/run-1"
        )
    return store


def run_demo(
    directory: Path, *, patients: int = 300, scale: float = 1.0, seed: int = 0, store_url: str | None = None
) -> None:
    from nccid.cli import show_load_report, show_summary

    directory = directory.resolve()
    _fresh(directory)
    store = _empty_store(store_url) if store_url else LocalStore(directory / "store")
    catalog = Catalog(directory / "catalog.sqlite")

    console.rule("1. synthetic hospitals upload pseudonymised records and images")
    start = time.perf_counter()
    with progress_bar("synthesising") as tick:
        made = generate(store, SynthSpec(seed=seed, patients=patients, scale=scale), progress=lambda n: tick(1, n))
    took = time.perf_counter() - start
    console.print(
        f"{made.patients} patients at {len(made.config.raw_prefixes)} uploaders over "
        f"{len(made.upload_dates)} upload dates: {made.clinical_records} clinical records, {made.images} "
        f"images {dict(made.by_modality)}, {human_bytes(made.bytes)} in {took:.1f} s "
        f"({human_bytes(made.bytes / took)}/s)"
    )

    console.rule("2. the warehouse loads them")
    with progress_bar("loading") as tick:
        first = load(store, catalog, progress=tick)
    show_load_report(first, limit=25)

    console.rule("3. loading again changes nothing")
    second = load(store, catalog)
    console.print(
        f"second load: {sum(second.counts.values())} objects with a new outcome, "
        f"{second.unchanged} unchanged, {second.duration_s:.2f} s"
    )

    console.rule("4. statistics")
    stats = compute(store, catalog)
    prefix = publish(store, stats)
    show_summary(stats.summary)
    catalog.close()

    console.rule("where everything is")
    where = str(store.root) if isinstance(store, LocalStore) else store.url
    base = where.rstrip("/") + "/"
    console.print(f"store:       {where}   (processed layout under training/ and validation/)")
    console.print(f"catalog:     {directory / 'catalog.sqlite'}")
    console.print(f"load report: {base}{first.report_key}")
    console.print(f"statistics:  {base}{prefix}")
    console.print("try:")
    console.print(f"  nccid ls training/ --store {where}")
    console.print(f"  nccid sync training/data/ ./clinical --store {where}")
    console.print(f"  nccid warehouse status --store {where} --catalog {directory / 'catalog.sqlite'}")
