"""Clinical templates: every kind of row error named by row and column, valid rows proceed, XLSX and CSV."""

from __future__ import annotations

import csv
import datetime as dt
import json

import openpyxl
import pytest
from helpers import run_cli

from nccid.site.templates import (
    NEGATIVE_COLUMNS,
    POSITIVE_COLUMNS,
    blank_template,
    read_rows,
    to_clinical_json,
    validate_sheet,
)
from nccid.site.vault import PseudonymKey

HEAD = [
    "NHS/CHI Number",
    "Hospital (Internal) Number",
    "Hospital",
    "Age",
    "Sex (Male = 1, Female = 0)",
    "Date of Positive Covid Swab",
    "PMH h1pertension",
    "CXR severity",
    "Notes",
]
GOOD = ["943 476 5919", "RX1", "Northfield", 71, 1, "04/03/2020", 1, 2, "x"]


def rows(*body):
    return [HEAD, *body]


def test_a_valid_row_becomes_clinical_json_without_identifiers():
    result = validate_sheet(rows(GOOD), "positive")
    assert result.errors == [] and len(result.records) == 1
    assert "column 'PMH h1pertension' read as 'PMH hypertension' (a known header typo)" in result.warnings
    assert "column 'Notes' is not a template field and is left out" in result.warnings
    (record,) = to_clinical_json(result, centre="Northfield Trust", pseudonymise=lambda n: ["Covid77"])
    assert record == {
        "Pseudonym": "Covid77",
        "SubmittingCentre": "Northfield Trust",
        "Hospital": "Northfield",
        "Age": 71,
        "Sex": 1,
        "Date of Positive Covid Swab": "2020-04-03",  # ISO in the JSON: MM/DD in the sheet
        "PMH hypertension": 1,
        "CXR severity": 2,
    }


@pytest.mark.parametrize(
    ("change", "column", "reason"),
    [
        ({0: "9434765918"}, "NHS/CHI Number", "fails the modulus 11 check"),
        ({0: "1000000010"}, "NHS/CHI Number", "check value is 10"),
        ({3: None}, "Age", "required value is missing"),
        ({5: "2020-13-04"}, "Date of Positive Covid Swab", "not a date in the template's MM/DD/YYYY"),
        ({5: "13/34/2020"}, "Date of Positive Covid Swab", "not a date in the template's MM/DD/YYYY"),
        ({5: "04/31/2020"}, "Date of Positive Covid Swab", "not a date in the template's MM/DD/YYYY"),
        ({4: 2}, "Sex", "not a code from 0 to 1"),
        ({7: 4}, "CXR severity", "not a code from 1 to 3"),
        ({6: "yes"}, "PMH hypertension", "not a code from 0 to 2"),
        ({3: "inf"}, "Age", "'inf' is not a code from 0 to 120"),
        ({3: "1e400"}, "Age", "'1e400' is not a code from 0 to 120"),
        ({3: float("inf")}, "Age", "inf is not a code from 0 to 120"),
        ({7: "nan"}, "CXR severity", "not a code from 1 to 3"),
    ],
)
def test_each_kind_of_error_is_named_by_row_and_column(change, column, reason):
    bad = [change.get(i, v) for i, v in enumerate(GOOD)]
    other = ["401 023 2137", "RX2", "Northfield", 50, 0, "04/05/2020", 0, 1, ""]
    result = validate_sheet(rows(bad, other), "positive")
    assert [(e.row, e.column) for e in result.errors] == [(2, column)]
    assert reason in result.errors[0].reason
    assert str(result.errors[0]).startswith(f"row 2, column {column!r}: ")
    assert [r[0] for r in result.records] == [3]  # the valid row proceeds
    assert result.held_rows == {2}


def test_duplicate_rows_are_held():
    result = validate_sheet(rows(GOOD, ["9434765919", "RX1", "Northfield", 71, 1, "04/03/2020", 1, 2, ""]), "positive")
    assert [(e.row, e.reason) for e in result.errors] == [(3, "the same person as row 2 (duplicate row)")]


def test_negative_template_dates_are_day_first():
    head = ["NHS/CHI Number", "Hospital", "SwabStatus", "SwabDate"]
    result = validate_sheet(
        [head, ["9434765919", "H", 0, "25/12/2020"], ["4010232137", "H", 0, "12/25/2020"]], "negative"
    )
    # 12/25/2020 cannot be DD/MM (month 25): its only reading, 25 December, is taken, with a warning
    assert [r[2]["SwabDate"] for r in result.records] == ["2020-12-25", "2020-12-25"]
    assert result.errors == []
    assert "row 3, column 'SwabDate': read '12/25/2020', wrote '2020-12-25'" in result.warnings[0]


