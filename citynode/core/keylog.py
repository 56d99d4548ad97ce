"""The key event log of one node identity (version 2 identity, docs/PROTOCOL.md "Key
events and witnesses (version 2 identity)").

Rules of this module (everything that decides which key may sign what lives here):

* An identity is ``D = SHA-256("citynode/identity/v1" 00 || inception body)``; its
  printable id is ``cn2`` + base32(D || 3-byte checksum), 59 characters.
* A log is a chain of signed events (seq 0, 1, ...; ``prev`` = id of the event before):
  **inception** (names the first signing key and commits to the next signing key and to
  the recovery key), **rotation** (reveals the pre-committed next key, signed by it) and
  **recovery** (signed by the pre-committed recovery key; names a new signing key, a new
  next-key commitment and a new recovery commitment).
* Rotations and recoveries state per feed the head (seq, record id) up to which the
  outgoing key may have signed. A feed they do not name keeps the head established
  before: the outgoing key signed nothing valid on it. So every retired key has a closed
  window per feed, ``established-before < seq <= its head``, and records outside it are
  invalid whatever time they claim: no rule here reads a record's time.
* :func:`verify_log` folds a log from the identity alone into a :class:`KeyState`;
  :func:`compare_logs` decides between a held log and a received one (a recovery beats
  rotations after its branch point; a shorter log is stale; two rotations at one seq or
  two uses of one recovery key are equivocation, kept as a portable proof).

Pure: no I/O, no clock (time is a parameter). Failures are :class:`InvalidRecord` (or
its subclasses) with a stable ``reason``; proofs that do not hold are
:class:`InvalidProof`.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from citynode.core import encoding
from citynode.core.keys import (
    _ID_WHITESPACE,
    SigningKey,
    Verifier,
    node_id,
    seal_secret_key,
    unseal_secret_key,
)
from citynode.core.records import (
    DEFAULT_FUTURE_TOLERANCE_MS,
    MAX_SEQ,
    check_feed_name,
    decode_envelope,
    encode_envelope,
)
from citynode.errors import EncodingError, InvalidNodeId, InvalidProof, InvalidRecord, KeyFileError

__all__ = [
    "DOMAIN_IDENTITY",
    "DOMAIN_KEY_COMMITMENT",
    "DOMAIN_KEY_EVENT",
    "IDENTITY_PREFIX",
    "KEY_EVENT_VERSION",
    "MAX_EVENT_BYTES",
    "MAX_HEAD_FEEDS",
    "MAX_LOG_BYTES",
    "MAX_LOG_EVENTS",
    "EquivocationProof",
    "Head",
    "KeyEvent",
    "KeyState",
    "KeyVerdict",
    "KeyWindow",
    "LogDecision",
    "apply_event",
    "commit_key",
    "compare_logs",
    "decode_log",
    "encode_log",
    "identity_id",
    "identity_of",
    "incept",
    "open_event",
    "origin_id",
    "parse_event_body",
    "parse_identity_id",
    "parse_recovery_phrase",
    "recover",
    "recover_committed",
    "recovery_phrase",
    "rotate",
    "seal_recovery",
    "unseal_recovery",
    "verified_events",
    "verify_equivocation",
    "verify_log",
]

#: Signature prefix of every key event body.
DOMAIN_KEY_EVENT = b"citynode/key-event/v1\x00"
#: Hash domain of an identity: D = SHA-256(DOMAIN_IDENTITY || inception body).
DOMAIN_IDENTITY = b"citynode/identity/v1\x00"
#: Hash domain of a key commitment: SHA-256(DOMAIN_KEY_COMMITMENT || public key).
DOMAIN_KEY_COMMITMENT = b"citynode/key-commitment/v1\x00"
#: Hash domain of the cn2 id checksum (no NUL, like the cn1 one).
_ID_CHECKSUM_DOMAIN = b"citynode/node-id/v2"
IDENTITY_PREFIX = "cn2"

KEY_EVENT_VERSION = 1
MAX_LOG_EVENTS = 1024
MAX_HEAD_FEEDS = 1000  # as many feeds as a node card may list
MAX_EVENT_BYTES = 128 * 1024  # 1000 heads of 64-character feeds fit
MAX_LOG_BYTES = 2 * 1024 * 1024

EventType = Literal["inception", "rotation", "recovery"]

_EVENT_LIMITS = encoding.Limits(max_bytes=MAX_EVENT_BYTES, max_depth=3,
                                max_items=16 + 3 * MAX_HEAD_FEEDS)
_LOG_LIMITS = encoding.Limits(max_bytes=MAX_LOG_BYTES, max_depth=1, max_items=MAX_LOG_EVENTS)

_COMMON = frozenset({"kind", "version", "type", "seq", "time", "key", "next"})
_FIELDS: dict[str, frozenset[str]] = {
    "inception": _COMMON | {"recovery"},
    "rotation": _COMMON | {"identity", "prev", "heads"},
    "recovery": _COMMON | {"identity", "prev", "heads", "recovery", "recovery_key"},
}

_sha256 = hashlib.sha256


def _fail(msg: str, reason: str = "bad_field") -> InvalidRecord:
    return InvalidRecord(msg, reason)


# ---------------------------------------------------------------------------------------
# Digests and ids


def commit_key(public_key: bytes) -> bytes:
    """The 32-byte commitment to a public key: ``SHA-256(DOMAIN_KEY_COMMITMENT || key)``."""
    return _sha256(DOMAIN_KEY_COMMITMENT + public_key).digest()


def identity_of(inception_body: bytes) -> bytes:
    """The 32-byte identity ``D`` an inception body founds."""
    return _sha256(DOMAIN_IDENTITY + inception_body).digest()


def _id_checksum(identity: bytes) -> bytes:
    return _sha256(_ID_CHECKSUM_DOMAIN + identity).digest()[:3]


def origin_id(origin: bytes, key: bytes | None) -> str:
    """The printable id of a record's or checkpoint's origin: a ``cn2`` id when the body
    names the key that signed it (``key``, e.g. ``Record.key``: body version 3, whose
    origin is an identity ``D``), else (None) the ``cn1`` id of the origin key."""
    return identity_id(origin) if key is not None else node_id(origin)


def identity_id(identity: bytes) -> str:
    """The printable ``cn2`` id of a 32-byte identity (59 characters)."""
    if type(identity) is not bytes or len(identity) != 32:
        raise InvalidNodeId("an identity is 32 bytes")
    raw = identity + _id_checksum(identity)
    return IDENTITY_PREFIX + base64.b32encode(raw).decode("ascii").lower()


def _parse_b32(text: object, prefix: str, size: int, what: str) -> bytes:
    """The raw bytes of ``prefix`` + base32 text, under the node-id rules of
    docs/PROTOCOL.md: ASCII only (checked before any case folding), surrounding ASCII
    whitespace ignored, upper-case letters accepted. Raises :class:`InvalidNodeId`."""
    if not isinstance(text, str):
        raise InvalidNodeId(f"{what} is a string")
    s = text.strip(_ID_WHITESPACE)
    if not s.isascii():  # before upper(): U+0131 and U+017F fold to I and S
        raise InvalidNodeId(f"{what} holds a non-ASCII character: copy it again as plain text")
    if not s.startswith(prefix):
        raise InvalidNodeId(f"{what} {s[:16]!r}... does not start with {prefix!r}")
    body = s[len(prefix):]
    if len(body) * 5 != size * 8:
        raise InvalidNodeId(f"{what} has {len(s)} characters, expected "
                            f"{len(prefix) + size * 8 // 5}: was it copied whole?")
    try:
        return base64.b32decode(body.upper(), casefold=False)
    except ValueError as exc:  # binascii.Error is a ValueError
        raise InvalidNodeId(f"{what} holds characters outside a-z and 2-7") from exc


def parse_identity_id(text: str) -> bytes:
    """The 32-byte identity a ``cn2`` id stands for. Same rules as ``cn1`` node ids
    (:func:`citynode.core.keys.parse_node_id`). Raises :class:`InvalidNodeId`."""
    raw = _parse_b32(text, IDENTITY_PREFIX, 35, "node id")
    identity, check = raw[:32], raw[32:]
    if _id_checksum(identity) != check:
        raise InvalidNodeId("node id checksum does not match: check it for a typo")
    return identity


# ---------------------------------------------------------------------------------------
# Events


class Head(NamedTuple):
    """A feed head: the last record (``seq``, 32-byte record ``id``) a key may have signed."""

    seq: int
    id: bytes


@dataclass(frozen=True, slots=True)
class KeyEvent:
    """A key event whose fields and signature verified (:func:`open_event`); whether it
    fits a log is :func:`apply_event`'s question."""

    type: EventType
    seq: int
    time: int
    key: bytes  # the signing key in force after this event
    next: bytes  # commitment to the next signing key
    identity: bytes | None  # None at inception (it is derived from it)
    prev: bytes | None
    recovery: bytes | None  # new recovery commitment (inception, recovery)
    recovery_key: bytes | None  # the revealed recovery key (recovery only)
    heads: Mapping[str, Head]
    body: bytes
    sig: bytes

    @property
    def id(self) -> bytes:
        """SHA-256 of the body (what the next event names as ``prev``)."""
        return _sha256(self.body).digest()

    @property
    def signer(self) -> bytes:
        """The key that signed: the recovery key for a recovery, else ``key``."""
        return self.recovery_key if self.recovery_key is not None else self.key

    @property
    def envelope(self) -> bytes:
        return encode_envelope(self.body, self.sig)


