"""Record bodies, envelopes, ids and verification (citynode.core.records)."""

from __future__ import annotations

import hashlib
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from citynode.core import encoding
from citynode.core.keys import DOMAIN_CARD, DOMAIN_RECORD, SigningKey, Verifier
from citynode.core.records import (
    DEFAULT_FUTURE_TOLERANCE_MS,
    FORMAT_VERSION,
    MAX_SEQ,
    RecordPolicy,
    check_feed_name,
    decode_envelope,
    decode_record,
    encode_envelope,
    encode_record,
    make_body,
    open_record,
    open_records,
    parse_body,
    record_id,
    sign_record,
    split_envelope,
)
from citynode.errors import (
    EncodingError,
    InvalidRecord,
    PayloadError,
    SignatureError,
)

KEY = SigningKey(bytes([1]) * 32)
OTHER = SigningKey(bytes([2]) * 32)
T0 = 1_735_689_600_000
NOW = T0 + 3_600_000
AIR = {
    "dateObserved": "2025-01-01T00:00:00Z",
    "location": {"type": "Point", "coordinates": [8.5417, 47.3769]},
    "pm25": 12.5,
    "no2": 31,
    "stationName": "Zürich",
}


#: Payload digest -> payload bytes, of every payload _fields and _sign made: _open finds
#: a body's payload by the digest it carries.
_PAYLOADS: dict[bytes, bytes] = {}
_AUTO: Any = object()
#: The salt of every payload _fields makes (fixed, so bodies compare equal).
SALT = bytes(range(16))


def _sign(**kw: Any) -> Any:
    args: dict[str, Any] = {
        "feed": "air", "seq": 1, "prev": None, "time_ms": T0, "type": "AirQualityObserved",
        "data": AIR,
    }
    args.update(kw)
    rec = sign_record(KEY, **args)
    _PAYLOADS[rec.digest] = rec.payload
    return rec


def _fields(**kw: Any) -> dict[str, Any]:
    """A body's fields; ``data``, ``subject`` and ``dataschema`` (the payload, salted)
    are taken out and replaced by its digest (``data_digest`` given explicitly wins)."""
    f: dict[str, Any] = {
        "version": 2, "origin": KEY.public_key, "feed": "test", "seq": 1, "time": T0,
        "type": "org.example.Test", "data": {"reading": 42},
    }
    f.update(kw)
    data = f.pop("data")
    # subject and dataschema travel in the payload, beside data
    extra = {k: f.pop(k) for k in ("subject", "dataschema") if k in f}
    if data is not ... and "data_digest" not in f:
        payload = encoding.encode({"data": data, "salt": SALT} | extra)
        f["data_digest"] = hashlib.sha256(payload).digest()
        _PAYLOADS[f["data_digest"]] = payload
    return {k: v for k, v in f.items() if v is not ...}


def _payload_of(body: bytes) -> bytes | None:
    try:
        f = msgpack.unpackb(body, strict_map_key=False)
    except Exception:  # not msgpack at all: there is no digest to find
        return None
    if not isinstance(f, dict):
        return None
    digest = f.get("data_digest", f.get("sealed_digest"))
    return _PAYLOADS.get(digest) if isinstance(digest, bytes) else None


def _open(body: bytes, sig: bytes | None = None, payload: bytes | None = _AUTO,
          **kw: Any) -> Any:
    if sig is None:
        sig = KEY.sign(DOMAIN_RECORD, body)
    if payload is _AUTO:
        payload = _payload_of(body)
    return open_record(body, sig, payload, now_ms=kw.pop("now_ms", NOW), verifier=Verifier(),
                       **kw)


def _reason(body: bytes, sig: bytes | None = None, **kw: Any) -> str:
    with pytest.raises(InvalidRecord) as info:
        _open(body, sig, **kw)
    return info.value.reason


# --------------------------------------------------------------------------- sign + open


