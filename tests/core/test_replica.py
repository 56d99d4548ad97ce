"""The replica alone, driven by hand: no event loop, no network, no simulator."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from citynode.core import reconcile as rc
from citynode.core import replica as rp
from citynode.core.keys import SigningKey
from citynode.core.records import Record, sign_record
from citynode.core.sync import Want
from citynode.core.types import ERASURE_FEED, ERASURE_TYPE
from citynode.errors import PublishRefused

ME = SigningKey(b"\x01" * 32)
P = SigningKey(b"\x02" * 32).public_key
Q = SigningKey(b"\x03" * 32).public_key
ORIGIN = SigningKey(b"\x04" * 32)
T = 1_700_000_000_000


def chain(key: SigningKey, n: int, feed: str = "f", start: int = 1,
          prev: bytes | None = None) -> list[Record]:
    out = []
    for seq in range(start, start + n):
        r = sign_record(key, feed=feed, seq=seq, prev=prev, time_ms=T,
                        type="org.example.Test", data={"n": seq})
        out.append(r)
        prev = r.id
    return out


def replica(**kw: object) -> rp.Replica:
    r = rp.Replica(rp.ReplicaConfig(self_key=ME.public_key, **kw))  # type: ignore[arg-type]
    r.add_partner(P, T)
    r.add_partner(Q, T)
    return r


def of(kind: type, actions: list[rp.Action]) -> list[object]:
    return [a for a in actions if isinstance(a, kind)]


def test_stores_in_order_and_never_pushes_back_to_the_source() -> None:
    r = replica(tree=False)
    recs = chain(ORIGIN, 3)
    outcomes, acts = r.on_records(P, recs, T)
    assert outcomes == ["stored"] * 3
    (store,) = of(rp.Store, acts)
    assert [x.seq for x in store.records] == [1, 2, 3]  # type: ignore[attr-defined]
    after = r.on_committed(store.records, P, T)  # type: ignore[attr-defined]
    pushes = of(rp.Push, after)
    assert [p.peer for p in pushes] == [Q]  # type: ignore[attr-defined]
    assert r.known(recs[0].id)
    assert r.on_records(Q, recs[:1], T)[0] == ["duplicate"]


def test_pending_records_wait_for_the_gap_and_ask_for_it() -> None:
    r = replica()
    recs = chain(ORIGIN, 4)
    outcomes, acts = r.on_records(P, recs[2:], T)
    assert outcomes == ["pending", "pending"]
    (fetch,) = of(rp.Fetch, acts)
    assert fetch.peer == P and fetch.wants[0].from_seq == 1  # type: ignore[attr-defined]
    _, acts = r.on_records(P, recs[:2], T)
    (store,) = of(rp.Store, acts)
    assert [x.seq for x in store.records] == [1, 2, 3, 4]  # type: ignore[attr-defined]


def test_quota_is_charged_for_every_record_stored_also_released_from_pending() -> None:
    r = replica(quota_records_per_day=2)
    recs = chain(ORIGIN, 4)
    r.on_records(P, recs[1:], T)  # pending: not charged
    assert r.quota.usage(ORIGIN.public_key, T) == (0, 0)
    _outcomes, acts = r.on_records(P, recs[:1], T)
    (store,) = of(rp.Store, acts)
    assert len(store.records) == 2  # type: ignore[attr-defined]
    assert r.quota.usage(ORIGIN.public_key, T)[0] == 2
    assert of(rp.Rejected, acts)


def test_erasure_requests_always_pass_the_origin_quota() -> None:
    """Issue 13 review: with an origin's quota spent, its erasure request was refused
    (quota) and the personal data it names kept until the next day."""
    r = replica(quota_records_per_day=1)
    recs = chain(ORIGIN, 2)
    assert r.on_records(P, recs, T)[0] == ["stored", "rejected:quota"]

    def requests_(n: int, start: int = 1, prev: bytes | None = None) -> list[Record]:
        out = []
        for seq in range(start, start + n):
            out.append(sign_record(
                ORIGIN, feed=ERASURE_FEED, seq=seq, prev=prev, time_ms=T, type=ERASURE_TYPE,
                data={"erase": [{"feed": "f", "seq": 1, "id": recs[0].id}],
                      "reason": "personal data"}))
            prev = out[-1].id
        return out

    requests = requests_(3)
    # In order, and ahead of a gap (held, then released), and asked for by a pull.
    assert r.on_records(P, requests[1:], T)[0] == ["pending", "pending"]
    outcomes, acts = r.on_records(P, requests[:1], T)
    assert outcomes == ["stored"]
    (store,) = of(rp.Store, acts)
    assert [x.seq for x in store.records] == [1, 2, 3]  # type: ignore[attr-defined]
    assert not of(rp.Rejected, acts)
    r.on_committed(store.records, P, T)  # type: ignore[attr-defined]
    more = requests_(2, start=4, prev=requests[-1].id)
    r.on_frontier(P, {(ORIGIN.public_key, ERASURE_FEED): (5, more[-1].id)}, T)
    fetches = [f for t in (T + 1000, T + 5000) for f in of(rp.Fetch, r.tick(t))]
    assert [w.key for f in fetches for w in f.wants] == [  # type: ignore[attr-defined]
        (ORIGIN.public_key, ERASURE_FEED)]
    # The origin's other feeds stay over quota.
    assert r.on_records(P, chain(ORIGIN, 1, feed="g"), T)[0] == ["rejected:quota"]


def test_records_ahead_of_an_origin_over_its_quota_are_refused_not_held() -> None:
    # Past its quota an origin's chain cannot extend today, so what comes after is
    # refused rather than kept in the pending buffer it shares with every origin.
    r = replica(quota_records_per_day=2)
    recs = chain(ORIGIN, 6)
    outcomes, _acts = r.on_records(P, recs[:3], T)
    assert outcomes == ["stored", "stored", "rejected:quota"]
    outcomes, acts = r.on_records(P, recs[3:], T)
    assert outcomes == ["rejected:quota"] * 3
    reasons = [a.reason for a in of(rp.Rejected, acts)]  # type: ignore[attr-defined]
    assert reasons == ["quota"] * 3
    assert len(r.pending) == 0
    # The next day the same records are taken again, in order, up to the quota.
    outcomes, _acts = r.on_records(P, recs[2:], T + 86_400_000)
    assert outcomes == ["stored", "stored", "rejected:quota", "rejected:quota"]


def test_duplicate_answer_prunes_and_graft_restores() -> None:
    r = replica(tree=False, announce=True)
    recs = chain(ORIGIN, 2)
    _, acts = r.on_records(P, recs[:1], T)
    acts = r.on_committed(recs[:1], P, T)
    assert of(rp.Push, acts)
    r.on_push_result(Q, [0], T)  # Q had it: prune ORIGIN on Q
    _, acts = r.on_records(P, recs[1:], T)
    acts = r.on_committed(recs[1:], P, T)
    assert not of(rp.Push, acts) and of(rp.Announce, acts)
    r.on_graft(Q, ORIGIN.public_key)
    more = chain(ORIGIN, 1, start=3, prev=recs[1].id)
    r.on_records(P, more, T)
    assert of(rp.Push, r.on_committed(more, P, T))


def test_announce_then_graft_after_delay() -> None:
    r = replica(graft_delay_ms=500)
    recs = chain(ORIGIN, 2)
    r.on_announce(P, {(ORIGIN.public_key, "f"): (2, recs[1].id)}, T)
    assert not of(rp.Fetch, r.tick(T + 100))
    acts = r.tick(T + 600)
    assert of(rp.Fetch, acts) and of(rp.Graft, acts)
    assert r.next_deadline() is not None


def test_publish_waits_for_first_rounds_and_own_feed_safety() -> None:
    """A restored node: a partner's first round claims seq 5 of our feed, publishing
    pauses and we fetch it; it shows nothing: a false claim, counted, publishing goes
    on."""
    r = replica()
    mine = chain(ME, 2, feed="mine")
    r.load({(ME.public_key, "mine"): (2, mine[1].id)})
    r.mark_restored()
    with pytest.raises(PublishRefused):
        r.check_publish("mine")
    r.on_frontier(Q, {}, T)
    acts = r.on_frontier(P, {(ME.public_key, "mine"): (5, b"\x09" * 32)}, T)
    assert of(rp.Paused, acts) and of(rp.Fetch, acts) and of(rp.Confirmed, acts)
    with pytest.raises(PublishRefused):
        r.check_publish("mine")
    (fetch,) = of(rp.Fetch, acts)
    acts = r.on_fetch_done(P, fetch.wants, 0, T)  # type: ignore[attr-defined]
    assert [a.reason for a in of(rp.Rejected, acts)] == ["false_claim"]  # type: ignore[attr-defined]
    assert of(rp.CaughtUp, acts) and not r.adopting  # the durable mark may go now
    r.check_publish("mine")
    assert r.next_link("mine") == (3, mine[1].id)


def test_a_node_never_restored_does_not_pause_on_a_claim_and_asks_for_evidence() -> None:
    """A node that holds every record it signed (not restored, database not new): a
    claim on its own feed beyond its head pauses nothing; the claimed record alone is
    fetched, as evidence; none shown is a false claim."""
    r = replica()
    with pytest.raises(PublishRefused):
        r.check_publish("mine")  # no signing before every partner's first round
    _ready(r)
    mine = chain(ME, 2, feed="mine")
    acts = r.publish(mine, T)
    assert of(rp.Store, acts)[0].durable  # type: ignore[attr-defined]
    r.on_committed(mine, None, T)
    acts = r.on_frontier(P, {(ME.public_key, "mine"): (5, b"\x09" * 32)}, T)
    assert not of(rp.Paused, acts)
    r.check_publish("mine")
    (fetch,) = of(rp.Fetch, acts)
    assert [(w.from_seq, w.to_seq) for w in fetch.wants] == [(5, 5)]  # type: ignore[attr-defined]
    # The same claim again while it is asked: not asked twice; nothing pulled later.
    assert not of(rp.Fetch, r.on_frontier(P, {(ME.public_key, "mine"): (5, b"\x09" * 32)}, T))
    assert not of(rp.Fetch, r.tick(T + 60_000))
    acts = r.on_fetch_done(P, fetch.wants, 0, T)  # type: ignore[attr-defined]
    assert [a.reason for a in of(rp.Rejected, acts)] == ["false_claim"]  # type: ignore[attr-defined]
    assert not of(rp.Fetch, acts) and not r.own_forgeries
    assert r.next_link("mine") == (3, mine[1].id)


def test_equivocation_becomes_a_proof_sent_to_partners() -> None:
    r = replica()
    a = chain(ORIGIN, 1)
    b = [sign_record(ORIGIN, feed="f", seq=1, prev=None, time_ms=T + 1, type="org.example.Test",
                     data={"n": 99})]
    r.on_records(P, a, T)
    r.on_committed(a, P, T)
    outcomes, acts = r.on_records(Q, b, T)
    assert outcomes == ["equivocation"]
    (look,) = of(rp.Lookup, acts)
    acts = r.on_lookup(look.origin, look.feed, look.seq, a[0], T)  # type: ignore[attr-defined]
    assert of(rp.StoreProof, acts)
    assert {s.peer for s in of(rp.SendProof, acts)} == {P, Q}  # type: ignore[attr-defined]
    # The same proof again from a partner: kept once, not forwarded again.
    proof = of(rp.StoreProof, acts)[0].proof  # type: ignore[attr-defined]
    assert r.on_proof(P, ORIGIN.public_key, "f", 1, "fork", proof) == []
    # Another proof of the same point (a third record at seq 1, a split view signed
    # again with a new time): proves nothing more, not kept, forwarded or reported.
    assert r.on_proof(P, ORIGIN.public_key, "f", 1, "fork", b"another" + proof) == []
    sv = r.on_proof(P, ORIGIN.public_key, "f", 1, "split-view", b"sv-1")
    assert of(rp.StoreProof, sv) and of(rp.ForkFound, sv)
    assert r.on_proof(P, ORIGIN.public_key, "f", 1, "split-view", b"sv-2") == []


def test_sync_session_between_two_replicas() -> None:
    a = rp.Replica(rp.ReplicaConfig(self_key=P))
    b = rp.Replica(rp.ReplicaConfig(self_key=Q))
    recs = chain(ORIGIN, 3)
    a.load({(ORIGIN.public_key, "f"): (3, recs[2].id)})
    b.load({(ORIGIN.public_key, "f"): (1, recs[0].id)})
    a.add_partner(Q, T)
    b.add_partner(P, T)
    (req,) = of(rp.SendSync, a.tick(T))
    acts: list[rp.Action] = []
    t = T
    while req is not None:
        ans = of(rp.SendSync, b.on_sync(P, req.payload, t, initiator=False))[0]  # type: ignore[attr-defined]
        acts += b.tick(t)
        nxt = of(rp.SendSync, a.on_sync(Q, ans.payload, t, initiator=True))  # type: ignore[attr-defined]
        req = nxt[0] if nxt else None
    fetches = of(rp.Fetch, b.tick(T + 5000))
    assert fetches and fetches[0].wants[0].from_seq == 2  # type: ignore[attr-defined]
    assert not a.first_round_pending()


def test_a_partner_claiming_endless_chains_costs_bounded_state() -> None:
    r = replica(max_deferred=10, max_view_unheld=20)
    claims = {(bytes([i]) * 32, "f"): (5, b"\x01" * 32) for i in range(5, 100)}
    r.on_frontier(P, claims, T)
    r.on_announce(P, claims, T)
    assert len(r.deferred) == 10
    assert len(r.partners[P].view) == 20  # what we keep about P's made-up chains
    fetches = of(rp.Fetch, r.tick(T + 5000))  # one request per purpose, not per chain
    assert sorted(f.via for f in fetches) == ["graft", "sync"]  # type: ignore[attr-defined]
    assert sum(len(f.wants) for f in fetches) <= 10 + r.config.max_grafts  # type: ignore[attr-defined]


def _ready(r: rp.Replica) -> None:
    for peer in (P, Q):
        r.on_frontier(peer, {}, T)


def test_own_feed_claim_stays_paused_when_the_fetch_merely_failed() -> None:
    """Restored from an old backup: P really holds our 'mine' up to 4. Fetches of it
    fail (timeout, network): that proves nothing, so publishing stays paused, the fetch
    is retried, and when the records come publishing resumes at the right seq."""
    r = replica(settle_ms=100, own_fetch_retries=2)
    mine = chain(ME, 4, feed="mine")
    r.load({(ME.public_key, "mine"): (2, mine[1].id)})
    r.mark_restored()
    r.on_frontier(Q, {}, T)
    acts = r.on_frontier(P, {(ME.public_key, "mine"): (4, mine[3].id)}, T)
    assert of(rp.Paused, acts)
    (fetch,) = of(rp.Fetch, acts)
    t = T
    for _ in range(2):
        acts = r.on_fetch_done(P, fetch.wants, 0, t + 10, failed=True)  # type: ignore[attr-defined]
        assert not of(rp.Resumed, acts) and not of(rp.Rejected, acts)
        with pytest.raises(PublishRefused):
            r.check_publish("mine")
        (fetch,) = of(rp.Fetch, r.tick(t + 200))  # asked again after the settle delay
        assert fetch.peer == P and fetch.wants[0].from_seq == 3  # type: ignore[attr-defined]
        t += 200
    # Retries run out: still paused, nothing more asked, never resumed on silence.
    acts = r.on_fetch_done(P, fetch.wants, 0, t + 10, failed=True)  # type: ignore[attr-defined]
    assert not of(rp.Resumed, acts) and not of(rp.Fetch, r.tick(t + 1000))
    with pytest.raises(PublishRefused):
        r.check_publish("mine")
    # The next round's claim is fetched again; the records come; publishing resumes.
    (fetch,) = of(rp.Fetch, r.on_frontier(P, {(ME.public_key, "mine"): (4, mine[3].id)},
                                          t + 2000))
    _, acts = r.on_records(P, mine[2:], t + 2000, "own")
    assert of(rp.Resumed, acts)
    r.check_publish("mine")
    assert r.next_link("mine")[0] == 5


def _entries_msg(origin: bytes, n: int, tag: int) -> bytes:
    ents = sorted((rc.key_bytes(origin, f"x{tag}-{i}"), 2**40,
                   hashlib.sha256(b"%d-%d" % (tag, i)).digest()) for i in range(n))
    return rc.encode_message([rc.Range(None, rc.ENTRIES, entries=tuple(ents))])


def test_hostile_partner_cannot_grow_peer_view_without_bound() -> None:
    """P (its own origin trusted) sends reconciliation requests naming 8000 made-up
    chains each time: what we keep about P stays bounded."""
    r = replica(tree=False)
    _ready(r)
    for k in range(6):
        r.on_sync(P, _entries_msg(P, 8000, k), T + k, initiator=False)
    assert len(r.partners[P].view) <= r.config.max_view_unheld
    assert len(r.deferred) <= r.config.max_deferred_per_peer


def test_untrusted_claims_are_not_recorded() -> None:
    stranger = (b"\x07" * 32, "f")
    r = replica(trusted=lambda o: o != stranger[0])
    r.on_frontier(P, {stranger: (9, b"\x01" * 32)}, T)
    r.on_announce(P, {stranger: (9, b"\x01" * 32)}, T)
    assert len(r.partners[P].view) == 0 and not r.deferred


def test_one_hostile_message_does_not_fan_out_into_thousands_of_fetches() -> None:
    r = replica(tree=False, settle_ms=1, max_deferred_per_peer=6000)
    _ready(r)
    r.on_sync(P, _entries_msg(P, 8000, 99), T, initiator=False)
    assert len(r.deferred) == 6000  # per partner cap
    fetches = of(rp.Fetch, r.tick(T + 10_000))
    assert len(fetches) == 2  # grouped: at most MAX_WANTS wants per Fetch
    assert sum(len(f.wants) for f in fetches) == 6000  # type: ignore[attr-defined]
    # Another partner still gets room.
    r.on_frontier(Q, {(ORIGIN.public_key, "f"): (3, b"\x01" * 32)}, T)
    assert (ORIGIN.public_key, "f") in r.deferred


def test_partner_not_allowed_to_know_a_chain_cannot_learn_our_head_by_claiming_it() -> None:
    secret = (ORIGIN.public_key, "secret")
    recs = chain(ORIGIN, 7, feed="secret")
    r = replica(tree=False, settle_ms=1,
                may_pass=lambda peer, o, f: not (peer == P and (o, f) == secret))
    r.load({secret: (7, recs[6].id)})
    _ready(r)
    acts = r.on_frontier(P, {secret: (1000, b"\x05" * 32)}, T)  # ahead: a pull
    acts += r.on_frontier(P, {secret: (7, b"\x05" * 32)}, T)  # same seq: a fork check
    acts += r.on_frontier(P, {secret: (3, b"\x05" * 32)}, T)  # behind: a lookup
    acts += r.on_announce(P, {secret: (1000, b"\x05" * 32)}, T)
    acts += r.tick(T + 10_000)
    assert not of(rp.Fetch, acts) and not of(rp.Lookup, acts) and not of(rp.Graft, acts)
    assert r.partners[P].view.known(secret) == 0
    # Q may be told of it: its claim is acted on.
    r.on_frontier(Q, {secret: (9, b"\x05" * 32)}, T)
    (fetch,) = of(rp.Fetch, r.tick(T + 20_000))
    assert fetch.peer == Q and fetch.wants[0].from_seq == 8  # type: ignore[attr-defined]


def test_grafts_of_made_up_origins_do_not_grow_state() -> None:
    r = replica(tree=False, max_grafted=100)
    r.load({(ORIGIN.public_key, "f"): (1, chain(ORIGIN, 1)[0].id)})
    for i in range(5000):
        r.on_graft(P, hashlib.sha256(b"%d" % i).digest())
    assert len(r.partners[P].grafted) <= 101
    r.on_graft(P, ORIGIN.public_key)  # an origin held here is always taken
    assert ORIGIN.public_key in r.partners[P].grafted
    untrusting = replica(trusted=lambda o: False)
    untrusting.on_graft(P, b"\x07" * 32)
    assert not untrusting.partners[P].grafted


def test_an_old_copy_of_the_head_is_a_duplicate_not_a_lookup() -> None:
    r = replica(recent_max=1)  # the head's id leaves the recent-ids window
    recs = chain(ORIGIN, 3)
    other = chain(ORIGIN, 1, feed="g")
    r.on_records(P, recs + other, T)
    r.on_committed(recs + other, P, T)
    assert not r.known(recs[2].id)
    outcomes, acts = r.on_records(Q, recs[2:], T)
    assert outcomes == ["duplicate"] and not of(rp.Lookup, acts)


def test_a_long_range_is_fetched_in_answers_of_at_most_batch() -> None:
    r = replica(batch=2)
    recs = chain(ORIGIN, 5)
    r.on_frontier(P, {(ORIGIN.public_key, "f"): (5, recs[4].id)}, T)
    (fetch,) = of(rp.Fetch, r.tick(T + 5000))
    assert (fetch.wants[0].from_seq, fetch.wants[0].to_seq) == (1, 2)  # type: ignore[attr-defined]
    r.on_records(P, recs[:2], T + 5000, "sync")
    (again,) = of(rp.Fetch, r.on_fetch_done(P, fetch.wants, 2, T + 5000))  # type: ignore[attr-defined]
    assert (again.wants[0].from_seq, again.wants[0].to_seq) == (3, 4)  # type: ignore[attr-defined]


def test_own_feed_claim_longer_than_one_answer_is_not_called_false() -> None:
    """A node whose database is new (lost and made again): it takes back what a
    partner holds of its own feed, in several answers, then has caught up."""
    r = replica(batch=2)
    r.mark_catching_up()
    r.on_frontier(Q, {}, T)
    mine = chain(ME, 4, feed="mine")
    r.on_frontier(P, {(ME.public_key, "mine"): (4, mine[3].id)}, T)
    for step in range(2):
        part = mine[2 * step:2 * step + 2]
        outcomes, acts = r.on_records(P, part, T, "own")
        assert outcomes == ["stored"] * 2
        r.on_committed(part, P, T)
        acts = r.on_fetch_done(P, [Want(ME.public_key, "mine", 2 * step + 1, 2 * step + 2)],
                               2, T)
        assert not of(rp.Rejected, acts)
    assert of(rp.CaughtUp, acts) and not r.adopting
    r.check_publish("mine")  # caught up: publishing resumes


def test_a_failed_fetch_is_asked_again_after_the_settle_delay_an_empty_one_is_not() -> None:
    r = replica(settle_ms=100)
    recs = chain(ORIGIN, 2)
    r.on_frontier(P, {(ORIGIN.public_key, "f"): (2, recs[1].id)}, T)
    (fetch,) = of(rp.Fetch, r.tick(T + 100))
    r.on_fetch_done(P, fetch.wants, 0, T + 200, failed=True)  # type: ignore[attr-defined]
    (again,) = of(rp.Fetch, r.tick(T + 300))  # no answer at all: asked again soon
    assert again.wants == fetch.wants  # type: ignore[attr-defined]
    r.on_fetch_done(P, again.wants, 0, T + 400)  # type: ignore[attr-defined]
    assert not r.deferred and not of(rp.Fetch, r.tick(T + 600))  # answered empty: not


def test_the_answering_side_is_bounded_per_partner_not_per_session() -> None:
    """A session ends after max_session_rounds messages, but a partner starting session
    after session gets at most max_answers_per_interval answers per sync interval."""
    r = replica(max_answers_per_interval=5, sync_interval_ms=1000)
    recs = chain(ORIGIN, 1)
    r.load({(ORIGIN.public_key, "f"): (1, recs[0].id)})
    req = rc.encode_message(rc.initial(rc.ChainSet()))  # an empty side: we answer ours
    answers = [r.on_sync(P, req, T + i, initiator=False) for i in range(8)]
    sizes = [len(of(rp.SendSync, a)[0].payload) for a in answers]  # type: ignore[attr-defined]
    assert all(n > 1 for n in sizes[:5]) and sizes[5:] == [1, 1, 1]  # 1 byte: nothing
    assert all(of(rp.Rejected, a) for a in answers[5:])
    assert len(of(rp.SendSync, r.on_sync(Q, req, T, initiator=False))[0].payload) > 1  # type: ignore[attr-defined]
    later = r.on_sync(P, req, T + 1000, initiator=False)  # a new interval: answered again
    assert len(of(rp.SendSync, later)[0].payload) > 1  # type: ignore[attr-defined]


def test_pull_now_fetches_what_a_round_found_missing_without_the_settle_delay() -> None:
    r = replica(settle_ms=10_000)
    recs = chain(ORIGIN, 3)
    r.on_frontier(P, {(ORIGIN.public_key, "f"): (3, recs[2].id)}, T)
    assert not of(rp.Fetch, r.tick(T + 1))  # the node waits for pushes on their way
    (fetch,) = of(rp.Fetch, r.pull_now(T + 1))  # a one-shot catch-up does not
    assert (fetch.wants[0].from_seq, fetch.wants[0].to_seq) == (1, 3)  # type: ignore[attr-defined]
    assert not r.deferred and not r._deferred_by and not r.pull_now(T + 2)


def test_queued_counts_records_waiting_for_a_push_in_flight() -> None:
    r = replica(tree=False, push_batch=1)
    recs = chain(ORIGIN, 3)
    _o, acts = r.on_records(None, recs, T, "local")
    (store,) = of(rp.Store, acts)
    r.on_committed(store.records, None, T)  # type: ignore[attr-defined]
    assert r.queued(P) == 2 and r.queued(Q) == 2  # one batch of one in flight each
    assert r.queued(b"\x09" * 32) == 0


def test_a_delivery_refused_too_often_is_dropped() -> None:
    """A partner that never trusts an origin refuses its checkpoints "for the moment"
    every time: after ``outbox_refusals`` such answers it is no longer kept."""
    r = replica()
    for n in range(r.config.outbox_refusals):
        r.on_deliver_failed(P, "checkpoint", b"cp", n)
        assert list(r.partners[P].outbox.values()) == [("/v1/checkpoints", b"cp", n)]
    r.on_deliver_failed(P, "checkpoint", b"cp", r.config.outbox_refusals)
    assert list(r.partners[P].outbox.values()) == [
        ("/v1/checkpoints", b"cp", r.config.outbox_refusals - 1)]


def test_a_newer_card_with_the_same_partners_still_starts_a_round_with_every_partner() -> None:
    """A card that lists a feed the old one did not (same partners) may let records held
    back go on: every partner gets a round at once."""
    r = replica()
    recs = chain(ORIGIN, 1)
    r.load({(ORIGIN.public_key, "f"): (1, recs[0].id)})
    r.on_card(ORIGIN.public_key, [P], T)
    for p in (P, Q):
        r.on_frontier(p, {(ORIGIN.public_key, "f"): (1, recs[0].id)}, T)
    assert len(of(rp.SendSync, r.tick(T))) == 2  # the rounds due at start
    for p in (P, Q):  # each answered: nothing differs
        r.on_sync(p, rc.encode_message([]), T, initiator=True)
    assert not of(rp.SendSync, r.tick(T + 1000))  # next round an interval away
    r.on_card(ORIGIN.public_key, [P], T + 1000)  # newer, same partners
    assert {a.peer for a in of(rp.SendSync, r.tick(T + 1000))} == {P, Q}  # type: ignore[attr-defined]


def test_held_checkpoints_go_after_the_first_good_round_even_if_one_failed_before() -> None:
    r = replica()
    assert of(rp.SendSync, r.tick(T))
    r.on_sync_failed(P, T)  # the partner was down at our start
    assert P not in r.first_round_pending()  # publishing does not wait for it
    assert P in [a.peer for a in of(rp.SendSync, r.tick(T + 60_000))]  # type: ignore[attr-defined]
    acts = r.on_sync(P, rc.encode_message([]), T + 60_000, initiator=True)
    assert [a.peer for a in of(rp.SendHeld, acts)] == [P]  # type: ignore[attr-defined]
    r.sync_now(P, T + 120_000)
    again = r.on_sync(P, rc.encode_message([]), T + 120_000, initiator=True)
    assert not of(rp.SendHeld, again)  # once per start


def test_recent_ids_are_bounded_and_each_stays_for_half_the_bound() -> None:
    recent = rp.RecentIds(10)
    ids = [bytes([i]) * 32 for i in range(40)]
    for n, rid in enumerate(ids):
        recent.add(rid)
        assert len(recent) <= 10
        assert all(x in recent for x in ids[max(0, n - 4):n + 1])  # the last 5 at least
    assert ids[0] not in recent
    one = rp.RecentIds(1)
    for rid in ids[:3]:
        one.add(rid)
    assert len(one) == 1 and ids[2] in one


def _refused_answers(r: rp.Replica, recs: list[Any], n: int) -> tuple[int, list[int]]:
    """A partner claims ``recs``; each of ``n`` answers is refused whole by the shell
    (nothing handed to the replica). Returns the time after and the delays between
    the answers and the fetches that follow."""
    settle = r.config.settle_ms
    r.on_frontier(P, {(ORIGIN.public_key, "f"): (len(recs), recs[-1].id)}, T)
    (fetch,) = of(rp.Fetch, r.tick(T + settle))
    t = T + 2 * settle
    delays = []
    for _ in range(n):
        assert not of(rp.Fetch, r.on_fetch_done(P, fetch.wants, len(recs), t))  # type: ignore[attr-defined]
        due = r.next_deadline()
        assert due is not None and not of(rp.Fetch, r.tick(due - 1))
        while due is not None and not of(rp.Fetch, acts := r.tick(due)):
            due = r.next_deadline()  # a sync round meanwhile asks nothing of it
        assert due is not None
        (fetch,) = of(rp.Fetch, acts)
        delays.append(due - t)
        t = due + 10
    return t, delays


def test_a_chain_whose_records_are_refused_is_fetched_again_on_a_back_off() -> None:
    """Issue 16: a record dated in the future (refused by the shell's verification, so
    never handed to the replica) with later records behind it was fetched and refused
    again every 0.6 s. An answer none of which was stored backs the chain off: settle,
    then twice that, ... at most stall_max; the chain growing ends it."""
    r = replica(settle_ms=100, stall_max_ms=1000)
    recs = chain(ORIGIN, 3)
    t, delays = _refused_answers(r, recs, 5)
    assert delays == [100, 200, 400, 800, 1000]
    # Now the records are acceptable: the chain grows and the back-off is gone.
    r.on_records(P, recs, t, "sync")
    assert (ORIGIN.public_key, "f") not in r.stalled


def test_a_refused_payload_is_not_fetched_again_every_backoff_max_for_ever() -> None:
    """Issue 13 review: a tombstone refused (payload_missing) was fetched again every
    ~30 s for ever. The back-off of a chain whose records are refused keeps doubling
    past backoff_max, up to stall_max (an hour by default)."""
    r = replica(settle_ms=1000, backoff_max_ms=60_000)
    assert r.config.stall_max_ms == 3_600_000
    _t, delays = _refused_answers(r, chain(ORIGIN, 3), 14)
    assert delays[6] == 64_000 and delays[-1] == 3_600_000  # past backoff_max, capped
    assert sum(delays) > 3 * 3_600_000  # 14 refused answers span hours, not minutes


def test_a_failed_store_rewinds_the_heads_to_what_storage_holds() -> None:
    r = replica()
    recs = chain(ORIGIN, 4)
    r.on_records(P, recs[:2], T, "push")
    r.on_committed(recs[:2], P, T)
    r.on_records(P, recs[2:], T, "push")  # heads move to 4; this Store then fails
    other = chain(SigningKey(b"\x05" * 32), 1, feed="g")
    r.on_records(P, other, T, "push")  # a new chain whose first Store fails too
    r.rewind([*recs[2:], *other], {(ORIGIN.public_key, "f"): (2, recs[1].id)})
    assert r.head((ORIGIN.public_key, "f")) == (2, recs[1].id)
    assert r.head((other[0].origin, "g")) is None
    stored, _ = r.on_records(P, recs[2:], T, "push")  # the same records extend it again
    assert stored == ["stored", "stored"]


def test_a_restored_node_signs_nothing_until_every_partner_confirms_its_heads() -> None:
    """A failed first round lets a normal start publish (partners down must not stop a
    city's own data), but not a restored one: its own feeds may be behind. One partner's
    confirmation is not enough: the one that is up may be behind the one that is down
    (a reviewer re-signed a seq that way)."""
    r = replica()
    r.mark_restored()
    assert of(rp.SendSync, r.tick(T))
    r.on_sync_failed(P, T)
    r.on_sync_failed(Q, T)
    assert not r.first_round_pending()
    with pytest.raises(PublishRefused, match="restored"):
        r.check_publish("f")
    assert P in [a.peer for a in of(rp.SendSync, r.tick(T + 60_000))]  # type: ignore[attr-defined]
    acts = r.on_sync(P, rc.encode_message([]), T + 60_000, initiator=True)
    assert not of(rp.Confirmed, acts)  # Q, which may hold later records, is still down
    with pytest.raises(PublishRefused, match="still waiting for"):
        r.check_publish("f")
    assert r.awaiting_confirmation() == [Q]
    acts = r.on_frontier(Q, {}, T + 61_000)
    assert [a.peer for a in of(rp.Confirmed, acts)] == [Q]  # type: ignore[attr-defined]
    r.check_publish("f")
    assert not of(rp.Confirmed, r.on_frontier(P, {}, T + 62_000))  # once


def test_a_restored_node_stops_waiting_for_a_partner_removed_by_its_operator() -> None:
    r = replica()
    r.mark_restored()
    r.on_frontier(P, {}, T)
    r.remove_partner(Q)
    assert [a.peer for a in of(rp.Confirmed, r.tick(T + 1))] == [P]  # type: ignore[attr-defined]
    r.check_publish("f")


def test_a_restored_node_with_no_partner_waits_for_its_operator() -> None:
    r = rp.Replica(rp.ReplicaConfig(self_key=ME.public_key))
    r.mark_restored()
    assert not of(rp.Confirmed, r.tick(T))
    with pytest.raises(PublishRefused, match="no partner"):
        r.check_publish("f")


def test_a_restored_node_confirmed_by_a_partner_holding_newer_records_fetches_them_first(
) -> None:
    r = replica()
    mine = chain(ME, 5)
    r.load({(ME.public_key, "f"): (3, mine[2].id)})  # the copy stopped at seq 3
    r.mark_restored()
    r.on_frontier(Q, {}, T)  # Q holds nothing newer
    acts = r.on_frontier(P, {(ME.public_key, "f"): (5, mine[4].id)}, T)
    assert of(rp.Confirmed, acts) and of(rp.Paused, acts)
    with pytest.raises(PublishRefused, match="holds our records up to seq 5"):
        r.check_publish("f")
    wants = [w for a in of(rp.Fetch, acts + r.tick(T + 5_000))
             for w in a.wants]  # type: ignore[attr-defined]
    assert any(w.origin == ME.public_key and w.from_seq == 4 for w in wants)


def test_a_flood_relayed_from_one_origin_does_not_delay_our_own_records() -> None:
    # P floods records of its origin (within quota); they are relayed to Q. Our own
    # records published meanwhile go out in the very next push to Q, not behind the flood.
    r = replica(tree=False, push_batch=4)
    for peer in (P, Q):
        r.on_frontier(peer, {}, T)
    flood = chain(ORIGIN, 20)
    _o, acts = r.on_records(P, flood, T)
    (store,) = of(rp.Store, acts)
    first = of(rp.Push, r.on_committed(store.records, P, T))  # type: ignore[attr-defined]
    assert [len(x.records) for x in first] == [4]  # type: ignore[attr-defined]
    assert r.queued(Q) == 16
    mine = chain(ME, 3, feed="mine")
    acts = r.publish(mine, T)
    (own,) = of(rp.Store, acts)
    r.on_committed(own.records, None, T)  # type: ignore[attr-defined]
    (nxt,) = of(rp.Push, r.on_push_result(Q, [], T))
    got = [(x.origin, x.seq) for x in nxt.records]  # type: ignore[attr-defined]
    # One record of each origin in turn; each origin's records stay in order.
    assert got == [(ORIGIN.public_key, 5), (ME.public_key, 1), (ORIGIN.public_key, 6),
                   (ME.public_key, 2)]
    (last,) = of(rp.Push, r.on_push_result(Q, [], T))
    assert [(x.origin, x.seq) for x in last.records][:2] == [  # type: ignore[attr-defined]
        (ORIGIN.public_key, 7), (ME.public_key, 3)]


def test_a_full_push_queue_drops_from_the_origin_holding_the_most() -> None:
    q = rp.PushQueue()
    flood, mine = chain(ORIGIN, 5), chain(ME, 2, feed="mine")
    for x in flood + mine:
        q.append(x)
    q.drop_one()
    q.drop_one()
    assert len(q) == 5
    got = q.take(10)
    assert [(x.origin, x.seq) for x in got] == [
        (ORIGIN.public_key, 3), (ME.public_key, 1), (ORIGIN.public_key, 4),
        (ME.public_key, 2), (ORIGIN.public_key, 5)]
    assert not q and q.take(3) == []


def test_a_busy_partner_is_retried_after_its_wait_without_a_failure_counted() -> None:
    r = replica(tree=False)
    recs = chain(ORIGIN, 2)
    _o, acts = r.on_records(P, recs, T)
    (store,) = of(rp.Store, acts)
    (push,) = of(rp.Push, r.on_committed(store.records, P, T))  # type: ignore[attr-defined]
    assert r.on_push_busy(Q, 2000, T) == []
    q = r.partners[Q]
    assert q.failures == 0 and q.in_flight is None and r.queued(Q) == 2
    assert not of(rp.Push, r.tick(T + 1999))
    (again,) = of(rp.Push, r.tick(T + 2000))
    assert again.records == push.records  # type: ignore[attr-defined]
    # a busy round: due after the wait, no back-off grown; a failed one counts
    r.on_sync_failed(P, T, busy_ms=5000)
    assert r.partners[P].failures == 0 and r.partners[P].next_sync == T + 5000
    r.on_sync_failed(P, T)
    assert r.partners[P].failures == 1


def test_records_of_its_own_feed_a_node_never_signed_are_refused_and_kept_as_evidence(
        ) -> None:
    """Review M3: a node that was not restored holds every record it signed, so a record
    of its own feed beyond its head, validly signed with its key, is a forgery (its
    key is in other hands): refused as own_forgery (counted on the partner that sent
    it), never stored nor held pending; publishing goes on from the node's own head."""
    r = replica(tree=False)
    _ready(r)
    mine = chain(ME, 2, feed="mine")
    r.publish(mine, T)
    r.on_committed(mine, None, T)
    thief = [sign_record(ME, feed="mine", seq=3 + i, prev=p, time_ms=T - 1000 - i,
                         type="org.example.Test", data={"n": -1})
             for i, p in [(0, mine[1].id)]]
    more = chain(ME, 2, feed="mine", start=4, prev=thief[0].id)
    outcomes, acts = r.on_records(P, thief + more, T)
    assert outcomes == ["rejected:own_forgery"] * 3
    assert {(a.peer, a.reason) for a in of(rp.Rejected, acts)} == {(P, "own_forgery")}  # type: ignore[attr-defined]
    assert not of(rp.Store, acts) and not of(rp.Push, acts)
    assert [a.seq for a in of(rp.OwnForgery, acts)] == [3, 4, 5]  # type: ignore[attr-defined]
    assert r.own_forgeries["mine"] == (5, P, more[1].id)
    # One far ahead (a gap) is not held pending either.
    far = chain(ME, 1, feed="mine", start=9, prev=b"\x05" * 32)
    outcomes, acts = r.on_records(Q, far, T)
    assert outcomes == ["rejected:own_forgery"] and len(r.pending) == 0
    assert r.own_forgeries["mine"][:2] == (9, Q)
    # A record seen again at no higher seq: counted, no new evidence given.
    outcomes, acts = r.on_records(P, more[:1], T)
    assert outcomes == ["rejected:own_forgery"] and not of(rp.OwnForgery, acts)
    # The partners' claims at seqs already shown start no fetch and pause nothing.
    acts = r.on_frontier(P, {(ME.public_key, "mine"): (5, more[1].id)}, T)
    acts += r.on_announce(P, {(ME.public_key, "mine"): (5, more[1].id)}, T)
    acts += r.tick(T + 60_000)
    assert not of(rp.Fetch, acts) and not of(rp.Paused, acts)
    # Nothing is signed on that feed meanwhile: the node cannot tell a thief's record
    # from one of its own a rollback lost, and signing seq 3 again forks it either way.
    with pytest.raises(PublishRefused, match="key recover"):
        r.check_publish("mine")
    # A key event of ours (the recovery naming our heads) retires that evidence, and
    # publishing goes on from our own head, not the thief's.
    r.own_key_changed()
    assert not r.own_forgeries
    r.check_publish("mine")
    assert r.next_link("mine") == (3, mine[1].id)
    ours = chain(ME, 1, feed="mine", start=3, prev=mine[1].id)
    assert of(rp.Store, r.publish(ours, T))


def test_a_restored_node_takes_its_records_back_then_refuses_what_it_never_signed(
        ) -> None:
    """A restored node takes back its own records partners hold (it may lack some it
    signed), until its heads are confirmed and those records are here (CaughtUp: the
    shell clears the durable mark then, not before); from then on a record beyond its
    head is a forgery."""
    r = replica(tree=False)
    mine = chain(ME, 5, feed="mine")
    r.load({(ME.public_key, "mine"): (2, mine[1].id)})
    r.mark_restored()
    r.on_frontier(Q, {}, T)
    acts = r.on_frontier(P, {(ME.public_key, "mine"): (4, mine[3].id)}, T)
    assert of(rp.Confirmed, acts) and not of(rp.CaughtUp, acts) and r.adopting
    (fetch,) = of(rp.Fetch, acts)
    outcomes, acts = r.on_records(P, mine[2:4], T, "own")
    assert outcomes == ["stored"] * 2 and of(rp.Resumed, acts)
    r.on_committed(mine[2:4], P, T)
    acts = r.on_fetch_done(P, fetch.wants, 2, T)  # type: ignore[attr-defined]
    assert of(rp.CaughtUp, acts) and not r.adopting
    outcomes, acts = r.on_records(P, mine[4:], T)
    assert outcomes == ["rejected:own_forgery"] and of(rp.OwnForgery, acts)


def test_a_new_database_takes_back_own_records_until_the_first_rounds_end() -> None:
    """A node whose database holds no record of its own (new, or lost and made again)
    takes back what partners hold of its feeds until every partner's first round
    ended. With no partner at all it has not caught up: a database lost with its
    partner rows takes its records back from the partners the operator adds again
    (review 12b: it refused them as forgeries and signed a second seq 1)."""
    mine = chain(ME, 5, feed="mine")  # signed before the database was lost
    alone = rp.Replica(rp.ReplicaConfig(self_key=ME.public_key, tree=False))
    alone.mark_catching_up()
    assert not of(rp.CaughtUp, alone.tick(T)) and alone.adopting
    alone.add_partner(P, T)  # citynode partner add, again
    alone.on_frontier(P, {(ME.public_key, "mine"): (5, mine[4].id)}, T)
    outcomes, acts = alone.on_records(P, mine, T)
    assert outcomes == ["stored"] * 5 and not of(rp.OwnForgery, acts)
    alone.on_committed(mine, P, T)
    assert alone.next_link("mine") == (6, mine[4].id)
    r = replica(tree=False)
    r.mark_catching_up()
    mine = chain(ME, 2, feed="mine")
    outcomes, _acts = r.on_records(P, mine, T)  # pushed before any round ended
    assert outcomes == ["stored"] * 2 and not of(rp.CaughtUp, r.tick(T))
    r.on_committed(mine, P, T)
    r.on_frontier(P, {}, T)
    assert r.adopting
    assert of(rp.CaughtUp, r.on_frontier(Q, {}, T)) and not r.adopting


def test_own_records_beyond_the_head_stop_signing_on_that_feed_until_it_is_resolved(
        ) -> None:
    """A node that is not taking back its own records cannot tell a thief's record of
    its feed beyond its head from one of its own that a rollback of its data dir lost
    (a snapshot, cp -a: review 12b). Either way signing that seq again forks the feed:
    the record is refused (own_forgery, kept as evidence) and nothing is signed on that
    feed until the key is recovered (an own key event) or the node is started with
    ``--restored`` (marked restored: it takes the records back)."""
    mine = chain(ME, 4, feed="mine")  # signed before the rollback
    r = replica(tree=False)
    r.load({(ME.public_key, "mine"): (2, mine[1].id)})  # the rolled-back database
    _ready(r)
    outcomes, acts = r.on_records(P, mine[2:], T)
    assert outcomes == ["rejected:own_forgery"] * 2 and of(rp.OwnForgery, acts)
    with pytest.raises(PublishRefused, match="--restored"):
        r.check_publish("mine")
    r.check_publish("other")  # another feed is not concerned
    r.own_key_changed()  # a recovery naming the node's own heads
    r.check_publish("mine")
    # Restarted with --restored instead: the same records are taken back.
    again = replica(tree=False)
    again.load({(ME.public_key, "mine"): (2, mine[1].id)})
    again.mark_restored()
    acts = again.on_frontier(P, {(ME.public_key, "mine"): (4, mine[3].id)}, T)
    assert of(rp.Fetch, acts)
    outcomes, _acts = again.on_records(P, mine[2:], T, "own")
    assert outcomes == ["stored"] * 2


def test_a_process_that_does_not_sign_leaves_its_own_records_beyond_its_head_alone(
        ) -> None:
    """Processes sharing a database: only the leader signs, takes back or judges records
    of the node's own feeds beyond its heads; another process ignores them (no store,
    no forgery counted: the leader's heads may simply be ahead of its own)."""
    r = replica(tree=False)
    _ready(r)
    r.signing = False
    mine = chain(ME, 2, feed="mine")
    outcomes, acts = r.on_records(P, mine, T)
    assert outcomes == ["ignored"] * 2 and not acts and not r.own_forgeries


def test_records_cut_by_a_recovery_are_not_taken_for_duplicates_when_they_come_again(
        ) -> None:
    """A recovery drops a stolen key's records (Replica.cut): their copies arriving
    again must reach verification (and be refused there), not be answered as held."""
    r = replica(tree=False)
    recs = chain(ORIGIN, 3)
    r.on_records(P, recs, T)
    r.on_committed(recs, P, T)
    assert r.known(recs[2].id)
    r.cut((ORIGIN.public_key, "f"), (1, recs[0].id))
    assert not r.known(recs[1].id) and not r.known(recs[2].id)
    assert r.on_records(Q, recs[1:], T)[0] == ["stored", "stored"]
