"""The replica on disk: SQLite schema, migrations, one writer thread, thread-safe reads.

This is the only module of citynode that touches SQLite. It stores records the node has
*already* verified and placed in their chains; it verifies nothing itself, except that it
re-checks, inside the write transaction, that every appended record extends its chain
(defence in depth: the chains on disk are always contiguous from seq 1).

Threads, not coroutines: every method is synchronous. The node runs reads in an executor
(each calling thread gets its own read connection) and awaits writes with
``asyncio.wrap_future``. All writes go through one daemon writer thread that owns the only
write connection. It takes every job queued (up to a bound), runs them in one transaction
-- each job inside its own SAVEPOINT, so a failing job rolls back alone -- commits, and
only then completes each job's :class:`concurrent.futures.Future`. A batch holding a
``durable`` job (the node's own records) commits with ``PRAGMA synchronous=FULL``;
others with ``NORMAL`` (in WAL mode: safe against a crash of the process, not of the
machine). The one exception: a few non-durable appends asked for ``inline`` while the
writer is idle are run the same way on the caller's thread, the writer waiting
meanwhile (:meth:`Storage._run_inline`). No commit checkpoints the WAL: a thread of its
own does, with a connection of its own (:meth:`Storage._start_checkpointer`).

Durable jobs go first: the node's own publishes (acknowledged only once on disk) must not
wait behind partners' batches queued before them (issue 16: a hostile partner's flood).
A durable job overtakes the other jobs waiting, except those writing a chain of its own
origins (a chain is written in the order its heads moved); no job overtakes a durable
one queued before it (so :meth:`Storage.barrier` still waits for everything before it);
and while both kinds wait, batches alternate, so partners' writes are never starved.
Partners' batches are small (about a thousand records a commit), so a durable job that
arrives while one commits waits for that little.

Invariants the schema relies on:

* ``chains`` has one row per (origin, feed) held: a small integer id, the highest
  contiguous seq (``head_seq``) and its id (``head_id``);
* ``records`` of one chain hold seq 1..head without gaps, so ``rowid`` order and seq
  order agree within a feed, and a feed's record count is its head seq;
* ``rowid`` of ``records`` only grows: it is the cursor of pagination and live streams.

Layout (schema v3): a record row names its chain and its type by small integers
(``chains``, ``types``) instead of repeating a 32-byte origin, a feed name and a type
name in the row and in every index; the record id is indexed by its first 8 bytes (the
row holds the whole id, compared after the index search). Readers see the logical
columns through one join (:data:`_ROWS`): ``origin``, ``feed``, ``type``, ``seq``,
``time``, ``lon``, ``lat`` -- the names the record filter's SQL uses.

Payloads (schema v5): ``records.envelope`` holds the record's envelope with its payload
removed (nil: the tombstone, body and signature whole) and ``payloads`` the payload bytes
under the record's rowid, so erasing or pruning a payload is one row deleted and whole
pages are given back (``auto_vacuum = INCREMENTAL``). A reader gets the full envelope
rebuilt (:func:`citynode.core.records.with_payload`). ``erasures`` holds every position
an erasure request named (applied, or waiting for its record); ``records.erased_by``
the erasure request that removed a record's payload (NULL for a pruned one).

Liveness (schema v7): ``liveness`` keeps the newest verified liveness statement of each
(origin, feed) (core/liveness.py), so a restarted node knows every feed's state at once.

Time bounds (schema v12): a record's time does not grow with its seq, so ``records``
keeps running maxima of time -- ``tmax`` over the feed's records up to it in seq order,
``tmax_all`` over every record up to it in rowid order -- and a query with ``since``
starts at the first position whose maximum reaches it (:func:`_migrate_time_bounds`),
not at the start of the feed or table.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sqlite3
import stat
import struct
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeoutError
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import sqlite_utils

from citynode.core.cards import terms_key
from citynode.core.checkpoints import (
    TILE_HEIGHT,
    StoredTree,
    stored_subtree_hash,
    subtrees_completed,
)
from citynode.core.erasure import entry_effect, erasures_in
from citynode.core.filters import ALL_RECORDS, RecordFilter
from citynode.core.keylog import origin_id
from citynode.core.records import (
    SEALED_TYPE,
    Record,
    decode_record,
    encode_record,
    is_tombstone,
    with_payload,
)
from citynode.core.types import ERASURE_FEED, ERASURE_TYPE, point_of
from citynode.errors import (
    ChainError,
    CitynodeError,
    DatabaseCorrupt,
    DiskFull,
    InvalidRecord,
    QueryTooSlow,
    StorageError,
)

log = logging.getLogger("citynode.storage")

__all__ = [
    "APPLICATION_ID",
    "SCHEMA_VERSION",
    "BackupCopy",
    "FeedRow",
    "ForkRow",
    "PartnerRow",
    "RejectedRow",
    "Storage",
    "StoredRow",
    "WriterStats",
    "backup_database",
    "open_storage",
]

T = TypeVar("T")

#: ``PRAGMA application_id`` of a citynode database ("cnod"), so another SQLite file in
#: the data directory is refused with a clear message instead of being "migrated".
APPLICATION_ID = 0x636E6F64

_BUSY_TIMEOUT_MS = 5000
_MAX_BATCH_JOBS = 1000
_MAX_BATCH_WEIGHT = 20000  # records (or other jobs) per transaction
#: ... and at most this many in a batch of the normal lane (partners' writes): a durable
#: job (an own publish, acknowledged only once on disk) that arrives while one commits
#: waits for this much at most, plus one job (a job is never split). A commit of 1,000
#: records takes a few milliseconds; 20,000 held an own publish for a large part of a
#: second (issue 16: a hostile partner's flood). Commits of the normal lane do not
#: fsync (synchronous=NORMAL), so smaller ones cost partners' writes little.
_MAX_NORMAL_BATCH_WEIGHT = 1000
#: A non-durable append of at most this many records may be written on its caller's
#: thread when the writer is idle (Storage.append's ``inline``): a few records take less
#: time to write than the two thread hops of queueing them.
INLINE_MAX_RECORDS = 8
#: ... and at most this many records in all are written inline in one transaction.
INLINE_MAX_BATCH = 128
#: How often, at most, the checkpointer thread copies committed WAL frames into the
#: database file (only after commits: an idle node does nothing).
CHECKPOINT_INTERVAL_S = 0.1
_IN_CHUNK = 500  # at most this many ``?`` in one ``IN (...)``
_IN_BUCKETS = (1, 8, 64, _IN_CHUNK)  # pad IN lists to these sizes: few distinct statements
_ITER_CHUNK = 1000
_NAMES_MAX = 100_000  # chain and type names kept by readers
#: Page size of a new database. Larger pages waste less of each page on the tail of
#: ~400-byte rows (4 KiB: ~6%) but make each scattered row read copy more: at 1M records
#: 8 KiB took 559 bytes a record, 16 KiB 550 and 4 KiB 581, and reads of one feed's
#: rows (scattered among other feeds) were ~15% slower at 16 KiB than at 8 KiB.
_PAGE_SIZE = 8192
_MAX_TEXT = 2000  # rejected-log fields are attacker-influenced: bound them
#: After a write failed for a full disk, the node counts as writable again once this
#: much is free (or a real write lands).
FREE_MARGIN = 2 * 1024 * 1024


# --------------------------------------------------------------------------- rows


@dataclass(frozen=True, slots=True)
class StoredRow:
    """One stored record, as :meth:`Storage.query` returns it."""

    rowid: int
    id: bytes
    origin: bytes
    feed: str
    seq: int
    type: str
    time: int
    lon: float | None
    lat: float | None
    received_at: int
    envelope: bytes  # the full envelope, or the tombstone when the payload is gone
    erased_by: bytes | None = None  # the erasure request that removed the payload
    erased_reason: str | None = None  # the reason it gives

    @property
    def tombstone(self) -> bool:
        """True if the payload is not held (erased, or pruned when ``erased_by`` is
        None)."""
        return is_tombstone(self.envelope)


@dataclass(frozen=True, slots=True)
class FeedRow:
    """One feed held: its head, record count and the time of its head record."""

    origin: bytes
    feed: str
    seq: int  # the head: highest contiguous seq held
    head: bytes  # id of the record at ``seq``
    count: int
    last_time: int  # ``time`` of the head record


@dataclass(frozen=True, slots=True)
class PartnerRow:
    """A partner node, as stored. ``card`` is the partner's signed card, if known."""

    node_id: str
    public_key: bytes
    url: str
    name: str
    tls_fingerprint: bytes | None
    card: bytes | None
    added_at: int


@dataclass(frozen=True, slots=True)
class ForkRow:
    """A stored proof that ``origin`` signed two histories of ``feed`` at ``seq``."""

    id: int
    origin: bytes
    feed: str
    seq: int
    kind: str
    proof: bytes
    found_at: int
    reported_by: str | None


@dataclass(frozen=True, slots=True)
class RejectedRow:
    """One entry of the bounded log of rejected input."""

    id: int
    at: int
    source: str
    reason: str
    detail: str


@dataclass(frozen=True, slots=True)
class WriterStats:
    """Counters of the writer thread since open (for metrics and tests)."""

    batches: int
    durable_batches: int
    jobs: int
    failed_jobs: int
    queued: int


# --------------------------------------------------------------------------- errors


def _tighten_modes(path: Path) -> None:
    """Put the database (and its -wal/-shm) back to 0600 if others may read it: it holds
    partners-only data in clear, and a copy restored from ``sqlite3 .backup`` is 0644.
    Only regular files this user owns (not through a symlink); never raises."""
    from citynode.logs import fields

    loosened: dict[str, str] = {}
    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        try:
            st = os.lstat(p)
            if (stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid()
                    and st.st_mode & 0o077):
                os.chmod(p, 0o600)
                loosened[p.name] = oct(stat.S_IMODE(st.st_mode))
        except OSError:
            continue  # absent (-wal/-shm), or not ours to change: the open goes on
    if loosened:  # one warning: SQLite gives -wal/-shm the database file's mode
        log.warning("database file was readable by others: mode set to 0600",
                    extra=fields(path=str(path), was=", ".join(
                        f"{name} {mode}" for name, mode in loosened.items())))


def _storage_error(exc: BaseException, path: Path, action: str) -> StorageError:
    """Turn a sqlite3/OS error into a one-line :class:`StorageError` an operator can act on."""
    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, sqlite3.Error):
        code = (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF
        if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
            return StorageError(
                f"database {path} is locked while {action}: is another `citynode run` "
                "using this directory?"
            )
        if code == sqlite3.SQLITE_FULL:
            return DiskFull(
                f"disk full while {action} ({path}): free some space and try again"
            )
        if code in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_PERM, sqlite3.SQLITE_CANTOPEN,
                    sqlite3.SQLITE_AUTH):
            return StorageError(
                f"cannot write database {path} while {action} (permission denied or "
                "read-only file system): check the owner and mode of the data directory"
            )
        if code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
            return DatabaseCorrupt(
                f"{path} is corrupt or not a SQLite database: restore it from a backup "
                "or move it away"
            )
        if code == sqlite3.SQLITE_IOERR:
            return StorageError(f"I/O error on {path} while {action}: check the disk ({exc})")
        if isinstance(exc, sqlite3.IntegrityError):
            return StorageError(f"database constraint failed while {action}: {exc}")
        return StorageError(f"database error while {action} ({path}): {exc}")
    if isinstance(exc, PermissionError):
        return StorageError(
            f"cannot open database {path}: permission denied: check the owner and mode "
            "of the data directory"
        )
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc)
        return StorageError(
            f"cannot open database {path}: {reason}: check that the data directory "
            "exists and is writable"
        )
    return StorageError(f"unexpected error while {action} ({path}): {exc!r}")


# --------------------------------------------------------------------------- schema


def _migrate_v1(db: sqlite_utils.Database) -> None:
    """Schema v1. Tables in SQL (their constraints are the contract), indexes via sqlite-utils."""
    db.execute(
        """CREATE TABLE records (
            rowid INTEGER PRIMARY KEY,
            id BLOB NOT NULL UNIQUE,
            origin BLOB NOT NULL,
            feed TEXT NOT NULL,
            seq INTEGER NOT NULL,
            type TEXT NOT NULL,
            time INTEGER NOT NULL,
            lon REAL,
            lat REAL,
            received_at INTEGER NOT NULL,
            envelope BLOB NOT NULL,
            UNIQUE (origin, feed, seq)
        )"""
    )
    db.execute(
        """CREATE TABLE heads (
            origin BLOB NOT NULL,
            feed TEXT NOT NULL,
            seq INTEGER NOT NULL,
            id BLOB NOT NULL,
            PRIMARY KEY (origin, feed)
        ) WITHOUT ROWID"""
    )
    db.execute(
        """CREATE TABLE partners (
            node_id TEXT PRIMARY KEY,
            public_key BLOB NOT NULL UNIQUE,
            url TEXT NOT NULL,
            name TEXT NOT NULL,
            tls_fingerprint BLOB,
            card BLOB,
            added_at INTEGER NOT NULL
        )"""
    )
    db.execute(
        """CREATE TABLE fork_proofs (
            id INTEGER PRIMARY KEY,
            origin BLOB NOT NULL,
            feed TEXT NOT NULL,
            seq INTEGER NOT NULL,
            kind TEXT NOT NULL,
            proof BLOB NOT NULL UNIQUE,
            found_at INTEGER NOT NULL,
            reported_by TEXT
        )"""
    )
    db.execute(
        """CREATE TABLE rejected (
            id INTEGER PRIMARY KEY,
            at INTEGER NOT NULL,
            source TEXT NOT NULL,
            reason TEXT NOT NULL,
            detail TEXT NOT NULL
        )"""
    )
    db.execute(
        """CREATE TABLE checkpoints (
            origin BLOB NOT NULL,
            feed TEXT NOT NULL,
            size INTEGER NOT NULL,
            root BLOB NOT NULL,
            envelope BLOB NOT NULL,
            PRIMARY KEY (origin, feed, size)
        ) WITHOUT ROWID"""
    )
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB) WITHOUT ROWID")
    # (origin, feed, seq) and id are indexed by their UNIQUE constraints.
    records, forks = db.table("records"), db.table("fork_proofs")
    records.create_index(["type", "time"], index_name="records_type_time")
    records.create_index(["time"], index_name="records_time")
    records.create_index(["lon", "lat"], index_name="records_lon_lat")
    forks.create_index(["origin", "feed"], index_name="fork_proofs_feed")


def _migrate_v2(db: sqlite_utils.Database) -> None:
    """Schema v2: the Merkle trees of the feeds live on disk (``merkle``), not in memory.

    One row per complete subtree whose height is a positive multiple of
    :data:`~citynode.core.checkpoints.TILE_HEIGHT` (about one per 255 records); the
    leaves are the record ids already in ``records``. Filled here for the feeds already
    held, then kept by every append in the same transaction.
    """
    db.execute(
        """CREATE TABLE merkle (
            origin BLOB NOT NULL,
            feed TEXT NOT NULL,
            height INTEGER NOT NULL,
            idx INTEGER NOT NULL,
            hash BLOB NOT NULL,
            PRIMARY KEY (origin, feed, height, idx)
        ) WITHOUT ROWID"""
    )
    conn = db.conn
    for origin, feed, seq in conn.execute("SELECT origin, feed, seq FROM heads").fetchall():
        def leaves(lo: int, hi: int, origin: bytes = origin, feed: str = feed
                   ) -> list[bytes]:
            # the records table of v2 (later versions read leaves by chain)
            return [r[0] for r in conn.execute(
                "SELECT id FROM records WHERE origin = ? AND feed = ?"
                " AND seq BETWEEN ? AND ? ORDER BY seq", (origin, feed, lo, hi))]

        _grow_tree(conn, origin, feed, 0, seq, {}, leaves)


_V3_INDEXES = (
    # Chains are contiguous: (chain, seq) is unique, and serves one feed in seq order.
    "CREATE UNIQUE INDEX records_chain_seq ON records (chain, seq)",
    # Ids are random: an index on their first 8 bytes is a third of the size of one on
    # all 32 and as selective; readers compare the whole id in the row it points to.
    "CREATE INDEX records_id8 ON records (substr(id, 1, 8))",
    "CREATE INDEX records_type_time ON records (type_id, time)",
    # No index on time alone (v2 had one): no query chose it -- a time window with the
    # rowid order and LIMIT of every query is planned as a walk by rowid -- and it cost
    # 17 bytes a record.
    # Only located records: a box never matches a record without a location.
    "CREATE INDEX records_lon_lat ON records (lon, lat) WHERE lat IS NOT NULL",
)


