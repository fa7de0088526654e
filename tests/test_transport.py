"""The node's transport: the P-DATA splitter (what reaches DIMSE is exactly the PDVs the peer sent, and a
malformed list is reported rather than read past its end), the read deadline on a real socket pair, and which
associations hold a slot."""

import contextlib
import queue
import socket
import struct
import threading
import time
from types import SimpleNamespace

import pytest

from nccid.site.transport import _presentation_data_values, _Socket, waiting_on_peer


def _pdv(context_id: int, control: int, fragment: bytes) -> bytes:
    return struct.pack(">LBB", len(fragment) + 2, context_id, control) + fragment


def test_each_presentation_data_value_comes_out_with_its_context_and_control_byte():
    body = _pdv(1, 0b11, b"command") + _pdv(3, 0b10, b"last data fragment")
    items = [(cid, bytes(value)) for cid, value in _presentation_data_values(body)]
    assert items == [(1, b"\x03command"), (3, b"\x02last data fragment")]


def test_an_item_longer_than_the_pdu_is_malformed_not_read_past_the_end():
    body = _pdv(1, 0b10, b"fine") + struct.pack(">LBB", 500, 1, 0) + b"short"
    items = _presentation_data_values(body)
    assert bytes(items[0][1]) == b"\x02fine"
    assert items[-1] == (0, None)


def test_an_item_without_a_control_byte_or_a_cut_length_field_is_malformed():
    assert _presentation_data_values(struct.pack(">LB", 1, 1))[-1] == (0, None)
    assert _presentation_data_values(_pdv(1, 0, b"x") + b"\x00\x00")[-1] == (0, None)


class _Upper:
    def __init__(self) -> None:
        self.event_queue = queue.Queue()


class _Assoc:
    """Just enough of an association for pynetdicom's socket wrapper: the queue it reports a connection to."""

    def __init__(self) -> None:
        self.dul = _Upper()


def _connected(read_timeout: float):
    ours, peer = socket.socketpair()
    wrapped = _Socket(_Assoc(), client_socket=ours)
    wrapped.read_timeout = read_timeout
    return wrapped, peer


def test_a_pdu_that_arrives_whole_is_read_whole():
    wrapped, peer = _connected(read_timeout=5)
    with peer:
        peer.sendall(b"x" * 3000)
        assert wrapped.recv(3000) == b"x" * 3000
        assert wrapped.reading_since is None  # not waiting on the peer any more


def test_a_peer_that_stops_mid_pdu_is_cut_off_at_the_timeout():
    wrapped, peer = _connected(read_timeout=0.5)
    with peer:
        peer.sendall(b"x" * 100)  # of the 1 MiB its header claimed
        with pytest.raises(TimeoutError):
            wrapped.recv(1 << 20)
        assert wrapped.reading_since is None


def test_a_peer_that_drips_a_byte_at_a_time_is_cut_off_too():
    """The deadline covers the whole PDU, not each chunk: a byte every 0.1 s never lets a per-read timeout fire."""
    wrapped, peer = _connected(read_timeout=1.0)
    stop = threading.Event()

    def drip() -> None:
        while not stop.wait(0.1):
            with contextlib.suppress(OSError):
                peer.send(b"x")

    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    try:
        with pytest.raises(TimeoutError):
            wrapped.recv(1000)
    finally:
        stop.set()
        dripper.join(timeout=5)
        peer.close()


def test_a_peer_waited_on_gives_up_its_association_slot():
    """`NodeAE` counts an acceptor against the limit unless it still awaits its A-ASSOCIATE-RQ (Sta2) or is in
    the middle of reading a PDU from its peer."""

    def acceptor(state: str, reading_since: float | None):
        dul = SimpleNamespace(state_machine=SimpleNamespace(current_state=state), socket=SimpleNamespace())
        dul.socket.reading_since = reading_since
        return SimpleNamespace(is_acceptor=True, dul=dul)

    assert waiting_on_peer(acceptor("Sta2", None))  # connected, request not (fully) arrived
    assert waiting_on_peer(acceptor("Sta6", time.monotonic() - 5))  # stopped mid-PDU
    assert not waiting_on_peer(acceptor("Sta6", None))  # established, between messages: holds its slot
    assert not waiting_on_peer(acceptor("Sta3", None))  # being negotiated now
    assert not waiting_on_peer(SimpleNamespace(is_acceptor=False))
