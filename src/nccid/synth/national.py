"""A synthetic national dataset: several hospitals uploading pseudonymised clinical records and chest images
over several upload dates, in the raw layout, plus the awkward cases a real warehouse meets.

Deterministic by seed. The people are modelled first (`SynthPatient`) and then written out in pseudonymised
form, so that identifiable hospital-side views of the same people can be added without changing this.
"""

from __future__ import annotations

import concurrent.futures as cf
import datetime as dt
import json
import random
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from nccid.store import ObjectStore
from nccid.synth import clinical as synth_clinical
from nccid.synth import dicom as synth_dicom
from nccid.synth.dicom import DEFAULT_SIGNAL, Subject, encode, synthetic_uid
from nccid.warehouse.config import WarehouseConfig, save_config


@dataclass(frozen=True)
class Hospital:
    """A synthetic sending hospital: its centre and hospital names, uploader name, split rule and export style."""

    centre: str  # the clinical SubmittingCentre
    name: str  # the clinical Hospital field
    uploader: str  # writes to raw-<uploader>/
    rule: str  # split | training | validation | unconfigured
    subfolders: bool  # PACS export with study/series sub-folders, or a flat folder


HOSPITALS = [
    Hospital("Northfield Teaching Hospitals NHS Trust", "Northfield General Hospital", "northfield", "split", True),
    Hospital("Riverside University Hospitals", "Riverside Royal Infirmary", "riverside", "split", False),
    Hospital("Eastmoor Health Board", "Eastmoor District Hospital", "eastmoor", "split", True),
    Hospital("Kingsbridge NHS Foundation Trust", "Kingsbridge Hospital", "kingsbridge", "training", False),
    Hospital("Westcliff Hospitals NHS Trust", "Westcliff Royal Hospital", "westcliff", "validation", True),
    Hospital("Lowther Valley NHS Trust", "Lowther Valley Hospital", "lowther", "split", False),
    Hospital("Harrowgate Community Hospitals", "Harrowgate Hospital", "harrowgate", "training", True),
]
UNCONFIGURED = Hospital("St Elsewhere General", "St Elsewhere General Hospital", "elsewhere", "unconfigured", False)
AWKWARD_CASES = (
    "late_clinical",
    "orphan_images",
    "reupload",
    "changed_image",
    "truncated",
    "not_dicom",
    "missing_patient_id",
    "sr",
    "ot",
    "subfolders",
    "unconfigured_site",
    "invalid_json",
    "name_mismatch",
    "corrected_record",
)


@dataclass(frozen=True)
class SynthSpec:
    """What to generate: how many patients, hospitals and upload days, image size and mix, whether to plant
    the awkward cases, and the seed that makes it all repeatable."""

    seed: int = 0
    patients: int = 300
    hospitals: int = 5
    days: int = 4
    scale: float = 1.0  # image size multiplier: 1.0 is realistic, 0.05 makes tiny test images
    imaged_fraction: float = 0.3
    ct_slices: tuple[int, int] = (40, 120)
    mr_slices: tuple[int, int] = (12, 24)
    xray_share: float = 0.80  # of imaging studies; CT takes the rest but for the MR share
    mr_share: float = 0.04
    awkward: bool = True
    training_percentage: int = 50
    start: dt.date = dt.date(2020, 4, 6)
    #: strength of the sign of disease planted in positive patients' radiographs (0: none; see plant_opacities)
    signal: float = DEFAULT_SIGNAL


@dataclass
class SynthPatient:
    """One modelled person before writing out: pseudonym, hospital, COVID status, demographics, and on which
    upload day their first clinical record arrives (None: never)."""

    pseudonym: str
    hospital: Hospital
    positive: bool
    age: int
    sex: int  # template coding: Male 1, Female 0
    swab_date: dt.date
    clinical_day: int | None  # index of the upload date of the first record; None: never sent