def _bytes32(f: dict[str, Any], name: str) -> bytes:
    v = f[name]
    if type(v) is not bytes or len(v) != 32:
        raise _fail(f"key event field {name!r} must be 32 bytes")
    return v


def _parse_heads(value: object) -> dict[str, Head]:
    if type(value) is not dict:
        raise _fail("key event heads must be a map feed -> [seq, record id]")
    if len(value) > MAX_HEAD_FEEDS:
        raise _fail(f"key event names more than {MAX_HEAD_FEEDS} feeds", "too_many_items")
    out: dict[str, Head] = {}
    for feed, head in value.items():
        check_feed_name(feed)
        if (type(head) is not list or len(head) != 2 or type(head[0]) is not int
                or not 1 <= head[0] <= MAX_SEQ or type(head[1]) is not bytes
                or len(head[1]) != 32):
            raise _fail(f"head of feed {feed!r} must be [seq >= 1, 32-byte record id]")
        out[feed] = Head(head[0], head[1])
    return out


def parse_event_body(body: bytes) -> dict[str, Any]:
    """Strictly decode a key event body and check its fields (no signature, no log).
    Raises :class:`EncodingError` or :class:`InvalidRecord` with a reason."""
    f = encoding.decode(body, _EVENT_LIMITS)
    if type(f) is not dict:
        raise EncodingError("a key event body is a map", "bad_field")
    if f.get("kind") != "key-event":
        raise _fail(f"body kind is {f.get('kind')!r}, not 'key-event'", "bad_kind")
    version = f.get("version")
    if type(version) is not int or version != KEY_EVENT_VERSION:
        raise _fail(f"unknown key event version {version!r}: this node reads version "
                    f"{KEY_EVENT_VERSION}; upgrade citynode if the origin is newer",
                    "unknown_version")
    etype = f.get("type")
    if type(etype) is not str or etype not in _FIELDS:
        raise _fail(f"key event type {etype!r} is not inception, rotation or recovery")
    want, keys = _FIELDS[etype], f.keys()
    if not keys >= want:
        raise _fail(f"{etype} lacks field(s): {', '.join(sorted(want - keys))}",
                    "missing_field")
    if not keys <= want:
        raise _fail(f"{etype} has unknown field(s): {', '.join(sorted(keys - want))}",
                    "unknown_field")
    seq = f["seq"]
    if type(seq) is not int or not 0 <= seq < MAX_LOG_EVENTS:
        raise _fail(f"key event seq must be an integer from 0 to {MAX_LOG_EVENTS - 1}")
    if (etype == "inception") != (seq == 0):
        raise _fail("an inception is seq 0 and only an inception is", "key_event_order")
    t = f["time"]
    if type(t) is not int or t < 0:
        raise _fail("key event time must be a non-negative integer (ms since the epoch)")
    for name in ("key", "next", "identity", "prev", "recovery", "recovery_key"):
        if name in f:
            _bytes32(f, name)
    if "heads" in f:
        f["heads"] = _parse_heads(f["heads"])
    return f


