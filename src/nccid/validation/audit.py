"""The validation audit log: one JSON line per event (submission, dry run, sealed run, report release, frozen
cohort frozen or dropped), each saying who and when, appended under a lock and never rewritten.

Each line carries the SHA-256 of the line before it, so a removed or edited line breaks the chain and
`verify` names the first broken line. The log holds identifiers of submissions and runs, never of patients.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from nccid.errors import ValidationRunError

EVENTS = ("submission", "dry_run", "sealed_run", "release", "cohort_frozen", "cohort_dropped")
GENESIS = "0" * 64


def _digest(line: str) -> str:
    return hashlib.sha256(line.encode()).hexdigest()


def append(path: Path, event: str, who: str, **details: Any) -> dict[str, Any]:
    """Append one event (time now, UTC) and return it. Raises ValidationRunError for an unknown event."""
    if event not in EVENTS:
        raise ValidationRunError(f"audit: unknown event {event!r} (one of {', '.join(EVENTS)})")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "r+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        lines = handle.read().splitlines()
        entry = {
            "seq": len(lines) + 1,
            "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "event": event,
            "who": who,
            **details,
            "prev": _digest(lines[-1]) if lines else GENESIS,
        }
        handle.write(json.dumps(entry, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    return entry


def read(path: Path) -> list[dict[str, Any]]:
    """Every event, oldest first (an empty list when there is no log yet)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def verify(path: Path) -> int:
    """Check the chain. Returns the number of events; raises ValidationRunError naming the first bad line."""
    previous = GENESIS
    lines = path.read_text().splitlines() if path.exists() else []
    for number, line in enumerate(lines, 1):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            raise ValidationRunError(f"{path}: line {number} is not JSON: the log was edited") from None
        if entry.get("prev") != previous or entry.get("seq") != number:
            raise ValidationRunError(f"{path}: line {number} does not follow line {number - 1}: the log was edited")
        previous = _digest(line)
    return len(lines)