def test_sign_then_open_round_trip() -> None:
    rec = _sign(subject="station-1", dataschema="https://example.org/s.json")
    back = _open(rec.body, rec.sig)
    assert back == rec
    assert rec.id == record_id(rec.body) == hashlib.sha256(rec.body).digest()
    assert rec.origin == KEY.public_key
    assert (rec.feed, rec.seq, rec.prev, rec.time, rec.type) == (
        "air", 1, None, T0, "AirQualityObserved"
    )
    assert rec.subject == "station-1"
    assert rec.dataschema == "https://example.org/s.json"
    assert rec.data == AIR
    assert encoding.encode(rec.fields()) == rec.body
    assert rec.fields()["version"] == FORMAT_VERSION == 2
    assert encoding.decode(rec.payload) == {
        "data": AIR, "salt": encoding.decode(rec.payload)["salt"], "subject": "station-1",
        "dataschema": "https://example.org/s.json"}
    assert "subject" not in rec.fields() and "dataschema" not in rec.fields()
    assert rec.digest == hashlib.sha256(rec.payload).digest() == rec.fields()["data_digest"]


def test_chain_of_two() -> None:
    r1 = _sign()
    r2 = _sign(seq=2, prev=r1.id, time_ms=T0 + 1)
    assert _open(r2.body, r2.sig).prev == r1.id


def test_signature_covers_domain_and_body() -> None:
    rec = _sign()
    assert rec.sig == KEY.sign(DOMAIN_RECORD, rec.body)
    # The same body signed for another purpose is not a record signature.
    assert _reason(rec.body, KEY.sign(DOMAIN_CARD, rec.body)) == "bad_signature"
    assert _reason(rec.body, KEY.sign(b"", rec.body)) == "bad_signature"


def test_signature_by_another_key_fails() -> None:
    rec = _sign()
    with pytest.raises(SignatureError) as info:
        _open(rec.body, OTHER.sign(DOMAIN_RECORD, rec.body))
    assert info.value.reason == "bad_signature"


def test_id_does_not_depend_on_the_signature() -> None:
    rec = _sign()
    given_rid = b"\x01" * 32
    assert _open(rec.body, rec.sig, rid=given_rid).id == given_rid  # caller-hashed id
    assert _open(rec.body, rec.sig).id == hashlib.sha256(rec.body).digest()


def test_verifier_counts_each_verification() -> None:
    rec = _sign()
    v = Verifier()
    open_record(rec.body, rec.sig, rec.payload, now_ms=NOW, verifier=v)
    open_record(rec.body, rec.sig, None, now_ms=NOW, verifier=v)
    assert v.count == 2


_SIGNED = _sign(subject="s-1")


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_single_byte_change_to_body_signature_or_payload_fails(data: st.DataObject
                                                                   ) -> None:
    body, sig = bytearray(_SIGNED.body), bytearray(_SIGNED.sig)
    payload = bytearray(_SIGNED.payload)
    target = data.draw(st.sampled_from(["body", "sig", "payload"]), label="target")
    buf = {"body": body, "sig": sig, "payload": payload}[target]
    i = data.draw(st.integers(0, len(buf) - 1), label="index")
    buf[i] = data.draw(st.integers(0, 255).filter(lambda b: b != buf[i]), label="byte")
    with pytest.raises(InvalidRecord) as info:
        _open(bytes(body), bytes(sig), bytes(payload))
    if target == "sig":
        assert type(info.value) is SignatureError
    if target == "payload":
        assert info.value.reason == "payload_mismatch"


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_single_byte_change_to_an_envelope_fails(data: st.DataObject) -> None:
    env = bytearray(_SIGNED.envelope)
    i = data.draw(st.integers(0, len(env) - 1), label="index")
    env[i] = data.draw(st.integers(0, 255).filter(lambda b: b != env[i]), label="byte")
    with pytest.raises(InvalidRecord):
        body, sig, payload = decode_record(bytes(env))
        _open(body, sig, payload)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300), st.binary(min_size=0, max_size=70))
