"""Unit tests of citynode.core.sync: wire encodings, planning, views, the pending
buffer, trust and quotas. The multi-node simulation is in test_sync_sim.py."""

from __future__ import annotations

import hashlib

import msgpack
import pytest

from citynode.core import encoding
from citynode.core.keys import SigningKey
from citynode.core.records import MAX_SEQ, Record, sign_record
from citynode.core.sync import (
    DAY_MS,
    DEFAULT_BATCH,
    MAX_FRONTIER_FEEDS,
    MAX_WANTS,
    FeedKey,
    Frontier,
    OriginQuota,
    PeerView,
    PendingBuffer,
    SyncPlan,
    VouchGraph,
    Want,
    accept_origin,
    decode_frontier,
    decode_wants,
    encode_frontier,
    encode_wants,
    plan_sync,
)
from citynode.errors import ConfigError, EncodingError, InvalidRecord

BASE_MS = 1_700_000_000_000
TYPE = "org.example.Test"


def pk(i: int) -> bytes:
    return bytes([i]) * 32


def hid(i: int) -> bytes:
    return hashlib.sha256(bytes([i])).digest()


def accept_all(_origin: bytes) -> bool:
    return True


# ----------------------------------------------------------------------------- frontier


def test_frontier_round_trip_and_canonical_order() -> None:
    f: Frontier = {
        (pk(2), "b"): (3, hid(1)),
        (pk(1), "z"): (MAX_SEQ, hid(2)),
        (pk(2), "a"): (1, hid(3)),
        (pk(1), "a.b-c_d"): (70000, hid(4)),
    }
    data = encode_frontier(f)
    assert decode_frontier(data) == f
    # Insertion order does not matter: one canonical encoding.
    assert encode_frontier(dict(reversed(list(f.items())))) == data
    assert msgpack.unpackb(data) == [
        [pk(1), "a.b-c_d", 70000, hid(4)],
        [pk(1), "z", MAX_SEQ, hid(2)],
        [pk(2), "a", 1, hid(3)],
        [pk(2), "b", 3, hid(1)],
    ]


def test_empty_frontier() -> None:
    assert encode_frontier({}) == b"\x90"
    assert decode_frontier(b"\x90") == {}


def _frontier_bytes(entries: list[list[object]]) -> bytes:
    return encoding.encode(entries)


@pytest.mark.parametrize(
    ("entries", "reason"),
    [
        ([[pk(1), "a", 1]], "bad_frontier"),
        ([[pk(1), "a", 1, hid(1), 0]], "bad_frontier"),
        ([[pk(1)[:31], "a", 1, hid(1)]], "bad_frontier"),
        ([[pk(1), b"a", 1, hid(1)]], "bad_frontier"),
        ([[pk(1), "a", 0, hid(1)]], "bad_frontier"),
        ([[pk(1), "a", -1, hid(1)]], "bad_frontier"),
        ([[pk(1), "a", True, hid(1)]], "bad_frontier"),
        ([[pk(1), "a", 1.0, hid(1)]], "bad_frontier"),
        ([[pk(1), "a", 2**63, hid(1)]], "bad_frontier"),
        ([[pk(1), "a", 1, hid(1)[:31]]], "bad_frontier"),
        ([[pk(1), "a", 1, None]], "bad_frontier"),
        ([[pk(1), "b", 1, hid(1)], [pk(1), "a", 1, hid(1)]], "bad_frontier"),
        ([[pk(2), "a", 1, hid(1)], [pk(1), "b", 1, hid(1)]], "bad_frontier"),
        ([[pk(1), "a", 1, hid(1)], [pk(1), "a", 2, hid(2)]], "bad_frontier"),
        ([pk(1), "a", 1, hid(1)], "bad_frontier"),
        ([[[pk(1)], "a", 1, hid(1)]], "too_deep"),
    ],
)
def test_decode_frontier_rejects_bad_shapes(entries: list[object], reason: str) -> None:
    with pytest.raises(EncodingError) as info:
        decode_frontier(_frontier_bytes(entries))  # type: ignore[arg-type]
    assert info.value.reason == reason


