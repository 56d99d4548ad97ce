"""Witness cosignatures of checkpoints (docs/PROTOCOL.md, "Key events and witnesses
(version 2 identity)").

Modelled on C2SP ``tlog-cosignature`` (v1, Ed25519): a cosignature is a witness's
statement that, as of its ``time``, the consistent tree head with the largest size it
has observed for a log has this root. C2SP signs ``"cosignature/v1\\n" "time <s>\\n"``
followed by the checkpoint note; citynode keeps the statement and its fields but uses
its own encoding (canonical msgpack, a domain prefix ending in NUL, times in ms) and
names the witness in the signed body (as C2SP's ML-DSA ``cosigned_message`` does), so one
key could never be read as two witnesses.

* :func:`cosign` is the witness's decision: refuse a checkpoint smaller than the last
  one it cosigned (``checkpoint_regress``), one of the same size with another root
  (``split_view``), or one a consistency proof does not link to the last one
  (``not_consistent``); otherwise sign. The caller fetches the proof.
* :func:`check_quorum` counts valid cosignatures of one checkpoint by distinct named
  witnesses; every cosignature it does not count carries a reason code.
* :func:`verify_witness_equivocation` checks that one witness key cosigned two roots at
  one size (an honest witness never does: :func:`cosign` refuses it).
* :func:`split_view` turns two cosigned checkpoints of one size with different roots into
  the origin-signed :class:`~citynode.core.checkpoints.SplitViewProof`, which anyone
  checks offline without trusting any witness.

Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from citynode.core import encoding
from citynode.core.checkpoints import (
    MAX_TREE_SIZE,
    Checkpoint,
    SplitViewProof,
    open_checkpoint,
    verify_consistency,
)
from citynode.core.keylog import KeyState
from citynode.core.keys import SigningKey, Verifier
from citynode.core.records import (
    DEFAULT_FUTURE_TOLERANCE_MS,
    check_feed_name,
    decode_envelope,
    encode_envelope,
)
from citynode.errors import EncodingError, InvalidProof, InvalidRecord

__all__ = [
    "COSIGNATURE_VERSION",
    "DOMAIN_COSIGNATURE",
    "MAX_COSIGNATURES",
    "Cosignature",
    "CosignedCheckpoint",
    "Quorum",
    "check_quorum",
    "cosign",
    "cosignature_fields",
    "open_cosignature",
    "select_cosignatures",
    "sign_cosignature",
    "split_view",
    "verify_witness_equivocation",
    "witness_keys",
]

#: Signature prefix of a cosignature body.
DOMAIN_COSIGNATURE = b"citynode/cosignature/v1\x00"
COSIGNATURE_VERSION = 1
MAX_COSIGNATURES = 64  # per cosigned checkpoint

_BODY_LIMITS = encoding.Limits(max_bytes=1024, max_depth=1, max_items=16)
_FIELDS = frozenset({"kind", "version", "origin", "feed", "size", "root", "time",
                     "witness", "key"})
_BUNDLE_LIMITS = encoding.Limits(max_bytes=(MAX_COSIGNATURES + 1) * 1200, max_depth=2,
                                 max_items=MAX_COSIGNATURES + 8)


def _fail(msg: str, reason: str = "bad_field") -> InvalidRecord:
    return InvalidRecord(msg, reason)


@dataclass(frozen=True, slots=True)
class Cosignature:
    """A cosignature whose fields and signature verified (:func:`open_cosignature`)."""

    witness: bytes  # the witness's identity (its key for a cn1 node, D for cn2)
    key: bytes  # the key that signed
    origin: bytes
    feed: str
    size: int
    root: bytes
    time: int
    body: bytes
    sig: bytes

    @property
    def envelope(self) -> bytes:
        return encode_envelope(self.body, self.sig)

    def covers(self, cp: Checkpoint) -> bool:
        """Whether this cosignature is about exactly ``cp``'s (origin, feed, size, root)."""
        return (self.origin, self.feed, self.size, self.root) == (cp.origin, cp.feed,
                                                                  cp.size, cp.root)


