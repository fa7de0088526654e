"""The NCCID clinical templates (COVID-19 positive v1.5 and negative status), as XLSX or CSV.

Every row is validated: the NHS/CHI number, required fields, dates in the template's format (positive
MM/DD/YYYY, negative SwabDate DD/MM/YYYY), codes in their ranges, duplicate people, and the Hospital column
(rows of another hospital than this site's are held). Errors name the row and column with the reason; invalid
rows are held back while valid rows proceed (strict mode refuses the sheet). Valid rows become clinical JSON
with the template's field names, the pseudonym in place of the NHS number, and the hospital number dropped:
identifiers stay at the hospital. Known header typos are recognised.

Values whose meaning is unambiguous are accepted and converted, each with a warning naming the row, the column,
the value read and the value written: `F`/`M` (or Female/Male) in the Sex column, a date whose template reading
is impossible but whose other reading is valid (15/04/2020 in an MM/DD column is 15 April), an ISO date.
Nothing is guessed where two readings are possible: 04/05/2020 stays the template's reading.

Every date field in the clinical JSON is written as ISO YYYY-MM-DD (once a date is JSON, only ISO says which
number is the month).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import math
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

from nccid.errors import SheetError, UsageError
from nccid.site.identifiers import IdentifierError, validate_patient_number
from nccid.site.outbox import Outbox
from nccid.site.pseudonymiser import Pseudonymiser

NHS_COLUMN = "NHS/CHI Number"
HOSPITAL_NUMBER = "Hospital (Internal) Number"
#: column header -> clinical JSON field name (where they differ)
RENAMED = {
    "Sex (Male = 1, Female = 0)": "Sex",
    "Smoking status (Never = 0, Ex-smoker = 1, Current = 2, Unknown = 3)": "Smoking status",
}
POSITIVE_DATES = [
    "Date of Positive Covid Swab",
    "Date of acquisition of 1st RT-PCR",
    "Date of acquisition of 2nd RT-PCR",
    "Date of result of 1st RT-PCR",
    "Date of result of 2nd RT-PCR",
    "Date of admission",
    "Date of ITU admission",
    "Date of intubation",
    "Date of 1st CXR",
    "Date of 2nd CXR",
    "Date last known alive",
    "Date of death",
]
#: field -> allowed codes (inclusive range)
CODES: dict[str, tuple[int, int]] = {
    "Sex": (0, 1),
    "Smoking status": (0, 3),
    "PMH hypertension": (0, 2),
    "PMH CKD": (0, 2),
    "If CKD, stage": (2, 5),
    "PMH CVS disease": (0, 4),
    "PMH Lung disease": (0, 6),
    "PMH diabetes mellitus type II": (0, 2),
    "Current ACEi use": (0, 2),
    "Current Angiotension receptor blocker use": (0, 2),
    "Current NSAID used": (0, 2),
    "NEWS2 score on arrival": (0, 17),
    "APACHE score on ITU arrival": (0, 71),
    "1st RT-PCR result": (0, 1),
    "2nd RT-PCR result": (0, 1),
    "Final COVID Status": (0, 1),
    "CXR severity": (1, 3),
    "CXR severity 2": (1, 3),
    "COVID CODE": (0, 3),
    "COVID CODE 2": (0, 3),
    "ITU admission": (0, 1),
    "Intubation": (0, 1),
    "Death": (0, 1),
    "Age": (0, 120),
    "SwabStatus": (0, 1),
}
#: the identifying and demographic columns both templates start with
COMMON_COLUMNS = [NHS_COLUMN, HOSPITAL_NUMBER, "Hospital", "Age", "Sex (Male = 1, Female = 0)", "Ethnicity"]
POSITIVE_COLUMNS = [
    *COMMON_COLUMNS,
    "Smoking status (Never = 0, Ex-smoker = 1, Current = 2, Unknown = 3)",
    "Pack year history",
    *POSITIVE_DATES,
    "PMH hypertension",
    "PMH CKD",
    "If CKD, stage",
    "PMH CVS disease",
    "PMH Lung disease",
    "PMH diabetes mellitus type II",
    "Current ACEi use",
    "Current Angiotension receptor blocker use",
    "Current NSAID used",
    "Duration of symptoms",
    "Respiratory rate on admission",
    "Heart rate on admission",
    "FiO2",
    "O2 saturation",
    "PaO2",
    "Systolic BP",
    "Diastolic BP",
    "Temperature on admission",
    "NEWS2 score on arrival",
    "WCC on admission",
    "Lymphocyte count on admission",
    "Platelet count on admission",
    "CRP on admission",
    "D-dimer on admission",
    "Fibrinogen  if d-dimer not performed",
    "Ferritin",
    "Urea on admission",
    "Creatinine on admission",
    "Troponin I",
    "Troponin T",
    "APACHE score on ITU arrival",
    "1st RT-PCR result",
    "2nd RT-PCR result",
    "Final COVID Status",
    "CXR severity",
    "CXR severity 2",
    "COVID CODE",
    "COVID CODE 2",
    "ITU admission",
    "Intubation",
    "Death",
]
NEGATIVE_COLUMNS = [*COMMON_COLUMNS, "SwabStatus", "SwabDate"]
TEMPLATES = {
    "positive": {
        "columns": POSITIVE_COLUMNS,
        "dates": POSITIVE_DATES,
        "date_format": "%m/%d/%Y",
        "required": [NHS_COLUMN, "Hospital", "Age", "Sex", "Date of Positive Covid Swab"],
        "kind": "data",
    },
    "negative": {
        "columns": NEGATIVE_COLUMNS,
        "dates": ["SwabDate"],
        "date_format": "%d/%m/%Y",
        "required": [NHS_COLUMN, "SwabStatus", "SwabDate"],
        "kind": "status",
    },
}
#: header typos seen in real sheets -> the field they mean
TYPOS = {"pmhh1pertension": "PMH hypertension", "cxrseverity3": "CXR severity 2"}


def _key(header: str) -> str:
    return re.sub(r"[^a-z0-9]", "", header.lower())


def field_of(header: str) -> str | None:
    """The JSON field a sheet header means, forgiving case, spacing and known typos."""
    wanted = _key(header)
    if wanted in TYPOS:
        return TYPOS[wanted]
    for column in POSITIVE_COLUMNS + NEGATIVE_COLUMNS:
        if _key(column) == wanted or _key(RENAMED.get(column, column)) == wanted:
            return RENAMED.get(column, column)
    return None


@dataclass(frozen=True)
class CellError:
    """One bad cell, by spreadsheet row and column, with the reason a data manager can act on."""

    row: int  # as the spreadsheet numbers it (the header is row 1)
    column: str
    reason: str

    def __str__(self) -> str:
        return f"row {self.row}, column {self.column!r}: {self.reason}"


@dataclass
class SheetResult:
    """A sheet checked: valid rows as records (NHS number kept apart), errors by cell, held rows, warnings and
    every conversion made."""

    records: list[tuple[int, str, dict]] = field(default_factory=list)  # (row, NHS number, record without it)
    errors: list[CellError] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    held_rows: set[int] = field(default_factory=set)
    conversions: list[Conversion] = field(default_factory=list)  # also in `warnings`, as text


#: text encodings tried, in order, for a CSV: UTF-8 (with or without BOM), then what Excel on Windows writes
CSV_ENCODINGS = ("utf-8-sig", "cp1252", "latin-1")


def read_rows(path: str | Path) -> list[list[object]]:
    """All rows of the first sheet of an XLSX, or of a CSV (UTF-8, else Windows-1252/Latin-1 as Excel saves
    it), as values. Raises SheetError naming the file (missing, not a workbook, binary, not CSV text)."""
    path = Path(path)
    if not path.is_file():
        raise SheetError(f"{path.name}: no such file" if not path.exists() else f"{path.name}: not a file")
    if path.suffix.lower() in (".xlsx", ".xlsm"):
        return _read_xlsx(path)
    data = path.read_bytes()
    if data.startswith(b"PK\x03\x04"):
        raise SheetError(f"{path.name}: this is an XLSX workbook saved under another name; rename it .xlsx")
    if b"\x00" in data:
        raise SheetError(f"{path.name}: binary data, not a CSV text file; save the sheet as CSV or XLSX")
    text = _decode(data, path.name)
    try:
        return [list(r) for r in csv.reader(io.StringIO(text, newline=""))]
    except csv.Error as exc:
        raise SheetError(f"{path.name}: not a readable CSV file ({exc})") from exc


def _decode(data: bytes, name: str) -> str:
    for encoding in CSV_ENCODINGS:
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            continue
    raise SheetError(f"{name}: unknown text encoding; save the sheet as CSV UTF-8 or XLSX")  # pragma: no cover


def _read_xlsx(path: Path) -> list[list[object]]:
    import zipfile

    import openpyxl
    from openpyxl.utils.exceptions import InvalidFileException

    try:
        book = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except (zipfile.BadZipFile, InvalidFileException, KeyError, OSError, ValueError) as exc:
        raise SheetError(f"{path.name}: not a readable XLSX workbook ({type(exc).__name__})") from exc
    try:
        if not book.worksheets:
            raise SheetError(f"{path.name}: the workbook has no sheet")
        return [list(r) for r in book.worksheets[0].iter_rows(values_only=True)]
    finally:
        book.close()


def _blank(value: object) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


_OTHER_ORDER = {"%m/%d/%Y": "%d/%m/%Y", "%d/%m/%Y": "%m/%d/%Y"}
_READABLE = {"%m/%d/%Y": "MM/DD/YYYY", "%d/%m/%Y": "DD/MM/YYYY"}
#: letter codes whose meaning is unambiguous, per field: text (upper case) -> code
LETTER_CODES = {"Sex": {"F": 0, "FEMALE": 0, "M": 1, "MALE": 1}}
AGE_CAP = 90


def read_date(value: object, fmt: str) -> tuple[str, str]:
    """A sheet's date as ISO YYYY-MM-DD, and why it was converted ('' when read in the template's format).

    Accepted besides the template's format `fmt`: a date cell, an ISO date, and the other day/month order when
    the template's reading is impossible (month 15) and the other reading is a real date. Raises ValueError where
    neither reading is a date; never guesses between two possible readings.
    """
    if isinstance(value, dt.datetime | dt.date):
        return value.strftime("%Y-%m-%d"), ""
    text = str(value).strip()
    try:
        return dt.datetime.strptime(text, fmt).strftime("%Y-%m-%d"), ""
    except ValueError:
        pass
    if re.fullmatch(r"\d{4}-\d{1,2}-\d{1,2}", text):
        return dt.datetime.strptime(text, "%Y-%m-%d").strftime("%Y-%m-%d"), "an ISO date"
    other = _OTHER_ORDER.get(fmt)
    if other is not None:
        swapped = dt.datetime.strptime(text, other)  # ValueError if this reading is impossible too
        return swapped.strftime("%Y-%m-%d"), f"read as {_READABLE[other]}: as {_READABLE[fmt]} it is no date"
    raise ValueError(text)


def read_code(value: object, name: str, low: int, high: int) -> tuple[int, str]:
    """A coded value as its integer code, and why it was converted ('' when it was the code itself). Raises
    ValueError for anything else."""
    letters = LETTER_CODES.get(name, {})
    if isinstance(value, str) and value.strip().upper() in letters:
        return letters[value.strip().upper()], f"the letter code of {name}"
    number = float(str(value))
    if not math.isfinite(number) or number != int(number) or not low <= number <= high:
        raise ValueError(value)  # inf, 1e400 and nan included: int() of them would raise OverflowError
    code = int(number)
    return code, ""


def hospital_key(name: object) -> str:
    """A hospital's name compared forgiving case, spacing and punctuation."""
    return re.sub(r"[^a-z0-9]", "", str(name or "").lower())


