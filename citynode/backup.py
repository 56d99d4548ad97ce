"""``citynode backup`` and ``citynode restore``: a node's data dir in one verified file.

The file is a tar (stdlib ``tarfile``), members in this order::

    manifest.json    format, node id and name, times, versions, record count, and the
                     size and SHA-256 of every other member; its own ``checksum`` field
                     is the SHA-256 of the rest of it (canonical JSON)
    node.toml        the configuration
    tls/cert.pem     the TLS certificate (public; partners pin its fingerprint)
    secrets.sealed   only with --with-secrets: node.key, operator.token and tls/key.pem,
                     sealed with a passphrase (Argon2id, then a SecretBox: PyNaCl, as a
                     passphrase-sealed node.key is); also names the node id and the
                     backup's creation time, so it cannot be moved into another backup
    citynode.db      the database, copied online with SQLite's backup API
                     (:func:`citynode.storage.backup_database`)

A backup is written to ``FILE.part`` (mode 0600), fsynced and renamed: FILE is whole or
absent. A restore trusts nothing in the file: the manifest comes first and bounds every
member (names from a fixed list, regular files only, exact sizes), every checksum is
checked, the database passes SQLite's quick_check and the node key must be the
manifest's node. All of it happens in a new directory beside the data dir, which is
renamed into place only at the end (the old data dir, with ``replace``, is renamed aside
first, never deleted): a bad file leaves no half-restored data dir.

A restored database is marked (:meth:`Storage.mark_restored`): the node signs nothing on
its own feeds until a partner's good sync round confirms its heads (or it is started
with ``--accept-fork-risk``), so a stale backup never re-signs a seq partners hold.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import datetime
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import stat
import tarfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

import nacl.exceptions
import nacl.pwhash
import nacl.secret
import nacl.utils

from citynode import __version__
from citynode.errors import BackupError, CitynodeError, KeyFileError, StorageError
from citynode.identity import _fsync_dir  # the data dir's one way to fsync a directory
from citynode.runner import LOCK_NAME as _LOCK

__all__ = [
    "PASSPHRASE_ENV",
    "BackupResult",
    "Manifest",
    "RestoreResult",
    "make_backup",
    "restore_backup",
    "verify_backup",
]

#: Where scripts give the passphrase of a backup's secrets.
PASSPHRASE_ENV = "CITYNODE_BACKUP_PASSPHRASE"

FORMAT = "citynode-backup"
FORMAT_VERSION = 1
SECRETS_FORMAT = "citynode-backup-secrets-v1"

MANIFEST = "manifest.json"
CONFIG = "node.toml"
CERT = "tls/cert.pem"
SECRETS = "secrets.sealed"
DB = "citynode.db"
#: The data dir's secret files, as the secrets member names them.
SECRET_FILES = ("node.key", "operator.token", "tls/key.pem")
#: The rest of a cn2 node's key material, with node.key as one unit: the key log (whose
#: key in force node.key must be), the next key and the keys rotations retired (they open
#: restricted records sealed before; a cn1 node has none of them). Never the recovery
#: file: it belongs offline.
KEY_FILES = ("keylog", "node.next.key", "node.retired.key")
_MEMBERS = (CONFIG, CERT, SECRETS, DB)  # after the manifest, in this order

_SMALL_MAX = 1024 * 1024  # manifest, config, certificate, sealed secrets
_DB_MAX = 1 << 40  # 1 TiB: far above any city's database, far below a hostile size field
_CHUNK = 1024 * 1024
_KDF_OPS_MAX = 64
_KDF_MEM_MAX = 1 << 30  # Argon2id memory a backup file may ask of this machine

Progress = Callable[[str, int, int], None]
"""``progress(phase, done, total)``: a backup's phases ``"copying database"`` (pages)
and ``"writing"`` (bytes), a restore's ``"verifying"`` (bytes of the database read)."""


# --------------------------------------------------------------------------- manifest


@dataclass(frozen=True, slots=True)
class Manifest:
    """A backup's manifest, validated (:func:`parse_manifest`)."""

    node_id: str
    node_name: str
    created: str  # ISO 8601, UTC
    created_ms: int
    citynode_version: str
    schema_version: int
    records: int
    secrets: bool
    files: dict[str, tuple[int, str]]  # member name -> (size, sha256 hex)

    def to_json(self) -> dict[str, Any]:
        """The manifest's fields (without ``checksum``)."""
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "node_id": self.node_id, "node_name": self.node_name,
            "created": self.created, "created_ms": self.created_ms,
            "citynode_version": self.citynode_version,
            "schema_version": self.schema_version, "records": self.records,
            "secrets": self.secrets,
            "files": {name: {"size": size, "sha256": digest}
                      for name, (size, digest) in self.files.items()},
        }