def test_decode_frontier_rejects_non_list_and_non_canonical() -> None:
    with pytest.raises(EncodingError) as info:
        decode_frontier(encoding.encode({"a": 1}))
    assert info.value.reason == "bad_frontier"
    good = encode_frontier({(pk(1), "a"): (5, hid(1))})
    # Same value, seq 5 as uint8 (0xcc 0x05) instead of a positive fixint.
    bad = good.replace(b"\xa1a\x05", b"\xa1a\xcc\x05")
    assert msgpack.unpackb(bad) == msgpack.unpackb(good)
    with pytest.raises(EncodingError) as info:
        decode_frontier(bad)
    assert info.value.reason == "non_canonical"
    with pytest.raises(EncodingError) as info:
        decode_frontier(good + b"\x00")
    assert info.value.reason == "malformed"


def test_decode_frontier_rejects_bad_feed_name() -> None:
    data = _frontier_bytes([[pk(1), "Bad Name", 1, hid(1)]])
    with pytest.raises(InvalidRecord) as info:
        decode_frontier(data)
    assert not isinstance(info.value, EncodingError)
    assert info.value.reason == "bad_field"


def test_decode_frontier_feed_limit() -> None:
    f = {(pk(1), f"f{i:03d}"): (1, hid(i)) for i in range(10)}
    data = encode_frontier(f)
    assert decode_frontier(data, max_feeds=10) == f
    with pytest.raises(EncodingError) as info:
        decode_frontier(data, max_feeds=9)
    assert info.value.reason in ("too_large", "too_many_items")
    assert "9 entries" in str(info.value)


@pytest.mark.parametrize("header", [
    b"\x9a",  # fixarray of 10
    b"\xdc" + (10).to_bytes(2, "big"),
    b"\xdd" + (MAX_FRONTIER_FEEDS + 1).to_bytes(4, "big"),
])
def test_decode_frontier_refuses_an_over_long_array_from_its_header(header: bytes) -> None:
    # The count in the header is enough: the body is not decoded (here it is garbage,
    # which decoding would call malformed). A hostile partner's 7.7 MB frontier of
    # 100,001 entries cost ~130 ms of the event loop to decode before this.
    limit = 9 if header[0] != 0xDD else MAX_FRONTIER_FEEDS
    with pytest.raises(EncodingError) as info:
        decode_frontier(header + b"\xc1" * 64, max_feeds=limit)
    assert info.value.reason == "too_many_items"
    assert f"over the limit of {limit}" in str(info.value)


def test_largest_entries_fit_the_byte_bound() -> None:
    # Every entry at its largest (64-character feed name, seq 2^63-1): the byte bound
    # derived from max_feeds must still admit max_feeds of them.
    n = 3000
    f = {(pk(i % 200), f"{i:064d}"): (MAX_SEQ, hid(i % 256)) for i in range(n)}
    data = encode_frontier(f)
    assert len(data) == 3 + 144 * n
    assert decode_frontier(data, max_feeds=n) == f
    with pytest.raises(EncodingError):
        decode_frontier(data, max_feeds=n - 1)


# ----------------------------------------------------------------------------- wants


def test_wants_round_trip_and_order_kept() -> None:
    ws = [Want(pk(2), "b", 1, 500), Want(pk(1), "a", 7, 7), Want(pk(2), "b", 501, MAX_SEQ)]
    data = encode_wants(ws)
    assert decode_wants(data) == ws
    assert msgpack.unpackb(data)[1] == [pk(1), "a", 7, 7]
    assert ws[0].count == 500 and ws[0].key == (pk(2), "b")


@pytest.mark.parametrize(
    "entry",
    [
        [pk(1), "a", 5, 4],
        [pk(1), "a", 0, 4],
        [pk(1), "a", 1, 2**63],
        [pk(1), "a", 1],
        [pk(1)[:5], "a", 1, 1],
        [pk(1), 7, 1, 1],
        [pk(1), "a", "1", 2],
    ],
)
def test_decode_wants_rejects(entry: list[object]) -> None:
    with pytest.raises(EncodingError) as info:
        decode_wants(encoding.encode([entry]))
    assert info.value.reason == "bad_wants"


def test_decode_wants_bounded() -> None:
    ws = [Want(pk(1), "a", i, i) for i in range(1, 6)]
    assert len(decode_wants(encode_wants(ws), max_wants=5)) == 5
    with pytest.raises(EncodingError):
        decode_wants(encode_wants(ws), max_wants=4)
    with pytest.raises(InvalidRecord):
        decode_wants(encoding.encode([[pk(1), "A", 1, 1]]))