def test_open_record_on_arbitrary_bytes_raises_only_invalid_record(body: bytes, sig: bytes
                                                                   ) -> None:
    with pytest.raises(InvalidRecord):
        open_record(body, sig, None, now_ms=NOW, verifier=Verifier())
    with pytest.raises(InvalidRecord):
        open_record(body, sig, body, now_ms=NOW, verifier=Verifier())


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_decode_envelope_on_arbitrary_bytes_raises_only_encoding_error(data: bytes) -> None:
    try:
        body, sig = decode_envelope(data)
    except EncodingError:
        return
    assert len(sig) == 64 and encode_envelope(body, sig) == data


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_decode_record_on_arbitrary_bytes_raises_only_encoding_error(data: bytes) -> None:
    try:
        body, sig, payload = decode_record(data)
    except EncodingError:
        return
    assert len(sig) == 64 and encode_record(body, sig, payload) == data


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_open_record_on_mutated_bodies_raises_only_invalid_record(data: st.DataObject) -> None:
    """Mutations of a real body reach the field and payload checks, not just the decoder."""
    body = bytearray(_SIGNED.body)
    for _ in range(data.draw(st.integers(1, 4), label="changes")):
        i = data.draw(st.integers(0, len(body) - 1))
        body[i] = data.draw(st.integers(0, 255))
    # Signed, so that a body that passes every other check is accepted.
    b = bytes(body)
    try:
        rec = _open(b, KEY.sign(DOMAIN_RECORD, b))
    except InvalidRecord:
        return
    assert encoding.encode(rec.fields()) == b


_canonical_data = st.dictionaries(
    st.text(min_size=1, max_size=10),
    st.recursive(
        st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
        | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
        | st.binary(max_size=20),
        lambda inner: st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=6), inner, max_size=4),
        max_leaves=10,
    ),
    max_size=6,
)


@settings(max_examples=100, deadline=None)
@given(
    _canonical_data,
    st.integers(1, MAX_SEQ),
    st.integers(0, NOW + DEFAULT_FUTURE_TOLERANCE_MS),
    st.from_regex(r"[a-z0-9][a-z0-9._-]{0,63}", fullmatch=True),
    st.none() | st.text(min_size=1, max_size=30),
)
def test_signed_records_always_open(data: dict[str, Any], seq: int, t: int, feed: str,
                                    subject: str | None) -> None:
    prev = None if seq == 1 else hashlib.sha256(b"%d" % seq).digest()
    rec = sign_record(KEY, feed=feed, seq=seq, prev=prev, time_ms=t, type="org.example.Test",
                      data=data, subject=subject)
    assert _open(rec.body, rec.sig, rec.payload) == rec
    assert encoding.encode(rec.fields()) == rec.body


# --------------------------------------------------------------------------- body fields


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"version": 4}, "unknown_version"),
        ({"version": 3}, "missing_field"),  # version 3 (a cn2 origin) carries key
        ({"version": 1}, "unknown_version"),
        ({"version": 0}, "unknown_version"),
        ({"version": True}, "unknown_version"),
        ({"version": 1.0}, "unknown_version"),
        ({"version": "1"}, "unknown_version"),
        ({"version": ...}, "unknown_version"),
        ({"origin": ...}, "missing_field"),
        ({"feed": ...}, "missing_field"),
        ({"seq": ...}, "missing_field"),
        ({"time": ...}, "missing_field"),
        ({"type": ...}, "missing_field"),
        ({"data": ...}, "missing_field"),
        ({"data_digest": b"\x00" * 31}, "bad_field"),
        ({"data_digest": "0" * 32}, "bad_field"),
        ({"sealed_digest": b"\x00" * 32}, "bad_field"),
        ({"id": "x"}, "unknown_field"),
        ({"source": "x"}, "unknown_field"),
        ({"origin": b"\x00" * 33}, "bad_field"),
        ({"origin": None}, "bad_field"),
        ({"feed": ""}, "bad_field"),
        ({"feed": b"test"}, "bad_field"),
        ({"seq": 0}, "bad_field"),
        ({"seq": -1}, "bad_field"),
        ({"seq": MAX_SEQ + 1, "prev": b"\x00" * 32}, "bad_field"),
        ({"seq": 1.0}, "bad_field"),
        ({"seq": True}, "bad_field"),
        ({"prev": b"\x00" * 32}, "bad_prev"),
        ({"prev": None}, "bad_prev"),
        ({"seq": 2}, "bad_prev"),
        ({"seq": 2, "prev": None}, "bad_prev"),
        ({"seq": 2, "prev": b"\x00" * 33}, "bad_prev"),
        ({"seq": 2, "prev": "0" * 32}, "bad_prev"),
        ({"time": -1}, "bad_field"),
        ({"time": False}, "bad_field"),
        ({"time": "2025-01-01T00:00:00Z"}, "bad_field"),
        ({"type": ""}, "bad_field"),
        ({"type": 7}, "bad_field"),
        ({"data": None}, "bad_field"),
        ({"data": "x"}, "bad_field"),
        ({"subject": ""}, "bad_field"),
        ({"subject": "x" * 513}, "bad_field"),
        ({"subject": None}, "bad_field"),
        ({"dataschema": 5}, "bad_field"),
        ({"dataschema": "x" * 513}, "bad_field"),
        ({"type": "NoSuchType"}, "unknown_type"),
        ({"time": NOW + DEFAULT_FUTURE_TOLERANCE_MS + 1}, "future_time"),
    ],
    ids=repr,
)
def test_body_field_rules(changes: dict[str, Any], reason: str) -> None:
    assert _reason(encoding.encode(_fields(**changes))) == reason


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"subject": "x" * 512, "dataschema": "é" * 512},
        {"seq": MAX_SEQ, "prev": b"\x00" * 32},
        {"time": 0},
        {"time": 2**64 - 1, "seq": 3, "prev": b"\x00" * 32},
        {"feed": "a"},
        {"feed": "0" + "a._-" * 15 + "abc"},
    ],
    ids=repr,
)
def test_body_field_limits_that_are_valid(changes: dict[str, Any]) -> None:
    big_now = 2**64 if changes.get("time", 0) > NOW else NOW
    rec = _open(encoding.encode(_fields(**changes)), now_ms=big_now)
    assert rec.seq == changes.get("seq", 1)


