"""Witness cosignatures of checkpoints (citynode.core.cosign): the witness's decision,
quorum counting with a reason for every cosignature not counted, and split views."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from citynode.core import encoding
from citynode.core.checkpoints import Checkpoint, MerkleLog, sign_checkpoint, verify_split_view
from citynode.core.cosign import (
    DOMAIN_COSIGNATURE,
    MAX_COSIGNATURES,
    CosignedCheckpoint,
    check_quorum,
    cosign,
    open_cosignature,
    sign_cosignature,
    split_view,
    verify_witness_equivocation,
)
from citynode.core.keys import SigningKey, Verifier
from citynode.core.records import encode_envelope
from citynode.errors import InvalidProof, InvalidRecord

T0 = 1_735_689_600_000
ORIGIN = SigningKey(bytes([1]) * 32)
W = [SigningKey(bytes([0x70 + i]) * 32) for i in range(5)]  # witnesses
V = Verifier()
LEAVES = [hashlib.sha256(b"leaf %d" % i).digest() for i in range(20)]


def tree(n: int, leaves: list[bytes] = LEAVES) -> MerkleLog:
    return MerkleLog(leaves[:n])


def cp_of(n: int, leaves: list[bytes] = LEAVES, t: int = T0) -> Checkpoint:
    return sign_checkpoint(ORIGIN, "air", n, tree(n, leaves).root(), t)


def named(*ws: SigningKey) -> dict[bytes, frozenset[bytes]]:
    return {w.public_key: frozenset({w.public_key}) for w in ws}


def test_witness_cosigns_a_consistent_growth_and_refuses_the_rest() -> None:
    c7, c12 = cp_of(7), cp_of(12)
    first = cosign(W[0], W[0].public_key, c7, T0, last=None)
    assert first.covers(c7) and open_cosignature(first.envelope, verifier=V) == first
    proof = tree(12).consistency_proof(7)
    assert cosign(W[0], W[0].public_key, c12, T0 + 1, last=c7, proof=proof).covers(c12)
    assert cosign(W[0], W[0].public_key, c7, T0 + 1, last=c7).covers(c7)  # same head again
    with pytest.raises(InvalidRecord) as e:
        cosign(W[0], W[0].public_key, c7, T0, last=c12)
    assert e.value.reason == "checkpoint_regress"
    other7 = cp_of(7, [*LEAVES[:6], b"\x09" * 32])
    with pytest.raises(InvalidRecord) as e:
        cosign(W[0], W[0].public_key, other7, T0, last=c7)
    assert e.value.reason == "split_view"
    forked12 = cp_of(12, [*LEAVES[:3], b"\x08" * 32, *LEAVES[4:]])
    with pytest.raises(InvalidRecord) as e:
        cosign(W[0], W[0].public_key, forked12, T0, last=c7, proof=proof)
    assert e.value.reason == "not_consistent"


def test_quorum_counts_distinct_named_witnesses_and_says_why_for_the_rest() -> None:
    c = cp_of(7)
    good = [sign_cosignature(w, w.public_key, c, T0).envelope for w in W[:3]]
    flipped = bytearray(good[0])
    flipped[-1] ^= 1
    stranger = SigningKey(b"\x55" * 32)
    other_cp = cp_of(8)
    cosigs = [
        *good,
        good[1],  # the same witness twice
        bytes(flipped),
        sign_cosignature(stranger, stranger.public_key, c, T0).envelope,  # not named
        sign_cosignature(stranger, W[3].public_key, c, T0).envelope,  # a named id, wrong key
        sign_cosignature(W[3], W[3].public_key, other_cp, T0).envelope,  # another checkpoint
        sign_cosignature(W[4], W[4].public_key, c, T0 + 3_600_000).envelope,  # future
        b"\x92",
    ]
    q = check_quorum(c, cosigs, named(*W), 3, verifier=V, now_ms=T0)
    assert q.ok and q.witnesses == {w.public_key for w in W[:3]}
    assert q.rejected == ((3, "duplicate"), (4, "bad_cosignature"), (5, "not_witness"),
                          (6, "wrong_key"), (7, "wrong_checkpoint"), (8, "future_time"),
                          (9, "bad_envelope"))
    q4 = check_quorum(c, cosigs, named(*W), 4, verifier=V, now_ms=T0)
    assert not q4.ok
    with pytest.raises(InvalidRecord) as e:
        q4.require()
    assert e.value.reason == "no_quorum"
    q.require()
    many = [good[0]] * (MAX_COSIGNATURES + 2)
    qm = check_quorum(c, many, named(*W), 1, verifier=V)
    assert qm.rejected[-1] == (MAX_COSIGNATURES + 1, "too_many_items")


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=4), max_size=12),
       st.integers(min_value=1, max_value=5))
def test_quorum_is_the_number_of_distinct_witnesses(signers: list[int], k: int) -> None:
    c = cp_of(5)
    cosigs = [sign_cosignature(W[i], W[i].public_key, c, T0).envelope for i in signers]
    q = check_quorum(c, cosigs, named(*W[:3]), k, verifier=V)
    counted = {W[i].public_key for i in signers if i < 3}
    assert q.witnesses == counted and q.ok == (len(counted) >= k)
    assert len(q.rejected) == len(signers) - len(counted)


def test_cosignature_fields_are_checked() -> None:
    c = cp_of(3)
    cos = sign_cosignature(W[0], W[0].public_key, c, T0)
    fields = encoding.decode(cos.body)
    cases: list[tuple[dict[str, object], str]] = [
        ({"kind": "checkpoint"}, "bad_kind"), ({"version": 2}, "unknown_version"),
        ({"extra": 1}, "unknown_field"), ({"witness": b"\x00"}, "bad_field"),
        ({"size": -1}, "bad_field")]
    for change, code in cases:
        body = encoding.encode({**fields, **change})
        env = encode_envelope(body, W[0].sign(DOMAIN_COSIGNATURE, body))
        with pytest.raises(InvalidRecord) as e:
            open_cosignature(env, verifier=V)
        assert e.value.reason == code
    # A checkpoint signature is no cosignature: the domains differ.
    env = encode_envelope(cos.body, W[0].sign(b"citynode/checkpoint/v1\x00", cos.body))
    with pytest.raises(InvalidRecord) as e:
        open_cosignature(env, verifier=V)
    assert e.value.reason == "bad_cosignature"


def test_split_view_between_two_witnesses_gives_the_origins_proof() -> None:
    c7 = cp_of(7)
    other7 = cp_of(7, [*LEAVES[:6], b"\x09" * 32], t=T0 + 5)
    seen_by_0 = CosignedCheckpoint(c7.envelope, (cosign(W[0], W[0].public_key, c7, T0,
                                                        last=None).envelope,))
    seen_by_1 = CosignedCheckpoint(other7.envelope, (cosign(W[1], W[1].public_key, other7,
                                                            T0, last=None).envelope,))
    wire = CosignedCheckpoint.decode(seen_by_1.encode())
    assert wire == seen_by_1
    proof = split_view(seen_by_0, wire, verifier=V)
    assert proof is not None and proof == split_view(wire, seen_by_0, verifier=V)
    a, b = verify_split_view(proof, V)
    assert {a.root, b.root} == {c7.root, other7.root}
    assert split_view(seen_by_0, seen_by_0, verifier=V) is None
    assert split_view(seen_by_0, CosignedCheckpoint(cp_of(8).envelope, ()), verifier=V) is None
    # Neither witness alone can tell; a quorum of both over either root fails.
    w01 = named(W[0], W[1])
    assert not check_quorum(c7, [*seen_by_0.cosignatures, *seen_by_1.cosignatures], w01, 2,
                            verifier=V).ok


def test_cosigned_checkpoint_decoding_is_bounded() -> None:
    c = cp_of(2)
    too_many = {"checkpoint": c.envelope, "cosignatures": [b"x"] * (MAX_COSIGNATURES + 1)}
    for bad in (too_many, {"checkpoint": c.envelope}, [c.envelope]):
        with pytest.raises(InvalidRecord):
            CosignedCheckpoint.decode(encoding.encode(bad))


def test_a_witness_cosigning_two_roots_at_one_size_is_caught() -> None:
    c7, other7 = cp_of(7), cp_of(7, [*LEAVES[:6], b"\x09" * 32])
    a = sign_cosignature(W[0], W[0].public_key, c7, T0).envelope
    b = sign_cosignature(W[0], W[0].public_key, other7, T0).envelope
    assert verify_witness_equivocation(a, b, verifier=V) == W[0].public_key
    c = sign_cosignature(W[1], W[1].public_key, other7, T0).envelope
    d = sign_cosignature(W[0], W[0].public_key, cp_of(8), T0).envelope
    for x, y in ((a, a), (a, c), (a, d), (a, b"\x92")):
        with pytest.raises(InvalidProof):
            verify_witness_equivocation(x, y, verifier=V)
