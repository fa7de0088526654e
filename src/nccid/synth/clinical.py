"""Synthetic clinical records with the NCCID template field names, realistic values and real-world defects.

Field names and codes follow ../shared/reference/clinical-fields.md. The defects listed there (header typos,
mixed date formats, `[value] - date` strings, FiO2 in litres or Venturi colours, ethnicity as words, odd sex
codes) appear at a small, seed-determined rate, because the warehouse keeps raw values and the cleaning step
has to cope with them.
"""

from __future__ import annotations

import datetime as dt
import random

ETHNICITY_CODES = list("ABCDEFGHJKLMNPRS")
ETHNICITY_WORDS = ["White British", "Asian or Asian British", "Black British", "Mixed", "Not stated"]
VENTURI = ["blue", "white", "orange", "yellow", "red", "green"]


def _us(date: dt.date) -> str:
    return date.strftime("%m/%d/%Y")


def _uk(date: dt.date) -> str:
    return date.strftime("%d/%m/%Y")


def _maybe(rng: random.Random, p: float) -> bool:
    return rng.random() < p


def _date_value(rng: random.Random, date: dt.date, defects: bool) -> str:
    """Positive-template dates are MM/DD/YYYY; real sheets also hold UK order and ISO strings."""
    if defects and _maybe(rng, 0.06):
        return _uk(date)
    if defects and _maybe(rng, 0.03):
        return date.isoformat()
    return _us(date)


