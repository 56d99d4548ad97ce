"""Sealed payloads: end-to-end encryption of records on restricted feeds.

A record on a restricted feed carries, instead of the plain ``type``, ``data``,
``subject`` and ``dataschema`` fields, one ``sealed`` field: the payload encrypted to
a list of named recipient nodes (docs/PROTOCOL.md, "Encrypted (restricted) records").
The signature, record id and chain cover the body bytes, which hold the ciphertext, so
every relay verifies a sealed record completely without being able to read it.

``sealed`` is a canonical msgpack map (shown in canonical key order)::

    alg     str       "xchacha20poly1305+sealedbox-x25519"
    commit  bin(32)   SHA-256(COMMIT_PREFIX || content key): the key commitment
    ct      bin       XChaCha20-Poly1305 ciphertext and 16-byte tag of the inner map
    nonce   bin(24)   the XChaCha20-Poly1305 nonce
    to      array     1 to 64 pairs [recipient Ed25519 key bin(32), sealed key bin(80)],
                      sorted by recipient key, no duplicates, the origin among them

Sealing (``seal_payload``): pick a random 32-byte content key ``K``; encrypt the
canonical inner map ``{type, data, [subject], [dataschema]}`` with the key
``SHA-256(KEY_PREFIX || K)`` under associated data
``AD_PREFIX || origin || feed || seq (8 bytes, big-endian)``; seal ``K`` to each
recipient's X25519 key (converted from its Ed25519 key) in a libsodium sealed box.

Why the commitment: Poly1305 is not key-committing, so without it a malicious origin
could craft one ciphertext that opens to different payloads under different content
keys, and seal a different key to each recipient: one signed record, two stories,
and no fork proof could ever show it. With ``commit`` every recipient that can open a
record reads the same payload (a recipient whose box does not hold the committed key
fails with ``bad_sealed``, and learns that the origin misbehaved).

The core stays pure: randomness comes from libsodium (``nacl.utils.random``), which is
no I/O in the layering sense. Tests and test vectors pass ``_rng`` to make sealing
deterministic; the sealed boxes are then composed from the same primitives libsodium's
``crypto_box_seal`` uses, byte for byte the same format, because libsodium draws the
ephemeral key itself and cannot be given one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import nacl.bindings
import nacl.exceptions
import nacl.utils

from citynode.core import encoding
from citynode.core.keys import SigningKey, node_id
from citynode.core.types import validate_payload
from citynode.errors import AccessDenied, EncodingError, InvalidRecord

__all__ = [
    "AD_PREFIX",
    "ALG",
    "COMMIT_PREFIX",
    "KEY_PREFIX",
    "MAX_RECIPIENTS",
    "SEALED_KEY_BYTES",
    "Inner",
    "associated_data",
    "check_sealed_shape",
    "is_recipient",
    "open_payload",
    "reader_key",
    "recipients_of",
    "seal_payload",
]

ALG = "xchacha20poly1305+sealedbox-x25519"
AD_PREFIX = b"citynode/sealed/v1\x00"
COMMIT_PREFIX = b"citynode/sealed-commit/v1\x00"
KEY_PREFIX = b"citynode/sealed-key/v1\x00"
MAX_RECIPIENTS = 64
NONCE_BYTES = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES  # 24
TAG_BYTES = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_ABYTES  # 16
CONTENT_KEY_BYTES = 32
# A sealed box: ephemeral X25519 public key (32) + Poly1305 tag (16) + the content key.
SEALED_KEY_BYTES = nacl.bindings.crypto_box_SEALBYTES + CONTENT_KEY_BYTES  # 80
MAX_SEQ = 2**63 - 1
_MAX_TEXT = 512
_SEALED_KEYS = frozenset({"alg", "commit", "ct", "nonce", "to"})
_INNER_REQUIRED = frozenset({"type", "data"})
_INNER_ALLOWED = _INNER_REQUIRED | {"subject", "dataschema"}

_aead_encrypt = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt
_aead_decrypt = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt
_ed_to_x = nacl.bindings.crypto_sign_ed25519_pk_to_curve25519

Rng = Callable[[int], bytes]


@dataclass(frozen=True, slots=True)
class Inner:
    """The plain payload of a sealed record, as its recipients read it."""

    type: str
    data: dict[str, Any]
    subject: str | None = None
    dataschema: str | None = None


def _bad(msg: str) -> InvalidRecord:
    return InvalidRecord(f"sealed payload: {msg}", "bad_sealed")


def associated_data(origin: bytes, feed: str, seq: int) -> bytes:
    """The AEAD associated data that pins a ciphertext to its place:
    ``AD_PREFIX || origin || feed (UTF-8) || seq (8 bytes, big-endian)``.

    ``origin`` and ``seq`` have fixed lengths, so the feed name between them is
    unambiguous. Raises :class:`InvalidRecord` (``bad_field``) for a malformed argument.
    """
    if type(origin) is not bytes or len(origin) != 32:
        raise InvalidRecord("origin must be a 32-byte public key", "bad_field")
    if type(feed) is not str or not feed:
        raise InvalidRecord("feed must be a non-empty string", "bad_field")
    if type(seq) is not int or not 1 <= seq <= MAX_SEQ:
        raise InvalidRecord(f"seq must be an integer from 1, not {seq!r}", "bad_field")
    try:
        feed_bytes = feed.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate
        raise InvalidRecord("feed is not valid Unicode", "bad_field") from exc
    return AD_PREFIX + origin + feed_bytes + seq.to_bytes(8, "big")


def _derive(content_key: bytes) -> tuple[bytes, bytes]:
    """``(aead key, commitment)``: independent hashes of the content key, so publishing
    the commitment says nothing about the key the payload is encrypted with."""
    return (
        hashlib.sha256(KEY_PREFIX + content_key).digest(),
        hashlib.sha256(COMMIT_PREFIX + content_key).digest(),
    )


def _check_inner(fields: dict[str, Any], reason: str) -> None:
    """The inner map's fields, with the same rules as the plain body fields."""
    keys = fields.keys()
    if not keys >= _INNER_REQUIRED:
        missing = ", ".join(sorted(_INNER_REQUIRED - keys))
        raise InvalidRecord(f"sealed payload lacks field(s): {missing}", reason)
    if not keys <= _INNER_ALLOWED:
        extra = ", ".join(sorted(str(k) for k in keys - _INNER_ALLOWED))
        raise InvalidRecord(f"sealed payload has unknown field(s): {extra}", reason)
    if type(fields["type"]) is not str or not fields["type"]:
        raise InvalidRecord("type must be a non-empty string", reason)
    if type(fields["data"]) is not dict:
        raise InvalidRecord("data (the payload) must be a map", reason)
    for opt in ("subject", "dataschema"):
        value = fields.get(opt)
        if opt in fields and (type(value) is not str or not 0 < len(value) <= _MAX_TEXT):
            raise InvalidRecord(f"{opt} must be a string of 1 to {_MAX_TEXT} characters", reason)


