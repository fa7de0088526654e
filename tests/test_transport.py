"""The node's P-DATA splitter: what reaches DIMSE is exactly the PDVs the peer sent, and a malformed list is
reported rather than read past its end."""

import struct

from nccid.site.transport import _presentation_data_values


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
