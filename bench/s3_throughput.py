"""S3 mode against a real SeaweedFS on loopback, in one run:

1. the loader on S3 against a bare server-side copy of the same raw images (boto3 `copy_object`, best of 16 and
   32 threads) into a fresh prefix, which the loader then loads: interleaved, `--rounds` times, min / median /
   max, images/s, MB/s, the ratio (goal, issue 9: at least 0.8x) and the loader's peak memory; then the loader
   on a local store with the same raw data (same seed), and the bytes fetched per raw image to read its header
   (goal: header bytes only, never the whole image);
2. `nccid sync` of a prefix of at least 1 GB against `aws s3 sync` and `s5cmd sync`, each into an empty folder.
   Goals: at least as fast as `aws s3 sync`, at least 0.8x `s5cmd`.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import mb, nccid_cmd, run_measured, spread

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


def server_side_copy(s3: S3Store, keys: list[str], prefix: str, threads: int) -> float:
    """Copy raw objects to `prefix` inside the server (no bytes through the client): the floor for filing."""
    client = s3.client

    def one(key: str) -> None:
        client.copy_object(Bucket=BUCKET, Key=f"{prefix}/{key}", CopySource={"Bucket": BUCKET, "Key": key})

    start = time.perf_counter()
    with cf.ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(one, keys))
    return time.perf_counter() - start


def copy_vs_load(s3: S3Store, raw_prefixes, env: dict, rounds: int, workers: int, scratch: Path) -> None:
    """Each round: copy the raw images server-side into a fresh prefix (the baseline), then load that prefix."""
    images = [i for p in raw_prefixes for i in s3.list(p) if "/images/" in i.key]
    others = [i.key for p in raw_prefixes for i in s3.list(p) if "/images/" not in i.key] + ["config.json"]
    n_bytes = sum(i.size for i in images)
    copies, loads = [], []
    for round_no in range(max(1, rounds)):
        best = min(
            server_side_copy(s3, [i.key for i in images], f"copy-{round_no}-{threads}", threads) for threads in (16, 32)
        )
        copies.append(best)
        target = f"load-{round_no}"
        server_side_copy(s3, [i.key for i in images] + others, target, 16)  # the same raw data, untimed
        cmd = nccid_cmd("warehouse", "load", "--store", f"s3://{BUCKET}/{target}", "--workers", str(workers))
        loads.append(run_measured([*cmd, "--catalog", str(scratch / f"{target}.sqlite")], env=env))
    times = [t for t, _, _ in loads]
    print(f"raw images: {len(images)}, {mb(n_bytes)}; {rounds} rounds; loader with {workers} workers")
    print(f"bare server-side copy (copy_object, best of 16/32 threads): {spread(copies, ' s')}")
    print(f"nccid warehouse load on S3: {spread(times, ' s')}; {spread([len(images) / t for t in times], ' images/s')}")
    print(
        f"ratio loader / server-side copy (medians): {statistics.median(copies) / statistics.median(times):.2f}x "
        f"(goal >= 0.8x); loader peak memory {mb(max(p for _, p, _ in loads))} largest process, "
        f"{mb(max(a for _, _, a in loads))} all processes"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--patients", type=int, default=480)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
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

        copy_vs_load(s3, made.config.raw_prefixes, env, args.rounds, args.workers, scratch)
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
