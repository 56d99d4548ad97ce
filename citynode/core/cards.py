"""Node cards: a node's signed self-description, served at ``/.well-known/citynode``.

A partner who knows only a node id (given out of band) fetches the card, checks that it
is signed by that id's key (:func:`open_card` with ``expected_node_id``), and pins the
TLS certificate fingerprint in it. A newer card (higher ``time``) replaces an older one.

The card body is a canonical msgpack map (docs/PROTOCOL.md, "Node card")::

    feeds     array     [{name: str, access: "public"|"partners"|"restricted", and the
                        optional retention, terms and liveness fields below}, ...],
                        sorted by name, no duplicates, at most 1000
    kind      str       "card"
    name      str       1-128 characters, no control characters (the city's name)
    node      bin(32)   the node's Ed25519 public key
    partners  array     [bin(32), ...] public keys of this node's partners, sorted, no
                        duplicates, not the node itself, at most 10000. Also the node's
                        "vouch" list: a node accepts records of origins its partners vouch for
    software  str       1-128 characters, e.g. "citynode/0.1.0"
    time      int       milliseconds since the Unix epoch, UTC, when the card was signed
    tls       bin(32)   SHA-256 of the DER TLS certificate to pin; absent when TLS is
                        terminated by a proxy with a CA-issued certificate (then the
                        ``url`` must be https and the CA chain is checked instead)
    tls_next  bin(32)   optional, only with ``tls``: the certificate the node will switch
                        to (``citynode tls renew``); partners accept either while a card
                        names both, so the switch has no window where they refuse it
    url       str       where the node is reached: ``https://`` or ``http://`` URL, at
                        most 512 ASCII characters; ``tls`` requires ``https://``
    version   int       2

Each feed entry may also state, all optional (docs/PROTOCOL.md, "Feed terms")::

    retention_days int      1-36500: every node holding the feed's records drops
                            payloads older than that
    attribution   str       1-512 characters, no control characters
    cadence_s     int       1-604800: the feed's expected cadence; the origin signs a
                            checkpoint of it at least that often (core/liveness.py)
    license       str       an SPDX license identifier (``CC-BY-4.0``, ``LicenseRef-x``)
    policy        bin(32)   the digest of the egress policy in force (core/egress.py);
                            present whenever that policy is not the open one
    terms_digest  bin(32)   SHA-256 of the terms document at ``terms_url``
    terms_url     str       https:// URL of the terms document (with ``terms_digest``)

The envelope is the canonical msgpack array ``[body: bin, sig: bin(64)]`` with the
signature over ``DOMAIN_CARD || body``, exactly as for records. :func:`card_to_json`
gives a JSON form carrying the same body and signature (base64) so a JSON-only client
can verify it too.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, NamedTuple

from citynode.core import encoding
from citynode.core.keybook import HeldLog
from citynode.core.keylog import identity_id, verify_log
from citynode.core.keys import (
    DOMAIN_CARD,
    NodeKey,
    SigningKey,
    Verifier,
    is_identity_id,
    node_id,
    parse_node_id,
)
from citynode.core.records import (
    DEFAULT_FUTURE_TOLERANCE_MS,
    check_feed_name,
    decode_envelope,
    encode_envelope,
)
from citynode.errors import EncodingError, InvalidRecord, SignatureError

__all__ = [
    "ACCESS_LEVELS",
    "CARD_LIMITS",
    "CARD_VERSION",
    "MAX_CADENCE_S",
    "CardFeed",
    "CardUse",
    "NodeCard",
    "card_from_json",
    "card_to_json",
    "check_card_feed",
    "check_terms_document",
    "judge_card_key",
    "make_card",
    "open_card",
    "signer_retired_at",
    "terms_in_force",
    "terms_key",
]

CARD_VERSION = 2
ACCESS_LEVELS = ("public", "partners", "restricted")
MAX_NAME = 128
MAX_URL = 512
MAX_SOFTWARE = 128
MAX_FEEDS = 1000
MAX_PARTNERS = 10_000
MAX_ATTRIBUTION = 512
MAX_LICENSE = 64
#: The longest expected cadence a card may state: a week.
MAX_CADENCE_S = 7 * 86400
_MAX_TIME = 2**63 - 1

# The record limits (64 KiB, 4096 items) are too small for a card listing 10,000
# partners. A card of 1000 feeds with every optional field and 10,000 partners has
# 29,022 items, nested 3 deep (body map -> feeds array -> feed map); the item bound admits
# exactly that, with margin. Its bytes are bounded by the body limit, not field by field:
# 1000 feeds each with 512-character terms URLs and attributions do not fit (make_card
# refuses to sign what does not), while any realistic card does, and an envelope at the
# limit still fits an export bundle item (1 MiB).
#: Bounds on the cards of other nodes a node keeps (and serves on /v1/cards, so also
#: what it accepts in one answer): a flood of self-made cards cannot fill its memory.
MAX_CARDS_KEPT = 10_000
MAX_CARDS_KEPT_BYTES = 32 * 1024 * 1024
CARD_LIMITS = encoding.Limits(max_bytes=1024 * 1024 - 1024, max_depth=3, max_items=29_100)

_FIELDS = frozenset(
    {"feeds", "kind", "name", "node", "partners", "software", "time", "url", "version"}
)
_OPTIONAL = frozenset({"tls", "tls_next", "keylog"})
_FEED_KEYS = frozenset({"name", "access"})
_FEED_OPTIONAL = frozenset({"attribution", "cadence_s", "license", "policy",
                            "retention_days", "terms_digest", "terms_url"})
MAX_RETENTION_DAYS = 36_500
# SPDX short identifiers: idstring = 1*(ALPHA / DIGIT / "-" / ".") (SPDX 2.3, annex D),
# a listed licence optionally followed by "+" (or later), or "LicenseRef-" idstring.
# One identifier, not an expression: "MIT OR Apache-2.0" is not a licence id.
_SPDX_RE = re.compile(r"LicenseRef-[A-Za-z0-9.-]+|(?!LicenseRef-)[A-Za-z0-9.-]+\+?",
                      re.ASCII | re.IGNORECASE)
# Visible ASCII only (spaces, controls or non-ASCII are copy-paste accidents) and no
# userinfo: credentials have no place in a public card.
_URL_RE = re.compile(r"https?://[A-Za-z0-9._~%:\[\]-]+(?:[/?#][\x21-\x7e]*)?")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Base64 of a body at CARD_LIMITS.max_bytes, plus padding.
_MAX_B64 = 4 * (CARD_LIMITS.max_bytes // 3 + 1)


class CardFeed(NamedTuple):
    """One feed a node offers, who may read it, on what terms, and how often its origin
    says it is alive. The optional fields are None when the card does not state them."""

    name: str
    access: str
    retention_days: int | None = None  # payloads older than this are pruned everywhere
    license: str | None = None
    terms_url: str | None = None
    terms_digest: bytes | None = None
    attribution: str | None = None
    policy: bytes | None = None
    cadence_s: int | None = None

    def terms(self) -> dict[str, Any]:
        """The feed's terms as JSON (hex digests; unset ones are null): what the read
        API, streams, bundles and ``citynode audit`` show."""
        return {
            "license": self.license,
            "terms_url": self.terms_url,
            "terms_digest": self.terms_digest.hex() if self.terms_digest else None,
            "attribution": self.attribution,
            "policy": self.policy.hex() if self.policy else None,
        }

    def to_json(self) -> dict[str, Any]:
        """The feed's entry in the JSON form of a card: only the fields present."""
        out: dict[str, Any] = {"name": self.name, "access": self.access}
        for k, v in self._asdict().items():
            if k not in out and v is not None:
                out[k] = v.hex() if type(v) is bytes else v
        return out

    def to_body(self) -> dict[str, Any]:
        """The feed's map in a card body: only the fields present."""
        return {k: v for k, v in self._asdict().items() if v is not None}


