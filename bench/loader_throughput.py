"""Loader throughput against a plain copy of the same raw bytes on the same disk, in one run.

Makes realistic raw uploads once (radiographs around 2000 x 2500, CT series of 512 x 512 slices; at least 2 GB by
default). Each round then copies them with `cp -r` into a fresh store (the baseline, timed; `cp` carries no
cached checksums, so the store holds the raw data exactly as a site's upload arrives) and runs
`nccid warehouse load` on that copy, for each code variant and worker count in turn: interleaved, the order
rotated each round, so that a noisy neighbour or the previous round's clean-up hurts all of them alike. Dirty
pages are flushed (`sync`, untimed) before each timed step, so no step pays for the previous one's writes.
Prints min / median / max over the rounds of images/s, MB/s, the ratio to the copy, and peak memory. Goal
(issue 9): at least 0.9x the plain copy at every worker count; peak memory under 500 MB.

It also times the work no loader can avoid: the MD5 of every raw byte (the store's checksum contract, which
`cp` does not compute), by as many processes as the loader has workers, and prints the ratio that this floor
alone would give: on a machine with few cores, that, not the loader, bounds the ratio to `cp -r`.

`--variant NAME=SRC` compares code trees in the same run (SRC is a folder holding an `nccid` package, put first
on PYTHONPATH); without it, the installed code runs alone. `--workers 1,2,4` measures each worker count.
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
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


def raw_files(root: Path) -> list[Path]:
    return [p for p in root.glob("raw-*/**/images/**/*") if p.is_file()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=420)
    parser.add_argument("--workers", default="1,2", help="Worker counts to measure, comma-separated (e.g. 1,2,4).")
    parser.add_argument("--rounds", type=int, default=3, help="Rounds of copy + load per variant (at least 3).")
    parser.add_argument("--variant", action="append", default=[], help="NAME=SRC: a code tree to compare.")
    parser.add_argument("--dir", type=Path, default=None, help="Scratch folder (default: a temporary one).")
    args = parser.parse_args()
    worker_counts = [int(w) for w in args.workers.split(",")]
    variants = [tuple(v.split("=", 1)) for v in args.variant] or [("installed", "")]
    runs = [(name, src, w) for w in worker_counts for name, src in variants]
    scratch = Path(tempfile.mkdtemp(prefix="nccid-bench-", dir=args.dir))
    try:
        template = LocalStore(scratch / "template")
        start = time.perf_counter()
        made = generate(template, SynthSpec(seed=7, patients=args.patients))
        print(f"synthesised {made.images} images, {mb(made.bytes)} in {time.perf_counter() - start:.1f} s")
        files = raw_files(template.root)
        n_files, n_bytes = len(files), sum(p.stat().st_size for p in files)
        if n_bytes < 2e9:
            print(f"note: {mb(n_bytes)} of raw images (pass --patients for at least 2 GB)")
        sources = [template.root / p.rstrip("/") for p in made.config.raw_prefixes]
        copies: list[float] = []
        floors: dict[int, list[float]] = {w: [] for w in worker_counts}
        loads: dict[tuple[str, int], list[tuple[float, int, int]]] = {(n, w): [] for n, _, w in runs}
        for round_no in range(max(1, args.rounds)):
            shift = round_no % len(runs)  # each run takes each place in the order in turn
            for name, src, workers in runs[shift:] + runs[:shift]:
                store = scratch / f"store-{round_no}-{name}-{workers}"
                copies.append(plain_copy(sources, store))
                shutil.copy(template.root / "config.json", store / "config.json")
                env = {**os.environ, "PYTHONPATH": src} if src else None
                cmd = nccid_cmd("warehouse", "load", "--store", str(store), "--catalog", str(scratch / "c.sqlite"))
                os.sync()
                loads[(name, workers)].append(run_measured([*cmd, "--workers", str(workers)], env=env))
                shutil.rmtree(store)
                for leftover in scratch.glob("c.sqlite*"):
                    leftover.unlink()
            for workers in worker_counts:
                floors[workers].append(checksum_floor(files, workers))
        print(f"raw images: {n_files} files, {mb(n_bytes)}; {args.rounds} rounds")
        print(f"plain copy (cp -r, no cached checksums): {spread(copies, ' s')}; {spread_rate(copies, n_bytes)}")
        copy = statistics.median(copies)
        for workers in worker_counts:
            floor = statistics.median(floors[workers])
            print(
                f"{workers} worker(s): MD5 of every raw byte alone, {workers} process(es): "
                f"{spread(floors[workers], ' s')}"
                f"; the ceiling it sets: {copy / floor:.2f}x the plain copy"
            )
            for name, _ in variants:
                measured = loads[(name, workers)]
                times = [t for t, _, _ in measured]
                print(
                    f"  [{name}] nccid warehouse load --workers {workers}: {spread(times, ' s')}; "
                    f"{spread([n_files / t for t in times], ' images/s')}; {spread_rate(times, n_bytes)}"
                )
                print(
                    f"  [{name}] ratio loader / plain copy (medians): {copy / statistics.median(times):.2f}x "
                    f"(goal >= 0.9x); loader / checksum floor: {floor / statistics.median(times):.2f}x; "
                    f"peak memory {mb(max(p for _, p, _ in measured))} largest process, "
                    f"{mb(max(s for _, _, s in measured))} all processes (goal < 500 MB)"
                )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def spread_rate(times: list[float], n_bytes: int) -> str:
    return spread([n_bytes / t / 1e6 for t in times], " MB/s")


def plain_copy(sources: list[Path], dest: Path) -> float:
    """`cp -r` the raw prefixes into a new store folder: the baseline, and the load's input."""
    dest.mkdir()
    os.sync()
    start = time.perf_counter()
    subprocess.run(["cp", "-r", *map(str, sources), str(dest)], check=True)
    return time.perf_counter() - start


def _md5(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "md5").hexdigest()


def checksum_floor(files: list[Path], processes: int) -> float:
    """Seconds to MD5 every raw file with `processes` processes (from the page cache, as the loader reads them)."""
    os.sync()
    start = time.perf_counter()
    if processes <= 1:
        for path in files:
            _md5(path)
    else:
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            pool.map(_md5, files, chunksize=8)
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