def open_event(envelope_bytes: bytes, *, verifier: Verifier) -> KeyEvent:
    """Verify one key event envelope on its own: layout, canonical body within
    :data:`MAX_EVENT_BYTES`, every field, and the signature by the event's signer (the
    named ``key`` for inception and rotation, ``recovery_key`` for recovery) over
    ``DOMAIN_KEY_EVENT || body``. Raises :class:`InvalidRecord` (or a subclass)."""
    return _signed(_unsigned(envelope_bytes), verifier)


def _unsigned(envelope_bytes: object) -> KeyEvent:
    """An event envelope opened up to (not including) its signature."""
    if not isinstance(envelope_bytes, (bytes, bytearray, memoryview)):
        raise EncodingError("a key event envelope is bytes", "bad_envelope")
    body, sig = decode_envelope(bytes(envelope_bytes), _EVENT_LIMITS)
    f = parse_event_body(body)
    return KeyEvent(f["type"], f["seq"], f["time"], f["key"], f["next"], f.get("identity"),
                    f.get("prev"), f.get("recovery"), f.get("recovery_key"),
                    f.get("heads", {}), body, sig)


def _signed(event: KeyEvent, verifier: Verifier) -> KeyEvent:
    verifier.verify(event.signer, DOMAIN_KEY_EVENT, event.body, event.sig)
    return event


# ---------------------------------------------------------------------------------------
# State


@dataclass(frozen=True, slots=True)
class KeyWindow:
    """One signing key of the history. It may sign, on feed ``f``, the seqs
    ``start[f].seq < seq <= end[f].seq`` (``end`` None: still in force, no upper bound);
    a feed missing from ``start``/``end`` counts as seq 0."""

    key: bytes
    since: int  # seq of the event that put it in force
    start: Mapping[str, Head]
    end: Mapping[str, Head] | None = None
    retired_by: Literal["rotation", "recovery", "equivocation"] | None = None


class KeyVerdict(NamedTuple):
    """:meth:`KeyState.key_verdict`'s answer. ``reason`` is ``"valid"``,
    ``"unknown_key"``, ``"before_key"``, ``"beyond_last_good"``, ``"wrong_head"`` or
    ``"identity_dead"``."""

    valid: bool
    reason: str


