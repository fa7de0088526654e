"""How the shells (the CLI and the demo) show a load report and the statistics summary on a terminal.

Rendering only: every number comes from the library's report objects.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.markup import escape

from nccid.console import console, human_bytes, table

if TYPE_CHECKING:
    from nccid.warehouse.loader import LoadReport


def show_load_report(report: LoadReport, *, limit: int = 20) -> None:
    """Print a load's outcome counts, throughput, the reasons objects were not filed (`limit` rows at most),
    warnings, and where the full report is."""
    order = ["filed", "duplicate", "pending", "conflict", "quarantined", "held"]
    rows = [
        [o, report.counts.get(o, 0), report.outstanding.get(o, "") if o not in ("filed", "duplicate") else ""]
        for o in order
    ]
    rows.append(["unchanged (seen before)", report.unchanged, ""])
    title = f"Load {report.run_id} ({report.mode}) in {report.duration_s:.1f} s"
    console.print(table(title, ["outcome", "this run", "outstanding in total"], rows))
    rate = report.bytes_filed / report.duration_s if report.duration_s else 0
    console.print(f"images filed: {report.images_filed}, {human_bytes(report.bytes_filed)} ({human_bytes(rate)}/s)")
    if report.items:
        rows = [[outcome, count, reason, example] for outcome, reason, count, example in report.grouped_items()]
        console.print(
            table(
                f"Not filed this run ({len(report.items)} objects, by reason)",
                ["outcome", "objects", "reason", "first raw key"],
                rows[:limit],
            )
        )
        if len(rows) > limit:
            console.print(f"... and {len(rows) - limit} more reasons in the report")
    for warning in report.warnings[:limit]:
        console.print(f"[yellow]warning:[/] {escape(warning)}")
    if report.report_key:
        console.print(f"report: {report.store.rstrip('/')}/{report.report_key}")


def show_summary(summary: dict[str, dict]) -> None:
    """Print the headline statistics (centres, patients, studies, images) for training, validation and all."""
    labels = [
        ("centres", "Centres with data"),
        ("patients", "Total patients"),
        ("patients_with_images", "Patients with images"),
        ("positive", "COVID positive"),
        ("negative", "COVID negative"),
        ("xray_studies", "X-ray studies"),
        ("ct_studies", "CT studies"),
        ("mri_studies", "MRI studies"),
        ("xray_images", "X-ray images"),
        ("ct_images", "CT images"),
        ("mri_images", "MRI images"),
    ]
    rows = [[label, *(summary[s][k] for s in ("training", "validation", "all"))] for k, label in labels]
    console.print(table("Summary", ["", "training", "validation", "all"], rows))