def test_xlsx_and_csv_read_the_same_and_blank_templates_have_the_template_headers(tmp_path):
    book = openpyxl.Workbook()
    book.active.append(HEAD)
    book.active.append([*GOOD[:5], dt.datetime(2020, 4, 3), *GOOD[6:]])  # a real date cell
    book.save(tmp_path / "sheet.xlsx")
    with open(tmp_path / "sheet.csv", "w", newline="") as handle:
        csv.writer(handle).writerows(rows(GOOD))
    from_xlsx = validate_sheet(read_rows(tmp_path / "sheet.xlsx"), "positive").records
    from_csv = validate_sheet(read_rows(tmp_path / "sheet.csv"), "positive").records
    assert from_xlsx == from_csv and from_csv[0][2]["Date of Positive Covid Swab"] == "2020-04-03"
    assert read_rows(blank_template("positive", tmp_path / "p.xlsx"))[0] == POSITIVE_COLUMNS
    assert read_rows(blank_template("negative", tmp_path / "n.csv"))[0] == NEGATIVE_COLUMNS


def test_clinical_command_writes_valid_rows_and_strict_refuses_the_sheet(tmp_path):
    with open(tmp_path / "sheet.csv", "w", newline="") as handle:
        csv.writer(handle).writerows(rows(GOOD, ["123", "RX9", "Northfield", 40, 1, "04/03/2020", 0, 1, ""]))
    key_file = PseudonymKey.generate().save(tmp_path / "k.key")
    base = [
        "site",
        "clinical",
        str(tmp_path / "sheet.csv"),
        str(tmp_path / "out"),
        "--template",
        "positive",
        "--centre",
        "Northfield Trust",
        "--alias",
        "Northfield",  # the sheet's Hospital column names the hospital, not the trust
        "--key-file",
        str(key_file),
        "--vault",
        str(tmp_path / "v.sqlite"),
    ]
    strict = run_cli(*base, "--strict")
    assert strict.returncode == 1 and "row 3, column 'NHS/CHI Number'" in strict.stderr
    assert not (tmp_path / "out").exists()
    ok = run_cli(*base)
    assert ok.returncode == 0, ok.stderr
    assert "1 record(s) written" in ok.stdout and "1 row(s) held back" in ok.stdout
    (written,) = (tmp_path / "out" / "data").iterdir()
    record = json.loads(written.read_text())
    assert written.name == f"{record['Pseudonym']}_data.json" and record["SubmittingCentre"] == "Northfield Trust"
    assert "9434765919" not in written.read_text() and "RX1" not in written.read_text()


@pytest.mark.parametrize(("kind", "suffix"), [("positive", ".xlsx"), ("negative", ".csv")])
def test_synthetic_filled_sheets_carry_defects_the_validator_finds(tmp_path, kind, suffix):
    import random

    from nccid.synth.hospital import filled_template, hospital_patient

    rng = random.Random(5)
    people = [hospital_patient(rng) for _ in range(8)]
    sheet = filled_template(people, str(tmp_path / f"sheet{suffix}"), kind=kind, seed=5)
    result = validate_sheet(read_rows(sheet.path), kind)
    by_row = {e.row: e for e in result.errors}
    assert all("NHS" in by_row[r].reason or "check" in by_row[r].reason for r in sheet.invalid_numbers)
    assert all("duplicate row" in by_row[r].reason for r in sheet.duplicate_rows)
    # a date in the other order whose template reading is impossible (25/04 as MM/DD) is read the only way it
    # can be, with a warning naming row and column; the row is no longer held
    for row in sheet.bad_dates:
        assert row not in by_row and f"row {row}, column" in " ".join(result.warnings)
    assert result.held_rows == set(sheet.invalid_numbers + sheet.duplicate_rows)
    assert len(result.records) == sheet.rows - len(result.held_rows) == 7  # 8 people + 1 duplicate, 2 held
    assert all(f"column {t!r} read as" in " ".join(result.warnings) for t in sheet.header_typos)


def test_a_cell_that_looks_like_terminal_markup_is_reported_as_written(tmp_path):
    """Sheet values reach the console in error lines: '[/b]' is text to show, not a style tag to choke on."""
    with open(tmp_path / "sheet.csv", "w", newline="") as handle:
        bad_age = ["450 557 7104", "RX2", "Northfield", "[/b]", 1, "04/03/2020", 0, 1, ""]
        csv.writer(handle).writerows(rows(GOOD, bad_age))
    key_file = PseudonymKey.generate().save(tmp_path / "k.key")
    proc = run_cli(
        "site", "clinical", tmp_path / "sheet.csv", tmp_path / "out", "--template", "positive",
        "--centre", "Northfield Trust", "--alias", "Northfield",
        "--key-file", key_file, "--vault", tmp_path / "v.sqlite",
    )  # fmt: skip
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "row 3, column 'Age'" in proc.stderr and "[/b]" in proc.stderr