@dataclass
class SynthResult:
    """What `generate` wrote: counts of patients, records, images and bytes, the config, the upload dates, and
    which pseudonyms or keys carry each awkward case (so tests can check the loader handled them)."""

    spec: SynthSpec
    config: WarehouseConfig
    upload_dates: list[str]
    patients: int = 0
    clinical_records: int = 0
    images: int = 0
    bytes: int = 0
    by_modality: Counter = field(default_factory=Counter)
    cases: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def to_json(self) -> dict:
        """The result as plain JSON types, for the manifest  can write."""
        return {
            "seed": self.spec.seed,
            "patients": self.patients,
            "clinical_records": self.clinical_records,
            "images": self.images,
            "bytes": self.bytes,
            "by_modality": dict(self.by_modality),
            "upload_dates": self.upload_dates,
            "config": self.config.to_json(),
            "cases": {k: list(v) for k, v in self.cases.items()},
        }


class _Writer:
    """Writes objects, overlapping the round trips of a remote store with a few threads (bounded in flight)."""

    def __init__(self, store: ObjectStore, result: SynthResult, tick: Callable[[int], None]) -> None:
        self.store, self.result, self.tick = store, result, tick
        self.pool = cf.ThreadPoolExecutor(max_workers=8) if store.remote else None
        self.pending: list[cf.Future] = []

    def put(self, key: str, data: bytes, case: str | None = None) -> str:
        if self.pool is None:
            self.store.write(key, data)
        else:
            self.pending.append(self.pool.submit(self.store.write, key, data))
            if len(self.pending) >= 32:
                self._drain(16)
        self.result.bytes += len(data)
        self.tick(len(data))
        if case:
            self.result.cases[case].append(key)
        return key

    def _drain(self, keep: int = 0) -> None:
        while len(self.pending) > keep:
            self.pending.pop(0).result()

    def close(self) -> None:
        self._drain()
        if self.pool is not None:
            self.pool.shutdown()


def _image_key(hospital: Hospital, date: str, study: str, series: str, sop: str) -> str:
    base = f"raw-{hospital.uploader}/{date}/images/"
    return f"{base}{study}/{series}/{sop}.dcm" if hospital.subfolders else f"{base}{sop}.dcm"


def make_config(spec: SynthSpec, hospitals: list[Hospital], uploaders: list[Hospital] | None = None) -> WarehouseConfig:
    """Site rules for `hospitals`; raw prefixes for `uploaders` (which may include a site missing from the rules)."""
    return WarehouseConfig(
        raw_prefixes=tuple(f"raw-{h.uploader}/" for h in (uploaders or hospitals)),
        training_percentage=spec.training_percentage,
        split_sites=frozenset(h.centre for h in hospitals if h.rule == "split"),
        training_sites=frozenset(h.centre for h in hospitals if h.rule == "training"),
        validation_sites=frozenset(h.centre for h in hospitals if h.rule == "validation"),
    )


def upload_dates(spec: SynthSpec) -> list[str]:
    """The weekly upload dates of `spec`: exactly `spec.days` of them (at least one)."""
    return [(spec.start + dt.timedelta(days=7 * d)).isoformat() for d in range(max(1, spec.days))]


