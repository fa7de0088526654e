"""The site node under attack and under faults (issue 13.5-13.7, 10.8, 14.6): stalled peers cannot lock out the PACS,
workers die with their parent, every failure is answered, recorded and leaves nothing identifiable behind, and
the node leaves the process's global settings as it found them.

Nodes run as `nccid site node` in their own process (started and stopped by PID) unless a test needs to reach
inside one; peers are DCMTK's tools by absolute path, pynetdicom as SCU, or raw sockets for the half-sent PDUs
no well-behaved peer would send. Every process a test starts is checked by PID when it ends
(`nothing_left_running`, from test_node.py).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import pydicom
import pydicom.config
import pytest
from helpers import run_cli
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import BasicTextSRStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from test_node import (  # noqa: F401  (nothing_left_running: the autouse fixture, in this module too)
    ECHOSCU,
    STORESCU,
    nothing_left_running,
    people_and_images,
    start_node,
    started,
    stop_node,
)

from nccid.errors import UsageError
from nccid.site import transport
from nccid.site.node import (
    STATUS_MALFORMED,
    STATUS_NODE_ERROR,
    STATUS_OUT_OF_RESOURCES,
    STATUS_SUCCESS,
    NodeConfig,
    Receiver,
    SiteNode,
    node_events,
    refused_contexts,
)
from nccid.site.outbox import Outbox, SiteSettings
from nccid.site.pseudonymiser import Pseudonymiser
from nccid.site.vault import PseudonymKey
from nccid.synth.hospital import hospital_patient, pacs_image

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def _echo(port: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [ECHOSCU, "-to", "20", "-ta", "20", "-td", "20", "-aec", "NCCID", "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _still_open(sock: socket.socket) -> bool:
    """True if the node has not closed this connection (nothing to read yet, no end of file)."""
    sock.setblocking(False)
    try:
        return sock.recv(1) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.setblocking(True)


def _closed_by_node(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def test_stalled_peers_and_half_sent_requests_cannot_lock_out_the_pacs(tmp_path):
    """32 associations each send a P-DATA header claiming 1 MiB, 100 bytes, and stop; more connections send half
    an A-ASSOCIATE-RQ or nothing. The node has 8 association slots: a C-ECHO is still answered while they all
    hang, and the node closes every stalled connection after its timeouts."""
    node = start_node(
        tmp_path,
        options=("--workers", "1", "--max-associations", "8", "--read-timeout", "10", "--acse-timeout", "10"),
    )
    ae = AE(ae_title="STALLER")
    ae.network_timeout = ae.acse_timeout = None  # only the node may end these associations
    ae.add_requested_context(CT_IMAGE_STORAGE)
    stalled, raw = [], []
    try:
        for _ in range(32):
            assoc = ae.associate("127.0.0.1", node.port, ae_title="NCCID")
            stalled.append(assoc)
            assert assoc.is_established  # stalled peers do not hold the 8 slots
            assoc.dul.socket.send(struct.pack(">BBL", 0x04, 0, 1 << 20) + b"\0" * 100)
            time.sleep(0.02)  # the node has read the 100 bytes and is waiting for the rest
        for n in range(12):
            sock = socket.create_connection(("127.0.0.1", node.port), timeout=10)
            if n % 2 == 0:  # half an A-ASSOCIATE-RQ: the header claims 300 bytes, 4 arrive
                sock.sendall(b"\x01\x00" + struct.pack(">L", 300) + b"\x00\x01\x00\x00")
            raw.append(sock)

        echo = _echo(node.port)
        assert echo.returncode == 0, echo.stdout + echo.stderr
        assert all(assoc.is_established for assoc in stalled)  # the echo was answered while they all hang
        assert all(_still_open(sock) for sock in raw)

        assert all(_closed_by_node(sock, within=40) for sock in raw)
        deadline = time.monotonic() + 40
        while any(assoc.is_established for assoc in stalled) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(assoc.is_established for assoc in stalled)
        assert all(assoc.is_aborted for assoc in stalled)  # ended by the node, not released by the peer
        assert _echo(node.port).returncode == 0
    finally:
        for assoc in stalled:
            if assoc.is_alive():
                assoc.abort()
        for sock in raw:
            sock.close()
        stop_node(node)


def test_workers_die_with_the_main_process_even_on_kill_9(tmp_path):
    node = start_node(tmp_path, options=("--workers", "2"))
    main = psutil.Process(node.proc.pid)
    workers = main.children(recursive=True)
    assert len(workers) == 1
    listening = [w for w in workers if any(c.laddr.port == node.port for c in w.net_connections(kind="tcp"))]
    assert listening == workers

    os.kill(node.proc.pid, signal.SIGKILL)
    node.proc.wait(timeout=30)

    def gone(process: psutil.Process) -> bool:
        try:
            return process.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    deadline = time.monotonic() + 30
    while not all(gone(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(gone(w) for w in workers), [w.pid for w in workers if not gone(w)]
    assert _echo(node.port).returncode != 0  # nobody serves the port: a new node can start cleanly
    again = start_node(tmp_path, outbox=node.outbox)
    try:
        assert list((node.outbox / ".spool").iterdir()) == []
    finally:
        stop_node(again)


def _store(port: int, ds: Dataset) -> Dataset:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(ds.SOPClassUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="NCCID")
    assert assoc.is_established
    try:
        return assoc.send_c_store(ds)
    finally:
        assoc.release()


@contextlib.contextmanager
def _node_in_process(outbox: Path, **config):
    node = SiteNode(
        NodeConfig(outbox, port=0, **config), key=PseudonymKey.generate(), pseudonymise=lambda c: ["Covid12345"]
    )
    node.start()
    try:
        yield node
    finally:
        node.stop()


def _settings() -> tuple:
    settings = pydicom.config.settings
    return (
        tempfile.tempdir,
        _config.STORE_RECV_CHUNKED_DATASET,
        settings.reading_validation_mode,
        settings.writing_validation_mode,
    )


def test_a_node_leaves_the_process_settings_as_it_found_them(tmp_path):
    before = _settings()
    with _node_in_process(tmp_path / "outbox") as node:
        assert _settings() != before  # while it runs, pynetdicom spools to the node's own folder
        assert tempfile.gettempdir() == str(node.config.spool)
        port = node.config.port
        stalled = socket.create_connection(("127.0.0.1", port), timeout=10)  # still hanging when the node stops
        stalled.sendall(b"\x01\x00" + struct.pack(">L", 300) + b"\x00\x01")
    assert _settings() == before
    assert _closed_by_node(stalled, within=30)
    stalled.close()
    with socket.socket() as taken:  # a node that cannot listen changes nothing either
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        node = SiteNode(
            NodeConfig(tmp_path / "outbox", port=taken.getsockname()[1]),
            key=PseudonymKey.generate(),
            pseudonymise=lambda c: ["Covid12345"],
        )
        with pytest.raises(OSError):
            node.start()
    assert _settings() == before
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=5)


def test_an_error_inside_the_node_is_answered_recorded_without_identifiers_and_leaves_no_spool_file(tmp_path):
    rng = random.Random(4)
    person = hospital_patient(rng)
    ds = pacs_image(person, rng, modality="CT", seed="err", scale=0.25)
    with _node_in_process(tmp_path / "outbox") as node:

        def fails(path, *, sop_instance=""):
            raise RuntimeError(f"{person.family} {person.nhs}")  # an exception whose message quotes identifiers

        node.receiver.receive = fails
        response = _store(node.config.port, ds)
        spooled = list(node.config.spool.iterdir())
    assert response.Status == STATUS_NODE_ERROR and "RuntimeError" in response.ErrorComment
    (entry,) = node_events(tmp_path / "outbox")
    assert entry["outcome"] == "refused" and entry["status"] == f"0x{STATUS_NODE_ERROR:04X}"
    assert entry["reason"].startswith("error in the node: RuntimeError at test_node_hardening.py:")
    log = (tmp_path / "outbox" / "node-events.jsonl").read_text()
    assert person.nhs not in log and person.family not in log
    assert spooled == []  # deleted as the handler returned, not by a sweep minutes later


def test_a_transfer_cut_off_midway_leaves_nothing_in_the_spool(tmp_path):
    """A PACS that dies in the middle of a large C-STORE: the half-received, identifiable data set is deleted as
    the association ends (the node's own backstop would take minutes)."""
    node = start_node(tmp_path, options=("--workers", "1"))
    rng = random.Random(6)
    big = pacs_image(hospital_patient(rng), rng, modality="CR", seed="big", scale=1.0)
    path = tmp_path / "big.dcm"
    big.save_as(path, enforce_file_format=True)
    spool = node.outbox / ".spool"
    try:
        sender = started(subprocess.Popen(
            [STORESCU, "-aet", "PACS", "-aec", "NCCID", "--max-send-pdu", "16384", "127.0.0.1", str(node.port),
             str(path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "TCP_NODELAY": "1"},
        ))  # fmt: skip
        deadline = time.monotonic() + 30
        while not list(spool.iterdir()) and sender.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        sender.kill()
        sender.wait(timeout=30)
        assert node_events(node.outbox) == []  # it was cut off before the node could handle it
        deadline = time.monotonic() + 15
        while list(spool.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert list(spool.iterdir()) == []
    finally:
        stop_node(node)


def _mounted_tmpfs(folder: Path, size: str) -> contextlib.AbstractContextManager:
    @contextlib.contextmanager
    def mounted():
        folder.mkdir(parents=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(folder)])
        if done.returncode != 0:
            pytest.skip("a full disk is simulated with a small tmpfs, which needs root to mount")
        try:
            yield folder
        finally:
            subprocess.run(["umount", "-l", str(folder)], check=True)

    return mounted()


def test_a_full_disk_is_out_of_resources_and_leaves_no_part_file(tmp_path):
    """The outbox's disk has room for the spooled data set but not for its de-identified copy: the PACS is told
    0xA700 (retry later), the half-written file is deleted at once, and so is the spool file."""
    rng = random.Random(9)
    image = tmp_path / "ct.dcm"
    ct = pacs_image(hospital_patient(rng), rng, modality="CT", seed="disk", scale=1.0)
    ct.save_as(image, enforce_file_format=True)
    assert 500_000 < image.stat().st_size < 700_000
    with _mounted_tmpfs(tmp_path / "disk", "900k") as disk:
        node = start_node(tmp_path, outbox=disk / "outbox", options=("--workers", "1"))
        try:
            sender = node.send(image, options=("-v",))
            out, _ = sender.communicate(timeout=60)
            assert sender.returncode != 0, out
            (entry,) = node_events(node.outbox)
            assert entry["status"] == f"0x{STATUS_OUT_OF_RESOURCES:04X}" and "No space left" in entry["reason"]
            assert list(node.outbox.rglob("*.part")) == []
            assert list((node.outbox / ".spool").iterdir()) == []
            stray = node.outbox / "held" / "Covid00000001" / ".x.dcm.1.2.part"  # as a crash mid-write leaves
            stray.parent.mkdir(parents=True, exist_ok=True)
            stray.write_bytes(b"half")
        finally:
            stop_node(node)
        assert list(node.outbox.rglob("*.part")) == []  # a clean stop leaves none


def _structured_report(path: Path, person) -> None:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = BasicTextSRStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "SR"
    ds.PatientName = f"{person.family}^{person.given}"
    ds.PatientID = person.nhs
    ds.save_as(path, enforce_file_format=True)


def test_presentation_contexts_refused_at_association_are_recorded_without_identifiers(tmp_path):
    node = start_node(tmp_path)
    try:
        _refused_contexts_are_recorded(node, tmp_path)
    finally:
        stop_node(node)


def _refused_contexts_are_recorded(node, tmp_path: Path) -> None:
    rng = random.Random(8)
    person = hospital_patient(rng)
    report = tmp_path / "report.dcm"
    _structured_report(report, person)
    # -R: offer only what the files need; the AE title is the peer's own text, brackets and all
    sender = node.send(report, aet="RIS[bold]", options=("-R",))
    out, _ = sender.communicate(timeout=60)
    assert sender.returncode != 0, out  # storescu cannot send it: no accepted context

    (row,) = refused_contexts(node.outbox)
    assert (row.calling_ae, row.sop_class_uid) == ("RIS[bold]", BasicTextSRStorage)
    assert row.sop_class == "Basic Text SR Storage"
    assert row.reason == "SOP class not supported" and row.associations == 1
    assert node_events(node.outbox) == []  # nothing was stored or refused as a C-STORE
    log = (node.outbox / "node-events.jsonl").read_text()
    assert person.nhs not in log and person.family not in log

    status = run_cli("site", "status", node.outbox)  # what the site's data manager sees
    assert status.returncode == 0, status.stderr
    assert "refused at association (offered by the PACS, not taken by the node; nothing was sent): 1 SOP class" in (
        status.stdout
    )
    shown = f"  RIS[bold]: Basic Text SR Storage ({BasicTextSRStorage}): SOP class not supported; 1 association(s), "
    assert shown + f"last {row.last[:10]} " in status.stdout  # the day, then the time, UTC
    assert "refused by the node at C-STORE" not in status.stdout  # none was: the PACS could not even offer it
    assert person.nhs not in status.stdout and person.family not in status.stdout

    _, folders = people_and_images(tmp_path, 1, modalities=("CR",))  # an ordinary send, all contexts offered
    assert node.send(*folders[0].iterdir(), aet="RISPACS").wait(60) == 0
    rows = refused_contexts(node.outbox)
    assert BasicTextSRStorage in {r.sop_class_uid for r in rows} and len(rows) > 1
    assert not {r.sop_class_uid for r in rows} & {"1.2.840.10008.5.1.4.1.1.1", CT_IMAGE_STORAGE}  # CR, CT taken

    # storescu offers every storage class it knows: status lists the 30 most recent, --all-refused all of them
    brief, full = (run_cli("site", "status", node.outbox, *flag).stdout for flag in ((), ("--all-refused",)))
    assert f": {len(rows)} SOP class(es) from 2 calling AE(s)" in brief
    listed = [line for line in full.splitlines() if line.startswith(("  RISPACS: ", "  RIS[bold]: "))]
    assert len(listed) == len(rows) and shown + f"last {row.last[:10]} " in full
    assert sum(line in brief for line in listed) == min(len(rows), 30)
    assert (f"  ... and {len(rows) - 30} more (--all-refused lists them)" in brief) == (len(rows) > 30)


def test_the_fast_transport_is_used_only_on_the_pynetdicom_it_was_written_for():
    assert transport.fast_path_supported("3.0.4") and transport.fast_path_supported("3.0.0")
    assert not transport.fast_path_supported("3.1.0") and not transport.fast_path_supported("2.0.2")


def test_on_another_pynetdicom_the_stock_reactors_serve_and_still_time_out_stalled_peers(tmp_path, monkeypatch):
    monkeypatch.setattr(transport, "FAST_PATH", False)
    rng = random.Random(3)
    ds = pacs_image(hospital_patient(rng), rng, modality="CT", seed="stock", scale=0.25)
    with _node_in_process(tmp_path / "outbox", read_timeout=2.0) as node:
        assert _store(node.config.port, ds).Status == STATUS_SUCCESS
        sock = socket.create_connection(("127.0.0.1", node.config.port), timeout=10)
        sock.sendall(b"\x01\x00" + struct.pack(">L", 300) + b"\x00\x01")
        assert _closed_by_node(sock, within=30)
        sock.close()
    assert [e["outcome"] for e in node_events(tmp_path / "outbox")] == ["held"]


def test_a_data_set_that_cannot_be_encoded_is_refused_as_bad_data_not_out_of_resources(tmp_path, monkeypatch):
    """pydicom wraps a value it cannot encode in an OSError (quoting the element): the PACS is told 0xC210 (the
    data is bad; do not retry), not 0xA700, the reason quotes no value, and the half-written file is deleted (by
    the outbox's own write, which cleans up after itself)."""
    real_add_image = Outbox.add_image

    def add_a_value_pydicom_cannot_encode(self, clean, pseudonym, person, *, ready=None):
        clean.add_new(0x00091010, "US", 70000)  # a private element whose value does not fit its VR
        return real_add_image(self, clean, pseudonym, person, ready=ready)

    monkeypatch.setattr(Outbox, "add_image", add_a_value_pydicom_cannot_encode)
    rng = random.Random(5)
    ds = pacs_image(hospital_patient(rng), rng, modality="CT", seed="enc", scale=0.25)
    outbox = tmp_path / "outbox"
    with _node_in_process(outbox) as node:
        response = _store(node.config.port, ds)
        spooled = list(node.config.spool.iterdir())
    assert response.Status == STATUS_MALFORMED
    (entry,) = node_events(outbox)
    assert entry["reason"].startswith("the de-identified data set cannot be written (OSError at ")
    assert "70000" not in entry["reason"]
    assert list(outbox.rglob("*.part")) == [] and list(outbox.rglob("*.dcm")) == [] and spooled == []


def test_a_vault_that_cannot_be_used_asks_the_pacs_to_retry_rather_than_calling_the_data_bad(tmp_path):
    import sqlite3

    def locked(ciphertexts):
        raise sqlite3.OperationalError("database is locked")

    rng = random.Random(7)
    ds = pacs_image(hospital_patient(rng), rng, modality="CT", seed="vault", scale=0.25)
    node = SiteNode(NodeConfig(tmp_path / "outbox", port=0), key=PseudonymKey.generate(), pseudonymise=locked)
    node.start()
    try:
        response = _store(node.config.port, ds)
    finally:
        node.stop()
    assert response.Status == STATUS_OUT_OF_RESOURCES and "vault" in response.ErrorComment
    (entry,) = node_events(tmp_path / "outbox")
    assert entry["reason"] == "the pseudonym vault cannot be used now (OperationalError)"


def _spooled_ct(path: Path, seed: str) -> Path:
    rng = random.Random(seed)
    pacs_image(hospital_patient(rng), rng, modality="CT", seed=seed, scale=0.25).save_as(path, enforce_file_format=True)
    return path


def test_the_node_reports_filed_when_the_outbox_releases_the_image_at_once_and_held_otherwise(tmp_path):
    """The node's view of data/ may be a moment old: told "no record", the outbox still files the image ready if
    the record is there, and the node must then say `filed` (not `held`), as the file is in images/."""
    box = Outbox(tmp_path / "outbox")
    receiver = Receiver(box.root, key=PseudonymKey.generate(), pseudonymise=lambda c: ["Covid12345"] * len(c))
    receiver.has_clinical = lambda pseudonym: False  # a stale view: the sheet is filed just after it looked

    held = receiver.receive(_spooled_ct(tmp_path / "a.dcm", "a"))
    assert (held.status, held.outcome, held.pseudonym) == (STATUS_SUCCESS, "held", "Covid12345")
    assert len(list((box.held / "Covid12345").glob("*.dcm"))) == 1

    box.add_record({"Pseudonym": "Covid12345"}, "data")
    filed = receiver.receive(_spooled_ct(tmp_path / "b.dcm", "b"))
    assert (filed.status, filed.outcome, filed.reason) == (STATUS_SUCCESS, "filed", "")
    assert len(list((box.images / "Covid12345").glob("*.dcm"))) == 2  # and the first image came with it
    assert box.held_patients() == []


def test_a_malformed_settings_file_stops_the_node_from_starting_and_asks_the_pacs_to_retry(tmp_path):
    box = Outbox(tmp_path / "outbox")
    box.root.mkdir()
    box.settings_path.write_text('{"ages_over_89": "round"}')
    key = PseudonymKey.generate()
    proc = run_cli(
        "site", "node", box.root, "--port", "0", "--workers", "1", "--key-file", key.save(tmp_path / "site.key"),
        "--vault", tmp_path / "vault.sqlite", timeout=60,
    )  # fmt: skip
    assert proc.returncode != 0 and proc.stderr.strip().splitlines() == [
        "error: ages over 89: 'round' is not one of keep, cap"
    ]
    node = SiteNode(NodeConfig(box.root, port=0), key=key, pseudonymise=lambda c: ["Covid1"])
    with pytest.raises(UsageError, match="ages over 89: 'round' is not one of keep, cap"):
        node.start()
    assert not node.running
    # broken while the node runs: each C-STORE is refused 0xA700 (the PACS keeps its copy and retries later)
    result = node.receiver.receive(_spooled_ct(tmp_path / "ct.dcm", "s"))
    assert (result.status, result.reason) == (STATUS_OUT_OF_RESOURCES, "the site settings cannot be read (UsageError)")
    box.save_settings(SiteSettings(ages_over_89="cap"))  # fixed: the next C-STORE goes through
    assert node.receiver.receive(_spooled_ct(tmp_path / "ct.dcm", "s")).outcome == "held"


def test_a_pseudonymiser_with_another_key_than_the_node_is_refused(tmp_path):
    other = Pseudonymiser(PseudonymKey.generate(), lambda c: ["Covid1"] * len(c))
    with pytest.raises(UsageError, match="another key"):
        Receiver(tmp_path / "outbox", key=PseudonymKey.generate(), pseudonymise=other)
    key = PseudonymKey.generate()
    same = Pseudonymiser(key, lambda c: ["Covid1"] * len(c))
    assert Receiver(tmp_path / "outbox", key=key, pseudonymise=same).pseudonymiser is same
