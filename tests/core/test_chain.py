"""Feed chains (classify) and fork proofs (core.chain)."""

from __future__ import annotations

import hashlib
from typing import Any

import nacl.bindings as nb
import pytest

from citynode.core import encoding
from citynode.core.chain import (
    FORK_PROOF_LIMITS,
    Decision,
    FeedHead,
    ForkProof,
    Verdict,
    classify,
    verify_fork_proof,
)
from citynode.core.keys import DOMAIN_RECORD, SigningKey, Verifier
from citynode.core.records import Record, decode_record, encode_record, open_record, sign_record
from citynode.errors import InvalidProof, InvalidRecord

A = SigningKey(bytes([1]) * 32)
B = SigningKey(bytes([2]) * 32)
T0 = 1_735_689_600_000


def rec(key: SigningKey = A, *, seq: int, prev: Record | bytes | None = None,
        feed: str = "chain", n: int = 0, time_ms: int = T0) -> Record:
    p = prev.id if isinstance(prev, Record) else prev
    return sign_record(key, feed=feed, seq=seq, prev=p, time_ms=time_ms,
                       type="org.example.Test", data={"n": n})


# main chain m1..m6, a fork f3..f5 branching after m2, and a record of another feed/origin
M: list[Record] = []
for _s in range(1, 7):
    M.append(rec(seq=_s, prev=M[-1] if M else None, n=_s))
F: list[Record] = []
for _s in range(3, 6):
    F.append(rec(seq=_s, prev=F[-1] if F else M[1], n=100 + _s))


def head_of(chain: list[Record], seq: int) -> FeedHead | None:
    return None if seq == 0 else FeedHead(seq, chain[seq - 1].id)


# --------------------------------------------------------------------------- classify


def test_first_record_on_empty_extends() -> None:
    assert classify(M[0], None, None) == Decision(Verdict.EXTENDS)


def test_later_record_on_empty_is_ahead() -> None:
    assert classify(M[3], None, None) == Decision(Verdict.AHEAD, missing=(1, 3))


@pytest.mark.parametrize("h", range(0, 7))
def test_own_chain_records_against_every_head(h: int) -> None:
    """Records of one chain: held ones are duplicates, the next extends, later ones wait."""
    head = head_of(M, h)
    for r in M:
        held = r.id if r.seq <= h else None
        d = classify(r, head, held)
        if r.seq <= h:
            assert d == Decision(Verdict.DUPLICATE)
        elif r.seq == h + 1:
            assert d == Decision(Verdict.EXTENDS)
        else:
            assert d == Decision(Verdict.AHEAD, missing=(h + 1, r.seq - 1))


@pytest.mark.parametrize("h", range(0, 7))
def test_fork_records_against_every_head(h: int) -> None:
    """Fork records at a held seq, or at the next seq with another prev, are
    equivocations; the first fork record is a valid extension of a head at seq 2."""
    head = head_of(M, h)
    for r in F:
        held = M[r.seq - 1].id if r.seq <= h else None
        d = classify(r, head, held)
        if r.seq <= h:
            assert d == Decision(Verdict.EQUIVOCATION, conflicts_with_seq=r.seq)
        elif r.seq == h + 1:
            if r.prev == M[h - 1].id:  # f3 on head m2: we never saw m3
                assert (r.seq, h) == (3, 2)
                assert d == Decision(Verdict.EXTENDS)
            else:
                assert d == Decision(Verdict.EQUIVOCATION, conflicts_with_seq=h)
        else:
            assert d == Decision(Verdict.AHEAD, missing=(h + 1, r.seq - 1))


def test_first_copy_wins() -> None:
    """Whichever of two seq-3 records was stored first, the other is the rival."""
    m_head = FeedHead(3, M[2].id)
    f_head = FeedHead(3, F[0].id)
    assert classify(F[0], m_head, M[2].id).verdict is Verdict.EQUIVOCATION
    assert classify(M[2], f_head, F[0].id).verdict is Verdict.EQUIVOCATION
    assert classify(M[2], m_head, M[2].id).verdict is Verdict.DUPLICATE
    assert classify(F[0], f_head, F[0].id).verdict is Verdict.DUPLICATE


def test_time_never_orders() -> None:
    r1 = rec(seq=1, time_ms=T0 + 10_000, feed="t")
    r2 = rec(seq=2, prev=r1, time_ms=0, feed="t")  # dated long before its predecessor
    r3 = rec(seq=3, prev=r2, time_ms=T0 + 5_000, feed="t")
    assert classify(r2, FeedHead(1, r1.id), None).verdict is Verdict.EXTENDS
    assert classify(r3, FeedHead(2, r2.id), None).verdict is Verdict.EXTENDS
    # A rival seq 2 that is dated later than the held one is still the rival.
    r2b = rec(seq=2, prev=r1, time_ms=T0 + 20_000, feed="t", n=9)
    assert classify(r2b, FeedHead(3, r3.id), r2.id) == Decision(
        Verdict.EQUIVOCATION, conflicts_with_seq=2
    )


