"""Train the baseline on a warehouse's training set and write weights.json beside predict.py.

    python3 examples/models/baseline/train.py --store ./nccid-demo/store [--out DIR]

The training cohort follows the same intended use as the manifest (adults, first frontal radiograph per
patient within 30 days of the swab, COVID-19 positive vs negative), read from `training/` with the same rules
the validation harness applies to `validation/`. The model is scikit-learn's LogisticRegression on the
features of features.py (standardised); its coefficients are saved as JSON, so the entry command needs
numpy and pydicom only (no pickle crosses into the sandbox).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from features import image_features  # noqa: E402


def train(store_url: str, out: Path) -> dict:
    """Fit on the store's training group; write `out`/weights.json. Returns what was fitted (counts, CV AUC)."""
    from nccid.store import open_store
    from nccid.validation.cohort import select_cohort
    from nccid.validation.manifest import load_manifest

    use = load_manifest(HERE).intended_use
    store = open_store(store_url)
    cases = sorted(select_cohort(store, use, group="training").cases, key=lambda c: c.key)  # same data, same fit
    features = np.array([image_features(io.BytesIO(store.read(c.key))) for c in cases])
    labels = np.array([c.label for c in cases])
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=2000))
    folds = int(min(5, labels.sum(), len(labels) - labels.sum()))
    cv_auc = (
        float(np.mean(cross_val_score(model, features, labels, cv=folds, scoring="roc_auc"))) if folds >= 2 else None
    )
    model.fit(features, labels)
    scaler, logistic = model[0], model[1]
    weights = {
        "coef": logistic.coef_[0].tolist(),
        "intercept": float(logistic.intercept_[0]),
        "mean": scaler.mean_.tolist(),
        "scale": scaler.scale_.tolist(),
        "trained_on": {"cases": len(labels), "positives": int(labels.sum()), "cv_auc": cv_auc},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "weights.json").write_text(json.dumps(weights) + "\n")
    return weights["trained_on"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True, help="the warehouse store (path or URL)")
    parser.add_argument("--out", type=Path, default=HERE, help="folder for weights.json (default: beside this file)")
    args = parser.parse_args()
    fitted = train(args.store, args.out)
    cv = f"{fitted['cv_auc']:.3f}" if fitted["cv_auc"] is not None else "n/a"
    print(
        f"trained on {fitted['cases']} cases ({fitted['positives']} positive); cross-validated AUC {cv}; "
        f"weights in {args.out / 'weights.json'}"
    )


if __name__ == "__main__":
    main()