@dataclass(frozen=True)
class Conversion:
    """An unambiguous value the validator accepted and converted (reported as a warning)."""

    row: int
    column: str  # as the sheet heads it
    read: object
    wrote: object
    why: str

    def __str__(self) -> str:
        return f"row {self.row}, column {self.column!r}: read {self.read!r}, wrote {self.wrote!r} ({self.why})"


def validate_sheet(
    rows: list[list[object]],
    template: str,
    *,
    hospitals: Collection[str] | None = None,
    age_policy: str = "keep",
) -> SheetResult:
    """Validate a sheet's rows (the header first) against `template` (positive or negative), so a site sees
    every problem of a sheet at once rather than one at a time. Pure: nothing is read or written.

    Returns a SheetResult: valid rows as records with dates in ISO form, errors by row and column (their rows
    held), warnings for left-out columns, known header typos and every conversion. With `hospitals` (this
    site's hospital names), a row whose Hospital names another hospital is held with the reason; a blank
    Hospital is this site's. `age_policy` `cap` writes ages over 89 as 90 (with a warning).
    Bad cells never raise; an unknown `template` raises KeyError (callers check it with `check_template`).
    """
    spec = TEMPLATES[template]
    result = SheetResult()
    if not rows:
        result.errors.append(CellError(1, "(header)", "the sheet is empty"))
        return result
    headers = [str(h or "").strip() for h in rows[0]]
    fields = [field_of(h) if h != NHS_COLUMN and _key(h) != _key(HOSPITAL_NUMBER) else h for h in headers]
    header_of = {name: header for header, name in zip(headers, fields, strict=True) if name}
    for header, name in zip(headers, fields, strict=True):
        if name is None and header:
            result.warnings.append(f"column {header!r} is not a template field and is left out")
        elif name and _key(header) in TYPOS:
            result.warnings.append(f"column {header!r} read as {name!r} (a known header typo)")
    if NHS_COLUMN not in fields:
        result.errors.append(CellError(1, NHS_COLUMN, "the sheet has no NHS/CHI Number column"))
        return result
    ours = {hospital_key(h) for h in hospitals} if hospitals is not None else None
    seen: dict[str, int] = {}
    for number, row in enumerate(rows[1:], start=2):
        if all(_blank(v) for v in row):
            continue
        cells = {name: value for name, value in zip(fields, row, strict=False) if name}
        errors: list[CellError] = []
        conversions: list[Conversion] = []
        for required in spec["required"]:
            if _blank(cells.get(required)):
                errors.append(CellError(number, required, "required value is missing"))
        hospital = cells.get("Hospital")
        if ours is not None and not _blank(hospital) and hospital_key(hospital) not in ours:
            errors.append(
                CellError(
                    number,
                    "Hospital",
                    f"{str(hospital).strip()!r} is not this site's hospital: held (if it is yours, add it to the "
                    "site's hospital names)",
                )
            )
        nhs = ""
        if not _blank(cells.get(NHS_COLUMN)):
            try:
                nhs = validate_patient_number(str(cells[NHS_COLUMN]).split(".")[0])
            except IdentifierError as exc:
                errors.append(CellError(number, NHS_COLUMN, str(exc)))
        record: dict[str, object] = {}
        for name, value in cells.items():
            if name in (NHS_COLUMN, HOSPITAL_NUMBER) or _blank(value):
                continue
            written: object = value
            why = ""
            if name in spec["dates"]:
                try:
                    written, why = read_date(value, spec["date_format"])
                except ValueError:
                    readable = _READABLE[spec["date_format"]]
                    errors.append(CellError(number, name, f"{value!r} is not a date in the template's {readable}"))
                    continue
            elif name in CODES:
                low, high = CODES[name]
                try:
                    written, why = read_code(value, name, low, high)
                except ValueError:
                    errors.append(CellError(number, name, f"{value!r} is not a code from {low} to {high}"))
                    continue
                if name == "Age" and age_policy == "cap" and written > AGE_CAP - 1:
                    written, why = AGE_CAP, "ages over 89 are written as 90: this site's setting"
            elif isinstance(value, float) and value.is_integer():
                written = int(value)
            if why and written != value:
                conversions.append(Conversion(number, header_of.get(name, name), value, written, why))
            record[name] = written
        if nhs:
            if nhs in seen:
                errors.append(CellError(number, NHS_COLUMN, f"the same person as row {seen[nhs]} (duplicate row)"))
            else:
                seen[nhs] = number
        if errors:
            result.errors.extend(errors)
            result.held_rows.add(number)
        else:
            result.records.append((number, nhs, record))
            result.conversions += conversions
            result.warnings += [str(c) for c in conversions]
    return result


