"""The one error tree of citynode.

Every error citynode raises on purpose is a :class:`CitynodeError`. Errors from the
libraries underneath (msgpack, PyNaCl, sqlite3, aiohttp, ...) are caught where they
enter and re-raised as one of these with ``raise ... from exc``, so callers handle one
tree and users see one clear line.

::

    CitynodeError                    base; ``str(err)`` is one line a human can act on
    ├── InvalidRecord                bytes from outside failed verification (``.reason``)
    │   ├── EncodingError            not canonical msgpack, or over a size/depth/count limit
    │   ├── SignatureError           the Ed25519 signature does not verify
    │   ├── PayloadError             the payload does not match its record type
    │   └── ChainError               the record does not fit the feed chain (wrong prev, ...)
    ├── InvalidProof                 a fork / split-view / Merkle proof does not hold (``.reason``)
    ├── InvalidNodeId                a node id is malformed or has a bad checksum
    ├── InvalidFilter                a record filter (query parameters) is not valid (``.reason``)
    ├── KeyFileError                 a key file is unreadable, too open, or the passphrase is wrong
    ├── ConfigError                  node.toml has an unknown key, wrong type or bad value
    ├── StorageError                 the database cannot be opened, migrated or written
    ├── BackupError                  a backup cannot be made, verified or restored (``.reason``)
    ├── QueryTooSlow                 a reader's query ran past its time limit and was stopped
    ├── PublishRefused               this node will not sign on a feed right now (see message)
    │   └── NoLeader                 a process sharing the database cannot reach the leader
    ├── UnmappableMessage            a bridge's message cannot become a payload (``.reason``)
    ├── AccessDenied                 the caller may not read or write this
    │   ├── ReplayedRequest          a signed request seen before (``.public_key``: signer)
    │   └── UnknownSigner            signed by a cn2 identity whose key log is not held
    └── PeerError                    talking to another node failed
        └── PeerRejected             the other node answered with an error status
                                     (``.status``, ``.reason``, ``.detail``)

``InvalidRecord.reason`` is a short stable code (``"bad_signature"``, ``"non_canonical"``,
``"future_time"``, ...) used for metrics and logs; the message says what was wrong.

``PeerRejected.reason`` is the ``"error"`` code of the other node's JSON error body
(``{"error": reason, "message": text}``, see transport/server.py), parsed once where the
answer enters (transport/http.py): decide on ``status`` and ``reason``, never on the
message text.
"""

from __future__ import annotations

__all__ = [
    "AccessDenied",
    "BackupError",
    "ChainError",
    "CitynodeError",
    "ConfigError",
    "EncodingError",
    "InvalidFilter",
    "InvalidNodeId",
    "InvalidProof",
    "InvalidRecord",
    "KeyFileError",
    "NoLeader",
    "PayloadError",
    "PeerError",
    "PeerRejected",
    "PublishRefused",
    "QueryTooSlow",
    "ReplayedRequest",
    "SignatureError",
    "StorageError",
    "UnknownSigner",
    "UnmappableMessage",
]


class CitynodeError(Exception):
    """Base of every error citynode raises on purpose."""


class InvalidRecord(CitynodeError):
    """A record, envelope or protocol message from outside failed verification.

    Nothing that raised this was stored or forwarded. ``reason`` is a stable short code
    (for metrics and the rejected-input log); the message explains it to a human.
    """

    default_reason = "invalid"

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason: str = reason or self.default_reason


class EncodingError(InvalidRecord):
    """The bytes are not canonical msgpack as PROTOCOL.md defines it, or exceed a limit."""

    default_reason = "non_canonical"


class SignatureError(InvalidRecord):
    """The signature does not verify against the origin key: the bytes were altered,
    or the record was not signed by the node it claims to come from."""

    default_reason = "bad_signature"


class PayloadError(InvalidRecord):
    """The payload does not satisfy its record type (a required field is missing,
    a value has the wrong type or unit). Fix the data at its source and publish again."""

    default_reason = "bad_payload"


class ChainError(InvalidRecord):
    """The record does not fit its feed chain (for example its ``prev`` does not match
    the record held at ``seq - 1``)."""

    default_reason = "bad_chain"


class InvalidProof(CitynodeError):
    """A fork proof, split-view proof or Merkle proof does not prove what it claims,
    or is not one this node takes. ``reason`` is a stable short code sent as the
    ``error`` of the HTTP answer: ``"invalid"`` (it proves nothing: final), or e.g.
    ``"untrusted_origin"`` (about an origin not trusted yet: may be taken later)."""

    def __init__(self, message: str, reason: str = "invalid") -> None:
        super().__init__(message)
        self.reason = reason


class InvalidNodeId(CitynodeError, ValueError):
    """A node id is malformed: check that it was copied whole (it starts with ``cn1``)."""