def test_wrong_prev_at_next_seq() -> None:
    r2x = rec(seq=2, prev=b"\xee" * 32)
    assert classify(r2x, FeedHead(1, M[0].id), None) == Decision(
        Verdict.EQUIVOCATION, conflicts_with_seq=1
    )


# --------------------------------------------------------------------------- fork proofs


def proof(a: Record, b: Record) -> ForkProof:
    return ForkProof(a.envelope, b.envelope)


def _tomb(r: Record) -> bytes:
    return encode_record(r.body, r.sig, None)


def test_fork_proof_encoding_is_exact() -> None:
    a, b = _tomb(M[2]), _tomb(F[0])
    p = ForkProof(a, b)
    assert 256 <= len(a) < 65536 and 256 <= len(b) < 65536  # bin16 headers

    def bin16(x: bytes) -> bytes:
        return b"\xc5" + len(x).to_bytes(2, "big") + x

    raw = b"\x83\xa1a" + bin16(a) + b"\xa1b" + bin16(b) + b"\xa4kind\xa4fork"
    assert p.encode() == raw
    assert ForkProof.decode(raw) == p


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (M[2], F[0]),  # same seq 3
        (F[0], M[2]),
        (M[4], F[2]),  # same seq 5, far from the branch point
        (M[2], F[1]),  # f4 at seq 4 whose prev is f3, not m3
        (F[1], M[2]),
        (F[0], M[3]),  # m4's prev is m3, not f3
    ],
    ids=["same-seq", "same-seq-reversed", "same-seq-5", "prev-mismatch",
         "prev-mismatch-reversed", "prev-mismatch-other-branch"],
)
def test_valid_fork_proofs(a: Record, b: Record) -> None:
    ra, rb = verify_fork_proof(proof(a, b), Verifier())
    assert (ra, rb) == (a, b)
    assert verify_fork_proof(ForkProof.decode(proof(a, b).encode()), Verifier()) == (a, b)


def _tampered(r: Record) -> bytes:
    env = bytearray(r.envelope)
    env[-1] ^= 1
    return bytes(env)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (M[2].envelope, M[2].envelope),  # the same record twice
        (M[0].envelope, rec(seq=1, feed="other").envelope),  # different feeds
        (M[0].envelope, rec(B, seq=1).envelope),  # different origins
        (M[0].envelope, M[1].envelope),  # consistent pair
        (M[1].envelope, M[0].envelope),  # consistent pair, reversed
        (M[1].envelope, F[0].envelope),  # f3 extends m2: consistent
        (M[0].envelope, F[0].envelope),  # seq gap of 2: proves nothing
        (M[0].envelope, M[5].envelope),
        (M[2].envelope, _tampered(F[0])),  # bad signature
        (_tampered(M[2]), F[0].envelope),
        (M[2].body, F[0].envelope),  # not an envelope
        (b"", F[0].envelope),
    ],
    ids=["same-record", "different-feeds", "different-origins", "consistent",
         "consistent-reversed", "branch-extends", "seq-gap", "far-apart", "tampered-b",
         "tampered-a", "body-not-envelope", "empty"],
)
def test_invalid_fork_proofs(a: bytes, b: bytes) -> None:
    with pytest.raises(InvalidProof):
        verify_fork_proof(ForkProof(a, b), Verifier())


def _second_signature(key: SigningKey, message: bytes) -> bytes:
    """Another valid Ed25519 signature of ``message`` (a random nonce instead of the
    deterministic one): any holder of the secret key can make these."""
    h = bytearray(hashlib.sha512(key.seed).digest()[:32])
    h[0] &= 248
    h[31] &= 127
    h[31] |= 64
    a = nb.crypto_core_ed25519_scalar_reduce(bytes(h) + bytes(32))
    r = nb.crypto_core_ed25519_scalar_reduce(hashlib.sha512(b"another nonce").digest())
    big_r = nb.crypto_scalarmult_ed25519_base_noclamp(r)
    k = nb.crypto_core_ed25519_scalar_reduce(
        hashlib.sha512(big_r + key.public_key + message).digest()
    )
    return big_r + nb.crypto_core_ed25519_scalar_add(r, nb.crypto_core_ed25519_scalar_mul(k, a))


def test_same_body_with_another_valid_signature_is_the_same_record() -> None:
    """Ids hash the body only: a second signature of one body is the same record, a
    duplicate and no fork."""
    r = M[2]
    sig2 = _second_signature(A, DOMAIN_RECORD + r.body)
    assert sig2 != r.sig
    twin = open_record(r.body, sig2, r.payload, now_ms=T0, verifier=Verifier())
    assert twin.id == r.id
    assert classify(twin, FeedHead(3, r.id), r.id) == Decision(Verdict.DUPLICATE)
    with pytest.raises(InvalidProof):
        verify_fork_proof(ForkProof(r.envelope, twin.envelope), Verifier())


def test_unsigned_claims_are_not_proofs() -> None:
    """A record 'by A' signed by B is no evidence against A."""
    body = M[2].body.replace(b"\xa5chain", b"\xa5chaim")
    assert body != M[2].body
    forged = encode_record(body, B.sign(DOMAIN_RECORD, body), None)
    with pytest.raises(InvalidProof):
        verify_fork_proof(ForkProof(M[2].envelope, forged), Verifier())


