"""The replica in PostgreSQL: the same storage, on a server several node processes share.

:class:`PgStorage` is :class:`citynode.storage.Storage` with another engine underneath:
every write job and every read of ``storage.py`` runs here unchanged (their SQL is kept
to what both engines read alike; :class:`_Conn` only turns ``?`` into psycopg's
placeholders), so the two backends cannot drift apart in what they store or answer.
What differs is below the jobs:

* Driver: psycopg 3, synchronous, because storage is synchronous code in threads (one
  writer thread, reads in the node's executor threads); readers take connections from
  a :class:`psycopg_pool.ConnectionPool`, the writer keeps one of its own.
* Writes: one transaction per batch, each job in a savepoint (as in SQLite). The batch
  first takes a transaction-scoped advisory lock (:data:`WRITE_LOCK`), so the writers of
  every process sharing the database commit one at a time: rowids commit in order (the
  cursor of streams never skips a row committed late) and a chain is re-checked under
  the lock. The UNIQUE index on (chain, seq) is the last guard: two processes can never
  store two records at one position of a feed.
* Durable before acknowledging: a batch holding a durable job (own records, the
  restored mark, the leader's address) commits with ``synchronous_commit = on`` (the
  server's WAL flush, and a synchronous standby's when one is configured); others with
  ``local`` (the server's own WAL flush: safe against a crash of the node and of the
  server; a failover may lose the last of them), at least SQLite's NORMAL.
* Bounded reads: every read connection has a ``statement_timeout``
  (:data:`READ_TIMEOUT_S`), and a query with its own ``time_limit`` sets a shorter one
  for its transaction; the server stops the statement (:class:`QueryTooSlow`).
* New records: each batch that appended records sends ``NOTIFY citynode_records`` in its
  transaction (delivered on commit); :meth:`PgStorage.listen` hands them to a callback
  in every process (live streams, leader follow-up), not polling.
* Schema: the same tables as SQLite's latest schema (``SCHEMA_VERSION``), created by
  :data:`PG_MIGRATIONS` under a version table (``citynode_schema``); a migration added to
  ``storage.MIGRATIONS`` needs its PostgreSQL twin (a test says so).
* Failover: a lost connection fails the writes and reads under way with a clear
  :class:`StorageError` (the node refuses them); the next write reconnects, the pool
  replaces broken read connections. Nothing is acknowledged that did not commit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import secrets
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import psycopg
import psycopg.errors
from psycopg import conninfo as pg_conninfo
from psycopg_pool import ConnectionPool, PoolTimeout

from citynode.core.filters import RecordFilter
from citynode.errors import (
    CitynodeError,
    DatabaseCorrupt,
    DiskFull,
    QueryTooSlow,
    StorageError,
)
from citynode.storage import (
    _RESTORED,
    _SELECT_ROW,
    BACKFILL_TIME_BOUNDS,
    CHECK_TIME_BOUNDS,
    SCHEMA_VERSION,
    TIME_BOUNDS_WRONG,
    Storage,
    _Job,
    _query_sql,
)

log = logging.getLogger("citynode.storage")

__all__ = ["PG_MIGRATIONS", "READ_TIMEOUT_S", "WRITE_LOCK", "PgStorage", "is_pg_url",
           "redact"]

#: Advisory lock keys (one 64-bit space per database): the writers' and migrations'.
WRITE_LOCK = 0x636E6F6401
MIGRATE_LOCK = 0x636E6F6402
LEADER_LOCK = 0x636E6F6403
#: ``synchronous_commit`` of a batch without a durable job (partners' records, sink
#: outbox, cursors): ``local`` waits for the server's own WAL flush, not a synchronous
#: standby's -- nothing committed is lost in a crash of the node or of the database
#: server (``off`` could lose the last few hundred ms of them in a server crash); a
#: failover to a standby may lose the last of them, which partners send again.
NON_DURABLE_COMMIT = "local"
#: The channel of :meth:`PgStorage.listen`.
CHANNEL = "citynode_records"
#: No read runs longer than this on the server, whatever asked for it.
READ_TIMEOUT_S = 60.0
_CONNECT_TIMEOUT_S = 10
_POOL_MAX = 16
#: A read waits this long for a connection (all busy, or the server down) before it
#: fails with a StorageError.
_POOL_WAIT_S = 5.0


def is_pg_url(url: str) -> bool:
    """Does ``[storage] url`` name a PostgreSQL database?"""
    return url.startswith(("postgresql://", "postgres://"))


def redact(url: str) -> str:
    """The URL without its password (for messages and logs)."""
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


# --------------------------------------------------------------------------- schema

#: Tables as SQLite's schema v6 has them (see the migrations in storage.py for why each
#: column and index is there). TEXT is compared by bytes (COLLATE "C"), as SQLite does:
#: range scans such as meta's ``key >= 'card:'`` and the order of feeds depend on it.
#: ``fork_proofs.proof`` is unique by its hash: a B-tree entry must stay under ~2.7 kB.
_SCHEMA_V6 = """
CREATE TABLE chains (
    id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    origin BYTEA NOT NULL,
    feed TEXT COLLATE "C" NOT NULL,
    head_seq BIGINT NOT NULL,
    head_id BYTEA NOT NULL,
    UNIQUE (origin, feed)
);
CREATE TABLE types (
    id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    type TEXT COLLATE "C" NOT NULL UNIQUE
);
CREATE TABLE records (
    rowid BIGINT PRIMARY KEY,
    chain BIGINT NOT NULL REFERENCES chains (id),
    seq BIGINT NOT NULL,
    type_id BIGINT NOT NULL REFERENCES types (id),
    time BIGINT NOT NULL,
    lon DOUBLE PRECISION,
    lat DOUBLE PRECISION,
    received_at BIGINT NOT NULL,
    id BYTEA NOT NULL,
    envelope BYTEA NOT NULL,
    erased_by BYTEA
);
CREATE UNIQUE INDEX records_chain_seq ON records (chain, seq);
CREATE INDEX records_id8 ON records (substr(id, 1, 8));
CREATE INDEX records_type_time ON records (type_id, time);
CREATE INDEX records_lon_lat ON records (lon, lat) WHERE lat IS NOT NULL;
CREATE TABLE payloads (rowid BIGINT PRIMARY KEY, payload BYTEA NOT NULL);
CREATE TABLE erasures (
    id BYTEA NOT NULL,
    origin BYTEA NOT NULL,
    feed TEXT COLLATE "C" NOT NULL,
    seq BIGINT NOT NULL,
    by BYTEA NOT NULL,
    reason TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY (id, origin, feed, seq)
);
CREATE TABLE partners (
    node_id TEXT COLLATE "C" PRIMARY KEY,
    public_key BYTEA NOT NULL UNIQUE,
    url TEXT COLLATE "C" NOT NULL,
    name TEXT COLLATE "C" NOT NULL,
    tls_fingerprint BYTEA,
    card BYTEA,
    added_at BIGINT NOT NULL
);
CREATE TABLE fork_proofs (
    id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    origin BYTEA NOT NULL,
    feed TEXT COLLATE "C" NOT NULL,
    seq BIGINT NOT NULL,
    kind TEXT COLLATE "C" NOT NULL,
    proof BYTEA NOT NULL,
    found_at BIGINT NOT NULL,
    reported_by TEXT COLLATE "C"
);
CREATE UNIQUE INDEX fork_proofs_proof ON fork_proofs (sha256(proof));
CREATE INDEX fork_proofs_feed ON fork_proofs (origin, feed);
CREATE TABLE rejected (
    id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    at BIGINT NOT NULL,
    source TEXT COLLATE "C" NOT NULL,
    reason TEXT COLLATE "C" NOT NULL,
    detail TEXT COLLATE "C" NOT NULL
);
CREATE TABLE checkpoints (
    origin BYTEA NOT NULL,
    feed TEXT COLLATE "C" NOT NULL,
    size BIGINT NOT NULL,
    root BYTEA NOT NULL,
    envelope BYTEA NOT NULL,
    PRIMARY KEY (origin, feed, size)
);
CREATE TABLE meta (key TEXT COLLATE "C" PRIMARY KEY, value BYTEA);
CREATE TABLE merkle (
    origin BYTEA NOT NULL,
    feed TEXT COLLATE "C" NOT NULL,
    height INTEGER NOT NULL,
    idx BIGINT NOT NULL,
    hash BYTEA NOT NULL,
    PRIMARY KEY (origin, feed, height, idx)
);
CREATE TABLE bridge_messages (
    key BYTEA PRIMARY KEY,
    bridge TEXT COLLATE "C" NOT NULL,
    state INTEGER NOT NULL,
    feed TEXT COLLATE "C" NOT NULL,
    after_seq BIGINT NOT NULL,
    record_id BYTEA,
    at BIGINT NOT NULL
);
CREATE INDEX bridge_messages_at ON bridge_messages (at);
CREATE INDEX bridge_messages_record ON bridge_messages (record_id)
    WHERE record_id IS NOT NULL;
