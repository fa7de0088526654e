"""The baseline's entry command: score every case folder below $NCCID_INPUT with the trained logistic
regression in weights.json and write $NCCID_OUTPUT/predictions.csv (case,score). numpy and pydicom only."""

import json
import os
import sys
from pathlib import Path

import numpy as np
from features import image_features

here = Path(__file__).resolve().parent
weights = json.loads((here / "weights.json").read_text())
coef, intercept = np.asarray(weights["coef"]), weights["intercept"]
mean, scale = np.asarray(weights["mean"]), np.asarray(weights["scale"])
inputs, output = Path(os.environ["NCCID_INPUT"]), Path(os.environ["NCCID_OUTPUT"])
rows, unreadable = [], 0
for case in sorted(p for p in inputs.iterdir() if p.is_dir()):
    scores = []
    for image in sorted(case.glob("*.dcm")):
        try:
            x = (image_features(image) - mean) / scale
        except Exception as exc:
            print(f"{case.name}/{image.name}: unreadable ({exc.__class__.__name__})", file=sys.stderr)
            unreadable += 1
            continue
        scores.append(1.0 / (1.0 + np.exp(-(x @ coef + intercept))))
    if scores:
        rows.append(f"{case.name},{max(scores):.6f}")
(output / "predictions.csv").write_text("case,score\n" + "".join(r + "\n" for r in rows))
print(f"scored {len(rows)} cases; {unreadable} unreadable image(s)")