def generate(store: ObjectStore, spec: SynthSpec, progress: Callable[[int], None] | None = None) -> SynthResult:
    """Write config.json and the raw uploads of `spec` into `store`: a national dataset without real patients,
    for demos, tests and benchmarks. The same spec always writes the same objects.

    Returns a SynthResult with counts and the awkward cases planted. Store failures raise StoreError.
    """
    rng = random.Random(spec.seed)
    nprng = np.random.default_rng(spec.seed)
    hospitals = HOSPITALS[: max(1, min(spec.hospitals, len(HOSPITALS)))]
    senders = hospitals + ([UNCONFIGURED] if spec.awkward else [])
    dates = upload_dates(spec)
    # the unconfigured site uploads (raw prefix listed) but its centre is missing from 'sites'
    config = make_config(spec, hospitals, senders)
    save_config(store, config)
    result = SynthResult(spec=spec, config=config, upload_dates=dates)
    out = _Writer(store, result, progress or (lambda n: None))

    numbers = rng.sample(range(1, 99999), spec.patients + 8)
    people: list[SynthPatient] = []
    for i in range(spec.patients):
        hospital = hospitals[i % len(hospitals)] if i % 13 or not spec.awkward else senders[-1]
        swab = spec.start + dt.timedelta(days=rng.randint(-20, 7 * len(dates)))
        people.append(
            SynthPatient(
                pseudonym=f"Covid{numbers[i]}",
                hospital=hospital,
                positive=rng.random() < 0.45,
                age=int(min(103, max(13, rng.gauss(62, 17)))),
                sex=rng.randint(0, 1),
                swab_date=swab,
                clinical_day=rng.randrange(len(dates)),
            )
        )
    result.patients = len(people)

    imaged = [p for p in people if rng.random() < spec.imaged_fraction * (1.4 if p.positive else 0.6)]
    if spec.awkward and len(people) >= 3:
        late = people[0] if people[0].hospital.rule != "unconfigured" else people[1]
        late.clinical_day = len(dates) - 1
        if late not in imaged:
            imaged.append(late)
        orphan = SynthPatient(f"Covid{numbers[spec.patients]}", hospitals[0], True, 50, 1, spec.start, None)
        imaged.append(orphan)
        result.cases["late_clinical"].append(late.pseudonym)
        result.cases["orphan_images"].append(orphan.pseudonym)

    # clinical records
    for person in people:
        if person.clinical_day is None:
            continue
        date = dates[person.clinical_day]
        maker = synth_clinical.positive_record if person.positive else synth_clinical.negative_record
        record = maker(
            rng,
            pseudonym=person.pseudonym,
            centre=person.hospital.centre,
            hospital=person.hospital.name,
            age=person.age,
            sex=person.sex,
            swab_date=person.swab_date,
        )
        kind = "data" if person.positive else "status"
        key = f"raw-{person.hospital.uploader}/{date}/data/{person.pseudonym}_{kind}.json"
        out.put(
            key,
            (json.dumps(record, indent=1) + "\n").encode(),
            "unconfigured_site" if person.hospital.rule == "unconfigured" else None,
        )
        result.clinical_records += 1
        wants_correction = rng.random() < 0.04 or (
            spec.awkward and not result.cases.get("corrected_record") and person.hospital.rule != "unconfigured"
        )
        if person.positive and person.clinical_day < len(dates) - 1 and wants_correction:
            record["Death"] = 1
            record["Date of death"] = (person.swab_date + dt.timedelta(days=12)).strftime("%m/%d/%Y")
            later = dates[person.clinical_day + 1]
            out.put(
                f"raw-{person.hospital.uploader}/{later}/data/{person.pseudonym}_data.json",
                (json.dumps(record, indent=1) + "\n").encode(),
                "corrected_record",
            )
            result.clinical_records += 1

    # images
    first_images: list[tuple[str, bytes, object]] = []
    for person in imaged:
        day = 0 if person.clinical_day is None else person.clinical_day
        if person.pseudonym in result.cases.get("late_clinical", []):
            day = 0
        date = dates[day]
        sex = "M" if person.sex == 1 else "F"
        for study_n in range(1 if rng.random() < 0.75 else 2):
            study_date = (person.swab_date + dt.timedelta(days=study_n * 3)).strftime("%Y%m%d")
            study = synthetic_uid(spec.seed, person.pseudonym, "study", study_n)
            subject = Subject(person.pseudonym, person.pseudonym, sex, person.age, study, study_date)
            roll = rng.random()
            series = synthetic_uid(spec.seed, person.pseudonym, "series", study_n)
            if roll < spec.xray_share:
                modality = "CR" if rng.random() < 0.6 else "DX"
                sop = synthetic_uid(spec.seed, person.pseudonym, "sop", study_n)
                ds = synth_dicom.xray(
                    subject,
                    nprng,
                    modality=modality,
                    scale=spec.scale,
                    series_uid=series,
                    sop_uid=sop,
                    signal=spec.signal if person.positive else 0.0,
                )
                datasets = [ds]
            elif roll < 1.0 - spec.mr_share:
                n = rng.randint(*spec.ct_slices)
                datasets = synth_dicom.ct_slices(
                    subject, nprng, slices=n, scale=spec.scale, series_uid=series, uid_seed=f"{spec.seed}/{series}"
                )
            else:
                n = rng.randint(*spec.mr_slices)
                datasets = synth_dicom.mr_slices(
                    subject, nprng, slices=n, scale=spec.scale, series_uid=series, uid_seed=f"{spec.seed}/{series}"
                )
            for ds in datasets:
                data = encode(ds)
                key = out.put(
                    _image_key(person.hospital, date, study, series, ds.SOPInstanceUID),
                    data,
                    "subfolders" if person.hospital.subfolders and not result.cases["subfolders"] else None,
                )
                result.images += 1
                result.by_modality[ds.Modality] += 1
                if len(first_images) < 3 and person.hospital.rule in ("split", "training", "validation"):
                    first_images.append((key, data, ds))
    if spec.awkward:
        _awkward_images(out, rng, nprng, spec, dates, hospitals, first_images, numbers)
        _awkward_clinical(out, dates, hospitals, numbers, spec)
    out.close()
    return result


