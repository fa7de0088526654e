"""A no-op re-run over at least 20,000 processed objects, and loader memory as the number of files doubles.

Makes many small CT slices (so file count, not bytes, dominates), loads them, then times a second load that
has nothing to do: in-process and as the `nccid warehouse load` command (which adds interpreter start-up).
The baseline is the least a re-run must do: walk and stat the raw tree. Then loads a set of twice as many
files from scratch and compares peak memory, which must not grow with the number of files.
Goals: no-op re-run under 2 s; peak memory under 500 MB and flat.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from _common import mb, nccid_cmd, run_measured

from nccid.store import LocalStore
from nccid.synth.national import SynthSpec, generate
from nccid.warehouse.catalog import Catalog
from nccid.warehouse.loader import load


def spec(images: int) -> SynthSpec:
    """All CT series of about 80 small slices, 1.25 studies a patient on average."""
    patients = max(10, int(images / 80 / 1.25))
    return SynthSpec(
        seed=3,
        patients=patients,
        imaged_fraction=2.0,
        scale=0.03,
        ct_slices=(75, 85),
        xray_share=0.0,
        mr_share=0.0,
        awkward=False,
    )


def walk_stat(root: Path) -> tuple[float, int]:
    start = time.perf_counter()
    n = 0
    for folder, _, names in os.walk(root):
        for name in names:
            os.stat(os.path.join(folder, name))
            n += 1
    return time.perf_counter() - start, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=11_000, help="Images in the smaller set.")
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="nccid-bench-", dir=args.dir))
    try:
        peaks = []
        for factor in (1, 2):
            store = LocalStore(scratch / f"store{factor}")
            made = generate(store, spec(args.images * factor))
            catalog = scratch / f"catalog{factor}.sqlite"
            cmd = nccid_cmd("warehouse", "load", "--store", str(store.root), "--catalog", str(catalog))
            took, peak_one, peak_sum = run_measured(cmd)
            peaks.append((made.images, peak_one, peak_sum))
            print(
                f"first load of {made.images} small images: {took:.1f} s ({made.images / took:,.0f} images/s), "
                f"peak {mb(peak_one)} largest process, {mb(peak_sum)} all processes"
            )
            if factor == 1:
                processed = sum(1 for g in ("training/", "validation/") for _ in store.list(g))
                raw_count = sum(1 for p in made.config.raw_prefixes for _ in store.list(p))
                cat = Catalog(catalog)
                start = time.perf_counter()
                report = load(store, cat)
                in_process = time.perf_counter() - start
                cat.close()
                assert sum(report.counts.values()) == 0, report.counts
                command_s, _, _ = run_measured(cmd)
                walk_s, walked = walk_stat(store.root)
                print(f"processed objects: {processed:,}; raw objects: {raw_count:,}")
                print(f"no-op re-run: {in_process:.2f} s in-process, {command_s:.2f} s as a command (goal < 2 s)")
                print(
                    f"baseline os.walk + stat of the whole store ({walked:,} files): {walk_s:.2f} s; "
                    f"ratio no-op / walk: {in_process / walk_s:.2f}x"
                )
        (n1, one1, sum1), (n2, one2, sum2) = peaks
        print(
            f"memory as files double ({n1} -> {n2} images): largest process {mb(one1)} -> {mb(one2)}, "
            f"all processes {mb(sum1)} -> {mb(sum2)} (goal: flat, < 500 MB)"
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
