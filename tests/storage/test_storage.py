"""Storage: schema and migrations, the writer thread, reads, on real SQLite files."""

from __future__ import annotations

import functools
import hashlib
import os
import sqlite3
import stat
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlite_utils

from citynode import storage as storage_mod
from citynode.core import checkpoints as cps
from citynode.core.filters import RecordFilter
from citynode.core.keys import SigningKey, Verifier
from citynode.core.records import Record, decode_record, open_record, sign_record
from citynode.core.types import point_of
from citynode.errors import ChainError, QueryTooSlow, StorageError
from citynode.storage import PartnerRow, Storage, StoredRow

T0 = 1_700_000_000_000
KEYS = [SigningKey(bytes([i + 1]) * 32) for i in range(3)]
A, B = KEYS[0].public_key, KEYS[1].public_key
TABLES = {"records", "chains", "types", "partners", "fork_proofs", "rejected", "checkpoints",
          "meta", "merkle",
          # v4: the bridges' message identities and dead letters (citynode/bridges/)
          "bridge_messages", "bridge_dead_letters", "bridge_counters",
          # v5: payloads apart from the signed skeletons, erasure requests' entries
          "payloads", "erasures",
          # v6: card history (issue 13: the terms in force for a record)
          "card_history",
          # v7: the newest liveness statement of each feed, kept across restarts
          "liveness",
          # v8: the sinks' cursors and outboxes (issue 15)
          "sink_cursors", "sink_outbox", "sink_lanes",
          # v10: witness cosignatures of checkpoints (issue 12)
          "cosignatures"}


def make(
    k: int,
    feed: str,
    seq: int,
    prev: bytes | None,
    *,
    type: str = "org.example.Test",
    time_ms: int | None = None,
    lonlat: tuple[float, float] | None = None,
) -> Record:
    data: dict[str, Any] = {"n": seq}
    if lonlat is not None:
        data["location"] = {"type": "Point", "coordinates": [lonlat[0], lonlat[1]]}
    # A salt fixed by the arguments: the same call signs the same record (chain() of
    # another length shares its first records), as before payloads were salted.
    salt = hashlib.sha256(repr((k, feed, seq, prev, type, time_ms, lonlat)).encode()
                          ).digest()[:16]
    return sign_record(
        KEYS[k], feed=feed, seq=seq, prev=prev,
        time_ms=T0 + seq if time_ms is None else time_ms, type=type, data=data, salt=salt,
    )


@functools.cache
def chain(k: int, feed: str, n: int) -> tuple[Record, ...]:
    """Records 1..n of one feed (cached: signing is the slow part of these tests)."""
    out: list[Record] = []
    prev = None
    for seq in range(1, n + 1):
        r = make(k, feed, seq, prev)
        out.append(r)
        prev = r.id
    return tuple(out)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "citynode.db"


@pytest.fixture(params=["sqlite", "postgresql"])
def st(request: pytest.FixtureRequest, db_path: Path) -> Iterator[Storage]:
    """The storage on each engine: SQLite in a file, PostgreSQL on the session's real
    server (tests/pg.py), a new database each test."""
    if request.param == "sqlite":
        s = Storage.open(db_path)
    else:
        from citynode.storage_pg import PgStorage

        s = PgStorage.open_url(request.getfixturevalue("pg_url"))
    yield s
    s.close()


@pytest.fixture
def sqlite_st(db_path: Path) -> Iterator[Storage]:
    """SQLite only: for what is SQLite's own (pragmas, query plans, its file)."""
    s = Storage.open(db_path)
    yield s
    s.close()


def raw(path: Path) -> sqlite3.Connection:
    """A connection of "another process" (the test's own, outside Storage)."""
    return sqlite3.connect(path, isolation_level=None, timeout=0.1)


