"""The site DICOM node: the Storage SCP a hospital's PACS sends to, de-identifying every object on arrival.

pynetdicom streams each incoming data set to a file in the node's spool (a folder only the node's user can
open); the handler reads it once, finds the NHS/CHI number, gets the pseudonym, de-identifies, runs the gate and
writes the result to the outbox. pynetdicom deletes the spooled file as soon as the handler returns, and the
node empties the spool when it starts and stops, so identifiable data never rests on disk.

Every C-STORE is answered with what happened to it. Success means the de-identified image is in the outbox
(ready, or held until the patient's clinical sheet arrives). A failure status tells the PACS it still holds the
only copy, with the reason in Error Comment:

    0xC210  the data set cannot be decoded (or is truncated)
    0xA900  the data set does not match its SOP class (pixel data shorter than its rows and columns need)
    0xC220  no valid NHS/CHI number in PatientID or OtherPatientIDs
    0xC230  held by the de-identification policy (burned-in annotation, unsupported SOP class)
    0xC240  the gate found an identifier in the de-identified output (a bug: nothing is written)
    0xA700  out of resources (the outbox could not be written)
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pydicom.config
from pydicom import uid
from pydicom.dataset import Dataset
from pydicom.uid import UID

from nccid.contracts.dicom import ImageRejected, read_image
from nccid.log import event
from nccid.site.batch import deidentify_checked
from nccid.site.deid import ALLOWED_SOP_CLASSES, DeidHeld, DeidKeys
from nccid.site.identifiers import IdentifierError
from nccid.site.outbox import clinical_pseudonyms, hold_image, release_held, write_image
from nccid.site.vault import PseudonymKey

STATUS_SUCCESS = 0x0000
STATUS_MALFORMED = 0xC210
STATUS_DOES_NOT_MATCH = 0xA900
STATUS_NO_PATIENT_NUMBER = 0xC220
STATUS_HELD_BY_POLICY = 0xC230
STATUS_GATE = 0xC240
STATUS_OUT_OF_RESOURCES = 0xA700

#: what a PACS commonly sends; compressed pixel data passes through unchanged (pylibjpeg decodes it downstream).
#: Deflated data sets are not offered: the header checks read the file's bytes where they lie.
TRANSFER_SYNTAXES = [
    uid.ExplicitVRLittleEndian,
    uid.ImplicitVRLittleEndian,
    uid.JPEGBaseline8Bit,
    uid.JPEGExtended12Bit,
    uid.JPEGLossless,
    uid.JPEGLosslessSV1,
    uid.JPEGLSLossless,
    uid.JPEGLSNearLossless,
    uid.JPEG2000Lossless,
    uid.JPEG2000,
    uid.RLELossless,
]
VERIFICATION = "1.2.840.10008.1.1"
EVENTS_FILE = "node-events.jsonl"

Pseudonymise = Callable[[list[str]], list[str]]


@dataclass(frozen=True)
class Received:
    """The fate of one C-STORE: `filed` (ready), `held` (awaiting the clinical sheet) or `refused`."""

    status: int
    outcome: str
    reason: str = ""
    pseudonym: str = ""
    modality: str = ""


def _refused(status: int, reason: str) -> Received:
    return Received(status, "refused", reason)


def _safe_reason(exc: ImageRejected) -> str:
    """pydicom's messages may quote element values (a name, a date): keep our own words only."""
    if exc.reason.startswith("unreadable DICOM header: ") and exc.__cause__ is not None:
        return f"unreadable DICOM data set ({type(exc.__cause__).__name__})"
    return exc.reason


def _short_pixel_data(ds: Dataset) -> str:
    """Native pixel data must hold every pixel its header declares (compressed data is checked when decoded)."""
    if "PixelData" not in ds or ds.file_meta.TransferSyntaxUID.is_compressed:
        return ""
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
        needed = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * frames
        needed = (needed * int(ds.BitsAllocated) + 7) // 8
    except (AttributeError, TypeError, ValueError):
        return "Rows, Columns or BitsAllocated (0028,xxxx) missing or not a number"
    have = len(ds.PixelData)
    if have < needed:
        return f"Pixel Data (7FE0,0010) holds {have} bytes; Rows x Columns x frames needs {needed}"
    return ""


