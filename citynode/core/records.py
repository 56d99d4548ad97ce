"""Signed records: the body, the envelope, the record id, and verification.

A record body is a canonical msgpack map (docs/PROTOCOL.md, "Record body")::

    data        map       the payload (checked against ``type``)
    dataschema  str       optional, URI of the payload's schema (CloudEvents name)
    feed        str       feed name, ``[a-z0-9][a-z0-9._-]{0,63}``
    origin      bin(32)   the signing node's Ed25519 public key
    prev        bin(32)   id of the record at ``seq - 1``; absent when ``seq == 1``
    seq         int       1, 2, 3 ... per (origin, feed)
    subject     str       optional, what the record is about (a station id ...)
    time        int       milliseconds since the Unix epoch, UTC
    type        str       payload type (core/types.py)
    version     int       body format version, 1

A record of a restricted feed carries ``sealed`` (core/sealed.py: the payload encrypted
to its readers) INSTEAD of ``type``, ``data``, ``subject`` and ``dataschema``. Such a
:class:`Record` has ``type == SEALED_TYPE``, empty ``data`` and the blob in ``sealed``.

The envelope is the canonical msgpack array ``[body: bin, signature: bin(64)]``. The
signature is Ed25519 over ``DOMAIN_RECORD || body`` -- the body bytes exactly as sent,
never a re-encoding. The record id is ``SHA-256(body)``, so no change to a signature can
change an id.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

from citynode.core import encoding
from citynode.core.keys import DOMAIN_RECORD, SigningKey, Verifier
from citynode.core.sealed import check_sealed_shape
from citynode.core.types import validate_payload
from citynode.errors import EncodingError, InvalidRecord

__all__ = [
    "DEFAULT_FUTURE_TOLERANCE_MS",
    "FEED_NAME_RULE",
    "FORMAT_VERSION",
    "SEALED_TYPE",
    "Record",
    "RecordPolicy",
    "check_feed_name",
    "decode_envelope",
    "encode_envelope",
    "make_body",
    "open_record",
    "open_records",
    "record_from_fields",
    "record_id",
    "sign_record",
]

FORMAT_VERSION = 1
DEFAULT_FUTURE_TOLERANCE_MS = 15 * 60 * 1000
MAX_SEQ = 2**63 - 1
_FEED_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
#: What a valid feed name is, in words (for error messages).
FEED_NAME_RULE = "1-64 of a-z 0-9 . _ - (starting with a letter or digit)"
_GOOD_FEEDS: set[str] = set()
_REQUIRED = frozenset({"data", "feed", "origin", "seq", "time", "type", "version"})
_OPTIONAL = frozenset({"dataschema", "prev", "subject"})
_ALLOWED = _REQUIRED | _OPTIONAL
_SEALED_REQUIRED = frozenset({"feed", "origin", "sealed", "seq", "time", "version"})
_SEALED_ALLOWED = _SEALED_REQUIRED | {"prev"}
#: ``Record.type`` of a sealed record: relays cannot know the real type. Not a valid
#: payload type name (built-ins are CamelCase, custom ones dotted), so it cannot clash.
SEALED_TYPE = "sealed"


@dataclass(frozen=True, slots=True)
class RecordPolicy:
    """What a verifier accepts. ``now_ms`` is not here: time is passed per call."""

    body_limits: encoding.Limits = encoding.DEFAULT_LIMITS
    future_tolerance_ms: int = DEFAULT_FUTURE_TOLERANCE_MS
    check_payload: bool = True


DEFAULT_POLICY = RecordPolicy()


class Record(NamedTuple):
    """A verified record. Only :func:`open_record` and :func:`sign_record` make them.

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

    @property
    def envelope(self) -> bytes:
        """The canonical envelope bytes ``[body, sig]``."""
        return encode_envelope(self.body, self.sig)

    def fields(self) -> dict[str, Any]:
        """The decoded body as a dict (a fresh copy): what was signed. For a sealed record
        that is the seal, never plaintext, even if the record was opened for a reader."""
        out: dict[str, Any] = {
            "version": FORMAT_VERSION,
            "origin": self.origin,
            "feed": self.feed,
            "seq": self.seq,
            "time": self.time,
        }
        if self.sealed is not None:
            out["sealed"] = self.sealed
        else:
            out["type"] = self.type
            out["data"] = self.data
        if self.prev is not None:
            out["prev"] = self.prev
        if self.sealed is None:
            if self.subject is not None:
                out["subject"] = self.subject
            if self.dataschema is not None:
                out["dataschema"] = self.dataschema
        return out


def record_id(body: bytes) -> bytes:
    """The record id: SHA-256 of the body bytes."""
    return hashlib.sha256(body).digest()


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


def encode_envelope(body: bytes, sig: bytes) -> bytes:
    """The canonical envelope: msgpack array of two bins (built directly: it is made
    for every record pushed or served)."""
    n = len(body)
    if n < 0x100:
        head = b"\x92\xc4" + bytes((n,))
    elif n < 0x10000:
        head = b"\x92\xc5" + n.to_bytes(2, "big")
    else:
        head = b"\x92\xc6" + n.to_bytes(4, "big")
    return head + body + b"\xc4\x40" + sig


