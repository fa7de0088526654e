"""CPU per raw image of the loader's examine step, against the MD5 of the same file (the floor the contract sets).

A loader worker, per raw image, MD5s the raw bytes (the checksum contract: no loader avoids it), reads and checks
the header (`read_header`), derives the facts (`image_facts`) and builds the metadata JSON (`metadata_json`), all in
`examine_image`; then the file is copied in the kernel. On a machine with few cores that CPU, not the disk, bounds
the loader (issue 9). This bench makes realistic raw data once (nccid.synth, the awkward cases included: truncated,
not DICOM, no PatientID, SR, secondary capture), then, in a few rounds, measures the CPU seconds
(`time.process_time`, not wall time: the machine is shared) per image of each step and prints min / median / max
over the rounds and each step's ratio to the MD5 of the same files.

Each measurement runs in a fresh process that sees every image once, in the order the loader lists them, as a
new worker does: a worker remembers what it decoded in earlier headers of a series, and re-reading the same files
would flatter that. One process times the steps image by image (MD5, read_header, image_facts, metadata_json);
another times `examine_image` as the loader calls it, on raw data as a site's upload arrives (the store's cached
checksums dropped first, untimed, so it hashes each file). The files are read from the page cache (one untimed
pass warms it), as the loader finds them after the listing.

`--variant NAME=SRC` compares code trees in the same run (SRC is a folder holding an `nccid` package, put first on
PYTHONPATH), the rounds interleaved; without it, the installed code runs alone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import mb, spread

STEPS = ("md5", "read_header", "image_facts", "metadata_json")


def raw_keys(root: Path) -> list[str]:
    """Keys of the raw images (what the loader examines), in the loader's (S3 key) order."""
    return sorted(str(p.relative_to(root)) for p in root.glob("raw-*/**/images/**/*") if p.is_file())


def measure_steps(root: Path) -> dict[str, float]:
    """CPU seconds per raw image of each step, image by image in one pass (a rejected image costs what it cost
    until it was rejected; metadata_json runs on the images whose facts pass, as in examine_image)."""
    from nccid.contracts.dicom import image_facts, metadata_json, read_header
    from nccid.errors import ImageRejected
    from nccid.files import md5_file

    keys = raw_keys(root)
    warm_up(root, keys)
    spent = dict.fromkeys(STEPS, 0.0)
    clock = time.process_time
    for key in keys:
        path = root / key
        t0 = clock()
        md5_file(path)
        t1 = clock()
        spent["md5"] += t1 - t0
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            t0 = clock()
            try:
                ds = read_header(handle, size, bounded=True)
            except ImageRejected:
                spent["read_header"] += clock() - t0
                continue
            t1 = clock()
            spent["read_header"] += t1 - t0
        try:
            image_facts(ds)
        except ImageRejected:
            spent["image_facts"] += clock() - t1
            continue
        t2 = clock()
        spent["image_facts"] += t2 - t1
        with contextlib.suppress(ImageRejected):
            metadata_json(ds)
        spent["metadata_json"] += clock() - t2
    return {step: seconds / len(keys) for step, seconds in spent.items()}


def warm_up(root: Path, keys: list[str]) -> None:
    """What a worker pays once, not per image (untimed): the imports and pydicom's lazy set-up, on the first
    image that can be filed."""
    from nccid.contracts.dicom import image_facts, metadata_json, read_header
    from nccid.errors import ImageRejected

    for key in keys:
        with open(root / key, "rb") as handle, contextlib.suppress(ImageRejected):
            ds = read_header(handle, os.fstat(handle.fileno()).st_size, bounded=True)
            image_facts(ds)
            metadata_json(ds)
            return


