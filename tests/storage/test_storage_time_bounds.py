"""Schema v12: a ``since`` starts a query at the first position whose running maximum of
time reaches it. Records whose times do not follow their seqs (an old time after newer
ones, a far-ahead time early, a feed going back in time) are answered exactly as a
brute-force filter of every record answers, on both engines; the maxima are right after
every insert path, a truncation and the migration from schema 11, and ``citynode
check`` (quick_check) finds a wrong one."""

from __future__ import annotations

import random
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import psycopg
import pytest

from citynode import storage_pg
from citynode.core.filters import RecordFilter
from citynode.core.records import Record
from citynode.storage import TIME_BOUNDS_WRONG, Storage
from citynode.storage_pg import PgStorage
from tests.storage.test_storage import KEYS, T0, db_path, make, st  # noqa: F401 - fixtures

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
FAR = T0 + 10**9  # a time far ahead of every other


def _feed(k: int, name: str, times: list[int], first: int = 1,
          prev: bytes | None = None) -> list[Record]:
    out = []
    for i, t in enumerate(times):
        r = make(k, name, first + i, prev, time_ms=t, type=f"org.example.T{k}")
        out.append(r)
        prev = r.id
    return out


def _corpus() -> dict[tuple[int, str], list[Record]]:
    """Three feeds whose times do not follow their seqs."""
    rnd = random.Random(17)
    # jittered around a rising line, a far-ahead time early (seq 3) and old ones late
    a = [T0 + 100 * i + rnd.randrange(-400, 400) for i in range(40)]
    a[2] = FAR
    a[30] = a[31] = T0 - 5000
    # rising, one old time after newer ones, equal times
    b = [T0 + 50 * i for i in range(30)]
    b[20] = T0 + 10
    b[25] = b[26] = b[27]
    # going back in time all along
    c = [T0 + 4000 - 100 * i for i in range(30)]
    return {(0, "a"): _feed(0, "a", a), (0, "b"): _feed(0, "b", b),
            (1, "c"): _feed(1, "c", c)}


def _load(s: Storage, feeds: dict[tuple[int, str], list[Record]]) -> list[Record]:
    """Append the feeds interleaved (rowid order mixes them), by the insert paths a node
    uses: batches of several feeds, durable ones (own records), inline small ones.
    Returns the records in rowid order."""
    order: list[Record] = []
    pos = dict.fromkeys(feeds, 0)
    step = 0
    while any(pos[k] < len(v) for k, v in feeds.items()):
        batch: list[Record] = []
        for key, recs in feeds.items():
            n = 1 + (step + len(key[1])) % 4
            batch += recs[pos[key]:pos[key] + n]
            pos[key] = min(len(recs), pos[key] + n)
        mode = step % 3
        if mode == 0:
            s.append(batch).result(10)
        elif mode == 1:
            s.append(batch, durable=True).result(10)
        else:
            for i in range(0, len(batch), 4):  # small writes, inline when idle
                s.append(batch[i:i + 4], inline=True).result(10)
        order += batch
        step += 1
    return order


def _expected_maxima(order: list[Record]) -> list[tuple[int, int]]:
    """(tmax, tmax_all) of each record in rowid order, computed here."""
    out: list[tuple[int, int]] = []
    per: dict[tuple[bytes, str], int] = {}
    top = 0
    for r in order:
        key = (r.origin, r.feed)
        per[key] = r.time if key not in per else max(per[key], r.time)
        top = r.time if not out else max(top, r.time)
        out.append((per[key], top))
    return out


def _all_pages(s: Storage, f: RecordFilter, limit: int) -> list[bytes]:
    got: list[bytes] = []
    after = 0
    while True:
        rows = s.query(f, after_rowid=after, limit=limit)
        got += [r.id for r in rows]
        if len(rows) < limit:
            return got
        after = rows[-1].rowid


def _check_answers(s: Storage, order: list[Record]) -> int:
    """Every query of a set with ``since`` (and ``until``) answers what a filter of
    every record in rowid order answers (within a feed rowid order is seq order), page
    by page. Returns the number of filters compared."""
    times = sorted({r.time for r in order})
    sinces = sorted({0, FAR, FAR + 1, *(t + d for t in times[::8] for d in (0, 1))})
    compared = 0
    for since in sinces:
        for until in (None, since + 150, since + 2000, FAR + 5):
            if until is not None and until <= since:
                continue
            for origin, feed, type_ in ((KEYS[0].public_key, "a", None),
                                        (KEYS[0].public_key, "b", None),
                                        (KEYS[1].public_key, "c", None),
                                        (None, None, None), (None, None, "org.example.T0")):
                f = RecordFilter(origin=origin, feed=feed, type=type_, since_ms=since,
                                 until_ms=until)
                want = [r.id for r in order if f.record_mismatch(r) is None]
                for limit in (3, 100):
                    assert _all_pages(s, f, limit) == want, (f.describe(), limit)
                compared += 1
    return compared


def _maxima(s: Storage) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for a, b in
            s._all("SELECT tmax, tmax_all FROM records ORDER BY rowid")]


