"""S3 mode against a real SeaweedFS on loopback, in one run.

1. The loader on S3 against a bare server-side copy of the same raw images (boto3 `copy_object` from a thread
   pool, at the thread count that was fastest in an untimed calibration) into a fresh prefix. Each round, for
   each `--workers` count (and each `--variant` code tree), the raw data is copied (untimed) into a fresh prefix
   that `nccid warehouse load` then files; the baseline and the loads are interleaved and their order rotated
   each round, so that a noisy neighbour or a warm cache hurts all alike. Prints min / median / max over the
   rounds of seconds, images/s and MB/s, the ratio (goal, issue 9: at least 0.8x), the peak memory, the CPU
   seconds of the loader and of SeaweedFS, and the S3 requests per filed image by type, counted by the server
   itself (its audit log: every request of the run, listings and clinical records included), with the bytes
   fetched per raw image to read its header.
2. Unless `--skip-sync`: the loader on a local store against the S3 one (same data), and `nccid sync` of a
   prefix of at least 1 GB against `aws s3 sync` and `s5cmd sync`, each into an empty folder. Goals: at least
   as fast as `aws s3 sync`, at least 0.8x `s5cmd`.

`--variant NAME=SRC` compares code trees in the same run (SRC is a folder holding an `nccid` package, put first
on PYTHONPATH); without it, the installed code runs alone.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from _common import mb, nccid_cmd, run_measured, spread

from nccid.s3server.seaweedfs import SeaweedFS
from nccid.store import LocalStore, ObjectInfo
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


def clear(s3: S3Store, server: SeaweedFS, prefixes: list[str]) -> None:
    """Untimed between rounds: delete what a round wrote and let SeaweedFS reclaim the space (every round
    writes a full copy of the raw data per contender; without this a long run fills the server's volumes)."""
    for prefix in prefixes:
        keys = [{"Key": i.key} for i in s3.list(f"{prefix}/")]
        for start in range(0, len(keys), 1000):
            s3.client.delete_objects(Bucket=BUCKET, Delete={"Objects": keys[start : start + 1000], "Quiet": True})
    try:
        server.shell("lock\nvolume.vacuum -garbageThreshold=0.01\nunlock", timeout=300)
    except Exception as exc:  # only space is at stake: say so and go on
        print(f"note: vacuum after the round failed ({exc}); the server keeps the space")


# -- what the server saw -----------------------------------------------------------------------------------
class AuditTap:
    """The server's own count of requests: the lines its audit log gained between `mark()` and `since()`."""

    def __init__(self, server: SeaweedFS) -> None:
        self.server = server
        self.offsets: dict[Path, int] = {}

    def _settle(self) -> None:
        """Wait until the audit receiver has taken every record (the gateway posts them asynchronously)."""
        receiver = self.server.audit
        last, quiet_since = -1, time.monotonic()
        while receiver is not None and time.monotonic() - quiet_since < 0.6:
            if receiver.records != last:
                last, quiet_since = receiver.records, time.monotonic()
            time.sleep(0.1)

    def mark(self) -> None:
        self._settle()
        self.offsets = {p: p.stat().st_size for p in self.server.audit_dir.glob("access-*.jsonl")}

    def since(self) -> list[dict]:
        self._settle()
        records = []
        for path in sorted(self.server.audit_dir.glob("access-*.jsonl")):
            with open(path, encoding="utf-8") as handle:
                handle.seek(self.offsets.get(path, 0))
                records += [json.loads(line) for line in handle if line.strip()]
        return records


def request_kind(record: dict) -> str:
    """Name one audited request by what it does for the loader (SeaweedFS logs a CopyObject as a PUT)."""
    op, key, status = record.get("operation", ""), record.get("key", "") or "", int(record.get("status") or 0)
    refused = " (refused: exists)" if status == 412 else ""
    if op == "REST.GET.OBJECT" and "/images/" in key:
        return "GET image header (ranged)" if status == 206 else "GET image whole"
    if op == "REST.PUT.OBJECT" and key.endswith(".json") and "-metadata/" in key:
        return "PUT metadata" + refused
    if op == "REST.PUT.OBJECT" and key.endswith(".dcm"):
        return "COPY image" + refused
    if op == "REST.HEAD.OBJECT":
        return "HEAD image" if key.endswith(".dcm") else "HEAD other"
    if op.startswith("REST.GET.BUCKET") or op == "REST.GET.OBJECT_LIST" or (op.startswith("REST.GET") and not key):
        return "LIST"
    if "/data/" in key and key.endswith(".json"):
        return {"REST.GET.OBJECT": "GET clinical", "REST.PUT.OBJECT": "COPY clinical" + refused}.get(op, op)
    return f"{op.removeprefix('REST.')} other"


@dataclass
class Runs:
    """Measurements of one contender (the baseline, or the loader at one worker count of one code tree)."""

    seconds: list[float] = field(default_factory=list)
    peak_one: list[int] = field(default_factory=list)
    peak_all: list[int] = field(default_factory=list)
    cpu_self: list[float] = field(default_factory=list)
    cpu_server: list[float] = field(default_factory=list)
    requests: list[collections.Counter] = field(default_factory=list)
    filed: list[int] = field(default_factory=list)
    header_bytes: list[float] = field(default_factory=list)


def cpu_of(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_report(s3: S3Store, prefix: str) -> dict:
    """The load report the run left in its store (the only one under this fresh prefix)."""
    reports = [i.key for i in s3.list(f"{prefix}/reports/load/")]
    return json.loads(s3.read(reports[-1])) if reports else {}


def copy_vs_load(
    s3: S3Store,
    server: SeaweedFS,
    raw_prefixes: list[str],
    env: dict,
    args: argparse.Namespace,
    variants: list[tuple[str, str]],
    scratch: Path,
) -> None:
    images = [i for p in raw_prefixes for i in s3.list(p) if "/images/" in i.key]
    others = [i.key for p in raw_prefixes for i in s3.list(p) if "/images/" not in i.key] + ["config.json"]
    n_images, n_bytes = len(images), sum(i.size for i in images)
    keys = [i.key for i in images]
    weed = psutil.Process(server.state().weed_pid)
    tap = AuditTap(server)

    calibration = {t: server_side_copy(s3, keys, f"calibrate-{t}", t) for t in args.copy_threads}
    clear(s3, server, [f"calibrate-{t}" for t in args.copy_threads])
    threads = min(calibration, key=calibration.get)
    print(
        "calibration, bare server-side copy (untimed for the ratio): "
        + ", ".join(f"{t} threads {s:.2f} s" for t, s in calibration.items())
        + f"; the baseline uses {threads} threads"
    )

    contenders: list[tuple[str, str, int]] = [("copy", "", 0)] + [
        (f"load {name} w={w}", src, w) for name, src in variants for w in args.workers
    ]
    runs = {label: Runs() for label, _, _ in contenders}
    for round_no in range(max(1, args.rounds)):
        shift = round_no % len(contenders)
        targets = []
        for label, src, workers in contenders[shift:] + contenders[:shift]:
            run = runs[label]
            target = f"r{round_no}-{label.replace(' ', '-').replace('=', '')}"
            targets.append(target)
            if label == "copy":
                tap.mark()
                cpu_server = cpu_of(weed)
                run.seconds.append(server_side_copy(s3, keys, target, threads))
                run.cpu_server.append(cpu_of(weed) - cpu_server)
                run.requests.append(collections.Counter(request_kind(r) for r in tap.since()))
                run.filed.append(n_images)
                continue
            server_side_copy(s3, keys + others, target, threads)  # the same raw data, untimed
            run_env = dict(env)
            if src:
                run_env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH", "")]))
            cmd = nccid_cmd("warehouse", "load", "--store", f"s3://{BUCKET}/{target}", "--workers", str(workers))
            tap.mark()
            cpu_server, cpu_self = cpu_of(weed), children_cpu()
            took, peak_one, peak_all = run_measured([*cmd, "--catalog", str(scratch / f"{target}.sqlite")], env=run_env)
            run.cpu_self.append(children_cpu() - cpu_self)
            run.cpu_server.append(cpu_of(weed) - cpu_server)
            run.requests.append(collections.Counter(request_kind(r) for r in tap.since()))
            run.seconds.append(took)
            run.peak_one.append(peak_one)
            run.peak_all.append(peak_all)
            report = run_report(s3, target)
            run.filed.append(int(report.get("images_filed", 0)))
            run.header_bytes.append(report.get("header_bytes_read", 0) / max(report.get("images_examined", 0), 1))
            if run.filed[-1] == 0:
                raise SystemExit(f"{label}: the loader filed no images into {target}; see its report")
        clear(s3, server, targets)

    print(f"raw images: {n_images}, {mb(n_bytes)}; {args.rounds} rounds, interleaved, order rotated each round")
    base = runs["copy"]
    for label, _, _ in contenders:
        run = runs[label]
        print(f"\n{label}:")
        print(f"  time     {spread(run.seconds, ' s')}")
        print(
            f"  rate     {spread([n_images / t for t in run.seconds], ' images/s')}; "
            f"{spread([n_bytes / t / 1e6 for t in run.seconds], ' MB/s')}"
        )
        cpu = f"  CPU      SeaweedFS {spread(run.cpu_server, ' s')}"
        if run.cpu_self:
            cpu += f"; loader (all processes) {spread(run.cpu_self, ' s')}"
        print(cpu)
        per_image = collections.Counter()
        for counter, filed in zip(run.requests, run.filed, strict=True):
            for kind, n in counter.items():
                per_image[kind] += n / max(filed, 1) / len(run.requests)
        total = sum(per_image.values())
        print(f"  requests per filed image (server audit log, mean of rounds): {total:.2f} in all")
        for kind, n in sorted(per_image.items(), key=lambda kv: -kv[1]):
            print(f"    {n:6.2f}  {kind}")
        if label == "copy":
            continue
        ratios = [c / t for c, t in zip(base.seconds, run.seconds, strict=True)]
        print(
            f"  ratio    loader / server-side copy: "
            f"{statistics.median(base.seconds) / statistics.median(run.seconds):.2f}x"
            f" of the medians (per round {spread(ratios, 'x')}; goal >= 0.8x)"
        )
        print(
            f"  memory   peak {mb(max(run.peak_one))} largest process, {mb(max(run.peak_all))} all processes; "
            f"header bytes fetched per raw image {statistics.median(run.header_bytes):,.0f}"
        )


def sync_section(s3: S3Store, made, spec: SynthSpec, scratch: Path, env: dict) -> None:
    """The loader on a local store against the S3 one, then `nccid sync` against `aws s3 sync` and s5cmd."""
    local = LocalStore(scratch / "local")
    generate(local, spec)
    reports = {}
    for name, store in (("local", local), ("s3", s3)):
        catalog = Catalog(scratch / f"{name}.sqlite")
        reports[name] = load(store, catalog)
        catalog.close()
    lo, re = reports["local"], reports["s3"]
    print(f"\nloader, local store: {lo.duration_s:.1f} s ({lo.images_filed / lo.duration_s:,.0f} images/s)")
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
    listed: list[ObjectInfo] = list(s3.list(prefix))
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


def int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=480)
    parser.add_argument("--rounds", type=int, default=3, help="Rounds of copy and loads (at least 3).")
    parser.add_argument("--workers", type=int_list, default=[os.cpu_count() or 1], help="Loader worker counts: 1,2")
    parser.add_argument("--copy-threads", type=int_list, default=[8, 16, 32], help="Baseline thread counts to try.")
    parser.add_argument("--variant", action="append", default=[], help="NAME=SRC: a code tree to compare.")
    parser.add_argument("--skip-sync", action="store_true", help="Only the loader against the server-side copy.")
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    variants = [tuple(v.split("=", 1)) for v in args.variant] or [("installed", "")]
    scratch = Path(tempfile.mkdtemp(prefix="nccid-bench-s3-", dir=args.dir))
    server = SeaweedFS(scratch / "seaweed")
    try:
        server.start()
        env = {**os.environ, **server.admin_env()}
        os.environ.update(server.admin_env())
        spec = SynthSpec(seed=9, patients=args.patients)
        s3 = S3Store(BUCKET)
        s3.create_bucket()
        start = time.perf_counter()
        made = generate(s3, spec)
        print(
            f"synthesised into {s3.url}: {made.images} images, {mb(made.bytes)} in {time.perf_counter() - start:.1f} s"
        )
        copy_vs_load(s3, server, made.config.raw_prefixes, env, args, variants, scratch)
        if not args.skip_sync:
            sync_section(s3, made, spec, scratch, env)
    finally:
        server.stop()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
