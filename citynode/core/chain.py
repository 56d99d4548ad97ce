"""Feed chains: where an incoming record fits, and portable proofs of equivocation.

A feed is the chain of records of one (origin, feed) pair: seq 1, 2, 3 ..., each
record's ``prev`` naming the id of the one before. A node stores each chain
contiguously from seq 1; its **head** is the highest seq it holds with every seq below
it held too. Given the head and (when needed) the id held at the record's seq, an
incoming, already verified record:

* ``EXTENDS`` the chain: ``seq == head.seq + 1`` and ``prev == head.id`` (or seq 1 on
  an empty chain) -- store it;
* is a ``DUPLICATE``: we already hold this very id at that seq -- drop it quietly;
* is ``AHEAD``: ``seq > head.seq + 1`` -- hold it until the gap is fetched;
* is an ``EQUIVOCATION``: same seq as a held record with a different id, or the next
  seq with a ``prev`` that is not our head -- the origin signed two histories. The
  first copy seen stays; the two signed envelopes form a :class:`ForkProof`.

Time never orders records; seq does.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, NamedTuple

from citynode.core import encoding
from citynode.core.keys import Verifier
from citynode.core.records import (
    DEFAULT_POLICY,
    KeyStates,
    Record,
    RecordPolicy,
    decode_record,
    encode_record,
    open_record,
)
from citynode.errors import InvalidProof, InvalidRecord

__all__ = [
    "FORK_PROOF_LIMITS",
    "Decision",
    "FeedHead",
    "ForkProof",
    "Verdict",
    "canonical_fork_proof",
    "classify",
    "verify_fork_proof",
]


class Verdict(enum.Enum):
    EXTENDS = "extends"
    DUPLICATE = "duplicate"
    AHEAD = "ahead"
    EQUIVOCATION = "equivocation"


class FeedHead(NamedTuple):
    """The highest contiguous record held of one (origin, feed). (A NamedTuple: built
    for every record a node stores, and several times cheaper than a frozen dataclass.)"""

    seq: int
    id: bytes


@dataclass(frozen=True, slots=True)
class Decision:
    """Where a record fits. ``missing`` is the seq range ``(first, last)`` to fetch when
    ``verdict`` is AHEAD. ``conflicts_with_seq`` names the held seq whose envelope,
    together with the incoming one, proves an equivocation."""

    verdict: Verdict
    missing: tuple[int, int] | None = None
    conflicts_with_seq: int | None = None


_EXTENDS = Decision(Verdict.EXTENDS)
_DUPLICATE = Decision(Verdict.DUPLICATE)


def classify(record: Record, head: FeedHead | None, held_id_at_seq: bytes | None) -> Decision:
    """Decide where a verified ``record`` fits its chain.

    ``head`` is our contiguous head of the record's (origin, feed), or None if we hold
    none of it. ``held_id_at_seq`` is the id we hold at ``record.seq`` (needed only when
    ``record.seq <= head.seq``; pass None otherwise). Pure; never raises.
    """
    if head is None:
        if record.seq == 1:
            return _EXTENDS
        return Decision(Verdict.AHEAD, missing=(1, record.seq - 1))
    if record.seq == head.seq + 1:
        if record.prev == head.id:
            return _EXTENDS
        return Decision(Verdict.EQUIVOCATION, conflicts_with_seq=head.seq)
    if record.seq > head.seq + 1:
        return Decision(Verdict.AHEAD, missing=(head.seq + 1, record.seq - 1))
    if held_id_at_seq == record.id:
        return _DUPLICATE
    return Decision(Verdict.EQUIVOCATION, conflicts_with_seq=record.seq)


# A proof is a flat map of 3 entries (two bin envelopes and "fork"): exactly what it
# needs, so a hostile proof costs no more than reading 140 KiB (two envelopes at the
# default 64 KiB body limit are at most 131,241 bytes with their headers).
FORK_PROOF_LIMITS = encoding.Limits(max_bytes=140 * 1024, max_depth=1, max_items=3)


@dataclass(frozen=True, slots=True)
class ForkProof:
    """Two envelopes signed by one origin that cannot both belong to one chain.

    Either both are at the same seq of the same feed with different ids, or ``b`` is at
    ``a.seq + 1`` and its ``prev`` is not ``a``'s id. Anyone can check it offline with
    :func:`verify_fork_proof`; no trust in the node that produced it is needed.
    """

    # Verifiers accept either order; nodes store, list and send the one of
    # canonical_fork_proof.
    a: bytes
    b: bytes

    def encode(self) -> bytes:
        """Canonical msgpack map ``{"a": bin, "b": bin, "kind": "fork"}``."""
        return encoding.encode({"kind": "fork", "a": self.a, "b": self.b})

    @staticmethod
    def decode(data: bytes) -> ForkProof:
        """Decode a proof's bytes (not yet verified) within :data:`FORK_PROOF_LIMITS`.

        Raises :class:`InvalidProof`."""
        try:
            v: Any = encoding.decode(data, FORK_PROOF_LIMITS)
        except InvalidRecord as exc:
            raise InvalidProof(f"fork proof is not canonical msgpack: {exc}") from exc
        if (
            type(v) is not dict
            or set(v) != {"kind", "a", "b"}
            or v["kind"] != "fork"
            or type(v["a"]) is not bytes
            or type(v["b"]) is not bytes
        ):
            raise InvalidProof("fork proof must be a map {kind: 'fork', a: bin, b: bin}")
        return ForkProof(v["a"], v["b"])


def verify_fork_proof(
    proof: ForkProof,
    verifier: Verifier,
    *,
    now_ms: int | None = None,
    policy: RecordPolicy = DEFAULT_POLICY,
    key_states: KeyStates | None = None,
) -> tuple[Record, Record]:
    """Check that ``proof`` proves its origin equivocated; return the two records.
    Records of a ``cn2`` origin are checked against its log (``key_states``).

    Both envelopes must verify (signature, canonical body); ``now_ms=None`` skips the
    future-time check, since a proof stays true whenever it is read. Raises
    :class:`InvalidProof` saying why the proof does not hold.
    """
    if now_ms is None:
        now_ms = 2**64  # above any msgpack integer: no record is "in the future" of it
    recs = []
    for name, env in (("a", proof.a), ("b", proof.b)):
        try:
            body, sig, payload = decode_record(env)
            recs.append(open_record(body, sig, payload, now_ms=now_ms, verifier=verifier,
                                    policy=policy, key_states=key_states))
        except InvalidRecord as exc:
            raise InvalidProof(f"record {name} of the fork proof is invalid: {exc}") from exc
    a, b = recs
    if a.origin != b.origin or a.feed != b.feed:
        raise InvalidProof("the two records are not of the same origin and feed")
    if a.id == b.id:
        raise InvalidProof("the two records are the same record")
    state = key_states(a.origin) if key_states is not None else None
    if (state is not None and a.key is not None and b.key is not None
            and state.settled(a.key, a.feed, a.seq) is not None
            and state.settled(b.key, b.feed, b.seq) is not None):
        # A key event that retired the signing key(s) named the feed's head: the chain
        # ending there is the history, and at most one of the two records is on it.
        raise InvalidProof("both records lie where a key event of their origin settled the "
                           "feed's history (a retired key's window): at most one is on the "
                           "chain it names, so they prove no fork of the identity",
                           "settled_by_key_event")
    if a.seq == b.seq:
        return a, b
    lo, hi = (a, b) if a.seq < b.seq else (b, a)
    if hi.seq == lo.seq + 1 and hi.prev != lo.id:
        return a, b
    raise InvalidProof("the two records can belong to one chain: no equivocation")


def canonical_fork_proof(a: Record, b: Record) -> tuple[ForkProof, int]:
    """The one proof citynode keeps of the fork two verified records prove (as
    :func:`verify_fork_proof` returns them), and the seq it is listed at. Same seq: the
    envelopes in byte order, at that seq; prev mismatch: the lower seq first, listed at
    the higher (the record whose prev breaks the chain). So nodes that found one fork
    from either side hold, and exchange, one proof."""
    # Without their payloads: a proof needs only bodies and signatures, stays small, and
    # carries nothing an erasure would have to reach (a proof is kept forever).
    ea, eb = encode_record(a.body, a.sig, None), encode_record(b.body, b.sig, None)
    if a.seq == b.seq:
        x, y = sorted((ea, eb))
        return ForkProof(x, y), a.seq
    return (ForkProof(ea, eb), b.seq) if a.seq < b.seq else (ForkProof(eb, ea), a.seq)
