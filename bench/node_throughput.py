"""The site node against DCMTK's storescp as the receiver: same files, same storescu senders, one run.

Makes identifiable PACS images (512 x 512 CT slices with full PACS headers, plus full-size radiographs around
2000 x 2500 to show large objects streaming), split over 4 senders. Each receiver takes them from a single
association and from 4 concurrent associations (one storescu per folder), best of `--repeat` runs (this machine
is shared and noisy). The receivers:

- `storescp --fork` (DCMTK, a process per association) writes files as received;
- `pynetdicom, empty handler`: the node's own transport and worker processes with a C-STORE handler that does
  nothing; pynetdicom still streams each data set to the spool. This is the ceiling for any node on pynetdicom:
  what is left when matching, pseudonymising, de-identifying, the gate and filing cost nothing;
- `nccid node`: the site node, which also does all of those;
- `orthanc + anonymise` (Orthanc from Debian, `apt-get install orthanc`): a system doing the same job, receive
  and de-identify. Its Lua `OnStoredInstance` callback anonymises each instance on arrival with the REST call
  `/instances/{id}/anonymize` (Orthanc's DICOM basic profile), stores the anonymised copy and deletes the
  identifiable original, as the node does. Orthanc runs the callbacks after it has answered the C-STORE, so its
  time runs until the last anonymised copy is stored, not until the sender is done.

All get the same maximum PDU. Printed: files/s, CPU seconds per file of the receiver (its processes and their
children), the ratios, and the node's peak memory. Receivers are interleaved within each repeat.

Goals: the node at least as fast as Orthanc (receive + anonymise) with 4 associations; at least 0.5x storescp's
throughput with 4 concurrent associations; not collapsing when the associations overlap (4 concurrent at least
as fast as 1).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil

from nccid.s3server.seaweedfs import free_port
from nccid.site.templates import read_rows, to_clinical_json, validate_sheet
from nccid.site.vault import PseudonymKey, Vault
from nccid.synth.hospital import filled_template, hospital_patient, pacs_image

STORESCU, STORESCP, ECHOSCU = "/usr/bin/storescu", "/usr/bin/storescp", "/usr/bin/echoscu"
ORTHANC = "/usr/sbin/Orthanc"
#: Orthanc's Lua: anonymise each instance as it is stored, keep the anonymised copy, delete the original, and
#: count it in a progress file (one byte per instance) that the bench watches
ORTHANC_LUA = """
function OnStoredInstance(instanceId, tags, metadata, origin)
   if origin['RequestOrigin'] ~= 'Lua' then
      local anonymised = RestApiPost('/instances/' .. instanceId .. '/anonymize', '{}')
      RestApiPost('/instances', anonymised)
      RestApiDelete('/instances/' .. instanceId)
      local progress = io.open(PROGRESS, 'a')
      progress:write('1')
      progress:close()
   end
end
"""
MAX_PDU = "131072"  # DCMTK's upper limit; the node announces at least this
#: DCMTK's switch for TCP_NODELAY: without it each C-STORE waits out a delayed ACK (~45 ms), which would make
#: storescp look ten times slower than it is
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def wait_ready(port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"receiver exited with code {proc.returncode}")
        if subprocess.run([ECHOSCU, "-aec", "NCCID", "127.0.0.1", str(port)], capture_output=True).returncode == 0:
            return
        time.sleep(0.2)
    raise SystemExit("receiver never answered C-ECHO")


class Sampler:
    """Peak resident memory of a process tree, sampled every 20 ms, and the CPU time it used meanwhile."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.peak, self._stop = 0, threading.Event()
        self._start = self._tree_cpu()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _tree_cpu(self) -> float:
        """CPU seconds of the root, its reaped children (storescp's forks) and its living ones (node workers)."""
        total = 0.0
        for proc in [self.root, *self.root.children(recursive=True)]:
            try:
                t = proc.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += t.user + t.system + (t.children_user + t.children_system if proc is self.root else 0.0)
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.root.memory_info().rss)
            except psutil.NoSuchProcess:
                return
            time.sleep(0.02)

    def stop(self) -> tuple[int, float]:
        """(peak RSS in bytes, CPU seconds used since the start)."""
        self._stop.set()
        self._thread.join()
        return self.peak, self._tree_cpu() - self._start


