"""Node identity and the one place that signs and verifies with Ed25519.

* A node's identity is its Ed25519 public key (32 bytes).
* A **node id** is the printable form: ``cn1`` followed by lowercase RFC 4648 base32
  (no padding) of ``public_key || checksum``, where ``checksum`` is the first 3 bytes of
  ``SHA-256("citynode/node-id/v1" || public_key)``. 59 characters, copy-pasteable,
  and a typo is caught by the checksum.
* Every signature is over ``domain || message`` where ``domain`` is a fixed prefix per
  purpose (records, node cards, HTTP requests, ...), so a signature made for one purpose
  can never be replayed as another.
* A secret key can be sealed with a passphrase (Argon2id + XSalsa20-Poly1305 SecretBox).
  Reading and writing the file is the caller's job; this module only encodes and decodes.
"""

from __future__ import annotations

import base64
import hashlib

import nacl.bindings
import nacl.exceptions
import nacl.pwhash
import nacl.secret
import nacl.signing
import nacl.utils

from citynode.errors import InvalidNodeId, KeyFileError, SignatureError

__all__ = [
    "DOMAIN_CARD",
    "DOMAIN_CHECKPOINT",
    "DOMAIN_RECORD",
    "DOMAIN_REQUEST",
    "DOMAIN_VOUCH",
    "NODE_ID_PREFIX",
    "NodeKey",
    "SigningKey",
    "Verifier",
    "canonical_id",
    "is_identity_id",
    "node_id",
    "parse_node_id",
    "seal_secret_key",
    "unseal_secret_key",
    "verify",
]

NODE_ID_PREFIX = "cn1"
_ID_CHECKSUM_DOMAIN = b"citynode/node-id/v1"
_ID_WHITESPACE = " \t\r\n"  # the only characters tolerated around a node id

DOMAIN_RECORD = b"citynode/record/v1\x00"
DOMAIN_CARD = b"citynode/card/v1\x00"
DOMAIN_REQUEST = b"citynode/request/v1\x00"
DOMAIN_CHECKPOINT = b"citynode/checkpoint/v1\x00"
DOMAIN_VOUCH = b"citynode/vouch/v1\x00"


def _checksum(public_key: bytes) -> bytes:
    return hashlib.sha256(_ID_CHECKSUM_DOMAIN + public_key).digest()[:3]


def node_id(public_key: bytes) -> str:
    """Return the ``cn1`` id of an Ed25519 public key (32 bytes). The bytes alone do not
    say whether they are a key or a ``cn2`` identity ``D``: whoever knows (a key log
    held, a record of body version 3) names an identity with
    :func:`citynode.core.keylog.identity_id`, or asks a
    :class:`citynode.core.keybook.KeyBook`. Raises :class:`InvalidNodeId` for a value
    that is not 32 bytes."""
    if len(public_key) != 32:
        raise InvalidNodeId(f"a public key is 32 bytes, not {len(public_key)}")
    raw = public_key + _checksum(public_key)
    return NODE_ID_PREFIX + base64.b32encode(raw).decode("ascii").lower()


def parse_node_id(text: str) -> bytes:
    """Return the 32 bytes a node id stands for: the public key of a ``cn1`` id, the
    identity ``D`` of a ``cn2`` one (core/keylog.py; the same reading rules).

    Tolerates surrounding ASCII whitespace (space, tab, CR, LF) and upper-case base32
    letters. Raises :class:`InvalidNodeId` (with what is wrong) if the id is malformed
    or its checksum does not match (a typo or a truncated copy), and for any non-ASCII
    character anywhere in ``text``.
    """
    if not isinstance(text, str):
        raise InvalidNodeId("a node id is a string")
    s = text.strip(_ID_WHITESPACE)  # ASCII characters only: no Unicode rule applies
    if s.startswith("cn2"):
        from citynode.core.keylog import parse_identity_id  # keylog imports this module

        return parse_identity_id(s)
    if not s.startswith(NODE_ID_PREFIX):
        raise InvalidNodeId(f"node id {s[:16]!r}... does not start with {NODE_ID_PREFIX!r}"
                            " or 'cn2'")
    # Refused before any case folding: Unicode upper-cases U+0131 to "I" and U+017F to
    # "S" (and str.strip() would drop U+00A0), so two different strings would name one
    # node.
    if not s.isascii():
        raise InvalidNodeId("node id holds a non-ASCII character: copy it again as plain text")
    body = s[len(NODE_ID_PREFIX) :]
    if len(body) != 56:
        raise InvalidNodeId(
            f"node id has {len(s)} characters, expected 59: was it copied whole?"
        )
    try:
        raw = base64.b32decode(body.upper(), casefold=False)
    except (ValueError, base64.binascii.Error) as exc:  # type: ignore[attr-defined]
        raise InvalidNodeId("node id holds characters outside a-z and 2-7") from exc
    key, check = raw[:32], raw[32:]
    if _checksum(key) != check:
        raise InvalidNodeId("node id checksum does not match: check it for a typo")
    return key