def test_proof_skips_the_future_time_check_unless_asked() -> None:
    far = 2**64 - 1  # the largest time a body can carry
    x = rec(seq=1, feed="future", time_ms=far, n=1)
    y = rec(seq=1, feed="future", time_ms=far, n=2)
    p = ForkProof(x.envelope, y.envelope)
    assert verify_fork_proof(p, Verifier()) == (x, y)
    with pytest.raises(InvalidProof):
        verify_fork_proof(p, Verifier(), now_ms=T0)


def test_proof_records_are_fully_verified() -> None:
    v = Verifier()
    verify_fork_proof(proof(M[2], F[0]), v)
    assert v.count == 2
    # Records are checked against the policy too (e.g. payload types).
    body, sig, payload = decode_record(M[2].envelope)
    assert open_record(body, sig, payload, now_ms=T0, verifier=v) == M[2]
    # A proof's records may come without their payloads (the canonical form): the
    # signatures, ids and chain links are all a proof needs.
    a, b = verify_fork_proof(ForkProof(_tomb(M[2]), _tomb(F[0])), v)
    assert (a.id, b.id) == (M[2].id, F[0].id) and a.payload is None is b.payload


@pytest.mark.parametrize(
    "value",
    [
        {"kind": "fork", "a": b"x"},
        {"kind": "fork", "a": b"x", "b": b"y", "c": b"z"},
        {"kind": "split", "a": b"x", "b": b"y"},
        {"kind": "fork", "a": "x", "b": b"y"},
        {"kind": "fork", "a": b"x", "b": None},
        [b"x", b"y"],
        "fork",
    ],
    ids=repr,
)
def test_fork_proof_decode_rejects_wrong_shapes(value: Any) -> None:
    with pytest.raises(InvalidProof):
        ForkProof.decode(encoding.encode(value))


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\xc1",
        b"\x83\xa4kind\xa4fork\xa1a\xc4\x01x\xa1b\xc4\x01y",  # keys not sorted
        b"\x83\xa1a\xc5\x00\x01x\xa1b\xc4\x01y\xa4kind\xa4fork",  # non-shortest bin
        b"\x83\xa1a\xc4\x01x\xa1b\xc4\x01y\xa4kind\xa4fork\x00",  # trailing byte
        encoding.encode({"kind": "fork", "a": b"x" * 80_000, "b": b"y" * 80_000}),  # > 140 KiB
    ],
    ids=["empty", "reserved", "unsorted", "non-shortest", "trailing", "too-large"],
)
def test_fork_proof_decode_rejects_non_canonical_bytes(raw: bytes) -> None:
    with pytest.raises(InvalidProof):
        ForkProof.decode(raw)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ({"kind": "fork", "a": [b"x"], "b": b"y"}, "too_deep"),
        ({"kind": "fork", "a": b"x", "b": b"y", "c": 0}, "too_many_items"),
        ({"kind": "fork", "a": b"x" * 72_000, "b": b"y" * 72_000}, "too_large"),
    ],
    ids=["depth-2", "4-items", "over-140KiB"],
)
def test_fork_proof_decode_limits_are_140kib_depth_1_3_items(value: Any, reason: str) -> None:
    assert encoding.Limits(max_bytes=143_360, max_depth=1, max_items=3) == FORK_PROOF_LIMITS
    with pytest.raises(InvalidProof) as info:
        ForkProof.decode(encoding.encode(value))
    cause = info.value.__cause__
    assert isinstance(cause, InvalidRecord) and cause.reason == reason


def test_fork_proof_decode_accepts_two_maximal_envelopes() -> None:
    env = encoding.encode([b"\x00" * 65536, b"\x01" * 64])
    p = ForkProof(env, env)
    assert ForkProof.decode(p.encode()) == p


def test_canonical_fork_proof_is_one_proof_from_either_side() -> None:
    from citynode.core.chain import canonical_fork_proof

    key = SigningKey(b"\x03" * 32)

    def rec(seq: int, prev: bytes | None, v: int) -> Record:
        return sign_record(key, feed="f", seq=seq, prev=prev, time_ms=1, type="org.x.T",
                           data={"v": v})

    x, y = rec(1, None, 1), rec(1, None, 2)  # same seq
    p1, at1 = canonical_fork_proof(x, y)
    p2, at2 = canonical_fork_proof(y, x)
    assert p1 == p2 and at1 == at2 == 1 and p1.a < p1.b
    lo, hi = rec(1, None, 1), rec(2, b"\x07" * 32, 3)  # prev mismatch
    p3, at3 = canonical_fork_proof(hi, lo)
    assert p3 == canonical_fork_proof(lo, hi)[0] and at3 == 2
    # the records without their payloads: a proof carries nothing an erasure must reach
    assert (p3.a, p3.b) == (encode_record(lo.body, lo.sig, None),
                            encode_record(hi.body, hi.sig, None))
    for p in (p1, p3):
        verify_fork_proof(p, Verifier())