def _recipient_x25519(public_key: Any) -> bytes:
    if type(public_key) is not bytes or len(public_key) != 32:
        raise _bad("a recipient is a 32-byte Ed25519 public key")
    try:
        return _ed_to_x(public_key)
    except nacl.exceptions.CryptoError as exc:
        raise _bad(
            f"recipient {node_id(public_key)} is not a usable Ed25519 public key: "
            "check the readers of the feed"
        ) from exc


def _seal_box(content_key: bytes, x_public: bytes, rng: Rng | None) -> bytes:
    """A libsodium sealed box of ``content_key`` to ``x_public``.

    With ``rng`` the box is composed by hand exactly as ``crypto_box_seal`` does it
    (ephemeral key pair, nonce ``BLAKE2b-192(epk || pk)``, ``crypto_box``), so that
    tests can fix the ephemeral secret; ``crypto_box_seal_open`` opens both forms.
    """
    if rng is None:
        return nacl.bindings.crypto_box_seal(content_key, x_public)
    esk = _draw(rng, 32)
    epk = nacl.bindings.crypto_scalarmult_base(esk)
    nonce = hashlib.blake2b(epk + x_public, digest_size=24).digest()
    return epk + nacl.bindings.crypto_box(content_key, nonce, x_public, esk)


def _draw(rng: Rng, n: int) -> bytes:
    out = rng(n)
    if type(out) is not bytes or len(out) != n:
        raise ValueError(f"_rng must return {n} bytes")
    return out


