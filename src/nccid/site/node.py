"""The site DICOM node: the Storage SCP a hospital's PACS sends to, de-identifying every object on arrival.

pynetdicom streams each incoming data set to a file in the node's spool (a folder only the node's user can
open); the handler reads it once, finds the NHS/CHI number, gets the pseudonym, de-identifies, runs the gate and
writes the result to the outbox. The handler deletes the spooled file before it answers, whatever happened; the
transport deletes the file of a transfer cut off midway as its association ends; and the node empties the spool
when it starts and stops, so identifiable data never rests on disk.

Every C-STORE is answered with what happened to it. Success means the de-identified image is in the outbox
(ready, or held until the patient's clinical sheet arrives). A failure status tells the PACS it still holds the
only copy, with the reason in Error Comment:

    0xC210  the data set cannot be decoded (or is truncated), or its de-identified copy cannot be encoded
    0xA900  the data set does not match its SOP class (pixel data shorter than its rows and columns need)
    0xC220  no valid NHS/CHI number in PatientID or OtherPatientIDs
    0xC230  held by the de-identification policy (burned-in annotation, unsupported SOP class)
    0xC240  the gate found an identifier in the de-identified output (a bug: nothing is written)
    0xC250  the node failed on this data set (an error in the node, recorded in node-events.jsonl by type and
            place, never by value)
    0xA700  out of resources (the outbox's disk is full, or the pseudonym vault cannot be used now; the PACS
            may retry later)

Everything the node decides is a line in `node-events.jsonl` in the outbox (no identifiers): each C-STORE, each
handler error, each presentation context refused at association. `node_events` and `refused_contexts` read it.

This module is the Storage SCP (one process); `nccid.site.supervisor` runs it as a service (worker processes on
one port, signals, the sweeper); `nccid.site.transport` is how pynetdicom's server is hardened and made fast.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import os
import re
import shutil
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom.config
from pydicom import uid
from pydicom.dataset import Dataset
from pydicom.uid import UID

from nccid.contracts.dicom import ImageRejected, read_image
from nccid.errors import UsageError
from nccid.log import event
from nccid.site.batch import deidentify_checked
from nccid.site.deid import ALLOWED_SOP_CLASSES, DeidHeld, DeidKeys
from nccid.site.identifiers import IdentifierError
from nccid.site.outbox import Outbox
from nccid.site.pseudonymiser import Pseudonymiser
from nccid.site.vault import PseudonymKey

STATUS_SUCCESS = 0x0000
STATUS_MALFORMED = 0xC210
STATUS_DOES_NOT_MATCH = 0xA900
STATUS_NO_PATIENT_NUMBER = 0xC220
STATUS_HELD_BY_POLICY = 0xC230
STATUS_GATE = 0xC240
STATUS_NODE_ERROR = 0xC250
STATUS_OUT_OF_RESOURCES = 0xA700
#: errors of the disk, not of the data: the PACS keeps its copy and may retry when there is room again
_RESOURCE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EIO})

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
STORE_EVENT = "store"
CONTEXT_REFUSED_EVENT = "context-refused"
#: seconds before the same refused presentation contexts from the same AE are recorded again
REFUSED_REPEAT_AFTER = 3600.0
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")

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


def _where(exc: BaseException) -> str:
    """The exception's type and the innermost place it was raised (file:line in function): enough to find a
    bug, and never a value (messages may quote an element's value, which may be a name or a number)."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return type(exc).__name__
    last = frames[-1]
    return f"{type(exc).__name__} at {Path(last.filename).name}:{last.lineno} in {last.name}"


class Receiver:
    """De-identify one received object into the outbox. Thread-safe: associations run in their own threads.

    `pseudonymise` is the run's `Pseudonymiser` (its key must be `key`), or an issuer of pseudonyms for
    ciphertexts, which is wrapped in one: either way each person costs one vault round trip, however many images
    and associations. Raises UsageError if a Pseudonymiser with another key is given."""

    def __init__(self, outbox: Path, *, key: PseudonymKey, pseudonymise: Pseudonymise | Pseudonymiser) -> None:
        self.box = Outbox(outbox)
        self.outbox = self.box.root
        self.key = key
        self.keys = DeidKeys.derive(key.key)
        if isinstance(pseudonymise, Pseudonymiser):
            if pseudonymise.key.key != key.key:
                raise UsageError("the node's pseudonymiser holds another key than the node: give both the same key")
            self.pseudonymiser = pseudonymise
        else:
            self.pseudonymiser = Pseudonymiser(key, pseudonymise)
        self._clinical: set[str] = set()
        self._clinical_stamp = -1
        self._settings_stamp: tuple[int, ...] | None = None
        self._age_policy = "keep"
        self._lock = threading.Lock()

    def has_clinical(self, pseudonym: str) -> bool:
        """Whether the patient has a clinical record in the outbox (data/ is listed again only when it changed)."""
        data = self.box.data
        stamp = data.stat().st_mtime_ns if data.is_dir() else 0
        with self._lock:
            if stamp != self._clinical_stamp:  # a sheet was added: list data/ again
                self._clinical = self.box.record_pseudonyms()
                self._clinical_stamp = stamp
            return pseudonym in self._clinical

    def age_policy(self) -> str:
        """The site's setting for ages over 89 (`keep` or `cap`), read again whenever the settings file changes
        (`nccid site settings` while the node runs). Raises UsageError on a malformed file, OSError on an
        unreadable one."""
        try:
            info = self.box.settings_path.stat()
            stamp: tuple[int, ...] = (info.st_mtime_ns, info.st_ino, info.st_size)
        except FileNotFoundError:
            stamp = ()
        with self._lock:
            if stamp != self._settings_stamp:
                self._age_policy = self.box.settings().ages_over_89
                self._settings_stamp = stamp
            return self._age_policy

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
            age_policy = self.age_policy()
        except (UsageError, OSError) as exc:  # the site's to fix (`nccid site settings`); the PACS may resend
            return _refused(STATUS_OUT_OF_RESOURCES, f"the site settings cannot be read ({type(exc).__name__})")
        try:
            done = deidentify_checked(
                ds, key=self.key, keys=self.keys, pseudonym_of=self.pseudonymiser.pseudonym, age_policy=age_policy
            )
        except IdentifierError as exc:
            return _refused(STATUS_NO_PATIENT_NUMBER, str(exc))
        except DeidHeld as exc:
            return _refused(STATUS_HELD_BY_POLICY, exc.reason)
        except ImageRejected as exc:
            return _refused(STATUS_MALFORMED, exc.reason)
        except Exception as exc:  # the vault failed (busy, unreachable): not the data's fault, the PACS may resend
            return _refused(STATUS_OUT_OF_RESOURCES, f"the pseudonym vault cannot be used now ({type(exc).__name__})")
        if done.findings:
            tags = ", ".join(sorted({f.tag_path for f in done.findings}))
            return _refused(STATUS_GATE, f"the gate found identifiers in {tags}")
        clean, pseudonym, modality = done.clean, done.pseudonym, str(done.clean.get("Modality", ""))
        try:  # a failed write deletes its own temporary file: nothing half-written is left in the outbox
            added = self.box.add_image(clean, pseudonym, done.person, ready=self.has_clinical(pseudonym))
        except OSError as exc:
            if exc.errno in _RESOURCE_ERRNOS:
                return _refused(STATUS_OUT_OF_RESOURCES, f"cannot write the outbox ({exc.strerror})")
            return _refused(STATUS_MALFORMED, f"the de-identified data set cannot be written ({_where(exc)})")
        except Exception as exc:  # pydicom cannot encode a value as received: the data set is bad, not the disk
            return _refused(STATUS_MALFORMED, f"the de-identified data set cannot be written ({_where(exc)})")
        if added.held:
            return Received(STATUS_SUCCESS, "held", "no clinical sheet for this patient yet", pseudonym, modality)
        return Received(STATUS_SUCCESS, "filed", "", pseudonym, modality)


@dataclass
class NodeConfig:
    """How a node listens and how long it waits for a peer (seconds). The timeouts are what keep a stalled or
    hostile peer from holding the node: `read_timeout` bounds one PDU once it started (a half-sent PDU or
    association request), `acse_timeout` the association negotiation and release, `network_timeout` an idle
    association."""

    outbox: Path
    ae_title: str = "NCCID"
    host: str = "127.0.0.1"
    port: int = 11112
    max_associations: int = 16  # associations served at once (stalled peers do not count, see transport)
    max_connections: int = 64  # connections at once, stalled or not
    max_pdu: int = 262_144  # larger PDUs: fewer Python round trips per megabyte
    network_timeout: float = 60.0
    acse_timeout: float = 30.0
    read_timeout: float = 30.0
    workers: int = 1  # processes sharing the port (SO_REUSEPORT): associations spread over the cores

    @property
    def spool(self) -> Path:
        return Path(self.outbox) / ".spool"


def prepare_spool(spool: Path) -> None:
    """Make an empty owner-only spool, deleting what a crash left (those senders never got a success, so they
    will resend)."""
    if spool.exists():
        shutil.rmtree(spool)
    spool.mkdir(parents=True, mode=0o700)
    os.chmod(spool, 0o700)


@contextlib.contextmanager
def _temporarily(owner: Any, name: str, value: Any) -> Iterator[None]:
    """Set `owner.name` to `value` for the duration, then put back what was there."""
    previous = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, previous)