@dataclass(frozen=True, slots=True)
class NodeCard:
    """A verified node card. Only :func:`make_card`, :func:`open_card` and
    :func:`card_from_json` make them."""

    node: bytes
    name: str
    url: str
    tls: bytes | None
    feeds: tuple[CardFeed, ...]
    partners: tuple[bytes, ...] = field(repr=False)
    software: str
    time: int
    body: bytes = field(repr=False)
    sig: bytes = field(repr=False)
    keylog: bytes | None = field(default=None, repr=False)  # a cn2 node's key log
    tls_next: bytes | None = None  # the certificate a renewal switches to (with ``tls``)
    #: The key that signed the card: ``node`` for a cn1 card, the key in force at the end
    #: of its ``keylog`` for a cn2 card (None only for a body not verified yet).
    signer: bytes | None = field(default=None, repr=False)

    @property
    def tls_pins(self) -> frozenset[bytes]:
        """Every TLS certificate fingerprint a partner accepts from this node now: the
        one in force and, during a renewal, the next one (empty: no pinning)."""
        return frozenset(fp for fp in (self.tls, self.tls_next) if fp is not None)

    @property
    def envelope(self) -> bytes:
        """The canonical envelope bytes ``[body, sig]``."""
        return encode_envelope(self.body, self.sig)

    @property
    def node_id(self) -> str:
        """The printable id of the node that signed the card: ``cn2...`` when the card
        carries a key log, else ``cn1...``."""
        return identity_id(self.node) if self.keylog is not None else node_id(self.node)

    def vouches_for(self, public_key: bytes) -> bool:
        """True if ``public_key`` is one of this node's partners (O(log n))."""
        i = bisect.bisect_left(self.partners, public_key)
        return i < len(self.partners) and self.partners[i] == public_key