def _migrate_v3(db: sqlite_utils.Database) -> None:
    """Schema v3: records name their chain and type by small integers.

    ``chains`` (one row per feed held, replacing ``heads``) and ``types`` are filled
    from the rows held; ``records`` is copied into the new layout in rowid order (the
    cursors of readers stay valid) and its indexes are rebuilt. About 1.4x less disk per
    record than v2 (origin, feed and type no longer repeated in the row and in three
    indexes; the id index keeps 8 bytes of each id instead of 32).
    """
    conn = db.conn
    conn.execute(
        """CREATE TABLE chains (
            id INTEGER PRIMARY KEY,
            origin BLOB NOT NULL,
            feed TEXT NOT NULL,
            head_seq INTEGER NOT NULL,
            head_id BLOB NOT NULL,
            UNIQUE (origin, feed)
        )"""
    )
    conn.execute("CREATE TABLE types (id INTEGER PRIMARY KEY, type TEXT NOT NULL UNIQUE)")
    conn.execute(
        """CREATE TABLE records_v3 (
            rowid INTEGER PRIMARY KEY,
            chain INTEGER NOT NULL REFERENCES chains (id),
            seq INTEGER NOT NULL,
            type_id INTEGER NOT NULL REFERENCES types (id),
            time INTEGER NOT NULL,
            lon REAL,
            lat REAL,
            received_at INTEGER NOT NULL,
            id BLOB NOT NULL,
            envelope BLOB NOT NULL
        )"""
    )
    conn.execute("INSERT INTO chains (origin, feed, head_seq, head_id)"
                 " SELECT origin, feed, seq, id FROM heads ORDER BY origin, feed")
    conn.execute("INSERT INTO types (type) SELECT DISTINCT type FROM records ORDER BY type")
    copied = conn.execute(
        "INSERT INTO records_v3 (rowid, chain, seq, type_id, time, lon, lat, received_at,"
        " id, envelope)"
        " SELECT r.rowid, c.id, r.seq, t.id, r.time, r.lon, r.lat, r.received_at, r.id,"
        " r.envelope FROM records AS r"
        " JOIN chains AS c ON c.origin = r.origin AND c.feed = r.feed"
        " JOIN types AS t ON t.type = r.type ORDER BY r.rowid").rowcount
    held = conn.execute("SELECT count(*) FROM records").fetchone()[0]
    if copied != held:  # a record of a feed without a head: the v2 invariant is broken
        raise StorageError(
            f"cannot migrate: {held - copied} records belong to no feed head; restore "
            "the database from a backup")
    conn.execute("DROP TABLE records")  # and its indexes
    conn.execute("DROP TABLE heads")
    conn.execute("ALTER TABLE records_v3 RENAME TO records")
    for sql in _V3_INDEXES:
        conn.execute(sql)


# --------------------------------------------------------------------------- bridges (v4)
# The bridges' schema and rows (citynode/bridges/); their Storage methods are the
# "bridges (v4)" block at the end of the class.


def _migrate_v4(db: sqlite_utils.Database) -> None:
    """Schema v4: the bridges' message identities and dead letters.

    ``bridge_messages``: one row per message identity a bridge has taken on (SHA-256 of
    bridge, topic and bytes): claimed before its record is published (with the own
    feed's head then), published (with the record id) or dead-lettered. Kept for the
    bridge's ``dedupe_hours``. ``bridge_dead_letters``: messages that could not become a
    record, bounded per bridge (``bridge_counters`` counts those dropped beyond it).
    """
    conn = db.conn
    conn.execute(
        """CREATE TABLE bridge_messages (
            key BLOB PRIMARY KEY,
            bridge TEXT NOT NULL,
            state INTEGER NOT NULL,
            feed TEXT NOT NULL,
            after_seq INTEGER NOT NULL,
            record_id BLOB,
            at INTEGER NOT NULL
        ) WITHOUT ROWID"""
    )
    conn.execute("CREATE INDEX bridge_messages_at ON bridge_messages (at)")
    conn.execute("CREATE INDEX bridge_messages_record ON bridge_messages (record_id)"
                 " WHERE record_id IS NOT NULL")
    conn.execute(
        """CREATE TABLE bridge_dead_letters (
            id INTEGER PRIMARY KEY,
            bridge TEXT NOT NULL,
            at INTEGER NOT NULL,
            topic TEXT NOT NULL,
            reason TEXT NOT NULL,
            detail TEXT NOT NULL,
            size INTEGER NOT NULL,
            excerpt BLOB NOT NULL
        )"""
    )
    conn.execute("CREATE INDEX bridge_dead_letters_bridge ON bridge_dead_letters (bridge, id)")
    conn.execute("CREATE TABLE bridge_counters (bridge TEXT PRIMARY KEY,"
                 " dead_dropped INTEGER NOT NULL)")


#: ``bridge_messages.state``
BRIDGE_CLAIMED, BRIDGE_PUBLISHED, BRIDGE_DEAD = 0, 1, 2
_BRIDGE_PRUNE = 1000  # identities past their age removed per claim (bounded work)


@dataclass(frozen=True, slots=True)
class BridgeMessageRow:
    """A message identity a bridge has taken on (``state``: BRIDGE_*)."""

    key: bytes
    bridge: str
    state: int
    feed: str
    after_seq: int
    record_id: bytes | None
    at: int


@dataclass(frozen=True, slots=True)
class DeadLetterRow:
    """A message a bridge could not make a record of, and why (``reason``: a code)."""

    id: int
    bridge: str
    at: int
    topic: str
    reason: str
    detail: str
    size: int
    excerpt: bytes


def _migrate_v5(db: sqlite_utils.Database) -> None:
    """Schema v5: payloads apart from the signed skeletons (record format 2).

    Every record's payload moves to ``payloads`` (same rowid) and ``records.envelope``
    keeps the tombstone; ``erasures`` and ``records.erased_by`` are new. A database
    holding records of format 1 (never deployed: a development database) is refused:
    they cannot be split, and no version-2 node would accept them.
    """
    conn = db.conn
    conn.execute("CREATE TABLE payloads (rowid INTEGER PRIMARY KEY, payload BLOB NOT NULL)")
    conn.execute(
        """CREATE TABLE erasures (
            id BLOB NOT NULL,
            origin BLOB NOT NULL,
            feed TEXT NOT NULL,
            seq INTEGER NOT NULL,
            by BLOB NOT NULL,
            reason TEXT NOT NULL,
            PRIMARY KEY (id, origin, feed, seq)
        ) WITHOUT ROWID"""
    )
    conn.execute("ALTER TABLE records ADD COLUMN erased_by BLOB")
    last = 0
    while True:
        rows = conn.execute("SELECT rowid, envelope FROM records WHERE rowid > ?"
                            " ORDER BY rowid LIMIT 1000", (last,)).fetchall()
        if not rows:
            return
        for rowid, env in rows:
            if env[:1] != b"\x93":
                raise StorageError(
                    "cannot migrate: the database holds records of format 1, which was "
                    "never deployed; move it away and start from an empty database")
            body, sig, payload = decode_record(env)
            if payload is not None:
                conn.execute("INSERT INTO payloads (rowid, payload) VALUES (?, ?)",
                             (rowid, payload))
                conn.execute("UPDATE records SET envelope = ? WHERE rowid = ?",
                             (encode_record(body, sig, None), rowid))
        last = rows[-1][0]


#: How many signed cards of each node the card history keeps (the newest, by time).
CARD_HISTORY_MAX = 64


def _migrate_card_history(db: sqlite_utils.Database) -> None:
    """Card history (issue 13, terms bound to the data): the last CARD_HISTORY_MAX signed
    cards of each node, verified before they are kept, so the terms in force for a
    record are those of the card with the greatest time at most the record's time."""
    db.conn.execute(
        """CREATE TABLE card_history (
            node BLOB NOT NULL,
            time INTEGER NOT NULL,
            envelope BLOB NOT NULL,
            PRIMARY KEY (node, time)
        ) WITHOUT ROWID"""
    )


def _migrate_liveness(db: sqlite_utils.Database) -> None:
    """Liveness kept across restarts (issue 13): per (origin, feed) the newest verified
    liveness statement (a checkpoint envelope, its size, signed time and root) and
    ``grew_at``, the signed time of the first statement of that size. Plain SQL (no
    SQLite-only clause), so that another backend can mirror it."""
    db.conn.execute(
        """CREATE TABLE liveness (
            origin BLOB NOT NULL,
            feed TEXT NOT NULL,
            size INTEGER NOT NULL,
            time INTEGER NOT NULL,
            root BLOB NOT NULL,
            envelope BLOB NOT NULL,
            grew_at INTEGER NOT NULL,
            PRIMARY KEY (origin, feed)
        )"""
    )


def _migrate_sinks(db: sqlite_utils.Database) -> None:
    """Schema v8, sinks out (issue 15): each ``[[sinks.*]]`` keeps a cursor over
    ``records`` (the rowid of the last record it took on), an outbox of the records it
    has still to deliver, in order per lane (one origin's feed), and its lanes with pending records
    (``next_at``, ms: when the lane's head may be tried again), so that finding what to
    send costs the number of lanes, not of records waiting. ``sink_outbox.state``:
    SINK_PENDING or SINK_DEAD (the receiver refused it for good; kept, bounded). Plain SQL
    (no SQLite-only clause, here and in the sink_* statements), so that another backend
    can mirror it."""
    conn = db.conn
    conn.execute(
        """CREATE TABLE sink_cursors (
            sink TEXT PRIMARY KEY,
            after_rowid INTEGER NOT NULL
        )""")
    conn.execute(
        """CREATE TABLE sink_outbox (
            id INTEGER PRIMARY KEY,
            sink TEXT NOT NULL,
            lane TEXT NOT NULL,
            record_id BLOB NOT NULL,
            record_rowid INTEGER NOT NULL,
            state INTEGER NOT NULL DEFAULT 0,
            attempts INTEGER NOT NULL DEFAULT 0,
            last_error TEXT,
            UNIQUE (sink, record_id)
        )""")
    conn.execute("CREATE INDEX sink_outbox_lanes ON sink_outbox (sink, state, lane, id)")
    conn.execute(
        """CREATE TABLE sink_lanes (
            sink TEXT NOT NULL,
            lane TEXT NOT NULL,
            next_at INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (sink, lane)
        )""")
    conn.execute("CREATE INDEX sink_lanes_due ON sink_lanes (sink, next_at)")


def _migrate_chain_time(db: sqlite_utils.Database) -> None:
    """Schema v9: records by (chain, time), so that a time range inside one feed (the
    reads of ``/v1/records?origin=&feed=&since=&until=``) is one index range, whatever
    the feed's length; (chain, seq) alone made it a walk of the feed up to the range
    (query p99 grew with N). Plain SQL, mirrored by the other backend."""
    db.conn.execute("CREATE INDEX records_chain_time ON records (chain, time)")


def _migrate_cosignatures(db: sqlite_utils.Database) -> None:
    """Schema v10, witness cosignatures (issue 12): per checkpoint held (origin, feed,
    size, root), the verified cosignature envelope of each witness (one per witness;
    the first kept), with its signed time. Stored only when it covers a checkpoint held
    here, so the table is bounded by the checkpoints held times the witnesses known.
    Plain SQL, mirrored by the other backend."""
    db.conn.execute(
        """CREATE TABLE cosignatures (
            origin BLOB NOT NULL,
            feed TEXT NOT NULL,
            size INTEGER NOT NULL,
            root BLOB NOT NULL,
            witness BLOB NOT NULL,
            time INTEGER NOT NULL,
            envelope BLOB NOT NULL,
            PRIMARY KEY (origin, feed, size, root, witness)
        )""")
    db.conn.execute("CREATE INDEX cosignatures_witness ON cosignatures"
                    " (witness, origin, feed, size)")


#: Migration to schema version N, for N = 1, 2, ... Each runs inside the transaction that
#: also sets ``PRAGMA user_version`` to N. Append only; never edit a released one.
def _migrate_type_rowid(db: sqlite_utils.Database) -> None:
    """Schema v11: records by type in rowid order (an SQLite index holds the rowid after
    its columns), so that a page of one type (``/v1/records?type=``, ordered by rowid)
    is one index range stopping at LIMIT. With only (type_id, time) a rare type walked
    the whole table by rowid to fill a page. Plain SQL, mirrored by the other
    backend."""
    db.conn.execute("CREATE INDEX records_type ON records (type_id)")


#: Fills ``records.tmax`` and ``records.tmax_all`` (schema v12) of every row held from the
#: rows' times, in one pass of window functions (both engines run it: plain SQL).
BACKFILL_TIME_BOUNDS = (
    "UPDATE records SET tmax = w.t, tmax_all = w.g FROM (SELECT rowid AS rid,"
    " max(time) OVER (PARTITION BY chain ORDER BY seq) AS t,"
    " max(time) OVER (ORDER BY rowid) AS g FROM records) AS w WHERE records.rowid = w.rid")


def _migrate_time_bounds(db: sqlite_utils.Database) -> None:
    """Schema v12: running maxima of time, so that ``since`` is a lower bound on position.

    A record's time does not grow with its seq (the protocol does not require it: a
    record may carry an old time after newer ones, or a far-ahead one early), so no seq
    can be derived from a time by searching (chain, time). ``tmax`` is the greatest time
    of the feed's records up to this one in seq order (itself included), ``tmax_all``
    the greatest time of every record up to this one in rowid order (the order of
    queries without a feed). Each is monotone in its order, so the first position whose
    maximum is at least ``since`` -- one search of (chain, tmax, seq) or (tmax_all) --
    is a sound start: every record before it has a time below ``since``. A query reads
    on from there with its own ``time >= since`` condition, instead of from the start of
    the feed or table (its cost grew with N: issue 17). Deleting rows (a truncated tail)
    keeps both sound: each stays at least the time of every row held before it. The
    writer sets both on every insert (:func:`_append_job`); a wrong one could hide
    records, so :meth:`Storage.quick_check` (``citynode check``) verifies them. Plain
    SQL, mirrored by the other backend."""
    conn = db.conn
    conn.execute("ALTER TABLE records ADD COLUMN tmax INTEGER")
    conn.execute("ALTER TABLE records ADD COLUMN tmax_all INTEGER")
    conn.execute(BACKFILL_TIME_BOUNDS)
    for sql in _V12_INDEXES:
        conn.execute(sql)


#: Records whose running maxima of time (schema v12) are wrong: missing, below the
#: record's own time, or below the previous record's (in the feed by seq; in the table
#: by rowid). A lower one could hide records from queries with ``since``; higher ones
#: (left by a deleted row) only cost reading. Both engines run it (quick_check).
CHECK_TIME_BOUNDS = (
    "SELECT count(*) FROM (SELECT time, tmax, tmax_all,"
    " lag(tmax) OVER (PARTITION BY chain ORDER BY seq) AS before,"
    " lag(tmax_all) OVER (ORDER BY rowid) AS before_all FROM records) AS x"
    " WHERE tmax IS NULL OR tmax_all IS NULL OR tmax < time OR tmax_all < time"
    " OR tmax < before OR tmax_all < before_all")
#: What :data:`CHECK_TIME_BOUNDS` found, said to the operator.
TIME_BOUNDS_WRONG = (
    "{n} record(s) with a wrong running maximum of time (records.tmax/tmax_all, schema "
    "v12): queries with a time range could miss records; stop every process of the "
    "node and run `citynode storage rebuild-time-bounds` (it sets them again from the "
    "records held), and report it")


#: Schema v12's indexes (SQLite's holds the rowid after its columns).
_V12_INDEXES = ("CREATE INDEX records_chain_tmax ON records (chain, tmax, seq)",
                "CREATE INDEX records_tmax_all ON records (tmax_all)")


MIGRATIONS: dict[int, Callable[[sqlite_utils.Database], None]] = {
    1: _migrate_v1, 2: _migrate_v2, 3: _migrate_v3, 4: _migrate_v4, 5: _migrate_v5,
    6: _migrate_card_history, 7: _migrate_liveness, 8: _migrate_sinks,
    9: _migrate_chain_time, 10: _migrate_cosignatures, 11: _migrate_type_rowid,
    12: _migrate_time_bounds}
SCHEMA_VERSION = max(MIGRATIONS)


# --------------------------------------------------------------------------- helpers


def _bucket(n: int) -> int:
    for b in _IN_BUCKETS:
        if n <= b:
            return b
    return _IN_CHUNK


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_TEXT else text[: _MAX_TEXT - 1] + "…"


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _connect(path: Path, busy_timeout_ms: int) -> sqlite3.Connection:
    # mode=rw: SQLite must never create the file itself (it would not be 0600).
    # isolation_level=None: we issue BEGIN/COMMIT ourselves.
    conn = sqlite3.connect(
        path.resolve().as_uri() + "?mode=rw",
        uri=True,
        isolation_level=None,
        check_same_thread=False,
        timeout=busy_timeout_ms / 1000,
        cached_statements=256,
    )
    try:
        conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        conn.execute("PRAGMA foreign_keys=ON")
    except BaseException:
        conn.close()
        raise
    return conn


# --------------------------------------------------------------------------- jobs


_Job = tuple[Callable[[sqlite3.Connection], Any], "Future[Any]", bool, int]

