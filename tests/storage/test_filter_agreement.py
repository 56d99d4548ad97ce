"""The record filter's SQL (run by Storage.query on a real SQLite file) and its in-memory
match (live tails, the verifying client) select the same records, and the indexes still
serve it."""

from __future__ import annotations

import random
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from citynode.core.filters import MAX_SEQ, BBox, RecordFilter, indexed
from citynode.core.keys import SigningKey
from citynode.core.records import SEALED_TYPE, Record, sign_record
from citynode.storage import Storage, StoredRow

KEYS = [SigningKey(bytes([k]) * 32) for k in (7, 8, 9)]
ORIGINS = [k.public_key for k in KEYS]
FEEDS = ["air", "noise", "x.y"]
TYPES = ["org.example.Air", "org.example.Noise"]
T0 = 1_795_000_000_000
# Longitudes and latitudes on and around the edges that matter: the antimeridian, the
# poles, zero.
LONS = [-180.0, -179.5, -170.0, -0.5, 0.0, 10.0, 170.0, 179.5, 180.0]
LATS = [-90.0, -10.0, 0.0, 10.0, 90.0]
SETTINGS = settings(max_examples=300, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


def _location(kind: str, lon: float, lat: float) -> dict[str, Any]:
    if kind == "Point":
        return {"type": "Point", "coordinates": [lon, lat]}
    if kind == "LineString":
        return {"type": "LineString", "coordinates": [[lon, lat], [0.0, 0.0]]}
    return {"type": "Polygon", "coordinates": [[[lon, lat], [0.0, 0.0], [1.0, 1.0],
                                                [lon, lat]]]}


def _records(draw: Any, n: int) -> list[Record]:
    """``n`` records in valid chains: ``draw(kind, choices)`` picks each value."""
    heads: dict[tuple[int, str], tuple[int, bytes]] = {}
    out = []
    for _ in range(n):
        k, feed = draw("key", range(len(KEYS))), draw("feed", FEEDS)
        seq, prev = heads.get((k, feed), (0, None))
        data: dict[str, Any] = {"n": seq}
        where = draw("where", ["Point", "LineString", "Polygon", None, "junk"])
        if where == "junk":
            data["location"] = {"type": "Point", "coordinates": [500.0, 0.0]}  # not usable
        elif where is not None:
            data["location"] = _location(where, draw("lon", LONS), draw("lat", LATS))
        sealed = draw("sealed", [False, False, False, True])
        rec = sign_record(KEYS[k], feed=feed, seq=seq + 1, prev=prev,
                          time_ms=T0 + draw("time", range(0, 50, 5)),
                          type=draw("type", TYPES), data=data,
                          readers=[ORIGINS[(k + 1) % 3]] if sealed else None)
        heads[(k, feed)] = (rec.seq, rec.id)
        out.append(rec)
    return out


def _coord(values: list[float]) -> Any:
    """A coordinate on an edge of the corpus, just beside one, or anything."""
    near = hs.sampled_from(values).flatmap(
        lambda v: hs.sampled_from([v, v - 0.25, v + 0.25, -v]))
    return near | hs.floats(allow_nan=False, min_value=-200, max_value=200) | hs.sampled_from(
        [float("inf"), float("-inf")])


@hs.composite
def filters(draw: hs.DrawFn) -> RecordFilter:
    """Filters whose values are those of the corpus, beside them, or anything."""
    origin = draw(hs.none() | hs.sampled_from(ORIGINS))
    feed = draw(hs.none() | hs.sampled_from([*FEEDS, "other"]))
    times = hs.integers(-1, 51).map(lambda d: T0 + d) | hs.integers(0, 2**62)
    since, until = draw(hs.none() | times), draw(hs.none() | times)
    if since is not None and until is not None and since >= until:
        since = None
    bbox = None
    if draw(hs.booleans()):
        w, e = draw(_coord(LONS)), draw(_coord(LONS))
        s, n = sorted([draw(_coord(LATS)), draw(_coord(LATS))])
        bbox = BBox(w, s, e, n)
    seq_from = seq_to = None
    if origin is not None and feed is not None:
        seq_from = draw(hs.none() | hs.integers(1, 12) | hs.just(MAX_SEQ))
        seq_to = draw(hs.none() | hs.integers(1, 12))
    return RecordFilter(origin=origin, feed=feed,
                        type=draw(hs.none() | hs.sampled_from([*TYPES, SEALED_TYPE, "x"])),
                        since_ms=since, until_ms=until, bbox=bbox, from_seq=seq_from,
                        to_seq=seq_to)


def _corpus(st: Storage) -> tuple[Storage, list[Record], list[StoredRow]]:
    rng = random.Random(11)
    recs = _records(lambda _kind, choices: rng.choice(list(choices)), 300)
    for start in range(0, len(recs), 50):
        st.append(recs[start:start + 50]).result(10)
    return st, recs, st.query(limit=1000)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def corpus(request: pytest.FixtureRequest
           ) -> Iterator[tuple[Storage, list[Record], list[StoredRow]]]:
    """300 records (some sealed, some without a usable location) in a real database, on
    each engine (PostgreSQL: a database of the session's server, tests/pg.py)."""
    if request.param == "postgresql":
        from citynode.storage_pg import PgStorage

        st: Storage = PgStorage.open_url(request.getfixturevalue("pg_server")
                                         .create_database())
        yield _corpus(st)
        st.close()
        return
    with tempfile.TemporaryDirectory() as d:
        st = Storage.open(Path(d) / "citynode.db")
        yield _corpus(st)
        st.close()


@pytest.fixture(scope="module")
def sqlite_corpus() -> Iterator[tuple[Storage, list[Record], list[StoredRow]]]:
    """The corpus in SQLite only: for its query plans."""
    with tempfile.TemporaryDirectory() as d:
        st = Storage.open(Path(d) / "citynode.db")
        yield _corpus(st)
        st.close()


def _check(st: Storage, recs: list[Record], rows: list[StoredRow], f: RecordFilter) -> None:
    got = [r.id for r in st.query(f, limit=1000)]
    assert got == [r.id for r in recs if f.record_mismatch(r) is None], f.describe()
    assert got == [r.id for r in rows if f.matches(r)], f.describe()


def test_storage_indexes_what_the_filter_reads(corpus: Any) -> None:
    """The columns storage keeps of a record are those the filter matches a record by."""
    _st, recs, rows = corpus
    assert [r.id for r in rows] == [r.id for r in recs]
    for rec, r in zip(recs, rows, strict=True):
        assert indexed(rec) == (r.origin, r.feed, r.seq, r.type, r.time, r.lon, r.lat)
    # The corpus holds what makes the comparison worth doing.
    kinds = {(r.type == SEALED_TYPE, r.lon is None) for r in rows}
    assert kinds == {(True, True), (False, True), (False, False)}
    assert {r.lon for r in rows} >= {-180.0, 180.0, 179.5, -179.5}


def test_sql_and_memory_agree_on_a_corpus(corpus: Any) -> None:
    st, recs, rows = corpus

    @SETTINGS
    @given(filters())
    def check(f: RecordFilter) -> None:
        _check(st, recs, rows, f)

    check()
    # Boxes across the antimeridian, by hand: both sides, the edges, the latitudes.
    for w, s, e, n in [(170, -90, -170, 90), (179.5, -10, -179.5, 10), (180, -90, -180, 90),
                       (0, 0, -0.5, 0), (10, -10, 0, 10), (-170, -90, -180, 90)]:
        f = RecordFilter(bbox=BBox(w, s, e, n))
        _check(st, recs, rows, f)
        assert st.query(f, limit=1000), f.describe()  # each box holds records


def test_paging_by_cursor_returns_each_match_once(corpus: Any) -> None:
    st, recs, _rows = corpus

    @settings(max_examples=40, deadline=None, derandomize=True)
    @given(filters(), hs.integers(1, 7))
    def check(f: RecordFilter, page: int) -> None:
        got: list[bytes] = []
        cursor = 0
        while True:
            part = st.query(f, after_rowid=cursor, limit=page)
            got += [r.id for r in part]
            if len(part) < page:
                break
            cursor = part[-1].rowid
        assert got == [r.id for r in recs if f.record_mismatch(r) is None]

    check()


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(hs.data())
def test_sql_and_memory_agree_on_generated_records(data: hs.DataObject) -> None:
    """Records drawn by hypothesis too, each example in a fresh database."""
    recs = _records(lambda kind, choices: data.draw(hs.sampled_from(list(choices)), kind),
                    data.draw(hs.integers(0, 12), "count"))
    with tempfile.TemporaryDirectory() as d:
        st = Storage.open(Path(d) / "citynode.db")
        try:
            if recs:
                st.append(recs).result(10)
            rows = st.query(limit=1000)
            for _ in range(5):
                _check(st, recs, rows, data.draw(filters(), "filter"))
        finally:
            st.close()


def test_the_indexes_serve_the_filters(sqlite_corpus: Any) -> None:
    """EXPLAIN QUERY PLAN: one feed is found in ``chains`` by its unique (origin, feed),
    then walks the (chain, seq) index in seq order (no sort), or its time range the
    (chain, time) index (schema v9: not the feed up to the range); a type is found in
    ``types``, then walks the (type) index in rowid order, or with a time range the
    (type, time) index; an origin its chains; a box the
    (lon, lat) index. Origin, feed and type are never compared row by row."""
    st = sqlite_corpus[0]
    a = ORIGINS[0]
    find_chain = "SEARCH c USING COVERING INDEX sqlite_autoindex_chains_1 (origin=? AND feed=?)"
    # Each row's payload, if held, by its rowid (one primary-key search per row).
    payload = "SEARCH p USING INTEGER PRIMARY KEY (rowid=?) LEFT-JOIN"
    assert st.query_plan() == ["SEARCH r USING INTEGER PRIMARY KEY (rowid>?)", payload]
    one_feed = st.query_plan(RecordFilter(origin=a, feed="air"))
    assert one_feed == [find_chain, "SEARCH r USING INDEX records_chain_seq (chain=?)",
                        payload]
    seqs = st.query_plan(RecordFilter(origin=a, feed="air", from_seq=2, to_seq=5))
    assert seqs == [find_chain,
                    "SEARCH r USING INDEX records_chain_seq (chain=? AND seq>? AND seq<?)",
                    payload]
    # A time range of one feed starts at the first position whose running maximum of
    # time reaches ``since`` (schema v12: one search of (chain, tmax, seq)) ...
    since_seq = ["SCALAR SUBQUERY 2",
                 "SEARCH b USING COVERING INDEX records_chain_tmax (chain=? AND tmax>?)",
                 "SCALAR SUBQUERY 1",
                 "SEARCH c2 USING COVERING INDEX sqlite_autoindex_chains_1"
                 " (origin=? AND feed=?)"]
    hour = RecordFilter(origin=a, feed="air", since_ms=T0, until_ms=T0 + 3_600_000)
    assert len(st.query(hour, limit=1000)) == 29
    # ... holding fewer records than the limit (29 < 100), it is read through (chain,
    # time) and sorted: a walk by seq would go on to the feed's end looking for more;
    assert st.query_plan(hour) == [find_chain, "SEARCH r USING INDEX records_chain_time"
                                   " (chain=? AND time>? AND time<?)", *since_seq, payload,
                                   "USE TEMP B-TREE FOR ORDER BY"]
    # holding as many or more (29 >= 10), the feed is walked in seq order from the
    # bound (no sort), stopping at LIMIT.
    for f in (hour, RecordFilter(origin=a, feed="air", since_ms=T0)):
        assert st.query_plan(f, limit=10) == [
            find_chain, "SEARCH r USING INDEX records_chain_seq (chain=? AND seq>?)",
            *since_seq, payload]
    find_type = "SEARCH t USING COVERING INDEX sqlite_autoindex_types_1 (type=?)"
    # A type alone (schema v11): its (type_id) index holds the rowid after the type, so
    # a page is one index range in the ORDER BY's order, stopping at LIMIT (no sort: a
    # rare type does not walk the table, a common one does not sort all its records).
    assert st.query_plan(RecordFilter(type="org.example.Air")) == [
        find_type, "SEARCH r USING INDEX records_type (type_id=? AND rowid>?)", payload]
    # With a time range, the range in the (type, time) index, not the type's records
    # from the cursor on: a narrow window late in the table reads the window.
    assert st.query_plan(RecordFilter(type="org.example.Air", since_ms=T0))[:2] == [
        find_type, "SEARCH r USING INDEX records_type_time (type_id=? AND time>?)"]
    assert st.query_plan(RecordFilter(type="org.example.Air", since_ms=T0,
                                      until_ms=T0 + 9))[:2] == [
        find_type, "SEARCH r USING INDEX records_type_time (type_id=? AND time>? AND time<?)"]
    # An origin's records in rowid order: sorted whichever index of its chains is
    # walked ((chain, seq), (chain, time) or (chain, tmax, seq): SQLite takes any, at the
    # same cost).
    by_origin = st.query_plan(RecordFilter(origin=a))
    assert by_origin[0] == "SEARCH c USING COVERING INDEX sqlite_autoindex_chains_1 (origin=?)"
    assert by_origin[1] in ("SEARCH r USING INDEX records_chain_seq (chain=?)",
                            "SEARCH r USING INDEX records_chain_time (chain=?)",
                            "SEARCH r USING INDEX records_chain_tmax (chain=?)")
    assert st.query_plan(RecordFilter(bbox=BBox(10, -10, 20, 10)))[0] == (
        "SEARCH r USING INDEX records_lon_lat (lon>? AND lon<?)")
    # A time window alone is walked in rowid order, as in schema v2 (whose index on time
    # no plan chose: v3 has none), from the first rowid whose running maximum of time
    # (over the table) reaches ``since``, merged with the cursor into one bound (schema
    # v12); no join is made for names the filter does not use.
    since_rowid = ["SCALAR SUBQUERY 1",
                   "SEARCH b USING COVERING INDEX records_tmax_all (tmax_all>?)"]
    assert st.query_plan(RecordFilter(since_ms=T0, until_ms=T0 + 9)) == [
        "SEARCH r USING INTEGER PRIMARY KEY (rowid>?)", *since_rowid, payload]
    assert st.query_plan(RecordFilter(until_ms=T0 + 9)) == [
        "SEARCH r USING INTEGER PRIMARY KEY (rowid>?)", payload]
    # A reader limited to one feed: searched by a feed index, whatever the filter adds
    # (either of the chain's indexes: the rows are sorted by rowid after, either way).
    by_chain = ("SEARCH r USING INDEX records_chain_seq (chain=?)",
                "SEARCH r USING INDEX records_chain_time (chain=?)",
                "SEARCH r USING INDEX records_chain_tmax (chain=?)",
                "SEARCH r USING INDEX records_chain_time (chain=? AND time>?)")
    for f in (RecordFilter(), RecordFilter(bbox=BBox(170, -10, -170, 10)),
              RecordFilter(since_ms=T0)):
        plan = st.query_plan(f, only_feeds=[(a, "air"), (a, "noise")])
        assert plan[0] in by_chain, plan
        assert ("SEARCH c USING COVERING INDEX sqlite_autoindex_chains_1"
                " (origin=? AND feed=?)") in plan, plan