# ----------------------------------------------------------------------------- plan_sync


def test_plan_identical_frontiers_is_in_sync() -> None:
    f = {(pk(1), "a"): (4, hid(1)), (pk(2), "a"): (9, hid(2))}
    plan = plan_sync(f, dict(f), accept=accept_all)
    assert plan.in_sync
    assert plan == SyncPlan([], [], [], [], [], False)


def test_plan_wants_offers_checks_forks() -> None:
    a, b, c, d, e = ((pk(i), "f") for i in range(1, 6))
    mine: Frontier = {a: (3, hid(1)), b: (10, hid(2)), c: (5, hid(3)), d: (2, hid(4))}
    theirs: Frontier = {a: (7, hid(9)), b: (4, hid(8)), c: (5, hid(7)), e: (2, hid(6))}
    plan = plan_sync(mine, theirs, accept=accept_all)
    assert plan.wants == [Want(pk(1), "f", 4, 7), Want(pk(5), "f", 1, 2)]
    assert plan.offers == [(b, 4), (d, 0)]
    assert plan.check == [(b, 4, hid(8))]
    assert plan.forks == [(c, 5)]
    assert plan.refused == []
    assert not plan.in_sync


def test_plan_equal_seq_same_id_is_not_a_fork_and_behind_is_only_offer() -> None:
    k: FeedKey = (pk(1), "f")
    plan = plan_sync({k: (5, hid(1))}, {}, accept=accept_all)
    assert plan.offers == [(k, 0)] and plan.check == [] and not plan.in_sync


def test_plan_refused_origins_are_not_fetched() -> None:
    calls: list[bytes] = []

    def accept(origin: bytes) -> bool:
        calls.append(origin)
        return origin != pk(9)

    theirs: Frontier = {(pk(9), "a"): (5, hid(1)), (pk(9), "b"): (5, hid(1)),
                        (pk(1), "a"): (1, hid(2))}
    plan = plan_sync({}, theirs, accept=accept)
    assert plan.wants == [Want(pk(1), "a", 1, 1)]
    assert plan.refused == [(pk(9), "a"), (pk(9), "b")]
    assert sorted(calls) == [pk(1), pk(9)]  # once per origin
    only_refused = plan_sync({}, {(pk(9), "a"): (5, hid(1))}, accept=accept)
    assert only_refused.in_sync and only_refused.refused == [(pk(9), "a")]


def test_plan_chunks_by_batch() -> None:
    k: FeedKey = (pk(1), "f")
    plan = plan_sync({k: (100, hid(1))}, {k: (1350, hid(2))}, accept=accept_all)
    assert [(w.from_seq, w.to_seq) for w in plan.wants] == [(101, 600), (601, 1100),
                                                           (1101, 1350)]
    assert all(w.count <= DEFAULT_BATCH for w in plan.wants)
    plan = plan_sync({}, {k: (5, hid(2))}, accept=accept_all, batch=2)
    assert [(w.from_seq, w.to_seq) for w in plan.wants] == [(1, 2), (3, 4), (5, 5)]


def test_plan_truncates_round_robin() -> None:
    a, b = (pk(1), "a"), (pk(1), "b")
    plan = plan_sync({}, {a: (30, hid(1)), b: (30, hid(2))}, accept=accept_all,
                     batch=10, max_wants=4)
    assert [(w.feed, w.from_seq) for w in plan.wants] == [("a", 1), ("b", 1), ("a", 11),
                                                         ("b", 11)]
    assert plan.truncated and not plan.in_sync
    exact = plan_sync({}, {a: (20, hid(1))}, accept=accept_all, batch=10, max_wants=2)
    assert len(exact.wants) == 2 and not exact.truncated


def test_plan_absurd_claim_is_bounded() -> None:
    k: FeedKey = (pk(1), "f")
    plan = plan_sync({}, {k: (MAX_SEQ, hid(1))}, accept=accept_all)
    assert len(plan.wants) == MAX_WANTS and plan.truncated
    assert decode_wants(encode_wants(plan.wants)) == plan.wants  # still fits the wire limit


def test_plan_bad_arguments() -> None:
    with pytest.raises(ConfigError):
        plan_sync({}, {}, accept=accept_all, batch=0)
    with pytest.raises(ConfigError):
        plan_sync({}, {}, accept=accept_all, max_wants=0)