def _end_associations(ae: Any, wait: float = 10.0) -> None:
    """Abort every association still running and wait (up to `wait` seconds in all) for their threads, so that a
    handler finishes its write and nothing arrives after the spool setting is put back."""
    associations = list(ae.all_associations)
    for assoc in associations:  # pynetdicom's abort waits for a reader blocked on a stalled peer: not here
        threading.Thread(target=_abort_quietly, args=(assoc,), name="nccid-node-abort", daemon=True).start()
    deadline = time.monotonic() + wait
    for assoc in associations:
        assoc.join(max(0.0, deadline - time.monotonic()))


def _abort_quietly(assoc: Any) -> None:
    with contextlib.suppress(Exception):
        assoc.abort()


class SiteNode:
    """The Storage SCP of one process. `start()` returns once it listens; `stop()` shuts it, leaves every
    global setting as it found it and (unless told otherwise) empties the spool.

    pynetdicom spools to the process's temporary folder, so while it runs the node points that at its own spool:
    run one node per process (`nccid.site.supervisor.run_node` runs several processes on one port).
    """

    def __init__(
        self,
        config: NodeConfig,
        *,
        key: PseudonymKey,
        pseudonymise: Pseudonymise | Pseudonymiser,
        on_association: Callable[[str, Counter], None] | None = None,
    ) -> None:
        self.config = config
        self.receiver = Receiver(config.outbox, key=key, pseudonymise=pseudonymise)
        self.totals: Counter = Counter()
        self._per_association: dict[int, Counter] = {}
        self._on_association = on_association
        self._events_lock = threading.Lock()
        self._stack: ExitStack | None = None
        self._refused_recorded: dict[tuple, float] = {}

    def start(self, *, prepare: bool = True) -> None:
        """Listen on the configured address (port 0: one the system picks, written back to `config.port`).

        Raises OSError if the address cannot be bound and UsageError if the site's settings file is malformed;
        nothing is left changed then."""
        from pynetdicom import _config, evt

        from nccid.site.transport import NodeAE, start_server

        config = self.config
        Path(config.outbox).mkdir(parents=True, exist_ok=True)
        self.receiver.age_policy()  # a malformed settings file stops the node before it listens (UsageError)
        if prepare:
            prepare_spool(config.spool)
        with ExitStack() as stack:
            stack.enter_context(_temporarily(_config, "STORE_RECV_CHUNKED_DATASET", True))  # stream to the spool
            stack.enter_context(_temporarily(tempfile, "tempdir", str(config.spool)))
            # pydicom checks every value it reads or writes against its VR and only warns; the node keeps values
            # as sent either way (the gate is what judges them), so those regex checks are skipped: some 13 % of
            # the time to de-identify a CT slice here, and part of pynetdicom's work on every command set
            stack.enter_context(pydicom.config.disable_value_validation())
            ae = NodeAE(ae_title=config.ae_title)
            ae.require_called_aet = True
            ae.maximum_associations = config.max_associations
            ae.maximum_pdu_size = config.max_pdu
            ae.network_timeout = ae.dimse_timeout = config.network_timeout
            ae.acse_timeout = config.acse_timeout
            ae.add_supported_context(VERIFICATION)
            for sop_class in sorted(ALLOWED_SOP_CLASSES):
                ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
            handlers = [
                (evt.EVT_C_STORE, self._on_store),
                (evt.EVT_C_ECHO, lambda event: STATUS_SUCCESS),
                (evt.EVT_ACCEPTED, self._on_accepted),
                (evt.EVT_RELEASED, self._on_end),
                (evt.EVT_ABORTED, self._on_end),
            ]
            stack.callback(_end_associations, ae)  # after the listener closes, before the settings go back
            server = start_server(
                ae,
                (config.host, config.port),
                handlers,
                share_port=config.workers > 1,
                read_timeout=config.read_timeout,
                max_connections=config.max_connections,
            )
            stack.callback(server.shutdown)
            config.port = server.server_address[1]  # port 0: the one the system chose
            self._stack = stack.pop_all()
        event("site.node.start", ae_title=config.ae_title, host=config.host, port=config.port, pid=os.getpid())

    def stop(self, *, clean_spool: bool = True) -> None:
        """Stop listening, restore the settings `start` changed, delete what this process's failed writes left;
        with `clean_spool` (the last process of a node to stop) release held images and empty the spool."""
        if self._stack is not None:
            self._stack.close()
            self._stack = None
        self.receiver.box.discard_partial_writes(pid=os.getpid())  # a write this process's stop cut short
        if clean_spool:
            self.receiver.box.release()
            shutil.rmtree(self.config.spool, ignore_errors=True)
        event("site.node.stop", pid=os.getpid(), **{k: v for k, v in self.totals.items()})

    @property
    def running(self) -> bool:
        return self._stack is not None

    # -- events ---------------------------------------------------------------------------------------------
    def _on_store(self, evt_) -> Dataset:
        """Handle one C-STORE. Never raises: an error in the node is answered 0xC250 and recorded, and the spooled
        (identifiable) file is deleted before the answer goes out, whatever happened."""
        path = None
        sop_class = ""
        try:
            request = evt_.request
            sop_class = str(request.AffectedSOPClassUID or "")
            path = evt_.dataset_path
            result = self.receiver.receive(path, sop_instance=str(request.AffectedSOPInstanceUID or ""))
        except Exception as exc:
            result = _refused(STATUS_NODE_ERROR, f"error in the node: {_where(exc)}")
        finally:
            if path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(path)
        response = Dataset()
        response.Status = result.status
        if result.status != STATUS_SUCCESS:
            response.ErrorComment = result.reason[:64]
        try:
            self._record(evt_.assoc, result, sop_class)
        except Exception as exc:  # the event log cannot be written: say so on the service log, answer anyway
            event("site.node.record-failed", error=type(exc).__name__)
        return response

    def _record(self, assoc, result: Received, sop_class: str) -> None:
        line = {
            "event": STORE_EVENT,
            "time": _now(),
            "calling_ae": _calling_ae(assoc),
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
        append_event(self.config.outbox, line)
        event("site.node.store", outcome=result.outcome, status=line["status"], modality=result.modality)

    def _on_accepted(self, evt_) -> None:
        """Record the presentation contexts refused at negotiation: what the PACS offered that the node does not
        take (a structured report, say), so the site can see it rather than wonder where it went.

        One line per association, listing each refused SOP class once. Many senders (DCMTK's storescu among
        them) offer every storage class they know on every association, so the same list from the same AE is
        written again only after `REFUSED_REPEAT_AFTER` seconds."""
        try:
            refused = _refused_sop_classes(evt_.assoc.rejected_contexts)
            if not refused:
                return
            calling_ae = _calling_ae(evt_.assoc)
            signature = (calling_ae, tuple(entry["sop_class_uid"] for entry in refused))
            now = time.monotonic()
            with self._events_lock:
                last = self._refused_recorded.get(signature)
                if last is not None and now - last < REFUSED_REPEAT_AFTER:
                    return
                self._refused_recorded[signature] = now
            append_event(
                self.config.outbox,
                {"event": CONTEXT_REFUSED_EVENT, "time": _now(), "calling_ae": calling_ae, "refused": refused},
            )
        except Exception as exc:
            event("site.node.record-failed", error=type(exc).__name__)

    def _on_end(self, evt_) -> None:
        with self._events_lock:
            counts = self._per_association.pop(id(evt_.assoc), Counter())
        if self._on_association is not None:
            self._on_association(_calling_ae(evt_.assoc), counts)


_CONTEXT_RESULTS = {
    0x01: "refused by the node",
    0x02: "refused (no reason given)",
    0x03: "SOP class not supported",
    0x04: "none of the offered transfer syntaxes is supported",
}


def _refused_sop_classes(contexts: list[Any]) -> list[dict]:
    """Each refused SOP class once (sorted by UID), with its name and why. The UID comes from the peer and is
    kept only if it looks like one: nothing but a UID belongs there."""
    found: dict[str, dict] = {}
    for context in contexts:
        offered = str(context.abstract_syntax or "")
        sop_class_uid = offered if _UID.fullmatch(offered) and len(offered) <= 64 else "(not a UID)"
        reason = _CONTEXT_RESULTS.get(context.result, f"refused (result {context.result})")
        if sop_class_uid not in found or context.result == 0x03:
            name = UID(sop_class_uid).name if sop_class_uid != "(not a UID)" else sop_class_uid
            found[sop_class_uid] = {"sop_class_uid": sop_class_uid, "sop_class": name, "reason": reason}
    return [found[key] for key in sorted(found)]


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


def _calling_ae(assoc: Any) -> str:
    """The peer's AE title, printable characters only (a title is up to 16 characters of the default
    repertoire; anything else is replaced)."""
    title = str(getattr(assoc.requestor, "ae_title", "") or "").strip()
    return "".join(c if c.isprintable() else "?" for c in title)[:16]


def append_event(outbox: Path, line: dict) -> None:
    """Append one line to the node's event log, owner-only. One write with O_APPEND: worker processes never
    interleave."""
    fd = os.open(Path(outbox) / EVENTS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (json.dumps(line) + "\n").encode())
    finally:
        os.close(fd)


def events_size(outbox: Path) -> int:
    """The event log's current size in bytes: pass it to `node_events` later to read only what came after."""
    path = Path(outbox) / EVENTS_FILE
    return path.stat().st_size if path.exists() else 0


def node_events(outbox: Path, offset: int = 0, *, kind: str = STORE_EVENT) -> list[dict]:
    """What the node recorded for this outbox, of one `kind` (`STORE_EVENT`: one line per C-STORE, with its
    outcome filed / held / refused, status and reason; `CONTEXT_REFUSED_EVENT`: presentation contexts refused at
    association), from a byte offset (where a run started) to the end. No identifiers: pseudonyms, statuses,
    reasons, AE titles, SOP classes. A line that is not JSON (a disk filled mid-write) is skipped."""
    path = Path(outbox) / EVENTS_FILE
    if not path.exists():
        return []
    found = []
    with open(path, "rb") as handle:
        handle.seek(offset)
        for raw in handle.read().decode(errors="replace").splitlines():
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            if isinstance(line, dict) and line.get("event", STORE_EVENT) == kind:
                found.append(line)
    return found


@dataclass(frozen=True)
class RefusedContext:
    """A SOP class a calling AE offered and the node refused at association: why, in how many recorded
    associations (the same offer is recorded at most once an hour per AE), and when last."""

    calling_ae: str
    sop_class_uid: str
    sop_class: str
    reason: str
    associations: int
    last: str


def refused_contexts(outbox: Path) -> list[RefusedContext]:
    """What PACS offered the node that it refused at negotiation (from the event log), one row per calling AE,
    SOP class and reason, most recent first. `nccid site status` shows these; no identifiers are involved."""
    rows: dict[tuple[str, str, str], RefusedContext] = {}
    for line in node_events(outbox, kind=CONTEXT_REFUSED_EVENT):
        calling_ae, when = str(line.get("calling_ae", "")), str(line.get("time", ""))
        for entry in line.get("refused") or []:
            if not isinstance(entry, dict):
                continue
            uid_, reason = str(entry.get("sop_class_uid", "")), str(entry.get("reason", ""))
            key = (calling_ae, uid_, reason)
            times = rows[key].associations + 1 if key in rows else 1
            rows[key] = RefusedContext(calling_ae, uid_, str(entry.get("sop_class", uid_)), reason, times, when)
    return sorted(rows.values(), key=lambda r: (r.last, r.calling_ae, r.sop_class), reverse=True)
