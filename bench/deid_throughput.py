"""De-identification throughput per core on CT-sized headers, against pydicom read + write alone, in one run.

Makes identifiable CT slices (512 x 512, full PACS-style headers with nested sequences and private tags), then
times, on one core: (baseline) pydicom read + write of every file; (ours) `deidentify_folder`, i.e. read,
find the NHS number, pseudonymise, de-identify, run the gate, write. Goal: at least 0.5x the baseline.
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
import time
from pathlib import Path

import pydicom

from nccid.site.batch import deidentify_folder
from nccid.site.vault import PseudonymKey, Vault
from nccid.synth import dicom as synth_dicom
from nccid.synth.hospital import hospital_patient, pacs_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=400)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="nccid-bench-deid-"))
    try:
        rng = random.Random(1)
        people = [hospital_patient(rng) for _ in range(max(1, args.files // 50))]
        src = scratch / "pacs"
        src.mkdir()
        full_ct = synth_dicom.ct_base(512).tobytes()
        for n in range(args.files):
            ds = pacs_image(people[n % len(people)], rng, seed=str(n))
            ds.Rows = ds.Columns = 512
            ds.PixelData = full_ct
            ds.save_as(src / f"{n:05d}.dcm", enforce_file_format=True)
        size = sum(p.stat().st_size for p in src.iterdir())
        start = time.perf_counter()
        out = scratch / "baseline"
        out.mkdir()
        for path in sorted(src.iterdir()):
            pydicom.dcmread(path).save_as(out / path.name)
        baseline = time.perf_counter() - start
        key = PseudonymKey.generate()
        vault = Vault(scratch / "vault.sqlite")
        start = time.perf_counter()
        result = deidentify_folder(src, scratch / "out", key=key, pseudonymise=lambda c: vault.issue(c, actor="b"))
        ours = time.perf_counter() - start
        vault.close()
        assert len(result.written) + len(result.waiting) == args.files and result.clean  # no sheet: held
        print(f"{args.files} CT files, {size / 1e6:,.0f} MB, one core")
        print(f"pydicom read + write:            {args.files / baseline:,.0f} files/s")
        print(f"nccid de-identify + gate + write: {args.files / ours:,.0f} files/s")
        print(f"ratio: {baseline / ours:.2f}x (goal >= 0.5x)")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
