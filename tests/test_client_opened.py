"""A reader's client opens sealed records itself; the JSON view shows them once opened."""

from __future__ import annotations

import pytest

from citynode.client import _opened, record_to_json
from citynode.core import encoding
from citynode.core.keys import DOMAIN_RECORD, SigningKey
from citynode.core.records import (
    SEALED_TYPE,
    Record,
    make_body,
    parse_body,
    record_from_fields,
    record_id,
    sign_record,
)
from citynode.errors import InvalidRecord

NOTICE = {
    "severity": "high", "tlp": "TLP:AMBER", "affectedSystem": "SCADA gateway",
    "description": "Exploited in the wild; patch now.", "dateIssued": "2026-11-28T07:00:00Z",
}
ORIGIN, READER, OTHER = (SigningKey(bytes([i]) * 32) for i in (1, 2, 3))


def _sealed() -> Record:
    return sign_record(ORIGIN, feed="cyber-notices", seq=1, prev=None, time_ms=1,
                       type="CyberSecurityNotice", data=NOTICE, subject="gw-7",
                       readers=[READER.public_key])


def test_a_reader_gets_the_plaintext_and_the_signed_record() -> None:
    rec = _sealed()
    opened = _opened(rec, READER)
    assert (opened.type, opened.data, opened.subject) == ("CyberSecurityNotice", NOTICE, "gw-7")
    assert (opened.id, opened.body, opened.sig, opened.sealed) == (
        rec.id, rec.body, rec.sig, rec.sealed)
    j = record_to_json(opened, 7)
    assert j["decrypted"] is True and j["data"] == NOTICE and j["type"] == "CyberSecurityNotice"
    # Sealed to its readers and to its origin.
    assert j["cursor"] == 7 and sorted(j["sealed"]["to"]) == sorted(
        [READER.node_id, ORIGIN.node_id])
    assert record_to_json(opened, 7, READER) == j  # opened once, not again
    # fields() is still what was signed: the seal, with no plaintext beside it.
    assert encoding.encode(opened.fields()) == rec.body
    assert "subject" not in opened.fields() and parse_body(rec.body) == opened.fields()


def test_a_seal_that_does_not_open_for_its_reader_is_an_error() -> None:
    # A faulty origin: a validly signed record whose ciphertext is garbage.
    good = _sealed()
    assert good.sealed is not None
    broken = dict(good.sealed, ct=bytes(len(good.sealed["ct"])))
    body, payload = make_body(origin=ORIGIN.public_key, feed="cyber-notices", seq=1,
                              prev=None, time_ms=1, sealed=broken)
    rec = record_from_fields(record_id(body), body, ORIGIN.sign(DOMAIN_RECORD, body),
                             encoding.decode(body), payload, encoding.decode(payload))
    with pytest.raises(InvalidRecord, match="does not decrypt"):
        _opened(rec, READER)
    assert _opened(rec, OTHER) is rec  # not a reader: nothing to open, nothing to say


def test_anyone_else_gets_the_sealed_record_as_it_is() -> None:
    rec = _sealed()
    assert _opened(rec, OTHER) is rec
    j = record_to_json(rec, None, OTHER)
    assert j["type"] == SEALED_TYPE and "data" not in j and "decrypted" not in j
    assert "Exploited" not in str(j)


@pytest.mark.parametrize("data", ["!!!", "{bad json", '{"x": 1}', '{"envelope": 5}', "QUJD=x"])
def test_a_stream_event_that_is_not_a_record_is_an_error_not_a_crash(data: str) -> None:
    from citynode.client import _event_envelope

    with pytest.raises(InvalidRecord, match="not a record"):
        _event_envelope({"id": "1", "data": data})


def test_a_stream_event_carries_the_envelope_in_either_format() -> None:
    import base64
    import json

    from citynode.client import _event_cursor, _event_envelope

    env = _sealed().envelope
    b64 = base64.b64encode(env).decode()
    assert _event_envelope({"data": b64}) == env  # format=envelope
    assert _event_envelope({"data": json.dumps({"envelope": b64})}) == env  # JSON view
    assert _event_cursor({"id": "42"}) == 42
    with pytest.raises(InvalidRecord, match="cursor"):
        _event_cursor({"id": "4x2"})
