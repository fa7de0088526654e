"""The model submission contract: a folder holding `nccid-model.json` and the model's own code.

The manifest states who made the model, what it is for (its intended use) and how to run it. The intended use
decides the validation cohort; the entry command is run in the sandbox with the cohort's DICOM files below
`/input/<case>/` and must write `/output/predictions.csv` (`case,score`, a score in [0, 1] per case). See
examples/models/README.md for the full contract and two example submissions.

Pure: `parse_manifest` checks a dict; `load_manifest` reads the file. Every problem raises SubmissionError with
one line naming the file and the field.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nccid.errors import SubmissionError

MANIFEST_NAME = "nccid-model.json"
#: what a model may be asked to predict, and where its ground truth comes from
TASKS = {
    "covid19": "COVID-19 positive (data_ record with a positive RT-PCR) vs negative (status_ record)",
    "death": "death (Death = 1) vs survival (Death = 0), among COVID-19 positive patients",
    "itu_admission": "ITU admission (ITU admission = 1) vs none (0), among COVID-19 positive patients",
}
#: DICOM modalities of the cohorts the harness can build today (radiographs)
RADIOGRAPH_MODALITIES = ("CR", "DX")
KNOWN_MODALITIES = ("CR", "DX", "CT", "MR")
VIEWS = ("PA", "AP", "LL", "RL", "LATERAL")
UNITS = ("patient", "study")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class IntendedUse:
    """What the model is for: it decides the cohort (who is in it, which image) and the ground truth."""

    task: str  # one of TASKS
    modalities: tuple[str, ...]  # DICOM Modality values the model reads, e.g. ("CR", "DX")
    views: tuple[str, ...]  # ViewPosition values, e.g. ("PA", "AP") for a frontal radiograph
    unit: str  # "patient": the first eligible image per patient; "study": the first per study
    min_age: int | None  # population: ages in years, inclusive; None: no bound
    max_age: int | None
    window_days: int | None  # the image must be within this many days of the swab date; None: any time
    threshold: float  # the vendor's operating threshold on the score in [0, 1]
    population: str = ""  # the vendor's own words for the population, shown in the report


@dataclass(frozen=True)
class Manifest:
    """A parsed, checked `nccid-model.json`."""

    name: str
    version: str
    vendor: str
    intended_use: IntendedUse
    entry: tuple[str, ...]  # argv run in /model inside the sandbox
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("extra")
        return data


def _fail(where: str, message: str) -> SubmissionError:
    return SubmissionError(f"{where}: {message}")


def _text(data: dict, key: str, where: str, *, pattern: re.Pattern[str] | None = None, required: bool = True) -> str:
    value = data.get(key, "")
    if not isinstance(value, str) or (required and not value.strip()):
        raise _fail(where, f"field {key!r} must be a non-empty string")
    if pattern is not None and not pattern.fullmatch(value):
        raise _fail(where, f"field {key!r} = {value!r}: letters, digits, '.', '_' and '-' only (at most 64)")
    return value.strip()


def _age(value: object, where: str, key: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 130:
        raise _fail(where, f"field {key!r} must be a whole number of years from 0 to 130, or null")
    return value


def _codes(value: object, allowed: tuple[str, ...], where: str, key: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise _fail(where, f"field {key!r} must be a non-empty list of {', '.join(allowed)}")
    codes = tuple(v.strip().upper() for v in value)
    unknown = [c for c in codes if c not in allowed]
    if unknown:
        raise _fail(where, f"field {key!r}: {unknown[0]!r} is not one of {', '.join(allowed)}")
    return codes


def parse_manifest(data: object, where: str = MANIFEST_NAME) -> Manifest:
    """Check a manifest's content. Returns the Manifest; raises SubmissionError naming `where` and the field."""
    if not isinstance(data, dict):
        raise _fail(where, "the manifest must be a JSON object")
    name = _text(data, "name", where, pattern=_NAME)
    version = _text(data, "version", where, pattern=_NAME)
    vendor = _text(data, "vendor", where)
    use = data.get("intended_use")
    if not isinstance(use, dict):
        raise _fail(where, "field 'intended_use' must be an object (task, input, unit, population, output)")
    task = use.get("task")
    if not isinstance(task, str) or task not in TASKS:
        raise _fail(where, f"field 'intended_use.task' = {task!r}: must be one of {', '.join(TASKS)}")
    given = use.get("input")
    if not isinstance(given, dict):
        raise _fail(where, "field 'intended_use.input' must be an object with 'modalities' (and 'views')")
    modalities = _codes(given.get("modalities"), KNOWN_MODALITIES, where, "intended_use.input.modalities")
    views = _codes(given.get("views", list(VIEWS)), VIEWS, where, "intended_use.input.views")
    unit = use.get("unit")
    if unit not in UNITS:
        raise _fail(where, f"field 'intended_use.unit' = {unit!r}: must be 'patient' or 'study'")
    population = use.get("population", {})
    if not isinstance(population, dict):
        raise _fail(where, "field 'intended_use.population' must be an object (min_age, max_age, window_days)")
    min_age = _age(population.get("min_age"), where, "intended_use.population.min_age")
    max_age = _age(population.get("max_age"), where, "intended_use.population.max_age")
    if min_age is not None and max_age is not None and min_age > max_age:
        raise _fail(where, "field 'intended_use.population': min_age is above max_age")
    window = population.get("window_days")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or not 0 <= window <= 3650):
        raise _fail(where, "field 'intended_use.population.window_days' must be 0-3650 days or null")
    output = use.get("output")
    if not isinstance(output, dict) or output.get("score") != "probability in [0, 1]":
        raise _fail(where, "field 'intended_use.output.score' must be \"probability in [0, 1]\"")
    threshold = output.get("threshold")
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not math.isfinite(threshold):
        raise _fail(where, "field 'intended_use.output.threshold' must be a number in [0, 1]")
    if not 0.0 <= float(threshold) <= 1.0:
        raise _fail(where, f"field 'intended_use.output.threshold' = {threshold}: must be in [0, 1]")
    entry = data.get("entry")
    if isinstance(entry, str):
        entry = entry.split()
    if not isinstance(entry, list) or not entry or not all(isinstance(a, str) and a for a in entry):
        raise _fail(where, 'field \'entry\' must be a command, e.g. ["python3", "predict.py"]')
    return Manifest(
        name=name,
        version=version,
        vendor=vendor,
        intended_use=IntendedUse(
            task=task,
            modalities=modalities,
            views=views,
            unit=unit,
            min_age=min_age,
            max_age=max_age,
            window_days=window,
            threshold=float(threshold),
            population=str(population.get("description", "")),
        ),
        entry=tuple(entry),
        description=str(data.get("description", "")),
    )


def load_manifest(folder: Path) -> Manifest:
    """Read and check `<folder>/nccid-model.json`. Raises SubmissionError naming the file and the field."""
    path = Path(folder) / MANIFEST_NAME
    if not Path(folder).is_dir():
        raise SubmissionError(f"{folder}: a submission is a folder holding {MANIFEST_NAME} and the model's code")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SubmissionError(f"{path}: missing; every submission needs its manifest") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SubmissionError(f"{path}: cannot be read ({exc.__class__.__name__})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SubmissionError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    return parse_manifest(data, str(path))