def seal_payload(
    *,
    origin_key: bytes,
    feed: str,
    seq: int,
    type: str,
    data: dict[str, Any],
    subject: str | None,
    dataschema: str | None,
    recipients: Iterable[bytes],
    _rng: Rng | None = None,
    ad_origin: bytes | None = None,
) -> dict[str, Any]:
    """Encrypt a payload for ``recipients`` and return the ``sealed`` body value.

    ``origin_key`` is the publishing node's Ed25519 public key; it is always added to
    the recipients (so a node can read its own feed, e.g. after a restore from its
    partners). ``ad_origin``: the record's ``origin`` when it is not that key (a
    ``cn2`` identity), bound in the associated data. Duplicate recipients are merged.
    The payload is checked with :func:`validate_payload` first, so nothing invalid is
    ever sealed. ``_rng`` is for test vectors only: it is called for the content key
    (32), the nonce (24) and one ephemeral secret (32) per recipient in sorted key order.

    Raises :class:`PayloadError` if ``data`` does not match ``type``, and
    :class:`InvalidRecord` (``bad_field``) for malformed fields or (``bad_sealed``) for
    a malformed recipient key or more than ``MAX_RECIPIENTS`` recipients in all.
    """
    ad = associated_data(origin_key if ad_origin is None else ad_origin, feed, seq)
    inner: dict[str, Any] = {"type": type, "data": data}
    if subject is not None:
        inner["subject"] = subject
    if dataschema is not None:
        inner["dataschema"] = dataschema
    _check_inner(inner, "bad_field")
    validate_payload(type, data)
    plaintext = encoding.encode(inner)

    keys = {origin_key}
    for r in recipients:
        if r.__class__ is not bytes or len(r) != 32:
            raise _bad("a recipient is a 32-byte Ed25519 public key")
        keys.add(r)
    if len(keys) > MAX_RECIPIENTS:
        raise _bad(
            f"{len(keys)} recipients (this node included) is over the limit of "
            f"{MAX_RECIPIENTS}: a restricted feed has at most {MAX_RECIPIENTS - 1} readers"
        )
    ordered = sorted(keys)
    x_keys = [_recipient_x25519(k) for k in ordered]  # fail before drawing randomness

    if _rng is None:
        content_key = nacl.utils.random(CONTENT_KEY_BYTES)
        nonce = nacl.utils.random(NONCE_BYTES)
    else:
        content_key, nonce = _draw(_rng, CONTENT_KEY_BYTES), _draw(_rng, NONCE_BYTES)
    aead_key, commit = _derive(content_key)
    ct = _aead_encrypt(plaintext, ad, nonce, aead_key)
    to = [[k, _seal_box(content_key, x, _rng)] for k, x in zip(ordered, x_keys, strict=True)]
    return {"alg": ALG, "commit": commit, "ct": ct, "nonce": nonce, "to": to}


def check_sealed_shape(sealed: Any, *, origin: bytes | None = None) -> None:
    """Check the structure of a ``sealed`` value, as every relay does (no decryption).

    Checks the fields and their types, ``alg``, the nonce, commitment and sealed-key
    lengths, a ciphertext of at least the 16-byte tag, 1 to ``MAX_RECIPIENTS``
    recipients of 32 bytes sorted strictly ascending (so unique), and, when ``origin``
    is given, that the origin is a recipient. Whether a recipient key is a valid curve
    point is not checked: a bad key only makes its own entry unreadable.

    Raises :class:`InvalidRecord` with reason ``bad_sealed``; nothing else.
    """
    if sealed.__class__ is not dict:
        raise _bad("must be a map")
    keys = sealed.keys()
    if keys != _SEALED_KEYS:
        missing = ", ".join(sorted(_SEALED_KEYS - keys))
        extra = ", ".join(sorted(str(k) for k in keys - _SEALED_KEYS))
        raise _bad(f"fields must be exactly alg, commit, ct, nonce, to (missing: "
                   f"{missing or '-'}; unknown: {extra or '-'})")
    alg = sealed["alg"]
    if alg.__class__ is not str or alg != ALG:
        shown = repr(alg[:40]) if alg.__class__ is str else "a non-string"
        raise _bad(f"unknown algorithm {shown}: this node reads {ALG!r}; upgrade citynode "
                   "if the origin is newer")
    for name, size in (("nonce", NONCE_BYTES), ("commit", 32)):
        value = sealed[name]
        if value.__class__ is not bytes or len(value) != size:
            raise _bad(f"{name} must be {size} bytes of bin")
    ct = sealed["ct"]
    if ct.__class__ is not bytes or len(ct) < TAG_BYTES:
        raise _bad(f"ct must be bin of at least {TAG_BYTES} bytes (the tag)")
    to = sealed["to"]
    if to.__class__ is not list or not 1 <= len(to) <= MAX_RECIPIENTS:
        raise _bad(f"to must be an array of 1 to {MAX_RECIPIENTS} recipients")
    last = b""
    for i, entry in enumerate(to):
        if entry.__class__ is not list or len(entry) != 2:
            raise _bad(f"to[{i}] must be a pair [recipient key, sealed key]")
        key, box = entry
        if key.__class__ is not bytes or len(key) != 32:
            raise _bad(f"to[{i}] recipient key must be 32 bytes of bin")
        if box.__class__ is not bytes or len(box) != SEALED_KEY_BYTES:
            raise _bad(f"to[{i}] sealed key must be {SEALED_KEY_BYTES} bytes of bin")
        if key <= last:
            raise _bad("recipients must be sorted by key, without duplicates")
        last = key
    if origin is not None and not any(entry[0] == origin for entry in to):
        raise _bad("the origin is not among the recipients of its own record")


