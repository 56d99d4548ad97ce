"""What is PostgreSQL's own in storage: its schema mirrors SQLite's, several processes on
one database never fork a feed, new records are announced, a lost server is a clear
error and the node resumes by itself. (Everything else: test_storage.py, on both.)"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import psycopg
import psycopg.errors
import pytest

from citynode.cluster import free_ports
from citynode.errors import ChainError, StorageError
from citynode.storage import MIGRATIONS, SCHEMA_VERSION, Storage, open_storage
from citynode.storage_pg import PG_MIGRATIONS, PgStorage
from tests.pg import PgServer
from tests.storage.test_storage import A, chain, make


@pytest.fixture
def pg(pg_url: str) -> Iterator[PgStorage]:
    s = PgStorage.open_url(pg_url)
    yield s
    s.close()


def columns_sqlite(path: Path) -> dict[str, set[str]]:
    import sqlite3

    c = sqlite3.connect(path)
    try:
        tables = [r[0] for r in c.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {t: {r[1] for r in c.execute(f"PRAGMA table_info({t})")} for t in tables}
    finally:
        c.close()


def columns_pg(url: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    with psycopg.connect(url) as c:
        for table, column in c.execute(
                "SELECT table_name, column_name FROM information_schema.columns"
                " WHERE table_schema = current_schema()"):
            out.setdefault(table, set()).add(column)
    out.pop("citynode_schema")  # PostgreSQL's version table (SQLite: user_version)
    return out


def test_the_schema_mirrors_sqlite_table_for_table_column_for_column(
        tmp_path: Path, pg: PgStorage) -> None:
    # A migration added to storage.MIGRATIONS (a new table...) needs its twin in
    # storage_pg.PG_MIGRATIONS: this fails until it has one.
    assert max(PG_MIGRATIONS) == max(MIGRATIONS) == SCHEMA_VERSION
    with Storage.open(tmp_path / "citynode.db"):
        pass
    assert columns_pg(pg.url) == columns_sqlite(tmp_path / "citynode.db")
    assert pg.quick_check() == []


def test_open_storage_chooses_the_engine_by_url(tmp_path: Path, pg_url: str) -> None:
    with open_storage(tmp_path) as s:
        assert type(s) is Storage and s.path == tmp_path / "citynode.db"
    with open_storage(tmp_path, pg_url) as s:
        assert isinstance(s, PgStorage)
    with pytest.raises(StorageError, match="postgresql://"):
        open_storage(tmp_path, "mysql://x")


def test_reopen_keeps_data_and_a_newer_or_foreign_schema_is_refused(pg_url: str,
                                                                     pg_server: Any) -> None:
    with PgStorage.open_url(pg_url) as s:
        s.append(chain(0, "f", 3)).result(5)
    with PgStorage.open_url(pg_url) as s:
        assert s.head(A, "f") == (3, chain(0, "f", 3)[-1].id)
    with psycopg.connect(pg_url, autocommit=True) as c:
        c.execute("UPDATE citynode_schema SET version = %s", (SCHEMA_VERSION + 1,))
    with pytest.raises(StorageError, match="newer than this citynode"):
        PgStorage.open_url(pg_url)
    other = pg_server.create_database()
    with psycopg.connect(other, autocommit=True) as c:
        c.execute("CREATE TABLE records (x int)")
    with pytest.raises(StorageError, match="not a citynode database"):
        PgStorage.open_url(other)


def test_a_position_of_a_feed_holds_one_record_whatever_the_processes(pg_url: str) -> None:
    """Two processes (two storages) append different records at the same seqs of one
    feed at once: one lands, the other fails whole (ChainError); and the UNIQUE index
    refuses a second row at a position even from SQL that skips the chain check."""
    one, two = PgStorage.open_url(pg_url), PgStorage.open_url(pg_url)
    try:
        ours = chain(0, "own", 5)
        fork = [make(0, "own", 1, None, time_ms=1)]
        for r in range(2, 6):
            fork.append(make(0, "own", r, fork[-1].id, time_ms=r))
        go = threading.Event()
        futs: list[Future[Any]] = []

        def write(s: PgStorage, recs: Any) -> None:
            go.wait(5)
            futs.append(s.append(recs, durable=True))

        ts = [threading.Thread(target=write, args=(one, ours)),
              threading.Thread(target=write, args=(two, fork))]
        for t in ts:
            t.start()
        go.set()
        for t in ts:
            t.join(5)
        errors = [f.exception(10) for f in futs]
        assert sum(e is None for e in errors) == 1
        assert [type(e) for e in errors if e is not None] == [ChainError]
        head = one.head(A, "own")
        assert head is not None and head[0] == 5
        assert head[1] in (ours[-1].id, fork[-1].id)
        assert one.count() == 5 == two.count()
        with psycopg.connect(pg_url) as c, pytest.raises(psycopg.errors.UniqueViolation):
            c.execute("INSERT INTO records (rowid, chain, seq, type_id, time, received_at,"
                      " id, envelope, tmax, tmax_all) SELECT rowid + 100, chain, seq,"
                      " type_id, time, received_at, id, envelope, tmax, tmax_all"
                      " FROM records WHERE seq = 3")
    finally:
        one.close()
        two.close()


def test_every_process_hears_of_new_records(pg_url: str) -> None:
    """LISTEN/NOTIFY: a commit of records by one process reaches the others (and a
    write that adds no record announces nothing)."""
    writer, reader = PgStorage.open_url(pg_url), PgStorage.open_url(pg_url)
    heard: list[int] = []
    got = threading.Condition()

    def note(rowid: int) -> None:
        with got:
            heard.append(rowid)
            got.notify_all()

    try:
        reader.listen(note)
        with got:
            assert got.wait_for(lambda: heard == [0], 10)  # listening (and caught up)
        writer.set_meta("x", b"1").result(5)
        writer.append(chain(0, "f", 3)).result(5)
        writer.append(chain(0, "f", 5)[3:]).result(5)
        with got:
            assert got.wait_for(lambda: heard[-1:] == [5], 10), heard
        assert heard == [0, 3, 5]
    finally:
        reader.close()
        writer.close()


def test_a_lost_server_is_a_clear_error_and_the_storage_resumes_by_itself() -> None:
    """Failover as the node lives it: while the server is down, writes and reads fail
    with a StorageError that says so (nothing is acknowledged); once a server answers
    at the same address again, the same storage writes and reads without a restart."""
    with pytest.raises(StorageError, match="unreachable"):
        PgStorage.open_url(f"postgresql://postgres@127.0.0.1:{free_ports(1)[0]}/x")
    server = PgServer().start()
    try:
        s = PgStorage.open_url(server.create_database())
        try:
            s.append(chain(0, "f", 2), durable=True).result(5)
            server._run("pg_ctl", "-D", str(server.data), "-m", "immediate", "-w", "stop")
            with pytest.raises(StorageError, match="unreachable"):
                s.append(chain(0, "f", 3)[2:], durable=True).result(15)
            with pytest.raises(StorageError, match="unreachable"):
                s.heads()
            assert not s.writable(5)
            server._run("pg_ctl", "-D", str(server.data), "-l", str(server.root / "log"),
                        "-o", f"-c listen_addresses=127.0.0.1 -c port={server.port} "
                        f"-c unix_socket_directories={server.root}", "-w", "start")
            s.append(chain(0, "f", 3)[2:], durable=True).result(15)  # reconnects at once
            assert s.writable(5)
            # Read connections come back as the pool reconnects (with a back-off).
            deadline = time.monotonic() + 30
            while True:
                try:
                    assert s.head(A, "f") == (3, chain(0, "f", 3)[-1].id)
                    break
                except StorageError:
                    assert time.monotonic() < deadline, "reads did not resume"
                    time.sleep(0.5)
        finally:
            s.close()
    finally:
        server.stop()


def test_one_process_leads_and_another_takes_over_when_its_session_ends(
        pg_url: str) -> None:
    """The leadership is a session's advisory lock: one of two storages holds it, keeps
    it while its session lives, and loses it to the other when that session ends (as
    when the process is killed, or the network cuts it off)."""
    one, two = PgStorage.open_url(pg_url), PgStorage.open_url(pg_url)
    try:
        assert one.lead() and not two.lead()
        assert one.lead() and not two.lead()  # held, not taken again
        conn = one._leadership.conn
        assert conn is not None
        with psycopg.connect(pg_url, autocommit=True) as c:
            c.execute("SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))
        deadline = time.monotonic() + 5  # the backend ends (and frees it) a moment later
        while not two.lead():
            assert time.monotonic() < deadline, "the lock was not freed"
            time.sleep(0.05)
        assert not one.lead()  # its session is gone, and so is the lock
        two.close()  # closing gives the leadership up (freed as its backend exits)
        deadline = time.monotonic() + 5
        while not one.lead():
            assert time.monotonic() < deadline, "closing did not give the lock up"
            time.sleep(0.05)
    finally:
        one.close()
        two.close()


def test_a_time_range_inside_one_feed_is_an_index_range(pg: PgStorage) -> None:
    # Schema v9: a feed of 200k records (rows written directly: the plan, not the
    # records, is under test; their running maxima of time as the writer keeps them;
    # ANALYZE as autovacuum would), and a one-hour range deep inside it, holding fewer
    # records than asked for (1,800 of 2,000: schema v12 walks the feed from its bound
    # only for a range holding at least the limit, test_pg_plans.py), is read through
    # (chain, time), not by walking the feed by seq; the payloads are joined to the rows
    # returned after the LIMIT, not to every row the scan looked at.
    from citynode.core.filters import RecordFilter
    from citynode.storage import BACKFILL_TIME_BOUNDS

    with psycopg.connect(pg.url, autocommit=True) as c:
        c.execute("INSERT INTO chains (id, origin, feed, head_seq, head_id)"
                  " VALUES (1, %s, 'f', 200000, %s), (2, %s, 'g', 1000, %s)",
                  (A, b"h" * 32, b"b" * 32, b"h" * 32))
        c.execute("INSERT INTO types (id, type) VALUES (1, 't')")
        c.execute("INSERT INTO records (rowid, chain, seq, type_id, time, received_at, id,"
                  " envelope, tmax, tmax_all) SELECT s, 1 + (s % 2), s, 1, 1000 * s, 0,"
                  " sha256(int8send(s)), ''::bytea, 0, 0 FROM generate_series(1, 200000) s")
        c.execute(BACKFILL_TIME_BOUNDS)
        c.execute("INSERT INTO payloads (rowid, payload) SELECT s, int8send(s)"
                  " FROM generate_series(1, 200000) s")
        c.execute("ANALYZE")
        sql, params = pg._query_sql(RecordFilter(origin=A, feed="f", since_ms=150_000_000,
                                                 until_ms=153_600_000), 0, 2000, None)
        (top,), = c.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + sql.replace("?", "%s"),
                            params).fetchone()
    plan = str(top)
    assert "records_chain_time" in plan and "records_chain_seq" not in plan, plan

    def paths(node: dict[str, Any], above: tuple[str, ...] = ()
              ) -> Iterator[tuple[tuple[str, ...], dict[str, Any]]]:
        yield above, node
        for child in node.get("Plans", []):
            yield from paths(child, (*above, node["Node Type"]))

    nodes = list(paths(top["Plan"]))
    (payloads,) = [(above, n) for above, n in nodes if n.get("Relation Name") == "payloads"]
    # (the query's own scan of records, not the bound's search: schema v12)
    (records,) = [(above, n) for above, n in nodes if n.get("Alias") == "r"]
    assert "Limit" in records[0] and "Limit" not in payloads[0], plan
    assert payloads[1]["Actual Rows"] * payloads[1]["Actual Loops"] == 1800, plan
    rows = pg.query(RecordFilter(origin=A, feed="f", since_ms=150_000_000,
                                 until_ms=153_600_000), limit=2000)
    assert [r.seq for r in rows] == list(range(150_000, 153_600, 2))


def test_check_finds_damage_in_a_postgresql_database(pg: PgStorage) -> None:
    """``citynode check`` on PostgreSQL: the structure the writer keeps (quick_check:
    heads, payloads, valid indexes, amcheck's B-tree check when installed) and every
    record re-verified (audit.check_storage, as on SQLite)."""
    from citynode.audit import check_storage

    pg.append(chain(0, "f", 5)).result(5)
    assert pg.quick_check() == []
    with psycopg.connect(pg.url, autocommit=True) as c:
        c.execute("CREATE EXTENSION IF NOT EXISTS amcheck")
    assert pg.quick_check() == []  # every B-tree index checked, and whole
    assert check_storage(pg).problems == []

    with psycopg.connect(pg.url, autocommit=True) as c:
        c.execute("UPDATE chains SET head_seq = 4")  # a head behind its records
        c.execute("INSERT INTO payloads (rowid, payload) VALUES (999999, 'x')")
        # The signature's last byte flipped in the stored envelope of seq 2 (the
        # tombstone: body, signature, then the nil where the payload goes).
        c.execute("UPDATE records SET envelope = set_byte(envelope, length(envelope) - 2,"
                  " get_byte(envelope, length(envelope) - 2) # 1) WHERE seq = 2")
    found = pg.quick_check()
    assert found == ["1 feed(s) whose head is not a record held",
                     "1 record(s) past their feed's head",
                     "1 payload(s) without their record"], found
    problems = check_storage(pg).problems
    assert any("seq 2" in p for p in problems), problems


def test_a_database_copied_or_restored_is_marked_restored(pg_server: Any,
                                                        pg_url: str) -> None:
    """As SQLite's copied-back file: a database that is not the one last opened (here
    a copy made from it, as a pg_dump restored into a new database is) counts as
    restored, so the node waits for its partners before signing on its own feeds.
    Reopening the same database does not."""
    with PgStorage.open_url(pg_url) as st:
        st.append(chain(0, "f", 3)).result(5)
    with PgStorage.open_url(pg_url) as st:
        assert st.restored() is None  # the same database, reopened
    name = pg_url.rsplit("/", 1)[1]
    with psycopg.connect(pg_server.url(), autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}_copy" TEMPLATE "{name}"')
    with PgStorage.open_url(f"{pg_url}_copy") as copy:
        assert copy.restored() is not None and "not the one last opened" in copy.restored()
        assert copy.head(A, "f") == (3, chain(0, "f", 3)[-1].id)
    with PgStorage.open_url(pg_url) as st:
        assert st.restored() is None
