"""A tombstone is told by the envelope's structure, not by its last byte."""
from __future__ import annotations

from citynode.core.keys import SigningKey
from citynode.core.records import (
    decode_record,
    encode_record,
    is_tombstone,
    sign_record,
    tombstone_of,
)
from citynode.storage import StoredRow

KEY = SigningKey(bytes(range(32)))


def _ending_in_c0() -> bytes:
    """A signed record whose envelope ends in c0 (its payload's random salt does)."""
    for n in range(5000):
        rec = sign_record(KEY, feed="air", seq=1, prev=None, time_ms=1_700_000_000_000,
                          type="org.example.Test", data={"n": n})
        if rec.envelope[-1] == 0xC0:
            return rec.envelope
    raise AssertionError("no envelope ending in c0 in 5000 (1 in 256 expected)")


def test_a_payload_ending_in_c0_is_not_a_tombstone() -> None:
    env = _ending_in_c0()
    assert decode_record(env)[2] is not None
    assert not is_tombstone(env)
    row = StoredRow(rowid=1, id=b"\0" * 32, origin=KEY.public_key, feed="air", seq=1,
                    type="org.example.Test", time=0, lon=None, lat=None, received_at=0,
                    envelope=env)
    assert not row.tombstone


def test_tombstones_are_tombstones_whatever_the_body_size() -> None:
    rec = sign_record(KEY, feed="air", seq=1, prev=None, time_ms=1_700_000_000_000,
                      type="org.example.Test", data={"p": "x"})
    assert is_tombstone(tombstone_of(rec.envelope))
    sig = bytes(64)
    for size in (10, 300, 70_000):  # bin 8, bin 16 and bin 32 body headers
        body = b"b" * size
        assert is_tombstone(encode_record(body, sig, None))
        assert not is_tombstone(encode_record(body, sig, b"\xc0"))
        assert not is_tombstone(encode_record(body, sig, b"\x81\xa1a\xc0"))