# ----------------------------------------------------------------------------- PeerView


def test_peer_view_only_grows() -> None:
    v = PeerView()
    k: FeedKey = (pk(1), "f")
    assert not v.knows(k, 1) and v.known(k) == 0
    v.update(k, 5)
    assert v.knows(k, 5) and v.knows(k, 1) and not v.knows(k, 6)
    v.update(k, 3)
    assert v.known(k) == 5
    v.update_frontier({k: (4, hid(1)), (pk(2), "f"): (2, hid(2))})
    assert v.known(k) == 5 and v.knows((pk(2), "f"), 2) and len(v) == 2
    v.update_frontier({k: (9, hid(1))})
    assert v.known(k) == 9


# ----------------------------------------------------------------------------- PendingBuffer


def chain(key: SigningKey, n: int, feed: str = "f", tag: int = 0, start: Record | None = None
          ) -> list[Record]:
    """n records of one chain; ``tag`` changes the data so two calls give two histories."""
    out: list[Record] = []
    prev = start
    first = start.seq + 1 if start is not None else 1
    for seq in range(first, first + n):
        rec = sign_record(key, feed=feed, seq=seq, prev=prev.id if prev else None,
                          time_ms=BASE_MS + seq, type=TYPE, data={"n": seq, "tag": tag})
        out.append(rec)
        prev = rec
    return out


@pytest.fixture(scope="module")
def recs() -> list[Record]:
    return chain(SigningKey(bytes([7]) * 32), 12)


def test_pending_refuses_records_that_are_not_ahead(recs: list[Record]) -> None:
    p = PendingBuffer()
    assert not p.add(recs[0])  # seq 1 on an empty chain extends it
    assert not p.add(recs[3], head_seq=3)  # seq 4 on head 3 extends it
    assert not p.add(recs[2], head_seq=5)  # below the head
    assert len(p) == 0 and p.bytes == 0


def test_pending_releases_contiguous_run(recs: list[Record]) -> None:
    p = PendingBuffer()
    key = (recs[0].origin, recs[0].feed)
    for r in (recs[4], recs[2], recs[3], recs[7]):
        assert p.add(r, head_seq=1)
    assert len(p) == 4
    assert p.bytes == sum(len(r.body) + len(r.sig) for r in (recs[2], recs[3], recs[4], recs[7]))
    assert p.missing() == [Want(key[0], key[1], 2, 2), Want(key[0], key[1], 6, 7)]
    assert p.take_ready(key, 1, recs[0].id) == []  # seq 2 is still missing
    assert p.take_ready(key, 2, recs[1].id) == [recs[2], recs[3], recs[4]]
    assert len(p) == 1 and p.missing() == [Want(key[0], key[1], 6, 7)]
    assert p.take_conflicts() == []
    assert p.take_ready(key, 7, recs[6].id) == [recs[7]]
    assert len(p) == 0 and p.bytes == 0 and p.missing() == []


def test_pending_head_remembered_between_calls(recs: list[Record]) -> None:
    p = PendingBuffer()
    key = (recs[0].origin, recs[0].feed)
    assert p.add(recs[5], head_seq=3)
    assert p.add(recs[7])  # uses head 3 given before
    assert not p.add(recs[3])  # seq 4 on head 3 extends the chain: not for the buffer
    assert p.add(recs[4])
    assert p.missing() == [Want(key[0], key[1], 4, 4), Want(key[0], key[1], 7, 7)]


def test_pending_duplicate_and_conflicting_add(recs: list[Record]) -> None:
    other = chain(SigningKey(bytes([7]) * 32), 5, tag=1)
    p = PendingBuffer()
    key = (recs[0].origin, recs[0].feed)
    assert p.add(recs[4])
    assert p.add(recs[4])  # the same record again: still held, nothing added
    assert len(p) == 1
    assert not p.add(other[4])  # another record at seq 5: first copy wins
    assert p.get(key, 5) == recs[4] and len(p) == 1


