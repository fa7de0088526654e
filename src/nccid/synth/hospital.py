"""Identifiable hospital-side data (entirely synthetic): what a PACS sends before de-identification.

Names, valid NHS numbers, hospital numbers, birth dates, addresses, accession numbers and physicians, placed
where real PACS put them: the top level, nested sequences, free text, and private tags.
"""

from __future__ import annotations

import datetime as dt
import random
import zlib
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from nccid.site.gate import KnownIdentifiers
from nccid.site.identifiers import check_digit
from nccid.synth import dicom as synth_dicom
from nccid.synth.dicom import DEFAULT_SIGNAL, Subject, synthetic_uid
from nccid.synth.national import HOSPITALS, Hospital

FAMILY = ["SMITH", "JONES", "TAYLOR", "BROWN", "WILLIAMS", "WILSON", "JOHNSON", "DAVIES", "ROBINSON", "WRIGHT"]
GIVEN = ["OLIVIA", "AMELIA", "ISLA", "GEORGE", "OLIVER", "HARRY", "JACK", "NOAH", "AVA", "MOHAMMED"]
STREETS = ["Acacia Avenue", "Mill Lane", "Station Road", "Church Street", "Victoria Road"]
TOWNS = ["Northfield", "Riverside", "Eastmoor", "Kingsbridge"]


def nhs_number(rng: random.Random, valid: bool = True) -> str:
    """A 10-digit number with a correct (or, for defects, a wrong) modulus 11 check digit."""
    while True:
        first = f"{rng.choice('4679')}{rng.randrange(10**8):08d}"
        check = check_digit(first)
        if check is not None:
            return f"{first}{check if valid else (check + 1) % 10}"


@dataclass(frozen=True)
class HospitalPatient:
    """A synthetic person as the hospital knows them, identifiers and all: what de-identification must remove."""

    nhs: str
    hospital_number: str
    family: str
    given: str
    birth_date: dt.date
    address: str
    postcode: str
    sex: str

    @property
    def known(self) -> KnownIdentifiers:
        """What the site knows of this person, for the de-identification gate."""
        return KnownIdentifiers(
            names=[self.family, self.given, "HOUSE^GREGORY"],
            numbers=[self.nhs, self.hospital_number],
            birth_date=self.birth_date.strftime("%Y%m%d"),
            address=[self.address, self.postcode],
        )


def hospital_patient(rng: random.Random) -> HospitalPatient:
    """A made-up person with a valid NHS number, hospital number, name, birth date and address, from `rng`."""
    return HospitalPatient(
        nhs=nhs_number(rng),
        hospital_number=f"RX{rng.randrange(10**6):06d}",
        family=rng.choice(FAMILY),
        given=rng.choice(GIVEN),
        birth_date=dt.date(rng.randint(1930, 2000), rng.randint(1, 12), rng.randint(1, 28)),
        address=f"{rng.randint(1, 200)} {rng.choice(STREETS)}, {rng.choice(TOWNS)}",
        postcode=f"NF{rng.randint(1, 9)} {rng.randint(1, 9)}AB",
        sex=rng.choice("MF"),
    )