@dataclass(frozen=True, slots=True)
class KeyState:
    """The state of an identity after folding its log (:func:`verify_log`)."""

    identity: bytes
    seq: int  # of the last event
    head_id: bytes  # id of the last event
    time: int  # of the last event
    key: bytes  # the signing key in force (meaningless when dead)
    next: bytes  # commitment to the next signing key
    recovery: bytes  # commitment to the recovery key
    keys: tuple[KeyWindow, ...]  # in the order they came in force; the last is current
    established: Mapping[str, Head]  # heads fixed by the rotations and recoveries so far
    dead: bool = False  # the recovery key equivocated: nothing new is valid
    #: The recovery keys recoveries revealed: like signing keys, never used again.
    revealed: frozenset[bytes] = frozenset()
    _index: dict[bytes, KeyWindow] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._index.update({w.key: w for w in self.keys})

    @property
    def node_id(self) -> str:
        return identity_id(self.identity)

    def key_verdict(self, key: bytes, feed: str, seq: int,
                    record_id: bytes | None = None) -> KeyVerdict:
        """Whether a record of this identity at (``feed``, ``seq``) may be signed by
        ``key``. Time plays no part: a retired key's records beyond its heads are
        invalid whatever time they claim. ``record_id``, when given, is checked against
        the head at exactly the key's last seq (``wrong_head``)."""
        w = self._index.get(key)
        if w is None:
            return KeyVerdict(False, "unknown_key")
        start = w.start.get(feed, Head(0, b"")).seq
        if seq <= start:
            return KeyVerdict(False, "before_key")
        if w.end is None:
            return KeyVerdict(True, "valid")
        end = w.end.get(feed)
        if end is None or seq > end.seq:
            return KeyVerdict(False, "identity_dead" if self.dead else "beyond_last_good")
        if seq == end.seq and record_id is not None and record_id != end.id:
            return KeyVerdict(False, "wrong_head")
        return KeyVerdict(True, "valid")

    def settled(self, key: bytes, feed: str, seq: int) -> Head | None:
        """The head a key event named for ``key`` on ``feed`` when position ``seq`` lies
        in ``key``'s closed window there (``start < seq <= end``), else None (a key in
        force, a position outside the window, an unknown key).

        A key event that retires a key *settles* its window: the identity's history
        there is the chain that ends at the named head (the record with that id, and
        the records its ``prev`` links reach back to). At most one of two records at
        one seq, or two checkpoints of one size, can be on it, so a conflict the
        retired key signed inside its window (a thief's, before the recovery) is not a
        fork of the identity: fork and split-view proofs made of such statements do
        not hold (:func:`citynode.core.chain.verify_fork_proof`,
        :func:`citynode.core.checkpoints.verify_split_view`), and a node drops the
        records there that are off the named chain."""
        w = self._index.get(key)
        if w is None or w.end is None:
            return None
        end = w.end.get(feed)
        if end is None or not w.start.get(feed, Head(0, b"")).seq < seq <= end.seq:
            return None
        return end

    def killed(self) -> KeyState:
        """This state with the identity dead: the current key's window closes at the
        established heads (it keeps nothing it signed beyond them), no key is current."""
        cur = self.keys[-1]
        if cur.end is not None:
            return self
        closed = KeyWindow(cur.key, cur.since, cur.start, dict(self.established),
                           "equivocation")
        return KeyState(self.identity, self.seq, self.head_id, self.time, self.key,
                        self.next, self.recovery, (*self.keys[:-1], closed),
                        self.established, dead=True, revealed=self.revealed)


def _check_heads(state: KeyState, heads: Mapping[str, Head]) -> dict[str, Head]:
    """``established`` updated with ``heads``; a head may not go back (``heads_regress``)."""
    out = dict(state.established)
    for feed, head in heads.items():
        old = out.get(feed)
        if old is not None and (head.seq < old.seq or (head.seq == old.seq
                                                       and head.id != old.id)):
            raise _fail(f"head of feed {feed!r} at seq {head.seq} goes back on the head "
                        f"established at seq {old.seq}", "heads_regress")
        out[feed] = head
    if len(out) > MAX_HEAD_FEEDS:
        raise _fail(f"the log establishes heads on more than {MAX_HEAD_FEEDS} feeds",
                    "too_many_items")
    return out


def apply_event(state: KeyState, event: KeyEvent, *, now_ms: int | None = None,
                future_tolerance_ms: int = DEFAULT_FUTURE_TOLERANCE_MS) -> KeyState:
    """The state after ``event`` (already opened by :func:`open_event`), or
    :class:`InvalidRecord` saying why it does not extend ``state``; first failure wins:
    ``identity_dead``, ``key_event_order`` (not the next seq, or dated before the
    previous event), ``wrong_identity``, ``bad_prev``, ``future_time`` (when ``now_ms``
    is given), ``not_precommitted`` (rotation), ``bad_recovery`` (recovery),
    ``key_reused``, ``heads_regress``."""
    if state.dead:
        raise _fail("this identity is dead (its recovery key was used twice): it takes no "
                    "more key events", "identity_dead")
    if event.seq != state.seq + 1:
        raise _fail(f"key event seq {event.seq} does not follow seq {state.seq}",
                    "key_event_order")
    if event.time < state.time:
        raise _fail("key event is dated before the event it follows", "key_event_order")
    if event.identity != state.identity:
        raise _fail("key event belongs to another identity", "wrong_identity")
    if event.prev != state.head_id:
        raise _fail(f"key event {event.seq} does not name the id of event {state.seq} "
                    "as prev", "bad_prev")
    if now_ms is not None and event.time > now_ms + future_tolerance_ms:
        raise _fail("key event is dated in the future: check the origin's clock",
                    "future_time")
    if event.type == "inception":
        raise _fail("an inception is seq 0 and only an inception is", "key_event_order")
    if event.type == "rotation":
        if commit_key(event.key) != state.next:
            raise _fail("rotation to a key that was not pre-committed (a stolen current key "
                        "cannot rotate)", "not_precommitted")
        recovery = state.recovery
    else:
        assert event.recovery_key is not None and event.recovery is not None
        if commit_key(event.recovery_key) != state.recovery:
            raise _fail("recovery not signed by the recovery key committed to",
                        "bad_recovery")
        recovery = event.recovery
    if (event.key in state._index or event.key in state.revealed
            or event.key == event.recovery_key
            or (event.recovery_key is not None
                and (event.recovery_key in state._index
                     or event.recovery == commit_key(event.recovery_key)))):
        raise _fail("key event names a key already used by this identity (a signing key "
                    "or a revealed recovery key: each is used once)", "key_reused")
    established = _check_heads(state, event.heads)
    cur = state.keys[-1]
    retired = KeyWindow(cur.key, cur.since, cur.start, established,
                        "rotation" if event.type == "rotation" else "recovery")
    new = KeyWindow(event.key, event.seq, established)
    revealed = (state.revealed if event.recovery_key is None
                else state.revealed | {event.recovery_key})
    return KeyState(state.identity, event.seq, event.id, event.time, event.key, event.next,
                    recovery, (*state.keys[:-1], retired, new), established,
                    revealed=revealed)