def _canonical(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def render_manifest(m: Manifest) -> bytes:
    """The bytes of ``m`` as the manifest member: its fields plus their checksum."""
    body = m.to_json()
    return json.dumps({**body, "checksum": hashlib.sha256(_canonical(body)).hexdigest()},
                      indent=2, sort_keys=True).encode() + b"\n"


def _refusal(what: str, reason: str = "not_a_backup") -> BackupError:
    """A refused backup file (a local error, not one of PROTOCOL.md's reason codes)."""
    return BackupError(what, reason)


def parse_manifest(data: bytes, where: str) -> Manifest:
    """Validate a manifest member. Raises :class:`BackupError` (``not_a_backup``,
    ``newer_format`` or ``checksum``) naming ``where`` (the file)."""
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise _refusal(f"{where}: its manifest is not JSON (damaged?)", "damaged") from exc
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise _refusal(f"{where} is not a citynode backup (no citynode manifest)")
    version = obj.get("format_version")
    if type(version) is not int or version < 1:
        raise _refusal(f"{where}: manifest has no valid format_version", "damaged")
    if version > FORMAT_VERSION:
        raise _refusal(f"{where} is a backup format v{version}, newer than this citynode "
                   f"reads (v{FORMAT_VERSION}): restore it with a newer citynode",
                   "newer_format")
    checksum = obj.pop("checksum", None)
    if not isinstance(checksum, str) or hashlib.sha256(_canonical(obj)).hexdigest() != checksum:
        raise _refusal(f"{where}: the manifest's checksum does not match (the file is "
                   "damaged)", "checksum")
    try:
        files_obj = obj["files"]
        if not isinstance(files_obj, dict) or not set(files_obj) <= set(_MEMBERS):
            raise TypeError("unexpected file names")
        files: dict[str, tuple[int, str]] = {}
        for name, f in files_obj.items():
            size, digest = f["size"], f["sha256"]
            limit = _DB_MAX if name == DB else _SMALL_MAX
            if type(size) is not int or not 0 <= size <= limit:
                raise TypeError(f"size of {name}")
            if not isinstance(digest, str) or len(digest) != 64:
                raise TypeError(f"sha256 of {name}")
            bytes.fromhex(digest)
            files[name] = (size, digest)
        m = Manifest(
            node_id=_str(obj["node_id"]), node_name=_str(obj["node_name"]),
            created=_str(obj["created"]), created_ms=_int(obj["created_ms"]),
            citynode_version=_str(obj["citynode_version"]),
            schema_version=_int(obj["schema_version"]), records=_int(obj["records"]),
            secrets=obj["secrets"] is True, files=files)
    except (KeyError, TypeError, ValueError) as exc:
        raise _refusal(f"{where}: the manifest is malformed ({exc})", "damaged") from exc
    needed = {CONFIG, CERT, DB} | ({SECRETS} if m.secrets else set())
    if set(files) != needed:
        raise _refusal(f"{where}: the manifest lists {sorted(files)}, expected "
                   f"{sorted(needed)}", "damaged")
    return m


def _str(v: object) -> str:
    if not isinstance(v, str) or len(v) > 1000:
        raise TypeError("expected a short string")
    return v


def _int(v: object) -> int:
    if type(v) is not int or v < 0:
        raise TypeError("expected a non-negative integer")
    return v


# --------------------------------------------------------------------------- secrets


def seal_secrets(files: dict[str, bytes], *, node_id: str, created_ms: int, passphrase: str,
                 opslimit: int = nacl.pwhash.argon2id.OPSLIMIT_MODERATE,
                 memlimit: int = nacl.pwhash.argon2id.MEMLIMIT_MODERATE) -> bytes:
    """The secrets member: ``files`` (name -> bytes) sealed with ``passphrase`` under
    an Argon2id key in a SecretBox, bound to the backup's node id and creation time."""
    if not passphrase:
        raise BackupError("the backup passphrase is empty: choose one (secrets are never "
                          "written in clear)", "no_passphrase")
    plain = _canonical({
        "node_id": node_id, "created_ms": created_ms,
        "files": {k: base64.b64encode(v).decode() for k, v in files.items()}})
    salt = nacl.utils.random(nacl.pwhash.argon2id.SALTBYTES)
    key = nacl.pwhash.argon2id.kdf(nacl.secret.SecretBox.KEY_SIZE, passphrase.encode(),
                                   salt, opslimit, memlimit)
    box = nacl.secret.SecretBox(key).encrypt(plain)
    return _canonical({
        "format": SECRETS_FORMAT, "kdf": "argon2id", "opslimit": opslimit,
        "memlimit": memlimit, "salt": base64.b64encode(salt).decode(),
        "box": base64.b64encode(bytes(box)).decode()}) + b"\n"


def open_secrets(data: bytes, m: Manifest, passphrase: str, where: str) -> dict[str, bytes]:
    """The files sealed in a secrets member. Raises :class:`BackupError`:
    ``wrong_passphrase``, ``damaged``, or ``wrong_node`` (sealed for another backup)."""
    try:
        obj = json.loads(data)
        if not isinstance(obj, dict) or obj.get("format") != SECRETS_FORMAT \
                or obj.get("kdf") != "argon2id":
            raise ValueError("not a sealed secrets member")
        ops, mem = obj["opslimit"], obj["memlimit"]
        if type(ops) is not int or type(mem) is not int or not (
                1 <= ops <= _KDF_OPS_MAX and 8192 <= mem <= _KDF_MEM_MAX):
            raise ValueError("Argon2id parameters out of range")
        salt = base64.b64decode(obj["salt"], validate=True)
        box = base64.b64decode(obj["box"], validate=True)
        if len(salt) != nacl.pwhash.argon2id.SALTBYTES:
            raise ValueError("bad salt")
    except (KeyError, TypeError, ValueError, binascii.Error) as exc:
        raise _refusal(f"{where}: the sealed secrets are damaged ({exc})", "damaged") from exc
    key = nacl.pwhash.argon2id.kdf(nacl.secret.SecretBox.KEY_SIZE, passphrase.encode(),
                                   salt, ops, mem)
    try:
        plain = nacl.secret.SecretBox(key).decrypt(box)
    except nacl.exceptions.CryptoError as exc:
        raise _refusal(f"{where}: wrong passphrase for the backup's secrets",
                   "wrong_passphrase") from exc
    try:
        inner = json.loads(plain)
        out = {k: base64.b64decode(v, validate=True) for k, v in inner["files"].items()}
        node, created = inner["node_id"], inner["created_ms"]
    except (KeyError, TypeError, ValueError, AttributeError, binascii.Error) as exc:
        raise _refusal(f"{where}: the sealed secrets are damaged ({exc})", "damaged") from exc
    if node != m.node_id or created != m.created_ms:
        raise _refusal(f"{where}: the sealed secrets belong to another backup (node {node})",
                   "wrong_node")
    if not set(SECRET_FILES) <= set(out) <= set(SECRET_FILES + KEY_FILES) or \
            any(len(v) > _SMALL_MAX for v in out.values()):
        raise _refusal(f"{where}: the sealed secrets do not hold {', '.join(SECRET_FILES)}",
                   "damaged")
    return out


# --------------------------------------------------------------------------- backup


@dataclass(frozen=True, slots=True)
class BackupResult:
    """What :func:`make_backup` wrote."""

    path: Path
    size: int
    seconds: float
    manifest: Manifest


def _header(name: str, size: int, mtime: int) -> bytes:
    """The tar header block(s) of a regular file ``name`` of ``size`` bytes."""
    return _member(name, size, mtime).tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _pad(size: int) -> bytes:
    return b"\0" * (-size % tarfile.BLOCKSIZE)


def _member(name: str, size: int, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.type = size, mtime, 0o600, tarfile.REGTYPE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def make_backup(
    data_dir: Path, file: Path, *, passphrase: str | None = None,
    progress: Progress | None = None,
    kdf_opslimit: int = nacl.pwhash.argon2id.OPSLIMIT_MODERATE,
    kdf_memlimit: int = nacl.pwhash.argon2id.MEMLIMIT_MODERATE,
) -> BackupResult:
    """Back up the node of ``data_dir`` into ``file``, online (the node may run).

    With ``passphrase``, the secret files go in too, sealed with it. The database is
    copied as one snapshot (:func:`citynode.storage.backup_database`) into a temporary
    file beside ``file``; ``file`` is written as ``file.part`` (mode 0600), fsynced and
    renamed. Raises :class:`ConfigError` (no data dir), :class:`KeyFileError` (the node
    key cannot be read: a sealed one needs CITYNODE_PASSPHRASE), :class:`StorageError`
    (the database cannot be read, or the disk is full) or :class:`BackupError`.
    """
    from citynode.config import load_config
    from citynode.identity import load_identity
    from citynode.operator import require_data_dir
    from citynode.storage import backup_database

    started = time.monotonic()
    data_dir, file = Path(data_dir), Path(file)
    require_data_dir(data_dir)
    if not file.parent.is_dir():
        raise BackupError(f"{file.parent} is not a directory: create it, or choose "
                          "another place for the backup", "io")
    cfg = load_config(data_dir / CONFIG)
    if cfg.storage.url:
        # Its records are in PostgreSQL, which city IT backs up with its own tools.
        raise BackupError(
            "this node keeps its records in PostgreSQL ([storage] url): back the database "
            "up with PostgreSQL's tools (pg_dump, or base backups and WAL archiving), and "
            "the data dir's key and certificate as files", "not_sqlite")
    ident = load_identity(data_dir)  # the node id; checks the secret files' modes too
    created_s = time.time()
    created_ms = int(created_s * 1000)
    created = datetime.datetime.fromtimestamp(created_s, datetime.UTC).strftime(
        "%Y-%m-%dT%H:%M:%SZ")
    small = {CONFIG: (data_dir / CONFIG).read_bytes(), CERT: ident.cert_pem}
    if passphrase is not None:
        small[SECRETS] = seal_secrets(
            {name: _read_small(data_dir / name) for name in _secret_files(data_dir)},
            node_id=ident.node_id, created_ms=created_ms, passphrase=passphrase,
            opslimit=kdf_opslimit, memlimit=kdf_memlimit)
    if not (data_dir / DB).exists():  # a node never started: an empty database
        from citynode.storage import Storage

        Storage.open(data_dir / DB).close()
    part = file.with_name(file.name + ".part")
    db_copy = file.with_name(f".{file.name}.{secrets.token_hex(4)}.db")
    try:
        def pages(done: int, total: int) -> None:
            if progress is not None:
                progress("copying database", done, total)

        copy = backup_database(data_dir / DB, db_copy, pages)
        files = {name: (len(b), hashlib.sha256(b).hexdigest()) for name, b in small.items()}
        files[DB] = (copy.size, _UNKNOWN)  # hashed while written: see _write_tar
        manifest = Manifest(
            node_id=ident.node_id, node_name=cfg.node.name, created=created,
            created_ms=created_ms, citynode_version=__version__,
            schema_version=copy.schema_version, records=copy.records,
            secrets=passphrase is not None, files=files)
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), 0o600)
            manifest = _write_tar(out, manifest, small, db_copy, progress)
        os.replace(part, file)
        _fsync_dir(file.parent)
    except BaseException as exc:
        part.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise _os_error(exc, f"writing {part}") from exc
        raise
    finally:
        db_copy.unlink(missing_ok=True)
    return BackupResult(file, file.stat().st_size, time.monotonic() - started, manifest)


