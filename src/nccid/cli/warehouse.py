"""`nccid synth`, `nccid warehouse ...` and `nccid stats`: the central data team's commands."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer
from rich.markup import escape

from nccid.cli._common import CatalogOption, StoreOption, open_catalog, open_store_option
from nccid.console import console, human_bytes, progress_bar, table
from nccid.render import show_load_report, show_summary
from nccid.warehouse.catalog import Catalog, default_catalog_path
from nccid.warehouse.config import centre_rows, load_config

app = typer.Typer(
    help="Central data team: load raw uploads, rebuild the catalog, inspect centres and outstanding objects.",
    no_args_is_help=True,
)


# -- synthetic data -------------------------------------------------------------------------------------
def synth(
    store: str = StoreOption,
    patients: int = typer.Option(300, min=1, help="Number of patients."),
    hospitals: int = typer.Option(5, min=1, max=7, help="Number of configured hospitals (1-7)."),
    days: int = typer.Option(4, min=1, help="Number of weekly upload dates."),
    scale: float = typer.Option(
        1.0, min=0.01, max=2.0, help="Image size multiplier: 1.0 realistic (~2000x2500 radiographs)."
    ),
    imaged: float = typer.Option(0.3, help="Share of patients with images."),
    seed: int = typer.Option(0, help="Random seed: the same seed gives the same bytes."),
    awkward: bool = typer.Option(True, help="Include the awkward cases (duplicates, truncated files, ...)."),
    signal: float = typer.Option(
        1.0, help="Strength of the sign of disease planted in positive patients' radiographs (0: none)."
    ),
    manifest: Path | None = typer.Option(None, help="Write what was made (and where) as JSON."),
) -> None:
    """Write a synthetic national dataset (config.json + raw uploads) into a store."""
    from nccid.synth.national import SynthSpec, generate

    target = open_store_option(store, create=True)
    spec = SynthSpec(
        seed=seed,
        patients=patients,
        hospitals=hospitals,
        days=days,
        scale=scale,
        imaged_fraction=imaged,
        awkward=awkward,
        signal=signal,
    )
    with progress_bar("synthesising") as tick:
        result = generate(target, spec, progress=lambda n: tick(1, n))
    console.print(
        f"wrote {result.patients} patients, {result.clinical_records} clinical records and "
        f"{result.images} images ({human_bytes(result.bytes)}) to {target.url}"
    )
    if manifest:
        manifest.write_text(json.dumps(result.to_json(), indent=1) + "\n")
        console.print(f"manifest: {manifest}")


# -- warehouse ------------------------------------------------------------------------------------------
@app.command("load")
def warehouse_load(
    store: str = StoreOption,
    catalog: Path | None = CatalogOption,
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would happen; write nothing."),
    workers: int = typer.Option(os.cpu_count() or 1, min=1, help="Worker processes for reading headers and copying."),
    as_json: bool = typer.Option(False, "--json", help="Print the run report as JSON."),
) -> None:
    """File new raw uploads into the processed layout (incremental, idempotent, safe to interrupt)."""
    from nccid.warehouse.loader import load

    target = open_store_option(store)
    cat = open_catalog(target, catalog, writing=not dry_run)
    try:
        with progress_bar("loading") as tick:
            report = load(target, cat, dry_run=dry_run, workers=workers, progress=tick)
    finally:
        cat.close()
    if as_json:
        print(json.dumps(report.to_json(), indent=1))
    else:
        show_load_report(report)


@app.command("rebuild-catalog")
def warehouse_rebuild(
    store: str = StoreOption,
    catalog: Path | None = CatalogOption,
    workers: int = typer.Option(os.cpu_count() or 1, min=1, help="Worker processes."),
) -> None:
    """Recreate the catalog from the store alone (the store is the truth)."""
    from nccid.warehouse.rebuild import rebuild_catalog

    target = open_store_option(store)
    path = catalog or default_catalog_path(target.url)
    with progress_bar("rebuilding") as tick:
        report = rebuild_catalog(target, path, workers=workers, progress=tick)
    cat = Catalog(path)
    sizes, counts = cat.sizes(), cat.outcome_counts()
    cat.close()
    console.print(
        f"rebuilt {path}: {sizes['patients']} patients, {sizes['instances']} images, raw objects by outcome: {counts}"
    )
    for warning in report.warnings[:20]:
        console.print(f"[yellow]warning:[/] {escape(warning)}")


@app.command("centres")
def warehouse_centres(store: str = StoreOption, catalog: Path | None = CatalogOption) -> None:
    """Submitting centres seen in clinical records, and which are not configured in config.json."""
    target = open_store_option(store)
    config = load_config(target)
    cat = open_catalog(target, catalog)
    rows = centre_rows(config, cat.centres())
    cat.close()
    console.print(
        table(
            "Submitting centres",
            ["SubmittingCentre", "rule", "records seen", "filed"],
            [[r.centre, r.rule or "NOT CONFIGURED", r.records, r.filed] for r in rows],
        )
    )
    missing = [r.centre for r in rows if not r.rule]
    if missing:
        console.print(f"{len(missing)} centre(s) not configured: add them to config.json 'sites' and load again")


@app.command("status")
def warehouse_status(
    store: str = StoreOption,
    catalog: Path | None = CatalogOption,
    limit: int = typer.Option(50, help="How many outstanding items to list."),
) -> None:
    """Everything not filed: pending, held, conflicting and quarantined objects with their reasons."""
    target = open_store_option(store)
    cat = open_catalog(target, catalog)
    counts, outstanding = cat.status(limit)
    cat.close()
    items = [[r.key, r.outcome, r.reason] for r in outstanding]
    console.print(table("Raw objects by outcome", ["outcome", "objects"], sorted(counts.items())))
    if items:
        console.print(table("Outstanding", ["raw key", "outcome", "reason"], items))


# -- statistics -----------------------------------------------------------------------------------------
def stats_(
    store: str = StoreOption,
    catalog: Path | None = CatalogOption,
    date: str | None = typer.Option(None, help="Folder date (default: today)."),
) -> None:
    """Compute the patient, study, storage and summary tables; write them into stats/<date>/ of the store."""
    from nccid.stats.summary import compute, publish

    target = open_store_option(store)
    cat = open_catalog(target, catalog)
    try:
        stats = compute(target, cat, date)
        prefix = publish(target, stats)
    finally:
        cat.close()
    show_summary(stats.summary)
    console.print(
        f"tables: {target.url.rstrip('/')}/{prefix} (patients, xray, ct, mri, storage, summary; "
        f"CSV and JSON); latest: stats/latest.json"
    )