def recipients_of(sealed: Any) -> tuple[bytes, ...]:
    """The recipients' Ed25519 public keys, in ascending order.
    Raises :class:`InvalidRecord` (``bad_sealed``) if ``sealed`` is malformed."""
    check_sealed_shape(sealed)
    return tuple(entry[0] for entry in sealed["to"])


def is_recipient(sealed: Any, public_key: bytes) -> bool:
    """Whether ``public_key`` is among the recipients of ``sealed``.
    Raises :class:`InvalidRecord` (``bad_sealed``) if ``sealed`` is malformed."""
    return public_key in recipients_of(sealed)


def reader_key(sealed: Any, key: SigningKey) -> SigningKey | None:
    """The key of ``key``'s holder that ``sealed`` is sealed to: ``key`` itself or, for a
    node whose key rotated, a retired key of its identity (``reading_keys``); None if
    the holder is not a recipient. Raises :class:`InvalidRecord` (``bad_sealed``) if
    ``sealed`` is malformed."""
    to = recipients_of(sealed)
    return next((k for k in key.reading_keys() if k.public_key in to), None)


def open_payload(
    sealed: Any,
    *,
    origin: bytes,
    feed: str,
    seq: int,
    key: SigningKey,
    limits: encoding.Limits = encoding.DEFAULT_LIMITS,
    check_payload: bool = True,
    signer: bytes | None = None,
) -> Inner:
    """Decrypt the payload of a sealed record for the node holding ``key``.

    Call it only on a record already verified (:func:`open_record`): the record
    signature is what authenticates the origin; ``origin``, ``feed`` and ``seq`` are the
    record's own, and the ciphertext opens only in that place; ``signer`` is the record's
    signing key when it is not ``origin`` (a ``cn2`` origin). The plaintext is decoded
    strictly within ``limits`` and, if ``check_payload``, validated against its type.

    ``key`` opens the payloads sealed to it or to one of its ``reading_keys`` (a retired
    key of a node that rotated). Raises :class:`AccessDenied` if this node is not a
    recipient;
    :class:`InvalidRecord` (``bad_sealed``) if ``sealed`` is malformed, the sealed key,
    commitment or ciphertext do not check out (altered, moved from another record, or a
    faulty origin), or the plaintext is not a canonical inner map;
    :class:`PayloadError` if the payload does not match its type. Nothing else.
    """
    ad = associated_data(origin, feed, seq)
    check_sealed_shape(sealed, origin=origin if signer is None else signer)
    # The key in force, or a retired one of the same identity (sealed before a rotation).
    mine = reader_key(sealed, key)
    if mine is None:
        raise AccessDenied("this node is not a recipient of the record")
    key = mine
    box = next(entry[1] for entry in sealed["to"] if entry[0] == key.public_key)
    try:
        content_key = nacl.bindings.crypto_box_seal_open(
            box, _ed_to_x(key.public_key), key.x25519_secret()
        )
    except nacl.exceptions.CryptoError as exc:
        raise _bad("the content key sealed to this node does not open: the record "
                   "was altered or its origin is faulty") from exc
    aead_key, commit = _derive(content_key)
    if commit != sealed["commit"]:
        raise _bad("the content key sealed to this node does not match the commitment: "
                   "the origin is faulty or malicious")
    try:
        plaintext = _aead_decrypt(sealed["ct"], ad, sealed["nonce"], aead_key)
    except nacl.exceptions.CryptoError as exc:
        raise _bad("the ciphertext does not decrypt: it was altered, or moved from "
                   "another record") from exc
    try:
        fields = encoding.decode(plaintext, limits)
    except EncodingError as exc:
        raise _bad(f"the decrypted payload is not canonical msgpack: {exc}") from exc
    if fields.__class__ is not dict:
        raise _bad("the decrypted payload is not a map")
    _check_inner(fields, "bad_sealed")
    if check_payload:
        validate_payload(fields["type"], fields["data"])
    return Inner(fields["type"], fields["data"], fields.get("subject"),
                 fields.get("dataschema"))