_UNKNOWN = "0" * 64
_SYNC_EVERY = 256 * 1024 * 1024  # bytes written between fdatasyncs: no burst at the end


def _write_tar(out: IO[bytes], manifest: Manifest, small: dict[str, bytes], db_copy: Path,
               progress: Progress | None) -> Manifest:
    """Write the backup tar to ``out`` (at its start) and fsync it; returns the manifest
    completed with the database's SHA-256.

    The manifest goes first, but the database's digest is known only once its bytes
    have been read: the manifest is written with a placeholder digest of the same
    length, and overwritten in place at the end (one read of the copy instead of two).
    """
    mtime = manifest.created_ms // 1000
    placeholder = render_manifest(manifest)
    out.write(_header(MANIFEST, len(placeholder), mtime))
    at = out.tell()
    out.write(placeholder + _pad(len(placeholder)))
    for name in _MEMBERS:
        if name in small:
            data = small[name]
            out.write(_header(name, len(data), mtime) + data + _pad(len(data)))
    size = manifest.files[DB][0]
    out.write(_header(DB, size, mtime))
    done = synced = 0
    with open(db_copy, "rb") as src, _Sha256Beside() as h:
        while chunk := src.read(_CHUNK):
            h.update(chunk)
            out.write(chunk)
            done += len(chunk)
            if done - synced >= _SYNC_EVERY:
                out.flush()
                os.fdatasync(out.fileno())
                synced = done
            if progress is not None:
                progress("writing", done, size)
        digest = h.hexdigest()
    if done != size:
        raise BackupError(f"{db_copy} changed while it was written", "damaged")
    end = out.tell() + len(_pad(size)) + 2 * tarfile.BLOCKSIZE
    out.write(_pad(size) + b"\0" * (2 * tarfile.BLOCKSIZE + (-end % tarfile.RECORDSIZE)))
    files = dict(manifest.files)
    files[DB] = (size, digest)
    done_manifest = dataclasses.replace(manifest, files=files)
    final = render_manifest(done_manifest)
    assert len(final) == len(placeholder)  # only hex digits of a fixed length changed
    out.seek(at)
    out.write(final)
    out.flush()
    os.fsync(out.fileno())
    return done_manifest