def to_clinical_json(result: SheetResult, *, centre: str, pseudonymise: Callable[[list[str]], list[str]]) -> list[dict]:
    """Valid rows as clinical records: `Pseudonym` and `SubmittingCentre` first, then the template's fields."""
    pseudonyms = pseudonymise([nhs for _, nhs, _ in result.records])
    return [
        {"Pseudonym": p, "SubmittingCentre": centre, **record}
        for p, (_, _, record) in zip(pseudonyms, result.records, strict=True)
    ]


def check_template(template: str) -> dict:
    """The template's specification; UsageError for an unknown name."""
    if template not in TEMPLATES:
        raise UsageError(f"template {template!r} is not one of: {', '.join(TEMPLATES)}")
    return TEMPLATES[template]


def blank_template(template: str, path: str | Path) -> Path:
    """An empty sheet with the template's headers, as XLSX or CSV by the file's extension. Raises UsageError
    for an unknown template or any other extension (a .txt would get CSV text it does not announce)."""
    path = Path(path)
    columns = check_template(template)["columns"]
    if path.suffix.lower() not in (".xlsx", ".csv"):
        raise UsageError(
            f"{path.name}: a template is written as .xlsx or .csv, not {path.suffix or 'a name without extension'}"
        )
    if path.suffix.lower() == ".xlsx":
        import openpyxl

        book = openpyxl.Workbook()
        sheet = book.active
        sheet.title = f"COVID-19 {template}"
        sheet.append(columns)
        book.save(path)
    else:
        buffer = io.StringIO()
        csv.writer(buffer).writerow(columns)
        path.write_text(buffer.getvalue(), encoding="utf-8")
    return path