class Receiver:
    """De-identify one received object into the outbox. Thread-safe: associations run in their own threads."""

    def __init__(self, outbox: Path, *, key: PseudonymKey, pseudonymise: Pseudonymise) -> None:
        self.outbox = Path(outbox)
        self.key = key
        self.keys = DeidKeys.derive(key.key)
        self._pseudonymise = pseudonymise
        self._pseudonyms: dict[str, str] = {}
        self._clinical: set[str] = set()
        self._clinical_stamp = -1
        self._lock = threading.Lock()

    def pseudonym(self, ciphertext: str) -> str:
        with self._lock:  # one vault round trip per person, however many images and associations
            if ciphertext not in self._pseudonyms:
                (self._pseudonyms[ciphertext],) = self._pseudonymise([ciphertext])
            return self._pseudonyms[ciphertext]

    def has_clinical(self, pseudonym: str) -> bool:
        data = self.outbox / "data"
        stamp = data.stat().st_mtime_ns if data.is_dir() else 0
        with self._lock:
            if stamp != self._clinical_stamp:  # a sheet was added: list data/ again
                self._clinical = clinical_pseudonyms(self.outbox)
                self._clinical_stamp = stamp
            return pseudonym in self._clinical

    def receive(self, path: Path, *, sop_instance: str = "") -> Received:
        """Read the spooled object, match, de-identify, gate and file it; never raises for bad input."""
        try:
            with open(path, "rb") as handle:
                ds = read_image(handle, os.fstat(handle.fileno()).st_size)
        except ImageRejected as exc:
            return _refused(STATUS_MALFORMED, _safe_reason(exc))
        if "SOPInstanceUID" not in ds or "SOPClassUID" not in ds:
            return _refused(
                STATUS_MALFORMED, "the data set has no SOPClassUID (0008,0016) or SOPInstanceUID (0008,0018)"
            )
        if sop_instance and str(ds.SOPInstanceUID) != sop_instance:
            return _refused(STATUS_MALFORMED, "SOPInstanceUID (0008,0018) differs from the C-STORE request's")
        short = _short_pixel_data(ds)
        if short:
            return _refused(STATUS_DOES_NOT_MATCH, short)
        try:
            done = deidentify_checked(ds, key=self.key, keys=self.keys, pseudonym_of=self.pseudonym)
        except IdentifierError as exc:
            return _refused(STATUS_NO_PATIENT_NUMBER, str(exc))
        except DeidHeld as exc:
            return _refused(STATUS_HELD_BY_POLICY, exc.reason)
        except ImageRejected as exc:
            return _refused(STATUS_MALFORMED, exc.reason)
        except Exception as exc:  # the vault failed: the sender keeps its copy and may resend
            return _refused(STATUS_MALFORMED, f"cannot de-identify the data set ({type(exc).__name__})")
        if done.findings:
            tags = ", ".join(sorted({f.tag_path for f in done.findings}))
            return _refused(STATUS_GATE, f"the gate found identifiers in {tags}")
        clean, pseudonym, modality = done.clean, done.pseudonym, str(done.clean.get("Modality", ""))
        try:
            if self.has_clinical(pseudonym):
                write_image(clean, self.outbox / "images" / pseudonym / f"{clean.SOPInstanceUID}.dcm")
                return Received(STATUS_SUCCESS, "filed", "", pseudonym, modality)
            hold_image(clean, self.outbox, pseudonym, done.person)
            if self.has_clinical(pseudonym):  # the sheet arrived while we wrote: release now, not at the next sweep
                release_held(self.outbox)
            return Received(STATUS_SUCCESS, "held", "no clinical sheet for this patient yet", pseudonym, modality)
        except OSError as exc:
            return _refused(STATUS_OUT_OF_RESOURCES, f"cannot write the outbox ({exc.strerror})")