def _raw_execute(s: Storage, path: Path, sql: str) -> None:
    """Run ``sql`` on the storage's database from outside it (another process would)."""
    if isinstance(s, PgStorage):
        with psycopg.connect(s.url, autocommit=True) as c:
            c.execute(sql)
    else:
        lite = sqlite3.connect(path, isolation_level=None)
        try:
            lite.execute(sql)
        finally:
            lite.close()


def test_since_answers_as_a_filter_of_every_record_whatever_the_order_of_times(
        st: Storage) -> None:  # noqa: F811
    order = _load(st, _corpus())
    assert _maxima(st) == _expected_maxima(order)
    assert _check_answers(st, order) > 100
    assert st.quick_check() == []


def test_a_truncated_feed_goes_on_from_the_maximum_of_what_it_keeps(
        st: Storage, db_path: Path) -> None:  # noqa: F811
    feeds = _corpus()
    order = _load(st, feeds)
    # Feed a cut after seq 10 (its far-ahead record, seq 3, stays), then grows again
    # with other times; feed b cut after seq 5, then grows with old ones.
    assert st.truncate(KEYS[0].public_key, "a", 10).result(10) == 30
    assert st.truncate(KEYS[0].public_key, "b", 5).result(10) == 25
    order = [r for r in order if not ((r.feed == "a" and r.seq > 10)
                                      or (r.feed == "b" and r.seq > 5))]
    a = _feed(0, "a", [T0 + 7, T0 + 900, T0 + 8], 11, feeds[(0, "a")][9].id)
    b = _feed(0, "b", [T0 - 100, T0 + 60, T0 + 5], 6, feeds[(0, "b")][4].id)
    st.append(a + b).result(10)
    order += a + b
    assert _check_answers(st, order) > 100
    # The rows held are sound (each maximum at least every earlier row's time) ...
    assert st.quick_check() == []
    got = _maxima(st)
    # ... and the new rows' are exact: computed from the rows kept, in rowid order
    # (the truncated rows' times counted in tmax_all of rows after them, as written).
    per = {k: max(r.time for r in order[:-6] if (r.origin, r.feed) == k)
           for k in {(KEYS[0].public_key, "a"), (KEYS[0].public_key, "b")}}
    top = got[-7][1]  # the last row kept, in rowid order
    for r, (tmax, tmax_all) in zip(order[-6:], got[-6:], strict=True):
        key = (r.origin, r.feed)
        per[key] = max(per[key], r.time)
        top = max(top, r.time)
        assert (tmax, tmax_all) == (per[key], top), r.seq


def test_check_finds_a_wrong_running_maximum(st: Storage, db_path: Path) -> None:  # noqa: F811
    order = _load(st, _corpus())
    assert st.quick_check() == []
    # A maximum below the record's own time: a query with since could skip the record.
    rowid = next(i + 1 for i, r in enumerate(order) if r.feed == "b" and r.seq == 12)
    _raw_execute(st, db_path, f"UPDATE records SET tmax = time - 1 WHERE rowid = {rowid}")
    assert st.quick_check() == [TIME_BOUNDS_WRONG.format(n=1)]
    _raw_execute(st, db_path, "UPDATE records SET tmax = time WHERE rowid = "
                 f"{rowid}")
    # Below the previous record's (in rowid order), or missing.
    _raw_execute(st, db_path, f"UPDATE records SET tmax_all = time WHERE rowid = {rowid}")
    missing = f"UPDATE records SET tmax_all = NULL WHERE rowid = {rowid + 3}"
    if isinstance(st, PgStorage):
        # Refused there: a process of the code before schema 12 still running on the
        # database (a rolling upgrade) cannot write rows without them.
        with pytest.raises(psycopg.errors.NotNullViolation):
            _raw_execute(st, db_path, missing)
        _raw_execute(st, db_path, f"UPDATE records SET tmax_all = tmax_all - 10000000"
                                  f" WHERE rowid = {rowid + 3}")
    else:
        _raw_execute(st, db_path, missing)
    assert st.quick_check() == [TIME_BOUNDS_WRONG.format(n=2)]
    # The repair sets them again from the records held.
    assert st.rebuild_time_bounds().result(30) == len(order)
    assert st.quick_check() == []


# --------------------------------------------------------------------------- migration


def _running_maxima(rows: list[tuple[int, int, int, int]]) -> dict[int, tuple[int, int]]:
    """(tmax, tmax_all) by rowid of rows ``(rowid, chain, seq, time)``."""
    out: dict[int, tuple[int, int]] = {}
    per: dict[int, int] = {}
    for rowid, chain, _seq, t in sorted(rows, key=lambda r: (r[1], r[2])):
        per[chain] = max(per.get(chain, t), t)
        out[rowid] = (per[chain], 0)
    top = min(r[3] for r in rows)
    for rowid, _chain, _seq, t in sorted(rows):
        top = max(top, t)
        out[rowid] = (out[rowid][0], top)
    return out