def measure_examine(root: Path) -> dict[str, float]:
    """CPU seconds per raw image of `examine_image` over every raw image, as a worker of a first load runs it."""
    from nccid.store import LocalStore
    from nccid.store.local import _XATTR
    from nccid.warehouse.loader import examine_image

    store = LocalStore(root)
    keys = raw_keys(root)
    sizes = {key: (root / key).stat().st_size for key in keys}
    warm_up(root, keys)
    for key in keys:  # raw data as it arrives: no cached checksums (untimed)
        with contextlib.suppress(OSError):
            os.removexattr(root / key, _XATTR)
    start = time.process_time()
    for key in keys:
        examine_image(store, key, sizes[key], checksum="")
    return {"examine_image": (time.process_time() - start) / len(keys)}


def child(what: str, root: Path, src: str) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH", "")]))}
    done = subprocess.run(
        [sys.executable, __file__, "--child", what, "--store", str(root)],
        env=env if src else None,
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=100, help="Synthetic patients (about 500 images at 100).")
    parser.add_argument("--scale", type=float, default=1.0, help="Image size multiplier (1.0: realistic sizes).")
    parser.add_argument("--rounds", type=int, default=5, help="Rounds of every measurement (at least 3).")
    parser.add_argument("--variant", action="append", default=[], help="NAME=SRC: a code tree to compare.")
    parser.add_argument("--dir", type=Path, default=None, help="Scratch folder (default: a temporary one).")
    parser.add_argument("--child", choices=["steps", "examine"], help=argparse.SUPPRESS)
    parser.add_argument("--store", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # one measurement, in a fresh process, of the raw data in --store
        measure = measure_steps if args.child == "steps" else measure_examine
        print(json.dumps(measure(args.store)))
        return
    variants = [tuple(v.split("=", 1)) for v in args.variant] or [("installed", "")]
    scratch = Path(tempfile.mkdtemp(prefix="nccid-examine-", dir=args.dir))
    try:
        from nccid.store import LocalStore
        from nccid.synth.national import SynthSpec, generate

        root = scratch / "store"
        made = generate(LocalStore(root), SynthSpec(seed=11, patients=args.patients, scale=args.scale))
        keys = raw_keys(root)
        total = sum((root / key).stat().st_size for key in keys)
        for key in keys:  # warm the page cache, as the listing leaves it for the workers
            (root / key).read_bytes()
        print(
            f"raw images: {len(keys)} files, {mb(total)} ({mb(total / len(keys))} each on average; "
            f"synthesised {made.images} images and the awkward files)"
        )
        rounds = max(3, args.rounds)
        found: dict[str, dict[str, list[float]]] = {name: {} for name, _ in variants}
        for round_no in range(rounds):
            shift = round_no % len(variants)  # each variant takes each place in the order in turn
            for name, src in variants[shift:] + variants[:shift]:
                for what in ("steps", "examine"):
                    for step, seconds in child(what, root, src).items():
                        found[name].setdefault(step, []).append(seconds)
        print(f"CPU per raw image, {rounds} rounds, each a fresh process seeing every image once (process_time):")
        medians: dict[str, float] = {}
        for name, _ in variants:
            steps = found[name]
            md5 = statistics.median(steps["md5"])
            print(f"  [{name}]")
            for step, values in steps.items():
                print(
                    f"    {step:<14} {spread([v * 1000 for v in values], ' ms'):<44} "
                    f"{statistics.median(values) / md5:5.2f}x the MD5"
                )
            header = sum(statistics.median(steps[s]) for s in ("read_header", "image_facts", "metadata_json"))
            beyond = statistics.median(steps["examine_image"]) - md5
            medians[name] = header
            print(
                f"    read_header + image_facts + metadata_json: {header * 1000:.3f} ms per image "
                f"({header / md5:.2f}x the MD5); examine_image beyond the MD5: {beyond * 1000:.3f} ms "
                f"({beyond / md5:.2f}x; medians)"
            )
        if len(variants) > 1:
            first = variants[0][0]
            for name, _ in variants[1:]:
                saved = medians[first] - medians[name]
                print(
                    f"[{name}] header + facts + JSON: {medians[name] / medians[first]:.2f}x the CPU of [{first}] "
                    f"({saved * 1000:+.3f} ms per image saved)"
                )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