class InvalidFilter(CitynodeError, ValueError):
    """A record filter is not valid: an unknown or repeated query parameter, an empty
    one, or a malformed origin, feed, time, seq or bbox. ``reason`` is a stable short
    code (``"bad_bbox"``, ``"empty_parameter"``, ... listed in citynode/core/filters.py);
    the message names the parameter and the rule, never echoing its value."""

    default_reason = "bad_filter"

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason: str = reason or self.default_reason


class KeyFileError(CitynodeError):
    """A key or token file cannot be used: missing, unreadable, readable by others
    (run ``chmod 600`` on it), corrupt, or the passphrase is wrong."""


class ConfigError(CitynodeError):
    """The configuration is wrong; the message names the file and the key."""


class StorageError(CitynodeError):
    """The database cannot be opened, migrated or written (disk full, permissions,
    a newer schema than this version of citynode understands)."""


class DiskFull(StorageError):
    """The disk holding the database is full: nothing of the write was kept (SQLite
    rolled it back). Free some space; the node resumes by itself."""


class DatabaseCorrupt(StorageError):
    """SQLite found the database file damaged (or not a database): restore it from a
    backup (``citynode restore``) or move it away."""


class BackupError(CitynodeError):
    """``citynode backup`` or ``citynode restore`` cannot go on; nothing was half done
    (a restore that fails leaves the data dir as it was). ``reason`` is a short stable
    code (``"running"``, ``"not_empty"``, ``"truncated"``, ``"checksum"``,
    ``"unsafe_member"``, ``"wrong_passphrase"``, ``"wrong_node"``, ...); the message
    says what to do."""

    default_reason = "backup"

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason: str = reason or self.default_reason


class QueryTooSlow(CitynodeError):
    """A read query ran past its time limit (``[limits] query_time_limit_seconds``) and
    was stopped: narrow it (an origin, a feed, a time range) or ask for fewer rows."""


class PublishRefused(CitynodeError):
    """This node will not sign on the feed now, to avoid ever signing two different
    records with the same seq (for example, a partner holds newer records of ours
    than we do, as after a restore from an old backup)."""


class NoLeader(PublishRefused):
    """This process does not lead the processes sharing one database, and the leader
    could not be reached to hand the request on to: retry in a few seconds (HTTP 503)."""


class UnmappableMessage(CitynodeError):
    """A message a bridge received (MQTT, ...) cannot become a payload: too large, not
    JSON, not shaped as its route's mapping says. It is kept as a dead letter; ``reason``
    is a stable code (docs/BRIDGES.md lists them)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason: str = reason


class AccessDenied(CitynodeError):
    """The caller is not allowed to do this (wrong operator token, not a partner,
    not a recipient of a restricted feed, stale or replayed request signature)."""


class UnknownSigner(AccessDenied):
    """A request signed by a ``cn2`` identity whose key log this node does not hold (and
    the request carries none): the node cannot tell which key signs for it. Answered
    401 ``unknown_key``; the sender offers its log (``POST /v1/keylog?origin=<its
    id>``) and sends the request again (transport/http.py does it once, by itself)."""


class ReplayedRequest(AccessDenied):
    """A signed request arrived again: its (key, nonce) was already used. Its signature
    verified and its signer was allowed, so it is a copy of a request ``public_key``'s
    node really sent (re-sent by it, or by whoever captured it): a partner's refusals
    count it as ``replayed``."""

    def __init__(self, message: str, public_key: bytes) -> None:
        super().__init__(message)
        self.public_key = public_key


class ClockSkew(AccessDenied):
    """A signed request was dated too far from this node's clock: one of the two clocks
    is wrong (run NTP on both). ``skew_s``: how far the request's time was ahead of this
    node's clock (negative: behind)."""

    def __init__(self, message: str, skew_s: int) -> None:
        super().__init__(message)
        self.skew_s = skew_s


class PeerError(CitynodeError):
    """Talking to another node failed (unreachable, TLS fingerprint mismatch, timeout,
    or an answer that does not follow the protocol)."""


class PeerRejected(PeerError):
    """The other node answered with an error status.

    ``status`` is the HTTP code; ``reason`` the stable code of its error body
    (``"access_denied"``, ``"untrusted_origin"``, ``"bad_signature"``, ...;
    ``"unknown"`` when the answer had no readable code, e.g. a proxy's error page);
    ``detail`` the other node's own one-line explanation (``str(err)`` adds where);
    ``retry_after_s`` the seconds its ``Retry-After`` header asked to wait (a 429 or 503
    from a busy node), None when it gave none.
    """

    def __init__(self, message: str, status: int, reason: str = "unknown",
                 detail: str | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.detail = message if detail is None else detail
        self.retry_after_s = retry_after_s
