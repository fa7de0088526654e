"""S3 mode against a real SeaweedFS on loopback, in one run:

1. the loader on S3 against the loader on a local store, same raw data (same seed): time, ratio, and the bytes
   fetched per raw image to read its header (goal: header bytes only, never the whole image);
2. `nccid sync` of a prefix of at least 1 GB against `aws s3 sync` and `s5cmd sync`, each into an empty folder.
   Goals: at least as fast as `aws s3 sync`, at least 0.8x `s5cmd`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import mb

from nccid.s3server.seaweedfs import SeaweedFS
from nccid.store import LocalStore
from nccid.store.s3 import S3Store
from nccid.synth.national import SynthSpec, generate
from nccid.warehouse.catalog import Catalog
from nccid.warehouse.loader import load

BUCKET = "nccid-data-warehouse-prod"


def folder_bytes(folder: Path) -> tuple[int, int]:
    files = [p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")]
    return len(files), sum(p.stat().st_size for p in files)


def timed(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--patients", type=int, default=480)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="nccid-bench-s3-", dir=args.dir))
    server = SeaweedFS(scratch / "seaweed")
    try:
        server.start()
        env = {**os.environ, **server.admin_env()}
        os.environ.update(server.admin_env())
        spec = SynthSpec(seed=9, patients=args.patients)
        local = LocalStore(scratch / "local")
        s3 = S3Store(BUCKET)
        s3.create_bucket()
        for store in (local, s3):
            start = time.perf_counter()
            made = generate(store, spec)
            print(
                f"synthesised into {store.url}: {made.images} images, {mb(made.bytes)} in "
                f"{time.perf_counter() - start:.1f} s"
            )

        reports = {}
        for name, store in (("local", local), ("s3", s3)):
            catalog = Catalog(scratch / f"{name}.sqlite")
            reports[name] = load(store, catalog)
            catalog.close()
        lo, re = reports["local"], reports["s3"]
        print(f"loader, local store: {lo.duration_s:.1f} s ({lo.images_filed / lo.duration_s:,.0f} images/s)")
        print(
            f"loader, S3 store:    {re.duration_s:.1f} s ({re.images_filed / re.duration_s:,.0f} images/s); "
            f"ratio S3 / local throughput: {lo.duration_s / re.duration_s:.2f}x"
        )
        per_image = re.header_bytes_read / max(re.images_examined, 1)
        print(
            f"bytes fetched per raw image to read its header on S3: {per_image:,.0f} "
            f"(mean raw image: {made.bytes / max(made.images, 1):,.0f} bytes; "
            f"{re.header_bytes_read / max(made.bytes, 1):.2%} of all raw bytes)"
        )

        prefix = "training/"
        listed = list(s3.list(prefix))
        total = sum(i.size for i in listed)
        print(f"sync prefix s3://{BUCKET}/{prefix}: {len(listed)} objects, {mb(total)}")
        if total < 1e9:
            print("warning: under 1 GB; pass --patients for more")
        nccid = [sys.executable, "-m", "nccid.cli", "sync", prefix, "", "--store", f"s3://{BUCKET}", "--workers", "8"]
        s5cmd = shutil.which("s5cmd") or str(Path(sys.executable).parent / "s5cmd")
        aws = shutil.which("aws") or str(Path(sys.executable).parent / "aws")
        runs = {
            "nccid sync": lambda dest: [*nccid[:5], str(dest), *nccid[6:]],
            "aws s3 sync": lambda dest: [aws, "s3", "sync", f"s3://{BUCKET}/{prefix}", str(dest), "--only-show-errors"],
            "s5cmd sync": lambda dest: [
                s5cmd,
                "--endpoint-url",
                env["AWS_ENDPOINT_URL"],
                "sync",
                f"s3://{BUCKET}/{prefix}*",
                f"{dest}/",
            ],
        }
        times = {}
        for name, make in runs.items():
            dest = scratch / name.replace(" ", "-")
            times[name] = timed(make(dest), env)
            files, size = folder_bytes(dest)
            assert (files, size) == (len(listed), total), (name, files, size)
            print(f"{name:12s}: {times[name]:.1f} s = {total / times[name] / 1e6:,.0f} MB/s")
            shutil.rmtree(dest)
        print(f"ratio nccid / aws s3 sync throughput: {times['aws s3 sync'] / times['nccid sync']:.2f}x (goal >= 1)")
        print(f"ratio nccid / s5cmd sync throughput:  {times['s5cmd sync'] / times['nccid sync']:.2f}x (goal >= 0.8)")
    finally:
        server.stop()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