def _fail(msg: str, reason: str = "bad_card") -> InvalidRecord:
    return InvalidRecord(msg, reason)


def _check_text(what: str, value: Any, max_len: int) -> str:
    if type(value) is not str or not 0 < len(value) <= max_len:
        raise _fail(f"card {what} must be a string of 1 to {max_len} characters")
    if _CONTROL_RE.search(value):
        raise _fail(f"card {what} must not contain control characters")
    return value


def _check_https(what: str, value: Any) -> str:
    if (type(value) is not str or len(value) > MAX_URL or not _URL_RE.fullmatch(value)
            or not value.startswith("https://")):
        raise _fail(f"card {what} must be an https:// URL of at most {MAX_URL} visible "
                    "ASCII characters")
    return value


def _check_digest(what: str, value: Any) -> bytes:
    if type(value) is not bytes or len(value) != 32:
        raise _fail(f"card {what} must be 32 bytes (a SHA-256 digest)")
    return value


def _parse_feed(entry: Any) -> CardFeed:
    """One feed map of a card body, every field checked (the ``name`` first)."""
    if type(entry) is not dict or not entry.keys() >= _FEED_KEYS:
        raise _fail("each card feed must be a map with name and access")
    name, access = entry["name"], entry["access"]
    try:
        check_feed_name(name)
    except InvalidRecord as exc:
        raise _fail(f"card {exc}") from exc
    extra = entry.keys() - _FEED_KEYS - _FEED_OPTIONAL
    if extra:
        raise _fail(f"card feed {name!r} has unknown field(s): {', '.join(sorted(extra))}")
    if access not in ACCESS_LEVELS:
        raise _fail(f"feed {name!r} has access {access!r}: use one of "
                    f"{', '.join(ACCESS_LEVELS)}")
    days = entry.get("retention_days")
    if "retention_days" in entry and (
            type(days) is not int or not 1 <= days <= MAX_RETENTION_DAYS):
        raise _fail(f"feed {name!r} has retention_days {days!r}: an integer from 1 to "
                    f"{MAX_RETENTION_DAYS}")
    lic = entry.get("license")
    if lic is not None and (type(lic) is not str or not 0 < len(lic) <= MAX_LICENSE
                            or not _SPDX_RE.fullmatch(lic)):
        raise _fail(f"feed {name!r} license must be one SPDX license identifier (letters, "
                    f"digits, '-' and '.', at most {MAX_LICENSE}), e.g. CC-BY-4.0 or "
                    "LicenseRef-city-terms")
    url, digest = entry.get("terms_url"), entry.get("terms_digest")
    if (url is None) != (digest is None):
        raise _fail(f"feed {name!r} needs both terms_url and terms_digest, or neither")
    if url is not None:
        url = _check_https(f"feed {name!r} terms_url", url)
        digest = _check_digest(f"feed {name!r} terms_digest", digest)
    attribution = entry.get("attribution")
    if attribution is not None:
        attribution = _check_text(f"feed {name!r} attribution", attribution, MAX_ATTRIBUTION)
    policy = entry.get("policy")
    if policy is not None:
        policy = _check_digest(f"feed {name!r} policy", policy)
    cadence = entry.get("cadence_s")
    # type() is int: a msgpack bool or float never stands for a cadence.
    if cadence is not None and (type(cadence) is not int
                                or not 1 <= cadence <= MAX_CADENCE_S):
        raise _fail(f"feed {name!r} cadence_s must be an integer of 1 to {MAX_CADENCE_S} "
                    "seconds")
    return CardFeed(name, access, days, lic, url, digest, attribution, policy, cadence)


