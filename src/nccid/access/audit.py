"""Who read or wrote what: the S3 server's per-request records, summarised per organisation and prefix."""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from nccid.access.grants import Grant
from nccid.access.groups import ADMIN_NAME


@dataclass(frozen=True)
class AuditRow:
    """One line of the access summary: how many requests one organisation made on one prefix, by action and outcome."""

    org: str
    group: str
    prefix: str
    action: str  # read | list | write | delete | other
    outcome: str  # allowed | denied
    requests: int


def action_of(operation: str) -> str:
    """REST.GET.OBJECT -> read, REST.GET.BUCKET -> list, REST.PUT.OBJECT -> write, ..."""
    parts = operation.split(".")
    method, resource = (parts[1], parts[2]) if len(parts) >= 3 else ("", "")
    if method in ("GET", "HEAD"):
        return "list" if resource == "BUCKET" else "read"
    if method in ("PUT", "POST"):
        return "write"
    if method == "DELETE":
        return "delete"
    return "other"


def prefix_of(key: str, depth: int = 2) -> str:
    """The first `depth` folders of a key: training/ct/Covid1/... -> training/ct/."""
    parts = key.lstrip("/").split("/")
    folders = parts[:-1][:depth]
    return "/".join(folders) + "/" if folders else "(bucket)"


def records(audit_dir: Path, since: dt.date | None = None) -> Iterator[dict]:
    """The S3 server's request records from `access-<date>.jsonl` files, oldest day first, from `since` on.

    Lines that are not JSON (a record cut short by a crash) are skipped rather than stopping the read.
    """
    for path in sorted(audit_dir.glob("access-*.jsonl")):
        day = dt.date.fromisoformat(path.stem.removeprefix("access-"))
        if since and day < since:
            continue
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    yield json.loads(line)
                except ValueError:
                    continue


def summarise(
    audit_dir: Path, grants: dict[str, Grant], *, org: str | None = None, since: dt.date | None = None
) -> list[AuditRow]:
    """Count requests per organisation, group, prefix, action and outcome, so the central team can see who
    touched what; access keys are named by the organisation their grant was issued to.

    Only `org` (when given) is kept; 401/403 count as denied. Returns rows sorted by organisation.
    """
    counts: Counter[tuple[str, str, str, str, str]] = Counter()
    for record in records(audit_dir, since):
        requester = record.get("requester") or ""
        grant = grants.get(requester)
        who = grant.org if grant else ("central team" if requester == ADMIN_NAME else requester or "anonymous")
        group = grant.group if grant else ("admin" if requester == ADMIN_NAME else "")
        if org and who != org:
            continue
        if str(record.get("bucket", "")).startswith("nccid-ready-"):
            continue  # the server's own start-up probe
        status = int(record.get("status") or 0)
        outcome = "denied" if status in (401, 403) else "allowed"
        counts[
            (who, group, prefix_of(str(record.get("key", ""))), action_of(str(record.get("operation", ""))), outcome)
        ] += 1
    return [AuditRow(*key, requests=n) for key, n in sorted(counts.items())]