def test_body_must_be_a_map() -> None:
    assert _reason(encoding.encode([1, 2])) == "bad_field"
    assert _reason(encoding.encode("body")) == "bad_field"


def test_future_time_tolerance_is_inclusive_and_configurable() -> None:
    assert DEFAULT_FUTURE_TOLERANCE_MS == 15 * 60 * 1000
    at = encoding.encode(_fields(time=NOW + DEFAULT_FUTURE_TOLERANCE_MS))
    assert _open(at).time == NOW + DEFAULT_FUTURE_TOLERANCE_MS
    over = encoding.encode(_fields(time=NOW + DEFAULT_FUTURE_TOLERANCE_MS + 1))
    assert _reason(over) == "future_time"
    assert _open(over, now_ms=NOW + 1).time > NOW  # later, the same record is fine
    strict = RecordPolicy(future_tolerance_ms=0)
    assert _reason(encoding.encode(_fields(time=NOW + 1)), policy=strict) == "future_time"
    assert _open(encoding.encode(_fields(time=NOW)), policy=strict).time == NOW
    # The past is never checked.
    assert _open(encoding.encode(_fields(time=0))).time == 0


def test_payload_check_can_be_switched_off() -> None:
    body = encoding.encode(_fields(type="NoSuchType"))
    assert _reason(body) == "unknown_type"
    off = RecordPolicy(check_payload=False)
    assert _open(body, policy=off).type == "NoSuchType"


def test_payload_errors_are_payload_errors() -> None:
    data = dict(AIR)
    del data["dateObserved"]
    body = encoding.encode(_fields(type="AirQualityObserved", data=data))
    with pytest.raises(PayloadError):
        _open(body)


def test_body_limits_come_from_the_policy() -> None:
    body = encoding.encode(_fields(data={"v": [[[1]]]}))  # a payload 4 levels deep
    assert _open(body).data == {"v": [[[1]]]}
    shallow = RecordPolicy(body_limits=encoding.Limits(max_depth=3))
    assert _reason(body, policy=shallow) == "too_deep"
    small = RecordPolicy(body_limits=encoding.Limits(max_bytes=len(body) - 1))
    assert _reason(body, policy=small) == "too_large"


def test_signature_must_be_64_bytes() -> None:
    rec = _sign()
    for sig in (rec.sig[:63], rec.sig + b"\x00", b""):
        assert _reason(rec.body, sig) == "bad_envelope"


