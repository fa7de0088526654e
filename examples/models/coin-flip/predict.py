"""A coin flip: a uniform random score for every case folder below $NCCID_INPUT, whatever the image shows.

The generator is seeded by the last 4 KiB of the case's image file (its pixels, not its header), so a re-run
on the same cohort gives the same scores: a reproducible picture of no skill (AUC 0.5)."""

import hashlib
import os
import random
from pathlib import Path

inputs, output = Path(os.environ["NCCID_INPUT"]), Path(os.environ["NCCID_OUTPUT"])
rows = []
for case in sorted(p for p in inputs.iterdir() if p.is_dir()):
    images = sorted(case.glob("*.dcm"))
    tail = images[0].read_bytes()[-4096:] if images else case.name.encode()
    coin = random.Random(hashlib.sha256(tail).hexdigest())
    rows.append(f"{case.name},{coin.random():.6f}\n")
(output / "predictions.csv").write_text("case,score\n" + "".join(rows))
print(f"scored {len(rows)} cases at random")
