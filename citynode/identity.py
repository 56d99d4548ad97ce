"""The data directory's secret files: node key, operator token, TLS certificate.

Layout (docs/ARCHITECTURE.md)::

    DIR/node.key        Ed25519 secret key in force (citynode key file, optionally
                        passphrase-sealed), 0600
    DIR/node.next.key   the next signing key, committed to by the key log, 0600: needed
                        only to rotate (``citynode key rotate``). By default sealed with
                        the next-key passphrase, which is never stored on this machine
                        (asked at each rotation, or CITYNODE_NEXT_KEY_PASSPHRASE), so a
                        break-in that takes node.key cannot rotate the identity to a key
                        of its own; sealed like node.key only with ``init
                        --next-key-on-disk`` (unattended rotation, at that cost). It is
                        not the recovery passphrase: that one never comes near the node
    DIR/node.retired.key  the signing keys a rotation or a recovery retired, one sealed
                        key per line (same sealing as node.key), 0600: they open
                        restricted records sealed to this node before it rotated
    DIR/keylog          the node's key log (public: its cn2 id is the digest of its
                        inception); a directory without it is a cn1 node (id = key)
    DIR/recovery.key    written by ``citynode init`` only: the recovery key, sealed with
                        the recovery passphrase; the operator moves it OFFLINE
    DIR/recovery.pending  between ``citynode key recover-prepare`` and ``key recover
                        --event``: the new signing key (sealed like node.key), the new
                        next key (sealed like node.next.key) and the request the
                        recovery key signs offline, 0600
    DIR/operator.token  bearer token for the operator API, 0600
    DIR/tls/cert.pem    self-signed certificate for the node's host names (public)
    DIR/tls/key.pem     its private key (ECDSA P-256, PKCS#8), 0600
    DIR/tls/next-cert.pem, DIR/tls/next-key.pem
                        during a TLS renewal (``citynode tls renew``): the certificate
                        the node switches to, named in its card next to the one in force

Secret files are created with mode 0600 from the first instant (``os.open`` with
``O_EXCL``), and :func:`load_identity` refuses any secret file that group or others can
access, telling the operator the exact ``chmod 600`` to run.

The passphrase of a sealed node.key comes from the ``passphrase`` argument or, when that
is None, from the ``CITYNODE_PASSPHRASE`` environment variable (read by
:func:`load_identity` only; :func:`create_identity` seals only with an explicit one).
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import ipaddress
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path

import nacl.pwhash
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from citynode.config import is_dns_name
from citynode.core import keylog
from citynode.core.keys import NodeKey, SigningKey, Verifier, seal_secret_key, unseal_secret_key
from citynode.errors import CitynodeError, ConfigError, KeyFileError

__all__ = [
    "PASSPHRASE_ENV",
    "Identity",
    "cert_fingerprint",
    "check_token",
    "create_identity",
    "fingerprint_hex",
    "load_identity",
    "load_tls",
    "make_tls_certificate",
    "stage_tls_renewal",
    "switch_tls",
]

PASSPHRASE_ENV = "CITYNODE_PASSPHRASE"

KEY_FILE = "node.key"
NEXT_KEY_FILE = "node.next.key"
RETIRED_KEYS_FILE = "node.retired.key"
KEYLOG_FILE = "keylog"
RECOVERY_FILE = "recovery.key"
RECOVERY_PENDING_FILE = "recovery.pending"
TOKEN_FILE = "operator.token"
TLS_DIR = "tls"
CERT_FILE = "cert.pem"
TLS_KEY_FILE = "key.pem"
NEXT_CERT_FILE = "next-cert.pem"
NEXT_TLS_KEY_FILE = "next-key.pem"


@dataclass(frozen=True, slots=True, eq=False)
class Identity:
    """Everything secret or identifying a node loads from its data directory.

    Compared by object (a :class:`SigningKey` has no value equality); compare
    ``node_id`` and ``cert_fingerprint`` instead.
    """

    key: NodeKey  # signs with the key in force; ``key.identity`` is what partners pin
    node_id: str
    token: str = field(repr=False)
    cert_path: Path
    key_path: Path
    cert_fingerprint: bytes  # SHA-256 of the DER certificate; partners pin it
    cert_pem: bytes = field(repr=False)
    recovery_path: Path | None = None  # create_identity only: the file to move offline
    recovery_phrase: str | None = field(default=None, repr=False)  # create_identity only
    recovery_passphrase: str | None = field(default=None, repr=False)  # when generated
    #: create_identity only, when generated: the passphrase node.next.key is sealed with.
    next_passphrase: str | None = field(default=None, repr=False)
    passphrase: str | None = field(default=None, repr=False)  # unseals node.next.key
    #: During a TLS renewal: SHA-256 of the certificate the node switches to.
    next_cert_fingerprint: bytes | None = None

    @property
    def identity(self) -> bytes:
        """The 32 bytes partners pin: ``D`` of a cn2 node, the key of a cn1 one."""
        return self.key.identity


# ---------------------------------------------------------------------------------------
# Small helpers


def cert_fingerprint(der_or_pem: bytes) -> bytes:
    """SHA-256 of a certificate's DER bytes, given the DER or a PEM text.

    A PEM input must hold a certificate (the first one is used); DER input is hashed as
    given. Raises :class:`KeyFileError` if PEM text does not hold a valid certificate.
    """
    if der_or_pem.lstrip().startswith(b"-----BEGIN"):
        try:
            cert = x509.load_pem_x509_certificate(der_or_pem)
        except ValueError as exc:
            raise KeyFileError(f"not a PEM certificate: {exc}") from exc
        der = cert.public_bytes(serialization.Encoding.DER)
    else:
        der = der_or_pem
    return hashlib.sha256(der).digest()


def fingerprint_hex(fp: bytes) -> str:
    """A fingerprint as lowercase hex without colons (how citynode prints and pins it)."""
    return fp.hex()


def check_token(expected: str, given: str | None) -> bool:
    """True if ``given`` equals the operator token ``expected``, in constant time.

    An empty ``expected`` never matches (a missing token must not mean "no password").
    """
    if given is None or not expected:
        return False
    # "replace": a header value that cannot be UTF-8 compares (unequal) instead
    # of raising.
    return hmac.compare_digest(expected.encode("utf-8"),
                               given.encode("utf-8", "replace"))


def make_tls_certificate(name: str, hosts: list[str], *, days: int = 3650) -> tuple[bytes, bytes]:
    """Return ``(cert_pem, key_pem)``: a new ECDSA P-256 key and a self-signed certificate.

    CN is ``name``; SubjectAltName lists every host (IP addresses as iPAddress entries,
    names as dNSName). Valid for ``days`` from one hour ago (tolerates clock skew between
    cities). A leaf certificate (CA=False) for digitalSignature, serverAuth and
    clientAuth. The key PEM is unencrypted PKCS#8: write it with mode 0600.
    Raises :class:`ConfigError` if the name or a host is unusable.
    """
    if not name or len(name.encode("utf-8")) > 64:
        raise ConfigError("node name must be 1-64 bytes of UTF-8 for the TLS certificate, "
                          f"got {len(name.encode('utf-8'))}")
    if not hosts:
        raise ConfigError("the TLS certificate needs at least one host name or IP address")
    if days < 1:
        raise ConfigError(f"certificate validity must be at least 1 day, got {days}")
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not is_dns_name(host):
                raise ConfigError(f"host {host!r} is neither an IP address nor a DNS "
                                  "name") from None
            sans.append(x509.DNSName(host))

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    not_before = datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=1)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                   ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert_pem, key_pem


# ---------------------------------------------------------------------------------------
# Files


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` (which must not exist) with ``mode`` from the first instant, write
    ``data`` and fsync. Raises FileExistsError if it exists."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have removed bits we want (never added any)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace(path: Path, data: bytes, mode: int) -> None:
    """Write ``path`` atomically (new temp file, then rename over any stale leftover)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        _write_new(tmp, data, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dir(path: Path) -> None:
    if not path.exists():
        path.mkdir(mode=0o700, parents=True)
        path.chmod(0o700)  # mkdir's mode is filtered by the umask
    elif not path.is_dir():
        raise KeyFileError(f"{path} exists and is not a directory")


def create_identity(
    dir: Path,
    *,
    name: str,
    hosts: list[str],
    passphrase: str | None = None,
    kdf_opslimit: int = nacl.pwhash.argon2id.OPSLIMIT_MODERATE,
    kdf_memlimit: int = nacl.pwhash.argon2id.MEMLIMIT_MODERATE,
    recovery_passphrase: str | None = None,
    now_ms: int | None = None,
    next_key_on_disk: bool = False,
    next_passphrase: str | None = None,
) -> Identity:
    """Create a new node identity in ``dir`` and return it.

    Creates ``dir`` (mode 0700) if needed, a version 2 (``cn2``) identity: the signing
    key K0, the next key K1 and the recovery key Q0, and the inception that commits to
    K1 and Q0 (docs/PROTOCOL.md, "Key events and witnesses"). K0 is sealed with
    ``passphrase`` via Argon2id if one is given (``kdf_*`` tune Argon2id); K1 is sealed
    with ``next_passphrase`` (never stored on the machine: a stolen node.key cannot
    rotate) or, if None, a random one returned in ``next_passphrase``; with
    ``next_key_on_disk``, K1 is sealed like K0 instead (unattended rotation). Q0 is
    always sealed, with ``recovery_passphrase`` or, if None, a random one returned in
    ``recovery_passphrase`` (with ``recovery_phrase``, the seed for paper) for the
    operator to write down. The two passphrases are separate: the next-key one is
    typed on the node at each rotation, the recovery one only where the recovery
    file is (``citynode key recover-sign``). Then a random operator token and a self-signed TLS
    certificate for ``name`` and ``hosts``. ``now_ms`` dates the inception (default:
    the system clock).

    node.key is written last and never overwritten, so an interrupted run leaves no key
    and can simply be run again (it replaces the token and certificate it left behind).
    Raises :class:`KeyFileError` if ``dir``/node.key already exists or a file cannot be
    written, :class:`ConfigError` if ``name`` or a host cannot go in a certificate.
    """
    key_file = dir / KEY_FILE
    if key_file.exists() or key_file.is_symlink():
        raise KeyFileError(f"{key_file} already exists: this directory already holds a node "
                           "identity (refusing to replace it)")
    cert_pem, tls_key_pem = make_tls_certificate(name, hosts)
    k0, k1, q0 = SigningKey.generate(), SigningKey.generate(), SigningKey.generate()
    t = now_ms if now_ms is not None else int(datetime.datetime.now(datetime.UTC)
                                              .timestamp() * 1000)
    inception = keylog.incept(k0, k1.public_key, q0.public_key, t)
    ident_d = keylog.identity_of(inception.body)
    log = keylog.encode_log([inception])
    generated = None
    if not recovery_passphrase:
        generated = recovery_passphrase = "-".join(secrets.token_hex(3) for _ in range(5))
    recovery = keylog.seal_recovery(q0.seed, ident_d, recovery_passphrase,
                                    opslimit=kdf_opslimit, memlimit=kdf_memlimit)
    generated_next = None
    if next_key_on_disk:
        next_passphrase = passphrase
    elif not next_passphrase:
        generated_next = next_passphrase = "-".join(secrets.token_hex(3) for _ in range(5))
    key = NodeKey(k0.seed, ident_d, keylog.identity_id(ident_d), log)
    token = secrets.token_urlsafe(32)
    sealed = seal_secret_key(key.seed, passphrase, opslimit=kdf_opslimit,
                             memlimit=kdf_memlimit)
    sealed_next = seal_secret_key(k1.seed, next_passphrase, opslimit=kdf_opslimit,
                                  memlimit=kdf_memlimit)
    tls_dir = dir / TLS_DIR
    cert_path, tls_key_path = tls_dir / CERT_FILE, tls_dir / TLS_KEY_FILE
    try:
        _make_dir(dir)
        _make_dir(tls_dir)
        _replace(dir / TOKEN_FILE, (token + "\n").encode("ascii"), 0o600)
        _replace(tls_key_path, tls_key_pem, 0o600)
        _replace(cert_path, cert_pem, 0o644)
        _fsync_dir(tls_dir)
        _replace(dir / RECOVERY_FILE, recovery, 0o600)
        _replace(dir / NEXT_KEY_FILE, sealed_next, 0o600)
        _replace(dir / KEYLOG_FILE, log, 0o644)
        _write_new(key_file, sealed, 0o600)
        _fsync_dir(dir)
    except FileExistsError as exc:
        raise KeyFileError(f"{key_file} already exists: this directory already holds a "
                           "node identity (refusing to replace it)") from exc
    except OSError as exc:
        where = exc.filename or dir
        raise KeyFileError(f"cannot write {where}: {exc.strerror or exc}") from exc
    return Identity(
        key=key,
        node_id=key.node_id,
        token=token,
        cert_path=cert_path,
        key_path=tls_key_path,
        cert_fingerprint=cert_fingerprint(cert_pem),
        cert_pem=cert_pem,
        recovery_path=dir / RECOVERY_FILE,
        recovery_phrase=keylog.recovery_phrase(q0.seed),
        recovery_passphrase=generated,
        next_passphrase=generated_next,
    )


def _read(path: Path, dir: Path, *, secret: bool) -> bytes:
    """Read a data-directory file; a secret one must not be accessible to group/other.

    The mode is checked on the opened descriptor, so the file checked is the one read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise KeyFileError(f"{path} not found: run `citynode init -d {dir}` first") from exc
    except PermissionError as exc:
        raise KeyFileError(f"cannot read {path}: permission denied (run citynode as the "
                           "user that owns the data directory)") from exc
    except OSError as exc:
        raise KeyFileError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"{path} is not a regular file")
        if secret and st.st_mode & 0o077:
            raise KeyFileError(
                f"{path} is accessible by group or others (mode "
                f"{stat.S_IMODE(st.st_mode):04o}): run `chmod 600 {path}`"
            )
        if st.st_size > 1024 * 1024:
            raise KeyFileError(f"{path} is too large to be a citynode key or certificate")
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise KeyFileError(f"cannot read {path}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)


def load_identity(dir: Path | str, passphrase: str | None = None) -> Identity:
    """Load the identity ``create_identity`` wrote in ``dir`` (a path or a string).

    ``passphrase`` unseals node.key; if None, the ``CITYNODE_PASSPHRASE`` environment
    variable is used (if set). Raises :class:`KeyFileError` if a file is missing, a
    secret file is accessible by group or others (the message says which ``chmod 600``
    to run), a file is corrupt, the passphrase is missing or wrong, or the TLS key does
    not belong to the certificate.
    """
    dir = Path(dir)
    if passphrase is None:
        passphrase = os.environ.get(PASSPHRASE_ENV) or None
    key_file = dir / KEY_FILE
    token_file = dir / TOKEN_FILE
    cert_path = dir / TLS_DIR / CERT_FILE
    tls_key_path = dir / TLS_DIR / TLS_KEY_FILE

    sealed = _read(key_file, dir, secret=True)
    try:
        seed = unseal_secret_key(sealed, passphrase)
    except KeyFileError as exc:
        raise KeyFileError(f"{key_file}: {exc}") from exc
    key = _node_key(dir, seed, passphrase)

    try:
        token = _read(token_file, dir, secret=True).decode("ascii").strip()
    except UnicodeDecodeError as exc:
        raise KeyFileError(f"{token_file} is corrupt: not ASCII text") from exc
    if not token or any(c.isspace() for c in token):
        raise KeyFileError(f"{token_file} is corrupt: expected one token on one line")

    fp, cert_pem, next_fp = load_tls(dir)
    return Identity(
        key=key,
        node_id=key.node_id,
        token=token,
        cert_path=cert_path,
        key_path=tls_key_path,
        cert_fingerprint=fp,
        cert_pem=cert_pem,
        passphrase=passphrase,
        next_cert_fingerprint=next_fp,
    )


def load_tls(dir: Path) -> tuple[bytes, bytes, bytes | None]:
    """The TLS certificates of ``dir``: ``(fingerprint, PEM)`` of the one in force and
    the fingerprint of the one a renewal staged (None if none), each checked against
    its key. Finishes a switch cut short. Raises :class:`KeyFileError`."""
    tls_dir = dir / TLS_DIR
    try:
        _finish_tls_switch(dir)
    except OSError as exc:
        raise KeyFileError(f"cannot finish the TLS switch in {tls_dir}: "
                           f"{exc.strerror or exc}") from exc
    cert, cert_pem = _tls_pair(dir, tls_dir / CERT_FILE, tls_dir / TLS_KEY_FILE)
    next_fp = None
    if (tls_dir / NEXT_CERT_FILE).exists():
        nxt = _tls_pair(dir, tls_dir / NEXT_CERT_FILE, tls_dir / NEXT_TLS_KEY_FILE)[0]
        next_fp = nxt.fingerprint(hashes.SHA256())
    return cert.fingerprint(hashes.SHA256()), cert_pem, next_fp


def _tls_pair(dir: Path, cert_path: Path, tls_key_path: Path
              ) -> tuple[x509.Certificate, bytes]:
    """The certificate at ``cert_path`` (parsed, and its file's bytes), checked to be
    the one of the private key at ``tls_key_path``. Raises :class:`KeyFileError`."""
    tls_key_pem = _read(tls_key_path, dir, secret=True)
    cert_pem = _read(cert_path, dir, secret=False)
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise KeyFileError(f"{cert_path} is not a PEM certificate: {exc}") from exc
    try:
        tls_key = serialization.load_pem_private_key(tls_key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(f"{tls_key_path} is not an unencrypted PEM private key") from exc
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if tls_key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise KeyFileError(f"{tls_key_path} is not the key of {cert_path}: restore both "
                           "from the same backup")
    return cert, cert_pem


def stage_tls_renewal(dir: Path, *, days: int = 3650) -> bytes:
    """Write the certificate a TLS renewal switches to (``tls/next-cert.pem`` and its
    key), for the same name and hosts as the one in force, valid ``days``. Returns its
    fingerprint. Until :func:`switch_tls` the node keeps serving the one in force and
    its card names both. Raises :class:`KeyFileError` if one is staged already (switch
    to it first) or a file cannot be read or written."""
    tls_dir = dir / TLS_DIR
    if (tls_dir / NEXT_CERT_FILE).exists():
        raise KeyFileError(f"{tls_dir / NEXT_CERT_FILE} exists: a renewed certificate is "
                           "staged already (switch to it with `citynode tls renew --switch`)")
    cert = _tls_pair(dir, tls_dir / CERT_FILE, tls_dir / TLS_KEY_FILE)[0]
    name = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound as exc:
        raise KeyFileError(f"{tls_dir / CERT_FILE} names no host (no SubjectAltName)") \
            from exc
    hosts = [str(n.value) for n in sans if isinstance(n, x509.IPAddress | x509.DNSName)]
    cert_pem, key_pem = make_tls_certificate(str(name), hosts, days=days)
    try:
        # The key first: a certificate staged without its key would not load.
        _replace(tls_dir / NEXT_TLS_KEY_FILE, key_pem, 0o600)
        _replace(tls_dir / NEXT_CERT_FILE, cert_pem, 0o644)
        _fsync_dir(tls_dir)
    except OSError as exc:
        raise KeyFileError(f"cannot write in {tls_dir}: {exc.strerror or exc}") from exc
    return cert_fingerprint(cert_pem)


def switch_tls(dir: Path) -> bytes:
    """Put the staged certificate (:func:`stage_tls_renewal`) in force: it replaces
    ``tls/cert.pem`` and ``tls/key.pem``. Returns its fingerprint. Crash-safe: the pair
    is renamed key first, and :func:`load_identity` finishes a switch cut short between
    the two. Raises :class:`KeyFileError` if none is staged."""
    tls_dir = dir / TLS_DIR
    if not (tls_dir / NEXT_CERT_FILE).exists():
        raise KeyFileError("no renewed certificate is staged: run `citynode tls renew` "
                           "first, and switch once partners hold the card naming it")
    cert = _tls_pair(dir, tls_dir / NEXT_CERT_FILE, tls_dir / NEXT_TLS_KEY_FILE)[0]
    try:
        os.replace(tls_dir / NEXT_TLS_KEY_FILE, tls_dir / TLS_KEY_FILE)
        os.replace(tls_dir / NEXT_CERT_FILE, tls_dir / CERT_FILE)
        _fsync_dir(tls_dir)
    except OSError as exc:
        raise KeyFileError(f"cannot write in {tls_dir}: {exc.strerror or exc}") from exc
    return cert.fingerprint(hashes.SHA256())


def _finish_tls_switch(dir: Path) -> None:
    """A :func:`switch_tls` stopped after its first rename: the staged key is in force
    while its certificate is still staged. Put the certificate in place too."""
    tls_dir = dir / TLS_DIR
    if (tls_dir / NEXT_CERT_FILE).exists() and not (tls_dir / NEXT_TLS_KEY_FILE).exists():
        os.replace(tls_dir / NEXT_CERT_FILE, tls_dir / CERT_FILE)
        _fsync_dir(tls_dir)


def _node_key(dir: Path, seed: bytes, passphrase: str | None = None) -> NodeKey:
    """The node key of ``dir``: a cn2 one when ``dir`` holds a key log (which must
    verify, and whose key in force must be ``seed``'s), else a cn1 one."""
    path = dir / KEYLOG_FILE
    if not path.exists():
        return NodeKey(seed)
    log = _read(path, dir, secret=False)
    try:
        state = keylog.verify_log(keylog_identity(log), log, verifier=Verifier())
    except CitynodeError as exc:
        raise KeyFileError(f"{path} is not a valid key log: {exc}") from exc
    key = NodeKey(seed, state.identity, state.node_id, log,
                  _retired_keys(dir, state, passphrase))
    if key.public_key != state.key and _finish_key_change(dir, state):
        return _node_key(dir, unseal_secret_key(_read(dir / KEY_FILE, dir, secret=True),
                                                passphrase))
    if key.public_key != state.key:
        raise KeyFileError(f"{dir / KEY_FILE} is not the key in force in {path}: restore "
                           "both from the same backup (or finish `citynode key rotate`)")
    return key


def _retired_keys(dir: Path, state: keylog.KeyState, passphrase: str | None
                  ) -> tuple[SigningKey, ...]:
    """The retired signing keys kept in ``dir`` that the log names, apart from the key
    in force (a crash may leave it there before its rotation is written)."""
    path = dir / RETIRED_KEYS_FILE
    if not path.exists():
        return ()
    named = {w.key for w in state.keys} - {state.key}
    out = []
    for line in _read(path, dir, secret=True).splitlines():
        if not line.strip():
            continue
        try:
            k = SigningKey(unseal_secret_key(line, passphrase))
        except KeyFileError as exc:
            raise KeyFileError(f"{path}: {exc}") from exc
        if k.public_key in named:
            out.append(k)
    return tuple(out)


def keylog_identity(log: bytes) -> bytes:
    """The identity a key log founds: the digest of its first event's body (its
    inception). Only that event is checked here. Raises :class:`InvalidRecord`."""
    first = keylog.open_event(keylog.decode_log(log)[0], verifier=Verifier())
    return keylog.identity_of(first.body)


def save_key_log(dir: Path, log: bytes) -> None:
    """Replace ``dir``/keylog atomically (after a rotation or a recovery)."""
    _replace(dir / KEYLOG_FILE, log, 0o644)
    _fsync_dir(dir)


def replace_secret(dir: Path, name: str, data: bytes) -> None:
    """Replace the secret file ``dir``/``name`` atomically, mode 0600."""
    _replace(dir / name, data, 0o600)
    _fsync_dir(dir)


def read_secret(dir: Path, name: str) -> bytes:
    """Read the secret file ``dir``/``name`` (refused if group or others can read it)."""
    return _read(dir / name, dir, secret=True)


_STAGED = ".staged"  # suffix of a key file written before the key log that needs it


def _finish_key_change(dir: Path, state: keylog.KeyState) -> bool:
    """A rotation or a recovery stopped after its key log was written: the staged key
    files it left (``node.key.staged``, ``node.next.key.staged``) are put in place.
    Returns whether there was one to finish."""
    staged = dir / (KEY_FILE + _STAGED)
    if not staged.exists():
        return False
    for name in (NEXT_KEY_FILE, KEY_FILE):
        src = dir / (name + _STAGED)
        if src.exists():
            os.replace(src, dir / name)
    _fsync_dir(dir)
    return True


def write_key_change(dir: Path, log: bytes, key_seed: bytes, next_seed: bytes | None,
                     passphrase: str | None, retired_seed: bytes | None = None,
                     next_passphrase: str | None = None, *,
                     sealed_next: bytes | None = None, **kdf: int) -> None:
    """Put a key change (rotation or recovery) on disk so that a crash at any point
    leaves a node that starts: the key it retires (``retired_seed``, kept to open what
    was sealed to it) joins node.retired.key, the new signing and next keys are staged,
    then the key log that puts them in force is written, then the staged files replace
    the old ones (:func:`load_identity` finishes that last step if it was cut short).
    ``next_passphrase`` seals the new next key (None: ``passphrase``, as node.key: a
    node whose next key is on disk); ``sealed_next``, when given, is the new next key
    sealed already (a recovery: sealed at ``key recover-prepare``, with a passphrase
    this process never held) and ``next_seed`` is ignored. ``kdf``:
    ``opslimit``/``memlimit`` for sealing. Raises :class:`KeyFileError`."""
    if sealed_next is None:
        if next_seed is None:
            raise KeyFileError("a key change needs the new next key")
        sealed_next = seal_secret_key(next_seed, next_passphrase or passphrase, **kdf)
    try:
        if retired_seed is not None:
            path = dir / RETIRED_KEYS_FILE
            kept = _read(path, dir, secret=True) if path.exists() else b""
            kept += b"\n" if kept and not kept.endswith(b"\n") else b""
            _replace(path, kept + seal_secret_key(retired_seed, passphrase, **kdf), 0o600)
        _replace(dir / (NEXT_KEY_FILE + _STAGED), sealed_next, 0o600)
        _replace(dir / (KEY_FILE + _STAGED), seal_secret_key(key_seed, passphrase, **kdf),
                 0o600)
        _fsync_dir(dir)
        _replace(dir / KEYLOG_FILE, log, 0o644)
        _fsync_dir(dir)
        for name in (NEXT_KEY_FILE, KEY_FILE):
            os.replace(dir / (name + _STAGED), dir / name)
        _fsync_dir(dir)
    except OSError as exc:
        raise KeyFileError(f"cannot write the new keys in {dir}: {exc.strerror or exc}") \
            from exc


def read_next_key(dir: Path, passphrase: str | None) -> SigningKey:
    """The next signing key sealed in ``dir`` (node.next.key). Raises :class:`KeyFileError`."""
    path = dir / NEXT_KEY_FILE
    try:
        return SigningKey(unseal_secret_key(_read(path, dir, secret=True), passphrase))
    except KeyFileError as exc:
        raise KeyFileError(f"{path}: {exc}") from exc


def write_recovery_pending(dir: Path, data: bytes) -> None:
    """Write ``dir``/recovery.pending (``citynode key recover-prepare``), mode 0600."""
    try:
        _replace(dir / RECOVERY_PENDING_FILE, data, 0o600)
        _fsync_dir(dir)
    except OSError as exc:
        raise KeyFileError(f"cannot write {dir / RECOVERY_PENDING_FILE}: "
                           f"{exc.strerror or exc}") from exc


def read_recovery_pending(dir: Path) -> bytes | None:
    """The bytes of ``dir``/recovery.pending, or None when no recovery is prepared.
    Raises :class:`KeyFileError` (unreadable, or group or others can read it)."""
    path = dir / RECOVERY_PENDING_FILE
    if not path.exists():
        return None
    return _read(path, dir, secret=True)


def drop_recovery_pending(dir: Path) -> bool:
    """Remove ``dir``/recovery.pending; whether there was one."""
    try:
        (dir / RECOVERY_PENDING_FILE).unlink()
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise KeyFileError(f"cannot remove {dir / RECOVERY_PENDING_FILE}: "
                           f"{exc.strerror or exc}") from exc
    _fsync_dir(dir)
    return True


def write_new_recovery_file(path: Path, seed: bytes, identity: bytes, passphrase: str,
                            **kdf: int) -> None:
    """Write a new recovery file at ``path`` (the recovery key rotates on use), mode
    0600 from the first instant; never over an existing file (it may be the recovery
    key in force). Raises :class:`KeyFileError`."""
    try:
        _write_new(path, keylog.seal_recovery(seed, identity, passphrase, **kdf), 0o600)
        _fsync_dir(path.parent)
    except FileExistsError as exc:
        raise KeyFileError(f"{path} exists already: move it away first (it may be a "
                           "recovery key in force)") from exc
    except OSError as exc:
        raise KeyFileError(f"cannot write {path}: {exc.strerror or exc}") from exc


def next_key_on_disk(dir: Path) -> bool:
    """Whether node.next.key opens without a passphrase (``init --next-key-on-disk``
    and no node passphrase): then whoever reads the data dir can rotate the identity
    to a key of its own. False when it is sealed, or absent (moved offline)."""
    try:
        return (dir / NEXT_KEY_FILE).read_bytes().split(b" ", 2)[1:2] == [b"plain"]
    except OSError:
        return False