def check_card_feed(feed: CardFeed) -> None:
    """Check one feed entry with the rules a receiver applies (so a configuration can
    be refused before anything is signed). Raises :class:`InvalidRecord`."""
    _parse_feed(feed.to_body())


def _parse_body(body: bytes) -> NodeCard:
    """Strictly decode a card body and check every field; the signature is not checked
    (the returned card's ``sig`` is empty). Raises :class:`InvalidRecord`."""
    f = encoding.decode(body, CARD_LIMITS)
    if type(f) is not dict:
        raise EncodingError("a card body is a map", "bad_card")
    if f.get("kind") != "card":
        raise _fail("this is not a node card (kind is not 'card')")
    version = f.get("version")
    if type(version) is not int or version != CARD_VERSION:
        raise _fail(
            f"unknown card format version {version!r}: this node reads version "
            f"{CARD_VERSION}; upgrade citynode if the other node is newer",
            "unknown_version",
        )
    keys = f.keys()
    if not keys >= _FIELDS:
        raise _fail(f"card lacks required field(s): {', '.join(sorted(_FIELDS - keys))}",
                    "missing_field")
    if not keys <= _FIELDS | _OPTIONAL:
        extra = ", ".join(sorted(keys - _FIELDS - _OPTIONAL))
        raise _fail(f"card has unknown field(s): {extra}", "unknown_field")
    node = f["node"]
    if type(node) is not bytes or len(node) != 32:
        raise _fail("card node must be a 32-byte public key or identity")
    log = f.get("keylog")
    if log is not None and (type(log) is not bytes or not log):
        raise _fail("card keylog must be the key log's wire bytes")
    name = _check_text("name", f["name"], MAX_NAME)
    url = f["url"]
    if type(url) is not str or len(url) > MAX_URL or not _URL_RE.fullmatch(url):
        raise _fail(
            f"card url must be an http:// or https:// URL of at most {MAX_URL} visible "
            "ASCII characters"
        )
    tls = f.get("tls")
    if tls is not None:
        if type(tls) is not bytes or len(tls) != 32:
            raise _fail("card tls must be the 32-byte SHA-256 of the DER certificate")
        if not url.startswith("https://"):
            raise _fail("card has a TLS fingerprint but an http:// url: use https://")
    tls_next = f.get("tls_next")
    if tls_next is not None and (type(tls_next) is not bytes or len(tls_next) != 32
                                 or tls is None or tls_next == tls):
        raise _fail("card tls_next must be the 32-byte SHA-256 of another DER certificate "
                    "than tls, and comes with tls")
    software = _check_text("software", f["software"], MAX_SOFTWARE)
    t = f["time"]
    if type(t) is not int or not 0 <= t <= _MAX_TIME:
        raise _fail("card time must be a non-negative integer (milliseconds since the epoch)")
    return NodeCard(node, name, url, tls, _parse_feeds(f["feeds"]),
                    _parse_partners(f["partners"], node), software, t, body, b"", log,
                    tls_next)