def pacs_image(
    person: HospitalPatient,
    rng: random.Random,
    *,
    modality: str = "CT",
    seed: str = "0",
    accession: str = "ACC0001",
    scale: float | None = None,
    hospital: Hospital = HOSPITALS[0],
    signal: float = 0.0,
) -> Dataset:
    """One image as a PACS would send it: identifiers at the top, nested, in text and in private tags.

    The institution and station names are `hospital`'s; a radiograph carries planted opacities of strength
    `signal` (0: none; see `nccid.synth.dicom.plant_opacities`)."""
    age = (dt.date(2020, 4, 1) - person.birth_date).days // 365
    study = synthetic_uid("pacs-study", person.nhs, seed)
    subject = Subject(person.nhs, f"{person.family}^{person.given}", person.sex, age, study, "20200401", accession)
    nprng = np.random.default_rng(zlib.crc32(f"{person.nhs}-{seed}".encode()))  # hash() differs per process
    series = synthetic_uid("pacs-series", person.nhs, seed)
    uid = f"{person.nhs}-{seed}"
    if modality == "CT":
        ds = synth_dicom.ct_slices(subject, nprng, slices=1, scale=scale or 0.05, series_uid=series, uid_seed=uid)[0]
    elif modality == "MR":
        ds = synth_dicom.mr_slices(subject, nprng, slices=1, scale=scale or 0.1, series_uid=series, uid_seed=uid)[0]
    else:
        ds = synth_dicom.xray(
            subject,
            nprng,
            modality=modality,
            scale=scale or 0.02,
            series_uid=series,
            sop_uid=synthetic_uid("pacs-sop", person.nhs, seed),
            signal=signal,
        )
    del ds.PatientIdentityRemoved
    ds.PatientBirthDate = person.birth_date.strftime("%Y%m%d")
    ds.PatientAddress = f"{person.address} {person.postcode}"
    ds.ReferringPhysicianName = "HOUSE^GREGORY"
    ds.InstitutionName = hospital.name
    ds.StationName = f"{station_prefix(hospital)}-{modality}-01"
    ds.DeviceSerialNumber = "SN-000123"
    ds.SeriesDate, ds.ContentDate = "20200402", "20200403"
    ds.ImageComments = f"Portable film, patient {person.family} {person.given}, hosp no {person.hospital_number}"
    ds.PatientSize, ds.PatientWeight = 1.72, 81.0
    other = Dataset()
    other.PatientID = person.hospital_number
    other.IssuerOfPatientID = station_prefix(hospital)
    ds.OtherPatientIDsSequence = [other]
    request = Dataset()
    request.RequestedProcedureID = accession
    request.AccessionNumber = accession
    request.ScheduledProcedureStepID = person.hospital_number
    ds.RequestAttributesSequence = [request]
    referenced = Dataset()
    referenced.ReferencedSOPClassUID = ds.SOPClassUID
    referenced.ReferencedSOPInstanceUID = synthetic_uid("pacs-sop-ref", person.nhs, seed)
    ds.ReferencedImageSequence = [referenced]
    block = ds.private_block(0x0099, f"{station_prefix(hospital)} PACS", create=True)
    block.add_new(0x01, "LO", person.nhs)
    block.add_new(0x02, "LO", f"{person.family}^{person.given}")
    return ds


def station_prefix(hospital: Hospital) -> str:
    """A short code for a hospital's stations and PACS ('Northfield General Hospital' -> 'NGH')."""
    return "".join(word[0] for word in hospital.name.split() if word[:1].isalpha()).upper()[:4]


def hospital_for_folder(folder: str) -> Hospital:
    """The synthetic hospital whose uploader name is `folder`'s last component (the demo's layout,
    `hospitals/<uploader>`), else the first hospital."""
    import os

    name = os.path.basename(os.path.normpath(folder))
    return next((h for h in HOSPITALS if h.uploader == name), HOSPITALS[0])


@dataclass(frozen=True)
class FilledSheet:
    """A filled template and what was planted in it, so tests and demos can check the validator finds it."""

    path: str
    rows: int
    invalid_numbers: list[int]  # sheet row numbers (header is row 1)
    duplicate_rows: list[int]
    bad_dates: list[int]
    header_typos: list[str]