def test_parse_body_checks_fields_without_signature() -> None:
    f = parse_body(encoding.encode(_fields()))
    assert f["seq"] == 1 and f["origin"] == KEY.public_key
    with pytest.raises(InvalidRecord):
        parse_body(encoding.encode(_fields(seq=0)))


# --------------------------------------------------------------------------- make_body


@pytest.mark.parametrize(
    ("kw", "error"),
    [
        ({"seq": 0}, InvalidRecord),
        ({"seq": 1, "prev": b"\x00" * 32}, InvalidRecord),
        ({"seq": 2, "prev": None}, InvalidRecord),
        ({"feed": "Bad Feed"}, InvalidRecord),
        ({"time_ms": -5}, InvalidRecord),
        ({"type": "AirQualityObserved", "data": {"pm25": 1}}, PayloadError),
        ({"type": "Nope"}, PayloadError),
        ({"data": {"x": float("nan")}}, EncodingError),
        ({"data": {"x": [[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]}}, EncodingError),
        ({"subject": ""}, InvalidRecord),
    ],
    ids=repr,
)
def test_never_signs_what_receivers_reject(kw: dict[str, Any], error: type[Exception]) -> None:
    args: dict[str, Any] = {
        "feed": "test", "seq": 1, "prev": None, "time_ms": T0, "type": "org.example.Test",
        "data": {"reading": 1},
    }
    args.update(kw)
    with pytest.raises(error):
        sign_record(KEY, **args)
    with pytest.raises(error):
        make_body(origin=KEY.public_key, **args)


def test_make_body_is_canonical_and_omits_absent_optionals() -> None:
    body, payload = make_body(origin=KEY.public_key, feed="test", seq=1, prev=None,
                              time_ms=T0, type="org.example.Test", data={"b": 1, "a": 2},
                              salt=SALT)
    assert body == encoding.encode(_fields(data={"a": 2, "b": 1}))
    assert payload == encoding.encode({"data": {"a": 2, "b": 1}, "salt": SALT})
    assert set(encoding.decode(body)) == {"data_digest", "feed", "origin", "seq", "time",
                                          "type", "version"}


def test_the_digest_is_not_reproducible_from_the_data_alone() -> None:
    """The payload is salted: the same data signed twice gets two payloads and two
    digests, and neither digest is the hash of the data (or of the data with any
    other salt), so a tombstone's digest cannot confirm a guess of erased data."""
    args: dict[str, Any] = {"origin": KEY.public_key, "feed": "test", "seq": 1,
                            "prev": None, "time_ms": T0, "type": "org.example.Test",
                            "data": {"reading": 42}}
    body1, p1 = make_body(**args)
    body2, p2 = make_body(**args)
    d1, d2 = encoding.decode(body1)["data_digest"], encoding.decode(body2)["data_digest"]
    assert d1 != d2 and p1 != p2
    guesses = [encoding.encode({"reading": 42}),
               encoding.encode({"data": {"reading": 42}, "salt": bytes(16)}),
               encoding.encode({"data": {"reading": 42}, "salt": SALT})]
    assert not {hashlib.sha256(g).digest() for g in guesses} & {d1, d2}
    assert encoding.decode(p1)["data"] == encoding.decode(p2)["data"] == {"reading": 42}
    # with the salt the digest is reproduced, which is how a payload is checked
    salt1 = encoding.decode(p1)["salt"]
    assert hashlib.sha256(encoding.encode({"data": {"reading": 42}, "salt": salt1})
                          ).digest() == d1


def test_subject_and_dataschema_go_with_the_payload() -> None:
    """Erasing or pruning the payload removes what the record is about: a tombstone
    keeps origin, feed, seq, prev, time, type and the digest, nothing more."""
    rec = _sign(subject="Jane Doe +41 79 000 00 00", dataschema="https://example.org/s")
    assert rec.subject not in repr(rec.fields()) and b"Jane" not in rec.body
    tomb = _open(rec.body, rec.sig, None)
    assert tomb.is_tombstone and tomb.subject is None and tomb.dataschema is None
    assert set(rec.fields()) == {"data_digest", "feed", "origin", "seq", "time", "type",
                                 "version"}
    # a body that still carries them is refused: they are not body fields any more
    for k in ("subject", "dataschema"):
        body = encoding.encode(rec.fields() | {k: "s"})
        assert _reason(body, payload=rec.payload) == "unknown_field"


@pytest.mark.parametrize(("payload", "reason"), [
    ({"data": {"reading": 42}}, "missing_field"),
    ({"salt": SALT}, "missing_field"),
    ({"data": {"reading": 42}, "salt": SALT[:15]}, "bad_field"),
    ({"data": {"reading": 42}, "salt": "0" * 16}, "bad_field"),
    ({"data": [42], "salt": SALT}, "bad_field"),
    ({"data": {"reading": 42}, "salt": SALT, "pepper": 1}, "unknown_field"),
    ({"reading": 42}, "missing_field"),
])
def test_payload_map_shape(payload: dict[str, Any], reason: str) -> None:
    raw = encoding.encode(payload)
    f = _fields(data=..., data_digest=hashlib.sha256(raw).digest())
    assert _reason(encoding.encode(f), payload=raw) == reason


# --------------------------------------------------------------------------- envelope


@pytest.mark.parametrize(("size", "header"), [
    (0, "c400"), (255, "c4ff"), (256, "c50100"), (65535, "c5ffff"), (65536, "c600010000"),
])
def test_envelope_layout(size: int, header: str) -> None:
    body, sig = b"\xab" * size, bytes(range(64))
    env = encode_envelope(body, sig)
    assert env == b"\x92" + bytes.fromhex(header) + body + b"\xc4\x40" + sig
    assert encoding.decode(env, encoding.Limits(max_bytes=70_000)) == [body, sig]
    if size:  # an envelope is at least 70 bytes; an empty body is never a record
        assert decode_envelope(env) == (body, sig)
        assert split_envelope([body, sig]) == (body, sig)


def test_envelope_body_size_limit() -> None:
    sig = bytes(64)
    env = encode_envelope(b"\x00" * 65537, sig)
    with pytest.raises(EncodingError) as info:
        decode_envelope(env)
    assert info.value.reason == "too_large"
    assert decode_envelope(env, encoding.Limits(max_bytes=65537)) == (b"\x00" * 65537, sig)


@pytest.mark.parametrize(
    ("env", "reason"),
    [
        (b"\x92\xc5\x00\x10" + b"\x00" * 16 + b"\xc4\x40" + bytes(64), "non_canonical"),
        (b"\x92\xc6\x00\x00\xff\xff" + b"\x00" * 65535 + b"\xc4\x40" + bytes(64),
         "non_canonical"),
        (b"\x91\xc4\x10" + b"\x00" * 16 + b"\xc4\x40" + bytes(64), "bad_envelope"),
        (b"\x93\xc4\x10" + b"\x00" * 16 + b"\xc4\x40" + bytes(64) + b"\xc0", "bad_envelope"),
        (b"\x92\xd9\x10" + b"\x00" * 16 + b"\xc4\x40" + bytes(64), "bad_envelope"),
        (b"\x92\xc4\x10" + b"\x00" * 16 + b"\xc4\x3f" + bytes(63), "bad_envelope"),
        (b"\x92\xc4\x10" + b"\x00" * 16 + b"\xc5\x00\x40" + bytes(64), "bad_envelope"),
        (b"\x92\xc4\x10" + b"\x00" * 16 + b"\xc4\x40" + bytes(64) + b"\x00", "bad_envelope"),
        (b"\x92\xc4\x10" + b"\x00" * 16 + b"\xc4\x40" + bytes(63), "bad_envelope"),
        (b"\x92\xc4\x11" + b"\x00" * 16 + b"\xc4\x40" + bytes(64), "bad_envelope"),
        (b"", "bad_envelope"),
        (b"\x92", "bad_envelope"),
    ],
)
def test_decode_envelope_rejects(env: bytes, reason: str) -> None:
    with pytest.raises(EncodingError) as info:
        decode_envelope(env)
    assert info.value.reason == reason


@pytest.mark.parametrize(
    "value",
    [[b"x"], [b"x", b"y" * 64, b"z"], [b"x", b"y" * 63], ["x", b"y" * 64], [b"x", "y" * 64],
     (b"x", b"y" * 64), {"a": 1}],
    ids=repr,
)
def test_split_envelope_rejects(value: Any) -> None:
    with pytest.raises(EncodingError) as info:
        split_envelope(value)
    assert info.value.reason == "bad_envelope"


# --------------------------------------------------------------------------- feed names


@pytest.mark.parametrize("name", ["a", "0", "air-quality", "city.traffic_v2", "a" * 64,
                                  "9._-"])
def test_valid_feed_names(name: str) -> None:
    assert check_feed_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "A", "Air", ".a", "-a", "_a", "a" * 65, "a b", "a/b", "ä", "a\n", "a\x00", "ａ", 5,
     None, b"a"],
    ids=repr,
)
def test_invalid_feed_names(name: Any) -> None:
    with pytest.raises(InvalidRecord) as info:
        check_feed_name(name)
    assert info.value.reason == "bad_field"