# The SQL of the jobs and reads below is also run by the PostgreSQL backend
# (citynode/storage_pg.py, which turns ``?`` into its placeholders): keep it to what both
# engines read alike -- RETURNING instead of lastrowid, explicit rowids, ON CONFLICT, IS
# DISTINCT FROM, columns of an upsert qualified by their table.
_INSERT_RECORD = (
    "INSERT INTO records (rowid, chain, seq, type_id, time, lon, lat, received_at, id,"
    " envelope, tmax, tmax_all) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
#: The running maximum of time (schema v12) at a feed's position.
_SELECT_TMAX = "SELECT tmax FROM records WHERE chain = ? AND seq = ?"
#: The last row in rowid order, and the running maximum of time of the table there.
_SELECT_LAST = "SELECT rowid, tmax_all FROM records ORDER BY rowid DESC LIMIT 1"
#: The chain id of ``(origin, feed)`` as a scalar subquery (NULL, matching nothing, for a
#: feed not held): two parameters, origin and feed.
_CHAIN_OF = "(SELECT id FROM chains WHERE origin = ? AND feed = ?)"
_SELECT_CHAIN = "SELECT id, head_seq, head_id FROM chains WHERE origin = ? AND feed = ?"
_INSERT_CHAIN = ("INSERT INTO chains (origin, feed, head_seq, head_id) VALUES (?, ?, 0, ?)"
                 " RETURNING id")
_UPDATE_HEAD = "UPDATE chains SET head_seq = ?, head_id = ? WHERE id = ?"
_SELECT_TYPE = "SELECT id FROM types WHERE type = ?"
_INSERT_TYPE = "INSERT INTO types (type) VALUES (?) RETURNING id"
_SELECT_HEAD = "SELECT head_seq, head_id FROM chains WHERE origin = ? AND feed = ?"
_SELECT_IDS = (f"SELECT id FROM records WHERE chain = {_CHAIN_OF} AND seq BETWEEN ? AND ?"
               " ORDER BY seq")
_SELECT_CHAIN_IDS = "SELECT id FROM records WHERE chain = ? AND seq BETWEEN ? AND ? ORDER BY seq"
#: The id index holds the first 8 bytes of each id (:data:`_V3_INDEXES`): search it,
#: then compare the whole id.
_BY_ID = "substr(id, 1, 8) = ? AND id = ?"
_SELECT_SUBTREES = (
    "SELECT hash FROM merkle WHERE origin = ? AND feed = ? AND height = ?"
    " AND idx BETWEEN ? AND ? ORDER BY idx"
)
_INSERT_SUBTREE = "INSERT INTO merkle (origin, feed, height, idx, hash) VALUES (?, ?, ?, ?, ?)"


def _grow_tree(conn: sqlite3.Connection, origin: bytes, feed: str, old: int, new: int,
               fresh: dict[int, bytes], leaves: Callable[[int, int], list[bytes]]) -> None:
    """Store the subtree hashes of a feed's tree that complete as it grows from ``old``
    to ``new`` records (inside the caller's transaction, after the records are in).
    ``fresh`` maps seq -> id of records of this feed the caller has in hand (saves
    reading them back); ``leaves(lo, hi)`` reads the ids of seqs lo..hi held."""
    made: dict[tuple[int, int], bytes] = {}
    for height, j in subtrees_completed(old, new, TILE_HEIGHT):
        lo, n = j << height, 1 << TILE_HEIGHT
        if height == TILE_HEIGHT:
            children = [fresh.get(s) for s in range(lo + 1, lo + n + 1)]
            if None in children:
                children = list(leaves(lo + 1, lo + n))
        else:
            below = height - TILE_HEIGHT
            first = j << TILE_HEIGHT
            children = [made.get((below, k)) for k in range(first, first + n)]
            if None in children:
                children = [r[0] for r in conn.execute(
                    _SELECT_SUBTREES, (origin, feed, below, first, first + n - 1)).fetchall()]
        h = stored_subtree_hash(height, children, TILE_HEIGHT)  # type: ignore[arg-type]
        made[(height, j)] = h
        conn.execute(_INSERT_SUBTREE, (origin, feed, height, j, h))


_INSERT_PAYLOAD = "INSERT INTO payloads (rowid, payload) VALUES (?, ?)"
_INSERT_ERASURE = ("INSERT INTO erasures (id, origin, feed, seq, by, reason)"
                   " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING")
_SELECT_ERASED = "SELECT by FROM erasures WHERE id = ? AND origin = ? AND feed = ? AND seq = ?"
#: The entries naming a record id (its origin's, or another's: refused on arrival).
_SELECT_NAMING = "SELECT by, origin, feed, seq FROM erasures WHERE id = ?"
_DELETE_NAMING = "DELETE FROM erasures WHERE id = ? AND origin = ? AND feed = ? AND seq = ?"
#: Drop a payload, keep the skeleton: what erasing and pruning do to one row. A tombstone
#: has no location either (filters on payload fields match no tombstone).
_DROP_PAYLOAD = "DELETE FROM payloads WHERE rowid = ?"
_MARK_ERASED = "UPDATE records SET erased_by = ?, lon = NULL, lat = NULL WHERE rowid = ?"


def _erase_row(conn: sqlite3.Connection, rowid: int, by: bytes) -> None:
    conn.execute(_DROP_PAYLOAD, (rowid,))
    conn.execute(_MARK_ERASED, (by, rowid))


def _apply_erasure(conn: sqlite3.Connection, r: Record) -> list[tuple[str, int, str]]:
    """Record the positions erasure request ``r`` names and drop the payloads held
    there whose id matches (:func:`citynode.core.erasure.entry_effect`). Returns the
    entries refused, ``(feed, seq, reason)``: they erase nothing."""
    refused = []
    for e in erasures_in([r]):
        held = conn.execute(f"SELECT rowid, id, erased_by FROM records WHERE chain = "
                            f"{_CHAIN_OF} AND seq = ?", (r.origin, e.feed, e.seq)).fetchone()
        other = conn.execute("SELECT c.origin FROM records AS r JOIN chains AS c ON"
                             " c.id = r.chain WHERE substr(r.id, 1, 8) = ? AND r.id = ?",
                             (e.id[:8], e.id)).fetchone()
        try:
            effect = entry_effect(e, held_at_position=None if held is None else held[1],
                                  origin_of_id=None if other is None else other[0])
        except InvalidRecord as exc:
            refused.append((e.feed, e.seq, exc.reason))
            if exc.reason == "erasure_not_origin":
                continue  # not remembered: it may never erase that record
            effect = "wait"
        conn.execute(_INSERT_ERASURE, (e.id, r.origin, e.feed, e.seq, r.id,
                                       r.data["reason"]))
        if effect == "drop" and held[2] is None:
            _erase_row(conn, held[0], r.id)
    return refused


def _append_job(
    records: tuple[Record, ...], received_at: int
) -> Callable[[sqlite3.Connection], list[tuple[bytes, str, int, str]]]:
    """The write of :meth:`Storage.append`; its result lists the erasure entries
    refused, ``(erasure id, feed, seq, reason)`` (:func:`_apply_erasure`), and those
    of another origin's requests naming a record that arrived (``erasure_not_origin``)."""
    def run(conn: sqlite3.Connection) -> list[tuple[bytes, str, int, str]]:
        # (origin, feed) -> [chain id, head seq, head id]; one lookup per feed per job
        heads: dict[tuple[bytes, str], list[Any]] = {}
        # (origin, feed) -> {seq: id} of this job's records: the new leaves of its tree,
        # gathered in the one pass (not one scan of the job per feed it holds).
        fresh_by_key: dict[tuple[bytes, str], dict[int, bytes]] = {}
        # (origin, feed) -> the feed's running maximum of time at its head (schema v12)
        tmax: dict[tuple[bytes, str], int | None] = {}
        types: dict[str, int] = {}
        rows = []
        for r in records:
            key = (r.origin, r.feed)
            fresh_by_key.setdefault(key, {})[r.seq] = r.id
            head = heads.get(key)
            if head is None:
                row = conn.execute(_SELECT_CHAIN, key).fetchone()
                if row is None:  # a new feed: its row is written before its records
                    made = conn.execute(_INSERT_CHAIN, (*key, b"")).fetchone()
                    row = (made[0], 0, None)
                head = heads[key] = list(row)
                # A feed's records are appended in seq order (the chain check below:
                # each extends the head), so the previous position's row is the head's.
                at_head = (None if head[1] == 0 else
                           conn.execute(_SELECT_TMAX, (head[0], head[1])).fetchone())
                tmax[key] = None if at_head is None else at_head[0]
            if head[1] == 0:
                ok = r.seq == 1 and r.prev is None
            else:
                ok = r.seq == head[1] + 1 and r.prev == head[2]
            if not ok:
                held = "nothing" if head[1] == 0 else f"up to seq {head[1]}"
                raise ChainError(
                    f"record seq {r.seq} of feed {r.feed!r} of "
                    f"{origin_id(r.origin, r.key)} does not extend the chain held "
                    f"({held}): not stored",
                    "bad_chain",
                )
            head[1], head[2] = r.seq, r.id
            type_id = types.get(r.type)
            if type_id is None:
                row = conn.execute(_SELECT_TYPE, (r.type,)).fetchone()
                type_id = types[r.type] = int(
                    row[0] if row is not None
                    else conn.execute(_INSERT_TYPE, (r.type,)).fetchone()[0])
            pt = point_of(r.data)
            lon, lat = (None, None) if pt is None else pt
            before = tmax[key]
            t = tmax[key] = r.time if before is None else max(before, r.time)
            rows.append((head[0], r.seq, type_id, r.time, lon, lat, received_at, r.id,
                         encode_record(r.body, r.sig, None), t))
        # rowids given in order, max + 1 (what SQLite would choose; rows are never
        # deleted): the cursor of pagination and streams. Writers are one at a time
        # (SQLite's write lock, PostgreSQL's advisory lock), so rowids commit in order,
        # and the table's running maximum of time goes on from the last row's.
        last = conn.execute(_SELECT_LAST).fetchone()
        first_rowid = 1 if last is None else int(last[0]) + 1
        top = None if last is None else last[1]
        inserts = []
        for i, row in enumerate(rows):
            top = row[3] if top is None else max(top, row[3])
            inserts.append((first_rowid + i, *row, top))
        conn.executemany(_INSERT_RECORD, inserts)
        conn.executemany(_INSERT_PAYLOAD, [(first_rowid + i, r.payload)
                                           for i, r in enumerate(records)
                                           if r.payload is not None])
        mismatched: list[tuple[bytes, str, int, str]] = []
        if conn.execute("SELECT 1 FROM erasures LIMIT 1").fetchone() is not None:
            # A record named by an erasure request held: its payload goes at once.
            for i, r in enumerate(records):
                # One primary-key search: every entry naming this record's id.
                for by, o, f, q in conn.execute(_SELECT_NAMING, (r.id,)).fetchall():
                    if (o, f, q) == (r.origin, r.feed, r.seq):
                        _erase_row(conn, first_rowid + i, by)
                    elif o != r.origin:
                        # Another origin's request named this record before it
                        # arrived: it erases nothing, and is refused now that it is
                        # known to be foreign (and forgotten: counted once).
                        mismatched.append((by, f, q, "erasure_not_origin"))
                        conn.execute(_DELETE_NAMING, (r.id, o, f, q))
        for r in records:
            if r.type == ERASURE_TYPE and r.feed == ERASURE_FEED and r.payload is not None:
                mismatched += [(r.id, f, q, why) for f, q, why in _apply_erasure(conn, r)]
        conn.executemany(_UPDATE_HEAD, [(h[1], h[2], h[0]) for h in heads.values()])
        # The feeds' Merkle trees grow in the same transaction: a tree on disk always
        # covers exactly the records held.
        for (o, f), (chain, seq, _id) in heads.items():
            fresh = fresh_by_key[(o, f)]
            first = seq - len(fresh) + 1  # a job's records of a feed are consecutive
            if (seq >> TILE_HEIGHT) > ((first - 1) >> TILE_HEIGHT):
                def leaves(lo: int, hi: int, chain: int = chain) -> list[bytes]:
                    return [r[0] for r in conn.execute(_SELECT_CHAIN_IDS, (chain, lo, hi))]

                _grow_tree(conn, o, f, first - 1, seq, fresh, leaves)
        return mismatched

    return run


#: Records with their logical columns: the relation the record filter's conditions
#: (``RecordFilter.sql``) name unqualified -- ``origin``, ``feed`` (of ``chains``),
#: ``type`` (of ``types``), ``seq``, ``time``, ``lon``, ``lat`` (of ``records``): each
#: name belongs to one table only. LEFT JOINs (every record has its chain and type):
#: SQLite leaves out a join whose columns the statement does not use, so rows are not
#: looked up in ``chains``/``types`` one by one unless the filter names them; the
#: reader maps ``chain`` and ``type_id`` to names from a cache (:class:`_Names`).
_ROWS = ("records AS r LEFT JOIN chains AS c ON c.id = r.chain"
         " LEFT JOIN types AS t ON t.id = r.type_id"
         " LEFT JOIN payloads AS p ON p.rowid = r.rowid")
_SELECT_ROW = ("SELECT r.rowid, r.id, r.chain, r.seq, r.type_id, r.time, r.lon, r.lat,"
               f" r.received_at, r.envelope, p.payload, r.erased_by FROM {_ROWS}")
_SELECT_REASON = "SELECT reason FROM erasures WHERE id = ? AND by = ?"
#: A record's envelope as stored: the tombstone and the payload, joined by
#: :func:`with_payload` (the SELECT lists ``r.envelope, p.payload`` from :data:`_ENV_FROM`).
_ENV_FROM = "records AS r LEFT JOIN payloads AS p ON p.rowid = r.rowid"


#: The first position of a feed whose running maximum of time (schema v12) is at least
#: ``since``: no record of the feed before it has a time at or after ``since`` (NULL, so
#: nothing, when no record has). Three parameters: origin, feed, since.
SINCE_SEQ = ("r.seq >= (SELECT b.seq FROM records AS b WHERE b.chain = (SELECT c2.id FROM"
             " chains AS c2 WHERE c2.origin = ? AND c2.feed = ?) AND b.tmax >= ?"
             " ORDER BY b.tmax, b.seq LIMIT 1)")
#: The same in rowid order over the whole table, merged with the cursor into one lower
#: bound of the rowid (SQLite searches its primary key from one of them only: given two,
#: it took the cursor's and filtered the rest). Three parameters: the cursor, twice, and
#: since.
SINCE_ROWID = ("r.rowid > (SELECT CASE WHEN b.rowid - 1 > ? THEN b.rowid - 1 ELSE ? END"
               " FROM records AS b WHERE b.tmax_all >= ? ORDER BY b.tmax_all, b.rowid"
               " LIMIT 1)")


def _since_bound(where: RecordFilter, only_feeds: Sequence[tuple[bytes, str]] | None
                 ) -> str | None:
    """The condition that starts a query with ``since`` at a sound lower bound of its
    order (schema v12, :func:`_migrate_time_bounds`): one feed's seq (the order of a
    query of one feed), or the rowid (the order of every other) for a query that names
    no origin and no feed -- one naming them is served by its chains' indexes, and the
    table-wide bound would say nothing of them. None: no bound added."""
    if where.one_feed:
        return SINCE_SEQ
    if where.origin is None and where.feed is None and only_feeds is None:
        return SINCE_ROWID
    return None


def _query_sql(where: RecordFilter, after_rowid: int, limit: int,
               only_feeds: Sequence[tuple[bytes, str]] | None) -> tuple[str, list[Any]]:
    """The statement of :meth:`Storage.query`. Raises StorageError for a cursor out of
    range."""
    if not (0 <= after_rowid < 2**63):
        raise StorageError("cursor out of range")
    bound = None if where.since_ms is None else _since_bound(where, only_feeds)
    if bound == SINCE_ROWID:
        conds = [SINCE_ROWID]
        params: list[Any] = [after_rowid, after_rowid, where.since_ms]
    else:
        conds = ["r.rowid > ?"]
        params = [after_rowid]
    if only_feeds is not None:
        # each pair is searched in chains' (origin, feed) index, however many chains
        conds.append("r.chain IN (SELECT c.id FROM (VALUES "
                     + ", ".join("(?, ?)" for _ in only_feeds)
                     + ") AS v JOIN chains AS c ON c.origin = v.column1"
                     " AND c.feed = v.column2)")
        for o, f in only_feeds:
            params += [o, f]
    filter_conds, filter_params = where.sql()
    conds += filter_conds
    params += filter_params
    if bound == SINCE_SEQ:
        conds.append(SINCE_SEQ)
        params += [where.origin, where.feed, where.since_ms]
    # Within one feed seq order is rowid order, and ordering by seq lets SQLite walk
    # the (origin, feed, seq) index instead of sorting.
    order = "r.seq" if where.one_feed else "r.rowid"
    params.append(limit)
    return f"{_SELECT_ROW} WHERE {' AND '.join(conds)} ORDER BY {order} LIMIT ?", params


def _sqlite_query_sql(where: RecordFilter, after_rowid: int, limit: int,
                     only_feeds: Sequence[tuple[bytes, str]] | None, *,
                     by_time: bool = False) -> tuple[str, list[Any]]:
    """:func:`_query_sql` as SQLite runs it, its index chosen where SQLite's planner
    guesses wrong:

    * a type with a time range and nothing else is read through (type_id, time), the
      range, then sorted. Its (type_id) index walks the type in rowid order, which serves
      a type alone (stopping at LIMIT), but SQLite took it for a window too, reading
      every record of the type after the cursor to find a narrow window late in the
      table (schema v11);
    * one feed with a time range is walked in seq order through (chain, seq) from the
      bound of :data:`SINCE_SEQ` (schema v12), stopping at LIMIT; or, with ``by_time``
      (fewer records in range than the limit: :meth:`Storage._few_in_range`), read
      through (chain, time) and sorted: a walk would go on to the feed's end looking for
      more. SQLite's own choice did not depend on how many records the range holds."""
    sql, params = _query_sql(where, after_rowid, limit, only_feeds)
    index = None
    if (where.type is not None and (where.since_ms is not None or where.until_ms is not None)
            and where.origin is None and where.feed is None and where.bbox is None
            and only_feeds is None):
        index = "records_type_time"
    elif where.one_feed and (where.since_ms is not None or where.until_ms is not None):
        index = "records_chain_time" if by_time else "records_chain_seq"
    if index is not None:
        table = "FROM records AS r LEFT JOIN"
        if sql.count(table) != 1:
            raise AssertionError("_SELECT_ROW changed: update _sqlite_query_sql")
        sql = sql.replace(table, f"FROM records AS r INDEXED BY {index} LEFT JOIN")
    return sql, params


# --------------------------------------------------------------------------- storage


class Storage:
    """The node's database. Make one with :meth:`open`; finish with :meth:`close`.

    Write methods return a :class:`concurrent.futures.Future` completed after the commit
    (its exception is a :class:`StorageError`, or :class:`ChainError` for an append that
    does not extend its chain). Read methods are synchronous, thread-safe, and raise
    :class:`StorageError`.
    """

    def __init__(
        self, path: Path, wconn: sqlite3.Connection, rejected_log_rows: int, busy_timeout_ms: int
    ) -> None:
        """Internal: use :meth:`open`."""
        self.path = path
        self._wconn = wconn
        self._rejected_rows = max(0, int(rejected_log_rows))
        self._busy_timeout_ms = busy_timeout_ms
        self._lock = threading.Lock()
        # The writer's two lanes, of (submission number, job, origins written): see the
        # module docstring. ``_normal_origins`` counts the origins of the normal lane.
        self._urgent: deque[tuple[int, _Job, frozenset[bytes]]] = deque()
        self._normal: deque[tuple[int, _Job, frozenset[bytes]]] = deque()
        self._normal_origins: Counter[bytes] = Counter()
        self._submitted = 0
        self._last_urgent = False
        self._stopping = False
        self._jobs_ready = threading.Condition(self._lock)
        self._closed = False
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        # Reads under way in other threads: close() waits for them, since closing a
        # connection while another thread uses it crashes the process.
        self._reads = 0
        self._reads_done = threading.Condition(self._lock)
        self._sync_full = False
        # A batch is being written (by the writer thread, or inline by a caller: see
        # :meth:`_run_inline`): the one write connection is in use.
        self._busy = False
        self._inline_jobs = 0
        self._batches = 0
        self._durable_batches = 0
        #: The last write failed for a full disk, and none has committed since.
        self.disk_full = False
        self._jobs = 0
        self._failed_jobs = 0
        self._queued = 0
        self._names = _Names(self)
        # Set when SQLite first reports the file damaged: readiness fails from then on.
        self.corrupt: str | None = None
        # SQLite only (see _start_checkpointer): set by every commit.
        self._committed = threading.Event()
        self._checkpointer: threading.Thread | None = None
        self._checkpointer_stop = False
        self._thread = threading.Thread(
            target=self._writer, name=f"citynode-storage-writer[{path.name}]", daemon=True
        )
        self._thread.start()

    # ------------------------------------------------------------------ open / close

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        rejected_log_rows: int = 10000,
        busy_timeout_ms: int = _BUSY_TIMEOUT_MS,
    ) -> Storage:
        """Open (creating with mode 0600 if missing) and migrate the database at ``path``.

        Sets WAL mode, foreign keys and a busy timeout, then applies every migration the
        file lacks in one transaction. ``rejected_log_rows`` bounds the rejected-input
        log. Raises :class:`StorageError` if the file cannot be created or opened, is not
        a citynode database, has a newer schema than this code, or is locked.
        """
        path = Path(path)
        try:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                pass
            else:
                try:
                    os.fchmod(fd, 0o600)  # exactly 0600, whatever the umask
                finally:
                    os.close(fd)
            if not path.is_file():
                raise StorageError(f"database path {path} is not a regular file")
        except OSError as exc:
            raise _storage_error(exc, path, "creating the database") from exc
        conn: sqlite3.Connection | None = None
        try:
            conn = _connect(path, busy_timeout_ms)
            # before WAL: leave a file that is not ours untouched
            rewrite = 0 < _check_file(conn, path) < _COMPACTED_AT <= SCHEMA_VERSION
            _tighten_modes(path)
            if conn.execute("PRAGMA page_count").fetchone()[0] == 0:
                # A new file: fixed before WAL mode (which cannot change it). Pages freed
                # by pruned and erased payloads go back to the file system on reclaim().
                conn.execute(f"PRAGMA page_size={_PAGE_SIZE}")
                conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
            if rewrite:
                # A migration that rewrites every record runs in a rollback journal: in
                # WAL mode its transaction would grow a WAL as large as the database,
                # and SQLite then frees the old table's pages in memory (~800 MB at 1M
                # records). _compact puts the file in WAL mode after.
                conn.execute("PRAGMA journal_mode=DELETE")
            else:
                _wal(conn, path)
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA temp_store=MEMORY")
            # The writer's page cache: 8 MiB. It fills up to its size as the database
            # grows and is never given back, so it sets how far RSS climbs under a long
            # flood: with 32 MiB, RSS rose 41% from minute 1 to minute 10 of 100 clients
            # publishing one record each; with 8 MiB, 9.5%. Publishing 1M records keeps
            # its rate (scripts/bench-storage: 1.53x the rate at 0, RSS 115 MB at 1M).
            conn.execute("PRAGMA cache_size=-8192")
            # An erased payload's bytes are overwritten, not left in a free page.
            conn.execute("PRAGMA secure_delete=ON")
            _migrate(conn, path)
            if rewrite:
                _compact(conn, path)
            _note_file_identity(conn, path)
            # No commit of the writer checkpoints (see _start_checkpointer).
            conn.execute("PRAGMA wal_autocheckpoint=0")
        except BaseException as exc:
            if conn is not None:
                conn.close()
            if isinstance(exc, CitynodeError):
                raise
            if isinstance(exc, sqlite3.Error | OSError):
                raise _storage_error(exc, path, "opening the database") from exc
            raise
        st = cls(path, conn, rejected_log_rows, busy_timeout_ms)
        st._start_checkpointer()
        return st

    def _start_checkpointer(self) -> None:
        """Copy the WAL's committed frames into the database file from a thread (and a
        connection) of its own, at most every :data:`CHECKPOINT_INTERVAL_S` while
        commits happen.

        Why: SQLite's automatic checkpoint runs inside the commit that fills the WAL past
        1000 pages, and a record written alone dirties about 8 (8 KiB) pages: every
        ~120th live record's commit also copied the WAL to the file and fsynced it
        (milliseconds: the tail of every write, and on the event loop for an inline
        one). A PASSIVE checkpoint from another connection runs alongside the writer in
        WAL mode and never blocks it; what it copies was committed already, so the
        durability of every commit is unchanged (a crash keeps the WAL, which SQLite
        replays)."""
        conn = _connect(self.path, self._busy_timeout_ms)
        conn.execute("PRAGMA synchronous=NORMAL")

        def run() -> None:
            try:
                while True:
                    self._committed.wait()
                    time.sleep(CHECKPOINT_INTERVAL_S)  # gather the commits of a while
                    self._committed.clear()
                    if self._checkpointer_stop:
                        return
                    try:
                        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    except sqlite3.Error as exc:  # busy, a full disk: next time
                        log.debug("checkpoint not done: %s", exc)
            finally:
                conn.close()

        self._checkpointer = threading.Thread(
            target=run, name=f"citynode-storage-checkpointer[{self.path.name}]", daemon=True)
        self._checkpointer.start()

    def _error(self, exc: BaseException, action: str, *, log_it: bool = True
               ) -> StorageError:
        """:func:`_storage_error`, noting a damaged file (once, in the log too unless the
        caller reports it): a node whose database is corrupt must say so in its
        readiness, not only per request."""
        err = self._translate(exc, action)
        if isinstance(err, DatabaseCorrupt) and self.corrupt is None:
            self.corrupt = str(err)
            if log_it:
                from citynode.logs import fields

                log.error("database corrupt", extra=fields(error=str(err)))
        return err

    def _translate(self, exc: BaseException, action: str) -> StorageError:
        """The engine's error as ours (:func:`_storage_error`)."""
        return _storage_error(exc, self.path, action)

    def quick_check(self, max_errors: int = 20) -> list[str]:
        """SQLite's ``PRAGMA quick_check``: the damage it finds in the file's structure
        (pages, b-trees, records), at most ``max_errors`` lines; empty if none. Reads
        the whole file. A whole file's records are then checked for their running
        maxima of time (:data:`CHECK_TIME_BOUNDS`: a wrong one could hide records).
        Damage that stops the check is a finding too. Raises
        :class:`StorageError` if it cannot run for another reason (storage closed, I/O)."""
        with self._reading() as conn:
            try:
                rows = conn.execute(f"PRAGMA quick_check({int(max_errors)})").fetchall()
            except sqlite3.Error as exc:
                err = self._error(exc, "checking the database", log_it=False)
                if not isinstance(err, DatabaseCorrupt):
                    raise err from exc
                # Damage that stops the check itself (a page it cannot even parse).
                rows = [(f"the check itself stopped: {exc}",)]
        # A row may hold several lines, under a "*** in database main ***" heading.
        lines = [ln.strip() for r in rows for ln in str(r[0]).splitlines()
                 if ln.strip() and not ln.startswith("***")][:max_errors]
        if lines == ["ok"]:
            # The file is whole: the rows the writer keeps consistent are checked too.
            (n,) = self._one(CHECK_TIME_BOUNDS)
            return [TIME_BOUNDS_WRONG.format(n=n)] if n else []
        if self.corrupt is None:
            self.corrupt = (f"{self.path} is damaged ({lines[0]}): restore it from a "
                            "backup or move it away")
        return lines

    def close(self) -> None:
        """Finish every write already submitted, stop the writer, close all connections.

        Idempotent. Writes submitted after ``close`` began raise :class:`StorageError`.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._stopping = True  # the writer finishes what is queued, then exits
            self._jobs_ready.notify()
        self._thread.join()
        if self._checkpointer is not None:
            self._checkpointer_stop = True
            self._committed.set()
            self._checkpointer.join()
        with self._lock:
            self._reads_done.wait_for(lambda: self._reads == 0, timeout=60)
            readers, self._readers = self._readers, []
        for c in readers:
            c.close()
        with contextlib.suppress(sqlite3.Error):  # only a hint for the query planner
            self._wconn.execute("PRAGMA optimize")
        self._wconn.close()  # the last connection: SQLite checkpoints and removes the WAL

    # ------------------------------------------------------------------ processes

    #: Several node processes may share this database (PostgreSQL); SQLite: one (the
    #: data dir's run lock).
    shared = False

    def lead(self) -> bool:
        """Does this process hold the leadership of the processes sharing the database
        (it alone signs own records, plans syncs, makes checkpoints)? Blocking: call it
        in a thread, again and again (it also keeps the leadership held). SQLite: one
        process, always the leader."""
        return True

    def listen(self, callback: Callable[[int], None]) -> None:
        """Call ``callback(max rowid)`` when another process sharing the database
        commits records. SQLite: no other process writes, so never."""

    def __enter__(self) -> Storage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ writer

    def _submit(
        self, fn: Callable[[sqlite3.Connection], T], *, durable: bool = False, weight: int = 1,
        origins: frozenset[bytes] = frozenset(),
    ) -> Future[T]:
        """Queue a write job; ``origins``: those whose chains it writes (a durable job
        does not overtake a waiting job writing one of them)."""
        fut: Future[T] = Future()
        with self._lock:
            if self._closed:
                raise StorageError("storage is closed: the node is shutting down")
            self._queued += 1
            self._submitted += 1
            entry = (self._submitted, (fn, fut, durable, max(1, weight)), origins)
            if durable and not any(o in self._normal_origins for o in origins):
                self._urgent.append(entry)
            else:
                self._normal.append(entry)
                self._normal_origins.update(origins)
            self._jobs_ready.notify()
        return fut

    def _next_batch(self) -> list[_Job] | None:
        """Wait for jobs and take the next batch (None: closed and nothing is left).
        Durable jobs first; a normal batch holds only jobs queued before every durable
        job waiting, at most :data:`_MAX_NORMAL_BATCH_WEIGHT` (or one heavier job), and
        follows a durable batch when both wait (none starves)."""
        with self._jobs_ready:
            # Not while a caller writes inline (the one connection is in use).
            self._jobs_ready.wait_for(lambda: not self._busy and bool(
                self._urgent or self._normal or self._stopping))
            if not self._urgent and not self._normal:
                return None
            urgent = bool(self._urgent) and (not self._normal or not self._last_urgent
                                             or self._normal[0][0] > self._urgent[0][0])
            lane = self._urgent if urgent else self._normal
            before = self._urgent[0][0] if self._urgent and not urgent else None
            batch: list[_Job] = []
            weight = 0
            cap = _MAX_BATCH_WEIGHT if urgent else _MAX_NORMAL_BATCH_WEIGHT
            while lane and len(batch) < _MAX_BATCH_JOBS and weight < cap:
                if batch and weight + lane[0][1][3] > cap:
                    break  # (a job heavier than the rest of the cap goes next, alone)
                n, job, origins = lane[0]
                if before is not None and n > before:
                    break
                lane.popleft()
                batch.append(job)
                weight += job[3]
                if not urgent:
                    self._normal_origins.subtract(origins)
                    for o in origins:
                        if self._normal_origins[o] <= 0:
                            del self._normal_origins[o]
            self._last_urgent = urgent
            self._queued -= len(batch)
            self._busy = True
            return batch

    def _writer(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                break
            try:
                self._run_guarded(batch)
            finally:
                with self._lock:
                    self._busy = False

    def _run_guarded(self, batch: list[_Job]) -> None:
        """Run ``batch``; whatever happens, no job's future is left open (a caller
        waiting forever is worse than any error)."""
        try:
            self._run_batch(batch)
        except BaseException as exc:
            err = self._error(exc, "writing")
            for _fn, fut, _d, _w in batch:
                if not fut.done():
                    fut.set_exception(err)

    def _run_inline(self, jobs: list[tuple[Callable[[sqlite3.Connection], Any], int]]
                    ) -> list[Future[Any]] | None:
        """Run small non-durable write jobs ``(job, weight)`` on the calling thread, now,
        in one transaction (each in its savepoint, as the writer does), if the writer
        is idle (nothing queued, no batch under way); None if it is not (the caller
        queues the jobs). Returns the jobs' completed futures.

        Why: a partner pushing live sends one record per request. Queued, its write
        cost two thread hops (wake the writer; wake the event loop with the result),
        each a scheduler wake-up and a GIL hand-over: on a loaded 2-core machine they
        took longer than the write (scripts/bench-ingest --batch 1: 260 us from submit
        to the writer starting, mean). The job is the same, in a transaction of its
        own, committed before the future completes: the order of writes and their
        durability (synchronous=NORMAL: only durable jobs, which fsync, never run
        here) are unchanged. Only this engine's own writer runs inline: another
        engine's (PostgreSQL) writes are network round trips."""
        if type(self)._run_batch is not Storage._run_batch:
            return None
        with self._lock:
            if self._busy or self._closed or self._urgent or self._normal:
                return None
            self._busy = True
            self._submitted += len(jobs)
            self._inline_jobs += len(jobs)
        batch: list[_Job] = [(fn, Future(), False, weight) for fn, weight in jobs]
        try:
            self._run_guarded(batch)
        finally:
            with self._lock:
                self._busy = False
                if self._urgent or self._normal:  # queued meanwhile by other threads
                    self._jobs_ready.notify()
        return [j[1] for j in batch]

    def _run_batch(self, batch: list[_Job]) -> None:
        conn = self._wconn
        jobs = [j for j in batch if j[1].set_running_or_notify_cancel()]
        if not jobs:
            return
        durable = any(j[2] for j in jobs)
        outcomes: list[tuple[Future[Any], Any, BaseException | None]] = []
        try:
            if durable != self._sync_full:
                conn.execute("PRAGMA synchronous=FULL" if durable else "PRAGMA synchronous=NORMAL")
                self._sync_full = durable
            conn.execute("BEGIN IMMEDIATE")
            changes = conn.total_changes
            for fn, fut, _d, _w in jobs:
                conn.execute("SAVEPOINT job")
                try:
                    result = fn(conn)
                except Exception as exc:
                    if not conn.in_transaction:
                        raise  # SQLite rolled the whole transaction back (disk full ...)
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                    if isinstance(exc, sqlite3.Error):
                        err: BaseException = self._error(exc, "writing")
                        err.__cause__ = exc
                    else:
                        err = exc
                    outcomes.append((fut, None, err))
                else:
                    conn.execute("RELEASE job")
                    outcomes.append((fut, result, None))
            conn.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):  # report the original error
                    conn.execute("ROLLBACK")
            self._batch_failed(jobs, outcomes, exc)
            return
        self._batch_committed(outcomes, durable=durable,
                              wrote=conn.total_changes > changes)

    def _batch_failed(self, jobs: list[_Job],
                      outcomes: list[tuple[Future[Any], Any, BaseException | None]],
                      exc: BaseException) -> None:
        """The batch's transaction did not commit: fail every job (a job's own error
        stays its own), counting them; note a full disk."""
        err = self._error(exc, "writing")
        if err is not exc:
            err.__cause__ = exc
        self._batches += 1
        self._jobs += len(jobs)
        self._failed_jobs += len(jobs)
        own = {id(fut): error for fut, _r, error in outcomes if error is not None}
        if isinstance(err, DiskFull) or any(isinstance(e, DiskFull) for e in own.values()):
            self.disk_full = True
        for _fn, fut, _d, _w in jobs:
            if not fut.done():
                fut.set_exception(own.get(id(fut), err))

    def _batch_committed(self, outcomes: list[tuple[Future[Any], Any, BaseException | None]],
                         *, durable: bool, wrote: bool) -> None:
        """The batch committed: complete each job's future with its own outcome."""
        if wrote:
            self.disk_full = False  # a write committed: there is room again
            self._committed.set()  # for the checkpointer (SQLite)
        self._batches += 1
        self._durable_batches += durable
        self._jobs += len(outcomes)
        for fut, result, error in outcomes:
            if error is None:
                fut.set_result(result)
            else:
                self._failed_jobs += 1
                fut.set_exception(error)

    def stats(self) -> WriterStats:
        """Writer counters since open, and the number of jobs waiting now."""
        with self._lock:
            return WriterStats(
                self._batches, self._durable_batches, self._jobs, self._failed_jobs, self._queued
            )

    # ------------------------------------------------------------------ writes

    def append(
        self,
        records: Sequence[Record],
        *,
        durable: bool = False,
        received_at_ms: int | None = None,
        inline: bool = False,
    ) -> Future[list[tuple[bytes, str, int, str]]]:
        """Store verified ``records`` and advance their feeds' heads, atomically.

        A record that is a tombstone (no payload) is stored as one; a record named by an
        erasure request held is stored without its payload; an erasure request among
        ``records`` drops the payloads it names (same id at that position). The result
        lists the erasure entries refused, which erase nothing: ``(erasure request id,
        feed, seq, reason)``, reason ``erasure_mismatch`` (a position held under another
        id) or ``erasure_not_origin`` (a record of another origin named).

        The caller orders them so each extends its chain (seq 1, or ``head.seq + 1`` with
        ``prev == head.id``); the writer re-checks that in the transaction and fails the
        whole job with :class:`ChainError` otherwise (nothing of it is stored). ``durable``
        makes the commit survive power loss (use it for the node's own records).
        ``received_at_ms`` defaults to the wall clock now. ``inline``: a non-durable
        append of at most :data:`INLINE_MAX_RECORDS` records may be written on the
        calling thread when the writer is idle (the future is then complete on return;
        see :meth:`_run_inline`).
        """
        if inline and not durable:
            return self.append_each([records], received_at_ms=received_at_ms)[0]
        recs = tuple(records)
        at = _now_ms() if received_at_ms is None else received_at_ms
        return self._submit(_append_job(recs, at), durable=durable, weight=len(recs),
                            origins=frozenset(r.origin for r in recs))

    def append_each(self, batches: Sequence[Sequence[Record]], *,
                    received_at_ms: int | None = None
                    ) -> list[Future[list[tuple[bytes, str, int, str]]]]:
        """:meth:`append` (non-durable) of each of ``batches``, in order, as separate
        jobs (one failing fails alone). When they are at most
        :data:`INLINE_MAX_RECORDS` records each and :data:`INLINE_MAX_BATCH` in all and
        the writer is idle, they are written on the calling thread, in one transaction
        (their futures complete on return: see :meth:`_run_inline`); else queued."""
        at = _now_ms() if received_at_ms is None else received_at_ms
        recs = [tuple(b) for b in batches]
        jobs = [(_append_job(r, at), len(r)) for r in recs]
        if all(len(r) <= INLINE_MAX_RECORDS for r in recs) and \
                sum(len(r) for r in recs) <= INLINE_MAX_BATCH:
            done = self._run_inline(jobs)
            if done is not None:
                return done
        return [self._submit(job, weight=w, origins=frozenset(x.origin for x in r))
                for (job, w), r in zip(jobs, recs, strict=True)]

    def truncate(self, origin: bytes, feed: str, keep_seq: int) -> Future[int]:
        """Drop every record of a feed above ``keep_seq`` -- records a key log now refuses
        (a stolen key's, cut off by its owner's recovery) -- with their payloads, the
        Merkle subtrees and checkpoints that cover them, the liveness statement kept of
        the feed if it counts them, the erasure entries naming their positions, and,
        when they are erasure requests, what they erased (the entries they made; the
        records they erased are no longer marked erased by them, and read as pruned:
        their payloads are gone); the head becomes the record at ``keep_seq`` (the feed
        is forgotten at 0). Returns how many records went."""
        def run(conn: sqlite3.Connection) -> int:
            row = conn.execute(_SELECT_CHAIN, (origin, feed)).fetchone()
            if row is None or row[1] <= keep_seq:
                return 0
            chain = row[0]
            if feed == ERASURE_FEED:
                tail = "SELECT id FROM records WHERE chain = ? AND seq > ?"
                conn.execute(f"DELETE FROM erasures WHERE by IN ({tail})", (chain, keep_seq))
                conn.execute(f"UPDATE records SET erased_by = NULL WHERE erased_by IN ({tail})",
                             (chain, keep_seq))
            conn.execute("DELETE FROM erasures WHERE origin = ? AND feed = ? AND seq > ?",
                         (origin, feed, keep_seq))
            conn.execute("DELETE FROM liveness WHERE origin = ? AND feed = ? AND size > ?",
                         (origin, feed, keep_seq))
            conn.execute("DELETE FROM payloads WHERE rowid IN (SELECT rowid FROM records"
                         " WHERE chain = ? AND seq > ?)", (chain, keep_seq))
            gone = conn.execute("DELETE FROM records WHERE chain = ? AND seq > ?",
                                (chain, keep_seq)).rowcount
            conn.execute("DELETE FROM merkle WHERE origin = ? AND feed = ?"
                         " AND ((idx + 1) << height) > ?", (origin, feed, keep_seq))
            conn.execute("DELETE FROM checkpoints WHERE origin = ? AND feed = ? AND size > ?",
                         (origin, feed, keep_seq))
            # Their cosignatures with them: a witness then rebases on the last good
            # checkpoint it cosigned at or below the cut (not "lost" for good).
            conn.execute("DELETE FROM cosignatures WHERE origin = ? AND feed = ?"
                         " AND size > ?", (origin, feed, keep_seq))
            if keep_seq == 0:
                conn.execute("DELETE FROM chains WHERE id = ?", (chain,))
            else:
                head = conn.execute("SELECT id FROM records WHERE chain = ? AND seq = ?",
                                    (chain, keep_seq)).fetchone()
                conn.execute("UPDATE chains SET head_seq = ?, head_id = ? WHERE id = ?",
                             (keep_seq, head[0], chain))
            return int(gone)

        return self._submit(run, durable=True)

    def prune(self, origin: bytes, feed: str, before_ms: int, *, since_ms: int = 0,
              after_seq: int = 0, limit: int = 5000) -> Future[tuple[int, int | None]]:
        """Drop the payloads of a feed's records dated in ``[since_ms, before_ms)`` (the
        records signed under one card of the origin, past its retention), keeping their
        skeletons (retention). Examines at most ``limit`` records, those above
        ``after_seq`` in seq order, in one transaction: call again from the seq returned
        until it is None. The result is ``(payloads dropped, last seq examined or None
        when the feed's end was reached)``. The erasure-request feed is never pruned."""
        def run(conn: sqlite3.Connection) -> tuple[int, int | None]:
            if feed == ERASURE_FEED:
                return 0, None
            rows = conn.execute(
                f"SELECT r.rowid, r.seq, r.time, p.rowid FROM {_ENV_FROM}"
                f" WHERE r.chain = {_CHAIN_OF} AND r.seq > ? ORDER BY r.seq LIMIT ?",
                (origin, feed, after_seq, limit)).fetchall()
            old = [(r[0],) for r in rows
                   if since_ms <= r[2] < before_ms and r[3] is not None]
            conn.executemany(_DROP_PAYLOAD, old)
            conn.executemany("UPDATE records SET lon = NULL, lat = NULL WHERE rowid = ?"
                             " AND lat IS NOT NULL", old)
            return len(old), (rows[-1][1] if len(rows) == limit else None)

        return self._submit(run, weight=max(1, limit // 4))

    def reclaim(self, max_pages: int = 0) -> Future[int]:
        """Give the database's free pages back to the file system (``PRAGMA
        incremental_vacuum``; 0: all of them); returns the pages freed. After prunes and
        erasures: their pages are free inside the file until this runs."""
        def run(conn: sqlite3.Connection) -> int:
            before = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
            n = before if max_pages <= 0 else min(before, max_pages)
            # Each step of the pragma frees one page, and Python's sqlite3 steps a
            # statement that returns no row once: one execute per page.
            for _ in range(n):
                conn.execute("PRAGMA incremental_vacuum(1)")
            return before - int(conn.execute("PRAGMA freelist_count").fetchone()[0])

        return self._submit(run)

    def add_fork_proof(
        self,
        origin: bytes,
        feed: str,
        seq: int,
        kind: str,
        proof: bytes,
        reported_by: str | None,
        at_ms: int,
    ) -> Future[bool]:
        """Keep a (verified) fork or split-view proof. The future's result is False if
        already known, or if a proof of the same ``kind`` at the same (origin, feed,
        seq) is held: one proves the fork, and a hostile origin signing conflicting
        statements of one size without end (a checkpoint every few seconds) must not
        grow this table without bound. Proofs held are thus at most one per kind and
        seq (a size, for a split view) of a feed, no more than the checkpoints held."""

        def run(conn: sqlite3.Connection) -> bool:
            if conn.execute(
                "SELECT 1 FROM fork_proofs WHERE origin = ? AND feed = ? AND seq = ?"
                " AND kind = ? LIMIT 1", (origin, feed, seq, kind),
            ).fetchone() is not None:
                return False
            cur = conn.execute(
                "INSERT INTO fork_proofs (origin, feed, seq, kind, proof, found_at, reported_by)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (origin, feed, seq, kind, proof, at_ms, reported_by),
            )
            return cur.rowcount == 1

        return self._submit(run)

    def drop_fork_proofs(self, ids: list[int]) -> Future[int]:
        """Forget the proofs with these row ids: proofs that no longer hold (a key event
        of their origin settled the window they were in). Returns how many went."""

        def run(conn: sqlite3.Connection) -> int:
            return sum(conn.execute("DELETE FROM fork_proofs WHERE id = ?", (i,)).rowcount
                       for i in ids)

        return self._submit(run)

    def log_rejected(self, source: str, reason: str, detail: str, at_ms: int) -> Future[None]:
        """Add to the rejected-input log, keeping only its newest ``rejected_log_rows``.

        Fields longer than 2000 characters are cut (they may come from an attacker).
        """
        keep = self._rejected_rows
        row = (at_ms, _clip(source), _clip(reason), _clip(detail))

        def run(conn: sqlite3.Connection) -> None:
            (last,) = conn.execute(
                "INSERT INTO rejected (at, source, reason, detail) VALUES (?, ?, ?, ?)"
                " RETURNING id", row).fetchone()
            # ids only grow and are removed from the bottom: this keeps at most ``keep``
            conn.execute("DELETE FROM rejected WHERE id <= ?", (int(last) - keep,))

        return self._submit(run)

    def put_partner(self, p: PartnerRow) -> Future[None]:
        """Insert or replace the partner ``p.node_id`` with exactly the values of ``p``.

        Fails with :class:`StorageError` if ``p.public_key`` belongs to another node id.
        """
        row = (p.node_id, p.public_key, p.url, p.name, p.tls_fingerprint, p.card, p.added_at)

        def run(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO partners (node_id, public_key, url, name, tls_fingerprint, card,"
                " added_at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (node_id) DO UPDATE SET"
                " public_key = excluded.public_key, url = excluded.url, name = excluded.name,"
                " tls_fingerprint = excluded.tls_fingerprint, card = excluded.card,"
                " added_at = excluded.added_at",
                row,
            )

        return self._submit(run)

    def remove_partner(self, node_id: str) -> Future[bool]:
        """Forget a partner. The future's result is False if it was not a partner."""

        def run(conn: sqlite3.Connection) -> bool:
            return conn.execute("DELETE FROM partners WHERE node_id = ?", (node_id,)).rowcount == 1

        return self._submit(run)

    def put_checkpoint(
        self, origin: bytes, feed: str, size: int, root: bytes, envelope: bytes
    ) -> Future[bool]:
        """Keep a signed checkpoint of a feed. The result is False if one of that size is held
        (the first one stays)."""

        def run(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "INSERT INTO checkpoints (origin, feed, size, root, envelope)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (origin, feed, size, root, envelope),
            )
            return cur.rowcount == 1

        return self._submit(run)

    def rebuild_time_bounds(self) -> Future[int]:
        """Set every record's running maxima of time (schema v12) again from the records
        held: the repair of what :meth:`quick_check` reports as wrong. One transaction,
        durable. Returns how many records it read."""

        def run(conn: sqlite3.Connection) -> int:
            conn.execute(BACKFILL_TIME_BOUNDS)
            (n,), = conn.execute("SELECT count(*) FROM records").fetchall()
            return int(n)

        return self._submit(run, durable=True)

    def drop_checkpoints(self, origin: bytes, feed: str,
                         refused: Sequence[tuple[int, bytes, bytes]]) -> Future[int]:
        """Forget these checkpoints of a feed, ``(size, root, envelope)`` each --
        statements its origin's key log now refuses (a stolen key's, beyond the heads a
        recovery named) -- with the cosignatures of them and the liveness statement kept
        of the feed if it is one of them. Durable. Returns how many checkpoints went."""

        def run(conn: sqlite3.Connection) -> int:
            gone = 0
            for size, root, env in refused:
                gone += conn.execute(
                    "DELETE FROM checkpoints WHERE origin = ? AND feed = ? AND size = ?"
                    " AND root = ?", (origin, feed, size, root)).rowcount
                conn.execute("DELETE FROM cosignatures WHERE origin = ? AND feed = ?"
                             " AND size = ? AND root = ?", (origin, feed, size, root))
                conn.execute("DELETE FROM liveness WHERE origin = ? AND feed = ?"
                             " AND envelope = ?", (origin, feed, env))
            return gone

        return self._submit(run, durable=True)

    def put_cosignature(self, origin: bytes, feed: str, size: int, root: bytes,
                        witness: bytes, time: int, envelope: bytes) -> Future[bool]:
        """Keep a (verified) witness cosignature of the checkpoint (origin, feed, size,
        root). One of that witness for that checkpoint held is replaced only by a later
        one (a witness that rotated signs its checkpoints again with its new key); the
        result is False if nothing changed."""

        def run(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "INSERT INTO cosignatures (origin, feed, size, root, witness, time, envelope)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (origin, feed, size, root,"
                " witness) DO UPDATE SET time = excluded.time, envelope = excluded.envelope"
                " WHERE excluded.time > cosignatures.time",
                (origin, feed, size, root, witness, time, envelope))
            return cur.rowcount == 1

        return self._submit(run)

    def put_liveness(self, origin: bytes, feed: str, size: int, time: int, root: bytes,
                     envelope: bytes, grew_at: int) -> Future[None]:
        """Keep the newest liveness statement of a feed (verified by the caller) and
        ``grew_at``; one signed before the one kept changes nothing."""

        def run(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO liveness (origin, feed, size, time, root, envelope, grew_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (origin, feed) DO UPDATE SET"
                " size = excluded.size, time = excluded.time, root = excluded.root,"
                " envelope = excluded.envelope, grew_at = excluded.grew_at"
                " WHERE excluded.time >= liveness.time",
                (origin, feed, size, time, root, envelope, grew_at))

        return self._submit(run)

    def liveness(self, limit: int) -> list[tuple[bytes, str, int, int, bytes, bytes, int]]:
        """At most ``limit`` kept liveness statements: ``(origin, feed, size, time, root,
        envelope, grew_at)``, newest first (by signed time)."""
        rows = self._all("SELECT origin, feed, size, time, root, envelope, grew_at FROM"
                         " liveness ORDER BY time DESC LIMIT ?", (limit,))
        return [tuple(r) for r in rows]

    def add_card_history(self, node: bytes, time: int, envelope: bytes) -> Future[bool]:
        """Keep a verified card of ``node`` signed at ``time`` in its card history (the
        first one of a (node, time) stays), at most CARD_HISTORY_MAX of them. The result
        is False if one of that time was held.

        Over the bound, one card goes: the oldest that states the same feeds as the card
        just before it (:func:`citynode.core.cards.terms_key`), else the oldest of all.
        The terms in force at time t are those of the card with the greatest time <= t.
        Dropping card k moves the records of [time_k, time_k+1) to card k-1: the same
        terms exactly when k-1 states the same feeds as k, so nothing changes but the
        ``card_time`` shown (that of k-1, which stated those terms first). Dropping the
        oldest card, or a card that states the same as its *successor*, would change the
        terms of the records it covers. So the terms in force for every record are kept
        as long as the node has at most CARD_HISTORY_MAX distinct terms periods; beyond
        that the oldest periods go (their records show unknown terms)."""

        def run(conn: sqlite3.Connection) -> bool:
            new = conn.execute(
                "INSERT INTO card_history (node, time, envelope) VALUES (?, ?, ?)"
                " ON CONFLICT DO NOTHING", (node, time, envelope)).rowcount == 1
            (n,) = conn.execute("SELECT count(*) FROM card_history WHERE node = ?",
                                (node,)).fetchone()
            if n > CARD_HISTORY_MAX:
                rows = conn.execute("SELECT time, envelope FROM card_history WHERE"
                                    " node = ? ORDER BY time", (node,)).fetchall()
                keys = [terms_key(e) for _t, e in rows]
                drop = [rows[i][0] for i in range(1, len(rows))
                        if keys[i] is not None and keys[i] == keys[i - 1]]
                # Only one card comes in at a time, so one over the bound at most
                # (more only if CARD_HISTORY_MAX was lowered: then the oldest go too).
                over = len(rows) - CARD_HISTORY_MAX
                gone = drop[:over]
                gone += [t for t, _e in rows if t not in gone][:over - len(gone)]
                conn.executemany("DELETE FROM card_history WHERE node = ? AND time = ?",
                                 [(node, t) for t in gone])
            return new

        return self._submit(run)

    def card_history(self, node: bytes) -> list[bytes]:
        """The card envelopes kept of ``node``, oldest first (at most CARD_HISTORY_MAX)."""
        return [r[0] for r in self._all(
            "SELECT envelope FROM card_history WHERE node = ? ORDER BY time", (node,))]

    def set_meta(self, key: str, value: bytes, *, durable: bool = False) -> Future[None]:
        """Set a node-wide value (insert or replace); ``durable``: committed as an own
        record is (it survives a crash of the database server, not only of the node)."""

        def run(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

        return self._submit(run, durable=durable)

    # ------------------------------------------------------------------ restored mark

    def restored(self) -> str | None:
        """Why this database counts as restored (its own feeds may be behind what
        partners hold), or None. Set by :meth:`mark_restored` or when the file is not the
        one last opened here (see :func:`_note_file_identity`)."""
        value = self.get_meta(_RESTORED)
        return value.decode("utf-8", "replace") if value is not None else None

    def mark_restored(self, why: str) -> Future[None]:
        """Mark the database restored (``citynode restore`` does); durable: a mark
        lost in a crash would let own feeds be signed again on seqs partners hold."""
        return self.set_meta(_RESTORED, why.encode(), durable=True)

    def clear_restored(self) -> Future[None]:
        """A partner confirmed this node's heads (or the operator took the risk)."""

        def run(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM meta WHERE key = ?", (_RESTORED,))

        return self._submit(run, durable=True)

    def barrier(self) -> Future[None]:
        """Done once every write queued before it has landed (it writes nothing: it
        completes on a full disk too)."""
        return self._submit(lambda conn: None)

    def writable(self, timeout: float = 5.0) -> bool:
        """True if the writer can commit a small write within ``timeout`` seconds (it
        also clears :attr:`disk_full` when space came back).

        Blocks the calling thread (run it in an executor). Never raises.
        """
        # A real write (a few bytes in meta), not an empty transaction: on a full disk
        # an empty commit succeeds while every insert fails.
        def probe(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO meta (key, value) VALUES ('writable-probe', ?)"
                         " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                         (os.urandom(16),))

        was_full = self.disk_full
        try:
            fut = self._submit(probe)
            fut.result(timeout)
        except (CitynodeError, FutureTimeoutError):
            return False
        if was_full and self.free_bytes() < FREE_MARGIN:
            # A few bytes fit in the write-ahead log's slack; a batch of records did
            # not: full until the file system has room again (or a real write lands).
            self.disk_full = True
        return not self.disk_full

    def free_bytes(self) -> int:
        """Bytes free for this process on the database's file system."""
        try:
            st = os.statvfs(self.path.parent)
        except OSError:
            return 0
        return st.f_bavail * st.f_frsize

    # ------------------------------------------------------------------ reads

    def _reader(self) -> sqlite3.Connection:
        if self._closed:
            raise StorageError("storage is closed: the node is shutting down")
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = _connect(self.path, self._busy_timeout_ms)
                conn.execute("PRAGMA query_only=ON")
            except sqlite3.Error as exc:
                raise self._error(exc, "opening a read connection") from exc
            with self._lock:
                if self._closed:
                    conn.close()
                    raise StorageError("storage is closed: the node is shutting down")
                self._readers.append(conn)
            self._local.conn = conn
        return conn

    @contextlib.contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._closed:
                raise StorageError("storage is closed: the node is shutting down")
            self._reads += 1
        try:
            yield self._reader()
        finally:
            with self._lock:
                self._reads -= 1
                self._reads_done.notify_all()

    def _all(self, sql: str, params: Sequence[Any] = (),
             time_limit: float | None = None) -> list[Any]:
        with self._reading() as conn:
            if time_limit is not None:
                deadline = time.monotonic() + time_limit
                # SQLite calls this every 1,000 VM steps (a few % of the query's time);
                # true stops the statement.
                conn.set_progress_handler(lambda: time.monotonic() > deadline, 1_000)
            try:
                return conn.execute(sql, params).fetchall()
            except sqlite3.OperationalError as exc:
                if time_limit is not None and "interrupted" in str(exc):
                    raise QueryTooSlow(
                        f"the query ran longer than {time_limit:g} s and was stopped: narrow "
                        "it (an origin, a feed, a time range) or ask for fewer rows"
                    ) from exc
                raise self._error(exc, "reading") from exc
            except sqlite3.Error as exc:
                raise self._error(exc, "reading") from exc
            except OverflowError as exc:
                raise StorageError(f"a number in the query is out of range: {exc}") from exc
            finally:
                if time_limit is not None:
                    conn.set_progress_handler(None, 0)

    def _one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        with self._reading() as conn:
            try:
                return conn.execute(sql, params).fetchone()
            except sqlite3.Error as exc:
                raise self._error(exc, "reading") from exc
            except OverflowError as exc:
                raise StorageError(f"a number in the query is out of range: {exc}") from exc

    def heads(self) -> dict[tuple[bytes, str], tuple[int, bytes]]:
        """Every feed held: ``(origin, feed) -> (head seq, head id)``."""
        rows = self._all("SELECT origin, feed, head_seq, head_id FROM chains")
        return {(o, f): (s, i) for o, f, s, i in rows}

    def head(self, origin: bytes, feed: str) -> tuple[int, bytes] | None:
        """``(seq, id)`` of the highest contiguous record held of a feed, or None."""
        row = self._one(_SELECT_HEAD, (origin, feed))
        return None if row is None else (row[0], row[1])

    def has_ids(self, ids: Sequence[bytes]) -> set[bytes]:
        """The subset of ``ids`` held (queries of at most 500 ids each)."""
        found: set[bytes] = set()
        ids = list(dict.fromkeys(ids))
        for start in range(0, len(ids), _IN_CHUNK):
            chunk = ids[start : start + _IN_CHUNK]
            n = _bucket(len(chunk))
            chunk += [chunk[-1]] * (n - len(chunk))  # padding keeps the statement cache warm
            # the index holds 8 bytes of each id: keep only the whole ids asked for
            sql = f"SELECT id FROM records WHERE substr(id, 1, 8) IN ({','.join('?' * n)})"
            found.update(r[0] for r in self._all(sql, [i[:8] for i in chunk]))
        return found & set(ids)

    def get_envelope(self, rid: bytes) -> bytes | None:
        """The envelope of record ``rid``, or None if not held."""
        row = self._one(f"SELECT r.envelope, p.payload FROM {_ENV_FROM} WHERE"
                        " substr(r.id, 1, 8) = ? AND r.id = ?", (rid[:8], rid))
        return None if row is None else with_payload(row[0], row[1])

    def erased_by(self, named: Sequence[tuple[bytes, bytes, str, int]]) -> dict[bytes, bytes]:
        """For ``(id, origin, feed, seq)`` positions: record id -> the id of an erasure
        request held that names exactly that record at that position (only those
        named)."""
        out: dict[bytes, bytes] = {}
        for rid, origin, feed, seq in named:
            row = self._one(_SELECT_ERASED, (rid, origin, feed, seq))
            if row is not None:
                out[rid] = row[0]
        return out

    def erasure_of(self, rid: bytes) -> tuple[bytes, str] | None:
        """``(erasure request id, its reason)`` if record ``rid``'s payload was erased."""
        row = self._one("SELECT e.by, e.reason FROM records AS r JOIN erasures AS e ON"
                        " e.id = r.id AND e.by = r.erased_by WHERE substr(r.id, 1, 8) = ?"
                        " AND r.id = ?", (rid[:8], rid))
        return None if row is None else (row[0], row[1])

    def erased_feeds(self, origin: bytes) -> set[str]:
        """The feeds of ``origin`` holding at least one record whose payload an erasure
        request held here erased (what an export must carry the requests of). Reads
        the ``erasures`` table, which holds only positions requests named (few)."""
        rows = self._all("SELECT DISTINCT e.feed FROM erasures AS e JOIN records AS r ON"
                         " substr(r.id, 1, 8) = substr(e.id, 1, 8) AND r.id = e.id AND"
                         " r.erased_by = e.by WHERE e.origin = ?", (origin,))
        return {row[0] for row in rows}

    def tombstones(self) -> tuple[int, int]:
        """``(records erased, records pruned)`` held: skeletons without their payload."""
        row = self._one("SELECT count(*), count(r.erased_by) FROM records AS r WHERE NOT"
                        " EXISTS (SELECT 1 FROM payloads AS p WHERE p.rowid = r.rowid)")
        return int(row[1]), int(row[0]) - int(row[1])

    def has_records_in_clear(self, origin: bytes, feed: str) -> bool:
        """Does the feed hold a record that is not sealed (for a restricted feed: one
        signed before it was restricted)? Scans the feed's rows."""
        return self._one(
            f"SELECT 1 FROM records WHERE chain = {_CHAIN_OF}"
            " AND type_id IS DISTINCT FROM (SELECT id FROM types WHERE type = ?) LIMIT 1",
            (origin, feed, SEALED_TYPE)) is not None

    def id_at(self, origin: bytes, feed: str, seq: int) -> bytes | None:
        """The id held at ``seq`` of a feed, or None."""
        row = self._one(
            f"SELECT id FROM records WHERE chain = {_CHAIN_OF} AND seq = ?", (origin, feed, seq)
        )
        return None if row is None else row[0]

    def envelope_at(self, origin: bytes, feed: str, seq: int) -> bytes | None:
        """The envelope held at ``seq`` of a feed, or None."""
        row = self._one(
            f"SELECT r.envelope, p.payload FROM {_ENV_FROM} WHERE r.chain = {_CHAIN_OF}"
            " AND r.seq = ?",
            (origin, feed, seq),
        )
        return None if row is None else with_payload(row[0], row[1])

    def range(
        self, origin: bytes, feed: str, from_seq: int, to_seq: int, limit: int
    ) -> list[bytes]:
        """Envelopes of a feed with ``from_seq <= seq <= to_seq``, in seq order, at most
        ``limit`` of them."""
        if limit <= 0:
            return []
        rows = self._all(
            f"SELECT r.envelope, p.payload FROM {_ENV_FROM} WHERE r.chain = {_CHAIN_OF}"
            " AND r.seq BETWEEN ? AND ? ORDER BY r.seq LIMIT ?",
            (origin, feed, from_seq, to_seq, limit),
        )
        return [with_payload(r[0], r[1]) for r in rows]

    def query(
        self,
        where: RecordFilter = ALL_RECORDS,
        *,
        after_rowid: int = 0,
        limit: int = 100,
        only_feeds: Sequence[tuple[bytes, str]] | None = None,
        time_limit: float | None = None,
    ) -> list[StoredRow]:
        """Stored records matching ``where``, ordered by rowid, after ``after_rowid``, at
        most ``limit`` of them. Page on with the last row's ``rowid``.

        The filter's own SQL rendering selects the rows (core/filters.py): they are the
        rows its in-memory match accepts. With ``time_limit`` (seconds) the query is
        stopped when it runs longer, raising :class:`QueryTooSlow` (readers' queries: a
        filter no index serves scans the table).

        ``only_feeds`` restricts the answer to those (origin, feed) pairs -- the feeds a
        reader may see -- inside the query, so neither rows nor the cursor reveal others.
        """
        if limit <= 0 or (only_feeds is not None and not only_feeds):
            return []
        sql, params = self._query_sql(where, after_rowid, limit, only_feeds)
        return self._stored_rows(self._all(sql, params, time_limit))

    def _query_sql(self, where: RecordFilter, after_rowid: int, limit: int,
                   only_feeds: Sequence[tuple[bytes, str]] | None) -> tuple[str, list[Any]]:
        """The statement of :meth:`query` (an engine shapes it for its planner)."""
        return _sqlite_query_sql(where, after_rowid, limit, only_feeds,
                                 by_time=self._few_in_range(where, after_rowid, limit))

    def _few_in_range(self, where: RecordFilter, after_rowid: int, limit: int) -> bool:
        """Does ``where``, naming one feed and a time range, match fewer than ``limit``
        records after the cursor? Counted through (chain, time), no further than
        ``limit``. Then the range is read whole and sorted (at most ``limit`` rows);
        otherwise the feed is walked in seq order from the bound of :data:`SINCE_SEQ`,
        stopping at LIMIT: a walk finding fewer than ``limit`` would go on to the feed's
        end. False for every other filter."""
        if not where.one_feed or (where.since_ms is None and where.until_ms is None):
            return False
        conds = [f"chain = {_CHAIN_OF}"]
        params: list[Any] = [where.origin, where.feed]
        if after_rowid:
            conds.append("rowid > ?")
            params.append(after_rowid)
        if where.since_ms is not None:
            conds.append("time >= ?")
            params.append(where.since_ms)
        if where.until_ms is not None:
            conds.append("time < ?")
            params.append(where.until_ms)
        (n,) = self._one("SELECT count(*) FROM (SELECT 1 FROM records WHERE"
                         f" {' AND '.join(conds)} LIMIT {int(limit)}) AS x", params)
        return int(n) < limit

    def erased_rows(self, by: bytes, ids: Sequence[bytes]) -> list[StoredRow]:
        """The rows of ``ids`` (at most 1000, what an erasure request names) whose
        payload erasure request ``by`` removed, by rowid: what live streams announce."""
        rows = []
        for rid in ids[:1000]:
            rows += self._all(f"{_SELECT_ROW} WHERE substr(r.id, 1, 8) = ? AND r.id = ?"
                              " AND r.erased_by = ?", (rid[:8], rid, by))
        return sorted(self._stored_rows(rows), key=lambda r: r.rowid)

    def _stored_rows(self, rows: list[Any]) -> list[StoredRow]:
        """:class:`StoredRow` of rows selected by :data:`_SELECT_ROW`."""
        names = self._names
        chains, types = names.chains, names.types  # the cache's dicts: the common case
        out = []
        for r in rows:
            origin, feed = chains.get(r[2]) or names.chain(r[2])
            # the reason of an erased record (rare): one primary-key search each
            reason = None if r[11] is None else self._one(_SELECT_REASON, (r[1], r[11]))[0]
            out.append(StoredRow(r[0], r[1], origin, feed, r[3],
                                 types.get(r[4]) or names.type(r[4]),
                                 r[5], r[6], r[7], r[8], with_payload(r[9], r[10]), r[11],
                                 reason))
        return out

    def query_plan(
        self,
        where: RecordFilter = ALL_RECORDS,
        *,
        after_rowid: int = 0,
        limit: int = 100,
        only_feeds: Sequence[tuple[bytes, str]] | None = None,
    ) -> list[str]:
        """How SQLite would run :meth:`query` with these arguments: the ``detail`` lines
        of ``EXPLAIN QUERY PLAN`` (to check that a filter is served by an index)."""
        sql, params = self._query_sql(where, after_rowid, max(limit, 1), only_feeds or None)
        return [str(r[3]) for r in self._all("EXPLAIN QUERY PLAN " + sql, params)]

    def feeds(self) -> list[FeedRow]:
        """Every feed held, ordered by origin and feed name."""
        rows = self._all(
            "SELECT c.origin, c.feed, c.head_seq, c.head_id, r.time FROM chains AS c"
            " JOIN records AS r ON r.chain = c.id AND r.seq = c.head_seq"
            " ORDER BY c.origin, c.feed"
        )
        # chains are contiguous from seq 1: the count is the head seq
        return [FeedRow(o, f, s, i, s, t) for o, f, s, i, t in rows]

    def partners(self) -> list[PartnerRow]:
        """Every partner, ordered by node id."""
        return [PartnerRow(*r) for r in self._all(_SELECT_PARTNER + " ORDER BY node_id")]

    def partner(self, node_id: str) -> PartnerRow | None:
        """The partner with this node id, or None."""
        row = self._one(_SELECT_PARTNER + " WHERE node_id = ?", (node_id,))
        return None if row is None else PartnerRow(*row)

    def partner_by_key(self, public_key: bytes) -> PartnerRow | None:
        """The partner with this public key, or None."""
        row = self._one(_SELECT_PARTNER + " WHERE public_key = ?", (public_key,))
        return None if row is None else PartnerRow(*row)

    def fork_proofs(self) -> list[ForkRow]:
        """Every fork proof held, oldest first."""
        return [
            ForkRow(*r)
            for r in self._all(
                "SELECT id, origin, feed, seq, kind, proof, found_at, reported_by"
                " FROM fork_proofs ORDER BY id"
            )
        ]

    def rejected(self, limit: int = 100) -> list[RejectedRow]:
        """The newest ``limit`` entries of the rejected-input log, newest first."""
        if limit <= 0:
            return []
        rows = self._all(
            "SELECT id, at, source, reason, detail FROM rejected ORDER BY id DESC LIMIT ?",
            (limit,),
        )
        return [RejectedRow(*r) for r in rows]

    def tree(self, origin: bytes, feed: str, size: int) -> StoredTree:
        """The Merkle tree of the first ``size`` records of a feed, read from disk on
        demand (O(log size) small indexed reads per root or proof; nothing cached).

        The caller checks that the feed holds ``size`` records (its head): asking for
        more makes the tree's methods raise :class:`ValueError`. Its reads raise
        :class:`StorageError`; run them off the event loop where latency matters."""
        return StoredTree(_TreeReads(self, origin, feed), size, TILE_HEIGHT)

    def checkpoints(self, origin: bytes, feed: str) -> list[tuple[int, bytes, bytes]]:
        """``(size, root, envelope)`` of every checkpoint held of a feed, by size."""
        rows = self._all(
            "SELECT size, root, envelope FROM checkpoints WHERE origin = ? AND feed = ?"
            " ORDER BY size",
            (origin, feed),
        )
        return [(s, r, e) for s, r, e in rows]

    def cosignatures(self, origin: bytes, feed: str, size: int | None = None, *,
                     min_size: int = 0, per_checkpoint: int = 64,
                     limit: int = 100_000) -> list[tuple[int, bytes, bytes, bytes]]:
        """``(size, root, witness, envelope)`` of the cosignatures held of a feed's
        checkpoints (of one ``size`` if given, else of those of at least ``min_size``),
        by size then witness: at most ``per_checkpoint`` per checkpoint (the first by
        witness), at most ``limit`` in all. Callers ask for exactly the checkpoints
        they use (one size, or the newest from ``min_size``), so none is cut short by
        older ones."""
        where = "origin = ? AND feed = ? AND " + ("size = ?" if size is not None
                                                  else "size >= ?")
        rows = self._all(
            "SELECT size, root, witness, envelope FROM (SELECT size, root, witness,"
            " envelope, ROW_NUMBER() OVER (PARTITION BY size, root ORDER BY witness) AS n"
            f" FROM cosignatures WHERE {where}) AS t WHERE n <= ?"
            " ORDER BY size, witness LIMIT ?",
            (origin, feed, size if size is not None else min_size, per_checkpoint, limit))
        return [(s, r, w, e) for s, r, w, e in rows]

    def latest_cosigned(self, witness: bytes, limit: int
                        ) -> list[tuple[bytes, str, int, bytes, bytes]]:
        """Per feed, the largest checkpoint ``witness`` cosigned: ``(origin, feed, size,
        root, cosignature envelope)``, at most ``limit``."""
        rows = self._all(
            "SELECT c.origin, c.feed, c.size, c.root, c.envelope FROM cosignatures c"
            " WHERE c.witness = ? AND c.size = (SELECT max(d.size) FROM cosignatures d"
            " WHERE d.witness = c.witness AND d.origin = c.origin AND d.feed = c.feed)"
            " ORDER BY c.origin, c.feed LIMIT ?", (witness, limit))
        return [(o, f, s, r, e) for o, f, s, r, e in rows]

    def last_cosigned(self, witness: bytes, origin: bytes, feed: str
                      ) -> tuple[int, bytes] | None:
        """``(size, root)`` of the largest checkpoint of a feed ``witness`` cosigned, as
        held here (a witness's own: the last one it vouched for), or None."""
        row = self._one(
            "SELECT size, root FROM cosignatures WHERE witness = ? AND origin = ? AND"
            " feed = ? ORDER BY size DESC LIMIT 1", (witness, origin, feed))
        return None if row is None else (int(row[0]), bytes(row[1]))

    def meta_prefixed(self, prefix: str) -> list[tuple[str, bytes]]:
        """Every node-wide ``(key, value)`` whose key starts with ``prefix``."""
        return [(k, v) for k, v in self._all(
            "SELECT key, value FROM meta WHERE key >= ? AND key < ? ORDER BY key",
            (prefix, prefix + "\uffff"))]

    def get_meta(self, key: str) -> bytes | None:
        """A node-wide value, or None if unset."""
        row = self._one("SELECT value FROM meta WHERE key = ?", (key,))
        return None if row is None else row[0]

    def cards(self, limit: int) -> list[bytes]:
        """The signed node cards kept (``card:<key hex>`` in meta: the newest learned of
        each node, verified when learned), at most ``limit``."""
        rows = self._all("SELECT value FROM meta WHERE key >= 'card:' AND key < 'card;'"
                         " LIMIT ?", (limit,))
        return [r[0] for r in rows]

    def iter_envelopes(
        self, origin: bytes | None = None, feed: str | None = None
    ) -> Iterator[tuple[int, bytes]]:
        """Yield ``(rowid, envelope)`` of every record (of ``origin``, of ``feed``) in
        rowid order, fetching 1000 at a time so no read transaction stays open between
        chunks; each chunk is read on the connection of the thread asking for it."""
        cond = ""
        params: list[Any] = []
        if origin is not None and feed is not None:
            cond = f" AND r.chain = {_CHAIN_OF}"
            params += [origin, feed]
        elif origin is not None:
            cond = " AND r.chain IN (SELECT id FROM chains WHERE origin = ?)"
            params.append(origin)
        elif feed is not None:  # walked by rowid (``+``: not by the chains' index)
            cond = " AND +r.chain IN (SELECT id FROM chains WHERE feed = ?)"
            params.append(feed)
        by_seq = origin is not None and feed is not None
        # one feed: walk its index by seq (same order as rowid); else walk rowid
        key_col = "r.seq" if by_seq else "r.rowid"
        sql = (
            f"SELECT r.rowid, r.envelope, p.payload, {key_col} FROM {_ENV_FROM}"
            f" WHERE {key_col} > ?{cond} ORDER BY {key_col} LIMIT {_ITER_CHUNK}"
        )
        last = 0
        while True:
            rows = self._all(sql, [last, *params])
            for rowid, env, payload, _k in rows:
                yield rowid, with_payload(env, payload)
            if len(rows) < _ITER_CHUNK:
                return
            last = rows[-1][3]

    def max_rowid(self) -> int:
        """The highest record rowid (0 when empty): the cursor of "now"."""
        row = self._one("SELECT max(rowid) FROM records")
        return int(row[0] or 0)

    def count(self) -> int:
        """The number of records held."""
        return int(self._one("SELECT count(*) FROM records")[0])

    def space(self) -> tuple[int, int]:
        """``(records held, bytes of their envelopes)``: with :meth:`db_size_bytes`, what
        the database costs per record beyond the signed bytes themselves. Scans the
        table."""
        row = self._one("SELECT count(*), coalesce(sum(length(envelope)), 0) FROM records")
        held = self._one("SELECT coalesce(sum(length(payload)), 0) FROM payloads")
        return int(row[0]), int(row[1]) + int(held[0])

    def db_size_bytes(self) -> int:
        """Bytes the database takes on disk (main file and write-ahead log)."""
        total = 0
        for suffix in ("", "-wal"):
            try:
                total += os.stat(f"{self.path}{suffix}").st_size
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise self._error(exc, "measuring the database") from exc
        return total


    # ------------------------------------------------------------------ bridges (v4)

    def bridge_lookup(self, keys: Sequence[bytes]) -> dict[bytes, BridgeMessageRow]:
        """The rows of the message identities ``keys`` held (absent: never taken on, or
        older than the bridge's ``dedupe_hours``)."""
        out: dict[bytes, BridgeMessageRow] = {}
        keys = list(dict.fromkeys(keys))
        for start in range(0, len(keys), _IN_CHUNK):
            chunk = keys[start : start + _IN_CHUNK]
            rows = self._all(
                "SELECT key, bridge, state, feed, after_seq, record_id, at FROM bridge_messages"
                f" WHERE key IN ({','.join('?' * len(chunk))})", chunk)
            out.update((r[0], BridgeMessageRow(*r)) for r in rows)
        return out


    def bridge_claim(self, bridge: str, claims: Sequence[tuple[bytes, str, int]],
                      at_ms: int, keep_ms: int) -> Future[None]:
        """Note that messages ``(key, feed, own feed head seq now)`` are about to be
        published (a claim already held is renewed, a dead letter's becomes one), and
        forget at most a thousand identities of ``bridge`` older than ``keep_ms``.

        Not synced to disk by itself: the durable commit of the records that follow it
        syncs the write-ahead log, this commit's frames included (a claim can only be
        lost together with the records claimed)."""
        rows = [(k, bridge, BRIDGE_CLAIMED, f, s, at_ms) for k, f, s in claims]

        def run(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT INTO bridge_messages (key, bridge, state, feed, after_seq, at)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET state = 0,"
                " feed = excluded.feed, after_seq = excluded.after_seq, at = excluded.at"
                " WHERE bridge_messages.state <> 1", rows)
            conn.execute(
                "DELETE FROM bridge_messages WHERE key IN (SELECT key FROM bridge_messages"
                " WHERE at < ? AND bridge = ? LIMIT ?)", (at_ms - keep_ms, bridge, _BRIDGE_PRUNE))

        return self._submit(run, weight=len(rows))


    def bridge_published(self, done: Sequence[tuple[bytes, bytes]], at_ms: int
                          ) -> Future[None]:
        """Note that claimed messages ``(key, record id)`` are records now."""
        rows = [(rid, at_ms, key) for key, rid in done]

        def run(conn: sqlite3.Connection) -> None:
            conn.executemany("UPDATE bridge_messages SET state = 1, record_id = ?, at = ?"
                             " WHERE key = ?", rows)

        return self._submit(run, weight=len(rows))


    def bridge_dead_letter(self, bridge: str, key: bytes, feed: str, topic: str,
                            reason: str, detail: str, excerpt: bytes, size: int, at_ms: int,
                            keep_rows: int) -> Future[None]:
        """Durably keep a dead letter (and its message identity, so a redelivered copy is
        not kept twice), dropping ``bridge``'s oldest beyond ``keep_rows`` (counted).
        ``topic`` and ``detail`` are cut to 2000 characters."""
        row = (bridge, at_ms, _clip(topic), _clip(reason), _clip(detail), size, excerpt)

        def run(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO bridge_messages (key, bridge, state, feed, after_seq, at)"
                " VALUES (?, ?, 2, ?, 0, ?) ON CONFLICT (key) DO UPDATE SET state = 2,"
                " at = excluded.at", (key, bridge, feed, at_ms))
            conn.execute("INSERT INTO bridge_dead_letters (bridge, at, topic, reason, detail,"
                         " size, excerpt) VALUES (?, ?, ?, ?, ?, ?, ?)", row)
            gone = conn.execute(
                "DELETE FROM bridge_dead_letters WHERE bridge = ? AND id <= (SELECT id FROM"
                " bridge_dead_letters WHERE bridge = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
                (bridge, bridge, keep_rows)).rowcount
            if gone:
                conn.execute(
                    "INSERT INTO bridge_counters (bridge, dead_dropped) VALUES (?, ?)"
                    " ON CONFLICT (bridge) DO UPDATE SET"
                    " dead_dropped = bridge_counters.dead_dropped + ?",
                    (bridge, gone, gone))

        return self._submit(run, durable=True)


    def bridge_accounted(self, record_ids: Sequence[bytes]) -> set[bytes]:
        """The subset of ``record_ids`` some bridge message is already the record of."""
        ids = list(dict.fromkeys(record_ids))
        found: set[bytes] = set()
        for start in range(0, len(ids), _IN_CHUNK):
            chunk = ids[start : start + _IN_CHUNK]
            found.update(r[0] for r in self._all(
                "SELECT record_id FROM bridge_messages WHERE record_id IN"
                f" ({','.join('?' * len(chunk))})", chunk))
        return found


    def bridge_records_after(self, origin: bytes, feed: str, after_seq: int, limit: int
                             ) -> list[bytes]:
        """Envelopes of a feed after seq ``after_seq``, in seq order, at most ``limit``
        (where a bridge looks for the record of a message claimed before a crash)."""
        return self.range(origin, feed, after_seq + 1, 2**62, limit)

    def bridge_dead_letters(self, bridge: str | None = None, limit: int = 100
                             ) -> list[DeadLetterRow]:
        """The newest ``limit`` dead letters (of ``bridge``), newest first."""
        if limit <= 0:
            return []
        cond, params = ("WHERE bridge = ?", [bridge]) if bridge is not None else ("", [])
        rows = self._all(
            "SELECT id, bridge, at, topic, reason, detail, size, excerpt FROM"
            f" bridge_dead_letters {cond} ORDER BY id DESC LIMIT ?", [*params, limit])
        return [DeadLetterRow(*r) for r in rows]


    def bridge_dead_counts(self) -> dict[str, tuple[int, int]]:
        """bridge -> (dead letters held, dead letters dropped beyond the bound)."""
        out: dict[str, tuple[int, int]] = {}
        for bridge, n in self._all("SELECT bridge, count(*) FROM bridge_dead_letters"
                                   " GROUP BY bridge"):
            out[bridge] = (int(n), 0)
        for bridge, dropped in self._all("SELECT bridge, dead_dropped FROM bridge_counters"):
            out[bridge] = (out.get(bridge, (0, 0))[0], int(dropped))
        return out


    # ------------------------------------------------------------------ sinks (v7)

    def sink_cursor(self, sink: str) -> int | None:
        """The rowid of the last record ``sink`` took on (None: it never ran)."""
        row = self._one("SELECT after_rowid FROM sink_cursors WHERE sink = ?", (sink,))
        return None if row is None else int(row[0])

    def sink_enqueue(self, sink: str, rows: Sequence[tuple[bytes, int, str]],
                     after_rowid: int) -> Future[None]:
        """Put records ``(record id, rowid, lane)`` in ``sink``'s outbox (a record already
        there is not put twice) and move its cursor to ``after_rowid``, in one
        transaction: a record is taken on once."""
        params = [(sink, lane, rid, rowid) for rid, rowid, lane in rows]
        lanes = [(sink, lane) for lane in {lane for _r, _i, lane in rows}]

        def run(conn: sqlite3.Connection) -> None:
            conn.executemany("INSERT INTO sink_outbox (sink, lane, record_id, record_rowid)"
                             " VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING", params)
            conn.executemany("INSERT INTO sink_lanes (sink, lane) VALUES (?, ?)"
                             " ON CONFLICT DO NOTHING", lanes)
            conn.execute("INSERT INTO sink_cursors (sink, after_rowid) VALUES (?, ?)"
                         " ON CONFLICT (sink) DO UPDATE SET after_rowid = CASE WHEN"
                         " excluded.after_rowid > sink_cursors.after_rowid THEN"
                         " excluded.after_rowid ELSE sink_cursors.after_rowid END",
                         (sink, after_rowid))

        return self._submit(run, weight=max(1, len(params)))

    def sink_due(self, sink: str, now_ms: int, lanes: int, per_lane: int
                 ) -> list[list[OutboxRow]]:
        """At most ``lanes`` lanes of ``sink`` that may be tried at ``now_ms``, each its
        first ``per_lane`` pending records in order."""
        due = self._all("SELECT lane FROM sink_lanes WHERE sink = ? AND next_at <= ?"
                        " ORDER BY next_at LIMIT ?", (sink, now_ms, lanes))
        out = []
        for (lane,) in due:
            rows = self._all(
                "SELECT o.id, o.lane, o.record_id, o.attempts, r.envelope, p.payload FROM"
                " sink_outbox AS o JOIN records AS r ON r.rowid = o.record_rowid LEFT JOIN"
                " payloads AS p ON p.rowid = r.rowid WHERE o.sink = ? AND o.state = 0 AND"
                " o.lane = ? ORDER BY o.id LIMIT ?",
                (sink, lane, per_lane))
            out.append([OutboxRow(r[0], r[1], r[2], r[3], with_payload(r[4], r[5]))
                        for r in rows])
        return [lane for lane in out if lane]

    def sink_next_due(self, sink: str) -> int | None:
        """When the next lane of ``sink`` may be tried (None: nothing pending)."""
        row = self._one("SELECT min(next_at) FROM sink_lanes WHERE sink = ?", (sink,))
        return None if row is None or row[0] is None else int(row[0])

    def sink_pending(self, sink: str) -> int:
        """How many records wait in ``sink``'s outbox."""
        return int(self._one("SELECT count(*) FROM sink_outbox WHERE sink = ? AND"
                             " state = 0", (sink,))[0])

    def sink_settle(self, sink: str, delivered: Sequence[int],
                    retry: Sequence[tuple[int, str, int, int, str]],
                    dead: Sequence[tuple[int, str]], lanes: Sequence[str]) -> Future[None]:
        """After a round of deliveries of ``sink`` to ``lanes``: outbox entries
        ``delivered`` are removed; ``retry`` ``(id, lane, attempts, next_at, error)``
        wait (their lane until ``next_at``); ``dead`` ``(id, error)`` were refused for
        good (kept, at most 10000 a sink); a lane with nothing pending is dropped."""
        def run(conn: sqlite3.Connection) -> None:
            conn.executemany("DELETE FROM sink_outbox WHERE id = ?", [(i,) for i in delivered])
            conn.executemany("UPDATE sink_outbox SET attempts = ?, last_error = ? WHERE id = ?",
                             [(a, _clip(e), i) for i, _l, a, _t, e in retry])
            conn.executemany("UPDATE sink_lanes SET next_at = ? WHERE sink = ? AND lane = ?",
                             [(t, sink, lane) for _i, lane, _a, t, _e in retry])
            conn.executemany("UPDATE sink_outbox SET state = 2, attempts = attempts + 1,"
                             " last_error = ? WHERE id = ?", [(_clip(e), i) for i, e in dead])
            conn.executemany(
                "DELETE FROM sink_lanes WHERE sink = ? AND lane = ? AND NOT EXISTS (SELECT"
                " 1 FROM sink_outbox WHERE sink = ? AND state = 0 AND lane = ?)",
                [(sink, lane, sink, lane) for lane in lanes])
            if dead:
                conn.execute(
                    "DELETE FROM sink_outbox WHERE sink = ? AND state = 2 AND id <= (SELECT"
                    " id FROM sink_outbox WHERE sink = ? AND state = 2 ORDER BY id DESC"
                    " LIMIT 1 OFFSET ?)", (sink, sink, _SINK_DEAD_KEPT))

        return self._submit(run, weight=max(1, len(delivered) + len(retry) + len(dead)))

    def sink_counts(self) -> dict[str, tuple[int, int]]:
        """sink -> (records pending, deliveries refused for good and kept)."""
        out: dict[str, tuple[int, int]] = {}
        for sink, state, n in self._all("SELECT sink, state, count(*) FROM sink_outbox"
                                        " GROUP BY sink, state"):
            p, d = out.get(sink, (0, 0))
            out[sink] = (p + int(n), d) if state == SINK_PENDING else (p, d + int(n))
        return out

    def sink_dead(self, sink: str, limit: int) -> list[tuple[bytes, int, str]]:
        """The newest ``limit`` deliveries ``sink`` gave up: (record id, attempts, error)."""
        return [(r[0], int(r[1]), str(r[2])) for r in self._all(
            "SELECT record_id, attempts, last_error FROM sink_outbox WHERE sink = ? AND"
            " state = 2 ORDER BY id DESC LIMIT ?", (sink, limit))]


#: ``sink_outbox.state``
SINK_PENDING, SINK_DEAD = 0, 2
_SINK_DEAD_KEPT = 10_000  # refused deliveries kept per sink (the oldest dropped)


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """A record a sink has to deliver: its outbox entry and its envelope as stored."""

    id: int
    lane: str
    record_id: bytes
    attempts: int
    envelope: bytes


_SELECT_PARTNER = (
    "SELECT node_id, public_key, url, name, tls_fingerprint, card, added_at FROM partners"
)


#: The SQLite database's name in a data dir.
DB_FILE = "citynode.db"


def open_storage(data_dir: Path, url: str = "", *, rejected_log_rows: int = 10000
                 ) -> Storage:
    """The node's storage as ``[storage] url`` chooses it: SQLite in ``DIR/citynode.db``
    when ``url`` is empty, else the PostgreSQL database it names
    (:class:`citynode.storage_pg.PgStorage`: the same methods and answers). Raises
    :class:`StorageError` as :meth:`Storage.open` and :meth:`PgStorage.open_url` do."""
    if not url:
        return Storage.open(Path(data_dir) / DB_FILE, rejected_log_rows=rejected_log_rows)
    from citynode.storage_pg import PgStorage, is_pg_url, redact

    if not is_pg_url(url):
        raise StorageError(f'[storage] url must be empty or "postgresql://...", got '
                           f"{redact(url)!r}")
    return PgStorage.open_url(url, rejected_log_rows=rejected_log_rows)



class _Names:
    """Chain ids -> (origin, feed) and type ids -> names, read on first use and kept.

    Safe to keep: an id is never reused nor renamed once committed, and a reader only
    sees committed ids. Bounded: emptied when it holds more than ``_NAMES_MAX`` entries
    (types come from records, so from others)."""

    __slots__ = ("_storage", "chains", "types")

    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        self.chains: dict[int, tuple[bytes, str]] = {}
        self.types: dict[int, str] = {}

    def chain(self, chain: int) -> tuple[bytes, str]:
        """``(origin, feed)`` of a chain id; raises :class:`StorageError`."""
        return self._get(self.chains, "chains", "origin, feed", chain,
                         lambda row: (row[0], row[1]))

    def type(self, type_id: int) -> str:
        """The name of a type id; raises :class:`StorageError`."""
        return self._get(self.types, "types", "type", type_id, lambda row: str(row[0]))

    def _get(self, cache: dict[int, T], table: str, columns: str, key: int,
             make: Callable[[Any], T]) -> T:
        got = cache.get(key)
        if got is None:
            row = self._storage._one(f"SELECT {columns} FROM {table} WHERE id = ?", (key,))
            if row is None:
                raise StorageError(f"a record names id {key} of {table}, which does not "
                                   "hold it: the database is damaged")
            if len(cache) >= _NAMES_MAX:
                cache.clear()
            got = cache[key] = make(row)
        return got


class _TreeReads:
    """A feed's leaves and stored subtree hashes, as a :class:`StoredTree` reads them."""

    __slots__ = ("_feed", "_origin", "_storage")

    def __init__(self, storage: Storage, origin: bytes, feed: str) -> None:
        self._storage, self._origin, self._feed = storage, origin, feed

    def leaf_ids(self, start: int, end: int) -> list[bytes]:
        rows = self._storage._all(_SELECT_IDS, (self._origin, self._feed, start + 1, end))
        return [r[0] for r in rows]

    def subtree_hashes(self, height: int, start: int, end: int) -> list[bytes]:
        rows = self._storage._all(
            _SELECT_SUBTREES, (self._origin, self._feed, height, start, end - 1))
        return [r[0] for r in rows]


def _check_file(conn: sqlite3.Connection, path: Path) -> int:
    """Return the schema version of the file; raise :class:`StorageError` if it is newer
    than this code or not a citynode database."""
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    app_id = int(conn.execute("PRAGMA application_id").fetchone()[0])
    if app_id not in (0, APPLICATION_ID):
        raise StorageError(
            f"{path} is not a citynode database (application id {app_id:#x}): move it "
            "away or choose another data directory"
        )
    latest = max(MIGRATIONS)
    if version > latest:
        raise StorageError(
            f"database schema v{version} is newer than this citynode understands "
            f"(v{latest}): upgrade citynode"
        )
    if version == 0:
        tables = conn.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table'")
        if tables.fetchone()[0]:
            raise StorageError(
                f"{path} holds tables but no citynode schema: it is not a citynode "
                "database; move it away or choose another data directory"
            )
    return version


_RESTORED = "restored"
_FILE_IDENTITY = "file-identity"
_XATTR = "user.citynode.tag"


def _birth_time(path: Path) -> str | None:
    """The file's creation time from statx(2) (``sec.nsec``), or None where the kernel,
    the C library or the filesystem does not keep one. No copy tool can set it: a copy
    is a new file with a new birth time."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        buf = ctypes.create_string_buffer(256)  # struct statx
        # AT_FDCWD, no flags, STATX_INO | STATX_BTIME
        if libc.statx(-100, os.fsencode(path), 0, 0x100 | 0x800, buf) != 0:
            return None
    except (AttributeError, OSError):
        return None
    (mask,) = struct.unpack_from("<I", buf, 0)
    if not mask & 0x800:
        return None
    sec, nsec = struct.unpack_from("<qI", buf, 80)  # stx_btime
    return f"{sec}.{nsec:09d}"


def _note_file_identity(conn: sqlite3.Connection, path: Path) -> None:
    """Mark the database restored if its file is not the one last opened here.

    A data dir copied back by hand (``cp -a``, ``rsync``, a restore tool) puts a new
    file where the old one was, while the content still names the file it was last
    opened as: its birth time (statx) and inode number, and a random tag also kept as
    an extended attribute (``user.citynode.tag``) of the file. A crash, a restart or an
    ``mv`` keep all three; a copy always has a new birth time (where the filesystem
    keeps one: ext4, xfs, btrfs, tmpfs), usually a new inode (the old number may be
    reused at once) and no tag (unless copied with ``cp -a`` / ``rsync -X``). A
    whole-machine snapshot rolled back is not seen: ``citynode restore`` marks
    explicitly. The device number is not used: it may change across reboots, which
    would mark every restart.

    The mark makes the node wait for a partner's confirmation before it signs on its
    own feeds, so a stale copy never re-signs a seq that partners hold.
    """
    try:
        tag: bytes | None = os.getxattr(path, _XATTR)
    except OSError:
        tag = None  # none set, or a filesystem without user xattrs
    now = f"{os.stat(path).st_ino} {_birth_time(path) or '-'}".encode()
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (_FILE_IDENTITY,)).fetchone()
    if row is not None:
        held = bytes(row[0]).split(b" ")
        want = held[2] if len(held) == 3 else b""
        if b" ".join(held[:2]) == now and (not want or tag == want):
            return  # the file last opened here
        # The mark first: a crash before the identity is updated marks again.
        conn.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) "
                     "DO NOTHING", (_RESTORED, b"the database file was copied back "
                                    b"(a new file where another was)"))
    fresh = os.urandom(8).hex().encode()
    try:
        os.setxattr(path, _XATTR, fresh)
    except OSError:
        fresh = b""
    conn.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO "
                 "UPDATE SET value = excluded.value", (_FILE_IDENTITY, now + b" " + fresh))


def _migrate(conn: sqlite3.Connection, path: Path) -> int:
    """Apply every migration the file lacks, in one IMMEDIATE transaction (checking the
    file again under the write lock: another process may have migrated it meanwhile).
    Returns the schema version the file had (0: a new file).

    Raises :class:`StorageError` if the file is newer than this code or not ours.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = _check_file(conn, path)
        latest = max(MIGRATIONS)
        if version < latest:
            db = sqlite_utils.Database(conn, recursive_triggers=False, execute_plugins=False)
            for v in range(version + 1, latest + 1):
                MIGRATIONS[v](db)
                conn.execute(f"PRAGMA user_version = {int(v)}")
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return version


#: Migrating across this schema version rewrites every record (v3, v5): the file is then
#: compacted once (:func:`_compact`), which also turns incremental vacuum on.
_COMPACTED_AT = 5


def _compact(conn: sqlite3.Connection, path: Path) -> None:
    """Give the pages a migration freed back to the file system and take the page size
    of new databases: ``VACUUM``, outside WAL mode (the only way to change the page
    size). Needs free disk space about twice the size of the database, once (SQLite's
    temporary directory: ``$TMPDIR`` or /var/tmp). A failure (disk
    full, another process holding the file) leaves the file valid, only larger: logged,
    not raised. Ends in WAL mode; raises :class:`StorageError` if it cannot."""
    from citynode.logs import fields

    log.info("compacting the database after its migration", extra=fields(path=str(path)))
    try:
        # VACUUM copies the database into a temporary one: on disk, not in memory
        # (temp_store=MEMORY would hold the whole database in RAM meanwhile).
        conn.execute("PRAGMA temp_store=FILE")
        conn.execute("PRAGMA journal_mode=DELETE")
        conn.execute(f"PRAGMA page_size={_PAGE_SIZE}")
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        conn.execute("VACUUM")
    except sqlite3.Error as exc:
        log.warning("database not compacted after its migration",
                    extra=fields(path=str(path), error=str(exc)))
    finally:
        conn.execute("PRAGMA temp_store=MEMORY")
    _wal(conn, path)


def _wal(conn: sqlite3.Connection, path: Path) -> None:
    """Put the database in WAL mode; raise :class:`StorageError` if it cannot be."""
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise StorageError(
            f"cannot put database {path} in WAL mode (got {mode!r}): keep the "
            "data directory on a local file system"
        )


# --------------------------------------------------------------------------- online backup


@dataclass(frozen=True, slots=True)
class BackupCopy:
    """What :func:`backup_database` copied: the copy's schema version, records, bytes."""

    schema_version: int
    records: int
    size: int


def backup_database(src: Path, dest: Path,
                    progress: Callable[[int, int], None] | None = None, *,
                    pages_per_step: int = 4096) -> BackupCopy:
    """Copy the database at ``src`` into a new file ``dest`` (mode 0600) with SQLite's
    online backup API, while a node may be writing to ``src``.

    The copy is one snapshot: the source connection holds one read transaction across
    every step, so the steps all read the same WAL snapshot (a write by the node between
    steps neither restarts the copy nor mixes two states into it). In WAL mode a reader
    never blocks the node's writer; only checkpoints wait for the copy to end (the WAL
    grows meanwhile). ``progress(pages_done, pages_total)`` is called after each step of
    ``pages_per_step`` pages. ``dest`` must not exist; it is not fsynced (a working
    copy: make it durable, or what is made of it, yourself). Raises :class:`StorageError` if
    ``src`` is missing, not a citynode database or cannot be read, or ``dest`` cannot be
    written (:class:`DiskFull` on a full disk); a partial ``dest`` is removed.
    """
    src, dest = Path(src), Path(dest)
    if not src.is_file():
        raise StorageError(f"no database at {src}: nothing to back up")
    try:
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.fchmod(fd, 0o600)
        os.close(fd)
    except OSError as exc:
        raise _storage_error(exc, dest, "creating the backup copy") from exc
    sconn: sqlite3.Connection | None = None
    dconn: sqlite3.Connection | None = None
    try:
        sconn = _connect(src, _BUSY_TIMEOUT_MS)
        sconn.execute("PRAGMA query_only=ON")
        _check_file(sconn, src)
        sconn.execute("BEGIN")
        sconn.execute("SELECT count(*) FROM sqlite_master").fetchone()  # the snapshot
        dconn = _connect(dest, _BUSY_TIMEOUT_MS)
        # A working copy, read back at once by the caller: no fsync of its own.
        dconn.execute("PRAGMA synchronous=OFF")

        def step(_status: int, remaining: int, total: int) -> None:
            if progress is not None:
                progress(total - remaining, total)

        sconn.backup(dconn, pages=max(1, int(pages_per_step)), progress=step)
        sconn.execute("COMMIT")
        sconn.close()
        sconn = None
        # A copy of a WAL database is in WAL mode: leave one self-contained file.
        dconn.execute("PRAGMA journal_mode=DELETE")
        version = int(dconn.execute("PRAGMA user_version").fetchone()[0])
        has = dconn.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND "
                            "name = 'records'").fetchone()[0]
        records = int(dconn.execute("SELECT count(*) FROM records").fetchone()[0]) if has else 0
        dconn.close()
        dconn = None
        return BackupCopy(version, records, dest.stat().st_size)
    except BaseException as exc:
        for c in (sconn, dconn):
            if c is not None:
                c.close()
        for suffix in ("", "-journal", "-wal", "-shm"):
            with contextlib.suppress(OSError):
                os.unlink(f"{dest}{suffix}")
        if isinstance(exc, sqlite3.Error | OSError):
            raise _storage_error(exc, src, "backing up the database") from exc
        raise
