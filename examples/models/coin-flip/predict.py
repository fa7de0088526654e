"""A coin flip: a uniform random score for every case folder below $NCCID_INPUT (no image is even read)."""

import os
import random
from pathlib import Path

inputs, output = Path(os.environ["NCCID_INPUT"]), Path(os.environ["NCCID_OUTPUT"])
cases = sorted(p.name for p in inputs.iterdir() if p.is_dir())
with open(output / "predictions.csv", "w") as handle:
    handle.write("case,score\n")
    for case in cases:
        handle.write(f"{case},{random.random():.6f}\n")
print(f"scored {len(cases)} cases at random")