def filled_template(
    people: list[HospitalPatient],
    path: str,
    *,
    kind: str = "positive",
    seed: int = 0,
    defects: bool = True,
    hospital: Hospital = HOSPITALS[0],
) -> FilledSheet:
    """A site's filled sheet (XLSX or CSV by extension) whose Hospital column is `hospital`'s name, with
    real-world defects when asked: an invalid NHS number, a duplicated person, a date in the other order, and
    header typos."""
    from nccid.site.templates import TEMPLATES
    from nccid.synth.clinical import negative_record, positive_record

    rng = random.Random(seed)
    columns = list(TEMPLATES[kind]["columns"])
    typos = []
    if defects and kind == "positive":
        columns[columns.index("PMH hypertension")] = "PMH h1pertension"
        typos.append("PMH h1pertension")
    maker = positive_record if kind == "positive" else negative_record
    body, invalid, duplicate, bad_dates = [], [], [], []
    for n, person in enumerate(people):
        swab = dt.date(2020, 4, 1) + dt.timedelta(days=rng.randint(0, 30))
        age = (swab - person.birth_date).days // 365
        record = maker(
            rng,
            pseudonym="",
            centre="",
            hospital=hospital.name,
            age=age,
            sex=1 if person.sex == "M" else 0,
            swab_date=swab,
            defects=False,
        )
        record = {
            **record,
            "NHS/CHI Number": person.nhs,
            "Hospital (Internal) Number": person.hospital_number,
            "Sex (Male = 1, Female = 0)": record.get("Sex"),
            "Smoking status (Never = 0, Ex-smoker = 1, Current = 2, Unknown = 3)": record.get("Smoking status"),
            "PMH h1pertension": record.get("PMH hypertension"),
        }
        row_number = len(body) + 2
        if defects and n == 1:
            record["NHS/CHI Number"] = nhs_number(rng, valid=False)
            invalid.append(row_number)
        if defects and n == 2:
            date_field = "Date of Positive Covid Swab" if kind == "positive" else "SwabDate"
            record[date_field] = dt.date(2020, 4, 25).strftime("%d/%m/%Y" if kind == "positive" else "%m/%d/%Y")
            bad_dates.append(row_number)
        body.append([record.get(c, "") for c in columns])
    if defects and body:
        body.append(list(body[0]))
        duplicate.append(len(body) + 1)
    if path.endswith(".xlsx"):
        import openpyxl

        book = openpyxl.Workbook()
        book.active.append(columns)
        for row in body:
            book.active.append(row)
        book.save(path)
    else:
        import csv

        with open(path, "w", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerows([columns, *body])
    return FilledSheet(path, len(body), invalid, duplicate, bad_dates, typos)


PAS_COLUMNS = [
    "NHS/CHI Number",
    "Hospital (Internal) Number",
    "Family Name",
    "Given Name",
    "Date of Birth",
    "Address",
    "Postcode",
    "Accession Numbers",
    "Referring Physician",
]


def write_identifiers(people: list[HospitalPatient], path: str, accessions: dict[str, list[str]] | None = None) -> str:
    """The site's own list of what it knows per patient (a PAS extract), for the de-identification gate."""
    import csv

    accessions = accessions or {}
    with open(path, "w", newline="", encoding="utf-8") as handle:
        out = csv.writer(handle)
        out.writerow(PAS_COLUMNS)
        for p in people:
            out.writerow(
                [
                    p.nhs,
                    p.hospital_number,
                    p.family,
                    p.given,
                    p.birth_date.isoformat(),
                    p.address,
                    p.postcode,
                    ";".join(accessions.get(p.nhs, [])),
                    "HOUSE^GREGORY",
                ]
            )
    return path


@dataclass
class HospitalSite:
    """One synthetic hospital's identifiable starting point: PACS exports, filled sheets, and its PAS extract."""

    people: list[HospitalPatient]
    pacs: str  # folder of identifiable DICOM as the PACS exports it
    sheets: list[tuple[str, str]]  # (path, template) in the order they arrive
    identifiers: str  # the PAS extract the gate checks against
    images: int
    bytes: int


def hospital_site(
    folder: str,
    *,
    patients: int,
    seed: int,
    template: str = "positive",
    defects: bool = False,
    late_sheet: bool = False,
    scale: float = 0.5,
    hospital: Hospital | None = None,
    signal: float = DEFAULT_SIGNAL,
) -> HospitalSite:
    """Make a hospital's identifiable data in `folder`: every patient has a radiograph (CR or DX); one in three
    also a CT slice and one in five an MR slice. With `defects` the sheet carries the real-world defects and one
    radiograph has burned-in annotation; with `late_sheet` the last third of patients come in a second sheet.

    The sheets' Hospital column and the images' institution and station names are `hospital`'s (by default the
    hospital whose uploader name is the folder's name, see `hospital_for_folder`). On a positive template every
    patient is COVID-19 positive, and their radiographs carry the planted sign of disease at strength `signal`.
    """
    import os

    hospital = hospital or hospital_for_folder(folder)
    rng = random.Random(seed)
    people = [hospital_patient(rng) for _ in range(patients)]
    pacs = os.path.join(folder, "pacs")
    os.makedirs(pacs, exist_ok=True)
    accessions: dict[str, list[str]] = {}
    images = size = 0
    for i, person in enumerate(people):
        plan = [("CR" if i % 2 else "DX", scale)]
        plan += [("CT", 1.0)] if i % 3 == 0 else []
        plan += [("MR", 1.0)] if i % 5 == 0 else []
        for j, (modality, image_scale) in enumerate(plan):
            accession = f"A{seed:03d}{i:04d}{j}"
            accessions.setdefault(person.nhs, []).append(accession)
            ds = pacs_image(
                person,
                rng,
                modality=modality,
                seed=f"{seed}-{j}",
                accession=accession,
                scale=image_scale,
                hospital=hospital,
                signal=signal if template == "positive" else 0.0,
            )
            if defects and i == 0 and j == 0:
                ds.BurnedInAnnotation = "YES"  # a scanned request form: held at the site, never sent
            path = os.path.join(pacs, f"{i:04d}-{j}-{modality}.dcm")
            ds.save_as(path, enforce_file_format=True)
            images += 1
            size += os.path.getsize(path)
    split = len(people) - len(people) // 3 if late_sheet else len(people)
    sheets = []
    for n, group in enumerate([people[:split], people[split:]]):
        if group:
            path = os.path.join(folder, f"{template}-sheet-{n + 1}.xlsx")
            filled_template(group, path, kind=template, seed=seed + n, defects=defects and n == 0, hospital=hospital)
            sheets.append((path, template))
    identifiers = write_identifiers(people, os.path.join(folder, "pas-extract.csv"), accessions)
    return HospitalSite(people, pacs, sheets, identifiers, images, size)
