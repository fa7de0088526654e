"""Loader throughput against a plain copy of the same raw bytes on the same disk, in one run.

Makes at least 2 GB of realistic raw uploads (radiographs around 2000 x 2500, CT series of 512 x 512 slices),
copies them with `cp -r` (the baseline, twice: before and after, the faster counts), then runs
`nccid warehouse load` on them and prints images/s, MB/s, the ratio to the copy, and peak memory.
Goal: at least 0.8x the plain copy; peak memory under 500 MB.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from _common import mb, nccid_cmd, run_measured

from nccid.store import LocalStore
from nccid.synth.national import SynthSpec, generate


def raw_bytes(root: Path) -> tuple[int, int]:
    files = [p for p in root.glob("raw-*/**/images/**/*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--patients", type=int, default=420)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=None, help="Scratch folder (default: a temporary one).")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="nccid-bench-", dir=args.dir))
    try:
        store = LocalStore(scratch / "store")
        start = time.perf_counter()
        made = generate(store, SynthSpec(seed=7, patients=args.patients))
        print(f"synthesised {made.images} images, {mb(made.bytes)} in {time.perf_counter() - start:.1f} s")
        raw_dirs = [store.root / p.rstrip("/") for p in made.config.raw_prefixes]
        n_files, n_bytes = raw_bytes(store.root)
        if n_bytes < 2e9:
            print(f"warning: only {mb(n_bytes)} of raw images; pass --patients for at least 2 GB")
        copies = [plain_copy_all(raw_dirs, scratch / "copy")]
        catalog = scratch / "catalog.sqlite"
        took, peak_one, peak_sum = run_measured(
            nccid_cmd(
                "warehouse",
                "load",
                "--store",
                str(store.root),
                "--catalog",
                str(catalog),
                "--workers",
                str(args.workers),
            )
        )
        copies.append(plain_copy_all(raw_dirs, scratch / "copy"))
        copy_s = min(copies)
        print(f"raw images: {n_files} files, {mb(n_bytes)} (both runs also handle the clinical records)")
        print(f"plain copy (cp -r, best of 2): {copy_s:.2f} s = {n_bytes / copy_s / 1e6:,.0f} MB/s")
        print(
            f"nccid warehouse load ({args.workers} workers): {took:.2f} s = {n_files / took:,.0f} images/s, "
            f"{n_bytes / took / 1e6:,.0f} MB/s"
        )
        print(f"ratio loader / plain copy throughput: {copy_s / took:.2f}x (goal >= 0.8x)")
        print(f"peak memory: {mb(peak_one)} largest process, {mb(peak_sum)} all processes (goal < 500 MB)")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def plain_copy_all(raw_dirs: list[Path], dest: Path) -> float:
    dest.mkdir()
    start = time.perf_counter()
    subprocess.run(["cp", "-r", *map(str, raw_dirs), str(dest)], check=True)
    took = time.perf_counter() - start
    shutil.rmtree(dest)
    return took


if __name__ == "__main__":
    main()