def _awkward_images(
    out: _Writer,
    rng: random.Random,
    nprng: np.random.Generator,
    spec: SynthSpec,
    dates: list[str],
    hospitals: list[Hospital],
    first_images: list,
    numbers: list[int],
) -> None:
    last = dates[-1]
    home = hospitals[0]
    base = f"raw-{home.uploader}/{last}/images/"
    if first_images:
        key, data, ds = first_images[0]
        uploader = key.split("/", 1)[0]
        out.put(f"{uploader}/{last}/images/resend/{ds.SOPInstanceUID}.dcm", data, "reupload")
    if len(first_images) > 1:
        key, data, ds = first_images[1]
        changed = bytearray(data)
        changed[-64:] = bytes(b ^ 0xFF for b in changed[-64:])  # other pixels, same SOP Instance UID
        out.put(
            f"{key.split('/', 1)[0]}/{last}/images/resend/{ds.SOPInstanceUID}-v2.dcm", bytes(changed), "changed_image"
        )
    pseudonym = f"Covid{numbers[0]}"
    subject = Subject(pseudonym, pseudonym, "F", 70, synthetic_uid(spec.seed, "awkward-study"), "20200410")
    series = synthetic_uid(spec.seed, "awkward-series")
    cr = encode(
        synth_dicom.xray(
            subject, nprng, scale=spec.scale, series_uid=series, sop_uid=synthetic_uid(spec.seed, "truncated")
        )
    )
    out.put(base + "truncated.dcm", cr[: len(cr) * 3 // 5], "truncated")
    out.put(base + "scan-notes.dcm", b"Patient scanned on portable unit, see PACS.\n", "not_dicom")
    no_id = synth_dicom.xray(
        subject, nprng, scale=spec.scale, series_uid=series, sop_uid=synthetic_uid(spec.seed, "no-patient-id")
    )
    del no_id.PatientID
    out.put(base + "no-patient-id.dcm", encode(no_id), "missing_patient_id")
    sr = synth_dicom.structured_report(
        subject, series_uid=synthetic_uid(spec.seed, "sr-series"), sop_uid=synthetic_uid(spec.seed, "sr")
    )
    out.put(base + "report/sr.dcm", encode(sr), "sr")
    ot = synth_dicom.secondary_capture(
        subject, series_uid=synthetic_uid(spec.seed, "ot-series"), sop_uid=synthetic_uid(spec.seed, "ot")
    )
    out.put(base + "screenshot.dcm", encode(ot), "ot")


def _awkward_clinical(
    out: _Writer, dates: list[str], hospitals: list[Hospital], numbers: list[int], spec: SynthSpec
) -> None:
    home = hospitals[0]
    bad, other = f"Covid{numbers[spec.patients + 1]}", f"Covid{numbers[spec.patients + 2]}"
    data = f"raw-{home.uploader}/{dates[-1]}/data/"
    out.put(f"{data}{bad}_data.json", b'{"Pseudonym": "' + bad.encode() + b'", "Age": 54,, }\n', "invalid_json")
    record = {"Pseudonym": other, "SubmittingCentre": home.centre, "SwabStatus": 0, "SwabDate": "01/05/2020"}
    out.put(f"{data}{bad}_status.json", (json.dumps(record) + "\n").encode(), "name_mismatch")