def _parse_feeds(feeds: Any) -> tuple[CardFeed, ...]:
    if type(feeds) is not list or len(feeds) > MAX_FEEDS:
        raise _fail(f"card feeds must be an array of at most {MAX_FEEDS} entries")
    out: list[CardFeed] = []
    for entry in feeds:
        feed = _parse_feed(entry)
        # Sorted and unique: one set of feeds has exactly one encoding.
        if out and feed.name <= out[-1].name:
            raise _fail(f"card feeds are not sorted by name without duplicates "
                        f"(at {feed.name!r})")
        out.append(feed)
    return tuple(out)


def _parse_partners(partners: Any, node: bytes) -> tuple[bytes, ...]:
    if type(partners) is not list or len(partners) > MAX_PARTNERS:
        raise _fail(f"card partners must be an array of at most {MAX_PARTNERS} keys")
    prev = b""
    for pk in partners:
        if type(pk) is not bytes or len(pk) != 32:
            raise _fail("each card partner must be a 32-byte public key")
        if pk <= prev:
            raise _fail("card partners are not sorted without duplicates")
        if pk == node:
            raise _fail("a node does not list itself among its partners")
        prev = pk
    return tuple(partners)


def make_card(
    key: SigningKey,
    *,
    name: str,
    url: str,
    tls_fingerprint: bytes | None,
    feeds: Iterable[CardFeed | tuple[str, str] | tuple[str, str, int | None]],
    partners: Iterable[bytes],
    software: str,
    now_ms: int,
    tls_next: bytes | None = None,
) -> NodeCard:
    """Build and sign the card of ``key``'s node, dated ``now_ms`` (a :class:`NodeKey`
    of a ``cn2`` node: the card names its identity and carries its key log).

    ``feeds`` are :class:`CardFeed` (or ``(name, access[, retention_days])``) and ``partners``
    public keys, in any order (the card holds them sorted). Raises
    :class:`InvalidRecord` if any field is invalid or repeated, with the same checks a
    receiver makes, so nothing is signed that partners would reject. ``tls_next``: the
    fingerprint of the certificate a TLS renewal switches to (with ``tls_fingerprint``).
    """
    try:
        feed_list = [_card_feed(f).to_body() for f in sorted(feeds, key=lambda f: f[0])]
        partner_list = sorted(partners)
    except (TypeError, ValueError, AttributeError) as exc:
        raise _fail(f"card feeds must be (name, access) pairs and partners keys: {exc}") from exc
    fields: dict[str, Any] = {
        "kind": "card",
        "version": CARD_VERSION,
        "node": key.identity if isinstance(key, NodeKey) else key.public_key,
        "name": name,
        "url": url,
        "feeds": feed_list,
        "partners": partner_list,
        "software": software,
        "time": now_ms,
    }
    if tls_fingerprint is not None:
        fields["tls"] = tls_fingerprint
    if tls_next is not None:
        fields["tls_next"] = tls_next
    if isinstance(key, NodeKey) and key.log is not None:
        fields["keylog"] = key.log
    body = encoding.encode(fields)
    card = _parse_body(body)
    sig = key.sign(DOMAIN_CARD, body)
    return replace(card, sig=sig, signer=key.public_key)


def _card_feed(f: CardFeed | tuple[str, str] | tuple[str, str, int | None]) -> CardFeed:
    if isinstance(f, CardFeed):
        return f
    # (name, access) or (name, access, retention_days): a longer tuple is a mistake.
    if not 2 <= len(f) <= 3:
        raise ValueError(f"{f!r} is not (name, access[, retention_days])")
    days = f[2] if len(f) == 3 else None
    if days is not None and type(days) is not int:
        raise TypeError(f"retention_days must be an integer, not {days!r}")
    return CardFeed(f[0], f[1], days)