CREATE TABLE bridge_dead_letters (
    id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    bridge TEXT COLLATE "C" NOT NULL,
    at BIGINT NOT NULL,
    topic TEXT COLLATE "C" NOT NULL,
    reason TEXT COLLATE "C" NOT NULL,
    detail TEXT COLLATE "C" NOT NULL,
    size BIGINT NOT NULL,
    excerpt BYTEA NOT NULL
);
CREATE INDEX bridge_dead_letters_bridge ON bridge_dead_letters (bridge, id);
CREATE TABLE bridge_counters (
    bridge TEXT COLLATE "C" PRIMARY KEY,
    dead_dropped BIGINT NOT NULL
);
CREATE TABLE card_history (
    node BYTEA NOT NULL,
    time BIGINT NOT NULL,
    envelope BYTEA NOT NULL,
    PRIMARY KEY (node, time)
);
"""


def _create_v6(conn: psycopg.Connection[Any]) -> None:
    """A new database: SQLite's schema v1..v6 at once (nothing to carry over)."""
    conn.execute(_SCHEMA_V6)


def _migrate_liveness(conn: psycopg.Connection[Any]) -> None:
    """Schema v7 (storage._migrate_liveness): the newest liveness statement per feed."""
    conn.execute(
        """CREATE TABLE liveness (
            origin BYTEA NOT NULL,
            feed TEXT COLLATE "C" NOT NULL,
            size BIGINT NOT NULL,
            time BIGINT NOT NULL,
            root BYTEA NOT NULL,
            envelope BYTEA NOT NULL,
            grew_at BIGINT NOT NULL,
            PRIMARY KEY (origin, feed)
        )""")


def _migrate_sinks(conn: psycopg.Connection[Any]) -> None:
    """Schema v8 (storage._migrate_sinks): the sinks' cursors, outboxes and lanes."""
    conn.execute(
        """CREATE TABLE sink_cursors (
            sink TEXT COLLATE "C" PRIMARY KEY,
            after_rowid BIGINT NOT NULL
        );
        CREATE TABLE sink_outbox (
            id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
            sink TEXT COLLATE "C" NOT NULL,
            lane TEXT COLLATE "C" NOT NULL,
            record_id BYTEA NOT NULL,
            record_rowid BIGINT NOT NULL,
            state INTEGER NOT NULL DEFAULT 0,
            attempts INTEGER NOT NULL DEFAULT 0,
            last_error TEXT COLLATE "C",
            UNIQUE (sink, record_id)
        );
        CREATE INDEX sink_outbox_lanes ON sink_outbox (sink, state, lane, id);
        CREATE TABLE sink_lanes (
            sink TEXT COLLATE "C" NOT NULL,
            lane TEXT COLLATE "C" NOT NULL,
            next_at BIGINT NOT NULL DEFAULT 0,
            PRIMARY KEY (sink, lane)
        );
        CREATE INDEX sink_lanes_due ON sink_lanes (sink, next_at)""")


def _migrate_chain_time(conn: psycopg.Connection[Any]) -> None:
    """Schema v9 (storage._migrate_chain_time): records by (chain, time), a time range
    inside one feed one index range."""
    conn.execute("CREATE INDEX records_chain_time ON records (chain, time)")


def _migrate_cosignatures(conn: psycopg.Connection[Any]) -> None:
    """Schema v10 (storage._migrate_cosignatures): witness cosignatures of checkpoints."""
    conn.execute(
        """CREATE TABLE cosignatures (
            origin BYTEA NOT NULL,
            feed TEXT COLLATE "C" NOT NULL,
            size BIGINT NOT NULL,
            root BYTEA NOT NULL,
            witness BYTEA NOT NULL,
            time BIGINT NOT NULL,
            envelope BYTEA NOT NULL,
            PRIMARY KEY (origin, feed, size, root, witness)
        );
        CREATE INDEX cosignatures_witness ON cosignatures (witness, origin, feed, size)""")


def _migrate_type_rowid(conn: psycopg.Connection[Any]) -> None:
    """Schema v11 (storage._migrate_type_rowid): records by type in rowid order, the
    order of a page of one type (PostgreSQL names the rowid column; SQLite's index holds
    it implicitly)."""
    conn.execute("CREATE INDEX records_type ON records (type_id, rowid)")


def _migrate_time_bounds(conn: psycopg.Connection[Any]) -> None:
    """Schema v12 (storage._migrate_time_bounds): each record's running maximum of time
    in its feed (seq order) and in the table (rowid order), filled from the rows held,
    and indexed so that a ``since`` is a lower bound on position (PostgreSQL names the
    rowid column; SQLite's index holds it implicitly)."""
    conn.execute("ALTER TABLE records ADD COLUMN tmax BIGINT, ADD COLUMN tmax_all BIGINT")
    conn.execute(BACKFILL_TIME_BOUNDS)
    # A process of the older code still running on this database (a rolling upgrade)
    # would insert rows without them, and the writer after it take a missing maximum
    # for "no earlier record": the bound would then skip rows. Refused instead.
    conn.execute("ALTER TABLE records ALTER COLUMN tmax SET NOT NULL,"
                 " ALTER COLUMN tmax_all SET NOT NULL")
    conn.execute("CREATE INDEX records_chain_tmax ON records (chain, tmax, seq)")
    conn.execute("CREATE INDEX records_tmax_all ON records (tmax_all, rowid)")


