"""`nccid demo`: the whole pipeline end to end on synthetic hospitals."""

from __future__ import annotations

from pathlib import Path

import typer


def demo(
    directory: Path = typer.Option(Path("nccid-demo"), "--dir", help="Where the hospitals, store and catalog go."),
    patients: int = typer.Option(300, help="Synthetic patients, spread over four hospitals."),
    scale: float = typer.Option(
        0.5, min=0.01, max=2.0, help="Radiograph size (1.0: full detector size, about 10 MB each)."
    ),
    seed: int = typer.Option(0, help="Random seed."),
    store: str | None = typer.Option(
        None, "--store", "-s", envvar="NCCID_STORE", help="An empty store to use instead (e.g. s3://bucket/demo)."
    ),
) -> None:
    """End to end: identifiable hospital data through the site tools and node, upload, load, statistics, and
    the de-identification gate over everything in the warehouse."""
    from nccid.demo import run_demo

    run_demo(directory, patients=patients, scale=scale, seed=seed, store_url=store)