def test_pending_prev_mismatch_is_a_conflict(recs: list[Record]) -> None:
    key = (recs[0].origin, recs[0].feed)
    fork = chain(SigningKey(bytes([7]) * 32), 3, tag=1, start=recs[1])  # seq 3..5, other branch
    p = PendingBuffer()
    assert p.add(fork[0], head_seq=1)  # seq 3 of the other branch (prev = our seq 2)
    assert p.add(recs[3], head_seq=1)  # seq 4 of ours (prev = our seq 3)
    # Our head is seq 2: the other branch's seq 3 fits it and is released; our seq 4
    # then does not link to it and is handed back as a conflict.
    assert p.take_ready(key, 2, recs[1].id) == [fork[0]]
    assert p.take_conflicts() == [recs[3]]
    assert len(p) == 0
    p2 = PendingBuffer()
    assert p2.add(fork[1], head_seq=2)  # seq 4 of the other branch (prev = fork seq 3)
    assert p2.add(recs[5], head_seq=2)  # seq 6 of ours
    assert p2.take_ready(key, 3, recs[2].id) == []  # our seq 3 stored: fork seq 4 misfits
    assert p2.take_conflicts() == [fork[1]]
    assert p2.take_conflicts() == []
    assert len(p2) == 1 and p2.get(key, 6) == recs[5]  # later records wait for the real seq 4
    assert p2.take_ready(key, 5, recs[4].id) == [recs[5]]


def test_pending_records_at_or_below_head(recs: list[Record]) -> None:
    key = (recs[0].origin, recs[0].feed)
    other = chain(SigningKey(bytes([7]) * 32), 6, tag=1)
    p = PendingBuffer()
    for r in (recs[3], recs[4], other[5]):
        assert p.add(r, head_seq=1)
    # The chain jumped to seq 5 by another path: seq 4 is handed back for a lookup,
    # seq 5 with our id is a plain duplicate, seq 6 of another history misfits.
    # Until take_ready is called, records now at or below the head ask for nothing.
    assert p.add(recs[8], head_seq=5)
    assert p.missing() == [Want(key[0], key[1], 7, 8)]  # seq 6 is pending (other history)
    assert p.take_ready(key, 5, recs[4].id) == []
    assert p.take_conflicts() == [recs[3], other[5]]
    assert p.take_ready(key, 8, recs[7].id) == [recs[8]]
    assert len(p) == 0 and p.bytes == 0
    p.add(other[4], head_seq=1)
    assert p.take_ready(key, 5, recs[4].id) == []
    assert p.take_conflicts() == [other[4]]


def test_pending_missing_ignores_records_below_the_head(recs: list[Record]) -> None:
    key = (recs[0].origin, recs[0].feed)
    p = PendingBuffer()
    assert p.add(recs[2], head_seq=1)  # seq 3
    assert p.add(recs[8], head_seq=5)  # seq 9; the head moved past seq 3 meanwhile
    assert p.missing() == [Want(key[0], key[1], 6, 8)]


def test_pending_first_record_of_empty_chain() -> None:
    rs = chain(SigningKey(bytes([8]) * 32), 3)
    key = (rs[0].origin, rs[0].feed)
    p = PendingBuffer()
    assert p.add(rs[2])
    assert p.missing() == [Want(key[0], key[1], 1, 2)]
    assert p.take_ready(key, 0, None) == []
    assert p.take_ready(key, 2, rs[1].id) == [rs[2]]


def test_pending_evicts_farthest_ahead(recs: list[Record]) -> None:
    key = (recs[0].origin, recs[0].feed)
    others = chain(SigningKey(bytes([9]) * 32), 10)
    okey = (others[0].origin, others[0].feed)
    p = PendingBuffer(max_records=3)
    assert p.add(recs[4], head_seq=1)  # 4 ahead
    assert p.add(recs[6], head_seq=1)  # 6 ahead
    assert p.add(others[8], head_seq=6)  # 3 ahead
    assert p.add(recs[2], head_seq=1)  # 2 ahead: evicts recs[6], the farthest
    assert p.get(key, 7) is None and len(p) == 3
    assert not p.add(others[9], head_seq=6)  # 4 ahead: not nearer than anything held
    assert p.get(okey, 10) is None and len(p) == 3
    assert p.add(others[7], head_seq=6)  # 2 ahead: evicts recs[4] (4 ahead)
    assert {(r.feed, r.seq) for r in (p.get(key, 3), p.get(okey, 8), p.get(okey, 9))
            if r is not None} == {("f", 3), ("f", 8), ("f", 9)}
    assert p.get(key, 5) is None


