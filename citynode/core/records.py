"""Signed records: the body, the envelope, the record id, and verification.

A record body (format version 2) is a canonical msgpack map (docs/PROTOCOL.md, "Record
body")::

    data_digest  bin(32)   SHA-256 of the payload bytes (canonical msgpack of the map
                           ``{"data": <map>, "salt": <bin(16)>}`` plus ``subject`` and
                           ``dataschema`` when given: the salt is random, so the digest
                           says nothing of them once the payload is gone)
    feed         str       feed name, ``[a-z0-9][a-z0-9._-]{0,63}``
    origin       bin(32)   the signing node's Ed25519 public key
    prev         bin(32)   id of the record at ``seq - 1``; absent when ``seq == 1``
    seq          int       1, 2, 3 ... per (origin, feed)
    time         int       milliseconds since the Unix epoch, UTC
    type         str       payload type (core/types.py)
    version      int       body format version: 2 (a ``cn1`` origin: ``origin`` is the
                           signing key) or 3 (a ``cn2`` origin, below)
    key          bin(32)   version 3 only: the signing key; ``origin`` is then the
                           identity ``D`` (core/keylog.py), and the record is valid only
                           if the origin's key log lets ``key`` sign (feed, seq)

A record of a restricted feed carries ``sealed_digest`` (the SHA-256 of the canonical
``sealed`` map, core/sealed.py) INSTEAD of ``type`` and ``data_digest``. Such a
:class:`Record` has ``type == SEALED_TYPE``, empty ``data`` and the sealed map in
``sealed`` (when its payload is held).

The signed body holds only a digest of the payload: the payload (``data``, ``subject``,
``dataschema`` and the salt) travels beside it, so it can be dropped (erasure,
retention) while the signature, id, chain link and checkpoint inclusion still verify;
what survives is origin, feed, seq, prev, time, type and the digest.
The envelope is the canonical msgpack array
``[body: bin, signature: bin(64), payload: bin | nil]`` (nil: a tombstone). The
signature is Ed25519 over ``DOMAIN_RECORD || body`` -- the body bytes exactly as sent,
never a re-encoding. The record id is ``SHA-256(body)``, so neither a signature nor the
presence of the payload can change an id.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import nacl.utils

from citynode.core import encoding
from citynode.core.keys import DOMAIN_RECORD, NodeKey, SigningKey, Verifier
from citynode.core.sealed import check_sealed_shape
from citynode.core.types import ERASURE_FEED, ERASURE_TYPE, validate_payload
from citynode.errors import EncodingError, InvalidRecord

__all__ = [
    "DEFAULT_FUTURE_TOLERANCE_MS",
    "FEED_NAME_RULE",
    "FORMAT_VERSION",
    "IDENTITY_FORMAT_VERSION",
    "MAX_PAYLOAD_BYTES",
    "SALT_BYTES",
    "SEALED_TYPE",
    "KeyStates",
    "Record",
    "RecordPolicy",
    "check_feed_name",
    "check_payload",
    "decode_envelope",
    "decode_record",
    "encode_envelope",
    "encode_record",
    "is_tombstone",
    "make_body",
    "make_payload",
    "open_record",
    "open_records",
    "payload_digest",
    "record_from_fields",
    "record_id",
    "sealed_of",
    "sign_record",
    "stored_record",
    "tombstone_of",
    "with_payload",
]

FORMAT_VERSION = 2
#: Body version of a record of a version 2 identity (``cn2``): it carries ``key``.
IDENTITY_FORMAT_VERSION = 3
DEFAULT_FUTURE_TOLERANCE_MS = 15 * 60 * 1000
#: The largest payload (the canonical bytes of ``data`` or ``sealed``) a node accepts:
#: the size limit of a body before the payload moved out of it.
MAX_PAYLOAD_BYTES = encoding.DEFAULT_LIMITS.max_bytes
MAX_SEQ = 2**63 - 1
#: Length of the random salt in a plain record's payload map.
SALT_BYTES = 16
_PAYLOAD_REQUIRED = frozenset({"data", "salt"})
_PAYLOAD_ALLOWED = _PAYLOAD_REQUIRED | {"dataschema", "subject"}
_FEED_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
#: What a valid feed name is, in words (for error messages).
FEED_NAME_RULE = "1-64 of a-z 0-9 . _ - (starting with a letter or digit)"
_GOOD_FEEDS: set[str] = set()
_REQUIRED = frozenset({"data_digest", "feed", "origin", "seq", "time", "type", "version"})
_OPTIONAL = frozenset({"prev"})
_ALLOWED = _REQUIRED | _OPTIONAL
_SEALED_REQUIRED = frozenset({"feed", "origin", "sealed_digest", "seq", "time", "version"})
_SEALED_ALLOWED = _SEALED_REQUIRED | {"prev"}
_KEY = frozenset({"key"})  # required in a body of version 3, refused in version 2
#: ``Record.type`` of a sealed record: relays cannot know the real type. Not a valid
#: payload type name (built-ins are CamelCase, custom ones dotted), so it cannot clash.
SEALED_TYPE = "sealed"


class _Verdict(Protocol):
    @property
    def valid(self) -> bool: ...
    @property
    def reason(self) -> str: ...


class _KeyState(Protocol):
    def key_verdict(self, key: bytes, feed: str, seq: int,
                    record_id: bytes | None = None) -> _Verdict: ...

    def settled(self, key: bytes, feed: str, seq: int) -> object | None: ...


#: Looks up the held key state of an origin identity (``None``: no log held). A
#: ``keylog.KeyState`` fits; typed structurally because core/keylog.py imports this
#: module.
KeyStates = Callable[[bytes], "_KeyState | None"]


@dataclass(frozen=True, slots=True)
class RecordPolicy:
    """What a verifier accepts. ``now_ms`` is not here: time is passed per call.
    ``body_limits`` bound the body and the payload alike (each is decoded on its own)."""

    body_limits: encoding.Limits = encoding.DEFAULT_LIMITS
    future_tolerance_ms: int = DEFAULT_FUTURE_TOLERANCE_MS
    check_payload: bool = True


DEFAULT_POLICY = RecordPolicy()


class Record(NamedTuple):
    """A verified record. Only :func:`open_record` and :func:`sign_record` make them.

    ``payload`` is the payload bytes as they travel (canonical msgpack of the salted
    map ``{"data", "salt"}``, or of ``sealed``), or None for a tombstone: a record
    whose payload was erased or pruned (its ``data`` is then empty and ``sealed`` None;
    its body, signature and id are whole). ``digest`` is the payload digest the body carries.

    A NamedTuple rather than a frozen dataclass: just as immutable, and several times
    cheaper to build, which matters on the per-record verification path.
    """

    id: bytes
    body: bytes
    sig: bytes
    origin: bytes
    feed: str
    seq: int
    prev: bytes | None
    time: int
    type: str
    data: Any
    subject: str | None = None
    dataschema: str | None = None
    sealed: dict[str, Any] | None = None
    payload: bytes | None = None
    digest: bytes = b""
    key: bytes | None = None  # the signing key of a body of version 3; None: ``origin``

    @property
    def signer(self) -> bytes:
        """The key that signed: ``key`` for a version 3 body, else ``origin``."""
        return self.origin if self.key is None else self.key

    @property
    def envelope(self) -> bytes:
        """The canonical envelope bytes ``[body, sig, payload | nil]``."""
        return encode_record(self.body, self.sig, self.payload)

    @property
    def is_tombstone(self) -> bool:
        """True if the payload is not held (erased or pruned)."""
        return self.payload is None

    def fields(self) -> dict[str, Any]:
        """The decoded body as a dict (a fresh copy): what was signed (the payload's
        digest, never the payload itself)."""
        out: dict[str, Any] = encoding.decode(self.body)
        return out


def record_id(body: bytes) -> bytes:
    """The record id: SHA-256 of the body bytes."""
    return hashlib.sha256(body).digest()


def payload_digest(payload: bytes) -> bytes:
    """The payload digest a body carries: plain SHA-256 of the payload bytes (no domain
    prefix, so ``openssl dgst -sha256`` checks it; docs/PROTOCOL.md says why)."""
    return hashlib.sha256(payload).digest()


def check_feed_name(feed: str) -> str:
    """Return ``feed`` if it is a valid feed name, else raise :class:`InvalidRecord`."""
    if type(feed) is str and feed in _GOOD_FEEDS:
        return feed
    if not isinstance(feed, str) or not _FEED_RE.fullmatch(feed):
        raise InvalidRecord(f"feed name {feed!r} is invalid: use {FEED_NAME_RULE}",
                            "bad_field")
    if len(_GOOD_FEEDS) < 4096:  # a node sees few feed names: skip the regex next time
        _GOOD_FEEDS.add(feed)
    return feed


def _bin_header(n: int) -> bytes:
    if n < 0x100:
        return b"\xc4" + bytes((n,))
    if n < 0x10000:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")


def encode_envelope(body: bytes, sig: bytes) -> bytes:
    """The two-element signed envelope ``[body, sig]`` of cards and checkpoints (records
    use :func:`encode_record`)."""
    return b"\x92" + _bin_header(len(body)) + body + b"\xc4\x40" + sig


def encode_record(body: bytes, sig: bytes, payload: bytes | None) -> bytes:
    """The canonical record envelope: msgpack array ``[body, sig, payload | nil]`` (built
    directly: it is made for every record pushed or served)."""
    tail = b"\xc0" if payload is None else _bin_header(len(payload)) + payload
    return b"\x93" + _bin_header(len(body)) + body + b"\xc4\x40" + sig + tail


def is_tombstone(envelope: bytes) -> bool:
    """Whether a canonical record envelope (read from our own storage, or decoded
    already) carries no payload: its last element is nil. Reads the body's bin header
    only. The last byte alone cannot tell: a payload may end in ``c0`` too (its random
    salt does, one record in 256), and a tombstone is exactly ``c0`` right after the
    signature."""
    h = envelope[1]
    if h == 0xC4:
        end = 3 + envelope[2]
    elif h == 0xC5:
        end = 4 + int.from_bytes(envelope[2:4], "big")
    else:
        end = 6 + int.from_bytes(envelope[2:6], "big")
    return len(envelope) == end + 67


def tombstone_of(envelope: bytes) -> bytes:
    """The same record envelope with its payload removed (nil). ``envelope`` must be a
    canonical record envelope (read from our own storage, or already decoded)."""
    body, sig, _payload = decode_record(envelope)
    return encode_record(body, sig, None)


def with_payload(tombstone: bytes, payload: bytes | None) -> bytes:
    """A record envelope from its tombstone (payload nil, as storage keeps it) and its
    payload bytes (None: the tombstone itself)."""
    if payload is None:
        return tombstone
    return tombstone[:-1] + _bin_header(len(payload)) + payload


def stored_record(envelope: bytes) -> Record:
    """A Record from an envelope this node verified before storing it (its database, its
    own answers): decoded again, strictly, but neither the payload against its type nor
    the signature is checked again. Raises :class:`InvalidRecord` if it does not
    decode."""
    body, sig, payload = decode_record(envelope)
    f = parse_body(body)
    value = None if payload is None else encoding.decode(payload)
    return record_from_fields(record_id(body), body, sig, f, payload, value)


def sealed_of(envelope: bytes) -> dict[str, Any] | None:
    """The ``sealed`` map of a stored record envelope: None for a plain record, an empty
    map for a sealed record whose payload is gone (a tombstone: sealed to nobody now).
    Raises :class:`InvalidRecord` if it does not decode."""
    body, _sig, payload = decode_record(envelope)
    if "sealed_digest" not in parse_body(body):
        return None
    if payload is None:
        return {}
    value = encoding.decode(payload)
    return value if type(value) is dict else {}


def _bin_at(data: bytes, i: int, what: str, limit: int) -> tuple[int, int]:
    """``(start, length)`` of the shortest-form bin at ``data[i]``."""
    tag = data[i] if i < len(data) else -1
    if tag == 0xC4 and i + 2 <= len(data):
        n, start = data[i + 1], i + 2
    elif tag == 0xC5 and i + 3 <= len(data):
        n, start = int.from_bytes(data[i + 1:i + 3], "big"), i + 3
        if n < 0x100:
            raise EncodingError(f"envelope {what} length is not in its shortest form")
    elif tag == 0xC6 and i + 5 <= len(data):
        n, start = int.from_bytes(data[i + 1:i + 5], "big"), i + 5
        if n < 0x10000:
            raise EncodingError(f"envelope {what} length is not in its shortest form")
    else:
        raise EncodingError(f"envelope {what} must be msgpack bin", "bad_envelope")
    if n > limit:
        raise EncodingError(f"{what} of {n} bytes is over the limit of {limit}", "too_large")
    return start, n


def decode_envelope(
    data: bytes, limits: encoding.Limits = encoding.DEFAULT_LIMITS
) -> tuple[bytes, bytes]:
    """Split a two-element signed envelope (a card's, a checkpoint's) into
    ``(body, sig)``.

    The envelope is exactly: ``0x92``, the body as bin with the shortest header
    (``c4 LL`` / ``c5 LLLL`` / ``c6 LLLLLLLL``), then ``c4 40`` and the 64-byte signature.
    Raises :class:`EncodingError` for anything else or a body over ``limits.max_bytes``.
    """
    n = len(data)
    if n < 70 or data[0] != 0x92:
        raise EncodingError("an envelope is a msgpack array [body, signature]", "bad_envelope")
    start, blen = _bin_at(data, 1, "body", limits.max_bytes)
    end = start + blen
    if n != end + 66 or data[end] != 0xC4 or data[end + 1] != 64:
        raise EncodingError(
            "envelope must end with the 64-byte signature as bin, and nothing after it",
            "bad_envelope",
        )
    return data[start:end], data[end + 2 :]


def decode_record(
    data: bytes, limits: encoding.Limits = encoding.DEFAULT_LIMITS
) -> tuple[bytes, bytes, bytes | None]:
    """Split canonical record envelope bytes into ``(body, sig, payload or None)``.

    The envelope is exactly: ``0x93``; the body as bin with the shortest header
    (``c4 LL`` / ``c5 LLLL`` / ``c6 LLLLLLLL``); ``c4 40`` and the 64-byte signature;
    then the payload as bin (shortest header) or ``c0`` (nil: a tombstone), and nothing
    after it. Raises :class:`EncodingError` for anything else, or a body or payload over
    ``limits.max_bytes`` (decided from its header alone).
    """
    n = len(data)
    if n < 70 or data[0] != 0x93:
        raise EncodingError("a record envelope is a msgpack array [body, signature, payload]",
                            "bad_envelope")
    start, blen = _bin_at(data, 1, "body", limits.max_bytes)
    end = start + blen
    if n < end + 67 or data[end] != 0xC4 or data[end + 1] != 64:
        raise EncodingError("the body must be followed by the 64-byte signature as bin, "
                            "then the payload", "bad_envelope")
    sig = data[end + 2:end + 66]
    p = end + 66
    if data[p] == 0xC0:
        if n != p + 1:
            raise EncodingError("nothing may follow the envelope's payload", "bad_envelope")
        return data[start:end], sig, None
    pstart, plen = _bin_at(data, p, "payload", limits.max_bytes)
    if n != pstart + plen:
        raise EncodingError("the envelope's payload length does not match (nothing may "
                            "follow it)", "bad_envelope")
    return data[start:end], sig, data[pstart:]


def split_envelope(env: Any) -> tuple[bytes, bytes]:
    """Check an already-decoded two-element signed envelope value and return
    ``(body, sig)``."""
    if type(env) is not list or len(env) != 2:
        raise EncodingError("an envelope is an array [body, signature]", "bad_envelope")
    body, sig = env
    if type(body) is not bytes or type(sig) is not bytes:
        raise EncodingError("envelope body and signature must be bin", "bad_envelope")
    if len(sig) != 64:
        raise EncodingError(f"signature is {len(sig)} bytes, not 64", "bad_envelope")
    return body, sig


def _fail(msg: str, reason: str = "bad_field") -> InvalidRecord:
    return InvalidRecord(msg, reason)


def parse_body(body: bytes, policy: RecordPolicy = DEFAULT_POLICY) -> dict[str, Any]:
    """Strictly decode a body and check its fields' presence and types (no signature,
    no time, no payload checks). Raises :class:`InvalidRecord`."""
    fields = encoding.decode(body, policy.body_limits)
    if type(fields) is not dict:
        raise EncodingError("a record body is a map", "bad_field")
    version = fields.get("version")
    if version not in (FORMAT_VERSION, IDENTITY_FORMAT_VERSION) or type(version) is not int:
        raise _fail(
            f"unknown body format version {version!r}: this node reads versions "
            f"{FORMAT_VERSION} and {IDENTITY_FORMAT_VERSION}; upgrade citynode if the "
            "origin is newer",
            "unknown_version",
        )
    keys = fields.keys()
    sealed = "sealed_digest" in fields
    required, allowed = (_SEALED_REQUIRED, _SEALED_ALLOWED) if sealed else (_REQUIRED, _ALLOWED)
    if version == IDENTITY_FORMAT_VERSION:
        required, allowed = required | _KEY, allowed | _KEY
    if not keys >= required:
        missing = ", ".join(sorted(required - keys))
        raise _fail(f"body lacks required field(s): {missing}", "missing_field")
    if not keys <= allowed:
        extra = keys - allowed
        if sealed and extra <= _ALLOWED:
            raise _fail("a sealed record carries no type or data_digest in clear "
                        f"(found {', '.join(sorted(extra))})")
        raise _fail(f"body has unknown field(s): {', '.join(sorted(extra))}", "unknown_field")
    origin = fields["origin"]
    if type(origin) is not bytes or len(origin) != 32:
        raise _fail("origin must be a 32-byte public key or identity")
    if "key" in fields and (type(fields["key"]) is not bytes or len(fields["key"]) != 32):
        raise _fail("key must be a 32-byte public key")
    feed = check_feed_name(fields["feed"])
    seq = fields["seq"]
    if type(seq) is not int or not 1 <= seq <= MAX_SEQ:
        raise _fail(f"seq must be an integer from 1, not {seq!r}")
    prev = fields.get("prev")
    if seq == 1:
        # "prev" present at all, even as nil: a second encoding of the same record.
        if "prev" in fields:
            raise _fail("the first record of a feed (seq 1) has no prev", "bad_prev")
    elif type(prev) is not bytes or len(prev) != 32:
        raise _fail(f"record at seq {seq} must carry prev, the 32-byte id of seq {seq - 1}",
                    "bad_prev")
    t = fields["time"]
    if type(t) is not int or t < 0:
        raise _fail("time must be a non-negative integer (milliseconds since the epoch)")
    digest = fields["sealed_digest" if sealed else "data_digest"]
    if type(digest) is not bytes or len(digest) != 32:
        raise _fail("the payload digest must be 32 bytes (SHA-256)")
    if sealed:
        if feed == ERASURE_FEED:
            raise _fail(f"feed {ERASURE_FEED} holds erasure requests, never sealed",
                        "bad_erasure")
        return fields
    if type(fields["type"]) is not str or not fields["type"]:
        raise _fail("type must be a non-empty string")
    if (feed == ERASURE_FEED) != (fields["type"] == ERASURE_TYPE):
        raise _fail(f"type {ERASURE_TYPE} is published in feed {ERASURE_FEED} only, and "
                    "that feed holds nothing else", "bad_erasure")
    return fields


def _check_time(t: int, now_ms: int, policy: RecordPolicy) -> None:
    if t > now_ms + policy.future_tolerance_ms:
        raise InvalidRecord(
            f"record is dated {(t - now_ms) // 1000} s in the future (tolerance "
            f"{policy.future_tolerance_ms // 1000} s): check the origin's clock",
            "future_time",
        )


def check_payload(f: dict[str, Any], payload: bytes, policy: RecordPolicy = DEFAULT_POLICY
                  ) -> Any:
    """Check ``payload`` against a parsed body ``f`` and return its decoded value: the
    digest first (``payload_mismatch``), then strict canonical decoding, then the sealed
    shape (``bad_sealed``), or the payload against ``type`` (when ``policy.check_payload``).
    Raises :class:`InvalidRecord`."""
    sealed = "sealed_digest" in f
    if hashlib.sha256(payload).digest() != f["sealed_digest" if sealed else "data_digest"]:
        raise InvalidRecord("the payload does not match the digest the record's body "
                            "carries: it is not the payload that was signed",
                            "payload_mismatch")
    value = encoding.decode(payload, policy.body_limits)
    if sealed:
        check_sealed_shape(value, origin=f.get("key", f["origin"]))
        return value
    _check_payload_map(value)
    if policy.check_payload or f["type"] == ERASURE_TYPE:
        validate_payload(f["type"], value["data"])
    return value


def _check_payload_map(value: Any) -> None:
    """Check the shape of a plain record's decoded payload: a map of ``data`` (a map),
    ``salt`` (bin of :data:`SALT_BYTES`), optionally ``subject`` and ``dataschema``
    (str of 1 to 512 characters), nothing else. Raises :class:`InvalidRecord`."""
    if type(value) is not dict:
        raise _fail("the payload must be a map {data, salt}")
    keys = value.keys()
    if not keys >= _PAYLOAD_REQUIRED:
        missing = ", ".join(sorted(_PAYLOAD_REQUIRED - keys))
        raise _fail(f"the payload lacks required field(s): {missing}", "missing_field")
    if not keys <= _PAYLOAD_ALLOWED:
        extra = ", ".join(sorted(keys - _PAYLOAD_ALLOWED))
        raise _fail(f"the payload has unknown field(s): {extra}", "unknown_field")
    salt = value["salt"]
    if type(salt) is not bytes or len(salt) != SALT_BYTES:
        raise _fail(f"the payload's salt must be {SALT_BYTES} bytes")
    if type(value["data"]) is not dict:
        raise _fail("data (in the payload) must be a map")
    for opt in ("subject", "dataschema"):
        if opt in value and (type(value[opt]) is not str or not 0 < len(value[opt]) <= 512):
            raise _fail(f"{opt} must be a string of 1 to 512 characters")


def record_from_fields(rid: bytes, body: bytes, sig: bytes, f: dict[str, Any],
                       payload: bytes | None = None, value: Any = None) -> Record:
    """A Record from a body's decoded fields and its payload (bytes and decoded value --
    the whole payload map -- or None and None for a tombstone). No checks: callers
    verified them."""
    if "sealed_digest" in f:
        return Record(rid, body, sig, f["origin"], f["feed"], f["seq"], f.get("prev"),
                      f["time"], SEALED_TYPE, {}, None, None, value, payload,
                      f["sealed_digest"], f.get("key"))
    held = type(value) is dict
    return Record(
        rid,
        body,
        sig,
        f["origin"],
        f["feed"],
        f["seq"],
        f.get("prev"),
        f["time"],
        f["type"],
        value["data"] if held else {},
        value.get("subject") if held else None,  # in the payload: gone with it
        value.get("dataschema") if held else None,
        None,
        payload,
        f["data_digest"],
        f.get("key"),
    )


def check_key(f: dict[str, Any], rid: bytes, key_states: KeyStates | None) -> None:
    """For a body of version 3 (``f`` parsed, its signature by ``key`` verified): the
    origin's held key log must let ``key`` sign (feed, seq), whatever the record's
    time. Raises :class:`InvalidRecord` with the verdict as reason: ``unknown_key``
    (no log held, or a key it does not know: fetch the origin's log, then retry),
    ``before_key``, ``beyond_last_good``, ``wrong_head``, ``identity_dead`` (final).
    A body of version 2 (a ``cn1`` origin, signed by ``origin``) passes."""
    key = f.get("key")
    if key is None:
        return
    state = key_states(f["origin"]) if key_states is not None else None
    if state is None:
        raise InvalidRecord("no key log is held for this record's origin: fetch it, then "
                            "retry", "unknown_key")
    v = state.key_verdict(key, f["feed"], f["seq"], rid)
    if v.valid:
        return
    r = v.reason
    # Spelled out so that each reason code is a literal (tests/test_protocol_doc.py).
    raise InvalidRecord(_VERDICT_TEXT.get(r, r),
                        "before_key" if r == "before_key" else
                        "beyond_last_good" if r == "beyond_last_good" else
                        "wrong_head" if r == "wrong_head" else
                        "identity_dead" if r == "identity_dead" else "unknown_key")


_VERDICT_TEXT = {
    "unknown_key": "signed by a key the origin's key log held here does not name: fetch "
                   "the origin's log, then retry",
    "before_key": "signed by a key that came in force after this position",
    "beyond_last_good": "signed by a retired key beyond the last head it may sign "
                        "(a rotation or a recovery closed it), whatever time it claims",
    "wrong_head": "not the record the origin's key event names as this key's last",
    "identity_dead": "the origin's recovery key was used twice: its identity is dead",
}


def open_record(
    body: bytes,
    sig: bytes,
    payload: bytes | None,
    *,
    now_ms: int,
    verifier: Verifier,
    policy: RecordPolicy = DEFAULT_POLICY,
    rid: bytes | None = None,
    accept: Callable[[bytes], bool] | None = None,
    key_states: KeyStates | None = None,
) -> Record:
    """Verify a record completely and return it.

    Checks, in order: strict canonical decoding within limits, body fields, time not
    too far in the future of ``now_ms``, the payload (if present) against the body's
    digest and then its type, and the signature over ``DOMAIN_RECORD || body`` by
    ``origin``. ``payload`` None is a tombstone: valid on its own here; whether a node
    takes it (an erasure or retention behind it) is a separate decision
    (core/erasure.py). ``rid`` may be passed if the caller already hashed the body.
    Raises :class:`InvalidRecord` (or a subclass) with a specific ``reason``; nothing
    else. ``accept``, when given, is the trust policy: a record whose origin it refuses
    fails with reason ``untrusted_origin`` before its signature is checked.
    A body of version 3 is verified by its ``key``, then by :func:`check_key` against
    ``key_states`` (none given: ``unknown_key``).
    """
    if type(sig) is not bytes or len(sig) != 64:
        raise EncodingError("signature must be 64 bytes", "bad_envelope")
    f = parse_body(body, policy)
    if accept is not None and not accept(f["origin"]):
        # Before any signature work: a stranger's flood costs a decode, not a verify.
        raise InvalidRecord("origin is not trusted by this node's policy", "untrusted_origin")
    _check_time(f["time"], now_ms, policy)
    value = check_payload(f, payload, policy) if payload is not None else None
    verifier.verify(f.get("key", f["origin"]), DOMAIN_RECORD, body, sig)
    rid = rid if rid is not None else record_id(body)
    check_key(f, rid, key_states)
    return record_from_fields(rid, body, sig, f, payload, value)


def open_records(
    items: Iterable[tuple[bytes, bytes, bytes | None, bytes | None]],
    *,
    now_ms: int,
    verifier: Verifier,
    policy: RecordPolicy = DEFAULT_POLICY,
    accept: Callable[[bytes], bool] | None = None,
    key_states: KeyStates | None = None,
) -> list[Record | InvalidRecord]:
    """:func:`open_record` for a batch of ``(body, sig, payload or None, rid or None)``:
    the same checks and verdicts, one result per item in order -- the :class:`Record`,
    or the :class:`InvalidRecord` it failed with. Never raises :class:`InvalidRecord`.

    All decoding and field checks run first, then the signatures in one tight loop:
    interleaving Python work with each verification measurably slows libsodium
    (its tables and code fall out of the CPU caches), by about a sixth per record.
    """
    out: list[Any] = []  # None until the item's signature is checked
    checked: list[tuple[int, bytes, bytes, bytes | None, dict[str, Any], bytes | None,
                        Any]] = []
    for body, sig, payload, rid in items:
        try:
            if type(sig) is not bytes or len(sig) != 64:
                raise EncodingError("signature must be 64 bytes", "bad_envelope")
            f = parse_body(body, policy)
            if accept is not None and not accept(f["origin"]):
                raise InvalidRecord("origin is not trusted by this node's policy",
                                    "untrusted_origin")
            _check_time(f["time"], now_ms, policy)
            value = check_payload(f, payload, policy) if payload is not None else None
        except InvalidRecord as exc:
            out.append(exc)
            continue
        checked.append((len(out), body, sig, rid, f, payload, value))
        out.append(None)
    verify = verifier.verify
    good = []
    for item in checked:
        f = item[4]
        try:
            verify(f.get("key", f["origin"]), DOMAIN_RECORD, item[1], item[2])
        except InvalidRecord as exc:
            out[item[0]] = exc
            continue
        good.append(item)
    for i, body, sig, rid, f, payload, value in good:
        rid = rid if rid is not None else record_id(body)
        try:
            check_key(f, rid, key_states)
        except InvalidRecord as exc:
            out[i] = exc
            continue
        out[i] = record_from_fields(rid, body, sig, f, payload, value)
    return out


def make_payload(data: dict[str, Any], salt: bytes | None = None, *,
                 subject: str | None = None, dataschema: str | None = None) -> bytes:
    """The payload bytes of a plain record: the canonical msgpack map
    ``{"data": data, "salt": salt}``, with ``subject`` and ``dataschema`` when given.
    ``salt`` defaults to :data:`SALT_BYTES` random bytes (libsodium's CSPRNG); pass one
    only to make fixed test vectors."""
    if salt is None:
        salt = nacl.utils.random(SALT_BYTES)
    value: dict[str, Any] = {"data": data, "salt": salt}
    if subject is not None:
        value["subject"] = subject
    if dataschema is not None:
        value["dataschema"] = dataschema
    return encoding.encode(value)


def make_body(
    *,
    origin: bytes,
    feed: str,
    seq: int,
    prev: bytes | None,
    time_ms: int,
    type: str | None = None,
    data: dict[str, Any] | None = None,
    subject: str | None = None,
    dataschema: str | None = None,
    sealed: dict[str, Any] | None = None,
    salt: bytes | None = None,
    key: bytes | None = None,
) -> tuple[bytes, bytes]:
    """Encode a record body canonically and its payload (no signing): a plain one
    (``type`` + ``data``, salted with ``salt`` or fresh random bytes) or a sealed one
    (``sealed`` only: its nonces and ephemeral keys are random already, so no salt).
    With ``key`` (the signing key), ``origin`` is a ``cn2`` identity and the body is
    of version 3. Returns ``(body, payload)``.
    Raises :class:`InvalidRecord` if a field or the payload is invalid, so nothing
    invalid is ever signed."""
    fields: dict[str, Any] = {
        "version": FORMAT_VERSION if key is None else IDENTITY_FORMAT_VERSION,
        "origin": origin,
        "feed": feed,
        "seq": seq,
        "time": time_ms,
    }
    if sealed is not None:
        if type is not None or data is not None or subject is not None or dataschema:
            raise InvalidRecord("a sealed body carries its type and data inside the seal")
        payload = encoding.encode(sealed)
        fields["sealed_digest"] = payload_digest(payload)
    else:
        if type is None or data is None:
            raise InvalidRecord("a record needs a type and data", "missing_field")
        payload = make_payload(data, salt, subject=subject, dataschema=dataschema)
        fields["type"] = type
        fields["data_digest"] = payload_digest(payload)
    if prev is not None:
        fields["prev"] = prev
    if key is not None:
        fields["key"] = key
    body = encoding.encode(fields)
    # the same checks a receiver makes: never sign what others reject
    check_payload(parse_body(body), payload)
    return body, payload


def sign_record(
    key: SigningKey,
    *,
    feed: str,
    seq: int,
    prev: bytes | None,
    time_ms: int,
    type: str,
    data: dict[str, Any],
    subject: str | None = None,
    dataschema: str | None = None,
    readers: Iterable[bytes] | None = None,
    salt: bytes | None = None,
    identity: bytes | None = None,
) -> Record:
    """Build, validate and sign a record of ``key``'s node. With ``readers`` (public
    keys) the payload is sealed to them and to us (a restricted feed). Raises
    :class:`InvalidRecord` (typically :class:`PayloadError`) if the payload does not
    match ``type``: nothing invalid is signed or sealed. ``salt`` (tests and vectors
    only) fixes the payload salt of a plain record; by default it is random.
    ``identity`` (a ``cn2`` node's ``D``; by default that of a :class:`NodeKey` of a
    ``cn2`` node): the record names it as origin and ``key`` as its signing key (body
    version 3); None: a ``cn1`` record whose origin is ``key``."""
    if identity is None and isinstance(key, NodeKey):
        identity = key.record_identity
    origin = key.public_key if identity is None else identity
    named = None if identity is None else key.public_key
    if readers is not None:
        from citynode.core.sealed import seal_payload

        blob = seal_payload(origin_key=key.public_key, feed=feed, seq=seq, type=type,
                            data=data, subject=subject, dataschema=dataschema,
                            recipients=readers, ad_origin=identity)
        body, payload = make_body(origin=origin, feed=feed, seq=seq, prev=prev,
                                  time_ms=time_ms, sealed=blob, key=named)
    else:
        body, payload = make_body(
            key=named,
            origin=origin,
            feed=feed,
            seq=seq,
            prev=prev,
            time_ms=time_ms,
            type=type,
            data=data,
            subject=subject,
            dataschema=dataschema,
            salt=salt,
        )
    sig = key.sign(DOMAIN_RECORD, body)
    f = encoding.decode(body)
    return record_from_fields(record_id(body), body, sig, f, payload,
                              encoding.decode(payload))
