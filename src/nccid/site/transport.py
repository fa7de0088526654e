"""pynetdicom's association server with an event-driven receive path, for the site node.

pynetdicom (3.0) runs two threads per association that poll: the upper-layer reactor sleeps a millisecond
whenever it has nothing to do, the association reactor sleeps a millisecond on every turn, and the socket is read
4 KiB at a time. Under several associations those threads fight for the GIL, and the node spent more time
waiting than working. This module keeps pynetdicom's association control (negotiation, the state machine, the
DIMSE messages, the events and handlers the node binds) and changes only how those threads wait:

- the upper-layer thread blocks in `select` on its socket and a wake-up pipe, and is woken when the association
  queues a PDU to send;
- the association thread blocks on an event that is set when a complete DIMSE message or an ACSE primitive
  arrives;
- a PDU is read with one `recv_into` per chunk the kernel has, not 4 KiB at a time;
- a P-DATA-TF PDU in the data-transfer state (Sta6) goes straight to the DIMSE provider, one presentation data
  value at a time, without the state machine's event queue: that is exactly what pynetdicom's DT-2 action does.

Both threads still wake every `IDLE_CHECK` seconds to look at their timers, as pynetdicom's do every millisecond.
pynetdicom's server takes `server_class` and `request_handler` in `AE.make_server`, which is the seam used here.
The reactors below are pynetdicom 3.0's with those changes; they rely on pynetdicom's internals, so this module
checks the version at import and, on any other pynetdicom, serves with pynetdicom's own reactors and says so with a
warning (slower, equally safe). `tests/test_node.py` drives them end to end with DCMTK's tools.

Whichever reactors serve, the server here is hardened against peers that stall (issue 13.5):

- every read of a PDU, once its first byte arrived, must finish within `read_timeout` seconds (a socket
  timeout on each accepted connection, and a deadline across the chunks of one PDU on the fast path), so a
  half-sent PDU or A-ASSOCIATE-RQ ends the connection instead of holding its thread forever;
- `NodeAE` counts against `maximum_associations` only associations that hold a slot: not a connection still
  waiting for its A-ASSOCIATE-RQ, nor one whose peer has stopped in the middle of a PDU. Stalled peers cannot
  lock out the PACS; `max_connections` bounds what all connections together may cost.
"""

from __future__ import annotations

import contextlib
import os
import queue
import select
import socket
import struct
import threading
import time
import warnings
from collections.abc import Callable
from copy import deepcopy
from datetime import datetime
from typing import Any

import pynetdicom
from pynetdicom import AE, evt
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

#: the pynetdicom release whose reactors the fast path below copies; any other gets pynetdicom's own
TESTED_PYNETDICOM = "3.0"
MODE_ACCEPTOR = "acceptor"  # pynetdicom._globals.MODE_ACCEPTOR


def fast_path_supported(version: str) -> bool:
    """True if `version` of pynetdicom is the release (major.minor) the fast reactors were written against."""
    return version.split(".")[:2] == TESTED_PYNETDICOM.split(".")


FAST_PATH = fast_path_supported(pynetdicom.__version__)
try:  # the internals the fast reactors subclass; a release that moved them gets the stock reactors
    from pynetdicom.association import Association
    from pynetdicom.dul import DULServiceProvider
    from pynetdicom.pdu import A_ABORT_RQ
    from pynetdicom.pdu_primitives import P_DATA
except ImportError:  # pragma: no cover - only on a pynetdicom other than TESTED_PYNETDICOM
    FAST_PATH = False
    Association = DULServiceProvider = A_ABORT_RQ = P_DATA = object  # type: ignore[misc,assignment]
if not FAST_PATH:
    warnings.warn(
        f"pynetdicom {pynetdicom.__version__} is not {TESTED_PYNETDICOM}.x: the site node serves with pynetdicom's "
        "own reactors (slower; timeouts and association limits still apply)",
        RuntimeWarning,
        stacklevel=2,
    )

#: how often an idle thread wakes to check the ARTIM and network-idle timers (seconds)
IDLE_CHECK = 0.05
#: a read in progress longer than this (seconds) means the peer is being waited on: the association gives up its slot
#: (0: any read in progress; a peer sending at full speed is rarely caught mid-read)
STALL_GRACE = 0.0
_PDU_TYPES = frozenset(range(0x01, 0x08))
_PREALLOCATE = 1 << 20  # bytes reserved ahead of a read; larger reads grow as the data arrives
_P_DATA_TF = 0x04


class _SignallingQueue(queue.Queue):
    """A queue that calls `signal` after every put, so a waiting thread wakes at once instead of polling."""

    def __init__(self, signal: Callable[[], Any]) -> None:
        super().__init__()
        self._signal = signal

    def _put(self, item: Any) -> None:
        super()._put(item)
        self._signal()