class SigningKey:
    """A node's Ed25519 secret key. The only object in citynode that signs."""

    __slots__ = ("_sk", "public_key")

    def __init__(self, seed: bytes) -> None:
        if len(seed) != 32:
            raise KeyFileError(f"a secret key seed is 32 bytes, not {len(seed)}")
        self._sk = nacl.signing.SigningKey(seed)
        self.public_key: bytes = bytes(self._sk.verify_key)

    @classmethod
    def generate(cls) -> SigningKey:
        """A new random key (from the OS CSPRNG via libsodium)."""
        return cls(nacl.utils.random(32))

    @property
    def seed(self) -> bytes:
        """The 32-byte secret seed. Handle with care: whoever has it can sign as us."""
        return bytes(self._sk)

    @property
    def node_id(self) -> str:
        return node_id(self.public_key)

    def sign(self, domain: bytes, message: bytes) -> bytes:
        """Return the 64-byte Ed25519 signature of ``domain || message``."""
        return self._sk.sign(domain + message).signature

    def reading_keys(self) -> tuple[SigningKey, ...]:
        """The keys that open payloads sealed to this key's holder: this one."""
        return (self,)

    def x25519_secret(self) -> bytes:
        """The X25519 secret key derived from this Ed25519 key (for sealed payloads)."""
        return nacl.bindings.crypto_sign_ed25519_sk_to_curve25519(
            self.seed + self.public_key
        )

    def __repr__(self) -> str:  # never print the seed
        return f"SigningKey({self.node_id})"


class NodeKey(SigningKey):
    """The signing key of a node identity: signs with the key in force now
    (``public_key`` is that key) and names the node by ``identity`` and ``node_id``.

    For a ``cn1`` node the identity is the key itself; for a ``cn2`` node it is ``D``
    (core/keylog.py), and :meth:`switch` puts the next key in force on a rotation or a
    recovery, so every holder of this object signs with the new key from then on.
    """

    __slots__ = ("_id", "identity", "log", "retired")

    def __init__(self, seed: bytes, identity: bytes | None = None, name: str | None = None,
                 log: bytes | None = None, retired: tuple[SigningKey, ...] = ()) -> None:
        super().__init__(seed)
        #: The keys this identity signed with before (a rotation or a recovery retired
        #: them): they still open the payloads sealed to them.
        self.retired: tuple[SigningKey, ...] = retired
        self.identity: bytes = self.public_key if identity is None else identity
        if name is None and log is not None:
            from citynode.core.keylog import identity_id  # keylog imports this module

            name = identity_id(self.identity)
        self._id = name if name is not None else node_id(self.identity)
        self.log: bytes | None = log  # the key log's wire bytes (cn2 only)

    @property
    def node_id(self) -> str:
        return self._id

    @property
    def record_identity(self) -> bytes | None:
        """What records name as origin when it is not the signing key (``D``), else None."""
        return None if self.log is None else self.identity

    def reading_keys(self) -> tuple[SigningKey, ...]:
        """The keys that open payloads sealed to this identity: the key in force, then
        the retired ones (records sealed to a reader before it rotated)."""
        return (self, *self.retired)

    def switch(self, seed: bytes, log: bytes) -> None:
        """Sign with ``seed``'s key from now on; ``log`` is the key log that puts it in
        force. The key in force until now joins :attr:`retired`. Raises
        :class:`KeyFileError` for a malformed seed."""
        new = SigningKey(seed)
        old = SigningKey(self.seed)
        self._sk, self.public_key, self.log = new._sk, new.public_key, log
        self.retired = (*self.retired, old)


def is_identity_id(text: str) -> bool:
    """Whether ``text`` (a node id as given, trimmed as :func:`parse_node_id` trims it)
    is a ``cn2`` id: it names an identity, not a key. Checks nothing else."""
    return text.strip(_ID_WHITESPACE).startswith("cn2")


def canonical_id(text: str) -> str:
    """``text`` as a canonical node id (``cn1`` or ``cn2``, lower case, trimmed).
    Raises :class:`InvalidNodeId`."""
    raw = parse_node_id(text)
    if is_identity_id(text):
        from citynode.core.keylog import identity_id

        return identity_id(raw)
    return node_id(raw)


