"""Storage of payloads apart from skeletons: erasure, pruning, and the space given back.

Real SQLite files. A record's payload lives in its own table, so erasing or pruning it
deletes one row and keeps the signed skeleton (the tombstone) whole: heads, trees and
reads are unchanged but for the payload, and the pages freed go back to the file system.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from citynode.core import checkpoints as cps
from citynode.core.filters import RecordFilter
from citynode.core.keys import SigningKey, Verifier
from citynode.core.records import Record, decode_record, open_record, sign_record
from citynode.core.types import ERASURE_FEED, ERASURE_TYPE
from citynode.storage import Storage

A = SigningKey(bytes([1]) * 32)
B = SigningKey(bytes([2]) * 32)
T0 = 1_735_689_600_000
DAY = 86_400_000


def _chain(key: SigningKey, feed: str, n: int, *, pad: int = 0,
           located: bool = False) -> list[Record]:
    out: list[Record] = []
    for seq in range(1, n + 1):
        data: dict[str, Any] = {"n": seq, "pad": "x" * pad}
        if located:
            data["location"] = {"type": "Point", "coordinates": [10.0, 50.0]}
        out.append(sign_record(key, feed=feed, seq=seq, prev=out[-1].id if out else None,
                               time_ms=T0 + seq * DAY, type="org.example.Test", data=data))
    return out


def _erasure(key: SigningKey, entries: list[tuple[str, int, bytes]], seq: int = 1,
             prev: bytes | None = None, reason: str = "personal data") -> Record:
    return sign_record(key, feed=ERASURE_FEED, seq=seq, prev=prev, time_ms=T0 + 99 * DAY,
                       type=ERASURE_TYPE, data={
                           "erase": [{"feed": f, "seq": s, "id": i} for f, s, i in entries],
                           "reason": reason})


@pytest.fixture
def st(tmp_path: Path) -> Iterator[Storage]:
    s = Storage.open(tmp_path / "citynode.db")
    yield s
    s.close()


def _row(st: Storage, origin: bytes, feed: str, seq: int) -> Any:
    [row] = st.query(RecordFilter(origin=origin, feed=feed, from_seq=seq, to_seq=seq))
    return row


def test_an_erasure_drops_the_payloads_it_names_and_keeps_the_skeletons(st: Storage) -> None:
    recs = _chain(A, "reports", 3, located=True)
    st.append(recs).result(5)
    e = _erasure(A, [("reports", 2, recs[1].id)])
    assert st.append([e]).result(5) == []
    row = _row(st, A.public_key, "reports", 2)
    assert row.tombstone and row.erased_by == e.id and row.erased_reason == "personal data"
    assert (row.lon, row.lat) == (None, None)  # a box filter no longer matches it
    t = open_record(*decode_record(row.envelope), now_ms=T0 + 999 * DAY, verifier=Verifier())
    assert t.payload is None and t.id == recs[1].id
    assert st.get_envelope(recs[1].id) == row.envelope
    assert st.erasure_of(recs[1].id) == (e.id, "personal data")
    # The rest is whole, and the chain, heads and tree are unchanged.
    assert not _row(st, A.public_key, "reports", 1).tombstone
    assert st.range(A.public_key, "reports", 1, 3, 10)[2] == recs[2].envelope
    assert st.head(A.public_key, "reports") == (3, recs[2].id)
    assert st.tree(A.public_key, "reports", 3).root() == cps.root_of([r.id for r in recs])
    assert st.tombstones() == (1, 0)
    # The erasure request itself is whole (it is never erased).
    assert st.get_envelope(e.id) == e.envelope


def test_erased_bytes_are_overwritten_not_left_in_free_pages(tmp_path: Path) -> None:
    path = tmp_path / "citynode.db"
    st = Storage.open(path)
    recs = _chain(A, "reports", 3, pad=300)
    secret = sign_record(A, feed="names", seq=1, prev=None, time_ms=T0,
                         type="org.example.Test", data={"name": "Jane Q. Resident"})
    st.append([*recs, secret]).result(5)
    st.append([_erasure(A, [("names", 1, secret.id)])]).result(5)
    st.close()  # the log is checkpointed into the file and removed
    assert b"Jane Q. Resident" not in path.read_bytes()
    assert not Path(f"{path}-wal").exists() or b"Jane Q. Resident" not in Path(
        f"{path}-wal").read_bytes()


def test_a_record_arriving_after_its_erasure_is_stored_as_a_tombstone(st: Storage) -> None:
    recs = _chain(A, "reports", 2)
    e = _erasure(A, [("reports", 2, recs[1].id)])
    st.append([e]).result(5)
    st.append(recs).result(5)  # full records, the second named by the request held
    assert not _row(st, A.public_key, "reports", 1).tombstone
    row = _row(st, A.public_key, "reports", 2)
    assert row.tombstone and row.erased_by == e.id
    # In one batch with the request, too.
    other = _chain(A, "other", 1)
    e2 = _erasure(A, [("other", 1, other[0].id)], seq=2, prev=e.id)
    st.append([*other, e2]).result(5)
    assert _row(st, A.public_key, "other", 1).erased_by == e2.id


def test_another_nodes_erasure_erases_nothing_of_ours(st: Storage) -> None:
    recs = _chain(A, "reports", 2)
    st.append(recs).result(5)
    mine_b = _chain(B, "reports", 1)
    st.append(mine_b).result(5)
    # B names (reports, 2) with A's id: that is B's position, which B's record is not
    # at; the id is a record of A, held here: refused (only A can erase it), reported.
    first = _erasure(B, [("reports", 2, recs[1].id)])
    assert st.append([first]).result(5) == [(first.id, "reports", 2, "erasure_not_origin")]
    assert st.get_envelope(recs[1].id) == recs[1].envelope
    assert st.tombstones() == (0, 0)
    # B names its own (reports, 1) under A's id: refused for the same reason first.
    wrong = _erasure(B, [("reports", 1, recs[0].id)], seq=2, prev=first.id)
    assert st.append([wrong]).result(5) == [(wrong.id, "reports", 1, "erasure_not_origin")]
    assert st.get_envelope(mine_b[0].id) == mine_b[0].envelope
    assert st.get_envelope(recs[0].id) == recs[0].envelope
    # B names its own (reports, 1) under an id held nowhere: held under another id.
    odd = _erasure(B, [("reports", 1, bytes(32))], seq=3, prev=wrong.id)
    assert st.append([odd]).result(5) == [(odd.id, "reports", 1, "erasure_mismatch")]
    assert st.get_envelope(mine_b[0].id) == mine_b[0].envelope
    assert st.tombstones() == (0, 0)


def test_another_nodes_erasure_waiting_for_a_record_is_refused_when_it_arrives(
        st: Storage) -> None:
    recs = _chain(A, "reports", 1)
    early = _erasure(B, [("reports", 1, recs[0].id)])
    assert st.append([early]).result(5) == []  # A's record not held: cannot tell yet
    assert st.append(recs).result(5) == [(early.id, "reports", 1, "erasure_not_origin")]
    assert st.get_envelope(recs[0].id) == recs[0].envelope
    assert st.tombstones() == (0, 0)


def test_prune_drops_old_payloads_in_bounded_batches_and_never_erasure_requests(
        st: Storage) -> None:
    recs = _chain(A, "air", 12, located=True)
    e = _erasure(A, [("air", 12, recs[11].id)])
    st.append([*recs, e]).result(5)
    cutoff = T0 + 8 * DAY + 1  # seq 1..8 are older
    dropped, after = 0, 0
    batches = 0
    while after is not None:
        n, after = st.prune(A.public_key, "air", cutoff, after_seq=after, limit=5).result(5)
        dropped += n
        batches += 1
    assert dropped == 8 and batches == 3  # 5 + 5 + 2 examined
    for seq in range(1, 13):
        row = _row(st, A.public_key, "air", seq)
        assert row.tombstone == (seq <= 8 or seq == 12), seq
        assert (row.erased_by is not None) == (seq == 12)
        assert (row.lat is None) == row.tombstone
    assert st.tombstones() == (1, 8)
    assert st.prune(A.public_key, "air", cutoff).result(5) == (0, None)  # nothing left
    assert st.prune(A.public_key, ERASURE_FEED, T0 + 10**6 * DAY).result(5) == (0, None)
    assert st.get_envelope(e.id) == e.envelope
    assert st.head(A.public_key, "air") == (12, recs[11].id)
    assert len(st.query(RecordFilter.of(bbox=(0, 0, 20, 60)), limit=100)) == 3


def test_pruning_gives_the_space_back(tmp_path: Path) -> None:
    path = tmp_path / "citynode.db"
    st = Storage.open(path)
    recs = _chain(A, "big", 1500, pad=600)
    for i in range(0, len(recs), 500):
        st.append(recs[i:i + 500]).result(10)
    st.close()  # checkpoints the log into the file
    before = os.path.getsize(path)
    st = Storage.open(path)
    after_seq: int | None = 0
    while after_seq is not None:
        _n, after_seq = st.prune(A.public_key, "big", T0 + 10**4 * DAY,
                                 after_seq=after_seq, limit=400).result(10)
    freed = st.reclaim().result(10)
    assert st.tombstones() == (0, 1500)
    st.close()
    after = os.path.getsize(path)
    assert freed > 0
    # ~650 of ~1000 bytes a record were payload: the file shrinks by more than half of it.
    assert after < before * 0.55, (before, after)
    st = Storage.open(path)
    try:
        assert st.head(A.public_key, "big") == (1500, recs[-1].id)
        assert st.tree(A.public_key, "big", 1500).root() == cps.root_of([r.id for r in recs])
    finally:
        st.close()


def test_the_newest_liveness_statement_is_kept_and_an_older_one_changes_nothing(
        st: Storage) -> None:
    st.put_liveness(A.public_key, "air", 5, T0, b"r" * 32, b"env5", T0).result(5)
    st.put_liveness(A.public_key, "air", 6, T0 + 10, b"s" * 32, b"env6", T0 + 10).result(5)
    st.put_liveness(A.public_key, "air", 5, T0 + 5, b"r" * 32, b"old", T0).result(5)
    st.put_liveness(B.public_key, "air", 1, T0 + 1, b"t" * 32, b"envb", T0 + 1).result(5)
    assert st.liveness(10) == [(A.public_key, "air", 6, T0 + 10, b"s" * 32, b"env6", T0 + 10),
                               (B.public_key, "air", 1, T0 + 1, b"t" * 32, b"envb", T0 + 1)]
    assert st.liveness(1) == [(A.public_key, "air", 6, T0 + 10, b"s" * 32, b"env6", T0 + 10)]