class _Socket(AssociationSocket):
    """pynetdicom's socket, reading a PDU in as few system calls as the kernel allows, within a deadline."""

    read_timeout: float | None = None
    reading_since: float | None = None  # monotonic time a read started, while one is in progress

    def recv(self, nr_bytes: int) -> bytearray:
        """Read exactly `nr_bytes` (fewer only if the peer closed); raises TimeoutError if they take longer than
        `read_timeout` seconds in all.

        The length comes from the peer, so only up to `_PREALLOCATE` bytes are reserved before they arrive: a PDU
        header claiming 4 GiB must not cost 4 GiB of memory. A read that stalls marks the association as
        waiting on its peer (see `NodeAE`), and the deadline covers the whole read, so a peer that drips a byte
        at a time is cut off as surely as one that stops.
        """
        deadline = None if self.read_timeout is None else time.monotonic() + self.read_timeout
        self.reading_since = time.monotonic()
        try:
            return self._recv_until(nr_bytes, deadline)
        finally:
            self.reading_since = None
            if self.socket is not None and self.read_timeout is not None:
                with contextlib.suppress(OSError):  # sends get the full timeout again, not what the read left
                    self.socket.settimeout(self.read_timeout)

    def _recv_until(self, nr_bytes: int, deadline: float | None) -> bytearray:
        sock = self.socket
        if sock is None:
            raise OSError("the connection is closed")

        def wait() -> None:
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("the peer stopped in the middle of a PDU")
                sock.settimeout(remaining)

        if nr_bytes > _PREALLOCATE:
            buffer = bytearray()
            while len(buffer) < nr_bytes:
                wait()
                chunk = sock.recv(min(nr_bytes - len(buffer), _PREALLOCATE))
                if not chunk:
                    break
                buffer += chunk
            return buffer
        buffer = bytearray(nr_bytes)
        nr_read = 0
        with memoryview(buffer) as view:
            while nr_read < nr_bytes:
                wait()
                got = sock.recv_into(view[nr_read:], nr_bytes - nr_read)
                if not got:
                    break
                nr_read += got
        if nr_read < nr_bytes:
            del buffer[nr_read:]
        return buffer


class _UpperLayer(DULServiceProvider):
    """pynetdicom's DUL provider, waiting in `select` instead of sleeping a millisecond at a time."""

    def __init__(self, assoc: Association, on_user_primitive: Callable[[], Any]) -> None:
        super().__init__(assoc)
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_read.setblocking(False)
        self._wake_write.setblocking(False)
        self.event_queue = _SignallingQueue(self._wake)
        self.to_provider_queue = _SignallingQueue(self._wake)
        self.to_user_queue = _SignallingQueue(on_user_primitive)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # the pipe is full (already woken) or closed (reactor gone)
            self._wake_write.send(b"\0")

    def kill_dul(self) -> None:
        self._kill_thread = True
        self._wake()

    def stop_dul(self) -> bool:
        """As pynetdicom's, but the reactor is woken to stop now rather than at its next timer check."""
        if self.state_machine.current_state != "Sta1":
            return False
        self.kill_dul()
        if threading.current_thread() is not self:
            self.join()
        return True

    def _wait_for_work(self) -> None:
        waiting: list[Any] = [self._wake_read]
        transport = self.socket
        if transport is not None and transport.socket is not None and transport._is_connected:
            waiting.append(transport.socket)
        try:
            select.select(waiting, [], [], IDLE_CHECK)
            while self._wake_read.recv(4096):
                pass
        except (OSError, ValueError):  # the connection closed under us: the next turn sees it
            pass

    def _read_pdu_data(self) -> None:
        """Read one PDU; in data transfer, hand P-DATA straight to DIMSE (pynetdicom's DT-2, without the queue)."""
        if self.state_machine.current_state != "Sta6":
            return super()._read_pdu_data()
        try:
            header = self.socket.recv(6)
            pdu_type, _, length = struct.unpack(">BBL", header)
        except (OSError, struct.error):
            self.event_queue.put("Evt17")  # transport closed
            return None
        if pdu_type != _P_DATA_TF:
            return self._read_rest(pdu_type, bytes(header), length)
        try:
            body = self.socket.recv(length)
        except OSError:
            body = b""
        if len(body) != length:
            self.event_queue.put("Evt17")
            return None
        for context_id, value in _presentation_data_values(body):
            if value is None:
                self.event_queue.put("Evt19")  # malformed PDV list: pynetdicom aborts, as for any invalid PDU
                return None
            primitive = P_DATA()
            primitive._presentation_data_value_list = [(context_id, value)]
            self.assoc.dimse.receive_primitive(primitive)
        return None

    def _read_rest(self, pdu_type: int, header: bytes, length: int) -> None:
        """Any other PDU during data transfer (release, abort, or junk) takes pynetdicom's own path."""
        if pdu_type not in _PDU_TYPES:
            self.event_queue.put("Evt19")
            return
        try:
            body = self.socket.recv(length)
        except OSError:
            body = bytearray()
        if len(body) != length:
            self.event_queue.put("Evt17")
            return
        try:
            pdu, event = self._decode_pdu(bytearray(header) + body)
        except Exception:
            self.event_queue.put("Evt19")
            return
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)

    def run_reactor(self) -> None:
        """pynetdicom's DUL loop (3.0) with the idle sleep replaced by `_wait_for_work`."""
        self._idle_timer.start()
        idle = False
        try:
            while True:
                if not self.assoc._dul_ready.is_set():
                    self.assoc._dul_ready.set()
                    idle = True
                if idle:
                    self._wait_for_work()
                if self._kill_thread:
                    break
                if self.artim_timer.expired:
                    self.event_queue.put("Evt18")
                try:
                    if self._process_recv_primitive():
                        pass
                    elif self._is_transport_event():
                        self._idle_timer.restart()
                except Exception:
                    self._abort_hard()
                    return
                try:
                    event = self.event_queue.get(block=False)
                except queue.Empty:
                    idle = True
                    continue
                self.state_machine.do_action(event)
                idle = False
        finally:
            self._wake_read.close()
            self._wake_write.close()

    def _abort_hard(self) -> None:
        """As pynetdicom: an exception in the reactor sends A-ABORT past the state machine and stops both threads."""
        abort = A_ABORT_RQ()
        abort.source = 0x02
        abort.reason_diagnostic = 0x00
        try:
            self.socket.send(abort.encode())
        finally:
            self.assoc.is_aborted = True
            self.assoc.is_established = False
            self.assoc._kill = True
            self._kill_thread = True