#: Migration to schema version N (the version numbers of ``storage.MIGRATIONS``). The
#: first one a new database runs creates the whole schema of its version; later ones
#: mirror SQLite's, one for one. Each runs in the transaction that records its version.
PG_MIGRATIONS: dict[int, Callable[[psycopg.Connection[Any]], None]] = {
    6: _create_v6, 7: _migrate_liveness, 8: _migrate_sinks,
    9: _migrate_chain_time, 10: _migrate_cosignatures, 11: _migrate_type_rowid,
    12: _migrate_time_bounds}


def _migrate(conn: psycopg.Connection[Any], where: str) -> int:
    """Bring the database to SCHEMA_VERSION in one transaction, under an advisory lock
    (several processes may start at once). Returns the version it had (0: new).
    Raises StorageError if it is newer than this code or not a citynode database."""
    with conn.transaction():
        # A migration (an index built on a large table) takes as long as it takes: no
        # writer's bounds here.
        conn.execute("SET LOCAL lock_timeout = 0")
        conn.execute("SET LOCAL idle_in_transaction_session_timeout = 0")
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS citynode_schema (version INTEGER NOT NULL)")
        row = conn.execute("SELECT max(version) FROM citynode_schema").fetchone()
        version = int(row[0]) if row and row[0] is not None else 0
        latest = max(PG_MIGRATIONS)
        if version > latest:
            raise StorageError(
                f"database schema v{version} of {where} is newer than this citynode "
                f"understands (v{latest}): upgrade citynode")
        if version == 0:
            held = conn.execute(
                "SELECT count(*) FROM pg_tables WHERE schemaname = current_schema()"
                " AND tablename = 'records'").fetchone()
            if held and held[0]:
                raise StorageError(
                    f"{where} holds a records table but no citynode schema: it is not a "
                    "citynode database; choose another database")
            first = min(PG_MIGRATIONS)
            PG_MIGRATIONS[first](conn)
            version_now = first
        else:
            version_now = version
        for v in range(version_now + 1, latest + 1):
            PG_MIGRATIONS[v](conn)
        if latest != version:
            conn.execute("DELETE FROM citynode_schema")
            conn.execute("INSERT INTO citynode_schema (version) VALUES (%s)", (latest,))
    return version


# --------------------------------------------------------------------------- errors


def _pg_error(exc: BaseException, where: str, action: str) -> StorageError:
    """Turn a psycopg error into a one-line :class:`StorageError` an operator can act on."""
    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, psycopg.errors.DiskFull):
        return DiskFull(f"the database server's disk is full while {action} ({where}): "
                        "free some space there")
    if isinstance(exc, psycopg.errors.DataCorrupted | psycopg.errors.IndexCorrupted):
        return DatabaseCorrupt(f"the database server reports damage in {where}: {exc}")
    if isinstance(exc, psycopg.errors.ReadOnlySqlTransaction):
        return StorageError(
            f"the database {where} is read-only (a standby, or failing over) while "
            f"{action}: writes are refused until a primary answers")
    if isinstance(exc, psycopg.IntegrityError):
        return StorageError(f"database constraint failed while {action}: {exc}")
    if isinstance(exc, psycopg.OperationalError | PoolTimeout):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return StorageError(
            f"database {where} unreachable while {action} ({first}): writes and reads "
            "are refused until it answers again (the node reconnects by itself)")
    if isinstance(exc, OverflowError | psycopg.DataError):
        return StorageError(f"a number in the query is out of range: {exc}")
    return StorageError(f"database error while {action} ({where}): {exc}")


# --------------------------------------------------------------------------- connection


_SQL_CACHE: dict[str, str] = {}


def _sql(sql: str) -> str:
    """SQLite's ``?`` placeholders as psycopg's ``%s`` (a literal ``%`` doubled)."""
    out = _SQL_CACHE.get(sql)
    if out is None:
        out = sql.replace("%", "%%").replace("?", "%s")
        if len(_SQL_CACHE) < 4096:
            _SQL_CACHE[sql] = out
    return out


def _param(v: Any) -> Any:
    # PostgreSQL text cannot hold NUL (SQLite's can): what comes from outside (the
    # rejected log's details, a dead letter's topic) keeps its other characters.
    if isinstance(v, str) and "\x00" in v:
        return v.replace("\x00", "\ufffd")
    return v


def _params(params: Sequence[Any] | None) -> Sequence[Any]:
    return [_param(v) for v in params] if params else ()


class _Conn:
    """What the jobs and reads of storage.py call on a connection (``execute``,
    ``executemany`` and the cursor they return), on a psycopg connection."""

    __slots__ = ("raw",)

    def __init__(self, raw: psycopg.Connection[Any]) -> None:
        self.raw = raw

    def execute(self, sql: str, params: Sequence[Any] | None = None) -> psycopg.Cursor[Any]:
        return self.raw.execute(_sql(sql), _params(params))

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> psycopg.Cursor[Any]:
        cur = self.raw.cursor()
        rows = list(rows)
        if rows:
            cur.executemany(_sql(sql), [_params(r) for r in rows])
        return cur


#: Every connection notices a server gone silent (a cut network, a failed machine)
#: within about 10 s instead of TCP's many minutes: the write or read under way fails
#: with a StorageError and the next one reconnects.
_CLIENT_KEEPALIVE: dict[str, Any] = {"keepalives": 1, "keepalives_idle": 4,
                                     "keepalives_interval": 2, "keepalives_count": 3}
#: And the server notices a client gone silent the same way, on every connection, and
#: ends its session (a killed process closes its socket at once: ended then).
_SERVER_KEEPALIVE = ("-c tcp_keepalives_idle=4 -c tcp_keepalives_interval=2"
                     " -c tcp_keepalives_count=3")
#: A writer stopped inside its transaction (SIGSTOP, a hung thread) holds the writers'
#: lock: the server ends such a session after this long idle in its transaction (its
#: commit then fails, it never lands late), and a writer waits at most this long for
#: the lock before its batch is retried (:data:`_LOCK_TRIES` times) or fails.
WRITER_IDLE_S = 10.0
_LOCK_TRIES = 3
#: A leader that has not renewed its lease (the heartbeat on its leadership session)
#: for this long is stopped by a follower (pg_terminate_backend on every session of
#: that process): a leader frozen with its sockets still open (SIGSTOP, a hung event
#: loop) -- which TCP keepalives never notice, its kernel answers them -- cannot hold
#: the leadership, nor the writers' lock, for ever. A terminated leader's write under
#: way fails with its session: it never lands after the takeover.
LEASE_S = 10.0
#: How often the leader renews its lease.
RENEW_S = 0.5
_WRITER_OPTIONS = (f"{_SERVER_KEEPALIVE}"
                   f" -c idle_in_transaction_session_timeout={int(WRITER_IDLE_S * 1000)}"
                   f" -c lock_timeout={int(WRITER_IDLE_S * 1000)}")


