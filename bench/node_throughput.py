"""The site node against DCMTK's storescp as the receiver: same files, same storescu senders, one run.

Makes identifiable PACS images (512 x 512 CT slices with full PACS headers, plus full-size radiographs around
2000 x 2500 to show large objects streaming), split over 4 senders. Each receiver takes them once from a single
association and once from 4 concurrent associations (one storescu per folder). storescp runs with --fork (a
process per association) and writes files as received; the node also matches the patient, pseudonymises,
de-identifies, runs the gate and files the result. Both get the same maximum PDU.

Goal: the node at least 0.5x storescp's throughput with 4 concurrent associations, and not collapsing when the
associations overlap (4 concurrent at least as fast as 1). Peak memory of the node process is printed too.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from nccid.site.templates import read_rows, to_clinical_json, validate_sheet
from nccid.site.vault import PseudonymKey, Vault
from nccid.synth.hospital import filled_template, hospital_patient, pacs_image

STORESCU, STORESCP, ECHOSCU = "/usr/bin/storescu", "/usr/bin/storescp", "/usr/bin/echoscu"
MAX_PDU = "131072"  # DCMTK's upper limit; the node announces at least this
#: DCMTK's switch for TCP_NODELAY: without it each C-STORE waits out a delayed ACK (~45 ms), which would make
#: storescp look ten times slower than it is
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"receiver exited with code {proc.returncode}")
        if subprocess.run([ECHOSCU, "-aec", "NCCID", "127.0.0.1", str(port)], capture_output=True).returncode == 0:
            return
        time.sleep(0.2)
    raise SystemExit("receiver never answered C-ECHO")


class PeakRss:
    """Peak resident memory of a process tree, sampled every 20 ms."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        root = psutil.Process(self.pid)
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, root.memory_info().rss)
            except psutil.NoSuchProcess:
                return
            time.sleep(0.02)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def send(port: int, folders: list[Path]) -> float:
    """Seconds to send every folder, one storescu association per folder, all at once."""
    start = time.perf_counter()
    senders = [
        subprocess.Popen(
            [STORESCU, "-aet", f"PACS{i}", "-aec", "NCCID", "127.0.0.1", str(port), *map(str, sorted(f.iterdir()))],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=DCMTK_ENV,
        )
        for i, f in enumerate(folders)
    ]
    for sender in senders:
        _, err = sender.communicate()
        if sender.returncode != 0:
            raise SystemExit(f"storescu failed: {err.decode()[-500:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ct", type=int, default=240, help="CT slices (512 x 512)")
    parser.add_argument("--radiographs", type=int, default=8, help="full-size CR/DX images")
    parser.add_argument("--associations", type=int, default=4)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="node processes")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="nccid-bench-node-"))
    try:
        rng = random.Random(5)
        people = [hospital_patient(rng) for _ in range(args.associations)]
        folders = [scratch / f"pacs-{i}" for i in range(args.associations)]
        for folder in folders:
            folder.mkdir()
        for n in range(args.ct + args.radiographs):
            i = n % args.associations
            modality, scale = ("CT", 1.0) if n < args.ct else (("CR", "DX")[n % 2], 1.0)
            ds = pacs_image(people[i], rng, modality=modality, seed=str(n), accession=f"ACC{n}", scale=scale)
            ds.save_as(folders[i] / f"{n:05d}.dcm", enforce_file_format=True)
        one = scratch / "one"  # the same files as a single association
        one.mkdir()
        for folder in folders:
            for path in folder.iterdir():
                os.link(path, one / f"{folder.name}-{path.name}")
        total = sum(p.stat().st_size for p in one.iterdir())
        files = len(list(one.iterdir()))
        print(f"{files} files, {total / 1e6:,.0f} MB, from {args.associations} senders (storescu)")

        key = PseudonymKey.generate()
        key_file = key.save(scratch / "site.key")
        vault_path = scratch / "vault.sqlite"
        sheet = scratch / "sheet.csv"  # every patient has a sheet: images are filed, not held
        filled_template(people, str(sheet), defects=False)

        def node_outbox(name: str) -> Path:
            outbox = scratch / name
            (outbox / "data").mkdir(parents=True)
            with Vault(vault_path) as v:
                result = validate_sheet(read_rows(sheet), "positive")
                for record in to_clinical_json(
                    result, centre="X", pseudonymise=lambda c: v.issue([key.encrypt(n) for n in c], actor="bench")
                ):
                    (outbox / "data" / f"{record['Pseudonym']}_data.json").write_text("{}")
            return outbox

        results: dict[tuple[str, int], float] = {}
        peaks: dict[str, int] = {}
        for receiver in ("storescp", "nccid node"):
            for streams in (1, args.associations):
                port = free_port()
                out = scratch / f"out-{receiver.replace(' ', '-')}-{streams}"
                if receiver == "storescp":
                    out.mkdir()
                    cmd = [STORESCP, "--fork", "-aet", "NCCID", "-pdu", MAX_PDU, "-od", str(out), str(port)]
                else:
                    out = node_outbox(out.name)
                    cmd = [sys.executable, "-m", "nccid.cli", "site", "node", str(out), "--port", str(port)]
                    cmd += ["--key-file", str(key_file), "--vault", str(vault_path), "--as", "bench"]
                    cmd += ["--workers", str(args.workers)]
                proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=DCMTK_ENV)
                try:
                    wait_ready(port, proc)
                    peak = PeakRss(proc.pid)
                    took = send(port, [one] if streams == 1 else folders)
                    peaks[receiver] = max(peaks.get(receiver, 0), peak.stop())
                finally:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(20)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                kept = out if receiver == "storescp" else out / "images"
                received = sum(1 for p in kept.rglob("*") if p.is_file())
                if received != files:
                    raise SystemExit(f"{receiver} kept {received} of {files} files")
                results[(receiver, streams)] = took
                rate = files / took
                print(
                    f"{receiver:>10}, {streams} association(s): {took:6.2f} s, {rate:6.1f} files/s, "
                    f"{total / took / 1e6:6.1f} MB/s"
                )
        n = args.associations
        for streams in (1, n):
            ratio = results[("storescp", streams)] / results[("nccid node", streams)]
            print(f"node / storescp, {streams} association(s): {ratio:.2f}x (goal >= 0.5x)")
        overlap = results[("nccid node", 1)] / results[("nccid node", n)]
        print(f"node, {n} concurrent against 1 association: {overlap:.2f}x (goal >= 1.0x: no collapse)")
        print(f"peak RSS: node {peaks['nccid node'] / 1e6:.0f} MB, storescp parent {peaks['storescp'] / 1e6:.0f} MB")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
