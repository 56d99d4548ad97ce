"""A process frozen while it writes or leads cannot stop the others for ever: its
writer's open transaction is ended by the server (``idle_in_transaction_session_timeout``)
and the others' lock waits are bounded (``lock_timeout``) and retried; a leader that stops
renewing its lease has every session ended by a follower, which then takes over, and a
commit the frozen one had under way fails instead of landing late. Real PostgreSQL."""

from __future__ import annotations

import time
from collections.abc import Iterator

import psycopg
import pytest

from citynode import storage_pg
from citynode.storage_pg import WRITE_LOCK, PgStorage


@pytest.fixture
def two(pg_url: str) -> Iterator[tuple[PgStorage, PgStorage]]:
    a, b = PgStorage.open_url(pg_url), PgStorage.open_url(pg_url)
    yield a, b
    b.close()
    a.close()


def _sessions(st: PgStorage) -> list[tuple[str, int]]:
    """Every session of ``st`` (its tag in the application name): (state, pid)."""
    with psycopg.connect(st.url) as c:
        return [(r[0], r[1]) for r in c.execute(
            "SELECT state, pid FROM pg_stat_activity WHERE application_name = %s",
            (f"citynode {st.tag}",))]


def test_every_session_is_tagged_with_keepalives_and_the_writer_bounded(
        two: tuple[PgStorage, PgStorage]) -> None:
    a, _b = two
    a.set_meta("x", b"1").result(timeout=10)
    assert a.lead()
    assert len(_sessions(a)) >= 3  # writer, a reader, the leadership session
    w = a._writer_conn()
    settings = dict(w.execute(
        "SELECT name, setting FROM pg_settings WHERE name IN ('lock_timeout',"
        " 'idle_in_transaction_session_timeout', 'tcp_keepalives_idle')").fetchall())
    assert settings == {"lock_timeout": str(int(storage_pg.WRITER_IDLE_S * 1000)),
                        "idle_in_transaction_session_timeout":
                            str(int(storage_pg.WRITER_IDLE_S * 1000)),
                        "tcp_keepalives_idle": "4"}


def test_a_writer_frozen_in_its_transaction_does_not_block_the_others(
        two: tuple[PgStorage, PgStorage], monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = two
    # a's writer stops inside its transaction holding the writers' lock (as a process
    # SIGSTOPped in the middle of a batch).
    w = a._writer_conn()
    w.execute("SET idle_in_transaction_session_timeout = 2000")  # the test's patience
    w.execute("BEGIN")
    w.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
    w.execute("INSERT INTO meta (key, value) VALUES ('late', 'x')")
    t0 = time.monotonic()
    b.set_meta("probe", b"x").result(timeout=60)  # waits, then gets the lock
    assert time.monotonic() - t0 < 30
    time.sleep(0.5)
    with pytest.raises(psycopg.Error):  # the frozen one's commit fails: never lands
        w.execute("COMMIT")
    assert b.get_meta("late") is None
    # And a's writer reconnects by itself for its next batch.
    a.set_meta("after", b"y").result(timeout=30)
    assert b.get_meta("after") == b"y"


def test_a_writer_waits_for_the_lock_a_bounded_time_and_retries(
        two: tuple[PgStorage, PgStorage], monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = two
    monkeypatch.setattr(storage_pg, "_LOCK_TRIES", 2)
    b._writer_conn().execute("SET lock_timeout = 500")
    with psycopg.connect(a.url, autocommit=True) as holder:
        holder.execute("BEGIN")
        holder.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
        fut = b.set_meta("probe", b"x")
        with pytest.raises(Exception) as got:
            fut.result(timeout=30)
        assert "lock" in str(got.value).lower()
        holder.execute("ROLLBACK")
    b.set_meta("probe", b"x").result(timeout=30)  # the next batch goes through
    assert a.get_meta("probe") == b"x"


def test_a_leader_that_stops_renewing_its_lease_is_ended_and_replaced(
        two: tuple[PgStorage, PgStorage], monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = two
    monkeypatch.setattr(storage_pg, "LEASE_S", 1.5)
    assert a.lead()
    assert not b.lead()
    for _ in range(10):  # a's lease thread renews (a's own checks may lag): kept
        time.sleep(0.5)
        assert not b.lead()
    assert a.lead()
    # a freezes (SIGSTOP stops its lease thread too) with a write under way in its
    # writer's transaction.
    a._leadership._stop.set()
    w = a._writer_conn()
    w.execute("BEGIN")
    w.execute("INSERT INTO meta (key, value) VALUES ('late', 'x')")
    deadline = time.monotonic() + 20
    while not b.lead():
        assert time.monotonic() < deadline, "no takeover after the lease ran out"
        time.sleep(0.3)
    with pytest.raises(psycopg.Error):  # fenced: its sessions were ended
        w.execute("COMMIT")
    assert b.get_meta("late") is None
    assert not a.lead()  # it wakes and finds the leadership gone


def test_an_outage_is_a_few_warnings_not_one_a_second() -> None:
    import logging

    f = storage_pg._Seldom(("cannot listen",))

    def rec(at: float, msg: str = "cannot listen for new records: down") -> logging.LogRecord:
        r = logging.LogRecord("citynode.storage", logging.WARNING, __file__, 1, msg, None,
                              None)
        r.created = at
        return r

    passed = [r for r in (rec(1000.0 + t) for t in range(0, 90)) if f.filter(r)]
    assert [r.created for r in passed] == [1000.0, 1030.0, 1060.0]
    assert "(29 more like it in the last 30 s)" in passed[1].getMessage()
    assert f.filter(rec(1001.0, "something else"))  # other messages untouched