def verify(public_key: bytes, domain: bytes, message: bytes, signature: bytes) -> None:
    """Check an Ed25519 signature over ``domain || message``.

    The rules are libsodium's strict ones (docs/PROTOCOL.md, "Signature"): S < L, a
    canonical key, neither the key nor R one of the 14 small-order encodings, then the
    cofactorless equation with R compared as bytes; no subgroup check.
    Raises :class:`SignatureError` if the key is malformed or the signature fails.
    """
    try:
        nacl.signing.VerifyKey(public_key).verify(domain + message, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, ValueError) as exc:
        raise SignatureError("signature does not verify against the origin key") from exc


_sign_open = nacl.bindings.crypto_sign_open


class Verifier:
    """Verifies Ed25519 signatures with libsodium's ``crypto_sign_open``.

    This is the lowest-overhead verification PyNaCl offers (``VerifyKey.verify`` adds
    Python-level checks and copies around the same call). Kept as a class so a node has
    one place to count verifications.
    """

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0

    def verify(self, public_key: bytes, domain: bytes, message: bytes, signature: bytes) -> None:
        """As :func:`verify`; raises :class:`SignatureError`."""
        self.count += 1
        if len(signature) != 64 or len(public_key) != 32:
            raise SignatureError("signature does not verify against the origin key")
        try:
            _sign_open(signature + domain + message, public_key)
        except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, ValueError) as exc:
            raise SignatureError("signature does not verify against the origin key") from exc


# ---------------------------------------------------------------------------------------
# Secret key files (encoding only; the caller reads and writes the file)

_KEY_HEADER = "citynode-secret-key-v1"


def seal_secret_key(
    seed: bytes,
    passphrase: str | None,
    *,
    opslimit: int = nacl.pwhash.argon2id.OPSLIMIT_MODERATE,
    memlimit: int = nacl.pwhash.argon2id.MEMLIMIT_MODERATE,
) -> bytes:
    """Encode a secret seed as the text of a key file, sealed if a passphrase is given.

    Plain:  ``citynode-secret-key-v1 plain <base64 seed>``
    Sealed: ``citynode-secret-key-v1 argon2id <opslimit> <memlimit> <b64 salt> <b64 box>``
    where ``box`` is a SecretBox (nonce included) of the seed under the Argon2id key.
    """
    b64 = base64.b64encode
    if not passphrase:
        return f"{_KEY_HEADER} plain {b64(seed).decode()}\n".encode()
    salt = nacl.utils.random(nacl.pwhash.argon2id.SALTBYTES)
    key = nacl.pwhash.argon2id.kdf(
        nacl.secret.SecretBox.KEY_SIZE, passphrase.encode(), salt, opslimit, memlimit
    )
    box = nacl.secret.SecretBox(key).encrypt(seed)
    return (
        f"{_KEY_HEADER} argon2id {opslimit} {memlimit} {b64(salt).decode()} "
        f"{b64(bytes(box)).decode()}\n"
    ).encode()


def unseal_secret_key(text: bytes, passphrase: str | None) -> bytes:
    """Decode the text of a key file into the 32-byte seed.

    Raises :class:`KeyFileError` if the file is not a citynode key, is corrupt, needs
    a passphrase that was not given, or the passphrase is wrong.
    """
    try:
        parts = text.decode("ascii").split()
    except UnicodeDecodeError as exc:
        raise KeyFileError("key file is not a citynode secret key") from exc
    if len(parts) < 3 or parts[0] != _KEY_HEADER:
        raise KeyFileError("key file is not a citynode secret key")
    try:
        if parts[1] == "plain" and len(parts) == 3:
            seed = base64.b64decode(parts[2], validate=True)
        elif parts[1] == "argon2id" and len(parts) == 6:
            if not passphrase:
                raise KeyFileError(
                    "the key is protected by a passphrase: set CITYNODE_PASSPHRASE"
                )
            ops, mem = int(parts[2]), int(parts[3])
            if not (1 <= ops <= 64 and 8192 <= mem <= 4 * 1024**3):
                raise KeyFileError("key file has out-of-range Argon2id parameters")
            salt = base64.b64decode(parts[4], validate=True)
            box = base64.b64decode(parts[5], validate=True)
            key = nacl.pwhash.argon2id.kdf(
                nacl.secret.SecretBox.KEY_SIZE, passphrase.encode(), salt, ops, mem
            )
            try:
                seed = nacl.secret.SecretBox(key).decrypt(box)
            except nacl.exceptions.CryptoError as exc:
                raise KeyFileError("wrong passphrase for the key file") from exc
        else:
            raise KeyFileError("key file is not a citynode secret key")
    except (ValueError, nacl.exceptions.ValueError) as exc:
        raise KeyFileError(f"key file is corrupt: {exc}") from exc
    if len(seed) != 32:
        raise KeyFileError("key file is corrupt: the seed is not 32 bytes")
    return seed