def _parse_body(body: bytes) -> dict[str, Any]:
    f = encoding.decode(body, _BODY_LIMITS)
    if type(f) is not dict:
        raise EncodingError("a cosignature body is a map", "bad_field")
    if f.get("kind") != "cosignature":
        raise _fail(f"body kind is {f.get('kind')!r}, not 'cosignature'", "bad_kind")
    version = f.get("version")
    if type(version) is not int or version != COSIGNATURE_VERSION:
        raise _fail(f"unknown cosignature version {version!r}", "unknown_version")
    keys = f.keys()
    if not keys >= _FIELDS:
        raise _fail(f"cosignature lacks field(s): {', '.join(sorted(_FIELDS - keys))}",
                    "missing_field")
    if not keys <= _FIELDS:
        raise _fail(f"cosignature has unknown field(s): {', '.join(sorted(keys - _FIELDS))}",
                    "unknown_field")
    for name in ("origin", "root", "witness", "key"):
        if type(f[name]) is not bytes or len(f[name]) != 32:
            raise _fail(f"cosignature {name} must be 32 bytes")
    check_feed_name(f["feed"])
    if type(f["size"]) is not int or not 0 <= f["size"] < MAX_TREE_SIZE:
        raise _fail("cosignature size must be an integer from 0 to 2**62 - 1")
    if type(f["time"]) is not int or f["time"] < 0:
        raise _fail("cosignature time must be a non-negative integer (ms since the epoch)")
    return f


def open_cosignature(envelope_bytes: bytes, *, verifier: Verifier,
                     now_ms: int | None = None,
                     future_tolerance_ms: int = DEFAULT_FUTURE_TOLERANCE_MS) -> Cosignature:
    """Verify a cosignature envelope on its own: layout, canonical body, fields, time
    (when ``now_ms`` is given: ``future_time``), then the signature by its ``key`` over
    ``DOMAIN_COSIGNATURE || body`` (``bad_cosignature``). Whether that key is a witness
    the caller trusts is :func:`check_quorum`'s question. Raises :class:`InvalidRecord`
    (or a subclass)."""
    if not isinstance(envelope_bytes, (bytes, bytearray, memoryview)):
        raise EncodingError("a cosignature envelope is bytes", "bad_envelope")
    body, sig = decode_envelope(bytes(envelope_bytes), _BODY_LIMITS)
    f = _parse_body(body)
    if now_ms is not None and f["time"] > now_ms + future_tolerance_ms:
        raise _fail("cosignature is dated in the future: check the witness's clock",
                    "future_time")
    try:
        verifier.verify(f["key"], DOMAIN_COSIGNATURE, body, sig)
    except InvalidRecord as exc:
        raise _fail("cosignature does not verify against its key",
                    "bad_cosignature") from exc
    return Cosignature(f["witness"], f["key"], f["origin"], f["feed"], f["size"], f["root"],
                       f["time"], body, sig)


def sign_cosignature(key: SigningKey, witness: bytes, cp: Checkpoint,
                     time_ms: int) -> Cosignature:
    """Sign a cosignature of ``cp`` as ``witness`` (no checks of the witness's history:
    see :func:`cosign`)."""
    body = encoding.encode({
        "kind": "cosignature", "version": COSIGNATURE_VERSION, "origin": cp.origin,
        "feed": cp.feed, "size": cp.size, "root": cp.root, "time": time_ms,
        "witness": witness, "key": key.public_key})
    _parse_body(body)
    return Cosignature(witness, key.public_key, cp.origin, cp.feed, cp.size, cp.root,
                       time_ms, body, key.sign(DOMAIN_COSIGNATURE, body))


def cosign(key: SigningKey, witness: bytes, cp: Checkpoint, time_ms: int, *,
           last: Checkpoint | None, proof: Sequence[bytes] = ()) -> Cosignature:
    """The witness's decision on a verified checkpoint ``cp``, given ``last``, the
    checkpoint of the same origin and feed it cosigned last (None: never), and
    ``proof``, the consistency proof from ``last.size`` to ``cp.size``.

    Raises :class:`InvalidRecord`: ``checkpoint_regress`` (smaller than ``last``),
    ``split_view`` (same size, another root: the caller keeps
    ``SplitViewProof(last.envelope, cp.envelope)``), ``not_consistent`` (the proof does
    not link them). Same size and root: a fresh cosignature of the same head."""
    if last is not None:
        if (last.origin, last.feed) != (cp.origin, cp.feed):
            raise ValueError("last must be a checkpoint of the same origin and feed")
        if cp.size < last.size:
            raise _fail(f"checkpoint size {cp.size} is below the size {last.size} already "
                        "cosigned", "checkpoint_regress")
        if cp.size == last.size and cp.root != last.root:
            raise _fail(f"a different root at the cosigned size {cp.size}: a split view",
                        "split_view")
        try:
            verify_consistency(last.size, cp.size, last.root, cp.root, proof)
        except (InvalidProof, ValueError) as exc:
            raise _fail("the checkpoint is not consistent with the last one cosigned",
                        "not_consistent") from exc
    return sign_cosignature(key, witness, cp, time_ms)