# --------------------------------------------------------------------------- batches


def _one(body: bytes, sig: bytes, payload: bytes | None, accept: Any = None) -> Any:
    try:
        return open_record(body, sig, payload, now_ms=NOW, verifier=Verifier(),
                           accept=accept)
    except InvalidRecord as exc:
        return exc


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, InvalidRecord) or isinstance(b, InvalidRecord):
        return type(a) is type(b) and a.reason == b.reason and str(a) == str(b)
    return bool(a == b)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 8), st.integers(0, 255), st.integers(0, 400)),
                max_size=10))
def test_open_records_gives_open_records_verdicts_in_order(plan: list[Any]) -> None:
    """A batch mixes good records, bad signatures, broken bodies, future dates,
    strangers, tombstones and payloads that do not match; each item gets exactly what
    open_record gives it, in input order."""
    good = [_sign(seq=1, data={**AIR, "pm25": float(i)}) for i in range(3)]
    future = _sign(time_ms=NOW + DEFAULT_FUTURE_TOLERANCE_MS + 1)
    stranger = sign_record(OTHER, feed="air", seq=1, prev=None, time_ms=T0,
                           type="AirQualityObserved", data=AIR)
    items = []
    for kind, byte, pos in plan:
        rec = good[pos % 3]
        body, sig, payload = rec.body, rec.sig, rec.payload
        if kind == 1:  # signature changed
            sig = sig[: pos % 64] + bytes([sig[pos % 64] ^ (byte | 1)]) + sig[pos % 64 + 1:]
        elif kind == 2:  # body changed
            b = bytearray(body)
            b[pos % len(b)] = byte
            body = bytes(b)
        elif kind == 3:
            body, sig = future.body, future.sig
        elif kind == 4:
            body, sig = stranger.body, stranger.sig
        elif kind == 5:
            sig = sig[:63]
        elif kind == 6:
            payload = None
        elif kind == 7:
            payload = good[(pos + 1) % 3].payload
        items.append((body, sig, payload, None if pos % 2 else record_id(body)))

    def accept(origin: bytes) -> bool:
        return origin == KEY.public_key

    got = open_records(items, now_ms=NOW, verifier=Verifier(), accept=accept)
    assert len(got) == len(items)
    for (body, sig, payload, _), result in zip(items, got, strict=True):
        one = _one(body, sig, payload, accept)
        assert _same(result, one), (result, one)
    assert sum(not isinstance(r, InvalidRecord) for r in got) == sum(
        not isinstance(_one(b, s, p, accept), InvalidRecord) for b, s, p, _ in items
    )


def test_open_records_checks_each_signature_once_and_only_after_the_checks() -> None:
    good = _sign()
    bad_body, payload = make_body(origin=KEY.public_key, feed="air", seq=1, prev=None,
                                  time_ms=NOW + DEFAULT_FUTURE_TOLERANCE_MS + 1,
                                  type="AirQualityObserved", data=AIR)
    v = Verifier()
    got = open_records([(good.body, good.sig, good.payload, None),
                        (bad_body, good.sig, payload, None)], now_ms=NOW, verifier=v)
    assert got[0] == good
    assert isinstance(got[1], InvalidRecord) and got[1].reason == "future_time"
    assert v.count == 1  # the future-dated one never reached the signature check
