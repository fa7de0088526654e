"""The loader's decisions as pure functions on plain values: what makes the warehouse what it is.

No store, no catalog, no I/O: each function takes what the loader looked up and returns what happens, so that
every rule is unit-tested on plain values (tests/test_loader_rules.py). The loader (`loader.py`) does the
listing, reading, filing and recording around them.

- A patient's group is decided once, by their first record (by upload date, then key) from a configured
  centre; records of a new patient that disagree on the group are held, not guessed.
- A raw image ends as exactly one :class:`Outcome`: filed, duplicate (the same bytes are filed already),
  conflict (other bytes are filed under its SOP Instance UID or processed key), pending (no group for its
  patient yet), or quarantined (it cannot be filed; the reason names the defect).
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Container, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum

from nccid.warehouse.catalog import ClinicalRow, Instance, RawRow, StagedRecord


class Outcome(StrEnum):
    """The one outcome of a raw object; the value is what the catalog and the run report record."""

    FILED = "filed"  #: copied into the processed layout
    DUPLICATE = "duplicate"  #: the same bytes were filed already, from another raw object
    PENDING = "pending"  #: an image whose patient has no group yet; a later run files it
    CONFLICT = "conflict"  #: other bytes are filed under the same identity: held for a person to look at
    QUARANTINED = "quarantined"  #: an image that cannot be filed; it stays in the raw prefix
    HELD = "held"  #: a clinical record (or stray file) that cannot be filed yet, with the reason
    UNFILED = "unfiled"  #: not recorded: not in the layout (rebuild), or raw bytes changed while being filed


#: outcomes that do not change unless the raw object does
SETTLED = frozenset({Outcome.FILED, Outcome.DUPLICATE, Outcome.CONFLICT, Outcome.QUARANTINED, Outcome.HELD})
#: statuses of placing an object (see loader.place): created, already there with the same / other bytes, missing,
#: or not placed because the raw bytes were no longer those examined
PLACE_STATUSES = ("new", "present", "different", "absent", "changed")
CHANGED_WHILE_FILING = "the raw object changed while it was being filed: nothing was filed, the next load examines it"


def is_unchanged(row: RawRow | None, size: int, checksum: str) -> bool:
    """The raw object is the one the catalog recorded (same size and checksum)."""
    return row is not None and row.size == size and row.checksum == checksum


def clinical_needs_checking(row: RawRow | None, size: int, checksum: str) -> bool:
    """A clinical record is read again when new, changed, or held (the configuration may have changed)."""
    return not is_unchanged(row, size, checksum) or (row is not None and row.outcome == Outcome.HELD)


def settled_and_unchanged(state: tuple[int, str, str] | None, size: int, checksum: str) -> bool:
    """The raw object is the one the catalog recorded and its outcome cannot change unless it does: nothing to
    do. Decided on the catalog's (size, checksum, outcome) alone, so that a re-run need not read whole rows for
    the many objects this holds for; when it is False, `image_needs_examining` decides on the whole row."""
    return state is not None and state[0] == size and state[1] == checksum and state[2] in SETTLED


def image_needs_examining(row: RawRow | None, size: int, checksum: str, grouped: Container[str]) -> bool:
    """An image is examined when new or changed, or pending while its patient now has a group."""
    if not is_unchanged(row, size, checksum):
        return True
    assert row is not None
    if row.outcome in SETTLED:
        return False
    if row.outcome == Outcome.PENDING:
        return row.patient in grouped
    return True


@dataclass(frozen=True, slots=True)
class GroupDecision:
    """A new patient's group, and the record that decided it; or, when `disagreement`, why none is decided."""

    group: str = ""
    centre: str = ""
    decided_by: str = ""
    disagreement: str = ""


def decide_group(pseudonym: str, records: Sequence[StagedRecord]) -> GroupDecision:
    """A new patient's group from their records from configured centres (sorted by date, then key).

    The first record decides; if the records' centres put the patient in different groups, nothing is
    decided and the note names up to six of them so that a person can fix config.json or a record.
    """
    proposals = {r.proposed for r in records}
    if len(proposals) <= 1:
        first = records[0]
        return GroupDecision(first.proposed, first.centre, first.key)
    detail = "; ".join(f"{r.key} (SubmittingCentre {r.centre!r}) -> {r.proposed}" for r in records[:6])
    return GroupDecision(
        disagreement=f"records disagree on {pseudonym}'s group; fix config.json or a record to decide: {detail}"
    )


