"""A no-op re-run over at least 20,000 processed objects, and loader memory as the number of files doubles.

Makes many small CT slices (so file count, not bytes, dominates), loads them, then times a second load that
has nothing to do: in-process and as the `nccid warehouse load` command (which adds interpreter start-up).
The baseline is the least a re-run must do: walk and stat the raw tree. Then loads a set of twice as many
files from scratch and compares peak memory, which must not grow with the number of files.
The headline is the command's time (interpreter start-up included), min / median / max over interleaved runs.
`--variant NAME=SRC` compares code trees in the same run (SRC holds an `nccid` package, put first on
PYTHONPATH); each variant's first load and no-op re-runs use their own catalog on the same store.
Goals: no-op re-run under 1 s as a command (issue 9); peak memory under 500 MB and flat.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from _common import mb, nccid_cmd, run_measured, spread

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
    parser.add_argument("--rounds", type=int, default=5, help="No-op re-runs per variant (interleaved).")
    parser.add_argument("--variant", action="append", default=[], help="NAME=SRC: a code tree to compare.")
    parser.add_argument("--skip-doubling", action="store_true", help="Leave out the memory-as-files-double part.")
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    variants = [tuple(v.split("=", 1)) for v in args.variant] or [("installed", "")]
    scratch = Path(tempfile.mkdtemp(prefix="nccid-bench-", dir=args.dir))
    try:
        peaks = []
        for factor in (1,) if args.skip_doubling else (1, 2):
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
                print(f"processed objects: {processed:,}; raw objects: {raw_count:,}")
                noop_rounds(store, catalog, variants, args.rounds)
                cat = Catalog(catalog)
                start = time.perf_counter()
                report = load(store, cat)
                in_process = time.perf_counter() - start
                cat.close()
                assert sum(report.counts.values()) == 0, report.counts
                walk_s, walked = walk_stat(store.root)
                print(f"no-op re-run in-process (installed code): {in_process:.2f} s")
                print(
                    f"baseline os.walk + stat of the whole store ({walked:,} files): {walk_s:.2f} s; "
                    f"ratio no-op / walk: {in_process / walk_s:.2f}x"
                )
        if len(peaks) == 2:
            (n1, one1, sum1), (n2, one2, sum2) = peaks
            print(
                f"memory as files double ({n1} -> {n2} images): largest process {mb(one1)} -> {mb(one2)}, "
                f"all processes {mb(sum1)} -> {mb(sum2)} (goal: flat, < 500 MB)"
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def noop_rounds(store: LocalStore, loaded: Path, variants: list[tuple[str, str]], rounds: int) -> None:
    """Time `nccid warehouse load` with nothing to do, each variant on its own copy of the loaded catalog."""
    times: dict[str, list[float]] = {name: [] for name, _ in variants}
    catalogs = {}
    for name, _ in variants:
        catalogs[name] = loaded.with_name(f"noop-{name}.sqlite")
        shutil.copy(loaded, catalogs[name])
    for round_no in range(max(1, rounds)):
        shift = round_no % len(variants)  # each variant takes each place in the order in turn
        for name, src in variants[shift:] + variants[:shift]:
            env = {**os.environ, "PYTHONPATH": src} if src else None
            cmd = nccid_cmd("warehouse", "load", "--store", str(store.root), "--catalog", str(catalogs[name]))
            took, _, _ = run_measured(cmd, env=env)
            times[name].append(took)
    for name, values in times.items():
        print(f"[{name}] no-op re-run as a command: {spread(values, ' s')} (goal < 1 s)")


if __name__ == "__main__":
    main()