def _presentation_data_values(body: bytes | bytearray) -> list[tuple[int, Any]]:
    """Split a P-DATA-TF body into (context ID, control byte + fragment) items; (0, None) where it is malformed."""
    items: list[tuple[int, Any]] = []
    view = memoryview(body)
    offset = 0
    while offset < len(body):
        if offset + 6 > len(body):
            return [*items, (0, None)]
        (item_length,) = struct.unpack_from(">L", body, offset)
        end = offset + 4 + item_length
        if item_length < 2 or end > len(body):
            return [*items, (0, None)]
        items.append((body[offset + 4], view[offset + 5 : end]))
        offset = end
    return items


class _Association(Association):
    """An acceptor whose reactor sleeps until a message or primitive arrives, not a millisecond per turn."""

    def __init__(self, ae: Any, mode: str) -> None:
        self._arrived = threading.Event()
        super().__init__(ae, mode)
        self.dul = _UpperLayer(self, self._arrived.set)
        self.dimse.msg_queue = _SignallingQueue(self._arrived.set)

    def _run_reactor(self) -> None:
        """pynetdicom's acceptor loop, then the spool files of data sets that will never be handled are deleted."""
        try:
            self._serve_until_ended()
        finally:
            discard_spooled(self)

    def _serve_until_ended(self) -> None:
        """pynetdicom's acceptor loop (3.0), waiting on `_arrived` instead of `time.sleep(0.001)`."""
        self._is_paused = False
        while not self._kill:
            self._arrived.wait(IDLE_CHECK)
            self._arrived.clear()
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False
            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, context_id)
                self._arrived.set()  # another message may already be queued
            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                self._end("is_released", evt.EVT_RELEASED)
                return
            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)  # so EVT_ACSE_RECV fires, as in pynetdicom
                self._end("is_aborted", evt.EVT_ABORTED)
                return
            if not self.dul.is_alive():
                self.kill()
                return
            if self.dul.idle_timer_expired():
                self.abort()
                self.kill()
                return

    def _end(self, outcome: str, event: Any) -> None:
        """Released or aborted by the peer: mark it, tell the handlers, stop both threads."""
        setattr(self, outcome, True)
        self.is_established = False
        evt.trigger(self, event, {})
        self.kill()


