"""What the warehouse holds from one site, and what of it waits: the facts behind the portal's Summary page
(and any command that wants to show the same).

A site is known by its raw prefix (`raw-<uploader>/`, where its uploads land) and the SubmittingCentre names
its records carry. Everything is read from the catalog with SELECT statements only (the catalog's read-only
contract); nothing here writes. Counts are grouped by modality folder and by upload date (the date folder of
the raw key that brought the object in).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

Query = Callable[[str, Sequence[object]], list[tuple]]
WAITING_OUTCOMES = ("pending", "held", "conflict", "quarantined")


@dataclass(frozen=True)
class WaitingItem:
    """One object of a site's that is not filed yet: its raw key, what it is, its outcome and why."""

    key: str  # the raw key, below the site's own prefix
    kind: str  # clinical | image | other
    outcome: str  # pending | held | conflict | quarantined
    reason: str


@dataclass
class SiteSummary:
    """What one site has sent and what became of it: patients, records and images filed, studies, a row per
    upload date, the split between training and validation, and what waits (counts, and the first items)."""

    prefix: str
    centres: tuple[str, ...]
    patients: int = 0
    clinical_records: dict[str, int] = field(default_factory=dict)  # kind (data/status) -> records filed
    images: dict[str, int] = field(default_factory=dict)  # modality folder -> images filed
    studies: dict[str, int] = field(default_factory=dict)  # modality folder -> studies
    by_date: list[dict] = field(default_factory=list)  # one row per upload date: clinical, xray, ct, mri
    waiting_counts: dict[str, int] = field(default_factory=dict)  # outcome -> objects
    waiting: list[WaitingItem] = field(default_factory=list)  # the first `limit` of them, with reasons
    groups: dict[str, int] = field(default_factory=dict)  # training/validation -> patients


def catalog_reader(catalog: object) -> Query:
    """The read-only query method of a catalog (`sql_query` where it exists, else `query`)."""
    method = getattr(catalog, "sql_query", None) or catalog.query  # type: ignore[attr-defined]
    return method


def _like(prefix: str) -> str:
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def site_summary(query: Query, prefix: str, centres: Sequence[str] = (), *, limit: int = 200) -> SiteSummary:
    """The summary of one site from the catalog: patients and clinical records (by the SubmittingCentre names
    given; records carry their upload date), images filed from its prefix by modality and upload date, and the
    objects under its prefix that wait (pending, held, conflict, quarantined) with their reasons."""
    if not prefix.startswith("raw-") or not prefix.endswith("/"):
        raise ValueError(f"a site prefix looks like 'raw-<uploader>/', not {prefix!r}")
    like = _like(prefix)
    summary = SiteSummary(prefix, tuple(centres))
    start = len(prefix) + 1  # SQL substr is 1-based: the upload date follows the prefix
    marks = ",".join("?" * len(centres)) or "''"
    patient_rows = query(f"SELECT grp, COUNT(*) FROM patients WHERE centre IN ({marks}) GROUP BY grp", tuple(centres))
    summary.groups = {g: n for g, n in patient_rows}
    summary.patients = sum(summary.groups.values())
    by_date: dict[str, dict] = {}
    for kind, date, n in query(
        f"SELECT kind, date, COUNT(*) FROM clinical WHERE centre IN ({marks}) GROUP BY kind, date", tuple(centres)
    ):
        summary.clinical_records[kind] = summary.clinical_records.get(kind, 0) + n
        by_date.setdefault(date, {"date": date, "clinical": 0, "xray": 0, "ct": 0, "mri": 0})["clinical"] += n
    for folder, date, images in query(
        "SELECT folder, substr(source, ?, 10), COUNT(*) FROM instances "
        "WHERE source LIKE ? ESCAPE '\\' GROUP BY folder, substr(source, ?, 10)",
        (start, like, start),
    ):
        summary.images[folder] = summary.images.get(folder, 0) + images
        row = by_date.setdefault(date, {"date": date, "clinical": 0, "xray": 0, "ct": 0, "mri": 0})
        row[folder] = row.get(folder, 0) + images
    for folder, studies in query(
        "SELECT folder, COUNT(DISTINCT study) FROM instances WHERE source LIKE ? ESCAPE '\\' GROUP BY folder",
        (like,),
    ):
        summary.studies[folder] = studies
    summary.by_date = [by_date[d] for d in sorted(by_date)]
    waiting_marks = ",".join("?" * len(WAITING_OUTCOMES))
    summary.waiting_counts = {
        outcome: n
        for outcome, n in query(
            f"SELECT outcome, COUNT(*) FROM raw_objects WHERE key LIKE ? ESCAPE '\\' AND outcome IN ({waiting_marks}) "
            "GROUP BY outcome",
            (like, *WAITING_OUTCOMES),
        )
    }
    summary.waiting = [
        WaitingItem(*row)
        for row in query(
            "SELECT key, kind, outcome, reason FROM raw_objects WHERE key LIKE ? ESCAPE '\\' "
            f"AND outcome IN ({waiting_marks}) ORDER BY outcome, key LIMIT ?",
            (like, *WAITING_OUTCOMES, limit),
        )
    ]
    return summary


def waiting_everywhere(query: Query, outcome: str | None = None, *, limit: int = 500) -> list[WaitingItem]:
    """Every object that waits (or only `outcome`), across all sites, with its reason: the central queues."""
    outcomes = (outcome,) if outcome else WAITING_OUTCOMES
    marks = ",".join("?" * len(outcomes))
    return [
        WaitingItem(*row)
        for row in query(
            f"SELECT key, kind, outcome, reason FROM raw_objects WHERE outcome IN ({marks}) ORDER BY outcome, key "
            "LIMIT ?",
            (*outcomes, limit),
        )
    ]


def load_runs(query: Query, limit: int = 50) -> list[dict]:
    """The most recent load runs: id, start, end, report key and the counts summary (JSON text)."""
    rows = query(
        "SELECT run_id, started, finished, report_key, summary FROM runs ORDER BY started DESC LIMIT ?", (limit,)
    )
    return [dict(zip(("run_id", "started", "finished", "report_key", "summary"), r, strict=True)) for r in rows]
