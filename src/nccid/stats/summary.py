"""The statistics the NCCID published and its dashboards used.

- patients: one row per patient (latest record: the latest data file, else the latest status file);
- one table per modality (xray, ct, mri) with one row per imaging study;
- storage by prefix;
- the headline summary for training, validation and both.

Computed from the catalog's index of the processed layout plus the clinical records themselves, written as CSV
and JSON into `stats/<YYYY-MM-DD>/` of the store, with `stats/latest.json` pointing at the newest folder.
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import datetime as dt
import io
import json
from dataclasses import dataclass, field

from nccid.contracts.layout import GROUPS, MODALITY_FOLDERS, is_upload_date
from nccid.errors import UsageError
from nccid.store import ObjectStore
from nccid.warehouse.catalog import Catalog, bind

STATS_PREFIX = "stats/"
LATEST_KEY = "stats/latest.json"
STUDY_COLUMNS = [
    "Pseudonym",
    "group",
    "PatientSex",
    "PatientAge",
    "StudyDate",
    "StudyInstanceUID",
    "BodyPartExamined",
    "Manufacturer",
    "ManufacturerModelName",
    "Modality",
    "images",
]
PATIENT_COLUMNS = [
    "Pseudonym",
    "group",
    "SubmittingCentre",
    "covid_status",
    "latest_record",
    "first_upload",
    "last_upload",
    "Age",
    "Sex",
    "xray_studies",
    "ct_studies",
    "mri_studies",
]
MODALITY_LABEL = {"xray": "X-ray", "ct": "CT", "mri": "MRI"}
SCOPES = ("training", "validation", "all")


@dataclass
class Statistics:
    date: str
    patients: list[dict]
    studies: dict[str, list[dict]]  # folder -> rows
    storage: list[dict]
    summary: dict[str, dict] = field(default_factory=dict)  # scope -> headline numbers
    prefix: str = ""


def covid_status(kind: str, record: dict) -> str:
    """A positive-template record means positive; a status record says so in SwabStatus (1 positive)."""
    if kind == "data":
        return "positive"
    value = str(record.get("SwabStatus", "")).strip()
    return {"1": "positive", "0": "negative"}.get(value, "unknown")


def _latest_records(catalog: Catalog) -> list[tuple]:
    """Per patient: (pseudonym, group, latest key, its kind, first upload, last upload)."""
    return catalog.sql_query(
        """
        SELECT c.patient, c.grp,
               COALESCE(
                 (SELECT d.dest FROM clinical d WHERE d.patient = c.patient AND d.kind = 'data'
                  ORDER BY d.date DESC LIMIT 1),
                 (SELECT s.dest FROM clinical s WHERE s.patient = c.patient AND s.kind = 'status'
                  ORDER BY s.date DESC LIMIT 1)) AS latest,
               MIN(c.date), MAX(c.date)
        FROM clinical c GROUP BY c.patient, c.grp ORDER BY c.patient
        """
    )


def patient_table(store: ObjectStore, catalog: Catalog) -> list[dict]:
    latest = _latest_records(catalog)
    counts: dict[tuple[str, str], int] = {
        (p, f): n
        for p, f, n in catalog.sql_query("SELECT patient, folder, COUNT(DISTINCT study) FROM instances GROUP BY 1, 2")
    }
    with cf.ThreadPoolExecutor(max_workers=8) as pool:
        records = list(pool.map(lambda row: json.loads(store.read(row[2])), latest))
    rows = []
    for (patient, group, key, first, last), record in zip(latest, records, strict=True):
        kind = "data" if key.rsplit("/", 1)[-1].startswith("data_") else "status"
        rows.append(
            {
                "Pseudonym": patient,
                "group": group,
                "SubmittingCentre": record.get("SubmittingCentre", ""),
                "covid_status": covid_status(kind, record),
                "latest_record": key,
                "first_upload": first,
                "last_upload": last,
                "Age": record.get("Age", ""),
                "Sex": record.get("Sex", ""),
                "xray_studies": counts.get((patient, "xray"), 0),
                "ct_studies": counts.get((patient, "ct"), 0),
                "mri_studies": counts.get((patient, "mri"), 0),
            }
        )
    return rows


def study_tables(catalog: Catalog) -> dict[str, list[dict]]:
    tables: dict[str, list[dict]] = {}
    for folder in MODALITY_FOLDERS:
        rows = catalog.sql_query(
            """
            SELECT patient, grp, MIN(sex), MIN(age), MIN(study_date), study, MIN(body_part), MIN(manufacturer),
                   MIN(model), MIN(modality), COUNT(*)
            FROM instances WHERE folder = ? GROUP BY patient, grp, study ORDER BY patient, study
            """,
            (folder,),
        )
        tables[folder] = [dict(zip(STUDY_COLUMNS, row, strict=True)) for row in rows]
    return tables


def storage_table(store: ObjectStore) -> list[dict]:
    rows = []
    for group in GROUPS:
        for folder in ("data", *[f for m in MODALITY_FOLDERS for f in (m, f"{m}-metadata")]):
            objects = size = 0
            for info in store.list(f"{group}/{folder}/"):
                objects += 1
                size += info.size
            rows.append({"prefix": f"{group}/{folder}/", "objects": objects, "bytes": size})
    return rows


def headline(patients: list[dict], studies: dict[str, list[dict]]) -> dict[str, dict]:
    """Centres with data, patients with images, total patients, studies per modality: per group and both."""
    out = {}
    for scope in SCOPES:
        chosen = [p for p in patients if scope == "all" or p["group"] == scope]
        with_images = {
            row["Pseudonym"] for f in MODALITY_FOLDERS for row in studies[f] if scope == "all" or row["group"] == scope
        }
        out[scope] = {
            "centres": len({p["SubmittingCentre"] for p in chosen}),
            "patients": len(chosen),
            "patients_with_images": len(with_images),
            "positive": sum(p["covid_status"] == "positive" for p in chosen),
            "negative": sum(p["covid_status"] == "negative" for p in chosen),
            **{
                f"{f}_studies": sum(1 for r in studies[f] if scope == "all" or r["group"] == scope)
                for f in MODALITY_FOLDERS
            },
            **{
                f"{f}_images": sum(r["images"] for r in studies[f] if scope == "all" or r["group"] == scope)
                for f in MODALITY_FOLDERS
            },
        }
    return out


def compute(store: ObjectStore, catalog: Catalog, date: str | None = None) -> Statistics:
    """The statistics of the processed layout as the catalog indexes it, for `publish` to write.

    Reads the catalog through its read-only contract and the latest clinical record of each patient from the
    store. Refuses (raises :class:`~nccid.errors.CatalogError`, saying how to rebuild) a catalog that belongs
    to another store, or an empty catalog for a store that holds processed data: zeros are never published.
    Raises UsageError for a `date` that is not a real YYYY-MM-DD date (it names the folder `stats/<date>/`).
    """
    if date is not None and not is_upload_date(date):
        raise UsageError(f"statistics date {date!r} is not a date as YYYY-MM-DD: nothing was written")
    bind(store, catalog, writing=False)
    patients = patient_table(store, catalog)
    studies = study_tables(catalog)
    stats = Statistics(
        date=date or dt.date.today().isoformat(),
        patients=patients,
        studies=studies,
        storage=storage_table(store),
    )
    stats.summary = headline(patients, studies)
    return stats


def _csv(rows: list[dict], columns: list[str]) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode()


def _json(doc: object) -> bytes:
    return (json.dumps(doc, indent=1) + "\n").encode()


def publish(store: ObjectStore, stats: Statistics) -> str:
    """Write the tables into stats/<date>/ and point stats/latest.json at them; returns the prefix."""
    prefix = f"{STATS_PREFIX}{stats.date}/"
    tables = {
        "patients": (stats.patients, PATIENT_COLUMNS),
        "storage": (stats.storage, ["prefix", "objects", "bytes"]),
    }
    tables.update({folder: (rows, STUDY_COLUMNS) for folder, rows in stats.studies.items()})
    for name, (rows, columns) in tables.items():
        store.write(f"{prefix}{name}.csv", _csv(rows, columns))
        store.write(f"{prefix}{name}.json", _json(rows))
    summary_rows = [{"scope": scope, **numbers} for scope, numbers in stats.summary.items()]
    store.write(f"{prefix}summary.csv", _csv(summary_rows, list(summary_rows[0])))
    store.write(f"{prefix}summary.json", _json(stats.summary))
    store.write(
        LATEST_KEY,
        _json(
            {"date": stats.date, "prefix": prefix, "generated": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
        ),
    )
    stats.prefix = prefix
    return prefix