def _open(
    body: bytes,
    sig: bytes,
    expected: tuple[bytes, bool | None] | None,
    verifier: Verifier,
    now_ms: int | None,
) -> NodeCard:
    """Steps 3-9 of verifying a card; ``expected`` is the parsed expected id (its 32
    bytes, and whether it is a ``cn2`` id; None: the bytes alone are compared)."""
    card = _parse_body(body)
    if now_ms is not None and card.time > now_ms + DEFAULT_FUTURE_TOLERANCE_MS:
        raise InvalidRecord(
            f"the card of {card.node_id} is dated {(card.time - now_ms) // 1000} s in the "
            f"future (tolerance {DEFAULT_FUTURE_TOLERANCE_MS // 1000} s): check that "
            "node's clock",
            "future_time",
        )
    signer = card.node
    if card.keylog is not None:
        # A cn2 card proves its key: the log folds from the id alone, and the card is
        # signed by the key in force at its end.
        signer = verify_log(card.node, card.keylog, verifier=verifier, now_ms=now_ms).key
    verifier.verify(signer, DOMAIN_CARD, body, sig)
    # Compared after the signature so that "signed by" in the message is a fact.
    # The id's type too: the cn1 form of an identity D (or the cn2 form of a key) is
    # another string for no node, and would let two strings name one.
    if expected is not None and (card.node != expected[0] or (
            expected[1] is not None and expected[1] != (card.keylog is not None))):
        given = identity_id(expected[0]) if expected[1] else node_id(expected[0])
        raise SignatureError(
            f"the card at this URL is signed by {card.node_id}, not by the id you gave "
            f"({given}): check the id with that city's operators",
            "wrong_node",
        )
    return replace(card, sig=sig, signer=signer)


def open_card(
    envelope: bytes,
    *,
    expected_node_id: str | None,
    verifier: Verifier,
    now_ms: int | None = None,
    expected_key: bytes | None = None,
) -> NodeCard:
    """Verify a card envelope completely and return the card.

    Checks, in order: ``expected_node_id`` is a well-formed id (else
    :class:`InvalidNodeId`), the envelope and body decode strictly within
    :data:`CARD_LIMITS`, every field, the card is not dated more than 15 minutes after
    ``now_ms`` (when given), the signature by the card's own key, and finally that the
    card is the expected node's: its 32 bytes and its type (a ``cn1`` id names a card
    without ``keylog``, a ``cn2`` id one with it). ``expected_key`` instead: the 32
    bytes alone, for a caller that holds a node's bytes, not an id someone typed (a
    partner row, a bundle's origin). Raises :class:`InvalidRecord`
    (:class:`EncodingError`, :class:`SignatureError` -- reason ``"wrong_node"`` for
    another node's card).
    """
    # The caller's own input first: a malformed id is the caller's mistake, whatever
    # the partner sent.
    expected = _expected_key(expected_node_id)
    if expected is None and expected_key is not None:
        expected = (expected_key, None)
    body, sig = decode_envelope(envelope, CARD_LIMITS)
    return _open(body, sig, expected, verifier, now_ms)


#: :func:`judge_card_key`'s verdicts: what a verified card may be used for.
CardUse = Literal["current", "past"]


