"""The validation service: submissions, dry runs, sealed runs, report release and the audit log, in a
validator's workspace folder. The CLI (and later the portal) call these functions and hold no rules.

Workspace layout (owner-only, 0700):
    audit.jsonl                             the append-only audit log
    submissions/<id>/model/                 the submitted folder, copied (read-only inside the sandbox)
    submissions/<id>/submission.json        manifest, model hash, who and when
    runs/<run>/private/                     cohort manifest, ground truth, raw outputs, logs (never released)
    runs/<run>/report/                      the vendor-facing report (released by `release`)
    releases/<run>/                         released copies
    cohorts/<id>/                           frozen cohorts: a sealed run's opaque inputs, kept (see frozen.py)

A dry run uses synthetic radiographs: its report includes the model's logs and raw outputs, which the vendor
may see; its inputs are deleted when the run ends. A sealed run uses the warehouse's validation cohort of the
intended use, frozen by the first sealed run of that intended use on the warehouse as it is (frozen.py): every
later run of the same intended use reads the same opaque files, until the validation set changes. Only the
report of a run is ever released.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import datetime as dt
import hashlib
import json
import os
import random
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import nccid
from nccid.errors import FrozenCohortAltered, SubmissionError, ValidationRunError
from nccid.files import write_private
from nccid.store import ObjectStore
from nccid.synth import dicom as synth_dicom
from nccid.validation import audit, metrics
from nccid.validation.analysis import DEFAULT_MIN_CELL, analyse
from nccid.validation.cohort import (
    Case,
    Cohort,
    age_band,
    canonical_hash,
    input_manifest,
    list_sources,
    opaque_dicom,
    select_cohort,
    write_case,
    write_inputs,
)
from nccid.validation.frozen import (
    CohortShelf,
    FrozenCohort,
    FrozenInfo,
    cohort_code_version,
    cohort_fingerprint,
    hash_changes,
)
from nccid.validation.manifest import MANIFEST_NAME, TASKS, IntendedUse, Manifest, load_manifest
from nccid.validation.predictions import PREDICTIONS_NAME, read_predictions
from nccid.validation.report import write_report
from nccid.validation.sandbox import Limits, SandboxResult, prepare_output, remove_tree, run_sandboxed

_IGNORED = {"__pycache__", ".git", ".mypy_cache", ".pytest_cache"}
MODEL_FOLDERS_NAME = "model-folders.json"  # folders on the server an administrator offers to validators


@dataclass(frozen=True)
class Submission:
    """A model submitted to the workspace: its id, its manifest, the SHA-256 of its files and where the copy is."""

    id: str
    manifest: Manifest
    model_hash: str
    model_dir: Path


@dataclass(frozen=True)
class _RunPlan:
    """One dry or sealed run as it starts: what is run, where, on which cases, under which limits."""

    kind: str  # 'dry_run' or 'sealed_run'
    sub: Submission
    run: str
    folder: Path
    inputs: Path  # the read-only folder shown to the model as /input
    cases: list[Case]
    limits: Limits
    min_cell: int
    times: dict[str, float]  # seconds per phase, filled in as the run goes
    started: str
    progress: Progress
    frozen: FrozenCohort | None = None  # a sealed run's frozen cohort (kept); a dry run's inputs are deleted


@dataclass(frozen=True)
class RunSummary:
    """What a run produced, for the shell to print."""

    run: str
    kind: str  # dry_run | sealed_run
    submission: str
    sandbox: SandboxResult
    report_dir: Path
    results: dict[str, Any]
    report_seconds: float = 0.0  # writing the report (figures, HTML, JSON, checksums), after its own times
    frozen: FrozenCohort | None = None  # a sealed run's frozen cohort (its `reused` says if this run froze it)


@dataclass(frozen=True)
class RunInfo:
    """One run as the validator's overview shows it, from the audit log and the run's report (aggregates only)."""

    run: str
    kind: str  # dry_run | sealed_run
    submission: str
    who: str
    time: str  # when the run ended (UTC)
    outcome: str  # the entry command's status: completed | failed | timed_out
    metrics: str  # the analysis status, e.g. "metrics computed"
    auc: dict[str, float] | None  # value, low, high (DeLong 95% CI) when computed
    released_by: str = ""
    released_at: str = ""


Progress = Callable[[str], None]


def _quiet(phase: str) -> None:
    """The progress callback of runs nobody watches."""


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def code_version() -> str:
    """nccid's version and the SHA-256 (first 16 hex) of the validation package's source: what computed it."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return f"nccid {nccid.__version__}, validation code {digest.hexdigest()[:16]}"