def test_pending_byte_limit(recs: list[Record]) -> None:
    size = len(recs[2].body) + len(recs[2].sig)
    p = PendingBuffer(max_bytes=2 * size + 1)
    assert p.add(recs[4], head_seq=1) and p.add(recs[5], head_seq=1)
    assert p.add(recs[2], head_seq=1)  # evicts seq 6
    assert len(p) == 2 and p.bytes <= 2 * size + 1
    assert p.get((recs[0].origin, "f"), 6) is None
    assert not PendingBuffer(max_bytes=size - 1).add(recs[4], head_seq=1)


def test_pending_max_ahead(recs: list[Record]) -> None:
    p = PendingBuffer(max_ahead=4)
    assert not p.add(recs[9], head_seq=5)  # seq 10 is 5 ahead of head 5
    assert p.add(recs[8], head_seq=5)


def test_pending_conflicts_bounded(recs: list[Record]) -> None:
    p = PendingBuffer(max_conflicts=2)
    key = (recs[0].origin, recs[0].feed)
    for r in recs[2:6]:
        assert p.add(r, head_seq=1)
    p.take_ready(key, 8, hid(0))
    assert p.take_conflicts() == [recs[4], recs[5]]


def test_pending_bad_limits() -> None:
    with pytest.raises(ConfigError):
        PendingBuffer(max_records=0)
    with pytest.raises(ConfigError):
        PendingBuffer(max_bytes=0)
    with pytest.raises(ConfigError):
        PendingBuffer().missing(batch=0)


# ----------------------------------------------------------------------------- trust

SELF, PARTNER, VOUCHED, STRANGER = pk(1), pk(2), pk(3), pk(4)


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("partners", {SELF: True, PARTNER: True, VOUCHED: False, STRANGER: False}),
        ("vouched", {SELF: True, PARTNER: True, VOUCHED: True, STRANGER: False}),
        ("any", {SELF: True, PARTNER: True, VOUCHED: True, STRANGER: True}),
    ],
)
def test_accept_origin(policy: str, expected: dict[bytes, bool]) -> None:
    for origin, ok in expected.items():
        assert accept_origin(origin, policy=policy, self_key=SELF, partners={PARTNER},
                             vouched={VOUCHED}) is ok


def test_accept_origin_unknown_policy() -> None:
    with pytest.raises(ConfigError, match="partners, vouched, any"):
        accept_origin(SELF, policy="friends", self_key=SELF, partners=set(), vouched=set())


JAKARTA, SEOUL, SINGAPORE = pk(10), pk(11), pk(12)


def test_vouch_jakarta_seoul_singapore() -> None:
    g = VouchGraph()
    g.add_card(JAKARTA, [SEOUL])
    g.add_card(SEOUL, [JAKARTA, SINGAPORE])
    g.add_card(SINGAPORE, [SEOUL])
    # Plain vouching (one hop) is enough here: Seoul vouches for Jakarta.
    for hops in (1, 3):
        vouched = g.trusted(SINGAPORE, {SEOUL}, hops)
        assert vouched == {JAKARTA}
        assert accept_origin(JAKARTA, policy="vouched", self_key=SINGAPORE,
                             partners={SEOUL}, vouched=vouched)
        assert not accept_origin(STRANGER, policy="vouched", self_key=SINGAPORE,
                                 partners={SEOUL}, vouched=vouched)
    assert g.trusted(JAKARTA, {SEOUL}) == {SINGAPORE}


def test_vouch_line_needs_transitive_hops() -> None:
    a, b, c, d = pk(20), pk(21), pk(22), pk(23)
    g = VouchGraph()
    g.add_card(a, [b])
    g.add_card(b, [a, c])
    g.add_card(c, [b, d])
    g.add_card(d, [c])
    assert g.trusted(d, {c}, 1) == {b}  # plain vouching: A's records stop at C
    assert g.trusted(d, {c}, 2) == {a, b}
    assert g.trusted(d, {c}) == {a, b}  # default 3 hops
    assert g.trusted(d, {c}, 0) == set()


