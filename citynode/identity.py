"""The data directory's secret files: node key, operator token, TLS certificate.

Layout (docs/ARCHITECTURE.md)::

    DIR/node.key        Ed25519 secret key (citynode key file, optionally passphrase-sealed), 0600
    DIR/operator.token  bearer token for the operator API, 0600
    DIR/tls/cert.pem    self-signed certificate for the node's host names (public)
    DIR/tls/key.pem     its private key (ECDSA P-256, PKCS#8), 0600

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
from citynode.core.keys import SigningKey, seal_secret_key, unseal_secret_key
from citynode.errors import ConfigError, KeyFileError

__all__ = [
    "PASSPHRASE_ENV",
    "Identity",
    "cert_fingerprint",
    "check_token",
    "create_identity",
    "fingerprint_hex",
    "load_identity",
    "make_tls_certificate",
]

PASSPHRASE_ENV = "CITYNODE_PASSPHRASE"

KEY_FILE = "node.key"
TOKEN_FILE = "operator.token"
TLS_DIR = "tls"
CERT_FILE = "cert.pem"
TLS_KEY_FILE = "key.pem"


@dataclass(frozen=True, slots=True, eq=False)
class Identity:
    """Everything secret or identifying a node loads from its data directory.

    Compared by object (a :class:`SigningKey` has no value equality); compare
    ``node_id`` and ``cert_fingerprint`` instead.
    """

    key: SigningKey
    node_id: str
    token: str = field(repr=False)
    cert_path: Path
    key_path: Path
    cert_fingerprint: bytes  # SHA-256 of the DER certificate; partners pin it
    cert_pem: bytes = field(repr=False)


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
) -> Identity:
    """Create a new node identity in ``dir`` and return it.

    Creates ``dir`` (mode 0700) if needed, a new Ed25519 node key (sealed with
    ``passphrase`` via Argon2id if one is given; ``kdf_*`` tune Argon2id), a random
    operator token and a self-signed TLS certificate for ``name`` and ``hosts``.

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
    key = SigningKey.generate()
    token = secrets.token_urlsafe(32)
    sealed = seal_secret_key(key.seed, passphrase, opslimit=kdf_opslimit,
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
        key = SigningKey(unseal_secret_key(sealed, passphrase))
    except KeyFileError as exc:
        raise KeyFileError(f"{key_file}: {exc}") from exc

    try:
        token = _read(token_file, dir, secret=True).decode("ascii").strip()
    except UnicodeDecodeError as exc:
        raise KeyFileError(f"{token_file} is corrupt: not ASCII text") from exc
    if not token or any(c.isspace() for c in token):
        raise KeyFileError(f"{token_file} is corrupt: expected one token on one line")

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
    return Identity(
        key=key,
        node_id=key.node_id,
        token=token,
        cert_path=cert_path,
        key_path=tls_key_path,
        cert_fingerprint=cert.fingerprint(hashes.SHA256()),
        cert_pem=cert_pem,
    )