def positive_record(
    rng: random.Random,
    *,
    pseudonym: str,
    centre: str,
    hospital: str,
    age: int,
    sex: int,
    swab_date: dt.date,
    defects: bool = True,
) -> dict:
    """A `<Pseudonym>_data.json` record (COVID-19 positive template v1.5)."""
    admitted = swab_date + dt.timedelta(days=rng.randint(-2, 3))
    itu = _maybe(rng, 0.2)
    died = _maybe(rng, 0.12 + age / 1000)
    fio2: object = rng.choice([21, 24, 28, 35, 40, 60])
    if defects and _maybe(rng, 0.08):
        fio2 = f"{rng.randint(1, 15)}L"
    elif defects and _maybe(rng, 0.04):
        fio2 = f"Venturi {rng.choice(VENTURI)}"
    systolic, diastolic = rng.randint(95, 170), rng.randint(55, 100)
    record: dict[str, object] = {
        "Pseudonym": pseudonym,
        "SubmittingCentre": centre,
        "Hospital": hospital,
        "Age": age,
        "Sex": sex,
        "Ethnicity": rng.choice(ETHNICITY_CODES),
        "Smoking status": rng.choice([0, 0, 1, 2, 3]),
        "Pack year history": rng.choice([0, 0, 5, 10, 20, 40]),
        "Date of Positive Covid Swab": _date_value(rng, swab_date, defects),
        "Date of acquisition of 1st RT-PCR": _date_value(rng, swab_date, defects),
        "Date of result of 1st RT-PCR": _date_value(rng, swab_date + dt.timedelta(days=1), defects),
        "Date of admission": _date_value(rng, admitted, defects),
        "Date of 1st CXR": _date_value(rng, admitted, defects),
        "PMH hypertension": rng.choice([0, 0, 1, 2]),
        "PMH CKD": rng.choice([0, 0, 0, 1, 2]),
        "PMH CVS disease": rng.choice([0, 0, 0, 1, 2, 3, 4]),
        "PMH Lung disease": rng.choice([0, 0, 1, 2, 4, 5, 6]),
        "PMH diabetes mellitus type II": rng.choice([0, 0, 1, 2]),
        "Current ACEi use": rng.choice([0, 1, 2]),
        "Current Angiotension receptor blocker use": rng.choice([0, 1, 2]),
        "Current NSAID used": rng.choice([0, 1, 2]),
        "Duration of symptoms": rng.randint(0, 21),
        "Respiratory rate on admission": rng.randint(12, 40),
        "Heart rate on admission": rng.randint(55, 140),
        "FiO2": fio2,
        "O2 saturation": rng.randint(80, 100),
        "PaO2": round(rng.uniform(6.0, 14.0), 1),
        "Systolic BP": systolic,
        "Diastolic BP": diastolic,
        "Temperature on admission": round(rng.uniform(36.0, 40.2), 1),
        "NEWS2 score on arrival": rng.randint(0, 17),
        "WCC on admission": round(rng.uniform(2.0, 20.0), 1),
        "Lymphocyte count on admission": round(rng.uniform(0.2, 3.0), 2),
        "Platelet count on admission": rng.randint(80, 450),
        "CRP on admission": rng.randint(1, 350),
        "D-dimer on admission": rng.randint(100, 8000),
        "Ferritin": rng.randint(20, 3000),
        "Urea on admission": round(rng.uniform(2.0, 30.0), 1),
        "Creatinine on admission": rng.randint(40, 400),
        "Troponin T": rng.randint(3, 200),
        "1st RT-PCR result": 1,
        "Final COVID Status": 1,
        "CXR severity": rng.choice([1, 2, 3]),
        "COVID CODE": rng.choice([0, 1, 1, 2, 3]),
        "ITU admission": int(itu),
        "Intubation": int(itu and _maybe(rng, 0.5)),
        "Death": int(died),
    }
    if itu:
        record["Date of ITU admission"] = _date_value(rng, admitted + dt.timedelta(days=rng.randint(0, 4)), defects)
        record["APACHE score on ITU arrival"] = rng.randint(5, 40)
    if died:
        record["Date of death"] = _date_value(rng, admitted + dt.timedelta(days=rng.randint(2, 30)), defects)
    else:
        record["Date last known alive"] = _date_value(rng, admitted + dt.timedelta(days=rng.randint(5, 60)), defects)
    if _maybe(rng, 0.3):
        record["CXR severity 2"] = rng.choice([1, 2, 3])
        record["Date of 2nd CXR"] = _date_value(rng, admitted + dt.timedelta(days=rng.randint(2, 9)), defects)
    if defects:
        if _maybe(rng, 0.05):
            record["PMH h1pertension"] = record.pop("PMH hypertension")
        if _maybe(rng, 0.04) and "CXR severity 2" in record:
            record["CXR severity 3"] = record.pop("CXR severity 2")
        if _maybe(rng, 0.05):
            record["Systolic BP"] = f"[{systolic}/{diastolic}] - {admitted.isoformat()}"
        if _maybe(rng, 0.05):
            record["Ethnicity"] = rng.choice([*ETHNICITY_WORDS, "99", "0"])
        if _maybe(rng, 0.03):
            record["Sex"] = rng.choice(["F", "M", 2, 3])
        if _maybe(rng, 0.05):
            record["Final COVID Status"] = "RNA DETECTED (SARS-CoV-2)"
    return record


def negative_record(
    rng: random.Random,
    *,
    pseudonym: str,
    centre: str,
    hospital: str,
    age: int,
    sex: int,
    swab_date: dt.date,
    defects: bool = True,
) -> dict:
    """A `<Pseudonym>_status.json` record (negative status template); SwabDate is DD/MM/YYYY."""
    record: dict[str, object] = {
        "Pseudonym": pseudonym,
        "SubmittingCentre": centre,
        "Hospital": hospital,
        "Age": age,
        "Sex": sex,
        "Ethnicity": rng.choice(ETHNICITY_CODES),
        "SwabStatus": 0,
        "SwabDate": _uk(swab_date),
    }
    if _maybe(rng, 0.2):
        later = swab_date + dt.timedelta(days=rng.randint(2, 10))
        record["SwabDates"] = [
            {"SwabDate": _uk(swab_date), "SwabStatus": 0},
            {"SwabDate": _uk(later), "SwabStatus": 0},
        ]
    if defects and _maybe(rng, 0.04):
        record["SwabDate"] = _us(swab_date)
    if defects and _maybe(rng, 0.04):
        record["Ethnicity"] = rng.choice(ETHNICITY_WORDS)
    return record