def model_hash(folder: Path) -> str:
    """SHA-256 over every file of the model folder (relative path and content), in path order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        digest.update(f"{relative}\0{hashlib.sha256(path.read_bytes()).hexdigest()}\n".encode())
    return digest.hexdigest()


class Workspace:
    """A validator's workspace folder, where submissions, runs, releases and the audit log live, so every step
    of validating a vendor's model is recorded and can be reproduced (layout in the module docstring).

    Methods raise SubmissionError or ValidationRunError with a one-line reason.
    """

    def __init__(self, root: Path, *, create: bool = False) -> None:
        """Open the workspace at `root`; with `create`, make it (owner-only) if it is not there. Raises
        ValidationRunError for a missing workspace otherwise (a mistyped path is reported, not created)."""
        self.root = Path(root)
        if create:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        elif not self.root.is_dir():
            raise ValidationRunError(
                f"no validation workspace at {self.root}: give yours with -w/--workspace or $NCCID_VALIDATION "
                "(`nccid validate demo` makes nccid-demo/validation), or submit a model to make one"
            )
        self.audit_path = self.root / "audit.jsonl"
        self.cohorts = CohortShelf(self.root)

    # -- submissions -----------------------------------------------------------------------------------
    def submit(self, folder: Path, who: str) -> Submission:
        """Check the submission folder's manifest, copy the folder into the workspace and log it.

        Returns the Submission (its id is `<name>-<version>-<hash prefix>`; the same folder twice gives the
        same submission, logged once). Raises SubmissionError for a bad manifest, or a symbolic link or
        special file in the folder (it could point at the host's files).
        """
        folder = Path(folder)
        manifest = load_manifest(folder)
        for path in folder.rglob("*"):
            if path.is_symlink() or not (path.is_file() or path.is_dir()):
                raise SubmissionError(f"{path}: symbolic links and special files are not accepted in a submission")
        staging = self.root / "submissions" / f".incoming-{secrets.token_hex(4)}"
        shutil.copytree(folder, staging / "model", ignore=shutil.ignore_patterns(*_IGNORED))
        for path in [staging / "model", *(staging / "model").rglob("*")]:
            path.chmod(0o755 if path.is_dir() or os.access(path, os.X_OK) else 0o644)
        digest = model_hash(staging / "model")
        sub_id = f"{manifest.name}-{manifest.version}-{digest[:12]}"
        final = self.root / "submissions" / sub_id
        if final.exists():
            remove_tree(staging)
            return self.submission(sub_id)
        record = {"id": sub_id, "manifest": manifest.to_json(), "model_hash": digest, "who": who, "time": _now()}
        write_private(staging / "submission.json", json.dumps(record, indent=1) + "\n")
        staging.rename(final)
        audit.append(self.audit_path, "submission", who, submission=sub_id, model_hash=digest, vendor=manifest.vendor)
        return Submission(sub_id, manifest, digest, final / "model")

    def submission(self, sub_id: str) -> Submission:
        """A stored submission. Raises ValidationRunError when there is none of that id."""
        folder = self.root / "submissions" / sub_id
        if not _plain_id(sub_id) or not (folder / "submission.json").exists():
            known = ", ".join(self.submissions()) or "none yet"
            raise ValidationRunError(
                f"no submission {sub_id!r} (known: {known}); submit one with `nccid validate submit`"
            )
        record = json.loads((folder / "submission.json").read_text())
        return Submission(sub_id, load_manifest(folder / "model"), record["model_hash"], folder / "model")

    def submissions(self) -> list[str]:
        """The ids of the stored submissions, sorted; empty in a new workspace."""
        base = self.root / "submissions"
        return sorted(p.name for p in base.iterdir() if not p.name.startswith(".")) if base.exists() else []

    # -- runs ------------------------------------------------------------------------------------------
    def _new_run(self, kind: str) -> tuple[str, Path]:
        self.sweep_interrupted()
        self.cohorts.sweep()
        run = f"{dt.datetime.now(dt.UTC).strftime('%Y%m%dT%H%M%S')}-{kind.split('_')[0]}-{secrets.token_hex(3)}"
        folder = self.root / "runs" / run
        (folder / "private").mkdir(mode=0o700, parents=True)
        write_private(folder / "private" / "pid", str(os.getpid()))
        return run, folder

    def sweep_interrupted(self) -> list[str]:
        """Delete the inputs of runs whose process died before the end (killed, power cut): a dry run's inputs
        never outlive their run (a sealed run's are its frozen cohort's; a freeze cut short is swept by
        `CohortShelf.sweep`). Returns the runs swept. A run of a live process is left alone."""
        swept = []
        for inputs in sorted((self.root / "runs").glob("*/private/input")):
            try:
                os.kill(int((inputs.parent / "pid").read_text()), 0)
                continue  # still running
            except (ProcessLookupError, ValueError, FileNotFoundError):
                pass
            except PermissionError:
                continue
            remove_tree(inputs)
            swept.append(inputs.parent.parent.name)
        return swept

    def _execute(self, plan: _RunPlan, manifest_of: Callable[[], dict[str, Any]]) -> RunSummary:
        """Run the model on the inputs in `plan.inputs` and write the report; returns the RunSummary.

        `manifest_of` returns the private cohort manifest (it hashes the inputs). It runs on a helper thread
        while the model runs, with the ground truth and the code version; a second helper imports and warms
        the analysis's and report's libraries. Inputs to discard are deleted by a helper as soon as the model
        has ended, while the predictions are analysed; the run returns only once they are gone. Wall time is
        the user's wait, and the model uses one core."""
        private = plan.folder / "private"
        output = private / "output"
        prepare_output(output)
        entry, model_dir = plan.sub.manifest.entry, plan.sub.model_dir
        with cf.ThreadPoolExecutor(2, "nccid-validation", initializer=_yield_to_the_model) as helper:
            prepared = helper.submit(_prepare_private, private, plan.cases, manifest_of)
            warm = helper.submit(_warm_up)
            plan.progress(f"running the model on {len(plan.cases)} cases in the sandbox")
            result = run_sandboxed(entry, model_dir, plan.inputs, output, private / "logs", plan.limits)
            plan.times["model run"] = result.seconds
            truth, cohort_manifest, version = prepared.result()
            if plan.frozen:
                self._unchanged_since_frozen(plan.frozen)
            removal = helper.submit(remove_tree, plan.inputs) if plan.frozen is None else None
            warm.result()  # the analysis imports nothing the helper is still importing
            summary = self._report(plan, truth, cohort_manifest, version, result)
            if removal:
                removal.result()  # raises if the inputs could not be deleted
            return summary

    def _report(
        self,
        plan: _RunPlan,
        truth: dict[str, Any],
        cohort_manifest: dict[str, Any],
        version: str,
        result: SandboxResult,
    ) -> RunSummary:
        """Read the predictions, analyse them, write the report and log the run; returns the RunSummary."""
        kind, sub, run, folder, times = plan.kind, plan.sub, plan.run, plan.folder, plan.times
        min_cell, progress = plan.min_cell, plan.progress
        output = folder / "private" / "output"
        progress("analysing the predictions")
        clock = time.monotonic()
        predictions = read_predictions(output, {c.case for c in plan.cases})
        results = analyse(truth, predictions, sub.manifest.intended_use.threshold, min_cell=min_cell)
        dry = kind == "dry_run"
        extra = {}
        if dry and (output / PREDICTIONS_NAME).is_file() and not (output / PREDICTIONS_NAME).is_symlink():
            extra["outputs/predictions.csv"] = (output / PREDICTIONS_NAME).read_bytes()[:1_000_000]
        times["analysis"] = round(time.monotonic() - clock, 3)
        context = {
            "run": run,
            "kind": kind,
            "kind_title": "Dry run on synthetic data" if dry else "Sealed validation run",
            "kind_note": (
                "Synthetic radiographs with planted signs of disease; the logs and outputs are the vendor's to see."
                if dry
                else "The warehouse's held-out validation cohort; the vendor sees this report only."
            ),
            "submission": sub.id,
            "model": {"name": sub.manifest.name, "version": sub.manifest.version, "vendor": sub.manifest.vendor},
            "use": sub.manifest.to_json()["intended_use"],
            "task_text": TASKS[sub.manifest.intended_use.task],
            "sandbox": result.to_json(),
            "sandbox_text": result.describe(),
            "excluded": {  # counts of people left out, small ones suppressed like any other cell
                reason: count if count >= min_cell else f"<{min_cell}"
                for reason, count in cohort_manifest.get("excluded", {}).items()
            },
            "model_hash": sub.model_hash,
            "cohort_hash": canonical_hash(cohort_manifest),
            "frozen_cohort": cohort_manifest.get("frozen_cohort"),
            "truth_hash": canonical_hash(truth),
            "code_version": version,
            "started": plan.started,
            "finished": _now(),
            "times": {k: round(v, 3) for k, v in times.items()},
            "limits": plan.limits.to_json(),
            "logs": {"stdout": result.stdout, "stderr": result.stderr} if dry else None,
        }
        progress("writing the report")
        clock = time.monotonic()
        write_report(folder / "report", results, context, extra)
        report_seconds = round(time.monotonic() - clock, 3)
        report_hash = hashlib.sha256((folder / "report" / "SHA256SUMS").read_bytes()).hexdigest()
        audit.append(
            self.audit_path,
            kind,
            (folder / "private" / "who").read_text(),
            run=run,
            submission=sub.id,
            outcome=result.status,
            metrics=results.get("status"),
            cohort_hash=context["cohort_hash"],
            truth_hash=context["truth_hash"],
            report_sha256sums=report_hash,
            report_seconds=report_seconds,
            **({"cohort": context["frozen_cohort"]["id"]} if context["frozen_cohort"] else {}),
        )
        return RunSummary(run, kind, sub.id, result, folder / "report", results, report_seconds, plan.frozen)

    def dry_run(
        self,
        sub_id: str,
        who: str,
        *,
        limits: Limits | None = None,
        cases: int = 40,
        seed: int = 0,
        progress: Progress | None = None,
    ) -> RunSummary:
        """Run the submission on `cases` synthetic radiographs (half positive, with the planted sign).

        Returns the RunSummary; its report includes the logs and raw outputs, for the vendor. `progress`, if
        given, is called with a short phrase as each phase begins (for a status page). Raises
        ValidationRunError for an unknown submission.
        """
        progress = progress or _quiet
        sub = self.submission(sub_id)
        run, folder = self._new_run("dry_run")
        write_private(folder / "private" / "who", who)
        started, clock = _now(), time.monotonic()
        progress(f"making {cases} synthetic radiographs")
        try:
            chosen, manifest_entries = _synthetic_inputs(folder / "private" / "input", cases, seed, sub.manifest)
            times = {"cohort": round(time.monotonic() - clock, 3)}
            manifest = {"cases": manifest_entries, "synthetic_seed": seed}
            plan = _RunPlan(
                "dry_run", sub, run, folder, folder / "private" / "input", chosen, limits or Limits(),
                DEFAULT_MIN_CELL, times, started, progress,
            )  # fmt: skip
            return self._execute(plan, lambda: manifest)
        finally:
            remove_tree(folder / "private" / "input")

    def sealed_run(
        self,
        sub_id: str,
        store: ObjectStore,
        who: str,
        *,
        limits: Limits | None = None,
        min_cell: int = DEFAULT_MIN_CELL,
        require_dry_run: bool = True,
        fresh_cohort: bool = False,
        progress: Progress | None = None,
    ) -> RunSummary:
        """Run the submission on the warehouse's validation cohort for its intended use: the frozen cohort of
        that use on the warehouse as it is, frozen now if there is none (or, with `fresh_cohort`, anew).

        Returns the RunSummary. Raises ValidationRunError for an unknown submission or one with no completed dry
        run (unless `require_dry_run` is False), or a frozen cohort whose files changed during the run (it is
        dropped); CohortError when no usable cohort exists. `progress`, if given, is called with a short phrase
        as each phase begins (for a status page).
        """
        progress = progress or _quiet
        sub = self.submission(sub_id)
        if require_dry_run and not any(
            e["event"] == "dry_run" and e.get("submission") == sub_id and e.get("outcome") == "completed"
            for e in audit.read(self.audit_path)
        ):
            raise ValidationRunError(
                f"submission {sub_id} has no completed dry run: run `nccid validate dry-run {sub_id}` first"
            )
        started = _now()
        frozen, times = self._hold_cohort(sub.manifest.intended_use, store, who, fresh=fresh_cohort, progress=progress)
        with self._holding(frozen, who):
            run, folder = self._new_run("sealed_run")
            write_private(folder / "private" / "who", who)
            plan = _RunPlan(
                "sealed_run", sub, run, folder, frozen.input, frozen.cohort.cases, limits or Limits(), min_cell,
                times, started, progress, frozen,
            )  # fmt: skip
            return self._execute(plan, lambda: self._frozen_manifest(frozen))

    def freeze_cohort(
        self, sub_id: str, store: ObjectStore, who: str, *, fresh: bool = False, progress: Progress | None = None
    ) -> FrozenCohort:
        """Freeze the cohort of a submission's intended use now (after a load, say), so that its sealed runs,
        and those of every submission with the same intended use, start at once; a cohort frozen already is
        checked and kept (with `fresh`, frozen anew). The files are hashed here, for the runs to compare.

        Returns the FrozenCohort (`reused` True if it was frozen before). Raises ValidationRunError for an
        unknown submission, FrozenCohortAltered if the files changed while they were hashed (the cohort is
        dropped), CohortError when no usable cohort exists."""
        frozen, _times = self._hold_cohort(
            self.submission(sub_id).manifest.intended_use, store, who, fresh=fresh, progress=progress or _quiet
        )
        with self._holding(frozen, who):
            self._frozen_manifest(frozen)
            self._unchanged_since_frozen(frozen)
            return frozen

    @contextlib.contextmanager
    def _holding(self, frozen: FrozenCohort, who: str) -> Iterator[None]:
        """Release the cohort's lock when the block ends; if the block found it altered (FrozenCohortAltered),
        drop it (unless another run reads it) and audit that, and let the error go on."""
        try:
            yield
        except FrozenCohortAltered as exc:
            self.cohorts.release(frozen)
            self._drop_cohort(frozen.id, who, str(exc))
            raise
        finally:
            self.cohorts.release(frozen)

    def _hold_cohort(
        self, use: IntendedUse, store: ObjectStore, who: str, *, fresh: bool, progress: Progress
    ) -> tuple[FrozenCohort, dict[str, float]]:
        """The frozen cohort of `use` on the warehouse as it is now, locked (the caller releases it): the one
        frozen already if intact (and not `fresh`), else selected and frozen now; frozen cohorts it supersedes
        are dropped. Returns it with the seconds spent selecting and materialising."""
        clock = time.monotonic()
        progress("selecting the cohort of the intended use")
        sources = list_sources(store)
        cohort_id = cohort_fingerprint(use, sources, cohort_code_version())
        frozen = self._frozen_cohort(cohort_id, who, fresh=fresh)
        cohort = frozen.cohort if frozen else select_cohort(store, use, sources=sources)
        times = {"cohort selection": round(time.monotonic() - clock, 3)}
        clock = time.monotonic()
        if frozen is None:
            progress(f"preparing {len(cohort.cases)} cases for the sandbox (freezing the cohort)")
            frozen = self.cohorts.freeze(
                cohort_id, use, cohort, sources.group, lambda inputs: write_inputs(store, cohort, inputs)
            )  # another run's cohort, with its cases, if it froze the same one first
            if not frozen.reused:
                cases = frozen.cohort.cases
                audit.append(
                    self.audit_path, "cohort_frozen", who, cohort=frozen.id, cases=len(cases),
                    positives=sum(c.label for c in cases),
                )  # fmt: skip
        else:
            progress(f"preparing {len(cohort.cases)} cases for the sandbox (the cohort frozen {frozen.frozen_at})")
        times["materialisation"] = round(time.monotonic() - clock, 3)
        try:
            for dropped, why in self.cohorts.prune(frozen, use):
                self._audit_drop(dropped, who, why)
        except BaseException:
            self.cohorts.release(frozen)
            raise
        return frozen, times

    def _frozen_cohort(self, cohort_id: str, who: str, *, fresh: bool) -> FrozenCohort | None:
        """The intact frozen cohort `cohort_id`, locked for this run, or None. One found altered since it was
        frozen, or any with `fresh`, is dropped (and audited) so that the run freezes it anew. Raises
        ValidationRunError when it should be dropped but another run is reading it."""
        frozen, changed = self.cohorts.open(cohort_id)
        if changed:
            shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
            reason = f"altered since it was frozen ({shown})"
        elif frozen and fresh:
            reason = "a fresh cohort was asked for"
            self.cohorts.release(frozen)
        else:
            return frozen
        if not self._drop_cohort(cohort_id, who, reason):
            raise ValidationRunError(
                f"the frozen cohort {cohort_id[:12]} ({reason}) is being read by another run: try again when it ends"
            )
        return None

    def _drop_cohort(self, cohort_id: str, who: str, reason: str) -> bool:
        """Drop a frozen cohort unless a run holds it, and audit the drop. Returns whether it was dropped."""
        dropped = self.cohorts.drop(cohort_id)
        if dropped:
            self._audit_drop(cohort_id, who, reason)
        return dropped

    def _audit_drop(self, cohort_id: str, who: str, reason: str) -> None:
        audit.append(self.audit_path, "cohort_dropped", who, cohort=cohort_id, reason=reason)

    def _unchanged_since_frozen(self, frozen: FrozenCohort) -> None:
        """Raises FrozenCohortAltered if anything below the cohort's inputs changed since it was frozen (checked
        again once the model has ended: the report must describe the files the model read)."""
        if changed := self.cohorts.changes(frozen):
            raise FrozenCohortAltered(
                f"the frozen cohort {frozen.id[:12]} changed while it was read ({', '.join(changed[:3])}): it is "
                "dropped; run again to freeze it anew"
            )

    def _frozen_manifest(self, frozen: FrozenCohort) -> dict[str, Any]:
        """The private cohort manifest of a frozen cohort, from its files as they are now (hashed while the model
        runs); records the hashes the first time. Raises FrozenCohortAltered when they differ from the record."""
        manifest = {
            **input_manifest(frozen.cohort, frozen.input),
            "patients_considered": frozen.cohort.patients_considered,
            "frozen_cohort": {"id": frozen.id, "frozen_at": frozen.frozen_at},
        }
        hashes = {entry["case"]: entry["sha256"] for entry in manifest["cases"]}
        if frozen.hashes is not None and (changed := hash_changes(frozen.hashes, hashes)):
            raise FrozenCohortAltered(
                f"the frozen cohort {frozen.id[:12]} holds {len(changed)} file(s) whose SHA-256 is not the one "
                "recorded: it is dropped; run again to freeze it anew"
            )
        self.cohorts.record_hashes(frozen, hashes)
        return manifest

    def frozen_cohorts(self) -> list[FrozenInfo]:
        """The frozen cohorts of the workspace, most recently used first."""
        return self.cohorts.listing()

    def drop_cohort(self, prefix: str, who: str) -> str:
        """Drop the frozen cohort whose id starts with `prefix` (at least 8 hex digits) and log it; the next
        sealed run of its intended use freezes it anew. Returns the full id. Raises ValidationRunError for no
        such cohort, an ambiguous prefix, or a cohort a run is reading now."""
        if len(prefix) < 8:
            raise ValidationRunError(
                f"give at least 8 hex digits of the cohort's id, not {prefix!r}: `nccid validate cohorts` lists them"
            )
        matches = [c for c in self.cohorts.ids() if c.startswith(prefix)]
        if len(matches) != 1:
            why = "more than one frozen cohort starts so" if matches else "no frozen cohort"
            raise ValidationRunError(f"{why} {prefix}; `nccid validate cohorts` lists them")
        if not self._drop_cohort(matches[0], who, "dropped by the validator"):
            raise ValidationRunError(f"the frozen cohort {prefix} is being read by a run; drop it when that ends")
        return matches[0]

    # -- release and listing ---------------------------------------------------------------------------
    def release(self, run: str, who: str) -> Path:
        """Copy a run's report to `releases/<run>/` for the vendor and log it. Returns that folder.

        Raises ValidationRunError for an unknown run or a report already released."""
        source = self.root / "runs" / run / "report"
        if not _plain_id(run) or not source.is_dir():
            raise ValidationRunError(f"no run {run!r} with a report; `nccid validate runs` lists them")
        target = self.root / "releases" / run
        if target.exists():
            raise ValidationRunError(f"the report of run {run} was already released to {target}")
        shutil.copytree(source, target)
        sums = hashlib.sha256((target / "SHA256SUMS").read_bytes()).hexdigest()
        audit.append(self.audit_path, "release", who, run=run, report_sha256sums=sums, to=str(target))
        return target

    def runs(self, events: list[dict[str, Any]] | None = None, *, only: str | None = None) -> list[RunInfo]:
        """Every finished run (or only the run `only`), newest first, with its release (who, when) and its AUC,
        from the checked audit log (raises ValidationRunError if the log was edited; `events` when the caller
        has just read it with `events()`) and the run's own report.json."""
        events = self.events() if events is None else events
        released = {e["run"]: e for e in events if e["event"] == "release"}
        out = []
        finished = [e for e in events if e["event"] in ("dry_run", "sealed_run") and only in (None, e["run"])]
        for event in reversed(finished):
            auc = None
            report = self.root / "runs" / event["run"] / "report" / "report.json"
            if report.is_file():
                overall = json.loads(report.read_text()).get("results", {}).get("overall") or {}
                auc = overall.get("auc") if (overall.get("auc") or {}).get("value") is not None else None
            release = released.get(event["run"], {})
            info = RunInfo(
                event["run"], event["event"], event.get("submission", ""), event["who"], event["time"],
                event.get("outcome", ""), event.get("metrics") or "", auc,
                release.get("who", ""), release.get("time", ""),
            )  # fmt: skip
            out.append(info)
        return out

    def report_html(self, run: str) -> str:
        """The vendor-facing report page of a run (aggregates only). Raises ValidationRunError for an unknown
        run or one without a report."""
        path = self.root / "runs" / run / "report" / "report.html"
        if not _plain_id(run) or not path.is_file():
            raise ValidationRunError(f"no run {run!r} with a report; `nccid validate runs` lists them")
        return path.read_text(encoding="utf-8")

    # -- model folders on the server, offered to the portal's validators -------------------------------
    def model_folders(self) -> list[Path]:
        """The submission folders on this server that an administrator has offered (absolute paths, sorted)."""
        path = self.root / MODEL_FOLDERS_NAME
        return [Path(p) for p in json.loads(path.read_text())] if path.exists() else []

    def offer_model_folder(self, folder: Path) -> Manifest:
        """Offer a submission folder on this server to validators (they submit it by choosing it; nothing is
        uploaded through a browser). The folder must be an absolute path holding a valid manifest. Returns the
        manifest; raises SubmissionError naming the folder and the problem."""
        folder = Path(folder)
        if not folder.is_absolute():
            raise SubmissionError(f"{folder}: give the folder's absolute path on the server")
        folder = folder.resolve()
        manifest = load_manifest(folder)
        self._save_model_folders({str(p) for p in self.model_folders()} | {str(folder)})
        return manifest

    def withdraw_model_folder(self, folder: Path) -> None:
        """Stop offering a folder. Raises SubmissionError for a folder that is not offered."""
        folders = {str(p) for p in self.model_folders()}
        if str(folder) not in folders:
            raise SubmissionError(f"{folder}: not a model folder offered on this server")
        self._save_model_folders(folders - {str(folder)})

    def _save_model_folders(self, folders: set[str]) -> None:
        write_private(self.root / MODEL_FOLDERS_NAME, json.dumps(sorted(folders), indent=1) + "\n")

    def submit_offered(self, folder: str, who: str) -> Submission:
        """Submit one of the offered folders (see `offer_model_folder`). Raises SubmissionError for a folder
        that is not offered, or whatever `submit` raises."""
        if folder not in {str(p) for p in self.model_folders()}:
            raise SubmissionError(f"{folder}: not a model folder offered on this server; an administrator offers them")
        return self.submit(Path(folder), who)

    def events(self) -> list[dict[str, Any]]:
        """The audit log, checked (raises ValidationRunError if it was edited), oldest first."""
        audit.verify(self.audit_path)
        return audit.read(self.audit_path)


def _plain_id(value: str) -> bool:
    """A submission or run id that names one folder of the workspace (no path, nothing hidden)."""
    return bool(value) and "/" not in value and not value.startswith(".")


def _warm_up() -> None:
    """Import the analysis's libraries and call each once, while the model runs (a second in a fresh process,
    such as the CLI's)."""
    metrics.warm_up()


def _yield_to_the_model() -> None:
    """Run this helper thread at the lowest priority (Linux nice values are per thread): its work (hashing the
    inputs, warming up) waits for a free core rather than slowing the model it runs beside."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


def _prepare_private(
    private: Path, cases: list[Case], manifest_of: Callable[[], dict[str, Any]]
) -> tuple[dict[str, Any], dict[str, Any], str]:
    """Write the run's private cohort manifest and ground truth; returns (ground truth, cohort manifest, code
    version), all a report needs of the run besides the predictions."""
    truth = Cohort(cases).ground_truth_json()
    manifest = manifest_of()
    write_private(private / "cohort.json", json.dumps(manifest, indent=1) + "\n")
    write_private(private / "ground_truth.json", json.dumps(truth, indent=1) + "\n")
    return truth, manifest, code_version()


def _synthetic_inputs(
    folder: Path, count: int, seed: int, manifest: Manifest
) -> tuple[list[Case], list[dict[str, str]]]:
    """Synthetic radiographs for a dry run: alternating labels, positives with the planted sign of disease,
    made opaque and written like a sealed cohort. Returns the cases and their manifest entries."""
    folder.mkdir(mode=0o755)
    rng = random.Random(seed)
    nprng = np.random.default_rng(seed)
    modality = manifest.intended_use.modalities[0]
    cases, entries = [], []
    for n in range(count):
        label = n % 2
        age = rng.randint(manifest.intended_use.min_age or 18, manifest.intended_use.max_age or 95)
        subject = synth_dicom.Subject(
            f"Covid{90000 + n}", f"Covid{90000 + n}", rng.choice("MF"), age,
            synth_dicom.synthetic_uid("dry", seed, n), "20200401",
        )  # fmt: skip
        ds = synth_dicom.xray(
            subject, nprng, modality=modality, scale=0.1, series_uid=synth_dicom.synthetic_uid("dry-series", seed, n),
            sop_uid=synth_dicom.synthetic_uid("dry-sop", seed, n), signal=synth_dicom.DEFAULT_SIGNAL * label,
        )  # fmt: skip
        ds.ViewPosition = manifest.intended_use.views[0]
        case = f"case-{secrets.token_hex(6)}"
        digest = write_case(folder, case, *opaque_dicom(synth_dicom.encode(ds), case))
        attributes = {
            "sex": "male" if subject.sex == "M" else "female",
            "age band": age_band(age),
            "site": "synthetic",
            "scanner manufacturer": str(ds.Manufacturer),
            "scanner model": str(ds.ManufacturerModelName),
            "modality": modality,
        }
        cases.append(Case(case, f"synthetic/{n}", label, attributes))
        entries.append({"case": case, "key": f"synthetic/{n}", "sha256": digest})
    folder.chmod(0o555)
    return cases, entries


__all__ = ["MANIFEST_NAME", "Limits", "RunInfo", "RunSummary", "Submission", "Workspace", "code_version", "model_hash"]
