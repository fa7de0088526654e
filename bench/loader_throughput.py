"""Loader throughput against a plain copy of the same raw bytes on the same disk, in one run.

Makes realistic raw uploads once (radiographs around 2000 x 2500, CT series of 512 x 512 slices; at least 2 GB by
default). Each round then copies them with `cp -r` into a fresh store (the baseline, timed; `cp` carries no
cached checksums, so the store holds the raw data exactly as a site's upload arrives) and runs
`nccid warehouse load` on that copy, for each code variant in turn: interleaved, the order rotated each round,
so that a noisy neighbour or the previous round's clean-up hurts all of them alike. Prints min / median / max
over the rounds of images/s, MB/s, the ratio to the copy, and peak memory. Goal (issue 9): at least 0.9x the
plain copy at every worker count; peak memory under 500 MB.

`--variant NAME=SRC` compares code trees in the same run (SRC is a folder holding an `nccid` package, put first
on PYTHONPATH); without it, the installed code runs alone.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from _common import mb, nccid_cmd, run_measured, spread

from nccid.store import LocalStore
from nccid.synth.national import SynthSpec, generate


def raw_bytes(root: Path) -> tuple[int, int]:
    files = [p for p in root.glob("raw-*/**/images/**/*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=420)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="Rounds of copy + load per variant (at least 3).")
    parser.add_argument("--variant", action="append", default=[], help="NAME=SRC: a code tree to compare.")
    parser.add_argument("--dir", type=Path, default=None, help="Scratch folder (default: a temporary one).")
    args = parser.parse_args()
    variants = [tuple(v.split("=", 1)) for v in args.variant] or [("installed", "")]
    scratch = Path(tempfile.mkdtemp(prefix="nccid-bench-", dir=args.dir))
    try:
        template = LocalStore(scratch / "template")
        start = time.perf_counter()
        made = generate(template, SynthSpec(seed=7, patients=args.patients))
        print(f"synthesised {made.images} images, {mb(made.bytes)} in {time.perf_counter() - start:.1f} s")
        n_files, n_bytes = raw_bytes(template.root)
        if n_bytes < 2e9:
            print(f"note: {mb(n_bytes)} of raw images (pass --patients for at least 2 GB)")
        sources = [template.root / p.rstrip("/") for p in made.config.raw_prefixes]
        copies: list[float] = []
        loads: dict[str, list[tuple[float, int, int]]] = {name: [] for name, _ in variants}
        for round_no in range(max(1, args.rounds)):
            shift = round_no % len(variants)  # each variant takes each place in the order in turn
            for name, src in variants[shift:] + variants[:shift]:
                store = scratch / f"store-{round_no}-{name}"
                copies.append(plain_copy(sources, store))
                shutil.copy(template.root / "config.json", store / "config.json")
                env = {**os.environ, "PYTHONPATH": src} if src else None
                cmd = nccid_cmd("warehouse", "load", "--store", str(store), "--catalog", str(scratch / "c.sqlite"))
                loads[name].append(run_measured([*cmd, "--workers", str(args.workers)], env=env))
                shutil.rmtree(store)
                for leftover in scratch.glob("c.sqlite*"):
                    leftover.unlink()
        print(f"raw images: {n_files} files, {mb(n_bytes)}; {args.rounds} rounds, {args.workers} workers")
        print(f"plain copy (cp -r, no cached checksums): {spread(copies, 's')}; {spread_rate(copies, n_bytes)}")
        best_copy = statistics.median(copies)
        for name, runs in loads.items():
            times = [t for t, _, _ in runs]
            print(
                f"[{name}] nccid warehouse load: {spread(times, 's')}; "
                f"{spread([n_files / t for t in times], ' images/s')}; {spread_rate(times, n_bytes)}"
            )
            print(
                f"[{name}] ratio loader / plain copy (medians): {best_copy / statistics.median(times):.2f}x "
                f"(goal >= 0.9x); peak memory {mb(max(p for _, p, _ in runs))} largest process, "
                f"{mb(max(s for _, _, s in runs))} all processes (goal < 500 MB)"
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def spread_rate(times: list[float], n_bytes: int) -> str:
    return spread([n_bytes / t / 1e6 for t in times], " MB/s")


def plain_copy(sources: list[Path], dest: Path) -> float:
    """`cp -r` the raw prefixes into a new store folder: the baseline, and the load's input."""
    dest.mkdir()
    start = time.perf_counter()
    subprocess.run(["cp", "-r", *map(str, sources), str(dest)], check=True)
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
