"""The JSON view of a record takes ``subject`` and ``dataschema`` from the payload, so
an erased or pruned record shows neither (docs/PROTOCOL.md, "Reading tombstones")."""

from __future__ import annotations

from citynode.core.keys import SigningKey, Verifier
from citynode.core.records import decode_record, open_record, sign_record, tombstone_of
from citynode.render import record_json

KEY = SigningKey(bytes([7]) * 32)
T0 = 1_735_689_600_000


def test_a_tombstone_view_has_no_subject_nor_dataschema() -> None:
    rec = sign_record(KEY, feed="test", seq=1, prev=None, time_ms=T0,
                      type="org.example.Test", data={"n": 1},
                      subject="Jane Doe +41 79 000 00 00", dataschema="https://example.org/s")
    held = record_json(rec)
    assert held["subject"] == "Jane Doe +41 79 000 00 00"
    assert held["dataschema"] == "https://example.org/s"
    tomb = open_record(*decode_record(tombstone_of(rec.envelope)), now_ms=T0,
                       verifier=Verifier())
    view = record_json(tomb, erased=(b"\x01" * 32, "personal data"))
    assert "subject" not in view and "dataschema" not in view and "data" not in view
    assert view["id"] == rec.id.hex() and view["erased"]["reason"] == "personal data"
    assert "Jane" not in repr(view)
