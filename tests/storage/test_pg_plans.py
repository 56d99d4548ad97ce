"""Query plans on PostgreSQL that do not grow with the feed: a wide time range of one feed
(``since=1``) walks (chain, seq) and stops after the rows asked for, instead of reading
and sorting every record in range; a ``since`` deep in a long feed, or in the table,
starts at the bound of its running maximum of time (schema v12), whatever order the
records' times come in. EXPLAIN ANALYZE on a real server."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg

from citynode.core.filters import RecordFilter
from citynode.storage import BACKFILL_TIME_BOUNDS
from citynode.storage_pg import PgStorage
from tests.storage.test_storage import A
from tests.storage.test_storage_pg import pg  # noqa: F401 - the fixture

N = 200_000


def _fill(url: str, time_sql: str = "1000 * s") -> None:
    # Rows written directly (the plan, not the records, is under test), their running
    # maxima of time as the writer keeps them (the migration's backfill); ANALYZE as
    # autovacuum would. Feed f holds the even seqs' rows, g the odd ones; the time of
    # row s is ``time_sql``.
    with psycopg.connect(url, autocommit=True) as c:
        c.execute("INSERT INTO chains (id, origin, feed, head_seq, head_id)"
                  " VALUES (1, %s, 'f', %s, %s), (2, %s, 'g', 1000, %s)",
                  (A, N, b"h" * 32, b"b" * 32, b"h" * 32))
        c.execute("INSERT INTO types (id, type) VALUES (1, 't')")
        # (tmax and tmax_all are NOT NULL: 0 until the backfill sets them.)
        c.execute("INSERT INTO records (rowid, chain, seq, type_id, time, received_at, id,"
                  f" envelope, tmax, tmax_all) SELECT s, 1 + (s %% 2), s, 1, {time_sql}, 0,"
                  " sha256(int8send(s)), ''::bytea, 0, 0 FROM generate_series(1, %s) s",
                  (N,))
        c.execute(BACKFILL_TIME_BOUNDS)
        c.execute("INSERT INTO payloads (rowid, payload) SELECT s, int8send(s)"
                  " FROM generate_series(1, %s) s", (N,))
        c.execute("ANALYZE")


def _plan(st: PgStorage, f: RecordFilter, after: int = 0, limit: int = 100
          ) -> dict[str, Any]:
    """EXPLAIN ANALYZE of the statement :meth:`PgStorage.query` runs."""
    sql, params = st._query_sql(f, after, limit, None)
    with psycopg.connect(st.url) as c:
        (top,), = c.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + sql.replace("?", "%s"),
                            params).fetchone()
    return dict(top["Plan"])


def _nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from _nodes(child)


def _scanned(plan: dict[str, Any]) -> int:
    """Rows of ``records`` the query's own scan (alias ``r``, not the bound's search)
    looked at, kept or not, over every loop."""
    return sum((n["Actual Rows"] + n.get("Rows Removed by Filter", 0)) * n["Actual Loops"]
               for n in _nodes(plan) if n.get("Alias") == "r")


def _r_indexes(plan: dict[str, Any]) -> list[str | None]:
    return [n.get("Index Name") for n in _nodes(plan) if n.get("Alias") == "r"]


def test_a_wide_time_range_of_one_feed_reads_the_rows_returned_not_the_feed(
        pg: PgStorage) -> None:  # noqa: F811
    _fill(pg.url)
    wide = RecordFilter(origin=A, feed="f", since_ms=1)
    plan = _plan(pg, wide)
    nodes = list(_nodes(plan))
    assert not [n for n in nodes if n["Node Type"] == "Sort"], plan
    assert _r_indexes(plan) == ["records_chain_seq"], plan
    read = _read(plan)
    assert read <= 200, f"{read} rows of records read for 100 returned: {plan}"
    rows = pg.query(wide, limit=100)
    assert [r.seq for r in rows] == list(range(2, 201, 2))
    page = pg.query(wide, after_rowid=rows[-1].rowid, limit=100)
    assert [r.seq for r in page] == list(range(202, 401, 2))


def test_a_range_holding_fewer_records_than_the_limit_is_read_through_its_time_index(
        pg: PgStorage) -> None:  # noqa: F811
    # 50 records of f deep in the feed, 100 asked for: walking by seq from the range
    # would go on to the feed's end for more; the range is read whole and sorted.
    _fill(pg.url)
    narrow = RecordFilter(origin=A, feed="f", since_ms=150_000_000, until_ms=150_100_000)
    plan = _plan(pg, narrow)
    assert _r_indexes(plan) == ["records_chain_time"], plan
    assert _scanned(plan) <= 100, plan  # the range, not the feed
    assert [r.seq for r in pg.query(narrow, limit=100)] == list(range(150_000, 150_100, 2))


def test_a_range_deep_in_a_feed_starts_at_its_bound(pg: PgStorage) -> None:  # noqa: F811
    # Schema v12: an hour of f (1,800 records) 150k records into the feed, 100 asked
    # for: the feed is walked by seq from the first position whose running maximum of
    # time reaches ``since`` (one search of (chain, tmax, seq)), not from seq 1, and not
    # the whole range read and sorted.
    _fill(pg.url)
    hour = RecordFilter(origin=A, feed="f", since_ms=150_000_000, until_ms=153_600_000)
    for f in (hour, RecordFilter(origin=A, feed="f", since_ms=150_000_000)):
        plan = _plan(pg, f)
        assert not [n for n in _nodes(plan) if n["Node Type"] == "Sort"], plan
        assert _r_indexes(plan) == ["records_chain_seq"], plan
        assert "records_chain_tmax" in str(plan), plan
        assert _scanned(plan) <= 200, plan
        assert [r.seq for r in pg.query(f, limit=100)] == list(range(150_000, 150_200, 2))


def test_a_since_deep_in_a_feed_of_out_of_order_times_reads_a_bounded_number_of_rows(
        pg: PgStorage) -> None:  # noqa: F811
    # Times out of seq order: each record up to 100 s before or after its place (a
    # deterministic shuffle), so no seq can be found from a time by (chain, time). The
    # bound (the running maximum) is still sound and close: the walk reads the records
    # around ``since`` that are out of place, not the 150k before them.
    jitter = "1000 * (s + ((s * 7919) %% 201) - 100)"
    _fill(pg.url, jitter)
    since = 150_000_000
    f = RecordFilter(origin=A, feed="f", since_ms=since)
    plan = _plan(pg, f)
    assert _r_indexes(plan) == ["records_chain_seq"], plan
    assert _scanned(plan) <= 600, plan
    got = [r.seq for r in pg.query(f, limit=100)]
    want = [s for s in range(2, N + 1, 2) if 1000 * (s + ((s * 7919) % 201) - 100) >= since]
    assert got == want[:100]


def test_a_time_alone_deep_in_the_table_starts_at_its_bound(
        pg: PgStorage) -> None:  # noqa: F811
    # No origin, no feed (rowid order): from the first rowid whose running maximum of
    # time over the table reaches ``since`` (one search of (tmax_all, rowid)), through
    # the primary key, not the 150k rows before it.
    jitter = "1000 * (s + ((s * 7919) %% 201) - 100)"
    _fill(pg.url, jitter)
    since = 150_000_000
    for f in (RecordFilter(since_ms=since), RecordFilter(since_ms=since, until_ms=since + 10**7)):
        plan = _plan(pg, f)
        assert _r_indexes(plan) == ["records_pkey"], plan
        assert "records_tmax_all" in str(plan), plan
        assert _scanned(plan) <= 600, plan
        got = [r.rowid for r in pg.query(f, limit=100)]
        want = [s for s in range(1, N + 1) if 1000 * (s + ((s * 7919) % 201) - 100) >= since]
        assert got == want[:100]
    # ... and from a cursor past the bound, from the cursor.
    plan = _plan(pg, RecordFilter(since_ms=since), after=180_000)
    assert _scanned(plan) <= 200, plan


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