@dataclass
class FiledSheet:
    """What filing a sheet did: its check result, the clinical JSON files written, and held images released."""

    result: SheetResult
    written: list[Path]
    released: int  # held images of these patients moved to images/


def file_sheet(
    sheet: str | Path,
    outbox: str | Path,
    pseudonymiser: Pseudonymiser,
    *,
    template: str,
    centre: str,
    aliases: Collection[str] = (),
    strict: bool = False,
) -> FiledSheet:
    """File a filled clinical sheet at the site: validate it, then write valid rows to the outbox as
    data/<Pseudonym>_{data,status}.json labelled with `centre` (NHS numbers replaced by pseudonyms, so they
    never leave the site), and release images held for those patients. Rows whose Hospital is neither `centre`
    nor one of this site's hospitals (`aliases`, and the outbox settings' `hospitals`) are held. The site's age
    policy comes from the outbox's settings. With `strict`, any invalid row means nothing is written; a sheet
    with no valid row writes nothing either.

    Returns a FiledSheet (the check result, files written, images released). Raises SheetError if the sheet
    cannot be read and UsageError for an unknown template."""
    spec = check_template(template)
    box = Outbox(outbox)
    settings = box.settings()
    hospitals = [centre, *settings.hospitals, *aliases]
    result = validate_sheet(read_rows(sheet), template, hospitals=hospitals, age_policy=settings.ages_over_89)
    if result.errors and (strict or not result.records):
        return FiledSheet(result, [], 0)
    written = [
        box.add_record(record, spec["kind"])
        for record in to_clinical_json(result, centre=centre, pseudonymise=pseudonymiser.of_numbers)
    ]
    return FiledSheet(result, written, box.release())