def _v11_with_times_out_of_order(tmp_path: Path) -> Path:
    """The schema-11 fixture, its records' time column made to go back and forth (the
    maxima are computed from that column; nothing reads the envelopes here)."""
    path = tmp_path / "citynode.db"
    shutil.copyfile(FIXTURES / "schema-11.db", path)
    c = sqlite3.connect(path, isolation_level=None)
    try:
        assert c.execute("PRAGMA user_version").fetchone()[0] == 11
        c.execute("UPDATE records SET time = time + ((rowid * 7919) % 13 - 6) * 60000")
        c.execute("UPDATE records SET time = time + 10000000 WHERE rowid = 3")
    finally:
        c.close()
    return path


def test_migration_from_schema_11_fills_the_maxima_sqlite(tmp_path: Path) -> None:
    path = _v11_with_times_out_of_order(tmp_path)
    c = sqlite3.connect(path)
    rows = c.execute("SELECT rowid, chain, seq, time FROM records").fetchall()
    c.close()
    assert len(rows) > 40
    s = Storage.open(path)
    try:
        assert s._one("PRAGMA user_version")[0] == 12
        got = {int(r[0]): (int(r[1]), int(r[2])) for r in
               s._all("SELECT rowid, tmax, tmax_all FROM records")}
        assert got == _running_maxima(rows)
        assert s.quick_check() == []
        plan = s.query_plan(RecordFilter(since_ms=rows[-1][3]))
        assert "SEARCH b USING COVERING INDEX records_tmax_all (tmax_all>?)" in plan
    finally:
        s.close()


def test_migration_from_schema_11_fills_the_maxima_postgresql(
        tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # A PostgreSQL database at schema 11 holding the fixture's records (copied row by
    # row: `storage migrate` copies from the latest schema only), then opened by this
    # code: migrated to 12, the maxima filled, and queries answer as SQLite's.
    path = _v11_with_times_out_of_order(tmp_path)
    with monkeypatch.context() as m:
        m.setattr(storage_pg, "PG_MIGRATIONS",
                  {v: fn for v, fn in storage_pg.PG_MIGRATIONS.items() if v <= 11})
        PgStorage.open_url(pg_url).close()
    src = sqlite3.connect(path)
    try:
        with psycopg.connect(pg_url, autocommit=True) as c:
            assert c.execute("SELECT max(version) FROM citynode_schema").fetchone() == (11,)
            for table in ("chains", "types", "records", "payloads", "erasures"):
                cols = [r[1] for r in src.execute(f"PRAGMA table_info({table})")]
                data: list[Any] = src.execute(f"SELECT {', '.join(cols)} FROM {table}"
                                              ).fetchall()
                with c.cursor() as cur:
                    cur.executemany(f"INSERT INTO {table} ({', '.join(cols)}) VALUES"
                                    f" ({', '.join(['%s'] * len(cols))})", data)
        rows = src.execute("SELECT rowid, chain, seq, time FROM records").fetchall()
    finally:
        src.close()
    pg = PgStorage.open_url(pg_url)
    lite = Storage.open(path)
    try:
        assert pg._one("SELECT max(version) FROM citynode_schema")[0] == 12
        got = {int(r[0]): (int(r[1]), int(r[2])) for r in
               pg._all("SELECT rowid, tmax, tmax_all FROM records")}
        assert got == _running_maxima(rows)
        assert pg.quick_check() == []
        times = sorted(r[3] for r in rows)
        for since in times[::5]:
            for f in (RecordFilter(since_ms=since),
                      *(RecordFilter(origin=o, feed=fd, since_ms=since)
                        for o, fd, *_ in lite._all("SELECT origin, feed FROM chains"))):
                assert ([r.id for r in pg.query(f, limit=1000)]
                        == [r.id for r in lite.query(f, limit=1000)]), f.describe()
    finally:
        pg.close()
        lite.close()


def test_citynode_check_reports_a_wrong_running_maximum(tmp_path: Path) -> None:
    """`citynode check` (quick_check) says so, and fails: a lower maximum could hide
    records from every query with since."""
    import json
    import subprocess
    import sys

    from tests.conftest import make_node_dir

    d = make_node_dir(tmp_path, "Jakarta")
    with Storage.open(d / "citynode.db") as s:
        _load(s, _corpus())

    def check() -> dict[str, Any]:
        out = subprocess.run([sys.executable, "-m", "citynode", "check", "-d", str(d),
                              "--json"], capture_output=True, text=True, timeout=120)
        report: dict[str, Any] = json.loads(out.stdout)
        assert (out.returncode == 0) == report["ok"], out.stderr
        return report

    assert check()["ok"]
    c = sqlite3.connect(d / "citynode.db", isolation_level=None)
    try:
        c.execute("UPDATE records SET tmax = tmax - 1000000000 WHERE rowid = 5")
    finally:
        c.close()
    report = check()
    assert not report["ok"]
    assert f"database file damaged: {TIME_BOUNDS_WRONG.format(n=1)}" in report["problems"]
    # The repair its message names, from the command line.
    assert "citynode storage rebuild-time-bounds" in TIME_BOUNDS_WRONG
    out = subprocess.run([sys.executable, "-m", "citynode", "storage", "rebuild-time-bounds",
                          "-d", str(d)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"of {sum(map(len, _corpus().values()))} record(s) again" in out.stdout
    assert check()["ok"]