def _read_small(path: Path) -> bytes:
    with open(path, "rb") as f:
        data = f.read(_SMALL_MAX + 1)
    if len(data) > _SMALL_MAX:
        raise BackupError(f"{path} is too large to be a citynode key or token", "damaged")
    return data


def _os_error(exc: OSError, doing: str) -> CitynodeError:
    import errno

    if exc.errno == errno.ENOSPC:
        from citynode.errors import DiskFull

        return DiskFull(f"disk full while {doing}: free some space and try again")
    return BackupError(f"{exc.strerror or exc} while {doing}", "io")


# --------------------------------------------------------------------------- verify


def _check_member(m: tarfile.TarInfo, where: str) -> None:
    """Refuse a member that is not a plain file with a plain relative name."""
    name = m.name
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise _refusal(f"{where}: member {name!r} has an absolute path: refusing the file",
                   "unsafe_member")
    if ".." in name.replace("\\", "/").split("/"):
        raise _refusal(f"{where}: member {name!r} climbs out of the directory (..): refusing "
                   "the file", "unsafe_member")
    if m.issym() or m.islnk():
        raise _refusal(f"{where}: member {name!r} is a link: refusing the file",
                   "unsafe_member")
    if m.ischr() or m.isblk() or m.isfifo():
        raise _refusal(f"{where}: member {name!r} is a device or a pipe: refusing the file",
                   "unsafe_member")
    if not m.isreg():
        raise _refusal(f"{where}: member {name!r} is not a regular file: refusing the file",
                   "unsafe_member")


