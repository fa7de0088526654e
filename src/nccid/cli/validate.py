"""`nccid validate ...`: independent validation of AI models on the held-out set (a shell over
nccid.validation: each command parses its options, calls one library function and prints what it did)."""

from __future__ import annotations

from pathlib import Path

import typer

from nccid.cli._common import StoreOption, default_actor, open_store_option
from nccid.console import console

app = typer.Typer(
    help="Validate AI models on the held-out set: submissions, sandboxed dry and sealed runs, reports, audit.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)

WorkspaceOption = typer.Option(
    Path("nccid-validation"),
    "--workspace",
    "-w",
    envvar="NCCID_VALIDATION",
    help="The validator's workspace: submissions, runs, reports and the audit log ($NCCID_VALIDATION).",
)
WhoOption = typer.Option(None, "--as", help="Who does this, for the audit log (default: $USER).")
MemoryOption = typer.Option(2048, "--memory-mb", help="Memory (address space) limit of the model, in MB.")
ProcessesOption = typer.Option(64, "--processes", help="Limit on the model's processes and threads.")
WallOption = typer.Option(600.0, "--wall-seconds", help="Wall-clock limit of the model's run, in seconds.")


def _limits(memory_mb: int, processes: int, wall_seconds: float):
    from nccid.errors import UsageError
    from nccid.validation.sandbox import Limits

    if memory_mb < 64 or processes < 1 or wall_seconds <= 0:
        raise UsageError(
            f"limits --memory-mb {memory_mb}, --processes {processes}, --wall-seconds {wall_seconds}: "
            "need at least 64 MB, 1 process and a positive time"
        )
    return Limits(memory_mb=memory_mb, processes=processes, wall_seconds=wall_seconds)


def _show_run(summary) -> None:
    results = summary.results
    predictions = results["predictions"]
    console.print(
        f"{summary.kind.replace('_', ' ')} {summary.run} of {summary.submission}: model {summary.sandbox.describe()}"
    )
    console.print(
        f"  {results['cohort']['cases']} cases ({results['cohort']['positives']} positive); "
        f"{predictions['valid']} valid predictions, {predictions['missing']} missing"
        + "".join(f", {count} {reason}" for reason, count in predictions["problems"].items())
    )
    if results.get("status") == "metrics computed":
        auc, point = results["overall"]["auc"], results["operating_point"]
        console.print(
            f"  AUC {auc['value']:.3f} (95% CI {auc['low']:.3f}-{auc['high']:.3f}); at threshold {point['threshold']}: "
            f"sensitivity {point['sensitivity']['value']:.3f}, specificity {point['specificity']['value']:.3f}"
        )
    else:
        console.print(f"  {results['status']}")
    frozen = summary.frozen
    if frozen and frozen.reused:
        console.print(f"  cohort: the frozen cohort {frozen.id[:12]} of {frozen.frozen_at} (reused: the same files)")
    elif frozen:
        console.print(f"  cohort: froze the cohort {frozen.id[:12]} in {frozen.folder.parent} for later runs")
    console.print(f"  report: {summary.report_dir / 'report.html'}")


@app.command("check")
def check(folder: Path = typer.Argument(..., help="The submission folder holding nccid-model.json.")) -> None:
    """Check a submission's manifest without submitting it."""
    from nccid.validation.manifest import load_manifest

    manifest = load_manifest(folder)
    use = manifest.intended_use
    console.print(
        f"{folder}: {manifest.name} {manifest.version} by {manifest.vendor}: task {use.task}, input "
        f"{'/'.join(use.modalities)} ({'/'.join(use.views)}), unit {use.unit}, threshold {use.threshold}; "
        f"entry: {' '.join(manifest.entry)}"
    )


@app.command("submit")
def submit(
    folder: Path = typer.Argument(..., help="The submission folder holding nccid-model.json and the model."),
    workspace: Path = WorkspaceOption,
    who: str | None = WhoOption,
) -> None:
    """Accept a model submission into the workspace (checked, copied, hashed, logged)."""
    from nccid.validation.service import Workspace

    sub = Workspace(workspace, create=True).submit(folder, who or default_actor("validator"))
    console.print(f"submission {sub.id} (model SHA-256 {sub.model_hash}) in {workspace / 'submissions' / sub.id}")


@app.command("dry-run")
def dry_run(
    submission: str = typer.Argument(..., help="The submission id printed by `nccid validate submit`."),
    workspace: Path = WorkspaceOption,
    who: str | None = WhoOption,
    cases: int = typer.Option(40, help="Synthetic cases (half positive)."),
    memory_mb: int = MemoryOption,
    processes: int = ProcessesOption,
    wall_seconds: float = WallOption,
) -> None:
    """Run a submission on synthetic radiographs; its report (with logs and outputs) is the vendor's to see."""
    from nccid.validation.service import Workspace

    limits = _limits(memory_mb, processes, wall_seconds)
    _show_run(Workspace(workspace).dry_run(submission, who or default_actor("validator"), limits=limits, cases=cases))


@app.command("run")
def sealed_run(
    submission: str = typer.Argument(..., help="The submission id printed by `nccid validate submit`."),
    store: str = StoreOption,
    workspace: Path = WorkspaceOption,
    who: str | None = WhoOption,
    min_cell: int = typer.Option(10, "--min-cell", help="Smallest subgroup cell shown in the report."),
    memory_mb: int = MemoryOption,
    processes: int = ProcessesOption,
    wall_seconds: float = WallOption,
    fresh_cohort: bool = typer.Option(
        False, "--fresh-cohort", help="Freeze the cohort anew (new case names and files) instead of reusing it."
    ),
) -> None:
    """The sealed run: the submission on the held-out validation cohort of its intended use (the frozen cohort of
    that use when the validation set has not changed since it was frozen)."""
    from nccid.validation.service import Workspace

    limits = _limits(memory_mb, processes, wall_seconds)
    summary = Workspace(workspace).sealed_run(
        submission, open_store_option(store), who or default_actor("validator"), limits=limits, min_cell=min_cell,
        fresh_cohort=fresh_cohort,
    )  # fmt: skip
    _show_run(summary)


@app.command("freeze")
def freeze(
    submission: str = typer.Argument(..., help="A submission whose intended use's cohort to freeze."),
    store: str = StoreOption,
    workspace: Path = WorkspaceOption,
    who: str | None = WhoOption,
    fresh: bool = typer.Option(False, "--fresh", help="Freeze it anew even if it is frozen and intact."),
) -> None:
    """Freeze the validation cohort of a submission's intended use now (after a load, say), so that the sealed
    runs of every submission with that intended use start at once."""
    from nccid.validation.service import Workspace

    frozen = Workspace(workspace).freeze_cohort(
        submission, open_store_option(store), who or default_actor("validator"), fresh=fresh
    )
    cases = frozen.cohort.cases
    done = f"the cohort {frozen.id[:12]} was frozen already ({frozen.frozen_at}; its files checked)"
    if not frozen.reused:
        done = f"froze the cohort {frozen.id[:12]}"
    console.print(
        f"{done}: {len(cases)} cases ({sum(c.label for c in cases)} positive) in {frozen.folder}; the sealed runs of "
        "this intended use read it until the validation set changes"
    )


@app.command("cohorts")
def cohorts(
    workspace: Path = WorkspaceOption,
    drop: str | None = typer.Option(
        None, "--drop", help="Drop the frozen cohort whose id starts with this (8 or more hex digits)."
    ),
    who: str | None = WhoOption,
) -> None:
    """The frozen cohorts (the opaque inputs sealed runs reuse), or drop one."""
    from nccid.console import table
    from nccid.validation.service import Workspace

    space = Workspace(workspace)
    if drop is not None:
        dropped = space.drop_cohort(drop, who or default_actor("validator"))
        console.print(f"dropped the frozen cohort {dropped[:12]}; the next sealed run of its use freezes it anew")
        return
    listed = space.frozen_cohorts()
    rows = [
        [c.id[:12], c.task, c.group, f"{c.cases} ({c.positives} positive)", f"{c.bytes / 1e6:,.1f} MB", c.frozen_at,
         c.last_used, "yes" if c.in_use else ""]
        for c in listed
    ]  # fmt: skip
    headers = ["cohort", "task", "group", "cases", "size", "frozen (UTC)", "last used (UTC)", "in use"]
    console.print(table("Frozen cohorts", headers, rows))
    console.print(f"{len(listed)} frozen cohort(s) in {space.cohorts.root}")


@app.command("release")
def release(
    run: str = typer.Argument(..., help="The run id (see `nccid validate runs`)."),
    workspace: Path = WorkspaceOption,
    who: str | None = WhoOption,
) -> None:
    """Release a run's report to the vendor (a copy under releases/, logged)."""
    from nccid.validation.service import Workspace

    target = Workspace(workspace).release(run, who or default_actor("validator"))
    console.print(f"released the report of {run} to {target}")


@app.command("runs")
def runs(workspace: Path = WorkspaceOption) -> None:
    """The audit log: submissions, dry runs, sealed runs and releases, who and when (checked for edits)."""
    from nccid.console import table
    from nccid.validation.service import Workspace

    events = Workspace(workspace).events()
    rows = [
        [
            str(e["seq"]),
            e["time"],
            e["event"],
            e["who"],
            e.get("submission", ""),
            e.get("run") or (f"cohort {e['cohort'][:12]}" if e.get("cohort") else ""),
            e.get("outcome") or e.get("reason", ""),
        ]
        for e in events
    ]
    console.print(
        table("Validation audit log", ["#", "when (UTC)", "event", "who", "submission", "run", "outcome"], rows)
    )
    console.print(f"{len(events)} event(s) in {workspace / 'audit.jsonl'}; the hash chain is intact")


@app.command("demo")
def demo(
    store: str = typer.Option(
        "nccid-demo/store", "--store", "-s", envvar="NCCID_STORE", help="A loaded store (default: nccid demo's)."
    ),
    workspace: Path = typer.Option(Path("nccid-demo/validation"), "--workspace", "-w", help="The workspace."),
    models: Path | None = typer.Option(None, "--models", help="The example models (default: examples/models)."),
    who: str | None = WhoOption,
) -> None:
    """Train the baseline on the training set, then validate it and a coin flip on the held-out set."""
    from nccid.validation.demo import run_validation_demo

    result = run_validation_demo(store, workspace, models=models, who=who or default_actor("demo"))
    console.print(f"baseline: {result.training}")
    for model in result.models:
        console.rule(model.name)
        _show_run(model.dry)
        _show_run(model.sealed)
        console.print(f"  released to {model.released}")
    console.print(f"audit log: {result.audit} (nccid validate runs -w {workspace})")