def count_elsewhere(s: Storage, table: str) -> int:
    """Rows of ``table`` as a connection of "another process" sees them, on either
    engine (a new connection of the test's own, outside Storage)."""
    from citynode.storage_pg import PgStorage

    if isinstance(s, PgStorage):
        import psycopg

        with psycopg.connect(s.url) as c:
            row = c.execute(f"SELECT count(*) FROM {table}").fetchone()
            assert row is not None
            return int(row[0])
    c = raw(s.path)
    try:
        return int(c.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
    finally:
        c.close()


@contextmanager
def writer_held(s: Storage) -> Iterator[None]:
    """Keep the writer busy inside a transaction, so the jobs submitted meanwhile are
    queued and then run as one batch."""
    started, release = threading.Event(), threading.Event()

    def block(conn: Any) -> None:
        started.set()
        release.wait(10)

    fut = s._submit(block)
    assert started.wait(5)
    try:
        yield
    finally:
        release.set()
        fut.result(5)


def error_of(fut: Future[Any]) -> BaseException | None:
    return fut.exception(timeout=5)


# --------------------------------------------------------------------------- open


def test_a_database_readable_by_others_is_put_back_to_0600(db_path: Path) -> None:
    # As `sqlite3 citynode.db ".backup copy.db"` writes a copy restored later (0644).
    s = Storage.open(db_path)
    s.append(chain(0, "f", 1)).result(5)
    s.close()
    for p in (db_path, Path(f"{db_path}-wal"), Path(f"{db_path}-shm")):
        p.touch()
        os.chmod(p, 0o644)
    s = Storage.open(db_path)
    try:
        for p in (db_path, Path(f"{db_path}-wal"), Path(f"{db_path}-shm")):
            assert stat.S_IMODE(os.stat(p).st_mode) == 0o600, p
        s.append(chain(1, "f", 1)).result(5)  # and it works as before
    finally:
        s.close()


def test_new_database_has_the_latest_schema_wal_and_mode_0600(db_path: Path) -> None:
    old = os.umask(0o277)  # would give 0400 without the explicit chmod
    try:
        s = Storage.open(db_path)
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE(os.stat(db_path).st_mode) == 0o600
        s.append(chain(0, "f", 3)).result(5)
        wal = Path(f"{db_path}-wal")
        assert wal.exists()
        assert stat.S_IMODE(os.stat(wal).st_mode) == 0o600
        c = raw(db_path)
        assert c.execute("PRAGMA user_version").fetchone()[0] == storage_mod.SCHEMA_VERSION == 12
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert c.execute("PRAGMA application_id").fetchone()[0] == storage_mod.APPLICATION_ID
        c.close()
        assert set(sqlite_utils.Database(db_path).table_names()) == TABLES
    finally:
        s.close()


def test_reopen_keeps_data_and_does_not_migrate_again(db_path: Path) -> None:
    with Storage.open(db_path) as s:
        s.append(chain(0, "f", 5)).result(5)
        s.set_meta("k", b"v").result(5)
    with Storage.open(db_path) as s:
        assert s.head(A, "f") == (5, chain(0, "f", 5)[-1].id)
        assert s.get_meta("k") == b"v"
        assert s.count() == 5


def test_migrations_apply_in_order_once(db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Storage.open(db_path).close()
    latest = storage_mod.SCHEMA_VERSION
    calls: list[int] = []

    def v2(db: sqlite_utils.Database) -> None:
        calls.append(latest + 1)
        db.execute("CREATE TABLE extra (x INTEGER)")

    def v3(db: sqlite_utils.Database) -> None:
        calls.append(latest + 2)
        assert "extra" in db.table_names()  # v2 ran first, in the same transaction
        db["extra"].add_column("y", str)

    monkeypatch.setattr(storage_mod, "MIGRATIONS",
                        {**storage_mod.MIGRATIONS, latest + 1: v2, latest + 2: v3})
    Storage.open(db_path).close()
    Storage.open(db_path).close()
    assert calls == [latest + 1, latest + 2]
    db = sqlite_utils.Database(db_path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == latest + 2
    assert set(db["extra"].columns_dict) == {"x", "y"}


def test_failing_migration_rolls_back_whole(db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Storage.open(db_path).close()
    latest = storage_mod.SCHEMA_VERSION

    def v2(db: sqlite_utils.Database) -> None:
        db.execute("CREATE TABLE half (x INTEGER)")
        db.execute("INSERT INTO no_such_table VALUES (1)")

    monkeypatch.setattr(storage_mod, "MIGRATIONS", {**storage_mod.MIGRATIONS, latest + 1: v2})
    with pytest.raises(StorageError, match="no such table"):
        Storage.open(db_path)
    db = sqlite_utils.Database(db_path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == latest
    assert "half" not in db.table_names()


def test_newer_schema_is_refused(db_path: Path) -> None:
    Storage.open(db_path).close()
    c = raw(db_path)
    newer = storage_mod.SCHEMA_VERSION + 1
    c.execute(f"PRAGMA user_version = {newer}")
    c.close()
    with pytest.raises(StorageError) as info:
        Storage.open(db_path)
    assert str(info.value) == (
        f"database schema v{newer} is newer than this citynode understands "
        f"(v{storage_mod.SCHEMA_VERSION}): upgrade citynode"
    )
    c = raw(db_path)
    assert c.execute("PRAGMA user_version").fetchone()[0] == newer
    c.close()


# --------------------------------------------------------------------------- Merkle trees


def _ids(recs: tuple[Record, ...]) -> list[bytes]:
    return [r.id for r in recs]


def test_the_tree_on_disk_gives_the_roots_and_proofs_of_the_tree_in_memory(
        st: Storage) -> None:
    recs = chain(0, "t", 600)
    # Uneven appends, interleaved with another feed, cross the 256-leaf boundaries
    # inside a job and between jobs.
    for lo, hi in ((0, 1), (1, 255), (255, 256), (256, 300), (300, 600)):
        st.append(recs[lo:hi]).result(5)
        st.append(chain(1, "t", hi)[lo:hi]).result(5)
    log = cps.MerkleLog(_ids(recs))
    tree = st.tree(A, "t", 600)
    for n in (1, 2, 255, 256, 257, 511, 512, 513, 600):
        assert tree.root(n) == log.root(n), n
        for i in {0, 1, n // 2, n - 1} & set(range(n)):
            assert tree.inclusion_proof(i, n) == log.inclusion_proof(i, n), (i, n)
        for m in (1, n // 3, n - 1):
            if m:
                assert tree.consistency_proof(m, n) == log.consistency_proof(m, n), (m, n)
    assert st.tree(B, "t", 600).root() == cps.root_of(_ids(chain(1, "t", 600)))
    # about one stored hash per 256 records: the leaves are the ids already held
    assert count_elsewhere(st, "merkle") == 4


def test_higher_stored_levels_fold_from_lower_ones(
        db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A tile of 2 levels stands for 8: heights 2, 4, 6 are stored (16 of 4 records).
    monkeypatch.setattr(storage_mod, "TILE_HEIGHT", 2)
    recs = chain(0, "small", 70)
    with Storage.open(db_path) as s:
        for lo, hi in ((0, 3), (3, 16), (16, 17), (17, 64), (64, 70)):
            s.append(recs[lo:hi]).result(5)
        log = cps.MerkleLog(_ids(recs))
        tree = s.tree(A, "small", 70)
        for n in range(71):
            assert tree.root(n) == log.root(n), n
            for i in range(n):
                assert tree.inclusion_proof(i, n) == log.inclusion_proof(i, n), (i, n)
        heights = raw(db_path).execute(
            "SELECT height, count(*) FROM merkle GROUP BY height").fetchall()
        assert heights == [(2, 17), (4, 4), (6, 1)]


def test_a_failed_append_leaves_no_subtree_behind(st: Storage) -> None:
    recs = chain(0, "f", 300)
    st.append(recs[:200]).result(5)
    bad = (*recs[200:299], make(0, "f", 999, recs[298].id))  # does not extend the chain
    assert isinstance(error_of(st.append(bad)), ChainError)
    assert count_elsewhere(st, "merkle") == 0
    st.append(recs[200:]).result(5)
    assert st.tree(A, "f", 300).root() == cps.root_of(_ids(recs))


def write_v2_rows(path: Path, recs: Sequence[Record], received_at: int = T0) -> None:
    """Append ``recs`` to a database of schema v1 or v2 as the code of those versions
    did (that code is gone; its statements are here), without the v2 trees."""
    c = raw(path)
    c.execute("BEGIN")
    for r in recs:
        pt = point_of(r.data)
        lon, lat = (None, None) if pt is None else pt
        c.execute("INSERT INTO records (id, origin, feed, seq, type, time, lon, lat,"
                  " received_at, envelope) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                  (r.id, r.origin, r.feed, r.seq, r.type, r.time, lon, lat, received_at,
                   r.envelope))
        c.execute("INSERT INTO heads (origin, feed, seq, id) VALUES (?, ?, ?, ?)"
                  " ON CONFLICT (origin, feed) DO UPDATE SET seq = excluded.seq,"
                  " id = excluded.id", (r.origin, r.feed, r.seq, r.id))
    c.execute("COMMIT")
    c.close()


def make_v2_database(path: Path, monkeypatch: pytest.MonkeyPatch,
                     recs: Sequence[Record]) -> None:
    """A database of schema v2 holding ``recs`` and their trees: rows written by the v1
    code, then migrated to v2 (which builds the trees of the feeds held)."""
    migrations = storage_mod.MIGRATIONS
    with monkeypatch.context() as m:
        m.setattr(storage_mod, "_PAGE_SIZE", 4096)  # as new files of v1 and v2 had
        m.setattr(storage_mod, "MIGRATIONS", {1: migrations[1]})
        Storage.open(path).close()
        write_v2_rows(path, recs)
        assert user_version(path) == 1
        m.setattr(storage_mod, "MIGRATIONS", {1: migrations[1], 2: migrations[2]})
        Storage.open(path).close()
        assert user_version(path) == 2


def user_version(path: Path) -> int:
    """The file's schema version, read on a connection closed at once (an open one would
    keep the migration from compacting the file: WAL mode gives it a shared lock)."""
    c = raw(path)
    try:
        return int(c.execute("PRAGMA user_version").fetchone()[0])
    finally:
        c.close()


def test_migration_to_v2_builds_the_trees_of_the_feeds_held(
        db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recs = chain(0, "old", 600)
    make_v2_database(db_path, monkeypatch, [*recs[:520], *chain(1, "other", 3)])
    c = raw(db_path)
    assert c.execute("SELECT count(*) FROM merkle").fetchone()[0] == 2
    c.close()
    with Storage.open(db_path) as s:
        assert user_version(db_path) == storage_mod.SCHEMA_VERSION
        s.append(recs[520:]).result(5)
        log = cps.MerkleLog(_ids(recs))
        tree = s.tree(A, "old", 600)
        assert tree.root() == log.root()
        assert tree.inclusion_proof(300, 513) == log.inclusion_proof(300, 513)
        assert s.tree(B, "other", 3).root() == cps.root_of(_ids(chain(1, "other", 3)))


def test_migration_to_v3_keeps_every_record_cursor_and_tree(
        db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A database made by the v2 schema: after the migration the same records are held
    under the same rowids, each still verifies, reads and filters answer as before, the
    trees still match, and the feeds grow on."""
    recs = list(chain(0, "old", 600))
    # Other feeds, types, places, and a sealed record (type "sealed", no location).
    others: list[Record] = []
    prev = None
    for seq in range(1, 6):
        r = make(1, "mixed", seq, prev, type=f"org.example.T{seq % 2}",
                 lonlat=None if seq == 3 else (170.0 + seq, -seq / 3))
        others.append(r)
        prev = r.id
    sealed = sign_record(KEYS[2], feed="sealed", seq=1, prev=None, time_ms=T0,
                         type="org.example.Test", data={"n": 1}, readers=[A])
    held = [*recs[:300], *others, sealed, *recs[300:520]]
    make_v2_database(db_path, monkeypatch, held)
    c = raw(db_path)
    before_rows = c.execute(
        "SELECT rowid, id, origin, feed, seq, type, time, lon, lat, received_at, envelope"
        " FROM records ORDER BY rowid").fetchall()
    before_trees = sorted(c.execute("SELECT origin, feed, height, idx, hash FROM merkle"))
    assert c.execute("PRAGMA page_size").fetchone()[0] == 4096
    c.close()
    assert len(before_rows) == len(held)

    with Storage.open(db_path) as s:
        c = raw(db_path)
        assert c.execute("PRAGMA user_version").fetchone()[0] == storage_mod.SCHEMA_VERSION
        # compacted once: the old rows' pages are given back, in pages of the new size
        assert c.execute("PRAGMA freelist_count").fetchone()[0] == 0
        assert c.execute("PRAGMA page_size").fetchone()[0] == storage_mod._PAGE_SIZE
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert tables == TABLES
        assert sorted(c.execute("SELECT origin, feed, height, idx, hash FROM merkle")) == (
            before_trees)
        c.close()
        rows = s.query(limit=10_000)
        width = len(before_rows[0])  # the columns v2 had (v4 adds erased_by)
        assert [tuple(r.__getattribute__(f) for f in StoredRow.__slots__[:width])
                for r in rows] == [tuple(r) for r in before_rows]
        for r, rec in zip(rows, held, strict=True):
            body, sig, payload = decode_record(r.envelope)
            again = open_record(body, sig, payload, now_ms=T0 + 10**6, verifier=Verifier())
            assert again.id == rec.id == r.id
        assert s.heads() == {(A, "old"): (520, recs[519].id), (B, "mixed"): (5, others[-1].id),
                             (KEYS[2].public_key, "sealed"): (1, sealed.id)}
        assert [(f.origin, f.feed, f.count, f.last_time) for f in s.feeds()] == sorted(
            [(A, "old", 520, recs[519].time), (B, "mixed", 5, others[-1].time),
             (KEYS[2].public_key, "sealed", 1, sealed.time)])
        assert s.has_ids([recs[0].id, sealed.id, recs[599].id]) == {recs[0].id, sealed.id}
        assert s.get_envelope(others[2].id) == others[2].envelope
        typed = s.query(RecordFilter(type="org.example.T1"), limit=100)
        assert [r.id for r in typed] == [r.id for r in others if r.type == "org.example.T1"]
        assert [r.id for r in s.query(RecordFilter(type="sealed"))] == [sealed.id]
        boxed = s.query(RecordFilter.of(bbox=(172.5, -2, 180, 0)), limit=100)
        assert [r.seq for r in boxed] == [4, 5]
        assert s.has_records_in_clear(B, "mixed")
        assert not s.has_records_in_clear(KEYS[2].public_key, "sealed")
        # The trees match, and grow on from the migrated rows.
        s.append(recs[520:]).result(5)
        log = cps.MerkleLog(_ids(recs))
        tree = s.tree(A, "old", 600)
        assert tree.root() == log.root()
        assert tree.inclusion_proof(300, 513) == log.inclusion_proof(300, 513)
        assert tree.consistency_proof(300, 600) == log.consistency_proof(300, 600)
        assert s.query(after_rowid=before_rows[-1][0], limit=1)[0].id == recs[520].id
        assert s.range(A, "old", 519, 522, 10) == [r.envelope for r in recs[518:522]]


def test_tree_reads_are_index_searches(sqlite_st: Storage) -> None:
    st = sqlite_st
    st.append(chain(0, "f", 5)).result(5)
    c = raw(st.path)
    for sql, params in ((storage_mod._SELECT_IDS, (A, "f", 1, 4)),
                        (storage_mod._SELECT_SUBTREES, (A, "f", 8, 0, 3))):
        plan = " ".join(r[3] for r in c.execute("EXPLAIN QUERY PLAN " + sql, params))
        assert plan.startswith("SEARCH") and "SCAN" not in plan and "TEMP" not in plan, plan
    c.close()


def test_a_tree_larger_than_the_feed_is_refused(st: Storage) -> None:
    st.append(chain(0, "f", 5)).result(5)
    tree = st.tree(A, "f", 9)
    assert tree.root(5) == cps.root_of(_ids(chain(0, "f", 5)))
    with pytest.raises(ValueError, match="does not hold this tree"):
        tree.inclusion_proof(0, 9)


def test_foreign_sqlite_file_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    c = raw(other)
    c.execute("CREATE TABLE notes (t TEXT)")
    c.close()
    with pytest.raises(StorageError, match="not a citynode database"):
        Storage.open(other)
    check = raw(other)
    assert check.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # left untouched
    check.close()

    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite at all" * 200)
    with pytest.raises(StorageError, match="corrupt or not a SQLite database"):
        Storage.open(junk)


def test_unwritable_location_is_a_storage_error(tmp_path: Path) -> None:
    afile = tmp_path / "plain-file"
    afile.write_text("x")
    with pytest.raises(StorageError, match="cannot open database"):
        Storage.open(afile / "citynode.db")  # parent is not a directory
    with pytest.raises(StorageError, match="exists and is writable"):
        Storage.open(tmp_path / "missing" / "citynode.db")
    with pytest.raises(StorageError, match="not a regular file"):
        Storage.open(tmp_path)


def test_locked_by_another_process(db_path: Path) -> None:
    Storage.open(db_path).close()
    other = raw(db_path)
    other.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StorageError, match="another `citynode run`"):
            Storage.open(db_path, busy_timeout_ms=50)
    finally:
        other.execute("ROLLBACK")
        other.close()


# --------------------------------------------------------------------------- records


def test_append_heads_lookup_and_range(st: Storage) -> None:
    a, b = chain(0, "air", 30), chain(1, "air", 10)
    noise = chain(0, "noise", 4)
    assert st.max_rowid() == 0
    assert st.append(a[:20]).result(5) == []
    st.append(b).result(5)
    st.append(noise + a[20:]).result(5)  # one job over two feeds

    # acknowledged means committed: another connection sees it
    assert count_elsewhere(st, "records") == 44

    assert st.heads() == {(A, "air"): (30, a[-1].id), (B, "air"): (10, b[-1].id),
                          (A, "noise"): (4, noise[-1].id)}
    assert st.head(A, "air") == (30, a[-1].id)
    assert st.head(B, "noise") is None
    unknown = [bytes([9]) * 30 + i.to_bytes(2, "big") for i in range(600)]
    wanted = [r.id for r in a + b + noise] + unknown + [a[0].id]  # > 500 ids, a duplicate
    assert st.has_ids(wanted) == {r.id for r in a + b + noise}
    assert st.has_ids([]) == set()
    assert st.has_ids([noise[1].id]) == {noise[1].id}
    assert st.get_envelope(b[3].id) == b[3].envelope
    assert st.get_envelope(unknown[0]) is None
    # The id index keeps 8 bytes of each id: an id sharing them with one held is not held.
    twin = b[3].id[:8] + bytes(24)
    assert st.has_ids([twin]) == set()
    assert st.has_ids([twin, b[3].id]) == {b[3].id}
    assert st.get_envelope(twin) is None
    assert st.id_at(A, "air", 7) == a[6].id
    assert st.id_at(A, "air", 31) is None
    assert st.envelope_at(B, "air", 10) == b[9].envelope
    assert st.envelope_at(B, "air", 11) is None
    assert st.range(A, "air", 5, 12, 100) == [r.envelope for r in a[4:12]]
    assert st.range(A, "air", 5, 12, 3) == [r.envelope for r in a[4:7]]
    assert st.range(A, "air", 29, 40, 100) == [a[28].envelope, a[29].envelope]
    assert st.range(A, "air", 1, 5, 0) == []
    assert st.max_rowid() == 44
    assert st.count() == 44
    assert st.db_size_bytes() > 4096

    feeds = st.feeds()
    assert [(f.origin, f.feed, f.seq, f.head, f.count, f.last_time) for f in feeds] == sorted(
        [(A, "air", 30, a[-1].id, 30, a[-1].time), (A, "noise", 4, noise[-1].id, 4,
          noise[-1].time), (B, "air", 10, b[-1].id, 10, b[-1].time)]
    )


def test_iter_envelopes_streams_in_chunks(st: Storage) -> None:
    big, other = chain(0, "big", 1203), chain(1, "small", 7)
    st.append(big[:600]).result(5)
    st.append(other).result(5)
    st.append(big[600:]).result(5)
    everything = list(st.iter_envelopes())
    assert [e for _r, e in everything] == [r.envelope for r in big[:600] + other + big[600:]]
    assert [r for r, _e in everything] == sorted(r for r, _e in everything)
    assert [e for _r, e in st.iter_envelopes(A, "big")] == [r.envelope for r in big]
    assert [e for _r, e in st.iter_envelopes(origin=B)] == [r.envelope for r in other]
    assert list(st.iter_envelopes(A, "none")) == []


def _query_fixture(st: Storage) -> list[Record]:
    """Interleaved feeds with types, times and places; returns records in insert order."""
    def feed(k: int, name: str, n: int, type: str, t: Callable[[int], int],
             where: Callable[[int], tuple[float, float] | None]) -> list[Record]:
        out: list[Record] = []
        prev = None
        for seq in range(1, n + 1):
            r = make(k, name, seq, prev, type=type, time_ms=t(seq), lonlat=where(seq))
            out.append(r)
            prev = r.id
        return out

    air = feed(0, "air", 10, "org.example.Air", lambda i: T0 + i * 1000, lambda i: (10.0 + i, 50.0))
    noise = feed(0, "noise", 5, "org.example.Noise", lambda i: T0 + i * 1000 + 500, lambda i: None)
    lons = [178.0, 179.5, -179.5, -178.0, 0.0, 100.0]
    bair = feed(1, "air", 6, "org.example.Air", lambda i: T0 + i * 1000,
                lambda i: (lons[i - 1], -10.0 + i))
    order = [air[:5], bair[:3], noise, air[5:], bair[3:]]
    for part in order:
        st.append(part).result(5)
    return [r for part in order for r in part]


def test_query_filters_and_cursor(st: Storage) -> None:
    recs = _query_fixture(st)
    every = st.query(limit=1000)
    assert [r.id for r in every] == [r.id for r in recs]
    assert [r.rowid for r in every] == sorted(r.rowid for r in every)
    row0, rec0 = every[0], recs[0]
    assert (row0.origin, row0.feed, row0.seq, row0.type, row0.time, row0.lon, row0.lat,
            row0.envelope) == (A, "air", 1, "org.example.Air", rec0.time, 11.0, 50.0,
                               rec0.envelope)
    assert all(r.lon is None and r.lat is None for r in every if r.feed == "noise")

    def ids(**kw: Any) -> list[bytes]:
        return [r.id for r in st.query(RecordFilter.of(**kw), limit=1000)]

    def expect(pred: Callable[[Record], bool]) -> list[bytes]:
        return [r.id for r in recs if pred(r)]

    def loc(r: Record) -> tuple[float, float] | None:
        c = r.data.get("location")
        return None if c is None else (c["coordinates"][0], c["coordinates"][1])

    assert ids(origin=B) == expect(lambda r: r.origin == B)
    assert ids(feed="air") == expect(lambda r: r.feed == "air")
    assert ids(origin=A, feed="air") == expect(lambda r: r.origin == A and r.feed == "air")
    assert ids(type="org.example.Noise") == expect(lambda r: r.type == "org.example.Noise")
    assert ids(since_ms=T0 + 3000, until_ms=T0 + 6000) == expect(
        lambda r: T0 + 3000 <= r.time < T0 + 6000)
    assert len(ids(since_ms=T0 + 3000, until_ms=T0 + 6000)) == 9
    assert ids(type="org.example.Air", since_ms=T0 + 9000) == expect(
        lambda r: r.type == "org.example.Air" and r.time >= T0 + 9000)
    assert ids(origin=A, feed="air", from_seq=3, to_seq=7) == [r.id for r in recs
        if r.origin == A and r.feed == "air" and 3 <= r.seq <= 7]
    assert ids(origin=B, feed="air", from_seq=5) == expect(
        lambda r: r.origin == B and r.seq >= 5)

    box = (12.0, 49.0, 15.5, 51.0)
    assert ids(bbox=box) == expect(
        lambda r: (p := loc(r)) is not None and 12.0 <= p[0] <= 15.5 and 49.0 <= p[1] <= 51.0)
    assert len(ids(bbox=box)) == 4
    across = (179.0, -90.0, -179.0, 90.0)  # crosses the antimeridian
    assert ids(bbox=across) == [r.id for r in recs if r.origin == B and r.seq in (2, 3)]
    assert ids(bbox=(-1.0, -5.0, 1.0, -3.0)) == expect(lambda r: r.origin == B and r.seq == 5)
    assert ids(bbox=(0.0, 0.0, 0.5, 0.5)) == []

    # cursor pagination returns every match exactly once, in rowid order
    for kw in ({}, {"type": "org.example.Air"}, {"origin": A, "feed": "air"}, {"feed": "air",
               "since_ms": T0 + 2000}):
        pages: list[bytes] = []
        cursor = 0
        while True:
            page = st.query(RecordFilter.of(**kw), after_rowid=cursor, limit=4)
            pages += [r.id for r in page]
            if len(page) < 4:
                break
            cursor = page[-1].rowid
        assert pages == ids(**kw), kw
    assert st.query(after_rowid=st.max_rowid()) == []
    assert st.query(limit=0) == []


# --------------------------------------------------------------------------- writer


def test_chain_recheck_fails_only_that_job_of_the_batch(st: Storage) -> None:
    x, y = chain(0, "x", 3), chain(0, "y", 2)
    st.append(x[:1]).result(5)
    with writer_held(st):
        batches0 = st.stats().batches
        good1 = st.append(x[1:3])
        gap = st.append([make(0, "x", 5, x[2].id)])  # seq 4 missing
        wrong_prev = st.append([make(0, "x", 4, bytes(32))])
        again = st.append(x[:1])  # already held: not an extension
        no_start = st.append([make(1, "z", 2, bytes(32))])  # feed z has no seq 1
        good2 = st.append(y)
        half = st.append([*chain(1, "h", 2), make(1, "h", 4, bytes(32))])  # 2 good, 1 bad
    assert good1.result(5) == []
    assert good2.result(5) == []
    for fut in (gap, wrong_prev, again, no_start, half):
        err = error_of(fut)
        assert isinstance(err, ChainError), err
        assert err.reason == "bad_chain"
    assert "does not extend the chain held" in str(error_of(gap))
    stats = st.stats()
    assert stats.batches == batches0 + 2  # the held batch, then all seven jobs in one
    assert stats.failed_jobs == 5
    assert st.heads() == {(A, "x"): (3, x[2].id), (A, "y"): (2, y[1].id)}
    assert st.has_ids([r.id for r in chain(1, "h", 2)]) == set()  # the whole job rolled back
    assert st.count() == 5


def test_own_durable_writes_overtake_partner_batches_queued_before_them(st: Storage) -> None:
    """Issue 16: a node's own publish (durable) is not queued behind partners' batches;
    but it does not overtake a job writing a chain of its own origin (that chain is
    written in order), a job queued after it does not overtake it (a barrier waits for
    everything before it), and partner batches all land."""
    done: list[str] = []

    def note(name: str, fut: Future[Any]) -> Future[Any]:
        fut.add_done_callback(lambda _f: done.append(name))
        return fut

    own_chain, back = chain(0, "own", 2), chain(0, "back", 3)
    with writer_held(st):
        partner = [note(f"partner{i}", st.append(chain(1, f"p{i}", 50))) for i in range(3)]
        own = note("own", st.append(own_chain[:1], durable=True))
        # our origin's chain fetched back (a restored node): written before what extends it
        fetched = note("fetched", st.append(back[:2]))
        extends = note("extends", st.append(back[2:], durable=True))
        last = note("barrier", st.barrier())
        own2 = note("own2", st.append(own_chain[1:], durable=True))
    for fut in (*partner, own, fetched, extends, last, own2):
        assert error_of(fut) is None
    assert done.index("own") < min(done.index(f"partner{i}") for i in range(3))
    assert done.index("fetched") < done.index("extends")
    assert done.index("own") < done.index("barrier")
    assert max(done.index(f"partner{i}") for i in range(3)) < done.index("barrier")
    assert st.heads()[(A, "own")][0] == 2 and st.count() == 3 * 50 + 2 + 3


def test_an_own_write_waits_for_one_small_partner_commit_at_most(st: Storage) -> None:
    """Issue 16: partners' writes commit in bounded batches (about a thousand records),
    so an own durable write that arrives while one commits waits for that batch only,
    not for everything partners have queued; the rest of theirs all land after it."""
    done: list[str] = []
    started, release = threading.Event(), threading.Event()

    def block(conn: Any) -> None:  # a partner batch being committed, held here
        started.set()
        release.wait(10)

    def note(name: str, fut: Future[Any]) -> Future[Any]:
        fut.add_done_callback(lambda _f: done.append(name))
        return fut

    with writer_held(st):  # the partners' jobs queue up meanwhile
        held = note("held", st._submit(block))
        partner = [note(f"partner{i}", st.append(chain(1, f"p{i}", 400))) for i in range(5)]
    assert started.wait(5)
    own = note("own", st.append(chain(0, "own", 1), durable=True))
    release.set()
    for fut in (held, *partner, own):
        assert error_of(fut) is None
    # held + partner0 + partner1 (801 records) were the batch under way: the own write
    # comes right after it, before partner2..4 (each 400 more: another batch or two).
    assert done.index("own") == done.index("partner1") + 1
    assert done.index("own") < min(done.index(f"partner{i}") for i in range(2, 5))
    assert st.count() == 5 * 400 + 1


def test_failing_job_rolls_back_alone_after_writing(st: Storage) -> None:
    def write_then_fail(conn: Any) -> None:
        conn.execute("INSERT INTO meta (key, value) VALUES ('half', ?)", (b"\0",))
        raise ValueError("job bug")

    def write_then_sql_error(conn: Any) -> None:
        conn.execute("INSERT INTO meta (key, value) VALUES ('half2', ?)", (b"\0",))
        conn.execute("INSERT INTO meta (key, value) VALUES ('half2', ?)",  # duplicate key
                     (b"\1",))

    with writer_held(st):
        before = st.set_meta("before", b"1")
        bad = st._submit(write_then_fail)
        bad_sql = st._submit(write_then_sql_error)
        after = st.append(chain(0, "f", 2))
    before.result(5)
    after.result(5)
    assert isinstance(error_of(bad), ValueError)
    err = error_of(bad_sql)
    assert isinstance(err, StorageError)
    import psycopg

    assert isinstance(err.__cause__, sqlite3.IntegrityError | psycopg.IntegrityError)
    assert st.get_meta("before") == b"1"
    assert st.get_meta("half") is None
    assert st.get_meta("half2") is None
    assert st.head(A, "f") == (2, chain(0, "f", 2)[-1].id)


def test_durable_batches_commit_with_synchronous_full(st: Storage) -> None:
    """SQLite: synchronous FULL, else NORMAL; PostgreSQL: synchronous_commit on (the
    commit waits for the server's WAL flush, and a synchronous standby's), else local
    (the server's own WAL flush: a crash of the server loses none of it)."""
    from citynode.storage_pg import PgStorage

    pg = isinstance(st, PgStorage)

    def sync_mode(conn: Any) -> int:
        if pg:
            return {"on": 2, "local": 1}[conn.execute("SHOW synchronous_commit").fetchone()[0]]
        return int(conn.execute("PRAGMA synchronous").fetchone()[0])

    full, normal = 2, 1
    assert st._submit(sync_mode).result(5) == normal
    assert st._submit(sync_mode, durable=True).result(5) == full
    assert st._submit(sync_mode).result(5) == normal

    d0 = st.stats().durable_batches
    st.append(chain(0, "own", 2), durable=True).result(5)
    assert st.stats().durable_batches == d0 + 1
    st.append(chain(1, "theirs", 2)).result(5)
    assert st.stats().durable_batches == d0 + 1
    own3 = make(0, "own", 3, chain(0, "own", 2)[-1].id)
    # A durable job kept behind a job writing its origin's chain shares its batch: one
    # durable job makes the whole batch durable.
    with writer_held(st):
        probe = st._submit(sync_mode)
        st.append([own3])  # our own record fetched back (not durable)
        own = st.append([make(0, "own", 4, own3.id)], durable=True)
    own.result(5)
    assert probe.result(5) == full
    assert st.stats().durable_batches == d0 + 2
    # A durable job that overtakes the others commits in a batch of its own; theirs stay
    # NORMAL.
    with writer_held(st):
        probe = st._submit(sync_mode)
        theirs = st.append([make(1, "theirs", 3, chain(1, "theirs", 2)[-1].id)])
        own = st.append([make(0, "other", 1, None)], durable=True)
    own.result(5)
    theirs.result(5)
    assert probe.result(5) == normal
    assert st.stats().durable_batches == d0 + 3


def test_a_small_append_is_written_inline_only_when_the_writer_is_idle(st: Storage) -> None:
    """A few non-durable records with nothing queued are committed on the caller's
    thread (the future is complete on return, the write readable); queued behind a
    busy writer they wait their turn (order kept); durable ones and larger ones always
    go to the writer thread; a failing inline append fails alone. PostgreSQL never
    writes inline (a write there is a network round trip)."""
    from citynode.storage_pg import PgStorage

    pg = isinstance(st, PgStorage)
    x = chain(0, "x", 12)
    n0 = st._inline_jobs
    first = st.append(x[:1], inline=True)
    if not pg:
        assert first.done() and st._inline_jobs == n0 + 1
        assert st.has_ids([x[0].id]) == {x[0].id}
    assert first.result(5) == []
    with writer_held(st):
        queued = st.append(x[1:2], inline=True)  # the writer is busy: queued
        assert not queued.done()
    assert queued.result(5) == []
    n1 = st._inline_jobs
    assert error_of(st.append(x[2:3], durable=True, inline=True)) is None
    big = x[3:3 + storage_mod.INLINE_MAX_RECORDS + 1]
    assert error_of(st.append(big, inline=True)) is None
    assert st._inline_jobs == n1  # neither was written inline
    bad = st.append([make(0, "x", 99, bytes(32))], inline=True)
    assert isinstance(error_of(bad), ChainError)
    after = st.append(x[3 + len(big):], inline=True)
    assert after.result(5) == []
    assert st.head(A, "x") == (12, x[-1].id)
    assert st._inline_jobs == (n1 if pg else n1 + 2)
    assert st.stats().queued == 0


def test_appends_of_one_turn_are_written_inline_together_each_failing_alone(
        st: Storage) -> None:
    """append_each: several partners' few-record writes, in order, in one transaction
    when the writer is idle (SQLite), each its own job (a chain error fails that one
    only); behind a busy writer they are queued in order, and land in one batch."""
    from citynode.storage_pg import PgStorage

    pg = isinstance(st, PgStorage)
    x, y = chain(0, "ex", 4), chain(1, "ey", 4)
    b0, n0 = st.stats().batches, st._inline_jobs
    futs = st.append_each([x[:1], y[:2], [make(0, "ex", 9, bytes(32))], x[1:2]])
    if not pg:
        assert all(f.done() for f in futs)
        assert st._inline_jobs == n0 + 4 and st.stats().batches == b0 + 1
    assert [error_of(f) is None for f in futs] == [True, True, False, True]
    assert isinstance(error_of(futs[2]), ChainError)
    with writer_held(st):
        queued = st.append_each([x[2:3], y[2:], x[3:]])
        assert not any(f.done() for f in queued)
        b1 = st.stats().batches
    assert all(f.result(5) == [] for f in queued)
    assert st.stats().batches == b1 + 2  # the held batch, then the three together
    assert st.head(A, "ex") == (4, x[-1].id)
    assert st.head(chain(1, "ey", 1)[0].origin, "ey") == (4, y[-1].id)


def test_commits_never_checkpoint_a_thread_of_its_own_does(db_path: Path) -> None:
    """The writer's commits do not copy the WAL into the database file (that made one
    live record's commit in ~120 take milliseconds); the checkpointer thread does,
    shortly after commits, and stops with the storage."""
    s = Storage.open(db_path)
    try:
        assert s._wconn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
        size0 = db_path.stat().st_size
        for r in chain(0, "ck", 40):
            s.append([r], inline=True).result(5)
        for _ in range(100):  # the checkpointer runs within CHECKPOINT_INTERVAL_S
            if db_path.stat().st_size > size0:
                break
            threading.Event().wait(0.05)
        assert db_path.stat().st_size > size0
        assert s._checkpointer is not None and s._checkpointer.is_alive()
    finally:
        s.close()
    assert s._checkpointer is not None and not s._checkpointer.is_alive()
    s = Storage.open(db_path)  # everything committed is there
    try:
        assert s.head(A, "ck") == (40, chain(0, "ck", 40)[-1].id)
    finally:
        s.close()


def test_cancelled_job_is_not_run(st: Storage) -> None:
    with writer_held(st):
        fut = st.set_meta("gone", b"1")
        assert fut.cancel()
        kept = st.set_meta("kept", b"2")
    kept.result(5)
    assert st.get_meta("gone") is None
    assert st.get_meta("kept") == b"2"


def test_close_drains_pending_writes(db_path: Path) -> None:
    s = Storage.open(db_path)
    recs = chain(0, "drain", 400)
    futs: list[Future[Any]] = [s.append(recs[i : i + 20]) for i in range(0, 400, 20)]
    futs.append(s.log_rejected("peer", "bad_signature", "x", T0))
    s.close()
    assert all(f.done() and f.exception() is None for f in futs)
    s.close()  # idempotent
    with pytest.raises(StorageError, match="closed"):
        s.append(recs[:1])
    with pytest.raises(StorageError, match="closed"):
        s.heads()
    assert not s.writable()
    assert not Path(f"{db_path}-wal").exists() or Path(f"{db_path}-wal").stat().st_size == 0
    with Storage.open(db_path) as again:
        assert again.head(A, "drain") == (400, recs[-1].id)
        assert len(again.rejected()) == 1


def test_concurrent_reads_from_threads_during_writes(st: Storage) -> None:
    recs = chain(2, "busy", 600)
    stop = threading.Event()
    errors: list[BaseException] = []
    seen: list[list[int]] = [[] for _ in range(4)]

    def reader(n: int) -> None:
        try:
            while not stop.is_set():
                h = st.head(KEYS[2].public_key, "busy")
                seq = 0 if h is None else h[0]
                seen[n].append(seq)
                # everything up to the head is readable, whatever the writer does now
                assert len(st.has_ids([r.id for r in recs[:seq]])) == seq
                if n % 2:
                    assert len(st.query(RecordFilter(origin=KEYS[2].public_key, feed="busy"),
                                        limit=1000)) >= seq
                else:
                    assert sum(1 for _ in st.iter_envelopes(KEYS[2].public_key, "busy")) >= seq
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for i in range(0, 600, 20):
        st.append(recs[i : i + 20]).result(5)
    stop.set()
    for t in threads:
        t.join(10)
    assert errors == []
    for s in seen:
        assert s and s == sorted(s)  # a thread never sees the head go back
    from citynode.storage_pg import PgStorage

    if isinstance(st, PgStorage):  # readers took connections of the pool at once
        assert st._pool.get_stats()["connections_num"] >= 2
    else:
        assert len(st._readers) >= 4  # one connection per thread
    assert st.head(KEYS[2].public_key, "busy") == (600, recs[-1].id)


def test_writes_while_another_process_locks_the_database(db_path: Path) -> None:
    s = Storage.open(db_path, busy_timeout_ms=50)
    try:
        assert s.writable()
        other = raw(db_path)
        other.execute("BEGIN EXCLUSIVE")
        try:
            fut = s.append(chain(0, "f", 2))
            err = error_of(fut)
            assert isinstance(err, StorageError)
            assert "another `citynode run`" in str(err)
            assert not s.writable()
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert s.writable()  # the writer thread survived
        s.append(chain(0, "f", 2)).result(5)
        assert s.head(A, "f") == (2, chain(0, "f", 2)[-1].id)
    finally:
        s.close()


# --------------------------------------------------------------------------- other tables


def test_rejected_log_is_bounded(db_path: Path) -> None:
    with Storage.open(db_path, rejected_log_rows=5) as s:
        futs = [s.log_rejected(f"peer{i}", "bad_signature", f"detail {i}", T0 + i)
                for i in range(12)]
        for f in futs:
            f.result(5)
        rows = s.rejected()
        assert [r.source for r in rows] == [f"peer{i}" for i in range(11, 6, -1)]
        assert (rows[0].at, rows[0].reason, rows[0].detail) == (T0 + 11, "bad_signature",
                                                                 "detail 11")
        assert [r.source for r in s.rejected(limit=2)] == ["peer11", "peer10"]
        s.log_rejected("x", "too_large", "d" * 10_000, T0).result(5)
        assert len(s.rejected(1)[0].detail) == 2000
    c = raw(db_path)
    assert c.execute("SELECT count(*) FROM rejected").fetchone()[0] == 5
    c.close()


def test_partners_crud(st: Storage) -> None:
    p1 = PartnerRow("cn1aaa", A, "https://a.example", "A-town", b"\x01" * 32, b"card", T0)
    p2 = PartnerRow("cn1bbb", B, "https://b.example", "B-city", None, None, T0 + 1)
    st.put_partner(p2).result(5)
    st.put_partner(p1).result(5)
    assert st.partners() == [p1, p2]
    assert st.partner("cn1bbb") == p2
    assert st.partner("cn1zzz") is None
    assert st.partner_by_key(A) == p1
    assert st.partner_by_key(bytes(32)) is None
    moved = PartnerRow("cn1aaa", A, "https://new.example", "A-town", None, b"card2", T0)
    st.put_partner(moved).result(5)
    assert st.partner("cn1aaa") == moved
    clash = PartnerRow("cn1ccc", A, "https://c.example", "C", None, None, T0)
    err = error_of(st.put_partner(clash))
    assert isinstance(err, StorageError)
    assert "constraint" in str(err)
    assert st.remove_partner("cn1aaa").result(5) is True
    assert st.remove_partner("cn1aaa").result(5) is False
    assert st.partners() == [p2]


def test_fork_proofs_dedupe(st: Storage) -> None:
    assert st.add_fork_proof(A, "f", 3, "fork", b"proof-1", "cn1rep", T0).result(5) is True
    assert st.add_fork_proof(A, "f", 3, "fork", b"proof-1", None, T0 + 5).result(5) is False
    assert st.add_fork_proof(A, "f", 4, "split", b"proof-2", None, T0 + 9).result(5) is True
    # Another proof of the same kind at the same (origin, feed, seq) proves nothing
    # more: a stream of conflicting statements of one size must not grow the table.
    assert st.add_fork_proof(A, "f", 3, "fork", b"proof-3", None, T0 + 10).result(5) is False
    assert st.add_fork_proof(A, "f", 4, "split", b"proof-4", None, T0 + 11).result(5) is False
    assert st.add_fork_proof(A, "g", 4, "split", b"proof-5", None, T0 + 12).result(5) is True
    rows = st.fork_proofs()
    assert [(r.origin, r.feed, r.seq, r.kind, r.proof, r.found_at, r.reported_by)
            for r in rows] == [(A, "f", 3, "fork", b"proof-1", T0, "cn1rep"),
                               (A, "f", 4, "split", b"proof-2", T0 + 9, None),
                               (A, "g", 4, "split", b"proof-5", T0 + 12, None)]


def test_cosignatures_kept_one_per_witness_and_the_last_cosigned(st: Storage) -> None:
    W1, W2 = b"\x01" * 32, b"\x02" * 32
    assert st.last_cosigned(W1, A, "f") is None
    assert st.put_cosignature(A, "f", 4, b"r4", W1, 10, b"c1").result(5) is True
    # One per witness: another of the same or an earlier time does not replace it ...
    assert st.put_cosignature(A, "f", 4, b"r4", W1, 10, b"again").result(5) is False
    assert st.put_cosignature(A, "f", 4, b"r4", W1, 9, b"older").result(5) is False
    assert st.put_cosignature(A, "f", 4, b"r4", W2, 12, b"c2").result(5) is True
    assert st.put_cosignature(A, "f", 8, b"r8", W1, 13, b"c3").result(5) is True
    assert st.put_cosignature(B, "f", 9, b"b9", W1, 14, b"c4").result(5) is True
    assert st.cosignatures(A, "f") == [(4, b"r4", W1, b"c1"), (4, b"r4", W2, b"c2"),
                                       (8, b"r8", W1, b"c3")]
    assert st.cosignatures(A, "f", 4, limit=1) == [(4, b"r4", W1, b"c1")]
    # ... a later one does (a witness that rotated cosigns again with its new key).
    assert st.put_cosignature(A, "f", 4, b"r4", W1, 11, b"c1new").result(5) is True
    assert st.cosignatures(A, "f", 4) == [(4, b"r4", W1, b"c1new"), (4, b"r4", W2, b"c2")]
    # Of the checkpoints from min_size only; at most per_checkpoint each.
    assert st.cosignatures(A, "f", min_size=5) == [(8, b"r8", W1, b"c3")]
    assert st.cosignatures(A, "f", per_checkpoint=1) == [(4, b"r4", W1, b"c1new"),
                                                         (8, b"r8", W1, b"c3")]
    assert st.cosignatures(A, "g") == []
    assert st.last_cosigned(W1, A, "f") == (8, b"r8")
    assert st.last_cosigned(W2, A, "f") == (4, b"r4")
    assert st.last_cosigned(W2, B, "f") is None


def test_refused_checkpoints_go_with_their_cosignatures_and_liveness(st: Storage) -> None:
    """drop_checkpoints (a recovery refuses a stolen key's statements): only the named
    checkpoints go, with their cosignatures and the liveness statement if it is one."""
    W1 = b"\x01" * 32
    for size, root in ((6, b"r6"), (9, b"r9")):
        assert st.put_checkpoint(A, "f", size, root, b"env" + root).result(5) is True
        assert st.put_cosignature(A, "f", size, root, W1, 10, b"c" + root).result(5)
    assert st.put_checkpoint(B, "f", 9, b"b9", b"envb9").result(5) is True
    st.put_liveness(A, "f", 9, T0, b"r9", b"envr9", T0).result(5)
    st.put_liveness(B, "f", 9, T0, b"b9", b"envb9", T0).result(5)
    # Named by size and root: a checkpoint of that size with another root stays.
    assert st.drop_checkpoints(A, "f", [(9, b"other", b"envother")]).result(5) == 0
    assert st.drop_checkpoints(A, "f", [(9, b"r9", b"envr9")]).result(5) == 1
    assert st.checkpoints(A, "f") == [(6, b"r6", b"envr6")]
    assert st.cosignatures(A, "f") == [(6, b"r6", W1, b"cr6")]
    assert [(o, size) for o, _f, size, *_ in st.liveness(10)] == [(B, 9)]
    assert st.checkpoints(B, "f") == [(9, b"b9", b"envb9")]


def test_checkpoints_and_meta(st: Storage) -> None:
    assert st.put_checkpoint(A, "f", 8, b"r8", b"env8").result(5) is True
    assert st.put_checkpoint(A, "f", 4, b"r4", b"env4").result(5) is True
    assert st.put_checkpoint(A, "f", 8, b"other", b"other").result(5) is False
    assert st.put_checkpoint(B, "f", 8, b"b8", b"benv").result(5) is True
    assert st.checkpoints(A, "f") == [(4, b"r4", b"env4"), (8, b"r8", b"env8")]
    assert st.checkpoints(A, "g") == []
    assert st.get_meta("x") is None
    st.set_meta("x", b"1").result(5)
    st.set_meta("x", b"2").result(5)
    assert st.get_meta("x") == b"2"


def test_close_waits_for_reads_in_other_threads(tmp_path: Path) -> None:
    """Closing a connection another thread is reading on crashes the process; close()
    waits for reads under way, and later reads raise StorageError."""
    for i in range(10):
        s = Storage.open(tmp_path / f"r{i}.db")
        s.append(chain(1, "f", 50)).result()
        outcomes: list[str] = []
        go = threading.Event()

        def reader(s: Storage = s, go: threading.Event = go,
                   outcomes: list[str] = outcomes) -> None:
            go.set()
            try:
                while True:
                    s.query(limit=50)
            except StorageError:
                outcomes.append("closed")

        threads = [threading.Thread(target=reader) for _ in range(4)]
        for t in threads:
            t.start()
        go.wait()
        s.close()
        for t in threads:
            t.join(10)
        assert outcomes == ["closed"] * 4


def test_a_query_past_its_time_limit_is_stopped(st: Storage) -> None:
    """A filter no index serves scans the table; with a time limit it is stopped with
    QueryTooSlow, and the same connection answers the next query normally."""
    st.append(list(chain(0, "big", 3000))).result(10)
    nothing = RecordFilter(feed="nothing")
    with pytest.raises(QueryTooSlow, match="narrow it"):
        st.query(nothing, limit=10, time_limit=1e-9)
    assert st.query(nothing, limit=10, time_limit=30.0) == []
    assert len(st.query(limit=5, time_limit=30.0)) == 5
    assert st.query(nothing, limit=10) == []  # no limit: runs to the end


def test_a_damaged_file_is_found_and_remembered(db_path: Path) -> None:
    """quick_check finds damage; a read that meets it is a DatabaseCorrupt, and the
    storage remembers it (the node's readiness reads that)."""
    from citynode.errors import DatabaseCorrupt
    from tests.conftest import damage_table

    s = Storage.open(db_path)
    s.append(chain(0, "air", 300)).result(10)
    assert s.quick_check() == [] and s.corrupt is None
    assert len(s.query(limit=1000)) == 300
    s.close()

    damage_table(db_path)
    s = Storage.open(db_path)  # the header and the schema are intact: it opens
    try:
        assert s.corrupt is None
        with pytest.raises(DatabaseCorrupt, match="corrupt"):
            s.query(limit=1000)
        assert s.corrupt is not None and "corrupt" in s.corrupt
        found = s.quick_check(max_errors=5)
        assert 1 <= len(found) <= 5 and all("\n" not in f for f in found), found
    finally:
        s.close()
    s = Storage.open(db_path)
    try:  # a fresh open knows nothing yet; quick_check alone finds it
        assert s.corrupt is None
        assert s.quick_check()
        assert s.corrupt is not None and "damaged" in s.corrupt
    finally:
        s.close()


def test_card_history_keeps_the_newest_64_of_each_node(db_path: Path) -> None:
    with Storage.open(db_path) as s:
        for t in range(70):
            assert s.add_card_history(A, 1000 + t, b"card-a-%d" % t).result(5)
        assert not s.add_card_history(A, 1069, b"another").result(5)  # the first stays
        s.add_card_history(b"\x09" * 32, 5, b"card-b").result(5)
        kept = s.card_history(A)
        assert kept == [b"card-a-%d" % t for t in range(6, 70)]
        assert len(kept) == storage_mod.CARD_HISTORY_MAX
        assert s.card_history(b"\x09" * 32) == [b"card-b"]
        assert s.card_history(b"\x08" * 32) == []


def test_a_sinks_outbox_keeps_order_retries_and_refusals(st: Storage) -> None:
    # Schema v8 (the sinks' cursor, outbox and lanes) on each engine: what a sink
    # takes on once, in order per lane, waiting lanes and refusals kept.
    st.append(chain(0, "f", 3) + chain(1, "g", 2)).result(5)
    rows = st.query(limit=10)
    taken = [(r.id, r.rowid, r.feed) for r in rows]
    assert st.sink_cursor("ce") is None
    st.sink_enqueue("ce", taken, rows[-1].rowid).result(5)
    st.sink_enqueue("ce", taken[:2], rows[1].rowid).result(5)  # twice: once, cursor kept
    assert st.sink_cursor("ce") == rows[-1].rowid and st.sink_pending("ce") == 5
    due = st.sink_due("ce", T0, lanes=10, per_lane=2)
    assert sorted([[o.record_id for o in lane] for lane in due]) == sorted(
        [[rows[0].id, rows[1].id], [rows[3].id, rows[4].id]])
    f_lane = next(lane for lane in due if lane[0].lane == "f")
    g_lane = next(lane for lane in due if lane[0].lane == "g")
    assert f_lane[0].envelope == chain(0, "f", 3)[0].envelope
    st.sink_settle("ce", [f_lane[0].id], [(f_lane[1].id, "f", 1, T0 + 500, "HTTP 503")],
                   [(g_lane[0].id, "HTTP 400")], ["f", "g"]).result(5)
    # Lane f waits until T0 + 500 (its head to retry); lane g goes on after a refusal.
    assert st.sink_next_due("ce") == 0
    assert [[o.record_id for o in lane] for lane in st.sink_due("ce", T0, 10, 5)] == [
        [rows[4].id]]
    later = st.sink_due("ce", T0 + 500, 10, 5)
    assert [[o.record_id for o in lane] for lane in later] == [
        [rows[4].id], [rows[1].id, rows[2].id]]
    assert later[1][0].attempts == 1
    assert st.sink_counts() == {"ce": (3, 1)}
    assert st.sink_dead("ce", 5) == [(rows[3].id, 1, "HTTP 400")]