def judge_card_key(card: NodeCard, held: HeldLog | None) -> CardUse:
    """Judge a verified card (:func:`open_card`) by the key log the receiver HOLDS for
    its node -- after offering it the card's own ``keylog`` (``KeyBook.offer``): the
    held log is the card's if that offer took it, else the one that refused it
    (docs/PROTOCOL.md, "Key events and witnesses", Wiring: Cards).

    A card's own log only proves which key it claims: a thief holding a key that a
    recovery retired still has a log that puts that key in force (the log before the
    recovery). So:

    * ``"current"``: a card without ``keylog`` (its ``node`` is its key), a ``held`` of
      None (nothing held but the card's own log), or a card signed by the key in force
      in ``held``: it may be the node's card -- kept, served, replace an older card on
      ``time``, move TLS pins.
    * ``"past"``: signed by a key that a *rotation* of ``held`` retired, and dated no
      later than that rotation: the node's honest card of before the rotation. It may
      stand in the node's card history (the terms of its older records, its bundles),
      never as its card.

    Raises :class:`InvalidRecord` reason ``key_not_in_force`` otherwise: a key a
    recovery retired (whatever the card's time: the thief can backdate it), a key the
    identity died with, a key ``held`` does not name (a branch it supersedes or refuses)
    or a rotation's retired key on a card dated after that rotation. Pure.
    """
    if card.keylog is None or held is None:
        return "current"
    if card.signer is None:
        raise ValueError("judge_card_key judges a verified card (open_card)")
    state = held.state
    if card.node != state.identity:
        raise ValueError("judge_card_key judges a card by its own node's key log")
    keys = state.keys
    i = next((i for i, w in enumerate(keys) if w.key == card.signer), None)
    if i is not None and keys[i].end is None and not state.dead:
        return "current"
    who = f"the card of {identity_id(card.node)} dated {card.time}"
    if i is None:
        raise InvalidRecord(
            f"{who} is signed by a key the key log held here does not name (of a branch "
            "that log supersedes or refused): not the node's card", "key_not_in_force")
    retired = _retired(held, i)
    if retired is not None and retired[0] == "rotation":
        if card.time <= retired[1]:
            return "past"
        raise InvalidRecord(
            f"{who} is signed by a key that the rotation at key event seq "
            f"{keys[i + 1].since} retired before that date", "key_not_in_force")
    raise InvalidRecord(
        f"{who} is signed by a key that a recovery retired (or the identity died with): "
        "whatever its date, the holder of that key may be a thief", "key_not_in_force")


def signer_retired_at(card: NodeCard, held: HeldLog) -> int | None:
    """The time of the key event of ``held`` (a rotation or a recovery) that retired the
    key that signed the verified ``card``; None if that key is in force, is not in
    ``held``, or the identity died with it. What an auditor tells a card refused by
    :func:`judge_card_key` with: one dated after that event cannot be the node's
    (it switched keys there), one dated before may be (or a thief's, backdated). Pure."""
    i = next((i for i, w in enumerate(held.state.keys) if w.key == card.signer), None)
    retired = None if i is None else _retired(held, i)
    return None if retired is None else retired[1]


def _retired(held: HeldLog, i: int) -> tuple[str, int] | None:
    """How and when the ``i``-th key of ``held`` was retired: (``"rotation"`` or
    ``"recovery"``, the time of that key event), or None (in force, or closed by the
    identity's death)."""
    keys = held.state.keys
    w = keys[i]
    if w.retired_by not in ("rotation", "recovery") or i + 1 >= len(keys):
        return None
    at = next((e.time for e in held.events if e.seq == keys[i + 1].since), None)
    return None if at is None else (w.retired_by, at)


def _expected_key(expected_node_id: str | None) -> tuple[bytes, bool | None] | None:
    """The 32 bytes an expected id names, and whether it is a ``cn2`` id (a ``cn1`` id
    names a key, a ``cn2`` one an identity: the same 32 bytes under the other prefix
    name no node). Raises :class:`InvalidNodeId`."""
    if expected_node_id is None:
        return None
    return (parse_node_id(expected_node_id),
            is_identity_id(expected_node_id))



def card_to_json(card: NodeCard) -> dict[str, Any]:
    """The JSON form of a card: readable fields, plus the signed ``body`` and ``sig``
    (standard base64) that a JSON client verifies. Node ids are ``cn1...`` strings and
    the TLS fingerprint is lowercase hex (``null`` when absent)."""
    return {
        "kind": "card",
        "version": CARD_VERSION,
        "node": card.node_id,
        "name": card.name,
        "url": card.url,
        "tls": card.tls.hex() if card.tls is not None else None,
        **({"tls_next": card.tls_next.hex()} if card.tls_next is not None else {}),
        "feeds": [f.to_json() for f in card.feeds],
        "partners": [node_id(pk) for pk in card.partners],
        "software": card.software,
        "time": card.time,
        **({"keylog": base64.b64encode(card.keylog).decode("ascii")}
           if card.keylog is not None else {}),
        "body": base64.b64encode(card.body).decode("ascii"),
        "sig": base64.b64encode(card.sig).decode("ascii"),
    }