def _inception_state(event: KeyEvent) -> KeyState:
    assert event.recovery is not None
    return KeyState(identity_of(event.body), 0, event.id, event.time, event.key, event.next,
                    event.recovery, (KeyWindow(event.key, 0, {}),), {})


# ---------------------------------------------------------------------------------------
# Logs


def encode_log(events: Sequence[KeyEvent] | Sequence[bytes]) -> bytes:
    """A log on the wire: canonical msgpack array of the event envelopes (bin), seq
    order."""
    return encoding.encode([e if isinstance(e, bytes) else e.envelope for e in events])


def decode_log(data: bytes) -> list[bytes]:
    """The event envelopes of a log's bytes (not verified). At most
    :data:`MAX_LOG_EVENTS` events and :data:`MAX_LOG_BYTES` bytes. Raises
    :class:`EncodingError`."""
    v = encoding.decode(data, _LOG_LIMITS)
    if type(v) is not list or not v or any(type(e) is not bytes for e in v):
        raise EncodingError("a key log is a non-empty array of event envelopes", "bad_field")
    return v


def _identity_arg(identity: bytes | str) -> bytes:
    return parse_identity_id(identity) if isinstance(identity, str) else identity


def _open_all(envelopes: Sequence[bytes], verifier: Verifier,
              identity: bytes | None = None) -> list[KeyEvent]:
    """Open every event, cheapest checks first, so that a hostile log costs no
    signature verification it can be refused without: its size and count, every body
    (fields, no signature), then, given the ``identity``, the structure of the chain
    (event 0 an inception hashing to it, each next event at the next seq, of this
    identity, naming the id of the one before), and only then every signature."""
    if not envelopes:
        raise _fail("a key log holds at least its inception", "key_event_order")
    if len(envelopes) > MAX_LOG_EVENTS:
        raise _fail(f"a key log holds at most {MAX_LOG_EVENTS} events", "too_many_items")
    if sum(len(e) for e in envelopes) > MAX_LOG_BYTES:
        raise _fail(f"a key log is at most {MAX_LOG_BYTES} bytes", "too_large")
    events = [_unsigned(e) for e in envelopes]
    if identity is not None:
        if events[0].type != "inception":
            raise _fail("a key log starts with its inception", "key_event_order")
        if identity_of(events[0].body) != identity:
            raise _fail("the inception does not hash to this node id", "wrong_identity")
        for before, e in itertools.pairwise(events):
            if e.seq != before.seq + 1:
                raise _fail(f"key event seq {e.seq} does not follow seq {before.seq}",
                            "key_event_order")
            if e.identity != identity:
                raise _fail("key event belongs to another identity", "wrong_identity")
            if e.prev != before.id:
                raise _fail(f"key event {e.seq} does not name the id of event "
                            f"{before.seq} as prev", "bad_prev")
    return [_signed(e, verifier) for e in events]


def _fold(identity: bytes, events: Sequence[KeyEvent], now_ms: int | None) -> KeyState:
    first = events[0]
    if first.type != "inception":
        raise _fail("a key log starts with its inception", "key_event_order")
    state = _inception_state(first)
    if state.identity != identity:
        raise _fail("the inception does not hash to this node id", "wrong_identity")
    if now_ms is not None and first.time > now_ms + DEFAULT_FUTURE_TOLERANCE_MS:
        raise _fail("key event is dated in the future: check the origin's clock",
                    "future_time")
    for e in events[1:]:
        state = apply_event(state, e, now_ms=now_ms)
    return state


