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
The reactors below are pynetdicom 3.0's with those changes, which is why pyproject.toml holds pynetdicom below
3.1; `tests/test_node.py` drives them end to end with DCMTK's tools.
"""

from __future__ import annotations

import contextlib
import queue
import select
import socket
import struct
import threading
from collections.abc import Callable
from copy import deepcopy
from datetime import datetime
from typing import Any

from pynetdicom import evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

#: how often an idle thread wakes to check the ARTIM and network-idle timers (seconds)
IDLE_CHECK = 0.05
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
    def recv(self, nr_bytes: int) -> bytearray:
        """Read exactly `nr_bytes` (fewer only if the peer closed), as few system calls as the kernel allows.

        The length comes from the peer, so only up to `_PREALLOCATE` bytes are reserved before they arrive: a PDU
        header claiming 4 GiB must not cost 4 GiB of memory.
        """
        if nr_bytes > _PREALLOCATE:
            buffer = bytearray()
            while len(buffer) < nr_bytes:
                chunk = self.socket.recv(min(nr_bytes - len(buffer), _PREALLOCATE))
                if not chunk:
                    break
                buffer += chunk
            return buffer
        buffer = bytearray(nr_bytes)
        nr_read = 0
        with memoryview(buffer) as view:
            while nr_read < nr_bytes:
                got = self.socket.recv_into(view[nr_read:], nr_bytes - nr_read)
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
        assoc.set_socket(_Socket(assoc, client_socket=self.request))
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


class _Server(ThreadedAssociationServer):
    share_port = False

    def server_bind(self) -> None:
        if self.share_port:  # SO_REUSEPORT: the kernel spreads associations over the node's processes
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


def start_server(ae: Any, address: tuple[str, int], handlers: list, *, share_port: bool = False) -> _Server:
    """Serve `ae` on `address` in a background thread, as `AE.start_server(block=False)` does, on this transport.

    With `share_port`, other processes of the same user may listen on the same port (a worker per core).
    """
    server_class = type("NodeServer", (_Server,), {"share_port": share_port})
    server = ae.make_server(address, evt_handlers=handlers, server_class=server_class, request_handler=_RequestHandler)
    thread = threading.Thread(target=server.serve_forever, name="nccid-node-acceptor", daemon=True)
    thread.start()
    ae._servers.append(server)  # as pynetdicom does: `server.shutdown()` removes it, `ae.shutdown()` stops it
    return server
