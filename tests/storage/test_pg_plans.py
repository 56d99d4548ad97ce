"""Query plans on PostgreSQL that do not grow with the feed: a wide time range of one feed
(``since=1``) walks (chain, seq) and stops after the rows asked for, instead of reading
and sorting every record in range. EXPLAIN ANALYZE on a real server."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg

from citynode.core.filters import RecordFilter
from citynode.storage_pg import PgStorage
from tests.storage.test_storage import A
from tests.storage.test_storage_pg import pg  # noqa: F401 - the fixture

N = 200_000


def _fill(url: str) -> None:
    # Rows written directly (the plan, not the records, is under test); ANALYZE as
    # autovacuum would. Feed f holds the even seqs' rows, g the odd ones.
    with psycopg.connect(url, autocommit=True) as c:
        c.execute("INSERT INTO chains (id, origin, feed, head_seq, head_id)"
                  " VALUES (1, %s, 'f', %s, %s), (2, %s, 'g', 1000, %s)",
                  (A, N, b"h" * 32, b"b" * 32, b"h" * 32))
        c.execute("INSERT INTO types (id, type) VALUES (1, 't')")
        c.execute("INSERT INTO records (rowid, chain, seq, type_id, time, received_at, id,"
                  " envelope) SELECT s, 1 + (s %% 2), s, 1, 1000 * s, 0,"
                  " sha256(int8send(s)), ''::bytea FROM generate_series(1, %s) s", (N,))
        c.execute("INSERT INTO payloads (rowid, payload) SELECT s, int8send(s)"
                  " FROM generate_series(1, %s) s", (N,))
        c.execute("ANALYZE")


def _plan(st: PgStorage, f: RecordFilter, after: int = 0) -> dict[str, Any]:
    """EXPLAIN ANALYZE of the statement :meth:`PgStorage.query` runs."""
    sql, params = st._query_sql(f, after, 100, None)
    with psycopg.connect(st.url) as c:
        (top,), = c.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + sql.replace("?", "%s"),
                            params).fetchone()
    return dict(top["Plan"])


def _nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from _nodes(child)


def test_a_wide_time_range_of_one_feed_reads_the_rows_returned_not_the_feed(
        pg: PgStorage) -> None:  # noqa: F811
    _fill(pg.url)
    wide = RecordFilter(origin=A, feed="f", since_ms=1)
    plan = _plan(pg, wide)
    nodes = list(_nodes(plan))
    assert not [n for n in nodes if n["Node Type"] == "Sort"], plan
    scans = [n for n in nodes if n.get("Relation Name") == "records"]
    assert [n.get("Index Name") for n in scans] == ["records_chain_seq"], plan
    read = sum(n["Actual Rows"] * n["Actual Loops"] for n in scans)
    assert read <= 200, f"{read} rows of records read for 100 returned: {plan}"
    rows = pg.query(wide, limit=100)
    assert [r.seq for r in rows] == list(range(2, 201, 2))
    page = pg.query(wide, after_rowid=rows[-1].rowid, limit=100)
    assert [r.seq for r in page] == list(range(202, 401, 2))


def test_a_narrow_range_of_one_feed_is_still_read_through_its_time_index(
        pg: PgStorage) -> None:  # noqa: F811
    _fill(pg.url)
    narrow = RecordFilter(origin=A, feed="f", since_ms=150_000_000, until_ms=153_600_000)
    plan = _plan(pg, narrow)
    indexes = {n["Index Name"] for n in _nodes(plan) if "Index Name" in n}
    assert "records_chain_time" in indexes and "records_chain_seq" not in indexes, plan
    scans = [n for n in _nodes(plan) if n.get("Relation Name") == "records"]
    read = sum(n["Actual Rows"] * n["Actual Loops"] for n in scans)
    assert read <= 2000, plan  # the range (1800 records), not the feed


def _read(plan: dict[str, Any]) -> int:
    """Rows of ``records`` the plan read (over every loop)."""
    return sum(n["Actual Rows"] * n["Actual Loops"] for n in _nodes(plan)
               if n.get("Relation Name") == "records")


def test_a_page_of_one_type_reads_the_rows_returned_not_the_type(
        pg: PgStorage) -> None:  # noqa: F811
    # Schema v11's (type_id, rowid) index, with the type's id looked up first: a page of
    # a type alone is one index range in rowid order, stopping at LIMIT -- for a rare
    # type (1 record in 1000, the last ones deep in the table) as for a common one.
    _fill(pg.url)
    with psycopg.connect(pg.url, autocommit=True) as c:
        c.execute("INSERT INTO types (id, type) VALUES (2, 'rare')")
        c.execute("UPDATE records SET type_id = 2 WHERE rowid % 1000 = 0")
        c.execute("ANALYZE")
    for name, first in (("rare", 1000), ("t", 1)):
        f = RecordFilter(type=name)
        plan = _plan(pg, f)
        assert not [n for n in _nodes(plan) if n["Node Type"] == "Sort"], plan
        # (a common type may as well walk the primary key, keeping 999 rows in 1000)
        scans = [n.get("Index Name") for n in _nodes(plan)
                 if n.get("Relation Name") == "records"]
        assert scans == ["records_type"] or (name == "t" and scans == ["records_pkey"]), plan
        assert _read(plan) <= 200, f"{_read(plan)} rows read for 100 of {name}: {plan}"
        rows = pg.query(f, limit=100)
        assert len(rows) == 100 and rows[0].rowid == first
        assert all(r.type == name for r in rows)
        page = pg.query(f, after_rowid=rows[-1].rowid, limit=100)
        assert [r.rowid for r in page] == sorted(r.rowid for r in page)
        assert page[0].rowid > rows[-1].rowid and all(r.type == name for r in page)
    deep = _plan(pg, RecordFilter(type="rare"), after=150_000)
    assert _read(deep) <= 200, deep