def verify_log(identity: bytes | str, log: bytes | Sequence[bytes], *, verifier: Verifier,
               now_ms: int | None = None) -> KeyState:
    """Verify a whole key log from the identity alone (32 bytes, or its ``cn2`` id) and
    return the folded state. ``log`` is the wire bytes or the list of envelopes.
    Cheapest checks first (docs/PROTOCOL.md, "Folding a log"): size and count, every
    event's fields, the chain's structure from the id (``wrong_identity``,
    ``key_event_order``, ``bad_prev``), then every signature (``bad_signature``), then
    the fold (:func:`apply_event`). Raises
    :class:`InvalidRecord` (or a subclass) with the reason of the first failure, or
    :class:`InvalidNodeId` for a malformed id."""
    envelopes = decode_log(log) if isinstance(log, bytes) else log
    ident = _identity_arg(identity)
    return _fold(ident, _open_all(envelopes, verifier, ident), now_ms)


def verified_events(identity: bytes | str, log: bytes | Sequence[bytes], *,
                    verifier: Verifier,
                    now_ms: int | None = None) -> tuple[KeyState, list[KeyEvent]]:
    """As :func:`verify_log`, also returning the opened events (for
    :func:`compare_logs`)."""
    envelopes = decode_log(log) if isinstance(log, bytes) else log
    ident = _identity_arg(identity)
    events = _open_all(envelopes, verifier, ident)
    return _fold(ident, events, now_ms), events


# ---------------------------------------------------------------------------------------
# Forks of a log


@dataclass(frozen=True, slots=True)
class EquivocationProof:
    """Two different continuations of one log prefix, each valid, that cannot both be
    honest: two rotations at one seq (the pre-committed next key signed twice:
    ``kind = "key-fork"``), or two branches each ending with a recovery by the same
    recovery key (``kind = "recovery-equivocation"``: the offline key was used twice;
    the identity is dead). Checked from the identity alone by
    :func:`verify_equivocation`."""

    kind: Literal["key-fork", "recovery-equivocation"]
    prefix: tuple[bytes, ...]
    a: tuple[bytes, ...]
    b: tuple[bytes, ...]

    def canonical(self) -> EquivocationProof:
        """The same proof with its branches in byte order."""
        a, b = sorted((self.a, self.b))
        return EquivocationProof(self.kind, self.prefix, a, b)

    def encode(self) -> bytes:
        """Canonical msgpack ``{"a": [bin...], "b": [bin...], "kind": str,
        "prefix": [bin...]}``."""
        return encoding.encode({"kind": self.kind, "prefix": list(self.prefix),
                                "a": list(self.a), "b": list(self.b)})

    @staticmethod
    def decode(data: bytes) -> EquivocationProof:
        """Decode (not verify) a proof. Raises :class:`InvalidProof`."""
        try:
            v: Any = encoding.decode(data, encoding.Limits(
                max_bytes=MAX_LOG_BYTES, max_depth=2, max_items=MAX_LOG_EVENTS + 8))
        except InvalidRecord as exc:
            raise InvalidProof(f"key equivocation proof is not canonical msgpack: {exc}") \
                from exc
        if (type(v) is not dict or set(v) != {"kind", "prefix", "a", "b"}
                or v["kind"] not in ("key-fork", "recovery-equivocation")
                or any(type(v[k]) is not list or any(type(e) is not bytes for e in v[k])
                       for k in ("prefix", "a", "b"))):
            raise InvalidProof("key equivocation proof must be {kind, prefix, a, b} with "
                               "arrays of event envelopes")
        return EquivocationProof(v["kind"], tuple(v["prefix"]), tuple(v["a"]), tuple(v["b"]))


def verify_equivocation(identity: bytes | str, proof: EquivocationProof, *,
                        verifier: Verifier) -> KeyState:
    """Check ``proof`` against the identity alone and return the state it leaves:
    for a key fork, the state at the prefix (the owner must recover); for a recovery
    equivocation, that state :meth:`KeyState.killed`. Raises :class:`InvalidProof`."""
    try:
        ident = _identity_arg(identity)
        if not proof.a or not proof.b or not proof.prefix:
            raise InvalidProof("an equivocation proof has a prefix and two branches")
        if len(proof.prefix) + max(len(proof.a), len(proof.b)) > MAX_LOG_EVENTS:
            raise InvalidProof("the equivocation proof is longer than a log may be")
        base = _fold(ident, _open_all(proof.prefix, verifier), None)
        branches = []
        for envs in (proof.a, proof.b):
            s, evs = base, _open_all(envs, verifier)
            for e in evs:
                s = apply_event(s, e)
            branches.append(evs)
    except (InvalidRecord, InvalidNodeId) as exc:
        raise InvalidProof(f"the equivocation proof does not verify: {exc}") from exc
    a, b = branches
    if a[0].body == b[0].body:
        raise InvalidProof("the two branches do not diverge at their first event")
    if proof.kind == "key-fork":
        if len(a) == len(b) == 1 and a[0].type == b[0].type == "rotation":
            return base
        raise InvalidProof("a key fork is two different rotations at one seq")
    for br in (a, b):
        if br[-1].type != "recovery" or any(e.type == "recovery" for e in br[:-1]):
            raise InvalidProof("each branch of a recovery equivocation ends with its only "
                               "recovery")
    return base.killed()