class _Seldom(logging.Filter):
    """Lets a repeated warning through once, then once every :data:`REPEAT_S` with how
    many were held back: a database away for minutes is a few lines, not one a second
    from every thread that retries (the pool's reconnections, the listener)."""

    REPEAT_S = 30.0

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes
        self._last: dict[str, tuple[float, int]] = {}
        self._mutex = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        key = next((p for p in self.prefixes if msg.startswith(p)), None)
        if key is None:
            return True
        now = record.created
        with self._mutex:
            at, held = self._last.get(key, (0.0, 0))
            if now - at < self.REPEAT_S:
                self._last[key] = (at, held + 1)
                return False
            self._last[key] = (now, 0)
        if held:
            record.msg = f"{msg} ({held} more like it in the last {self.REPEAT_S:.0f} s)"
            record.args = None
        return True


_SELDOM = _Seldom(("error connecting in 'citynode-readers'", "cannot listen for new records"))
logging.getLogger("psycopg.pool").addFilter(_SELDOM)
log.addFilter(_SELDOM)


def _connect(url: str, tag: str = "", options: str = _SERVER_KEEPALIVE, **kwargs: Any
             ) -> psycopg.Connection[Any]:
    """A connection named ``citynode TAG`` (every session of one storage carries its
    tag: a follower can end them all, :class:`_Leadership`)."""
    return psycopg.connect(url, connect_timeout=_CONNECT_TIMEOUT_S,
                           application_name=f"citynode {tag}".strip(),
                           options=options, **_CLIENT_KEEPALIVE, **kwargs)


class _Leadership:
    """A session-level advisory lock (:data:`LEADER_LOCK`) on a connection of its own:
    held while that session lives. The server frees it when the process dies (its
    socket closes) or its session is lost; then another process takes it.

    The lease: the holder renews it at every check (a statement on that session, whose
    ``state_change`` in ``pg_stat_activity`` is the server's own clock); a follower that
    finds it older than :data:`LEASE_S` ends every session of the holder's storage
    (same ``application_name``) and takes the lock at a later check."""

    def __init__(self, url: str, where: str, tag: str) -> None:
        self.url, self.where, self.tag = url, where, tag
        self.conn: psycopg.Connection[Any] | None = None
        self.held = False
        self._lock = threading.Lock()
        self._beating: threading.Thread | None = None
        self._stop = threading.Event()

    def _heartbeat(self) -> None:
        """Renew the lease every :data:`RENEW_S` while held, in a thread of its own: a
        leader whose event loop or executor is busy (slow reads) is not taken for a
        frozen one; a stopped process (SIGSTOP) stops this thread too."""
        while not self._stop.wait(RENEW_S):
            with self._lock:
                if not self.held or self.conn is None:
                    continue
                # A failure: hold() finds the session gone and says so.
                with contextlib.suppress(psycopg.Error):
                    self.conn.execute("SELECT 1")

    def hold(self) -> bool:
        with self._lock:
            try:
                if self.conn is None or self.conn.closed or self.conn.broken:
                    self.drop()
                    self.conn = _connect(self.url, self.tag, autocommit=True)
                if self.held:
                    self.conn.execute("SELECT 1")  # the session lives: the lock is ours
                    return True
                row = self.conn.execute("SELECT pg_try_advisory_lock(%s)",
                                        (LEADER_LOCK,)).fetchone()
                self.held = bool(row and row[0])
                if not self.held:
                    self._end_stale_holder()
                elif self._beating is None:
                    self._beating = threading.Thread(target=self._heartbeat, daemon=True,
                                                     name="citynode-leader-lease")
                    self._beating.start()
            except psycopg.Error as exc:
                if self.held:
                    log.error("leadership lost: %s", _pg_error(exc, self.where, "leading"))
                self.drop()
            return self.held

    def _end_stale_holder(self) -> None:
        """End every session of a leader that stopped renewing its lease."""
        assert self.conn is not None
        row = self.conn.execute(
            "SELECT a.pid, a.application_name FROM pg_locks AS l JOIN pg_stat_activity"
            " AS a ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted"
            " AND l.database = (SELECT oid FROM pg_database WHERE datname ="
            " current_database()) AND l.classid = %s AND l.objid = %s AND l.objsubid = 1"
            " AND a.state = 'idle' AND a.state_change < clock_timestamp()"
            " - make_interval(secs => %s)",
            (LEADER_LOCK >> 32, LEADER_LOCK & 0xFFFFFFFF, LEASE_S)).fetchone()
        if row is None:
            return
        pid, name = row
        # Its writer too (same name): a commit it has under way fails, never lands.
        ended = self.conn.execute(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM"
            " pg_stat_activity WHERE ((application_name = %s AND %s <> 'citynode')"
            " OR pid = %s) AND pid <> pg_backend_pid()", (name, name, pid)).fetchone()
        log.error("the leading process stopped renewing its lease (no sign of life for "
                  "%.0f s, its sockets still open: stopped or hung): its %s database "
                  "session(s) ended, another process takes over", LEASE_S,
                  ended[0] if ended else 0)

    def drop(self) -> None:
        self.held = False
        if self.conn is not None:
            with contextlib.suppress(psycopg.Error):
                self.conn.close()
            self.conn = None


# --------------------------------------------------------------------------- reads

_ROW_COLS = ("rowid", "id", "chain", "seq", "type_id", "time", "lon", "lat", "received_at",
             "envelope")
_PG_INNER = ("SELECT " + ", ".join(f"r.{c}" for c in _ROW_COLS) + ", r.erased_by"
             " FROM records AS r LEFT JOIN chains AS c ON c.id = r.chain"
             " LEFT JOIN types AS t ON t.id = r.type_id")


