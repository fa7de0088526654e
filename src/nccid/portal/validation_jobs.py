"""Validation runs started from the portal: one at a time, in a thread of the server, with their state for the
status page. The runs themselves are nccid.validation's (`Workspace.dry_run`, `Workspace.sealed_run`); this
module only schedules them and remembers how the last one ended."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from nccid.errors import NccidError
from nccid.portal.accounts import PortalDB
from nccid.portal.background import OneAtATimeRunner, now

if TYPE_CHECKING:
    from nccid.validation.service import Workspace

_LOG = logging.getLogger("nccid.portal")
KINDS = {"dry_run": "dry run on synthetic data", "sealed_run": "sealed run on the validation cohort"}


@dataclass
class ValidationJob:
    """The one background validation run: what, by whom, since when, then its run id and outcome or error."""

    kind: str = ""
    submission: str = ""
    started_by: str = ""
    started: str = ""
    running: bool = False
    phases: list[str] = field(default_factory=list)  # the phases begun so far, the current one last
    finished: str = ""
    seconds: float = 0.0
    run: str = ""
    outcome: str = ""  # one line: the entry command's end and the headline metric
    error: str = ""

    @property
    def title(self) -> str:
        return KINDS.get(self.kind, self.kind)


class ValidationRunner(OneAtATimeRunner[ValidationJob]):
    """Starts dry and sealed runs in a thread, one at a time, on the portal's workspace and store."""

    def __init__(self, workspace: Workspace, store_url: str, db_path: Path) -> None:
        super().__init__(ValidationJob(), "nccid-portal-validation")
        self.workspace = workspace
        self.store_url = store_url
        self.db_path = db_path

    def elapsed(self) -> float:
        """Seconds since the running job started (its total once finished)."""
        return self._seconds() if self.job.running else self.job.seconds

    def start(self, kind: str, submission: str, actor: str, db: PortalDB) -> bool:
        """Start a run of `kind` (one of KINDS: the route checks) unless one is running; returns whether it
        started."""
        if not self.begin(ValidationJob(kind, submission, actor, now(), running=True)):
            return False
        db.audit(actor, f"validation.{kind}.start", submission)
        return True

    def _run(self) -> None:
        from nccid.store import open_store

        job = self.job
        try:
            space = self.workspace
            if job.kind == "dry_run":
                summary = space.dry_run(job.submission, job.started_by, progress=job.phases.append)
            else:
                store = open_store(self.store_url)
                summary = space.sealed_run(job.submission, store, job.started_by, progress=job.phases.append)
            job.run = summary.run
            job.outcome = f"model {summary.sandbox.describe()}; {summary.results.get('status', '')}"
        except NccidError as exc:
            job.error = str(exc)
        except Exception as exc:  # a thread must not die silently: the page says so, the log has the type
            _LOG.error("validation run stopped: %s", type(exc).__name__)
            job.error = f"the run stopped unexpectedly ({type(exc).__name__}); see the server log"
        finally:
            job.seconds = self._seconds()
            job.finished, job.running = now(), False
            with PortalDB(self.db_path) as db:
                db.audit(
                    job.started_by,
                    f"validation.{job.kind}.finish",
                    job.error or f"run {job.run}: {job.outcome}",
                    outcome="failed" if job.error else "ok",
                )
