"""Structured logs: one JSON object per line on standard error, for machines (the terminal gets tables).

Events carry counts, durations, run ids and key names only: never a secret, an NHS number or a pseudonym.
Off unless NCCID_LOG is set (`NCCID_LOG=info`, or `debug`), so interactive output stays readable.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import sys

_LOGGER = logging.getLogger("nccid")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC), level, event name and the event's fields, keys sorted."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        return json.dumps(doc, default=str, sort_keys=True)


def configure(level: str | None = None) -> None:
    """Send nccid events to standard error as JSON lines at `level` (default: $NCCID_LOG).

    Does nothing when no level is set or logging is already configured, so calling it twice is harmless.
    """
    level = level or os.environ.get("NCCID_LOG", "")
    if not level or _LOGGER.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    _LOGGER.addHandler(handler)
    _LOGGER.setLevel(level.upper())
    _LOGGER.propagate = False


def event(name: str, **fields: object) -> None:
    """Log one event with its fields (counts, durations, ids)."""
    _LOGGER.info(name, extra={"fields": fields})
