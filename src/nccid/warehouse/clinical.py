"""Checks on a raw clinical record before it is filed (pure; the loader does the I/O)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from nccid.contracts.layout import LayoutError, RawKey, parse_clinical_name
from nccid.errors import ClinicalRejected


@dataclass(frozen=True, slots=True)
class ClinicalRecord:
    pseudonym: str
    kind: str  # 'data' (positive record) or 'status' (negative status record)
    centre: str
    date: str  # the upload date, from the raw folder


def check_clinical(raw: RawKey, content: bytes) -> ClinicalRecord:
    """A record is filed only if its name, JSON, Pseudonym and SubmittingCentre all make sense."""
    try:
        name = parse_clinical_name(raw.rest)
    except LayoutError as exc:
        raise ClinicalRejected(str(exc)) from exc
    try:
        doc = json.loads(content)
    except UnicodeDecodeError as exc:
        raise ClinicalRejected(f"not UTF-8 text at byte {exc.start}") from exc
    except json.JSONDecodeError as exc:
        raise ClinicalRejected(f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    if not isinstance(doc, dict):
        raise ClinicalRejected(f"expected a JSON object, found {type(doc).__name__}")
    pseudonym = doc.get("Pseudonym")
    if pseudonym in (None, ""):
        raise ClinicalRejected("missing field 'Pseudonym'")
    if pseudonym != name.pseudonym:
        raise ClinicalRejected(f"file name says {name.pseudonym} but field 'Pseudonym' is {str(pseudonym)[:40]!r}")
    centre = doc.get("SubmittingCentre")
    if not isinstance(centre, str) or not centre.strip():
        raise ClinicalRejected("missing field 'SubmittingCentre'")
    return ClinicalRecord(pseudonym=name.pseudonym, kind=name.kind, centre=centre, date=raw.date)
