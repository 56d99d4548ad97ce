"""Storage.truncate after a recovery (issue 12): records a key log now refuses go with
everything that refers to them -- the erasure entries naming their positions, what they
erased when they are erasure requests, and a liveness statement that counts them.
Real SQLite files."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from citynode.core.records import Record, sign_record
from citynode.core.types import ERASURE_FEED
from citynode.storage import Storage
from tests.storage.test_retention import DAY, T0, A, _chain, _erasure, _row


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "citynode.db"


@pytest.fixture
def st(path: Path) -> Iterator[Storage]:
    s = Storage.open(path)
    yield s
    s.close()


def _entries(path: Path) -> set[tuple[str, int, bytes]]:
    with sqlite3.connect(path) as c:
        return {(f, s, by) for f, s, by in c.execute("SELECT feed, seq, by FROM erasures")}


def _honest_after(prev: Record) -> Record:
    """A record the owner signs after its recovery, after ``prev``."""
    seq = int(prev.seq) + 1
    return sign_record(A, feed="reports", seq=seq, prev=prev.id, time_ms=T0 + 9 * DAY + seq,
                       type="org.example.Test", data={"n": seq, "pad": "again"})


def test_a_truncated_tail_takes_its_erasures_and_liveness_with_it(st: Storage,
                                                                  path: Path) -> None:
    recs = _chain(A, "reports", 4)
    st.append(recs).result(5)
    later = [_honest_after(recs[2])]
    later.append(_honest_after(later[0]))
    # Seq 1 of the erasure feed is honest (it erases reports 1 and names reports 4);
    # 2 and 3 are a thief's: one erases reports 2, one waits for a record at seq 5
    # (the one the owner will sign there after its recovery).
    e1 = _erasure(A, [("reports", 1, recs[0].id), ("reports", 4, recs[3].id)])
    e2 = _erasure(A, [("reports", 2, recs[1].id)], seq=2, prev=e1.id, reason="forged")
    e3 = _erasure(A, [("reports", 5, later[1].id)], seq=3, prev=e2.id, reason="forged")
    assert st.append([e1, e2, e3]).result(5) == []
    assert _row(st, A.public_key, "reports", 2).erased_by == e2.id
    for feed, size in (("reports", 4), (ERASURE_FEED, 3)):
        st.put_liveness(A.public_key, feed, size, T0 + 100 * DAY, b"\x01" * 32, b"env",
                        T0).result(5)

    # The recovery keeps seq 1 of the erasure feed and 3 of reports.
    assert st.truncate(A.public_key, ERASURE_FEED, 1).result(5) == 2
    assert st.truncate(A.public_key, "reports", 3).result(5) == 1

    # Only the honest request's entry at a kept position is left.
    assert _entries(path) == {("reports", 1, e1.id)}
    assert st.erasure_of(recs[0].id) == (e1.id, "personal data")
    # What the forged request erased is no longer said to be erased by it (its payload
    # is gone: it reads as a tombstone without an erasure).
    r2 = _row(st, A.public_key, "reports", 2)
    assert r2.erased_by is None and r2.tombstone and st.erasure_of(recs[1].id) is None
    # No liveness statement counting records that are gone is kept.
    assert [(feed, size) for _o, feed, size, *_ in st.liveness(10)] == []
    # The owner's next record, when it comes, is whole: the forged entry waiting for it
    # went with the thief's requests.
    assert st.append(later).result(5) == []
    row = _row(st, A.public_key, "reports", 5)
    assert row.id == later[1].id and not row.tombstone and row.erased_by is None
