"""Reading what a model wrote: `predictions.csv` with a header `case,score`, one row per case.

Nothing is dropped silently: every row that is not a known case with a finite score in [0, 1] is counted
under its reason, and every case without a valid score is counted as missing. Pure apart from reading the file.
"""

from __future__ import annotations

import csv
import io
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

PREDICTIONS_NAME = "predictions.csv"
MAX_BYTES = 16 * 1024 * 1024


@dataclass
class Predictions:
    """Valid scores by case, and the counted problems (reason -> rows)."""

    scores: dict[str, float] = field(default_factory=dict)
    problems: Counter = field(default_factory=Counter)
    missing: int = 0
    expected: int = 0

    def to_json(self) -> dict:
        return {
            "expected": self.expected,
            "valid": len(self.scores),
            "missing": self.missing,
            "problems": dict(sorted(self.problems.items())),
        }


def parse_predictions(text: str, cases: set[str]) -> Predictions:
    """Check the CSV text against the cohort's `cases`. Returns the valid scores and counted problems."""
    result = Predictions(expected=len(cases))
    try:
        table = list(csv.reader(io.StringIO(text)))
    except csv.Error:  # a field over the csv module's limit, a NUL byte, ...: nothing in it can be trusted
        result.problems["predictions.csv unreadable as CSV"] += 1
        result.missing = len(cases)
        return result
    header = table[0] if table else None
    if header is None or [h.strip().lower() for h in header[:2]] != ["case", "score"]:
        result.problems["no 'case,score' header"] += 1
        result.missing = len(cases)
        return result
    for row in table[1:]:
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) < 2:
            result.problems["row without a score"] += 1
            continue
        case, raw = row[0].strip(), row[1].strip()
        if case not in cases:
            result.problems["unknown case"] += 1
            continue
        try:
            score = float(raw)
        except ValueError:
            result.problems["score not a number"] += 1
            continue
        if not math.isfinite(score) or not 0.0 <= score <= 1.0:
            result.problems["score outside [0, 1]"] += 1
            continue
        if case in result.scores:
            result.problems["duplicate case (first score kept)"] += 1
            continue
        result.scores[case] = score
    result.missing = len(cases) - len(result.scores)
    return result


def read_predictions(output: Path, cases: set[str]) -> Predictions:
    """Read `<output>/predictions.csv` (at most 16 MiB, UTF-8). A missing, oversized or undecodable file
    counts every case as missing, with the reason."""
    path = output / PREDICTIONS_NAME
    result = Predictions(expected=len(cases), missing=len(cases))
    if not path.is_file() or path.is_symlink():
        result.problems["no predictions.csv"] += 1
        return result
    if path.stat().st_size > MAX_BYTES:
        result.problems["predictions.csv larger than 16 MiB"] += 1
        return result
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        result.problems["predictions.csv not UTF-8"] += 1
        return result
    return parse_predictions(text, cases)
