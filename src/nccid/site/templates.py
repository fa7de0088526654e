"""The NCCID clinical templates (COVID-19 positive v1.5 and negative status), as XLSX or CSV.

Every row is validated: the NHS/CHI number, required fields, dates in the template's format (positive
MM/DD/YYYY, negative SwabDate DD/MM/YYYY), codes in their ranges, duplicate people. Errors name the row and
column with the reason; invalid rows are held back while valid rows proceed (strict mode refuses the sheet).
Valid rows become clinical JSON with the template's field names, the pseudonym in place of the NHS number,
and the hospital number dropped: identifiers stay at the hospital. Known header typos are recognised.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from nccid.site.identifiers import IdentifierError, validate_patient_number

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
    row: int  # as the spreadsheet numbers it (the header is row 1)
    column: str
    reason: str

    def __str__(self) -> str:
        return f"row {self.row}, column {self.column!r}: {self.reason}"


@dataclass
class SheetResult:
    records: list[tuple[int, str, dict]] = field(default_factory=list)  # (row, NHS number, record without it)
    errors: list[CellError] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    held_rows: set[int] = field(default_factory=set)


def read_rows(path: str | Path) -> list[list[object]]:
    """All rows of the first sheet of an XLSX, or of a CSV, as values."""
    path = Path(path)
    if path.suffix.lower() in (".xlsx", ".xlsm"):
        import openpyxl

        book = openpyxl.load_workbook(path, read_only=True, data_only=True)
        rows = [list(r) for r in book.worksheets[0].iter_rows(values_only=True)]
        book.close()
        return rows
    with open(path, newline="", encoding="utf-8-sig") as handle:
        return [list(r) for r in csv.reader(handle)]


def _blank(value: object) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _date(value: object, fmt: str) -> str:
    if isinstance(value, dt.datetime | dt.date):
        return value.strftime(fmt)
    return dt.datetime.strptime(str(value).strip(), fmt).strftime(fmt)


def validate_sheet(rows: list[list[object]], template: str) -> SheetResult:
    spec = TEMPLATES[template]
    result = SheetResult()
    if not rows:
        result.errors.append(CellError(1, "(header)", "the sheet is empty"))
        return result
    headers = [str(h or "").strip() for h in rows[0]]
    fields = [field_of(h) if h != NHS_COLUMN and _key(h) != _key(HOSPITAL_NUMBER) else h for h in headers]
    for header, name in zip(headers, fields, strict=True):
        if name is None and header:
            result.warnings.append(f"column {header!r} is not a template field and is left out")
        elif name and _key(header) in TYPOS:
            result.warnings.append(f"column {header!r} read as {name!r} (a known header typo)")
    if NHS_COLUMN not in fields:
        result.errors.append(CellError(1, NHS_COLUMN, "the sheet has no NHS/CHI Number column"))
        return result
    seen: dict[str, int] = {}
    for number, row in enumerate(rows[1:], start=2):
        if all(_blank(v) for v in row):
            continue
        cells = {name: value for name, value in zip(fields, row, strict=False) if name}
        errors: list[CellError] = []
        for required in spec["required"]:
            if _blank(cells.get(required)):
                errors.append(CellError(number, required, "required value is missing"))
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
            if name in spec["dates"]:
                try:
                    value = _date(value, spec["date_format"])
                except ValueError:
                    readable = spec["date_format"].replace("%m", "MM").replace("%d", "DD").replace("%Y", "YYYY")
                    errors.append(CellError(number, name, f"{value!r} is not a date in the template's {readable}"))
                    continue
            elif name in CODES:
                low, high = CODES[name]
                try:
                    code = int(float(str(value)))
                    if code != float(str(value)) or not low <= code <= high:
                        raise ValueError
                    value = code
                except ValueError:
                    errors.append(CellError(number, name, f"{value!r} is not a code from {low} to {high}"))
                    continue
            elif isinstance(value, float) and value.is_integer():
                value = int(value)
            record[name] = value
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
    return result


def to_clinical_json(result: SheetResult, *, centre: str, pseudonymise: Callable[[list[str]], list[str]]) -> list[dict]:
    """Valid rows as clinical records: `Pseudonym` and `SubmittingCentre` first, then the template's fields."""
    pseudonyms = pseudonymise([nhs for _, nhs, _ in result.records])
    return [
        {"Pseudonym": p, "SubmittingCentre": centre, **record}
        for p, (_, _, record) in zip(pseudonyms, result.records, strict=True)
    ]


def blank_template(template: str, path: str | Path) -> Path:
    """An empty sheet with the template's headers, as XLSX or CSV by the file's extension."""
    path = Path(path)
    columns = TEMPLATES[template]["columns"]
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
    result: SheetResult
    written: list[Path]
    released: int  # held images of these patients moved to images/


def file_sheet(
    sheet: str | Path,
    outbox: str | Path,
    *,
    template: str,
    centre: str,
    pseudonymise: Callable[[list[str]], list[str]],
    strict: bool = False,
) -> FiledSheet:
    """Validate a filled sheet; valid rows go to the outbox as data/<Pseudonym>_{data,status}.json, and images
    held for those patients are released. With `strict`, any invalid row means nothing is written."""
    from nccid.site.outbox import release_held

    result = validate_sheet(read_rows(sheet), template)
    if result.errors and (strict or not result.records):
        return FiledSheet(result, [], 0)
    outbox = Path(outbox)
    (outbox / "data").mkdir(parents=True, exist_ok=True)
    written = []
    for record in to_clinical_json(result, centre=centre, pseudonymise=pseudonymise):
        path = outbox / "data" / f"{record['Pseudonym']}_{TEMPLATES[template]['kind']}.json"
        tmp = path.with_name(f".{path.name}.part")
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        tmp.replace(path)
        written.append(path)
    return FiledSheet(result, written, release_held(outbox))