def _copy_member(src: IO[bytes], size: int, dest: IO[bytes] | None,
                 progress: Progress | None, where: str, name: str) -> tuple[str, bytes]:
    """Copy a member of ``size`` bytes to ``dest`` (or keep it, if None); return its
    SHA-256 and the bytes kept."""
    kept: list[bytes] = []
    done = 0
    with _Sha256Beside() as h:
        while done < size:
            chunk = src.read(min(_CHUNK, size - done))
            if not chunk:
                raise _refusal(f"{where} is truncated (member {name} ends early): the file "
                               "is incomplete", "truncated")
            h.update(chunk)
            done += len(chunk)
            if dest is None:
                kept.append(chunk)
            else:
                dest.write(chunk)
                if progress is not None:
                    progress("verifying", done, size)
        return h.hexdigest(), b"".join(kept)


class _Sha256Beside:
    """SHA-256 computed in a second thread while the caller reads and writes the same
    chunks: hashlib and file I/O both release the GIL, and the hash costs about as
    much as the copy, so side by side they take about half the time of one after the
    other. Chunks are hashed in the order given (each waits for the one before)."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()
        self._pool = ThreadPoolExecutor(1, "backup-hash")
        self._last: Future[None] | None = None

    def __enter__(self) -> _Sha256Beside:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True)

    def update(self, chunk: bytes) -> None:
        if self._last is not None:
            self._last.result()
        self._last = self._pool.submit(self._h.update, chunk)

    def hexdigest(self) -> str:
        if self._last is not None:
            self._last.result()
            self._last = None
        return self._h.hexdigest()


def _read_into(file: Path, dest: Path, passphrase: Callable[[], str] | None,
               progress: Progress | None) -> tuple[Manifest, dict[str, bytes]]:
    """Read and verify the backup ``file``: its database goes to ``dest/citynode.db``;
    returns the manifest and the small members (the secrets opened, if
    ``passphrase`` is given and the backup has some)."""
    where = str(file)
    try:
        f = open(file, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError as exc:
        raise _refusal(f"{file} not found", "not_found") from exc
    except OSError as exc:
        raise _os_error(exc, f"reading {file}") from exc
    with f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise _refusal(f"{file} is not a regular file")
        bounded = _Bounded(f, where)
        try:
            tar = tarfile.open(fileobj=cast(IO[bytes], bounded),  # noqa: SIM115 - closed
                               mode="r|")  # below
        except tarfile.ReadError as exc:
            raise _refusal(f"{file} is not a citynode backup (not a tar file: {exc})") from exc
        try:
            return _read_members(tar, where, dest, passphrase, progress, bounded)
        except (tarfile.ReadError, tarfile.HeaderError, EOFError) as exc:
            raise _refusal(f"{file} is damaged or truncated ({exc}): the file is incomplete "
                       "or was changed", "truncated") from exc
        except OSError as exc:
            raise _os_error(exc, f"reading {file}") from exc
        finally:
            tar.close()


class _Bounded:
    """The backup file, read by tarfile: refuses to read past a limit (raised once the
    manifest says how much the file holds), so no header of a hostile file (a huge pax
    or long-name header, which tarfile reads whole into memory) costs more than that."""

    #: Before the manifest: its header and itself. After: tar headers (a pax header per
    #: member at most), padding and the end blocks, beyond the members' own bytes.
    SLACK = 64 * 1024

    def __init__(self, f: IO[bytes], where: str) -> None:
        self.f, self.where, self.done = f, where, 0
        self.limit = _SMALL_MAX + self.SLACK

    def read(self, n: int = -1) -> bytes:
        if n < 0 or self.done + n > self.limit + tarfile.RECORDSIZE:
            n = max(0, self.limit + tarfile.RECORDSIZE - self.done)
            if n == 0:
                raise _refusal(f"{self.where} holds more than its manifest lists: refusing "
                           "the file", "unsafe_member")
        data = self.f.read(n)
        self.done += len(data)
        return data


def _read_members(tar: tarfile.TarFile, where: str, dest: Path,
                  passphrase: Callable[[], str] | None, progress: Progress | None,
                  bounded: _Bounded) -> tuple[Manifest, dict[str, bytes]]:
    first = tar.next()
    if first is None:
        raise _refusal(f"{where} is empty or truncated: no manifest", "truncated")
    _check_member(first, where)
    if first.name != MANIFEST or first.size > _SMALL_MAX:
        raise _refusal(f"{where} is not a citynode backup (its first member is not a "
                   "manifest)")
    src = tar.extractfile(first)
    assert src is not None  # a regular file
    _, data = _copy_member(src, first.size, None, None, where, MANIFEST)
    m = parse_manifest(data, where)
    from citynode.storage import SCHEMA_VERSION

    if m.schema_version > SCHEMA_VERSION:
        raise _refusal(f"{where} was made by citynode {m.citynode_version}, with database "
                   f"schema v{m.schema_version}; this citynode reads up to "
                   f"v{SCHEMA_VERSION}: upgrade citynode, then restore", "newer_format")
    bounded.limit = bounded.done + sum(size for size, _ in m.files.values()) \
        + (len(m.files) + 2) * _Bounded.SLACK
    small: dict[str, bytes] = {}
    seen: set[str] = set()
    while (member := tar.next()) is not None:
        _check_member(member, where)
        name = member.name
        if name not in m.files or name in seen:
            raise _refusal(f"{where}: unexpected member {name!r} (not in its manifest, or "
                       "twice): refusing the file", "unsafe_member")
        seen.add(name)
        size, digest = m.files[name]
        if member.size != size:
            raise _refusal(f"{where}: member {name} is {member.size} bytes, its manifest says "
                       f"{size}: the file is damaged", "checksum")
        src = tar.extractfile(member)
        assert src is not None
        if name == DB:
            fd = os.open(dest / DB, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                         0o600)
            with os.fdopen(fd, "wb") as out:
                got, _ = _copy_member(src, size, out, progress, where, name)
                out.flush()
                os.fsync(out.fileno())
        else:
            got, small[name] = _copy_member(src, size, None, None, where, name)
        if got != digest:
            raise _refusal(f"{where}: checksum mismatch in {name}: the file is damaged or "
                       "was changed", "checksum")
        if name == SECRETS and passphrase is not None:
            for k, v in open_secrets(small.pop(SECRETS), m, passphrase(), where).items():
                small[k] = v
    missing = sorted(set(m.files) - seen)
    if missing:
        raise _refusal(f"{where} is truncated: {', '.join(missing)} missing", "truncated")
    return m, small


def verify_backup(file: Path, *, passphrase: Callable[[], str] | None = None) -> Manifest:
    """Check ``file`` without restoring it (every checksum; the secrets open, if
    ``passphrase`` is given). Raises :class:`BackupError`."""
    import tempfile

    with tempfile.TemporaryDirectory(dir=Path(file).parent, prefix=".citynode-verify-") as t:
        m, _ = _read_into(Path(file), Path(t), passphrase, None)
    return m


# --------------------------------------------------------------------------- restore


@dataclass(frozen=True, slots=True)
class RestoreResult:
    """What :func:`restore_backup` did."""

    manifest: Manifest
    data_dir: Path
    moved_aside: Path | None
    secrets_from_dir: bool  # the backup had no secrets: the data dir's own were kept
    #: (uid, gid) owning the restored files: those of the data dir it replaced (or, if
    #: new, of its parent) when restored as root, else the restoring user's.
    owner: tuple[int, int] = (-1, -1)
    #: The owner the files were given to keep the data dir's (None: left as created).
    chowned: tuple[int, int] | None = None


@contextlib.contextmanager
def _not_running(data_dir: Path) -> Iterator[None]:
    """Hold the data dir's run lock (if it has one) for the whole restore."""
    path = data_dir / _LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise BackupError(f"{data_dir} belongs to a running node (pid {pid}): stop it "
                              "first, then restore", "running") from exc
        yield
    finally:
        os.close(fd)


