"""The ISARIC linkage template: which NCCID patient is which ISARIC-CCP study subject.

ISARIC's Clinical Characterisation Protocol (CCP-UK) gave every enrolled patient a subject ID. A site that
enrolled patients uploads this sheet so that an approved linkage project can join NCCID images to ISARIC's
clinical data. The link is kept in the linkage vault (ciphertext <-> pseudonym <-> external ID), never in the
research warehouse; `nccid vault link-export --dataset isaric --project P` hands an approved project the
(pseudonym, subject ID) table, audited like a reveal.

Columns (header row 1; case, spacing and punctuation are forgiven):

| column | required | what |
|---|---|---|
| `NHS/CHI Number` | yes | 10 digits, modulus-11 valid; encrypted at once, never stored |
| `Hospital (Internal) Number` | no | ignored and never stored (allowed so the site's usual extract fits) |
| `ISARIC-CCP Subject ID` | yes | CCP-UK subject ID: site code (3-8 capitals or digits), '-', 4 digits: `RYJ01-0042` |
| `Date of enrolment` | no | YYYY-MM-DD or DD/MM/YYYY, checked and kept with the link |

Rows are validated one by one; each error names the spreadsheet row and the column with the reason (never the
value of an identifier). The same person twice in one sheet is an error on the second row.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from nccid.errors import IdentifierError
from nccid.site.identifiers import validate_patient_number
from nccid.site.templates import CellError

NHS_COLUMN = "NHS/CHI Number"
HOSPITAL_NUMBER = "Hospital (Internal) Number"
SUBJECT_COLUMN = "ISARIC-CCP Subject ID"
ENROLMENT_COLUMN = "Date of enrolment"
ISARIC_COLUMNS = [NHS_COLUMN, HOSPITAL_NUMBER, SUBJECT_COLUMN, ENROLMENT_COLUMN]
DATASET = "isaric"
SUBJECT_ID = re.compile(r"[A-Z0-9]{3,8}-[0-9]{4}")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _key(header: object) -> str:
    return re.sub(r"[^a-z0-9]", "", str(header or "").lower())


@dataclass
class IsaricSheet:
    """An ISARIC linkage sheet checked: the valid (NHS number, subject ID) links with their rows, the rows held
    and why, and warnings."""

    links: list[tuple[int, str, str, str]] = field(default_factory=list)  # (row, NHS number, subject ID, date)
    errors: list[CellError] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    held_rows: set[int] = field(default_factory=set)


def _enrolment(value: object) -> str:
    if isinstance(value, dt.datetime | dt.date):
        return value.strftime("%Y-%m-%d")
    text = str(value).strip()
    for fmt in ("%Y-%m-%d", "%d/%m/%Y"):
        try:
            return dt.datetime.strptime(text, fmt).strftime("%Y-%m-%d")
        except ValueError:
            continue
    raise ValueError(text)


def validate_isaric(rows: Sequence[Sequence[object]]) -> IsaricSheet:
    """Check an ISARIC sheet given as rows of values; valid rows are returned with the normalised NHS
    number (for encryption at once, never to be stored), the subject ID and the enrolment date ('')."""
    sheet = IsaricSheet()
    if not rows:
        sheet.errors.append(CellError(1, "(header)", "the sheet is empty"))
        return sheet
    wanted = {_key(c): c for c in ISARIC_COLUMNS}
    columns = [wanted.get(_key(h)) for h in rows[0]]
    for header, column in zip(rows[0], columns, strict=True):
        if column is None and str(header or "").strip():
            sheet.warnings.append(f"column {str(header).strip()!r} is not an ISARIC template column and is left out")
    for required in (NHS_COLUMN, SUBJECT_COLUMN):
        if required not in columns:
            sheet.errors.append(CellError(1, required, "the sheet has no such column"))
    if sheet.errors:
        return sheet
    seen: dict[str, int] = {}
    for number, row in enumerate(rows[1:], start=2):
        cells = {c: v for c, v in zip(columns, row, strict=False) if c and v is not None and str(v).strip()}
        if not cells:
            continue
        errors = []
        nhs = subject = enrolled = ""
        if NHS_COLUMN not in cells:
            errors.append(CellError(number, NHS_COLUMN, "required value is missing"))
        else:
            try:
                nhs = validate_patient_number(str(cells[NHS_COLUMN]).split(".")[0])
            except IdentifierError as exc:
                errors.append(CellError(number, NHS_COLUMN, str(exc)))
        if SUBJECT_COLUMN not in cells:
            errors.append(CellError(number, SUBJECT_COLUMN, "required value is missing"))
        else:
            subject = str(cells[SUBJECT_COLUMN]).strip().upper()
            if not SUBJECT_ID.fullmatch(subject):
                errors.append(CellError(number, SUBJECT_COLUMN, "not a CCP-UK subject ID like RYJ01-0042"))
        if ENROLMENT_COLUMN in cells:
            try:
                enrolled = _enrolment(cells[ENROLMENT_COLUMN])
            except ValueError:
                errors.append(CellError(number, ENROLMENT_COLUMN, "not a date as YYYY-MM-DD or DD/MM/YYYY"))
        if nhs and not errors:
            if nhs in seen:
                errors.append(CellError(number, NHS_COLUMN, f"the same person as row {seen[nhs]} (duplicate row)"))
            else:
                seen[nhs] = number
        if errors:
            sheet.errors.extend(errors)
            sheet.held_rows.add(number)
        else:
            sheet.links.append((number, nhs, subject, enrolled))
    return sheet


def safe_cell(value: object) -> object:
    """A cell value that a spreadsheet will not run as a formula: text starting with = + - @ or a tab gets a
    leading apostrophe (OWASP's advice against CSV injection). Numbers pass unchanged."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def to_csv(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """CSV text with every cell neutralised by `safe_cell`: what any export handed to people goes through."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([safe_cell(h) for h in header])
    for row in rows:
        writer.writerow([safe_cell(v) for v in row])
    return buffer.getvalue()