@dataclass
class NodeConfig:
    outbox: Path
    ae_title: str = "NCCID"
    host: str = "127.0.0.1"
    port: int = 11112
    max_associations: int = 16
    max_pdu: int = 262_144  # larger PDUs: fewer Python round trips per megabyte
    network_timeout: float = 60.0
    workers: int = 1  # processes sharing the port (SO_REUSEPORT): associations spread over the cores

    @property
    def spool(self) -> Path:
        return Path(self.outbox) / ".spool"


class SiteNode:
    """A running Storage SCP. `start()` returns once it listens; `stop()` shuts it and empties the spool.

    pynetdicom spools to the process's temporary folder, so the node points that at its own spool: run one node
    per process (as `nccid site node` does).
    """

    def __init__(
        self,
        config: NodeConfig,
        *,
        key: PseudonymKey,
        pseudonymise: Pseudonymise,
        on_association: Callable[[str, Counter], None] | None = None,
    ) -> None:
        self.config = config
        self.receiver = Receiver(config.outbox, key=key, pseudonymise=pseudonymise)
        self.totals: Counter = Counter()
        self._per_association: dict[int, Counter] = {}
        self._on_association = on_association
        self._events_lock = threading.Lock()
        self._server = None
        self._stop = threading.Event()
        self._sweeper: threading.Thread | None = None
        self._previous: tuple = ()

    # -- lifecycle ------------------------------------------------------------------------------------------
    def _prepare_spool(self) -> None:
        spool = self.config.spool
        if spool.exists():
            shutil.rmtree(spool)  # left by a crash: those senders never got a success, so they will resend
        spool.mkdir(parents=True, mode=0o700)
        os.chmod(spool, 0o700)

    def start(self, *, prepare: bool = True) -> None:
        from pynetdicom import AE, _config, evt

        from nccid.site.transport import start_server

        Path(self.config.outbox).mkdir(parents=True, exist_ok=True)
        if prepare:
            self._prepare_spool()
        settings = pydicom.config.settings
        self._previous = (
            _config.STORE_RECV_CHUNKED_DATASET,
            tempfile.tempdir,
            settings.reading_validation_mode,
            settings.writing_validation_mode,
        )
        _config.STORE_RECV_CHUNKED_DATASET = True  # stream each data set to a spool file, not memory
        tempfile.tempdir = str(self.config.spool)
        # pydicom checks every value it reads or writes against its VR and only warns; the node keeps values as
        # sent either way (the gate is what judges them), so those regex checks are skipped: some 13 % of the
        # time to de-identify a CT slice here, and part of pynetdicom's work on every command set
        settings.reading_validation_mode = settings.writing_validation_mode = pydicom.config.IGNORE
        ae = AE(ae_title=self.config.ae_title)
        ae.require_called_aet = True
        ae.maximum_associations = self.config.max_associations
        ae.maximum_pdu_size = self.config.max_pdu
        ae.network_timeout = ae.dimse_timeout = self.config.network_timeout
        ae.acse_timeout = 30
        ae.add_supported_context(VERIFICATION)
        for sop_class in sorted(ALLOWED_SOP_CLASSES):
            ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
        handlers = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, lambda event: STATUS_SUCCESS),
            (evt.EVT_RELEASED, self._on_end),
            (evt.EVT_ABORTED, self._on_end),
        ]
        address = (self.config.host, self.config.port)
        self._server = start_server(ae, address, handlers, share_port=self.config.workers > 1)
        self.config.port = self._server.server_address[1]  # port 0: the one the system chose
        self._sweeper = threading.Thread(target=self._sweep, name="nccid-node-sweeper", daemon=True)
        self._sweeper.start()
        event("site.node.start", ae_title=self.config.ae_title, host=self.config.host, port=self.config.port)

    def stop(self) -> None:
        from pynetdicom import _config

        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server = None
            settings = pydicom.config.settings
            (
                _config.STORE_RECV_CHUNKED_DATASET,
                tempfile.tempdir,
                settings.reading_validation_mode,
                settings.writing_validation_mode,
            ) = self._previous
        if self._sweeper is not None:
            self._sweeper.join(timeout=10)
        release_held(self.config.outbox)
        shutil.rmtree(self.config.spool, ignore_errors=True)
        event("site.node.stop", **{k: v for k, v in self.totals.items()})

    def serve_forever(self) -> None:
        """Run until SIGINT or SIGTERM, then stop cleanly; with workers > 1, as that many processes on one port.

        Workers are forked before any thread starts; SIGTERM to this process stops them all.
        """
        import multiprocessing

        Path(self.config.outbox).mkdir(parents=True, exist_ok=True)
        self._prepare_spool()
        events = Path(self.config.outbox) / EVENTS_FILE
        offset = events.stat().st_size if events.exists() else 0
        if self.config.workers > 1 and not self.config.port:
            raise ValueError("several workers need a fixed --port")
        children = [
            multiprocessing.get_context("fork").Process(target=self._serve_child, daemon=True)
            for _ in range(self.config.workers - 1)
        ]
        for child in children:
            child.start()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: self._stop.set())
        try:
            self.start(prepare=False)
            while not self._stop.wait(0.5):
                if any(not c.is_alive() for c in children):
                    raise RuntimeError("a node worker process died")
        finally:
            for child in children:
                if child.is_alive():
                    os.kill(child.pid, signal.SIGTERM)
            for child in children:
                child.join(timeout=30)
            self.stop()
            self.totals = Counter(e["outcome"] for e in node_events(self.config.outbox, offset))

    def _serve_child(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: self._stop.set())
        self.start(prepare=False)
        try:
            while not self._stop.wait(0.5):
                pass
        finally:
            self._stop.set()
            if self._server is not None:
                self._server.shutdown()

    def _sweep(self) -> None:
        """Release held images whose sheet arrived, and delete spool files of aborted transfers."""
        while not self._stop.wait(2.0):
            try:
                release_held(self.config.outbox)
                cutoff = time.time() - 2 * self.config.network_timeout
                for entry in os.scandir(self.config.spool):
                    if entry.stat().st_mtime < cutoff:
                        os.unlink(entry.path)
            except OSError:
                continue

    # -- events ---------------------------------------------------------------------------------------------
    def _on_store(self, evt_) -> Dataset:
        request = evt_.request
        result = self.receiver.receive(evt_.dataset_path, sop_instance=str(request.AffectedSOPInstanceUID or ""))
        self._record(evt_.assoc, result, str(request.AffectedSOPClassUID or ""))
        response = Dataset()
        response.Status = result.status
        if result.status != STATUS_SUCCESS:
            response.ErrorComment = result.reason[:64]
        return response

    def _record(self, assoc, result: Received, sop_class: str) -> None:
        line = {
            "time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
            "calling_ae": str(assoc.requestor.ae_title).strip(),
            "outcome": result.outcome,
            "status": f"0x{result.status:04X}",
            "reason": result.reason,
            "pseudonym": result.pseudonym,
            "modality": result.modality,
            "sop_class": UID(sop_class).name or sop_class,
        }
        with self._events_lock:
            self.totals[result.outcome] += 1
            self._per_association.setdefault(id(assoc), Counter())[result.outcome] += 1
            fd = os.open(Path(self.config.outbox) / EVENTS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:  # one write per line with O_APPEND: worker processes never interleave
                os.write(fd, (json.dumps(line) + "\n").encode())
            finally:
                os.close(fd)
        event("site.node.store", outcome=result.outcome, status=line["status"], modality=result.modality)

    def _on_end(self, evt_) -> None:
        with self._events_lock:
            counts = self._per_association.pop(id(evt_.assoc), Counter())
        if self._on_association is not None:
            self._on_association(str(evt_.assoc.requestor.ae_title).strip(), counts)


def node_events(outbox: Path, offset: int = 0) -> list[dict]:
    """What the node has recorded for this outbox (no identifiers: pseudonyms, statuses, reasons), from a byte
    offset (where a run started) to the end."""
    path = Path(outbox) / EVENTS_FILE
    if not path.exists():
        return []
    with open(path, "rb") as handle:
        handle.seek(offset)
        return [json.loads(line) for line in handle.read().decode().splitlines() if line.strip()]