def witness_keys(identity: bytes, state: KeyState | None) -> frozenset[bytes]:
    """The keys a cosignature of the witness ``identity`` may be signed by, for
    :func:`check_quorum`: a cn1 witness's key (its identity; ``state`` None, no log);
    for a cn2 witness, only the key in force now in its verified log ``state`` (none if
    it is dead). A key the witness rotated away from or a recovery cut off counts for
    nothing, whatever ``time`` its cosignatures claim (a signer's time can be
    backdated): a witness that rotates cosigns its latest checkpoints again with the new
    key, so quorums hold across its rotations."""
    if state is None:
        return frozenset({identity})
    if state.dead:
        return frozenset()
    return frozenset({state.key})


def cosignature_fields(envelope: bytes) -> tuple[bytes, bytes] | None:
    """``(witness, key)`` a cosignature envelope names, decoded and its fields checked
    but its signature NOT verified (None if it does not decode): to sort or filter
    cosignatures before the costly check, or to re-read one verified when stored."""
    try:
        body, _sig = decode_envelope(bytes(envelope), _BODY_LIMITS)
        f = _parse_body(body)
    except InvalidRecord:
        return None
    return f["witness"], f["key"]


def select_cosignatures(envelopes: Sequence[bytes], prefer: Collection[bytes] = ()
                        ) -> tuple[bytes, ...]:
    """At most :data:`MAX_COSIGNATURES` of ``envelopes``, chosen deterministically:
    one per witness, those of the witnesses in ``prefer`` first, then by witness bytes
    (envelopes that do not decode go last, then are dropped first)."""
    best: dict[bytes, bytes] = {}
    bad: list[bytes] = []
    for env in envelopes:
        wk = cosignature_fields(env)
        if wk is None:
            bad.append(env)
        elif wk[0] not in best:
            best[wk[0]] = bytes(env)
    order = sorted(best, key=lambda w: (w not in prefer, w))
    return tuple([best[w] for w in order] + sorted(bad))[:MAX_COSIGNATURES]


@dataclass(frozen=True, slots=True)
class Quorum:
    """:func:`check_quorum`'s answer: ``witnesses`` counted (distinct, named, valid,
    about this checkpoint), ``rejected`` (index in the list given, reason code) for
    every cosignature not counted, and whether ``ok`` (at least ``k`` witnesses)."""

    k: int
    witnesses: frozenset[bytes]
    rejected: tuple[tuple[int, str], ...]

    @property
    def ok(self) -> bool:
        return len(self.witnesses) >= self.k

    def require(self) -> None:
        """Raise :class:`InvalidRecord` (``no_quorum``) unless ``ok``."""
        if not self.ok:
            raise _fail(f"{len(self.witnesses)} of the {self.k} witness cosignatures "
                        "required", "no_quorum")


def check_quorum(cp: Checkpoint, cosignatures: Sequence[bytes],
                 witnesses: Mapping[bytes, Collection[bytes]], k: int, *,
                 verifier: Verifier, now_ms: int | None = None) -> Quorum:
    """Count the cosignatures of ``cp`` by the named ``witnesses`` (identity -> the
    keys accepted for it: :func:`witness_keys`, for a cn1 witness its key, for a cn2 one
    only the key in force now in its key log). Each witness counts once, and one key
    counts for one witness only. First every cosignature is decoded (no signature
    checked) and those of witnesses not named, or of the checkpoint's own origin, set
    aside (``not_witness``); of the rest,
    the first :data:`MAX_COSIGNATURES` are verified (the others: ``too_many_items``), so
    strangers cannot crowd out the named witnesses. Reasons, in this order of
    precedence: the :func:`open_cosignature` ones (layout and field codes,
    ``future_time``, ``bad_cosignature``), ``not_witness`` (its witness is not named, or
    is the origin),
    ``too_many_items``, ``wrong_key`` (a named witness, but not a key accepted for it),
    ``wrong_checkpoint`` (about another origin, feed, size or root), ``duplicate`` (that
    witness, or that key for another witness, is already counted)."""
    if k < 1:
        raise ValueError("a quorum is at least 1")
    counted: set[bytes] = set()
    counted_keys: set[bytes] = set()
    rejected: list[tuple[int, str]] = []
    looked = 0
    for i, env in enumerate(cosignatures):
        try:  # decoding only (no signature): cheap, so done for every one
            named = _parse_body(decode_envelope(bytes(env), _BODY_LIMITS)[0])["witness"]
        except InvalidRecord as exc:
            rejected.append((i, exc.reason))
            continue
        if named not in witnesses or named == cp.origin:
            # An origin never witnesses its own checkpoint: it signed it already, and
            # its cosignature would stand for a second, independent observer (nodes
            # refuse it too, citynode/node/witness.py), even when an auditor names it.
            rejected.append((i, "not_witness"))
            continue
        if looked >= MAX_COSIGNATURES:
            rejected.append((i, "too_many_items"))
            continue
        looked += 1
        try:
            c = open_cosignature(env, verifier=verifier, now_ms=now_ms)
        except InvalidRecord as exc:
            rejected.append((i, exc.reason))
            continue
        if c.witness not in witnesses:
            rejected.append((i, "not_witness"))
        elif c.key not in witnesses[c.witness]:
            rejected.append((i, "wrong_key"))
        elif not c.covers(cp):
            rejected.append((i, "wrong_checkpoint"))
        elif c.witness in counted or c.key in counted_keys:
            rejected.append((i, "duplicate"))
        else:
            counted.add(c.witness)
            counted_keys.add(c.key)
    return Quorum(k, frozenset(counted), tuple(rejected))