def decode_envelope(
    data: bytes, limits: encoding.Limits = encoding.DEFAULT_LIMITS
) -> tuple[bytes, bytes]:
    """Split canonical envelope bytes into ``(body, sig)``.

    The envelope is exactly: ``0x92``, the body as bin with the shortest header
    (``c4 LL`` / ``c5 LLLL`` / ``c6 LLLLLLLL``), then ``c4 40`` and the 64-byte signature.
    Raises :class:`EncodingError` for anything else or a body over ``limits.max_bytes``.
    """
    n = len(data)
    if n < 70 or data[0] != 0x92:
        raise EncodingError("an envelope is a msgpack array [body, signature]", "bad_envelope")
    tag = data[1]
    if tag == 0xC4:
        blen, start = data[2], 3
    elif tag == 0xC5:
        blen, start = int.from_bytes(data[2:4], "big"), 4
        if blen < 0x100:
            raise EncodingError("envelope body length is not in its shortest form")
    elif tag == 0xC6:
        blen, start = int.from_bytes(data[2:6], "big"), 6
        if blen < 0x10000:
            raise EncodingError("envelope body length is not in its shortest form")
    else:
        raise EncodingError("envelope body must be msgpack bin", "bad_envelope")
    if blen > limits.max_bytes:
        raise EncodingError(f"body of {blen} bytes is over the limit of {limits.max_bytes}",
                            "too_large")
    end = start + blen
    if n != end + 66 or data[end] != 0xC4 or data[end + 1] != 64:
        raise EncodingError(
            "envelope must end with the 64-byte signature as bin, and nothing after it",
            "bad_envelope",
        )
    return data[start:end], data[end + 2 :]


def split_envelope(env: Any) -> tuple[bytes, bytes]:
    """Check an already-decoded envelope value and return ``(body, sig)``."""
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
    if version != FORMAT_VERSION or type(version) is not int:
        raise _fail(
            f"unknown body format version {version!r}: this node reads version "
            f"{FORMAT_VERSION}; upgrade citynode if the origin is newer",
            "unknown_version",
        )
    keys = fields.keys()
    sealed = "sealed" in fields
    required, allowed = (_SEALED_REQUIRED, _SEALED_ALLOWED) if sealed else (_REQUIRED, _ALLOWED)
    if not keys >= required:
        missing = ", ".join(sorted(required - keys))
        raise _fail(f"body lacks required field(s): {missing}", "missing_field")
    if not keys <= allowed:
        extra = keys - allowed
        if sealed and extra <= _ALLOWED:
            raise _fail("a sealed record carries no type, data, subject or dataschema "
                        f"in clear (found {', '.join(sorted(extra))})")
        raise _fail(f"body has unknown field(s): {', '.join(sorted(extra))}", "unknown_field")
    origin = fields["origin"]
    if type(origin) is not bytes or len(origin) != 32:
        raise _fail("origin must be a 32-byte public key")
    check_feed_name(fields["feed"])
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
    if sealed:
        check_sealed_shape(fields["sealed"], origin=origin)
        return fields
    if type(fields["type"]) is not str or not fields["type"]:
        raise _fail("type must be a non-empty string")
    if type(fields["data"]) is not dict:
        raise _fail("data (the payload) must be a map")
    for opt in ("subject", "dataschema"):
        if opt in fields and (type(fields[opt]) is not str or not 0 < len(fields[opt]) <= 512):
            raise _fail(f"{opt} must be a string of 1 to 512 characters")
    return fields


def _check_time(t: int, now_ms: int, policy: RecordPolicy) -> None:
    if t > now_ms + policy.future_tolerance_ms:
        raise InvalidRecord(
            f"record is dated {(t - now_ms) // 1000} s in the future (tolerance "
            f"{policy.future_tolerance_ms // 1000} s): check the origin's clock",
            "future_time",
        )


def record_from_fields(rid: bytes, body: bytes, sig: bytes, f: dict[str, Any]) -> Record:
    """A Record from a body's decoded fields (no checks: callers verified them)."""
    if "sealed" in f:
        return Record(rid, body, sig, f["origin"], f["feed"], f["seq"], f.get("prev"),
                      f["time"], SEALED_TYPE, {}, None, None, f["sealed"])
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
        f["data"],
        f.get("subject"),
        f.get("dataschema"),
    )


