"""`nccid validate demo`: train the example baseline on a warehouse's training set, then validate it and the
coin flip on the held-out set (submission, dry run, sealed run, release), the way a validator would.

Works on the store `nccid demo` leaves (./nccid-demo/store) or any loaded store whose validation group holds
adult frontal radiographs of positive and negative patients. The example models live in examples/models/.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import nccid
from nccid.errors import SubmissionError, ValidationRunError
from nccid.store import open_store
from nccid.validation.sandbox import Limits, remove_tree
from nccid.validation.service import RunSummary, Workspace

EXAMPLE_MODELS = ("baseline", "coin-flip")


def default_models_dir() -> Path:
    """examples/models of the source tree nccid runs from (an editable install or a checkout)."""
    return Path(nccid.__file__).resolve().parents[2] / "examples" / "models"


@dataclass(frozen=True)
class DemoModel:
    """One example model through the demo: its submission id, the dry and sealed runs, and the released report."""

    name: str
    submission: str
    dry: RunSummary
    sealed: RunSummary
    released: Path


@dataclass(frozen=True)
class DemoResult:
    """What the validation demo did: the baseline's training output, each model's runs, and the audit log's path."""

    training: str  # what train.py printed
    models: list[DemoModel]
    audit: Path


def train_baseline(store_url: str, models: Path, build: Path) -> tuple[Path, str]:
    """Copy the baseline to `build` and train it there on the store's training set (examples' train.py).

    Returns the trained model folder and what the training printed. Raises ValidationRunError if it fails.
    """
    source = models / "baseline"
    if not (source / "train.py").is_file():
        raise SubmissionError(f"{source}: no train.py here; pass --models pointing at examples/models")
    target = build / "baseline"
    remove_tree(target)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "weights.json"))
    done = subprocess.run(
        [sys.executable, str(target / "train.py"), "--store", store_url, "--out", str(target)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ValidationRunError(f"training the baseline on {store_url} failed: {last}")
    return target, done.stdout.strip()


def run_validation_demo(
    store_url: str, workspace: Path, *, models: Path | None = None, who: str = "demo", limits: Limits | None = None
) -> DemoResult:
    """Train, submit, dry-run, seal-run and release both example models. Returns where everything is.

    Raises StoreMissing for a store that does not exist, CohortError when its validation set cannot make a
    cohort, SubmissionError when the example models are not found.
    """
    models = Path(models) if models else default_models_dir()
    if not (models / "coin-flip").is_dir():
        raise SubmissionError(f"{models}: the example models are not here; pass --models pointing at examples/models")
    store = open_store(store_url, must_exist=True)
    space = Workspace(workspace, create=True)
    trained, training = train_baseline(store_url, models, space.root / "build")
    results = []
    for name, folder in (("baseline", trained), ("coin-flip", models / "coin-flip")):
        submission = space.submit(folder, who)
        dry = space.dry_run(submission.id, who, limits=limits)
        sealed = space.sealed_run(submission.id, store, who, limits=limits)
        released = space.release(sealed.run, who)
        results.append(DemoModel(name, submission.id, dry, sealed, released))
    return DemoResult(training, results, space.audit_path)