class _RequestHandler(RequestHandler):
    def _create_association(self) -> Association:
        """pynetdicom's acceptor set-up (3.0), with this module's association and socket classes."""
        assoc = _Association(self.ae, MODE_ACCEPTOR)
        assoc._server = self.server
        assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"
        transport = _Socket(assoc, client_socket=self.request)
        transport.read_timeout = self.server.read_timeout
        assoc.set_socket(transport)
        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
        assoc.acceptor.ae_title = self.server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        assoc.acceptor.supported_contexts = deepcopy(self.server.contexts)
        assoc.requestor.address_info = self.remote
        for event, handlers in self.server._handlers.items():
            if event.is_intervention and handlers:
                assoc.bind(event, *handlers)
            elif isinstance(event, evt.NotificationEvent):
                for handler, args in handlers:
                    assoc.bind(event, handler, args)
        return assoc


def discard_spooled(assoc: Any) -> int:
    """Delete the spool files of an ended association: the data set it was receiving when it was cut off, and
    any received but not yet handled. They hold identifiable data and no handler will ever read them. Returns
    how many were deleted. (pynetdicom 3.0 keeps them on `dimse.message` and in `dimse.msg_queue`.)"""
    paths = []
    dimse = getattr(assoc, "dimse", None)
    message = getattr(dimse, "message", None)
    partial = getattr(message, "_data_set_file", None)
    if partial is not None:
        with contextlib.suppress(OSError):
            partial.close()
        paths.append(partial.name)
    waiting = getattr(dimse, "msg_queue", None)
    while waiting is not None:
        try:
            _, primitive = waiting.get(block=False)
        except queue.Empty:
            break
        spooled = getattr(primitive, "_dataset_file", None)
        if spooled is not None:
            with contextlib.suppress(OSError):
                spooled.close()
            paths.append(spooled.name)
    deleted = 0
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            deleted += 1
    return deleted


class NodeAE(AE):
    """An AE whose association limit counts only associations that hold a slot.

    pynetdicom counts every acceptor thread, so connections that never finish their A-ASSOCIATE-RQ, or
    associations whose peer stopped in the middle of a PDU, would fill `maximum_associations` and lock out the
    PACS until they time out. Here they are left out of the count (they still end at their timeout, and
    `max_connections` on the server bounds them all).
    """

    @property
    def active_associations(self) -> list[Association]:
        return [assoc for assoc in super().active_associations if not waiting_on_peer(assoc)]

    @property
    def all_associations(self) -> list[Association]:
        """Every association thread of this AE, waiting or not (pynetdicom's own count)."""
        return super().active_associations


def waiting_on_peer(assoc: Any) -> bool:
    """True if the acceptor `assoc` has no complete A-ASSOCIATE-RQ yet, or its peer stopped mid-PDU."""
    if not getattr(assoc, "is_acceptor", False):
        return False
    dul = getattr(assoc, "dul", None)
    if getattr(getattr(dul, "state_machine", None), "current_state", "") == "Sta2":  # awaiting the request
        return True
    since = getattr(getattr(dul, "socket", None), "reading_since", None)
    return since is not None and time.monotonic() - since > STALL_GRACE


class _Server(ThreadedAssociationServer):
    """pynetdicom's threaded server with a read timeout on every connection and a cap on connections."""

    share_port = False
    read_timeout: float | None = None
    max_connections = 64

    def server_bind(self) -> None:
        if self.share_port:  # SO_REUSEPORT: the kernel spreads associations over the node's processes
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept a connection; every read and write on it times out (an accepted socket is otherwise blocking)."""
        client, address = super().get_request()
        client.settimeout(self.read_timeout)
        return client, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Refuse (close at once) a connection beyond `max_connections`: each costs a thread until it ends."""
        return len(self.active_associations) < self.max_connections


def start_server(
    ae: AE,
    address: tuple[str, int],
    handlers: list,
    *,
    share_port: bool = False,
    read_timeout: float | None = 30.0,
    max_connections: int = 64,
) -> _Server:
    """Serve `ae` on `address` in a background thread, as `AE.start_server(block=False)` does, on this transport.

    With `share_port`, other processes of the same user may listen on the same port (a worker per core).
    `read_timeout` bounds how long one PDU may take to arrive once it started (seconds; None: forever), and
    `max_connections` how many connections are served at once, stalled or not. On a pynetdicom other than
    `TESTED_PYNETDICOM`, pynetdicom's own reactors serve (see the module docstring).
    """
    attributes = {"share_port": share_port, "read_timeout": read_timeout, "max_connections": max_connections}
    server_class = type("NodeServer", (_Server,), attributes)
    request_handler = _RequestHandler if FAST_PATH else RequestHandler
    server = ae.make_server(address, evt_handlers=handlers, server_class=server_class, request_handler=request_handler)
    thread = threading.Thread(target=server.serve_forever, name="nccid-node-acceptor", daemon=True)
    thread.start()
    ae._servers.append(server)  # as pynetdicom does: `server.shutdown()` removes it, `ae.shutdown()` stops it
    return server