def serve_empty(port: int, workers: int, spool: Path) -> None:
    """The node's transport and workers with a C-STORE handler that does nothing (see the module docstring)."""
    import multiprocessing

    from pynetdicom import AE, _config, evt

    from nccid.site.deid import ALLOWED_SOP_CLASSES
    from nccid.site.node import TRANSFER_SYNTAXES, VERIFICATION, NodeConfig
    from nccid.site.transport import start_server

    def serve() -> None:
        _config.STORE_RECV_CHUNKED_DATASET = True
        tempfile.tempdir = str(spool)
        ae = AE(ae_title="NCCID")
        ae.maximum_pdu_size = NodeConfig(Path(".")).max_pdu
        ae.add_supported_context(VERIFICATION)
        for sop_class in sorted(ALLOWED_SOP_CLASSES):
            ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
        start_server(ae, ("127.0.0.1", port), [(evt.EVT_C_STORE, lambda event: 0x0000)], share_port=workers > 1)
        signal.sigwait({signal.SIGTERM})

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    children = [multiprocessing.get_context("fork").Process(target=serve, daemon=True) for _ in range(workers - 1)]
    for child in children:
        child.start()
    try:
        serve()
    finally:
        for child in children:
            child.terminate()


def orthanc_command(folder: Path, port: int, http_port: int) -> list[str]:
    """Orthanc listening as AE NCCID on `port`, anonymising on arrival (see ORTHANC_LUA), its storage in `folder`."""
    folder.mkdir()
    (folder / "prelude.lua").write_text(f"PROGRESS = {json.dumps(str(folder / 'progress'))}\n")
    (folder / "anonymise.lua").write_text(ORTHANC_LUA)
    config = {
        "Name": "bench",
        "StorageDirectory": str(folder / "db"),
        "IndexDirectory": str(folder / "db"),
        "StorageCompression": False,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomAet": "NCCID",
        "DicomPort": port,
        "DicomCheckCalledAet": True,
        "MaximumPduLength": int(MAX_PDU),
        "DicomThreadsCount": 4,
        "LuaScripts": [str(folder / "prelude.lua"), str(folder / "anonymise.lua")],
        "Plugins": [],
        "SaveJobs": False,
    }
    (folder / "orthanc.json").write_text(json.dumps(config))
    return [ORTHANC, str(folder / "orthanc.json")]


def orthanc_wait(folder: Path, files: int, proc: subprocess.Popen, limit: float = 900.0) -> None:
    """Wait until Orthanc's Lua has anonymised `files` instances (bounded)."""
    progress = folder / "progress"
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if progress.exists() and progress.stat().st_size >= files:
            return
        if proc.poll() is not None:
            raise SystemExit(f"Orthanc exited with code {proc.returncode}")
        time.sleep(0.01)
    raise SystemExit(f"Orthanc anonymised {progress.stat().st_size if progress.exists() else 0} of {files} in time")