def test_vouch_hops_count_and_cycles() -> None:
    nodes = [pk(30 + i) for i in range(8)]
    g = VouchGraph()
    for i, n in enumerate(nodes):  # a ring
        g.add_card(n, [nodes[(i - 1) % 8], nodes[(i + 1) % 8]])
    # From node 0 with partners 1 and 7: hop 1 reaches 2 and 6, hop 2 reaches 3 and 5,
    # hop 3 reaches 4; the ring closes without looping forever.
    assert g.trusted(nodes[0], {nodes[1], nodes[7]}, 1) == {nodes[2], nodes[6]}
    assert g.trusted(nodes[0], {nodes[1], nodes[7]}, 3) == set(nodes[2:7])
    assert g.trusted(nodes[0], {nodes[1], nodes[7]}, 50) == set(nodes[2:7])


def test_vouch_only_through_reached_nodes_and_newest_card() -> None:
    g = VouchGraph()
    g.add_card(PARTNER, [VOUCHED])
    g.add_card(STRANGER, [pk(40)])  # a card nobody we trust leads to
    assert g.trusted(SELF, {PARTNER}, 5) == {VOUCHED}
    g.add_card(PARTNER, [pk(41)])  # a newer card replaces the list
    assert g.trusted(SELF, {PARTNER}, 5) == {pk(41)}
    assert g.partners_of(PARTNER) == frozenset({pk(41)})
    g.remove(PARTNER)
    assert g.trusted(SELF, {PARTNER}, 5) == set() and len(g) == 1


def test_vouch_graph_bounds() -> None:
    g = VouchGraph(max_cards=2, max_partners=2)
    assert g.add_card(pk(1), [pk(2), pk(3)])
    with pytest.raises(InvalidRecord):
        g.add_card(pk(2), [pk(3), pk(4), pk(5)])
    with pytest.raises(InvalidRecord):
        g.add_card(pk(2), [b"short"])
    assert g.add_card(pk(2), [pk(1)])
    assert not g.add_card(pk(3), [pk(1)])  # full: a new node is refused
    assert g.add_card(pk(1), [pk(2)])  # a known node may still update its card
    assert not g.add_card(pk(9), [])  # still full
    assert g.partners_of(pk(1)) == frozenset({pk(2)})
    g.add_card(pk(2), [pk(2), pk(1), pk(1)])  # itself dropped, repeats merged
    assert g.partners_of(pk(2)) == frozenset({pk(1)})
    with pytest.raises(ConfigError):
        g.trusted(pk(1), set(), -1)


# ----------------------------------------------------------------------------- quota


def test_quota_records_per_day() -> None:
    q = OriginQuota(records_per_day=3, bytes_per_day=10_000)
    now = BASE_MS
    assert [q.allow(pk(1), 100, now + i) for i in range(5)] == [True, True, True, False, False]
    assert q.exhausted(pk(1), now) and not q.exhausted(pk(2), now)
    assert q.allow(pk(2), 100, now)  # per origin
    assert q.usage(pk(1), now) == (3, 300)


def test_quota_bytes_per_day() -> None:
    q = OriginQuota(records_per_day=100, bytes_per_day=1000)
    assert q.allow(pk(1), 600, BASE_MS)
    assert not q.allow(pk(1), 401, BASE_MS)  # refused records are not counted
    assert q.allow(pk(1), 400, BASE_MS)
    assert q.exhausted(pk(1), BASE_MS)


def test_quota_resets_at_utc_midnight_and_forgets() -> None:
    q = OriginQuota(records_per_day=1, bytes_per_day=1000)
    day_start = (BASE_MS // DAY_MS + 1) * DAY_MS
    for i in range(50):
        assert q.allow(pk(i), 1, day_start - 1)
    assert len(q) == 50 and not q.allow(pk(0), 1, day_start - 1)
    assert q.allow(pk(0), 1, day_start)  # a new UTC day
    assert len(q) == 1  # yesterday's origins forgotten
    # A clock stepping back into yesterday does not reset today's counts.
    assert not q.allow(pk(0), 1, day_start - 5)
    assert not q.allow(pk(0), 1, day_start + DAY_MS - 1)


def test_quota_max_origins() -> None:
    q = OriginQuota(records_per_day=5, bytes_per_day=1000, max_origins=2)
    assert q.allow(pk(1), 1, BASE_MS) and q.allow(pk(2), 1, BASE_MS)
    assert not q.allow(pk(3), 1, BASE_MS)
    assert q.allow(pk(1), 1, BASE_MS)
    with pytest.raises(ConfigError):
        OriginQuota(records_per_day=0, bytes_per_day=1)