def _pg_query_sql(where: RecordFilter, after_rowid: int, limit: int,
                  only_feeds: Sequence[tuple[bytes, str]] | None, *, seq_walk: bool = False,
                  type_id: int | None = None) -> tuple[str, list[Any]]:
    """:meth:`Storage.query`'s statement (``storage._query_sql``: the same conditions,
    order and limit) with the payloads joined after the LIMIT, not before: PostgreSQL
    joins before it sorts, so a time range of one feed sorted by seq looked up the
    payload of every record in the range, not of the ``limit`` returned (EXPLAIN
    ANALYZE: a 1-hour range of 1,800 records made 1,800 payload lookups for 100 rows)."""
    sql, params = _query_sql(where, after_rowid, limit, only_feeds)
    if not sql.startswith(_SELECT_ROW):
        raise AssertionError("storage._query_sql changed its SELECT: update _pg_query_sql")
    order = "seq" if where.one_feed else "rowid"
    if where.one_feed and seq_walk:
        # ``seq_walk`` (one feed, no time range or a wide one: PgStorage._query_sql):
        # the chain's id is looked up first (an InitPlan), so the chain is an index
        # condition and the order comes from (chain, seq): the walk stops after
        # ``limit`` rows. Through the join to chains the order could not come from an
        # index: every record in range was read and sorted for 100 (review of #17:
        # 25k rows of a feed for since=1). A narrow range keeps the join: read through
        # (chain, time), then sorted. (The same parameters, in the same order.)
        named = " AND origin = ? AND feed = ?"
        if sql.count(named) != 1:
            raise AssertionError("storage._query_sql changed its conditions: update "
                                 "_pg_query_sql")
        sql = sql.replace(named, " AND r.chain = (SELECT c1.id FROM chains AS c1 WHERE"
                                 " c1.origin = ? AND c1.feed = ?)")
    if type_id is not None:
        # ``type_id`` (a type with no feed and no time range: PgStorage._query_sql): the
        # type by its id, a value the planner weighs with the column's statistics, so
        # that (type_id, rowid) -- schema v11 -- serves a rare type as one index range in
        # the ORDER BY's order, stopping at LIMIT. Through the join to types (or an
        # InitPlan: a value unknown when planning) PostgreSQL walked the table by rowid
        # to fill a page of a rare type (review of #17).
        named = " AND type = ?"
        if sql.count(named) != 1:
            raise AssertionError("storage._query_sql changed its conditions: update "
                                 "_pg_query_sql")
        at = sql[:sql.index(named)].count("?")
        sql = sql.replace(named, " AND r.type_id = ?")
        params[at] = type_id
    inner = _PG_INNER + sql[len(_SELECT_ROW):]
    outer = ("SELECT " + ", ".join(f"q.{c}" for c in _ROW_COLS) + ", p.payload, q.erased_by"
             f" FROM ({inner}) AS q LEFT JOIN payloads AS p ON p.rowid = q.rowid"
             f" ORDER BY q.{order}")
    return outer, params


# --------------------------------------------------------------------------- identity

#: Meta key: which database, of which server history, this one was when last opened.
DATABASE_IDENTITY = "database-identity"


def _note_database_identity(conn: psycopg.Connection[Any]) -> None:
    """Mark the database restored if it is not the one last opened: SQLite's file
    identity (storage._note_file_identity), for a server. A database restored from
    ``pg_dump`` is a new database (its OID differs from the one it names); a base
    backup recovered to a point in time, or a standby promoted by a failover, runs on a
    new timeline of the server's history (and a new cluster has a new system
    identifier). Any of them may lack records this node signed and partners hold; the
    mark makes the node wait for its partners' confirmation before signing on its own
    feeds. (A server restarted, or the same database reopened, keeps all three.) The
    system identifier and timeline need the right to read the server's control data
    (superuser or ``pg_monitor`` role); without it only the OID is compared."""
    with conn.transaction():
        (oid,), = conn.execute("SELECT oid FROM pg_database WHERE datname ="
                               " current_database()").fetchall()
        now = str(oid)
        try:
            with conn.transaction():
                row = conn.execute(
                    "SELECT (SELECT system_identifier FROM pg_control_system()),"
                    " (SELECT timeline_id FROM pg_control_checkpoint())").fetchone()
            if row is not None:
                now += f" {row[0]} {row[1]}"
        except psycopg.errors.InsufficientPrivilege:
            pass
        held = conn.execute("SELECT value FROM meta WHERE key = %s",
                            (DATABASE_IDENTITY,)).fetchone()
        if held is not None and bytes(held[0]).decode() != now:
            was = bytes(held[0]).decode().split(" ")
            # Only what both readings have is compared (the rights may differ).
            if any(a != b for a, b in zip(was, now.split(" "), strict=False)):
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES (%s, %s) ON CONFLICT (key) DO"
                    " NOTHING", (_RESTORED, b"the database is not the one last opened (a "
                                 b"restore, or a failover to another server's history)"))
        conn.execute("INSERT INTO meta (key, value) VALUES (%s, %s) ON CONFLICT (key) DO"
                     " UPDATE SET value = excluded.value", (DATABASE_IDENTITY, now.encode()))


# --------------------------------------------------------------------------- checks

#: How long one whole-table check of :meth:`PgStorage.quick_check` may run.
_CHECK_TIME_LIMIT_S = 3600.0
#: (count query, finding) of :meth:`PgStorage.quick_check`: rows that break what the
#: writer keeps true in every transaction (counts of 0 when the database is whole).
_CONSISTENCY = (
    ("SELECT count(*) FROM chains AS c WHERE NOT EXISTS (SELECT 1 FROM records AS r"
     " WHERE r.chain = c.id AND r.seq = c.head_seq AND r.id = c.head_id)",
     "{n} feed(s) whose head is not a record held"),
    ("SELECT count(*) FROM records AS r JOIN chains AS c ON c.id = r.chain"
     " WHERE r.seq > c.head_seq",
     "{n} record(s) past their feed's head"),
    ("SELECT count(*) FROM payloads AS p WHERE NOT EXISTS (SELECT 1 FROM records AS r"
     " WHERE r.rowid = p.rowid)",
     "{n} payload(s) without their record"),
    (CHECK_TIME_BOUNDS, TIME_BOUNDS_WRONG),
)


# --------------------------------------------------------------------------- storage