def _b64(data: Mapping[str, Any], name: str) -> bytes:
    value = data.get(name)
    if type(value) is not str or len(value) > _MAX_B64:
        raise _fail(f"JSON card {name} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _fail(f"JSON card {name} is not valid base64") from exc


def card_from_json(
    data: Mapping[str, Any],
    *,
    expected_node_id: str | None,
    verifier: Verifier,
    now_ms: int | None = None,
) -> NodeCard:
    """Verify the JSON form of a card (as :func:`card_to_json` makes it) and return it.

    The signed ``body`` and ``sig`` are verified as by :func:`open_card`; then the
    readable fields must be exactly those of the signed body, so a JSON card can never
    show one thing and sign another. Raises as :func:`open_card`, and
    :class:`InvalidRecord` if the JSON is not a card or its fields disagree.
    """
    expected = _expected_key(expected_node_id)
    if not isinstance(data, Mapping):
        raise _fail("a JSON card is an object")
    body, sig = _b64(data, "body"), _b64(data, "sig")
    if len(sig) != 64:
        raise EncodingError(f"card signature is {len(sig)} bytes, not 64", "bad_envelope")
    card = _open(body, sig, expected, verifier, now_ms)
    if not _same_json(card_to_json(card), dict(data)):
        raise _fail("the readable fields of the JSON card do not match its signed body")
    return card


def _same_json(want: Any, got: Any) -> bool:
    """JSON equality with exact types: Python's ``==`` holds ``True == 1 == 1.0``, so
    ``"version": true`` or ``"time": 1.7e12`` would pass for the integers signed."""
    if type(want) is not type(got):
        return False
    if type(want) is dict:
        return want.keys() == got.keys() and all(_same_json(want[k], got[k]) for k in want)
    if type(want) is list:
        return len(want) == len(got) and all(map(_same_json, want, got))
    return bool(want == got)


def terms_in_force(history: Iterable[NodeCard], feed: str, time_ms: int) -> CardFeed | None:
    """The entry of ``feed`` in the card in force at ``time_ms``: of the cards of one
    node in ``history`` (any order), the one with the greatest ``time`` at most
    ``time_ms``. None if no such card, or that card does not list the feed (its terms
    are then unknown, not "none")."""
    best: NodeCard | None = None
    for c in history:
        if c.time <= time_ms and (best is None or c.time > best.time):
            best = c
    if best is None:
        return None
    return next((f for f in best.feeds if f.name == feed), None)


def terms_key(envelope: bytes) -> bytes | None:
    """A digest of everything a card states of its feeds (every field of every entry, in
    order): two cards of one node with the same key make :func:`terms_in_force` give the
    same answer for every feed. None if ``envelope`` is not a well-formed card. The
    signature is not checked: this is for cards that were verified before they were
    kept."""
    try:
        body, _sig = decode_envelope(envelope, CARD_LIMITS)
        card = _parse_body(body)
    except InvalidRecord:
        return None
    return hashlib.sha256(encoding.encode([f.to_body() for f in card.feeds])).digest()


def check_terms_document(feed: CardFeed, document: bytes) -> None:
    """Check a terms document fetched from ``feed.terms_url`` against the digest the
    card signed. Raises :class:`InvalidRecord` (reason ``terms_mismatch``) if it does
    not match, or ``no_terms`` if the feed states no terms document."""
    if feed.terms_digest is None:
        raise InvalidRecord(f"feed {feed.name!r} states no terms document", "no_terms")
    got = hashlib.sha256(document).digest()
    if got != feed.terms_digest:
        raise InvalidRecord(
            f"the terms document of feed {feed.name!r} has SHA-256 {got.hex()}, not the "
            f"{feed.terms_digest.hex()} its card signed: the terms changed without a new "
            "card, or the copy is not the origin's", "terms_mismatch")
