"""Heads moved by another process sharing the database (LISTEN/NOTIFY): the pending
buffer follows them. Pure core, driven by hand."""

from __future__ import annotations

from citynode.core import replica as rp
from tests.core.test_replica import ORIGIN, P, T, chain, of, replica


def test_pending_records_below_a_head_another_process_stored_are_dropped() -> None:
    r = replica()
    recs = chain(ORIGIN, 10)
    r.on_records(P, recs[:2], T)
    assert r.on_records(P, recs[4:8], T)[0] == ["pending"] * 4
    # Another process stored up to seq 8: nothing pending is needed any more.
    acts = r.advance_heads({(ORIGIN.public_key, "f"): (8, recs[7].id)}, T)
    assert len(r.pending) == 0
    assert of(rp.Store, acts) == []
    assert r.head((ORIGIN.public_key, "f")) == (8, recs[7].id)
    # Below the head the id held is not known here: each is checked against storage,
    # which holds the very same records -- no fork.
    lookups = of(rp.Lookup, acts)
    assert [a.seq for a in lookups] == [5, 6, 7]  # type: ignore[attr-defined]
    for a in lookups:
        seq = a.seq  # type: ignore[attr-defined]
        assert r.on_lookup(ORIGIN.public_key, "f", seq, recs[seq - 1], T) == []


def test_pending_records_that_now_fit_are_stored() -> None:
    r = replica()
    recs = chain(ORIGIN, 10)
    r.on_records(P, recs[:2], T)
    r.on_records(P, recs[5:9], T)  # 6..9 pending
    acts = r.advance_heads({(ORIGIN.public_key, "f"): (5, recs[4].id)}, T)
    (store,) = of(rp.Store, acts)
    assert [x.seq for x in store.records] == [6, 7, 8, 9]  # type: ignore[attr-defined]
    assert len(r.pending) == 0
    assert r.head((ORIGIN.public_key, "f")).seq == 9  # type: ignore[union-attr]


def test_a_pending_record_unlike_the_one_stored_at_its_seq_is_looked_up() -> None:
    r = replica()
    recs = chain(ORIGIN, 6)
    other = chain(ORIGIN, 5, prev=b"\x09" * 32, start=2)  # another chain: a fork
    r.on_records(P, recs[:1], T)
    r.on_records(P, other[2:3], T)  # seq 4 of the other chain: pending
    assert len(r.pending) == 1
    acts = r.advance_heads({(ORIGIN.public_key, "f"): (5, recs[4].id)}, T)
    assert len(r.pending) == 0
    assert [a.seq for a in of(rp.Lookup, acts)] == [4]  # type: ignore[attr-defined]
    after = r.on_lookup(ORIGIN.public_key, "f", 4, recs[3], T)
    assert of(rp.StoreProof, after), "the fork is proven"


def test_heads_never_go_back() -> None:
    r = replica()
    recs = chain(ORIGIN, 5)
    r.on_records(P, recs, T)
    assert r.advance_heads({(ORIGIN.public_key, "f"): (3, recs[2].id)}, T) == []
    assert r.head((ORIGIN.public_key, "f")).seq == 5  # type: ignore[union-attr]