def clinical_decision(
    staged: StagedRecord, group: str | None, existing: ClinicalRow | None, dest: str
) -> tuple[RawRow | ClinicalRow, str]:
    """A staged record's outcome (a RawRow), or (a ClinicalRow) where it is to be placed; plus a warning or ''.

    `group` is the patient's group (None: none yet); `existing` the record already filed or planned at `dest`.
    """
    base = RawRow(
        staged.key,
        staged.size,
        staged.checksum,
        "clinical",
        Outcome.HELD,
        patient=staged.pseudonym,
        centre=staged.centre,
    )
    if staged.proposed == "disagree":
        return replace(base, reason=staged.note), ""
    if staged.proposed == "":
        return replace(base, reason=f"SubmittingCentre {staged.centre!r} is not configured in config.json 'sites'"), ""
    if group is None:  # rebuild mode: the store has no record of this patient yet
        return replace(base, outcome=Outcome.UNFILED), ""
    warning = ""
    if staged.proposed != group:
        warning = (
            f"{staged.key}: SubmittingCentre {staged.centre!r} would put {staged.pseudonym} in {staged.proposed}, "
            f"but the patient is in {group} already and stays there"
        )
    if existing and existing.source not in ("", staged.key):
        if existing.checksum == staged.checksum:
            return replace(
                base, outcome=Outcome.DUPLICATE, dest=dest, reason=f"same record already filed from {existing.source}"
            ), warning
        return replace(
            base,
            outcome=Outcome.CONFLICT,
            dest=dest,
            reason=f"{dest} is already filed from {existing.source} with different content; "
            "send a correction under a new upload date",
        ), warning
    row = ClinicalRow(
        dest, staged.pseudonym, group, staged.kind, staged.date, staged.centre, staged.checksum, staged.size, staged.key
    )
    return row, warning


def pending_reason(patient: str, held_reason: str | None) -> str:
    """Why an image waits: its patient's clinical record is held (and why), or there is none yet."""
    if held_reason is not None:
        return f"clinical record of {patient} is held: {held_reason}"
    return f"no clinical record for {patient} yet"


def image_decision(base: RawRow, group: str | None, earlier: Instance | None, held_reason: str | None) -> RawRow | None:
    """An examined, fileable image's outcome before filing, or None when it is to be filed.

    `base` carries the raw key, size, checksum and patient; `group` is the patient's group (None: pending);
    `earlier` the instance filed (or planned in this run) under the same SOP Instance UID.
    """
    if group is None:
        return replace(base, outcome=Outcome.PENDING, reason=pending_reason(base.patient, held_reason))
    if earlier is None or earlier.source in ("", base.key):
        return None
    if earlier.checksum == base.checksum:
        return replace(
            base, outcome=Outcome.DUPLICATE, dest=earlier.dest, reason=f"same image already filed from {earlier.source}"
        )
    return replace(
        base,
        outcome=Outcome.CONFLICT,
        dest=earlier.dest,
        reason=f"SOP Instance UID {earlier.sop} is already filed from {earlier.source} with different content",
    )


def quarantined(base: RawRow, reason: str) -> RawRow:
    """An image that cannot be filed, with the reason naming the tag or defect."""
    return replace(base, outcome=Outcome.QUARANTINED, reason=reason)


def decided_against_unfiled(row: RawRow, prior_source: str) -> RawRow:
    """A raw image decided (duplicate, conflict) against another raw file of the same SOP Instance UID planned in
    the same run, which in the end was not filed: not recorded (UNFILED), so that the next run decides it again."""
    return replace(
        row,
        outcome=Outcome.UNFILED,
        reason=f"decided against {prior_source}, which was not filed in the end: the next load decides it again",
    )


def copied_other_bytes(expected: str, copied: str) -> bool:
    """The store says it copied other bytes than those examined (checksum `expected`).

    Only two plain MD5s are compared: a multipart ETag ('<md5>-<parts>') depends on how an object was uploaded,
    not only on its bytes, and '' means the store gave no checksum; neither proves a change.
    """
    return _is_md5(expected) and _is_md5(copied) and expected.lower() != copied.lower()


def _is_md5(checksum: str) -> bool:
    return len(checksum) == 32 and all(c in "0123456789abcdef" for c in checksum.lower())


def placed(base: RawRow, status: str, dest: str, rebuilding: bool) -> RawRow:
    """The outcome once placing at `dest` answered `status` (one of PLACE_STATUSES).

    Other bytes already at `dest` are a conflict; in a rebuild, an object the store does not hold is not
    recorded (UNFILED); nor is a raw object whose bytes changed between its examination and its copy (the
    next run examines it afresh); otherwise (created, or already there with the same bytes) it is filed.
    """
    if status == "changed":
        return replace(base, outcome=Outcome.UNFILED, reason=CHANGED_WHILE_FILING)
    if status == "different":
        return replace(base, outcome=Outcome.CONFLICT, dest=dest, reason=f"{dest} exists with different content")
    if status == "absent" and rebuilding:
        return replace(base, outcome=Outcome.UNFILED)
    return replace(base, outcome=Outcome.FILED, dest=dest, reason="")


def unexpected(exc: BaseException) -> str:
    """The reason recorded for an object whose examination failed in a way no rule foresaw (defence in depth).

    It names the exception's type and where it was raised (file and line), never its message: a message may
    quote a value of the object, and reasons are kept centrally (catalog, load reports, the portal's queues).
    """
    frames = traceback.extract_tb(exc.__traceback__) if exc.__traceback__ is not None else []
    where = f" in {os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else ""
    return f"could not be read: unexpected {type(exc).__name__}{where}"
