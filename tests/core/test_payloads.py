"""Payloads beside the body, tombstones and erasure requests (core, no event loop).

The format (record format 2): the body carries the payload's SHA-256, the envelope the
payload (or nil), and removing it changes nothing that is signed. The rules: a tombstone
is taken only with an erasure request of its origin or retention behind it; an erasure
request names positions of its signer's own feeds. The vectors of
tests/vectors/payloads.json are checked here through the public API.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from citynode.core import encoding
from citynode.core import erasure as er
from citynode.core.cards import NodeCard, make_card
from citynode.core.chain import ForkProof, canonical_fork_proof, verify_fork_proof
from citynode.core.checkpoints import MerkleLog
from citynode.core.keys import SigningKey, Verifier
from citynode.core.records import (
    Record,
    decode_record,
    encode_record,
    open_record,
    sealed_of,
    sign_record,
    stored_record,
    tombstone_of,
    with_payload,
)
from citynode.core.types import (
    ERASURE_FEED,
    ERASURE_TYPE,
    MAX_ERASURE_ENTRIES,
    validate_erasure,
    validate_payload,
)
from citynode.errors import InvalidRecord, PayloadError

A = SigningKey(bytes([1]) * 32)
B = SigningKey(bytes([2]) * 32)
KEYS = {A.public_key: A, B.public_key: B}  # the vectors' signers (KEY_A, KEY_B)
T0 = 1_735_689_600_000
DAY = er.DAY_MS
VECTORS = json.loads((Path(__file__).resolve().parents[1] / "vectors" / "payloads.json")
                     .read_text(encoding="utf-8"))


def _rec(key: SigningKey = A, *, feed: str = "reports", seq: int = 1,
         prev: bytes | None = None, t: int = T0, data: dict[str, Any] | None = None,
         readers: list[bytes] | None = None) -> Record:
    return sign_record(key, feed=feed, seq=seq, prev=prev, time_ms=t, type="org.example.Test",
                       data={"n": seq} if data is None else data, readers=readers)


def _erasure(key: SigningKey, entries: list[tuple[str, int, bytes]], reason: str = "oops",
             *, seq: int = 1, prev: bytes | None = None) -> Record:
    return sign_record(key, feed=ERASURE_FEED, seq=seq, prev=prev, time_ms=T0 + DAY,
                       type=ERASURE_TYPE, data={
                           "erase": [{"feed": f, "seq": s, "id": i} for f, s, i in entries],
                           "reason": reason})


def _open(env: bytes, now: int = T0 + DAY) -> Record:
    return open_record(*decode_record(env), now_ms=now, verifier=Verifier())


# --------------------------------------------------------------------------- format


def test_the_body_signs_the_payload_digest_and_the_payload_travels_beside_it() -> None:
    r = _rec(data={"reading": 42, "unit": "dB"})
    salt = encoding.decode(r.payload)["salt"]
    assert len(salt) == 16
    assert r.payload == encoding.encode({"data": {"reading": 42, "unit": "dB"}, "salt": salt})
    assert r.digest == hashlib.sha256(r.payload).digest()
    assert encoding.decode(r.body)["data_digest"] == r.digest
    assert "data" not in encoding.decode(r.body)
    body, sig, payload = decode_record(r.envelope)
    assert (body, sig, payload) == (r.body, r.sig, r.payload)
    assert r.envelope == b"\x93" + b"\xc4" + bytes([len(body)]) + body + b"\xc4\x40" + sig \
        + b"\xc4" + bytes([len(payload)]) + payload


def test_a_tombstone_keeps_id_signature_chain_and_checkpoint_inclusion() -> None:
    recs = [_rec()]
    for seq in range(2, 6):
        recs.append(_rec(seq=seq, prev=recs[-1].id))
    tomb = tombstone_of(recs[2].envelope)
    assert tomb == recs[2].envelope[:-(len(recs[2].payload) + 2)] + b"\xc0"
    t = _open(tomb)
    assert t.is_tombstone and t.payload is None and t.data == {}
    assert (t.id, t.sig, t.prev, t.seq) == (recs[2].id, recs[2].sig, recs[1].id, 3)
    assert _open(recs[3].envelope).prev == t.id  # the chain still links across it
    log = MerkleLog([r.id for r in recs])  # leaves are ids: untouched by the removal
    assert log.root() == MerkleLog([*(r.id for r in recs[:2]), t.id,
                                    *(r.id for r in recs[3:])]).root()
    assert with_payload(tomb, recs[2].payload) == recs[2].envelope
    assert stored_record(tomb).is_tombstone


def test_a_payload_that_is_not_the_one_signed_is_refused() -> None:
    r = _rec()
    other = _rec(seq=1, data={"n": 2})
    for payload in (other.payload, r.payload + b"\xc0", b"", encoding.encode({"n": 1.0})):
        with pytest.raises(InvalidRecord) as info:
            open_record(r.body, r.sig, payload, now_ms=T0, verifier=Verifier())
        assert info.value.reason == "payload_mismatch"


def test_a_payload_is_checked_against_its_type_when_present() -> None:
    good = {"dateObserved": "2025-01-01T00:00:00Z", "pm25": 1.0,
            "location": {"type": "Point", "coordinates": [1.0, 2.0]}}
    r = sign_record(A, feed="air", seq=1, prev=None, time_ms=T0, type="AirQualityObserved",
                    data=good)
    assert _open(r.envelope).data == good
    # A body whose digest names a payload invalid for its type: signed, digest right,
    # still refused for the payload (and its tombstone verifies on its own).
    bad = encoding.encode({"data": {"pm25": 1.0}, "salt": bytes(16)})
    body = encoding.encode({**encoding.decode(r.body), "data_digest":
                            hashlib.sha256(bad).digest()})
    from citynode.core.keys import DOMAIN_RECORD

    sig = A.sign(DOMAIN_RECORD, body)
    with pytest.raises(PayloadError):
        open_record(body, sig, bad, now_ms=T0, verifier=Verifier())
    assert open_record(body, sig, None, now_ms=T0, verifier=Verifier()).is_tombstone


def test_sealed_records_keep_their_seal_beside_the_body() -> None:
    r = _rec(readers=[B.public_key])
    assert r.type == "sealed" and r.sealed is not None
    f = encoding.decode(r.body)
    assert "sealed_digest" in f and "sealed" not in f and "type" not in f
    assert f["sealed_digest"] == hashlib.sha256(r.payload).digest()
    assert sealed_of(r.envelope) == r.sealed
    t = _open(tombstone_of(r.envelope))
    assert t.type == "sealed" and t.sealed is None and t.is_tombstone
    assert sealed_of(tombstone_of(r.envelope)) == {}  # sealed to nobody now
    assert sealed_of(_rec().envelope) is None  # a plain record


def test_canonical_fork_proofs_carry_no_payload() -> None:
    x, y = _rec(data={"name": "J. Doe"}), _rec(data={"name": "someone else"})
    proof, at = canonical_fork_proof(x, y)
    assert at == 1 and proof.a.endswith(b"\xc0") and proof.b.endswith(b"\xc0")
    a, b = verify_fork_proof(ForkProof.decode(proof.encode()), Verifier())
    assert {a.id, b.id} == {x.id, y.id}
    assert b"J. Doe" not in proof.encode()


# --------------------------------------------------------------------------- erasure


def test_erasure_payload_rules() -> None:
    rid = bytes(32)
    ok = {"erase": [{"feed": "reports", "seq": 1, "id": rid}], "reason": "personal data"}
    assert validate_erasure(ok) == [("reports", 1, rid)]
    validate_payload(ERASURE_TYPE, ok)
    bad: list[Any] = [
        {},
        {"erase": [], "reason": "x"},
        {"erase": [{"feed": "reports", "seq": 1, "id": rid}], "reason": ""},
        {"erase": [{"feed": "reports", "seq": 1, "id": rid}], "reason": "x" * 1001},
        {"erase": [{"feed": "reports", "seq": 1, "id": rid}], "reason": "x", "more": 1},
        {"erase": [{"feed": "reports", "seq": 0, "id": rid}], "reason": "x"},
        {"erase": [{"feed": "reports", "seq": True, "id": rid}], "reason": "x"},
        {"erase": [{"feed": "reports", "seq": 1, "id": rid[:31]}], "reason": "x"},
        {"erase": [{"feed": "Reports", "seq": 1, "id": rid}], "reason": "x"},
        {"erase": [{"feed": ERASURE_FEED, "seq": 1, "id": rid}], "reason": "x"},
        {"erase": [{"feed": "reports", "seq": 1, "id": rid, "x": 1}], "reason": "x"},
        {"erase": [{"feed": "reports", "seq": 1, "id": rid}] * 2, "reason": "x"},
        {"erase": [{"feed": "r", "seq": s, "id": rid}
                   for s in range(1, MAX_ERASURE_ENTRIES + 2)], "reason": "x"},
        {"erase": "reports", "reason": "x"},
    ]
    for value in bad:
        with pytest.raises(PayloadError) as info:
            validate_payload(ERASURE_TYPE, value)
        assert info.value.reason == "bad_erasure", value


def test_an_erasure_request_lives_in_its_feed_only_and_is_never_sealed() -> None:
    with pytest.raises(InvalidRecord) as info:
        sign_record(A, feed="reports", seq=1, prev=None, time_ms=T0, type=ERASURE_TYPE,
                    data={"erase": [{"feed": "x", "seq": 1, "id": bytes(32)}],
                          "reason": "x"})
    assert info.value.reason == "bad_erasure"
    with pytest.raises(InvalidRecord) as info:
        _rec(feed=ERASURE_FEED)
    assert info.value.reason == "bad_erasure"
    with pytest.raises(InvalidRecord) as info:
        sign_record(A, feed=ERASURE_FEED, seq=1, prev=None, time_ms=T0, type=ERASURE_TYPE,
                    data={"erase": [{"feed": "x", "seq": 1, "id": bytes(32)}],
                          "reason": "x"}, readers=[B.public_key])
    assert info.value.reason == "bad_erasure"


def test_a_tombstone_needs_its_origins_erasure_or_retention() -> None:
    r = _rec()
    t = _open(tombstone_of(r.envelope))
    mine = _erasure(A, [("reports", 1, r.id)])
    theirs = _erasure(B, [("reports", 1, r.id)])  # B names ITS (reports, 1)
    wrong = _erasure(A, [("reports", 1, bytes(32))])

    def verdict(erasures: list[Record], days: int | None = None, now: int = T0) -> str:
        named = er.named_by(er.erasures_in(erasures), [t])
        try:
            return er.tombstone_verdict(t, erased=named, now_ms=now,
                                        history=[_card(T0 - DAY, t.feed, days)])
        except InvalidRecord as exc:
            return exc.reason

    assert verdict([mine]) == "erased"
    assert verdict([]) == "payload_missing"
    assert verdict([theirs]) == "payload_missing"
    assert verdict([wrong]) == "payload_missing"
    assert verdict([], 30, T0 + 30 * DAY + 1) == "pruned"
    assert verdict([], 30, T0 + 30 * DAY) == "payload_missing"  # not past it yet
    assert verdict([], None, T0 + 10_000 * DAY) == "payload_missing"
    # An erasure request is never erased nor pruned.
    et = _open(tombstone_of(mine.envelope))
    with pytest.raises(InvalidRecord) as info:
        er.tombstone_verdict(et, erased={et.id: mine.id}, now_ms=T0 + 999 * DAY,
                             history=[_card(T0 - DAY, et.feed, 1)])
    assert info.value.reason == "payload_missing"


def _card(time_ms: int, feed: str, days: int | None, key: SigningKey = A) -> NodeCard:
    """A card of ``key`` dated ``time_ms`` listing ``feed`` with ``days`` of retention."""
    return make_card(key, name="a", url="https://a.example", tls_fingerprint=None,
                     feeds=[(feed, "public", days)], partners=[], software="t",
                     now_ms=time_ms)


def test_retention_is_the_one_in_force_when_the_record_was_signed() -> None:
    # Pruned under a card keeping payloads 1 day; the origin then raised it to 30: the
    # tombstone still has the retention it was signed under behind it.
    t = _open(tombstone_of(_rec().envelope))
    short, long_ = _card(T0 - DAY, t.feed, 1), _card(T0 + 2 * DAY, t.feed, 30)
    now = T0 + 3 * DAY
    assert er.retention_in_force([long_, short], t.feed, t.time) == 1
    assert er.tombstone_verdict(t, erased={}, history=[short, long_], now_ms=now) == "pruned"
    # Lowered later: the record signed under 30 days is not past it.
    with pytest.raises(InvalidRecord) as info:
        er.tombstone_verdict(t, erased={}, now_ms=now, history=[
            _card(T0 - DAY, t.feed, 30), _card(T0 + 2 * DAY, t.feed, 1)])
    assert info.value.reason == "payload_missing"
    # What a prune applies: each card's records, with that card's retention.
    assert er.retention_periods([long_, short], t.feed) == [
        (T0 - DAY, T0 + 2 * DAY, 1), (T0 + 2 * DAY, None, 30)]
    assert er.retention_periods([_card(T0, t.feed, None), long_], t.feed) == [
        (T0 + 2 * DAY, None, 30)]


def test_erasures_in_ignores_tombstones_and_other_types() -> None:
    r = _rec()
    e = _erasure(A, [("reports", 1, r.id), ("other", 7, bytes(32))])
    assert er.erasures_in([r, e]) == [er.Erasure(A.public_key, "reports", 1, r.id, e.id),
                                      er.Erasure(A.public_key, "other", 7, bytes(32), e.id)]
    assert er.erasures_in([_open(tombstone_of(e.envelope), T0 + 2 * DAY)]) == []


# --------------------------------------------------------------------------- vectors


def _vrec(name: str) -> Record:
    v = VECTORS["records"][name]
    rec = _open(bytes.fromhex(v["envelope_hex"]), now=T0 + 2 * DAY)
    assert rec.id.hex() == v["id_hex"]
    assert (rec.payload.hex() if rec.payload is not None else None) == v["payload_hex"]
    assert encode_record(rec.body, rec.sig, rec.payload).hex() == v["envelope_hex"]
    return rec


def test_vector_records_are_each_valid_on_their_own() -> None:
    names = set(VECTORS["records"])
    assert {"plain", "plain-tombstone", "sealed", "sealed-tombstone", "erasure",
            "erasure-wrong-id", "erasure-by-b"} <= names
    for name in names:
        _vrec(name)
    assert _vrec("plain").id == _vrec("plain-tombstone").id
    assert _vrec("sealed").sealed is not None and _vrec("sealed-tombstone").sealed is None


@pytest.mark.parametrize("case", VECTORS["invalid"], ids=lambda c: c["name"])
def test_invalid_payload_vector(case: dict[str, Any]) -> None:
    with pytest.raises(InvalidRecord) as info:
        _open(bytes.fromhex(case["envelope_hex"]), now=case["now_ms"])
    assert info.value.reason == case["expect"]["error"]


@pytest.mark.parametrize("case", VECTORS["ingest"], ids=lambda c: c["name"])
def test_ingest_vector(case: dict[str, Any]) -> None:
    rec = _vrec(case["record"])
    held = [_vrec(n) for n in case["erasures_held"]]
    batch = [_vrec(n) for n in case["same_batch"]]
    named = er.named_by(er.erasures_in([*held, *batch]), [rec])
    if rec.payload is not None:
        got: Any = "erased" if rec.id in named else "stored"
    else:
        try:
            history = [_card(c["time_ms"], rec.feed, c["retention_days"], KEYS[rec.origin])
                       for c in case["cards"]]
            got = er.tombstone_verdict(rec, erased=named, now_ms=case["now_ms"],
                                       history=history)
        except InvalidRecord as exc:
            got = {"error": exc.reason}
    assert got == case["expect"]


@pytest.mark.parametrize("case", VECTORS["erasures"], ids=lambda c: c["name"])
def test_erasure_vector(case: dict[str, Any]) -> None:
    recs = list(map(_vrec, case["held"]))
    held = {(r.origin, r.feed, r.seq): r for r in recs}
    by_id = {r.id: r for r in recs}
    e = _vrec(case["erasure"])
    dropped, ignored = [], []
    for x in er.erasures_in([e]):
        at = held.get((x.origin, x.feed, x.seq))
        named = by_id.get(x.id)
        try:
            effect = er.entry_effect(x, held_at_position=None if at is None else at.id,
                                     origin_of_id=None if named is None else named.origin)
        except InvalidRecord as exc:
            ignored.append({"feed": x.feed, "seq": x.seq, "reason": exc.reason})
            continue
        if effect == "drop":
            dropped.append(next(n for n in case["held"] if _vrec(n).id == x.id))
        else:
            assert effect == "wait" and at is None
    assert {"dropped": dropped, "ignored": ignored} == case["expect"]