def open_record(
    body: bytes,
    sig: bytes,
    *,
    now_ms: int,
    verifier: Verifier,
    policy: RecordPolicy = DEFAULT_POLICY,
    rid: bytes | None = None,
    accept: Callable[[bytes], bool] | None = None,
) -> Record:
    """Verify a record completely and return it.

    Checks, in order: strict canonical decoding within limits, body fields, time not
    too far in the future of ``now_ms``, the payload against its type, and the
    signature over ``DOMAIN_RECORD || body`` by ``origin``. ``rid`` may be passed if
    the caller already hashed the body. Raises :class:`InvalidRecord` (or a subclass)
    with a specific ``reason``; nothing else.
    ``accept``, when given, is the trust policy: a record whose origin it refuses fails
    with reason ``untrusted_origin`` before its signature is checked.
    """
    if type(sig) is not bytes or len(sig) != 64:
        raise EncodingError("signature must be 64 bytes", "bad_envelope")
    f = parse_body(body, policy)
    if accept is not None and not accept(f["origin"]):
        # Before any signature work: a stranger's flood costs a decode, not a verify.
        raise InvalidRecord("origin is not trusted by this node's policy", "untrusted_origin")
    _check_time(f["time"], now_ms, policy)
    if policy.check_payload and "sealed" not in f:
        validate_payload(f["type"], f["data"])
    verifier.verify(f["origin"], DOMAIN_RECORD, body, sig)
    return record_from_fields(rid if rid is not None else record_id(body), body, sig, f)


def open_records(
    items: Iterable[tuple[bytes, bytes, bytes | None]],
    *,
    now_ms: int,
    verifier: Verifier,
    policy: RecordPolicy = DEFAULT_POLICY,
    accept: Callable[[bytes], bool] | None = None,
) -> list[Record | InvalidRecord]:
    """:func:`open_record` for a batch of ``(body, sig, rid or None)``: the same checks
    and verdicts, one result per item in order -- the :class:`Record`, or the
    :class:`InvalidRecord` it failed with. Never raises :class:`InvalidRecord`.

    All decoding and field checks run first, then the signatures in one tight loop:
    interleaving Python work with each verification measurably slows libsodium
    (its tables and code fall out of the CPU caches), by about a sixth per record.
    """
    out: list[Any] = []  # None until the item's signature is checked
    checked: list[tuple[int, bytes, bytes, bytes | None, dict[str, Any]]] = []
    check_payload = policy.check_payload
    for body, sig, rid in items:
        try:
            if type(sig) is not bytes or len(sig) != 64:
                raise EncodingError("signature must be 64 bytes", "bad_envelope")
            f = parse_body(body, policy)
            if accept is not None and not accept(f["origin"]):
                raise InvalidRecord("origin is not trusted by this node's policy",
                                    "untrusted_origin")
            _check_time(f["time"], now_ms, policy)
            if check_payload and "sealed" not in f:
                validate_payload(f["type"], f["data"])
        except InvalidRecord as exc:
            out.append(exc)
            continue
        checked.append((len(out), body, sig, rid, f))
        out.append(None)
    verify = verifier.verify
    good = []
    for item in checked:
        try:
            verify(item[4]["origin"], DOMAIN_RECORD, item[1], item[2])
        except InvalidRecord as exc:
            out[item[0]] = exc
            continue
        good.append(item)
    for i, body, sig, rid, f in good:
        out[i] = record_from_fields(rid if rid is not None else record_id(body), body, sig, f)
    return out


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
) -> bytes:
    """Encode a record body canonically (no signing): a plain one (``type`` + ``data``)
    or a sealed one (``sealed`` only). Raises :class:`InvalidRecord` if a field or the
    payload is invalid, so nothing invalid is ever signed."""
    fields: dict[str, Any] = {
        "version": FORMAT_VERSION,
        "origin": origin,
        "feed": feed,
        "seq": seq,
        "time": time_ms,
    }
    if sealed is not None:
        if type is not None or data is not None or subject is not None or dataschema:
            raise InvalidRecord("a sealed body carries its type and data inside the seal")
        fields["sealed"] = sealed
    else:
        if type is None or data is None:
            raise InvalidRecord("a record needs a type and data", "missing_field")
        fields["type"] = type
        fields["data"] = data
        if subject is not None:
            fields["subject"] = subject
        if dataschema is not None:
            fields["dataschema"] = dataschema
    if prev is not None:
        fields["prev"] = prev
    body = encoding.encode(fields)
    parse_body(body)  # same checks a receiver makes: never sign what others reject
    if sealed is None:
        assert type is not None
        validate_payload(type, data)
    return body


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
) -> Record:
    """Build, validate and sign a record of ``key``'s node. With ``readers`` (public
    keys) the payload is sealed to them and to us (a restricted feed). Raises
    :class:`InvalidRecord` (typically :class:`PayloadError`) if the payload does not
    match ``type``: nothing invalid is signed or sealed."""
    if readers is not None:
        from citynode.core.sealed import seal_payload

        blob = seal_payload(origin_key=key.public_key, feed=feed, seq=seq, type=type,
                            data=data, subject=subject, dataschema=dataschema,
                            recipients=readers)
        body = make_body(origin=key.public_key, feed=feed, seq=seq, prev=prev,
                         time_ms=time_ms, sealed=blob)
    else:
        body = make_body(
            origin=key.public_key,
            feed=feed,
            seq=seq,
            prev=prev,
            time_ms=time_ms,
            type=type,
            data=data,
            subject=subject,
            dataschema=dataschema,
        )
    sig = key.sign(DOMAIN_RECORD, body)
    f = encoding.decode(body)
    return record_from_fields(record_id(body), body, sig, f)