def _secret_files(data_dir: Path) -> tuple[str, ...]:
    """The secret files a backup of ``data_dir`` seals (with a cn2 node's key files)."""
    return SECRET_FILES + tuple(f for f in KEY_FILES if (data_dir / f).exists())


def _own_key_id(data_dir: Path) -> str | None:
    """The node id of ``data_dir``'s node.key (its key log's, for a cn2 node), or None
    if it has none."""
    from citynode.core.keys import SigningKey, unseal_secret_key
    from citynode.identity import PASSPHRASE_ENV as KEY_PASSPHRASE_ENV

    path = data_dir / "node.key"
    if not path.exists():
        return None
    try:
        seed = unseal_secret_key(_read_small(path),
                                 os.environ.get(KEY_PASSPHRASE_ENV) or None)
    except KeyFileError as exc:
        raise KeyFileError(f"{path}: {exc}") from exc
    log_path = data_dir / "keylog"
    if log_path.exists():
        from citynode.core import keylog
        from citynode.identity import keylog_identity

        return keylog.identity_id(keylog_identity(_read_small(log_path)))
    return SigningKey(seed).node_id


def _write(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def restore_backup(
    file: Path, data_dir: Path, *, replace: bool = False,
    passphrase: Callable[[], str] | None = None, progress: Progress | None = None,
    now: Callable[[], float] = time.time,
) -> RestoreResult:
    """Restore the backup ``file`` into ``data_dir`` and mark its database restored.

    ``data_dir`` must not belong to a running node, and must be empty or absent unless
    ``replace`` (its files are then renamed aside to ``DIR.replaced-<UTC time>``, never
    deleted). ``passphrase()`` is asked only if the backup holds secrets. A backup
    without secrets needs ``data_dir`` to hold the node's key already (its node.key,
    operator.token and TLS key and certificate are kept). Everything is verified in a
    new directory beside ``data_dir`` before it is renamed into place. Raises
    :class:`BackupError` (with a reason), :class:`KeyFileError`, :class:`ConfigError`
    or :class:`StorageError`; on any error ``data_dir`` is as it was.
    """
    from citynode.config import load_config
    from citynode.identity import load_identity

    file, data_dir = Path(file), Path(data_dir).absolute()
    if data_dir.exists() and not data_dir.is_dir():
        raise BackupError(f"{data_dir} exists and is not a directory", "not_empty")
    with _not_running(data_dir):
        present = sorted(p.name for p in data_dir.iterdir()) if data_dir.exists() else []
        if [n for n in present if n != _LOCK] and not replace:
            raise BackupError(
                f"{data_dir} is not empty: pass --replace to move its files aside to "
                f"{data_dir.name}.replaced-<time> (nothing is deleted), or restore into "
                "a new directory", "not_empty")
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = data_dir.parent / f".{data_dir.name}.restoring-{secrets.token_hex(4)}"
        tmp.mkdir(mode=0o700)
        tmp.chmod(0o700)
        try:
            def ask() -> str:
                if passphrase is None:
                    raise BackupError(f"{file} holds sealed secrets: a passphrase is "
                                      "needed", "no_passphrase")
                return passphrase()

            m, small = _read_into(file, tmp, ask, progress)
            if not m.secrets:
                own_id = _own_key_id(data_dir)
                if own_id is None:
                    raise BackupError(
                        f"{file} holds no secrets (made without --with-secrets) and "
                        f"{data_dir} holds no node.key: put node {m.node_id}'s node.key "
                        "(with its operator.token and tls/key.pem) in it first, or "
                        "restore a backup made with --with-secrets", "no_key")
                if own_id != m.node_id:
                    raise BackupError(
                        f"{file} is a backup of node {m.node_id}, but {data_dir} holds "
                        f"the key of node {own_id}: refusing to mix two nodes",
                        "wrong_node")
            m_secrets = {k: small[k] for k in SECRET_FILES + KEY_FILES if k in small}
            _write(tmp / CONFIG, small[CONFIG], 0o640)
            if m.secrets:
                cert = small[CERT]
                for name, data in m_secrets.items():
                    _write(tmp / name, data, 0o600)
            else:
                # The secrets stay with the data dir, and its TLS key with its own
                # certificate (the pair partners pin).
                for name in SECRET_FILES + KEY_FILES:
                    if (data_dir / name).exists():
                        _write(tmp / name, _read_small(data_dir / name), 0o600)
                cert_path = data_dir / "tls" / "cert.pem"
                cert = _read_small(cert_path) if cert_path.exists() else small[CERT]
            _write(tmp / CERT, cert, 0o644)
            load_config(tmp / CONFIG)
            try:
                ident = load_identity(tmp)
            except KeyFileError as exc:  # name the data dir, not the temporary one
                raise KeyFileError(str(exc).replace(str(tmp), str(data_dir))) from exc
            if ident.node_id != m.node_id:
                raise BackupError(
                    f"{file}: its node key is node {ident.node_id}, its manifest names "
                    f"{m.node_id}: refusing the file", "wrong_node")
            _restore_db(tmp, m, file)
            chowned = _keep_owner(tmp, data_dir)
            _fsync_dir(tmp / "tls")
            _fsync_dir(tmp)
            aside = _place(tmp, data_dir, present, now)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    st = data_dir.stat()
    return RestoreResult(m, data_dir, aside, not m.secrets, (st.st_uid, st.st_gid), chowned)


def _keep_owner(tmp: Path, data_dir: Path) -> tuple[int, int] | None:
    """Run as root, give every file of ``tmp`` (the restored dir) the owner of the data
    dir it replaces, or of its parent if there is none yet: a restore run with sudo
    into a service user's data dir must leave a dir that user can run (systemd's
    ``User=citynode``), not one owned by root with mode 0700. Returns the (uid, gid)
    given, or None when not root or root owns it already (nothing to change). Symlinks
    are not followed (there are none; a restore writes regular files)."""
    if os.geteuid() != 0:
        return None
    st = (data_dir if data_dir.exists() else data_dir.parent).stat()
    if (st.st_uid, st.st_gid) == (0, 0):
        return None
    for root, dirs, files in os.walk(tmp):
        for name in (*dirs, *files):
            os.chown(Path(root) / name, st.st_uid, st.st_gid, follow_symlinks=False)
    os.chown(tmp, st.st_uid, st.st_gid, follow_symlinks=False)
    return st.st_uid, st.st_gid


def _restore_db(tmp: Path, m: Manifest, file: Path) -> None:
    """Open (migrating an older schema), check and mark the restored database."""
    from citynode.storage import Storage

    try:
        st = Storage.open(tmp / DB)
    except StorageError as exc:
        raise BackupError(f"{file}: its database cannot be used: {exc}", "damaged_db") \
            from exc
    try:
        damage = st.quick_check()
        if damage:
            raise BackupError(f"{file}: the database in it is damaged ({damage[0]})",
                              "damaged_db")
        held = st.count()
        if held != m.records:
            raise BackupError(f"{file}: the database holds {held} records, its manifest "
                              f"says {m.records}: the file is damaged", "checksum")
        st.mark_restored(f"citynode restore of {file}, made at {m.created}").result()
    except StorageError as exc:
        raise BackupError(f"{file}: its database cannot be used: {exc}", "damaged_db") \
            from exc
    finally:
        st.close()


def _place(tmp: Path, data_dir: Path, present: list[str], now: Callable[[], float]
           ) -> Path | None:
    """Rename the verified ``tmp`` to ``data_dir``; the old one (if it holds anything
    but a lock file) aside first. Returns where the old one went."""
    aside: Path | None = None
    if data_dir.exists():
        if [n for n in present if n != _LOCK]:
            stamp = datetime.datetime.fromtimestamp(now(), datetime.UTC).strftime(
                "%Y%m%dT%H%M%SZ")
            aside = data_dir.with_name(f"{data_dir.name}.replaced-{stamp}")
            n = 1
            while aside.exists():
                n += 1
                aside = data_dir.with_name(f"{data_dir.name}.replaced-{stamp}-{n}")
            os.rename(data_dir, aside)
        else:
            (data_dir / _LOCK).unlink(missing_ok=True)
            data_dir.rmdir()
    os.rename(tmp, data_dir)
    _fsync_dir(data_dir.parent)
    return aside