@dataclass(frozen=True, slots=True)
class LogDecision:
    """What :func:`compare_logs` decided about a received log against the held one.

    ``outcome``: ``"same"`` / ``"extends"`` / ``"recovered"`` (take ``state``, the
    received log's), ``"stale"`` / ``"superseded"`` / ``"key-fork"`` (keep the held
    log; ``error`` says why), ``"dead"`` (the recovery key equivocated: ``state`` is
    the dead state, keep ``proof``). ``error`` is the :class:`InvalidRecord` to count
    the received log under; ``proof`` the evidence to keep and pass on."""

    outcome: Literal["same", "extends", "recovered", "stale", "superseded", "key-fork",
                     "dead"]
    state: KeyState
    error: InvalidRecord | None = None
    proof: EquivocationProof | None = None

    @property
    def accept(self) -> bool:
        """Whether the received log replaces the held one."""
        return self.outcome in ("extends", "recovered")


def compare_logs(held: Sequence[KeyEvent], received: Sequence[KeyEvent], *,
                 held_state: KeyState, received_state: KeyState) -> LogDecision:
    """Decide between two logs of one identity, both verified (:func:`verified_events`).

    * Equal: ``same``. The received one continues the held one: ``extends``.
    * The received one is a strict prefix of the held one (a replayed or truncated
      log): ``stale``, error ``stale_key_log``: a node never goes back to an older
      state, which is how a truncated log is refused.
    * They diverge at seq ``d``: the branch (from ``d`` on) holding a recovery wins
      (``recovered`` if it is the received one, ``superseded`` otherwise); both hold
      one: the recovery key in force at ``d`` signed twice, ``dead``
      (``recovery_equivocation``); neither does: two rotations at ``d``, ``key-fork``
      (``key_fork``), the first seen is kept until the owner recovers.
    """
    if held_state.identity != received_state.identity:
        raise ValueError("compare_logs compares two logs of one identity")
    n = min(len(held), len(received))
    d = next((i for i in range(n) if held[i].body != received[i].body), n)
    if d == n:
        if len(received) == len(held):
            return LogDecision("same", held_state)
        if len(received) > len(held):
            return LogDecision("extends", received_state)
        return LogDecision("stale", held_state, _fail(
            f"key log ends at seq {received_state.seq}, before the seq {held_state.seq} "
            "already held (a replayed or truncated log)", "stale_key_log"))
    h_rec = any(e.type == "recovery" for e in held[d:])
    r_rec = any(e.type == "recovery" for e in received[d:])
    prefix = tuple(e.envelope for e in held[:d])
    if h_rec and r_rec:
        hb = _through_first_recovery(held[d:])
        rb = _through_first_recovery(received[d:])
        proof = EquivocationProof("recovery-equivocation", prefix, hb, rb).canonical()
        base = _fold(held_state.identity, held[:d], None)
        return LogDecision("dead", base.killed(), _fail(
            f"two different recoveries branch off seq {d - 1} with one recovery key: the "
            "identity is dead", "recovery_equivocation"), proof)
    if r_rec:
        return LogDecision("recovered", received_state)
    if h_rec:
        return LogDecision("superseded", held_state, _fail(
            f"key log has rotations after seq {d - 1} that a recovery held here "
            "supersedes", "superseded_key_log"))
    proof = EquivocationProof("key-fork", prefix, (held[d].envelope,),
                              (received[d].envelope,)).canonical()
    return LogDecision("key-fork", held_state, _fail(
        f"two different rotations at key event seq {d}: the next key signed twice "
        "(recover with the recovery key)", "key_fork"), proof)


def _through_first_recovery(events: Sequence[KeyEvent]) -> tuple[bytes, ...]:
    i = next(i for i, e in enumerate(events) if e.type == "recovery")
    return tuple(e.envelope for e in events[: i + 1])


# ---------------------------------------------------------------------------------------
# Making events


def _heads_value(heads: Mapping[str, Head | tuple[int, bytes]]) -> dict[str, list[Any]]:
    return {f: [h[0], h[1]] for f, h in heads.items()}


def _sign(signer: SigningKey, fields: dict[str, Any]) -> KeyEvent:
    body = encoding.encode({"kind": "key-event", "version": KEY_EVENT_VERSION, **fields})
    env = encode_envelope(body, signer.sign(DOMAIN_KEY_EVENT, body))
    return open_event(env, verifier=Verifier())  # nothing others would refuse is made


def incept(key: SigningKey, next_key: bytes, recovery_key: bytes, time_ms: int) -> KeyEvent:
    """The inception of a new identity: signed by ``key`` (K0), committing to the public
    keys ``next_key`` (K1) and ``recovery_key`` (Q0). Its identity is
    ``identity_of(event.body)``."""
    return _sign(key, {"type": "inception", "seq": 0, "time": time_ms, "key": key.public_key,
                       "next": commit_key(next_key), "recovery": commit_key(recovery_key)})


def rotate(state: KeyState, new_key: SigningKey, next_key: bytes, time_ms: int,
           heads: Mapping[str, Head | tuple[int, bytes]]) -> KeyEvent:
    """A planned rotation after ``state``: ``new_key`` must be the pre-committed next key
    (it signs); ``next_key`` is the public key to commit to next; ``heads`` the heads
    the outgoing key signed up to, per feed (feeds left out: it signed nothing there
    beyond the established heads). Raises :class:`InvalidRecord` if ``state`` would
    refuse it."""
    ev = _sign(new_key, {"type": "rotation", "seq": state.seq + 1, "time": time_ms,
                         "identity": state.identity, "prev": state.head_id,
                         "key": new_key.public_key, "next": commit_key(next_key),
                         "heads": _heads_value(heads)})
    apply_event(state, ev)
    return ev