@dataclass(frozen=True, slots=True)
class CosignedCheckpoint:
    """An origin's checkpoint envelope with the cosignature envelopes gathered for it
    (what witnesses exchange and bundles carry). Not verified until
    :meth:`open`/:func:`check_quorum`."""

    checkpoint: bytes
    cosignatures: tuple[bytes, ...]

    def encode(self) -> bytes:
        """Canonical msgpack ``{"checkpoint": bin, "cosignatures": [bin, ...]}``.
        Raises ValueError beyond :data:`MAX_COSIGNATURES` (what :meth:`decode` takes):
        choose them with :func:`select_cosignatures`."""
        if len(self.cosignatures) > MAX_COSIGNATURES:
            raise ValueError(f"at most {MAX_COSIGNATURES} cosignatures per checkpoint")
        return encoding.encode({"checkpoint": self.checkpoint,
                                "cosignatures": list(self.cosignatures)})

    @staticmethod
    def decode(data: bytes) -> CosignedCheckpoint:
        """Decode (not verify); at most :data:`MAX_COSIGNATURES` cosignatures. Raises
        :class:`EncodingError`."""
        v = encoding.decode(data, _BUNDLE_LIMITS)
        if (type(v) is not dict or set(v) != {"checkpoint", "cosignatures"}
                or type(v["checkpoint"]) is not bytes or type(v["cosignatures"]) is not list
                or len(v["cosignatures"]) > MAX_COSIGNATURES
                or any(type(c) is not bytes for c in v["cosignatures"])):
            raise EncodingError("a cosigned checkpoint is {checkpoint: bin, cosignatures: "
                                f"[bin] (at most {MAX_COSIGNATURES})}}", "bad_field")
        return CosignedCheckpoint(v["checkpoint"], tuple(v["cosignatures"]))

    def open(self, *, verifier: Verifier) -> Checkpoint:
        """The origin's checkpoint, verified (no time check). Raises InvalidRecord."""
        return open_checkpoint(self.checkpoint, verifier=verifier)


def split_view(a: CosignedCheckpoint, b: CosignedCheckpoint, *,
               verifier: Verifier) -> SplitViewProof | None:
    """The portable proof that the origin showed two histories, if ``a`` and ``b`` (as
    two witnesses hold them) are checkpoints of one origin, feed and size with different
    roots; None otherwise. The proof is the origin's two signed checkpoints in byte
    order (``checkpoints.verify_split_view`` checks it with no trust in any witness).
    Raises :class:`InvalidRecord` if either checkpoint does not verify."""
    ca, cb = a.open(verifier=verifier), b.open(verifier=verifier)
    if (ca.origin, ca.feed, ca.size) != (cb.origin, cb.feed, cb.size) or ca.root == cb.root:
        return None
    return SplitViewProof(ca.envelope, cb.envelope).canonical()


def verify_witness_equivocation(a: bytes, b: bytes, *, verifier: Verifier) -> bytes:
    """Check that cosignature envelopes ``a`` and ``b`` are signed by one key, for one
    witness, origin, feed and size, with different roots: that witness vouched for two
    histories (an honest one refuses the second, see :func:`cosign`). Return the key.
    Raises :class:`InvalidProof`."""
    try:
        ca = open_cosignature(a, verifier=verifier)
        cb = open_cosignature(b, verifier=verifier)
    except InvalidRecord as exc:
        raise InvalidProof(f"a cosignature of the witness proof is invalid: {exc}") from exc
    if (ca.key, ca.witness, ca.origin, ca.feed, ca.size) != (cb.key, cb.witness, cb.origin,
                                                             cb.feed, cb.size):
        raise InvalidProof("the cosignatures are not by one witness key for one checkpoint "
                           "position")
    if ca.root == cb.root:
        raise InvalidProof("the cosignatures agree on the root")
    return ca.key
