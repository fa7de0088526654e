"""Uploaded sheets: read from memory (never written to disk), refused with a message when malformed or a zip
bomb, validated by the same validator as `nccid site clinical`, pseudonymised through the vault, and filed as
clinical JSON in the site's raw prefix (or, for ISARIC, kept as links in the vault).

The bytes of a sheet live only in this process's memory for the length of one request; NHS/CHI and hospital
numbers are encrypted (and looked up in the vault) at once and never written, logged or returned.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import inspect
import io
import json
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field

from nccid.errors import SheetError
from nccid.portal.accounts import PortalDB, Site
from nccid.site import isaric, templates
from nccid.site.vault import PseudonymKey, Vault
from nccid.store import ObjectStore

TEMPLATE_NAMES = {
    "positive": "COVID-19 positive (v1.5)",
    "negative": "COVID-19 status (negative)",
    "isaric": "ISARIC-CCP linkage",
}
MAX_ROWS = 20_000
MAX_COLUMNS = 200
MAX_UNZIPPED = 64 * 1024 * 1024  # all parts of an XLSX together, uncompressed
MAX_ZIP_ENTRIES = 1_000
MAX_RATIO = 100  # uncompressed / compressed for any sizeable part: more is a zip bomb


@dataclass
class UploadOutcome:
    """What one sheet upload through the portal did: rows accepted and held (with row-level errors for this
    answer only), clinical records written or unchanged, and ISARIC links made."""

    template: str
    accepted: int = 0
    held_rows: int = 0
    errors: list[tuple[int, str, str]] = field(default_factory=list)  # (row, column, reason), this response only
    warnings: list[str] = field(default_factory=list)
    written: int = 0  # clinical JSON files written to the raw prefix
    unchanged: int = 0  # the same record was uploaded before: not written again
    linked: dict[str, int] = field(default_factory=dict)  # ISARIC: added / unchanged / changed links
    upload_date: str = ""
    prefix: str = ""


def read_sheet_bytes(data: bytes, filename: str) -> list[list[object]]:
    """The rows of the first worksheet of an XLSX, or of a CSV, parsed from memory. Raises SheetError (one
    line, naming neither the file nor any value) for anything else, a zip bomb, or a sheet too large."""
    name = filename.lower()
    if data[:4] == b"PK\x03\x04" or name.endswith((".xlsx", ".xlsm")):
        return _xlsx_rows(data)
    if name.endswith(".csv") or not name:
        return _csv_rows(data)
    raise SheetError("the uploaded file is neither .xlsx nor .csv: save the template as one of them")


def _check_zip(data: bytes) -> None:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise SheetError("the uploaded file is not a readable XLSX workbook (damaged or another format)") from exc
    with archive:
        entries = archive.infolist()
        if len(entries) > MAX_ZIP_ENTRIES:
            raise SheetError(f"the uploaded workbook has {len(entries)} parts: refused (at most {MAX_ZIP_ENTRIES})")
        total = sum(e.file_size for e in entries)
        if total > MAX_UNZIPPED:
            raise SheetError(
                f"the uploaded workbook unpacks to {total // (1024 * 1024)} MiB: refused as a possible zip bomb"
            )
        for entry in entries:
            if entry.file_size > 1024 * 1024 and entry.file_size > MAX_RATIO * max(entry.compress_size, 1):
                raise SheetError("the uploaded workbook is compressed more than any real sheet: refused as a zip bomb")
        if "xl/workbook.xml" not in archive.namelist():
            raise SheetError("the uploaded file is a zip archive but not an XLSX workbook")


def _xlsx_rows(data: bytes) -> list[list[object]]:
    _check_zip(data)
    import openpyxl

    try:
        book = openpyxl.load_workbook(io.BytesIO(data), read_only=True, data_only=True)
    except Exception as exc:  # openpyxl raises many kinds for damaged parts
        raise SheetError(
            f"the uploaded workbook cannot be read ({type(exc).__name__}): save it again as .xlsx"
        ) from exc
    try:
        if not book.worksheets:
            raise SheetError("the uploaded workbook has no worksheet")
        rows: list[list[object]] = []
        for row in book.worksheets[0].iter_rows(values_only=True):
            if len(rows) >= MAX_ROWS + 1:
                raise SheetError(f"the uploaded sheet has more than {MAX_ROWS} rows: split it into several uploads")
            rows.append(list(row[:MAX_COLUMNS]))
        return rows
    except SheetError:
        raise
    except Exception as exc:
        raise SheetError(
            f"the uploaded workbook cannot be read ({type(exc).__name__}): save it again as .xlsx"
        ) from exc
    finally:
        book.close()


def _csv_rows(data: bytes) -> list[list[object]]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SheetError(f"the uploaded CSV is not UTF-8 text (byte {exc.start}): save it as 'CSV UTF-8'") from exc
    if "\x00" in text:
        raise SheetError("the uploaded CSV contains binary data: save the template as 'CSV UTF-8'")
    rows: list[list[object]] = []
    try:
        for row in csv.reader(io.StringIO(text, newline="")):
            if len(rows) >= MAX_ROWS + 1:
                raise SheetError(f"the uploaded sheet has more than {MAX_ROWS} rows: split it into several uploads")
            rows.append(list(row[:MAX_COLUMNS]))
    except csv.Error as exc:
        raise SheetError(f"the uploaded CSV cannot be read at line {len(rows) + 1}: {exc}") from exc
    return rows


def validate_clinical(rows: list[list[object]], template: str, site: Site) -> templates.SheetResult:
    """The same validator as `nccid site clinical` (nccid.site.templates.validate_sheet), with the same list of
    this site's hospitals: its centre, its other SubmittingCentre spellings and the hospital names configured
    for it (rows naming another hospital are held)."""
    parameters = inspect.signature(templates.validate_sheet).parameters
    extra = {"hospitals": [site.name, *site.hospitals, *site.aliases]} if "hospitals" in parameters else {}
    return templates.validate_sheet(rows, template, **extra)


def file_upload(
    rows: list[list[object]],
    template: str,
    site: Site,
    *,
    store: ObjectStore,
    db: PortalDB,
    vault: Vault,
    key: PseudonymKey,
    username: str,
    today: Callable[[], dt.date] = lambda: dt.datetime.now(dt.UTC).date(),
) -> UploadOutcome:
    """Validate and file one uploaded sheet for `site`; returns what happened (errors by row and column)."""
    if template not in TEMPLATE_NAMES:
        raise SheetError(f"unknown template {template!r}: one of {', '.join(TEMPLATE_NAMES)}")
    outcome = UploadOutcome(template, upload_date=today().isoformat(), prefix=site.prefix)

    def pseudonymise(numbers: list[str]) -> list[str]:
        return vault.issue([key.encrypt(n) for n in numbers], actor=f"portal:{username}")

    if template == "isaric":
        sheet = isaric.validate_isaric(rows)
        outcome.errors = [(e.row, e.column, e.reason) for e in sheet.errors]
        outcome.warnings = list(sheet.warnings)
        outcome.held_rows = len(sheet.held_rows)
        pseudonyms = pseudonymise([nhs for _, nhs, _, _ in sheet.links])
        outcome.linked = vault.link(
            isaric.DATASET,
            [(p, subject, enrolled) for p, (_, _, subject, enrolled) in zip(pseudonyms, sheet.links, strict=True)],
            actor=f"portal:{username}",
        )
        outcome.accepted = len(sheet.links)
    else:
        result = validate_clinical(rows, template, site)
        outcome.errors = [(e.row, e.column, e.reason) for e in result.errors]
        outcome.warnings = list(result.warnings)
        outcome.held_rows = len(result.held_rows)
        records = templates.to_clinical_json(result, centre=site.name, pseudonymise=pseudonymise)
        kind = templates.TEMPLATES[template]["kind"]
        for record in records:
            body = (json.dumps(record, indent=1) + "\n").encode()
            record_digest = hashlib.sha256(body).hexdigest()
            if db.known_record(site.uploader, record["Pseudonym"], kind, record_digest):
                outcome.unchanged += 1
                continue
            key_name = f"{site.prefix}{outcome.upload_date}/data/{record['Pseudonym']}_{kind}.json"
            store.write(key_name, body)
            db.remember_record(site.uploader, record["Pseudonym"], kind, record_digest, key_name)
            outcome.written += 1
        outcome.accepted = len(records)
    db.record_upload(
        site.uploader,
        username,
        template,
        outcome.accepted,
        outcome.held_rows,
        outcome.written,
        outcome.unchanged,
        outcome.upload_date,
    )
    db.audit(
        username,
        "upload",
        f"{template} sheet for {site.uploader}: {outcome.accepted} row(s) accepted, {outcome.held_rows} held, "
        f"{outcome.written} written, {outcome.unchanged} unchanged",
    )
    return outcome


def template_bytes(template: str, fmt: str) -> bytes:
    """A blank template (headers only) as XLSX or CSV, built in memory."""
    columns = isaric.ISARIC_COLUMNS if template == "isaric" else templates.TEMPLATES[template]["columns"]
    if fmt == "csv":
        return isaric.to_csv(columns, []).encode("utf-8")
    import openpyxl

    book = openpyxl.Workbook()
    sheet = book.active
    sheet.title = TEMPLATE_NAMES[template][:31].replace("(", "").replace(")", "")
    sheet.append([isaric.safe_cell(c) for c in columns])
    buffer = io.BytesIO()
    book.save(buffer)
    return buffer.getvalue()