class PgStorage(Storage):
    """:class:`Storage` on PostgreSQL. Make one with :meth:`open_url`."""

    def __init__(self, url: str, wconn: psycopg.Connection[Any], rejected_log_rows: int,
                 pool: ConnectionPool[Any], tag: str) -> None:
        """Internal: use :meth:`open_url`."""
        self.url = url
        self.tag = tag
        self.where = redact(url)
        self._pool = pool
        self._leadership = _Leadership(url, self.where, tag)
        self._pg = wconn
        # The base class keeps a path for messages and the writer thread's name.
        super().__init__(Path(self.where), wconn, rejected_log_rows, 0)  # type: ignore[arg-type]

    @classmethod
    def open_url(cls, url: str, *, rejected_log_rows: int = 10000,
                 allow_migrating: bool = False) -> PgStorage:
        """Connect to the PostgreSQL database at ``url`` and bring its schema to
        SCHEMA_VERSION. Raises :class:`StorageError` if it cannot be reached, is not a
        citynode database, has a newer schema than this code, or a copy from SQLite
        into it is unfinished (``citynode storage migrate``; unless
        ``allow_migrating``)."""
        where = redact(url)
        try:
            pg_conninfo.conninfo_to_dict(url)
        except psycopg.ProgrammingError as exc:
            raise StorageError(f"[storage] url {where} is not a valid PostgreSQL URL: "
                               f"{exc}") from exc
        wconn: psycopg.Connection[Any] | None = None
        # Names every session of this storage (its leadership lease, :class:`_Leadership`).
        tag = secrets.token_hex(6)
        try:
            wconn = _connect(url, tag, _WRITER_OPTIONS, autocommit=True)
            _migrate(wconn, where)
            if not allow_migrating and wconn.execute(
                    "SELECT 1 FROM meta WHERE key = %s", (MIGRATING,)).fetchone():
                raise StorageError(
                    f"{where} holds an unfinished copy of an SQLite node: run `citynode "
                    "storage migrate` again to finish it before using the database")
            _note_database_identity(wconn)
            timeout_ms = int(READ_TIMEOUT_S * 1000)
            pool: ConnectionPool[Any] = ConnectionPool(
                url, min_size=1, max_size=_POOL_MAX, open=True, timeout=_POOL_WAIT_S,
                kwargs={"autocommit": True, "connect_timeout": _CONNECT_TIMEOUT_S,
                        "application_name": f"citynode {tag}", **_CLIENT_KEEPALIVE,
                        "options": f"{_SERVER_KEEPALIVE} -c statement_timeout={timeout_ms}"
                                   " -c default_transaction_read_only=on"},
                name="citynode-readers")
        except BaseException as exc:
            if wconn is not None:
                wconn.close()
            if isinstance(exc, CitynodeError):
                raise
            if isinstance(exc, psycopg.Error | PoolTimeout):
                raise _pg_error(exc, where, "opening the database") from exc
            raise
        return cls(url, wconn, rejected_log_rows, pool, tag)

    def _translate(self, exc: BaseException, action: str) -> StorageError:
        return _pg_error(exc, self.where, action)

    def quick_check(self, max_errors: int = 20) -> list[str]:
        """What SQLite's quick_check finds in a file, on the server: findings (at most
        ``max_errors``), empty if none. PostgreSQL keeps its pages whole itself (WAL,
        data checksums when the cluster has them); here, that the database holds this
        schema, no index is left invalid (an interrupted build), every feed's head is a
        record held and no record lies past it, no payload is left without its record,
        every record's running maxima of time are right (schema v12), and -- when
        the DBA installed the ``amcheck`` extension -- every B-tree index of
        the schema passes ``bt_index_check``. The records themselves are re-verified by
        ``citynode check`` (audit.check_storage), on both engines. Raises
        :class:`StorageError` if the server cannot be reached."""
        row = self._one("SELECT max(version) FROM citynode_schema")
        if row is None or row[0] != SCHEMA_VERSION:
            return [f"schema version {row[0] if row else None}, expected {SCHEMA_VERSION}"]
        out: list[str] = []
        for (name,) in self._all(
                "SELECT i.indexrelid::regclass::text FROM pg_index AS i JOIN pg_class AS c"
                " ON c.oid = i.indrelid JOIN pg_namespace AS n ON n.oid = c.relnamespace"
                " WHERE n.nspname = current_schema() AND NOT (i.indisvalid AND i.indisready)"
                " ORDER BY 1"):
            out.append(f"index {name} is invalid (a build was interrupted): REINDEX it")
        # Whole-table checks: as long as they take (the 60 s read bound is for readers).
        slow = _CHECK_TIME_LIMIT_S
        for sql, what in _CONSISTENCY:
            (n,), = self._all(sql, (), slow)
            if n:
                out.append(what.format(n=n))
        if self._one("SELECT 1 FROM pg_extension WHERE extname = 'amcheck'"):
            for (name,) in self._all(
                    "SELECT c.relname FROM pg_index AS i JOIN pg_class AS c ON"
                    " c.oid = i.indexrelid JOIN pg_am AS a ON a.oid = c.relam JOIN"
                    " pg_namespace AS n ON n.oid = c.relnamespace WHERE a.amname = 'btree'"
                    " AND n.nspname = current_schema() AND i.indisvalid ORDER BY 1"):
                try:
                    self._all("SELECT bt_index_check(c.oid) FROM pg_class AS c JOIN"
                              " pg_namespace AS n ON n.oid = c.relnamespace WHERE"
                              " c.relname = ? AND n.nspname = current_schema()",
                              (name,), slow)
                except StorageError as exc:
                    out.append(f"index {name}: {exc}")
        return out[:max_errors]

    def close(self) -> None:
        """Finish every write already submitted, stop the writer, close the
        connections. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._stopping = True  # the writer finishes what is queued, then exits
            self._jobs_ready.notify()
        self._thread.join()
        with self._lock:
            self._reads_done.wait_for(lambda: self._reads == 0, timeout=60)
        self._pool.close()
        self._pg.close()
        self._stop_listening()
        self._leadership._stop.set()  # no more renewals
        with self._leadership._lock:
            self._leadership.drop()

    # ------------------------------------------------------------------ writer

    def _writer_conn(self) -> psycopg.Connection[Any]:
        """The writer's connection, reconnected if the last one was lost (a restarted
        or failed-over server)."""
        if self._pg.closed or self._pg.broken:
            with contextlib.suppress(psycopg.Error):
                self._pg.close()
            self._pg = _connect(self.url, self.tag, _WRITER_OPTIONS, autocommit=True)
            log.warning("database connection re-established")
        return self._pg

    def _run_batch(self, batch: list[_Job]) -> None:
        jobs = [j for j in batch if j[1].set_running_or_notify_cancel()]
        if not jobs:
            return
        durable = any(j[2] for j in jobs)
        outcomes: list[tuple[Future[Any], Any, BaseException | None]] = []
        wrote = False
        try:
            conn = self._writer_conn()
            c = _Conn(conn)
            with conn.transaction():
                # One writer at a time among every process sharing the database.
                self._write_lock(conn)
                conn.execute("SELECT set_config('synchronous_commit', %s, true)",
                             ("on" if durable else NON_DURABLE_COMMIT,))
                before = conn.execute("SELECT coalesce(max(rowid), 0) FROM records"
                                      ).fetchone()
                for fn, fut, _d, _w in jobs:
                    try:
                        with conn.transaction():  # a savepoint: a failing job alone
                            result = fn(c)  # type: ignore[arg-type]
                    except Exception as exc:
                        if conn.broken or isinstance(exc, psycopg.OperationalError):
                            raise  # the connection is gone: the whole batch fails
                        err: BaseException = exc
                        if isinstance(exc, psycopg.Error):
                            err = self._error(exc, "writing")
                            err.__cause__ = exc
                        outcomes.append((fut, None, err))
                    else:
                        wrote = True
                        outcomes.append((fut, result, None))
                after = conn.execute("SELECT coalesce(max(rowid), 0) FROM records"
                                     ).fetchone()
                if before and after and after[0] > before[0]:
                    # Delivered at commit to every process listening (live streams).
                    conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, str(after[0])))
        except BaseException as exc:
            self._batch_failed(jobs, outcomes, exc)
            return
        self._batch_committed(outcomes, durable=durable, wrote=wrote)

    def _write_lock(self, conn: psycopg.Connection[Any]) -> None:
        """Take the writers' lock in the transaction under way: each wait is bounded
        (``lock_timeout``, :data:`WRITER_IDLE_S`) and retried in a savepoint, at most
        :data:`_LOCK_TRIES` times (a writer stopped holding it is ended by the server
        meanwhile); then raises psycopg's LockNotAvailable (the batch fails with a
        StorageError, 503, to retry)."""
        for attempt in range(1, _LOCK_TRIES + 1):
            try:
                with conn.transaction():  # a savepoint: the lock stays the transaction's
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
                return
            except psycopg.errors.LockNotAvailable:
                if attempt == _LOCK_TRIES:
                    raise
                log.warning("the writers' lock is held for over %.0f s by another "
                            "process sharing the database: waiting again (%d/%d)",
                            WRITER_IDLE_S, attempt, _LOCK_TRIES)

    def reclaim(self, max_pages: int = 0) -> Future[int]:
        """PostgreSQL's autovacuum gives pruned and erased payloads' space back (and
        erased bytes are gone from the table once vacuumed): nothing to do here; 0."""
        fut: Future[int] = Future()
        fut.set_result(0)
        return fut

    def free_bytes(self) -> int:
        """The database server's disk is not this machine's: unknown here, so as
        large as possible (a full disk is known from the server's own error)."""
        return 2**62

    def db_size_bytes(self) -> int:
        """Bytes the database takes on the server (``pg_database_size``)."""
        return int(self._one("SELECT pg_database_size(current_database())")[0])

    def query_plan(self, where: Any = None, *, after_rowid: int = 0, limit: int = 100,
                   only_feeds: Sequence[tuple[bytes, str]] | None = None) -> list[str]:
        """PostgreSQL's ``EXPLAIN`` of :meth:`query` with these arguments, line by line."""
        from citynode.core.filters import ALL_RECORDS

        sql, params = self._query_sql(where or ALL_RECORDS, after_rowid, max(limit, 1),
                                      only_feeds or None)
        return [str(r[0]) for r in self._all("EXPLAIN " + sql, params)]

    # ------------------------------------------------------------------ reads

    def _query_sql(self, where: RecordFilter, after_rowid: int, limit: int,
                   only_feeds: Sequence[tuple[bytes, str]] | None) -> tuple[str, list[Any]]:
        """:func:`_pg_query_sql`, walking the feed by seq when it names one feed with no
        time range, or one holding at least ``limit`` records after the cursor
        (:meth:`Storage._few_in_range`), from the bound of ``storage.SINCE_SEQ`` (schema
        v12): PostgreSQL's planner takes time and seq for independent, and walked a whole
        feed by seq for a narrow range deep in it, or sorted a whole feed for a wide one.
        A range holding fewer is read through (chain, time) and sorted."""
        # One feed: walked by seq (from the bound of storage.SINCE_SEQ with a ``since``),
        # unless its time range holds fewer records than the limit.
        walk = where.one_feed and not self._few_in_range(where, after_rowid, limit)
        type_id = None
        if (where.type is not None and not where.one_feed and where.since_ms is None
                and where.until_ms is None):
            row = self._one("SELECT id FROM types WHERE type = ?", (where.type,))
            # (an unknown type keeps the join: it matches nothing, at once)
            type_id = None if row is None else int(row[0])
        return _pg_query_sql(where, after_rowid, limit, only_feeds, seq_walk=walk,
                             type_id=type_id)

    @contextlib.contextmanager
    def _reading(self) -> Iterator[Any]:
        with self._lock:
            if self._closed:
                raise StorageError("storage is closed: the node is shutting down")
            self._reads += 1
        try:
            try:
                cm = self._pool.connection()
                raw = cm.__enter__()
            except (psycopg.Error, PoolTimeout) as exc:
                raise self._error(exc, "opening a read connection") from exc
            ok = False
            try:
                yield _Conn(raw)
                ok = True
            finally:
                exc_info = (None, None, None) if ok else (Exception, Exception(), None)
                with contextlib.suppress(Exception):
                    cm.__exit__(*exc_info)
        finally:
            with self._lock:
                self._reads -= 1
                self._reads_done.notify_all()

    def _read(self, fetch: Callable[[_Conn], Any], time_limit: float | None) -> Any:
        """Run ``fetch`` on a read connection. A connection the server dropped (a
        restart, a failover) is found on use, not checked before each read (a round
        trip each): the read is run once more on a fresh one (reads are idempotent)."""
        for attempt in (1, 2):
            with self._reading() as c:
                raw = c.raw
                try:
                    if time_limit is None:
                        return fetch(c)
                    with raw.transaction():
                        raw.execute("SELECT set_config('statement_timeout', %s, true)",
                                    (str(max(1, int(time_limit * 1000))),))
                        return fetch(c)
                except psycopg.errors.QueryCanceled as exc:
                    raise QueryTooSlow(
                        f"the query ran longer than {time_limit or READ_TIMEOUT_S:g} s and "
                        "was stopped: narrow it (an origin, a feed, a time range) or ask "
                        "for fewer rows") from exc
                except psycopg.OperationalError as exc:
                    if attempt == 1 and raw.broken:
                        continue
                    raise self._error(exc, "reading") from exc
                except (psycopg.Error, OverflowError) as exc:
                    raise self._error(exc, "reading") from exc
        raise AssertionError("unreachable")

    def _all(self, sql: str, params: Sequence[Any] = (),
             time_limit: float | None = None) -> list[Any]:
        return list(self._read(lambda c: c.execute(sql, params).fetchall(), time_limit))

    def _one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self._read(lambda c: c.execute(sql, params).fetchone(), None)

    # ------------------------------------------------------------------ notifications

    shared = True

    def lead(self) -> bool:
        """Hold (or take, if free) the leadership of the processes sharing this
        database: True while this process holds it. Blocking; never raises."""
        if self._closed:
            return False
        return self._leadership.hold()

    _listener: threading.Thread | None = None
    _listen_conn: psycopg.Connection[Any] | None = None

    def listen(self, callback: Callable[[int], None]) -> None:
        """Call ``callback(max rowid)`` (in a thread of its own) each time any process
        sharing the database commits new records (LISTEN/NOTIFY), and once after every
        reconnection (records committed while the connection was down are not missed).
        One callback per storage."""
        if self._listener is not None:
            raise StorageError("already listening")
        stop = threading.Event()
        self._listen_stop = stop

        def run() -> None:
            while not stop.is_set():
                try:
                    conn = _connect(self.url, self.tag, autocommit=True)
                except psycopg.Error as exc:
                    log.warning("cannot listen for new records: %s", _pg_error(
                        exc, self.where, "listening"))
                    stop.wait(1.0)
                    continue
                self._listen_conn = conn
                try:
                    conn.execute(f"LISTEN {CHANNEL}")
                    callback(0)
                    while not stop.is_set():
                        for n in conn.notifies(timeout=0.5, stop_after=1000):
                            with contextlib.suppress(ValueError):
                                callback(int(n.payload))
                except psycopg.Error:
                    if not stop.is_set():
                        log.warning("listening connection lost: reconnecting")
                        stop.wait(0.5)
                finally:
                    with contextlib.suppress(psycopg.Error):
                        conn.close()

        self._listener = threading.Thread(target=run, name="citynode-storage-listen",
                                          daemon=True)
        self._listener.start()

    def _stop_listening(self) -> None:
        if self._listener is not None:
            self._listen_stop.set()
            self._listener.join(timeout=5)
            self._listener = None


# --------------------------------------------------------------------------- moving a node

#: Set in the target's meta while a copy from SQLite is under way: a node refuses to
#: open the database until the copy is complete.
MIGRATING = "migrating-from-sqlite"
_COPY_CHUNK = 5000
#: Tables copied whole after the records, in an order their references allow.
_SMALL_TABLES = ("partners", "fork_proofs", "rejected", "checkpoints", "meta", "merkle",
                 "bridge_messages", "bridge_dead_letters", "bridge_counters", "erasures",
                 "card_history", "liveness", "sink_cursors", "sink_outbox", "sink_lanes",
                 "cosignatures")
#: Tables whose integer ids are generated: their sequences go past the ids copied.
_IDENTITY_TABLES = ("chains", "types", "fork_proofs", "rejected", "bridge_dead_letters",
                    "sink_outbox")


def source_fingerprint(src: Storage) -> str:
    """What a resumed copy must find unchanged in its source: every chain's head, the
    records and payloads held (a prune drops payloads), the erasures and the highest
    rowid -- hashed (hex)."""
    h = hashlib.sha256()
    for row in src._all("SELECT id, origin, feed, head_seq, head_id FROM chains ORDER BY id"):
        h.update(repr(row).encode())
    for table in ("records", "payloads", "erasures"):
        (n,), = src._all(f"SELECT count(*) FROM {table}")
        h.update(f"{table}={n};".encode())
    (top,), = src._all("SELECT coalesce(max(rowid), 0) FROM records")
    h.update(f"top={top}".encode())
    return h.hexdigest()


def _mark_fingerprint(value: bytes) -> str | None:
    """The source's fingerprint a MIGRATING mark holds (None: a mark without one)."""
    try:
        got = json.loads(value)
        return str(got["fingerprint"]) if isinstance(got, dict) else None
    except (ValueError, KeyError):
        return None


def copy_from_sqlite(src: Storage, url: str,
                     progress: Callable[[int, int], None] | None = None) -> int:
    """Copy every row of the SQLite storage ``src`` (a node that is not running) into
    the PostgreSQL database at ``url``, keeping rowids (streams' and readers' cursors
    stay valid) and ids. Returns the records copied by this call.

    Resumable: records go in chunks of 5000, each committed with everything it needs,
    in rowid order; a new call goes on after the highest rowid the target holds. Until
    the copy ends the target is marked (:data:`MIGRATING`) and :meth:`PgStorage.open_url`
    refuses it. A target holding records of another origin than a copy is refused.
    ``progress(records copied, records held by the source)`` after each chunk.
    A copy is resumed only from the source it began with, unchanged
    (:func:`source_fingerprint`, kept in the mark). Raises :class:`StorageError`, also
    when the source changed since the copy began (its target would be damaged)."""
    with PgStorage.open_url(url, allow_migrating=True):
        pass  # the schema, created or brought up to date
    where = redact(url)
    try:
        with _connect(url, autocommit=True) as conn:
            c = _Conn(conn)
            with conn.transaction():
                mark = conn.execute("SELECT value FROM meta WHERE key = %s",
                                    (MIGRATING,)).fetchone()
                held = conn.execute("SELECT count(*) FROM records").fetchone()
                if mark is None and held and held[0]:
                    raise StorageError(
                        f"{where} already holds {held[0]} records and is not a copy under "
                        "way: migrate into an empty database")
                fingerprint = source_fingerprint(src)
                if mark is not None and _mark_fingerprint(bytes(mark[0])) != fingerprint:
                    raise StorageError(
                        f"{where} holds an unfinished copy of {src.path} taken when it held "
                        "other records (the node ran, published, pruned or erased since the "
                        "copy began): the copy cannot be finished from it. Drop the database, "
                        "create it again and migrate from scratch (with the node stopped)")
                conn.execute("INSERT INTO meta (key, value) VALUES (%s, %s) ON CONFLICT"
                             " DO NOTHING", (MIGRATING, json.dumps(
                                 {"source": str(src.path), "fingerprint": fingerprint}).encode()))
            total = src.count()

            def rows(table: str, where_sql: str = "", params: Sequence[Any] = ()
                     ) -> tuple[list[str], list[Any]]:
                cols = [r[1] for r in src._all(f"PRAGMA table_info({table})")]
                return cols, src._all(f"SELECT {', '.join(cols)} FROM {table} {where_sql}",
                                      params)

            def put(table: str, cols: list[str], data: list[Any], conflict: str) -> None:
                c.executemany(f"INSERT INTO {table} ({', '.join(cols)}) VALUES"
                              f" ({', '.join('?' * len(cols))}) {conflict}", data)

            # Chains (heads as the source holds them: it does not run) and types: what
            # records refer to. Heads are final: a chunk's records never exceed them.
            with conn.transaction():
                for table in ("chains", "types"):
                    cols, data = rows(table)
                    put(table, cols, data, "ON CONFLICT DO NOTHING")
            done = 0
            last = conn.execute("SELECT coalesce(max(rowid), 0) FROM records").fetchone()
            after = int(last[0]) if last else 0
            had = conn.execute("SELECT count(*) FROM records").fetchone()
            copied = int(had[0]) if had else 0
            while True:
                cols, data = rows("records", "WHERE rowid > ? ORDER BY rowid LIMIT ?",
                                  (after, _COPY_CHUNK))
                if not data:
                    break
                hi = data[-1][cols.index("rowid")]
                pcols, pdata = rows("payloads", "WHERE rowid > ? AND rowid <= ?", (after, hi))
                with conn.transaction():
                    put("records", cols, data, "")
                    put("payloads", pcols, pdata, "")
                after = hi
                done += len(data)
                if progress is not None:
                    progress(copied + done, total)
            with conn.transaction():
                for table in _SMALL_TABLES:
                    cols, data = rows(table)
                    if table == "meta":
                        # The source file's identity is no database's here.
                        data = [r for r in data if r[0] not in ("file-identity",
                                                                "writable-probe")]
                    put(table, cols, data, "ON CONFLICT DO NOTHING")
                for table in _IDENTITY_TABLES:
                    conn.execute(
                        f"SELECT setval(pg_get_serial_sequence('{table}', 'id'),"
                        f" greatest((SELECT max(id) FROM {table}), 1))")
                conn.execute("DELETE FROM meta WHERE key = %s", (MIGRATING,))
            return done
    except psycopg.Error as exc:
        raise _pg_error(exc, where, "copying the database") from exc
