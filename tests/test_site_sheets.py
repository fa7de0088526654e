"""Clinical sheets as sites fill them (issue 10, defects 3, 4 and 5; issue 14's new-user list): unambiguous
values converted with a warning, never a guess; ISO dates in the JSON; rows of another hospital held; sheets that
cannot be read give one line, not a traceback; a template is only written as .xlsx or .csv."""

from __future__ import annotations

import json
import random

import pytest
from helpers import run_cli

from nccid.errors import SheetError
from nccid.site.templates import read_rows, validate_sheet
from nccid.site.vault import PseudonymKey, Vault
from nccid.synth.hospital import hospital_patient
from nccid.synth.site_exports import awkward_sheet

CENTRE = "Northfield Teaching Hospitals NHS Trust"
HOSPITAL = "Northfield General Hospital"
OTHER = "Riverside Royal Infirmary"


@pytest.fixture
def people():
    rng = random.Random(31)
    return [hospital_patient(rng) for _ in range(6)]


@pytest.fixture
def site(tmp_path):
    key_file = PseudonymKey.generate().save(tmp_path / "site.key")
    return {"key_file": key_file, "vault": tmp_path / "vault.sqlite", "outbox": tmp_path / "outbox"}


def _clinical(site, sheet, *extra):
    return run_cli(
        "site", "clinical", sheet, site["outbox"], "--template", "positive", "--centre", CENTRE,
        "--key-file", site["key_file"], "--vault", site["vault"], *extra,
    )  # fmt: skip


def _records_by_nhs(site, people) -> dict[str, dict]:
    """The outbox's clinical records, by the NHS number of the person they were made for (via the vault)."""
    key = PseudonymKey.load(site["key_file"])
    with Vault(site["vault"]) as v:
        pseudonyms = v.lookup([key.encrypt(p.nhs) for p in people])
    by_pseudonym = {nhs: p for nhs, p in zip([p.nhs for p in people], pseudonyms, strict=True) if p}
    records = {}
    for nhs, pseudonym in by_pseudonym.items():
        path = site["outbox"] / "data" / f"{pseudonym}_data.json"
        if path.exists():
            records[nhs] = json.loads(path.read_text())
    return records


def test_an_excel_latin1_sheet_is_read_converted_with_warnings_and_other_hospitals_are_held(tmp_path, site, people):
    sheet = awkward_sheet(
        tmp_path / "northfield.csv", people, hospital=HOSPITAL, other_hospital=OTHER, encoding="cp1252"
    )
    assert b"\x96" in sheet.path.read_bytes()  # Excel on Windows: an en dash in Windows-1252, not UTF-8
    proc = _clinical(site, sheet.path, "--alias", HOSPITAL)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.replace("\n", " ")
    ((row, (read, code)),) = sheet.letter_sex.items()
    assert f"row {row}, column 'Sex (Male = 1, Female = 0)': read '{read}', wrote {code}" in out
    ((row, (read, iso)),) = sheet.impossible_month.items()
    assert f"row {row}, column 'Date of Positive Covid Swab': read '{read}', wrote '{iso}'" in out
    ((row, other),) = sheet.other_hospital.items()
    assert f"row {row}, column 'Hospital': '{other}' is not this site's hospital: held" in proc.stderr
    assert "5 record(s) written" in proc.stdout and "1 row(s) held back" in proc.stdout

    by_nhs = _records_by_nhs(site, people)
    assert len(by_nhs) == 5
    assert people[4].nhs not in by_nhs  # the other hospital's patient is not labelled with this centre
    assert by_nhs[people[1].nhs]["Sex"] == sheet.letter_sex[3][1]
    assert by_nhs[people[2].nhs]["Date of Positive Covid Swab"] == "2020-04-15"
    # two readings possible: the template's (MM/DD) holds, nothing guessed, no warning
    assert by_nhs[people[3].nhs]["Date of Positive Covid Swab"] == "2020-04-05"
    assert "04/05/2020" not in out
    assert by_nhs[people[3].nhs]["Ethnicity"] == "White – Irish"  # the Latin-1 text read as written
    for record in by_nhs.values():  # every date field as ISO YYYY-MM-DD
        assert record["Date of admission"] == "2020-04-13" and record["SubmittingCentre"] == CENTRE
        assert record["Hospital"] == HOSPITAL


def test_without_the_alias_no_row_of_another_name_is_labelled_with_this_centre(tmp_path, site, people):
    sheet = awkward_sheet(tmp_path / "s.xlsx", people, hospital=HOSPITAL, other_hospital=OTHER)
    proc = _clinical(site, sheet.path)
    assert proc.returncode == 1 and "nothing written" in proc.stderr
    assert proc.stderr.count("is not this site's hospital") == 6
    assert not (site["outbox"] / "data").exists()


def test_conversions_are_only_made_where_one_reading_exists():
    head = ["NHS/CHI Number", "Hospital", "SwabStatus", "SwabDate", "Sex (Male = 1, Female = 0)"]
    rows = [
        head,
        ["9434765919", "H", 0, "04/05/2020", "female"],  # DD/MM template: 4 May, as written
        ["4010232137", "H", 0, "05/13/2020", "X"],  # month 13 impossible: 13 May; X is no sex code
        ["9990000018", "H", 0, "2020-05-13", 1],  # ISO: one reading
    ]
    result = validate_sheet(rows, "negative")
    assert [(e.row, e.column) for e in result.errors] == [(3, "Sex")]
    dates = {row: record["SwabDate"] for row, _, record in result.records}
    assert dates == {2: "2020-05-04", 4: "2020-05-13"}
    assert [str(c) for c in result.conversions] == [
        "row 2, column 'Sex (Male = 1, Female = 0)': read 'female', wrote 0 (the letter code of Sex)"
    ]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("random.csv", True, "binary data, not a CSV text file"),
        ("random.xlsx", True, "not a readable XLSX workbook"),
        ("missing.csv", False, "missing.csv: no such file"),
    ],
)
def test_a_sheet_that_cannot_be_read_is_one_line(tmp_path, site, name, content, message):
    path = tmp_path / name
    if content:
        path.write_bytes(random.Random(name).randbytes(4096) + b"\x00")
    with pytest.raises(SheetError, match=message):
        read_rows(path)
    proc = _clinical(site, path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: ") and name in line and message in line


def test_a_template_is_not_written_into_a_txt_file(tmp_path):
    proc = run_cli("site", "template", "positive", tmp_path / "x.txt")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "x.txt: a template is written as .xlsx or .csv, not .txt" in proc.stderr
    assert not (tmp_path / "x.txt").exists()
    assert run_cli("site", "template", "positive", tmp_path / "x.csv").returncode == 0
    assert read_rows(tmp_path / "x.csv")[0][0] == "NHS/CHI Number"


def test_a_trusts_hospitals_configured_once_in_the_site_settings(tmp_path, site, people):
    sheet = awkward_sheet(tmp_path / "s.csv", people, hospital=HOSPITAL, other_hospital=OTHER)
    proc = run_cli("site", "settings", site["outbox"], "--hospital", HOSPITAL)
    assert proc.returncode == 0 and f"this site's hospitals besides its centre: {HOSPITAL}" in proc.stdout
    proc = _clinical(site, sheet.path)  # no --alias: the setting says which hospitals are this site's
    assert proc.returncode == 0, proc.stderr
    assert "5 record(s) written" in proc.stdout and proc.stderr.count("is not this site's hospital") == 1
    assert f"'{OTHER}' is not this site's hospital" in proc.stderr