def recover(state: KeyState, recovery_key: SigningKey, new_key: bytes, next_key: bytes,
            next_recovery_key: bytes, time_ms: int,
            heads: Mapping[str, Head | tuple[int, bytes]]) -> KeyEvent:
    """A recovery after ``state`` (the state at the last good event: fold the log up to
    it), signed by ``recovery_key``; names the public keys ``new_key`` (signing),
    ``next_key`` (committed next) and ``next_recovery_key`` (committed recovery), and
    per feed the last good record. Feeds not named keep no record by the superseded
    key beyond the heads established before it. Raises :class:`InvalidRecord` if
    ``state`` would refuse it."""
    return recover_committed(state, recovery_key, new_key, commit_key(next_key),
                             next_recovery_key, time_ms, heads)


def recover_committed(state: KeyState, recovery_key: SigningKey, new_key: bytes,
                      next_commitment: bytes, next_recovery_key: bytes, time_ms: int,
                      heads: Mapping[str, Head | tuple[int, bytes]]) -> KeyEvent:
    """:func:`recover` given the commitment to the next key (:func:`commit_key` of it)
    instead of the key: how a recovery is signed away from the node, which made the
    new keys and shows only the new key and that commitment. Raises
    :class:`InvalidRecord` if ``state`` would refuse it."""
    if len(next_commitment) != 32:
        raise _fail("a next-key commitment is 32 bytes")
    ev = _sign(recovery_key, {
        "type": "recovery", "seq": state.seq + 1, "time": time_ms,
        "identity": state.identity, "prev": state.head_id, "key": new_key,
        "next": next_commitment, "recovery": commit_key(next_recovery_key),
        "recovery_key": recovery_key.public_key, "heads": _heads_value(heads)})
    apply_event(state, ev)
    return ev


# ---------------------------------------------------------------------------------------
# Recovery material (encoding only; the caller writes the file or prints the phrase)

_RECOVERY_HEADER = "citynode-recovery-v1"
_PHRASE_PREFIX = "crq1"
_PHRASE_DOMAIN = b"citynode/recovery-phrase/v1"


def seal_recovery(seed: bytes, identity: bytes, passphrase: str, **kdf: int) -> bytes:
    """The text of a recovery file: a first line ``citynode-recovery-v1 <cn2 id>`` (so
    the file says which identity it recovers), then the seed sealed as by
    :func:`citynode.core.keys.seal_secret_key`. A passphrase is required: this file
    is meant to live offline. ``kdf``: ``opslimit``/``memlimit`` for tests."""
    if not passphrase:
        raise KeyFileError("a recovery file is always sealed: give a passphrase")
    head = f"{_RECOVERY_HEADER} {identity_id(identity)}\n".encode()
    return head + seal_secret_key(seed, passphrase, **kdf)


def unseal_recovery(text: bytes, passphrase: str) -> tuple[bytes, bytes]:
    """``(identity, seed)`` of a recovery file. Raises :class:`KeyFileError`."""
    head, _, rest = text.partition(b"\n")
    parts = head.split()
    if len(parts) != 2 or parts[0] != _RECOVERY_HEADER.encode():
        raise KeyFileError("not a citynode recovery file")
    try:
        identity = parse_identity_id(parts[1].decode("ascii"))
    except (InvalidNodeId, UnicodeDecodeError) as exc:
        raise KeyFileError(f"recovery file names no valid identity: {exc}") from exc
    return identity, unseal_secret_key(rest, passphrase)


def recovery_phrase(seed: bytes) -> str:
    """A printable form of a recovery seed for paper: ``crq1-`` then 14 groups of four
    base32 letters (the seed and a 3-byte checksum), e.g. ``crq1-abcd-...``."""
    if len(seed) != 32:
        raise KeyFileError("a recovery seed is 32 bytes")
    check = _sha256(_PHRASE_DOMAIN + seed).digest()[:3]
    text = base64.b32encode(seed + check).decode("ascii").lower()
    return "-".join([_PHRASE_PREFIX, *(text[i:i + 4] for i in range(0, 56, 4))])


def parse_recovery_phrase(text: str) -> bytes:
    """The seed of a recovery phrase; dashes and ASCII whitespace between groups are
    ignored, ASCII only. Raises :class:`KeyFileError` (with what is wrong)."""
    if not isinstance(text, str) or not text.isascii():
        raise KeyFileError("a recovery phrase is plain ASCII text: type it again")
    # ASCII only (checked above), so lower() folds nothing but A-Z.
    flat = "".join(text.replace("-", " ").split()).lower()
    try:
        raw = _parse_b32(flat, _PHRASE_PREFIX, 35, "recovery phrase")
    except InvalidNodeId as exc:
        raise KeyFileError(str(exc)) from exc
    seed, check = raw[:32], raw[32:]
    if _sha256(_PHRASE_DOMAIN + seed).digest()[:3] != check:
        raise KeyFileError("recovery phrase checksum does not match: check it for a typo")
    return seed