def orthanc_instances(http_port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/statistics", timeout=30) as answer:
        return int(json.load(answer)["CountInstances"])


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
    parser.add_argument("--repeat", type=int, default=3, help="runs per receiver and association count; best kept")
    parser.add_argument("--serve-empty", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--spool", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_empty:
        serve_empty(args.serve_empty, args.workers, args.spool)
        return
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

        receivers = ["storescp", "pynetdicom, empty handler", "nccid node"]
        if os.path.exists(ORTHANC):
            receivers.append("orthanc + anonymise")
        else:
            print(f"{ORTHANC} not found (apt-get install orthanc): Orthanc left out of the comparison")
        results: dict[tuple[str, int], tuple[float, float]] = {}  # (receiver, streams) -> (seconds, CPU s)
        peak_node = peak_orthanc = 0
        for attempt in range(args.repeat):  # receivers interleaved, so a slow spell of the machine hits them all
            for streams in (1, args.associations):
                for receiver in receivers:
                    port = free_port()
                    out = scratch / f"out-{receivers.index(receiver)}-{streams}-{attempt}"
                    http_port = free_port()
                    if receiver == "orthanc + anonymise":
                        cmd = orthanc_command(out, port, http_port)
                    elif receiver == "storescp":
                        out.mkdir()
                        cmd = [STORESCP, "--fork", "-aet", "NCCID", "-pdu", MAX_PDU, "-od", str(out), str(port)]
                    elif receiver == "nccid node":
                        out = node_outbox(out.name)
                        cmd = [sys.executable, "-m", "nccid.cli", "site", "node", str(out), "--port", str(port)]
                        cmd += ["--key-file", str(key_file), "--vault", str(vault_path), "--as", "bench"]
                        cmd += ["--workers", str(args.workers)]
                    else:
                        out.mkdir(mode=0o700)
                        cmd = [sys.executable, __file__, "--serve-empty", str(port), "--workers", str(args.workers)]
                        cmd += ["--spool", str(out)]
                    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=DCMTK_ENV)
                    try:
                        wait_ready(port, proc)
                        sampler = Sampler(proc.pid)
                        started = time.perf_counter()
                        send(port, [one] if streams == 1 else folders)
                        if receiver == "orthanc + anonymise":
                            orthanc_wait(out, files, proc)
                        took = time.perf_counter() - started
                        time.sleep(0.1)  # let storescp's last forks exit, so their CPU is counted
                        peak, cpu = sampler.stop()
                        if receiver == "orthanc + anonymise" and orthanc_instances(http_port) != files:
                            raise SystemExit(f"Orthanc kept {orthanc_instances(http_port)} of {files} instances")
                    finally:
                        proc.send_signal(signal.SIGTERM)
                        try:
                            proc.wait(20)
                        except subprocess.TimeoutExpired:
                            proc.kill()
                    if receiver in ("storescp", "nccid node"):
                        kept = out if receiver == "storescp" else out / "images"
                        received = sum(1 for p in kept.rglob("*") if p.is_file())
                        if received != files:
                            raise SystemExit(f"{receiver} kept {received} of {files} files")
                    if receiver == "nccid node":
                        peak_node = max(peak_node, peak)
                    if receiver == "orthanc + anonymise":
                        peak_orthanc = max(peak_orthanc, peak)
                    shutil.rmtree(out, ignore_errors=True)  # the next run starts on an emptier disk
                    best = results.get((receiver, streams))
                    if best is None or took < best[0]:
                        results[(receiver, streams)] = (took, cpu)
        for streams in (1, args.associations):
            for receiver in receivers:
                took, cpu = results[(receiver, streams)]
                print(
                    f"{receiver:>26}, {streams} association(s): {took:6.2f} s, {files / took:6.1f} files/s, "
                    f"{total / took / 1e6:6.1f} MB/s, {cpu / files * 1000:5.1f} ms CPU per file"
                )
        n = args.associations
        goals = {
            "pynetdicom, empty handler": " (the ceiling on pynetdicom)",
            "nccid node": " (goal >= 0.5x)",
            "orthanc + anonymise": " (a peer doing the same job)",
        }
        for receiver in receivers[1:]:
            for streams in (1, n):
                ratio = results[("storescp", streams)][0] / results[(receiver, streams)][0]
                print(f"{receiver} / storescp, {streams} association(s): {ratio:.2f}x{goals[receiver]}")
        if "orthanc + anonymise" in receivers:
            for streams in (1, n):
                ratio = results[("orthanc + anonymise", streams)][0] / results[("nccid node", streams)][0]
                goal = " (goal >= 1.0x)" if streams == n else ""
                print(f"nccid node / orthanc + anonymise, {streams} association(s): {ratio:.2f}x{goal}")
            print(f"peak RSS of Orthanc: {peak_orthanc / 1e6:.0f} MB")
        overlap = results[("nccid node", 1)][0] / results[("nccid node", n)][0]
        print(f"node, {n} concurrent against 1 association: {overlap:.2f}x (goal >= 1.0x: no collapse)")
        print(f"peak RSS of the node's main process: {peak_node / 1e6:.0f} MB")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
