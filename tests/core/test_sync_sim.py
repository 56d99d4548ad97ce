"""Many nodes federating in memory, wired only from citynode.core.sync plus
``open_record`` / ``classify`` / node cards: the same pure functions the real node wires
to aiohttp and SQLite. Like h11's connection pair, there is no I/O: a seeded RNG drives
a lossy, reordering network, and every run is reproducible from its seed.

Messages (payloads as the wire carries them where the encoding is ours):

* ``sync_req`` / ``sync_resp``: a frontier (``encode_frontier``) plus the node cards the
  sender holds (card envelopes), so cards travel like the lead's card exchange would;
* ``wants`` (``encode_wants``) answered by ``records`` (record envelopes, seq order);
* ``push``: record envelopes, answered by ``ack``: a frontier of the chains in the batch
  (the receiver's head, or the highest seq offered for chains it refuses);
* ``fork``: a ForkProof, flooded to partners once verified.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from citynode.core.cards import make_card, open_card
from citynode.core.chain import FeedHead, ForkProof, Verdict, classify, verify_fork_proof
from citynode.core.keys import SigningKey, Verifier
from citynode.core.records import Record, decode_envelope, open_record, record_id, sign_record
from citynode.core.sync import (
    DAY_MS,
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
from citynode.errors import InvalidRecord

BASE_MS = 1_700_000_000_000
TYPE = "org.example.Test"
FEED = "test"
MAX_RESPONSE = 1000  # records per answer to a wants message
PUSH_BATCH = 100


@dataclass
class Msg:
    kind: str
    src: int
    dst: int
    payload: Any


@dataclass
class Stats:
    received: int = 0  # record envelopes received, every copy
    duplicates: int = 0  # of which already stored
    refused: int = 0  # verified but refused by the trust policy
    over_quota: int = 0
    pushed_back: int = 0  # records pushed to the partner they came from (must stay 0)
    messages: Counter[str] = field(default_factory=Counter)


def make_node_card(key: SigningKey, partners: set[bytes], now_ms: int) -> bytes:
    return make_card(key, name=f"node {key.public_key[:2].hex()}", url="https://n.example",
                     tls_fingerprint=None, feeds=[(FEED, "public")], partners=partners,
                     software="citynode/test", now_ms=now_ms).envelope


class SimNode:
    def __init__(self, sim: Sim, index: int, *, policy: str, max_hops: int,
                 quota: OriginQuota | None, use_view: bool) -> None:
        self.sim = sim
        self.index = index
        self.key = SigningKey(bytes([index]) * 32)
        self.pk = self.key.public_key
        self.policy = policy
        self.max_hops = max_hops
        self.quota = quota
        self.use_view = use_view
        self.partners: set[bytes] = set()
        self.views: dict[bytes, PeerView] = {}
        self.chains: dict[FeedKey, list[Record]] = {}
        self.by_id: dict[bytes, Record] = {}
        self.came_from: dict[bytes, bytes] = {}  # record id -> partner that sent it first
        self.pending = PendingBuffer(max_records=200)
        self.graph = VouchGraph()
        self.cards: dict[bytes, tuple[int, bytes]] = {}  # node -> (time, envelope)
        self.card_envelopes: set[bytes] = set()
        self._trusted: set[bytes] | None = None
        self.forks: dict[FeedKey, ForkProof] = {}
        self.outbox: dict[bytes, list[Record]] = {}
        self.verifier = Verifier()
        self.stats = Stats()
        self.last_plan: SyncPlan | None = None

    # -- state ---------------------------------------------------------------------------

    def frontier(self) -> Frontier:
        return {k: (len(c), c[-1].id) for k, c in self.chains.items()}

    def head(self, key: FeedKey) -> FeedHead | None:
        c = self.chains.get(key)
        return FeedHead(len(c), c[-1].id) if c else None

    def link(self, other: SimNode) -> None:
        self.partners.add(other.pk)
        self.views[other.pk] = PeerView()
        self._trusted = None
        self.publish_card()

    def publish_card(self) -> None:
        self.sim.now_ms += 1  # a newer card must carry a later time
        self.take_card(make_node_card(self.key, self.partners, self.sim.now_ms))

    def take_card(self, envelope: bytes) -> None:
        if envelope in self.card_envelopes:
            return  # already seen: no signature work, as for records held
        self.card_envelopes.add(envelope)
        card = open_card(envelope, expected_node_id=None, verifier=self.verifier)
        held = self.cards.get(card.node)
        if held is not None and held[0] >= card.time:
            return
        self.cards[card.node] = (card.time, envelope)
        self.graph.add_card(card.node, card.partners)
        self._trusted = None

    def accepts(self, origin: bytes) -> bool:
        if self._trusted is None:
            self._trusted = self.graph.trusted(self.pk, self.partners, self.max_hops)
        return accept_origin(origin, policy=self.policy, self_key=self.pk,
                             partners=self.partners, vouched=self._trusted)

    def wants_origin(self, origin: bytes) -> bool:
        """Trust policy, and no point asking for an origin whose quota is spent today."""
        if not self.accepts(origin):
            return False
        return origin == self.pk or self.quota is None or not self.quota.exhausted(
            origin, self.sim.now_ms)

    # -- storing -------------------------------------------------------------------------

    def publish(self, n: int) -> Record:
        key = (self.pk, FEED)
        h = self.head(key)
        rec = sign_record(self.key, feed=FEED, seq=h.seq + 1 if h else 1,
                          prev=h.id if h else None, time_ms=self.sim.now_ms, type=TYPE,
                          data={"n": n})
        self._store(rec, None)
        return rec

    def _store(self, rec: Record, source: bytes | None) -> None:
        key = (rec.origin, rec.feed)
        chain = self.chains.setdefault(key, [])
        # The invariants under test: never a duplicate, always contiguous and linked.
        assert rec.id not in self.by_id, "a record was stored twice"
        assert rec.seq == len(chain) + 1
        assert rec.prev == (chain[-1].id if chain else None)
        chain.append(rec)
        self.by_id[rec.id] = rec
        for p in self.partners:
            if p != source:
                self.outbox.setdefault(p, []).append(rec)

    def _try_store(self, rec: Record, source: bytes | None) -> bool:
        if rec.origin != self.pk and self.quota is not None and not self.quota.allow(
                rec.origin, len(rec.body) + len(rec.sig), self.sim.now_ms):
            self.stats.over_quota += 1
            return False
        self._store(rec, source)
        return True

    def _store_with_pending(self, rec: Record, source: bytes | None) -> None:
        if not self._try_store(rec, source):
            return
        key = (rec.origin, rec.feed)
        for ready in self.pending.take_ready(key, rec.seq, rec.id):
            if not self._try_store(ready, None):
                break  # over quota: the rest is fetched again another day
        for misfit in self.pending.take_conflicts():
            self._ingest(misfit, None)

    def _fork(self, held: Record, other: Record) -> None:
        key = (held.origin, held.feed)
        if key in self.forks:
            return
        proof = ForkProof(held.envelope, other.envelope)
        verify_fork_proof(proof, self.verifier)
        self.forks[key] = proof
        for p in self.partners:
            self.sim.send("fork", self, p, proof.encode())

    def _ingest(self, rec: Record, source: bytes | None) -> str:
        """Place a verified record: the node's receive path after open_record."""
        if not self.accepts(rec.origin):
            self.stats.refused += 1
            return "refused"
        if not self.wants_origin(rec.origin):
            # Quota spent: not even held as pending; pull brings it another day.
            self.stats.over_quota += 1
            return "quota"
        key = (rec.origin, rec.feed)
        chain = self.chains.get(key, [])
        held_id = chain[rec.seq - 1].id if rec.seq <= len(chain) else None
        decision = classify(rec, self.head(key), held_id)
        if decision.verdict is Verdict.EXTENDS:
            self._store_with_pending(rec, source)
            return "stored" if rec.id in self.by_id else "quota"
        if decision.verdict is Verdict.DUPLICATE:
            return "duplicate"
        if decision.verdict is Verdict.AHEAD:
            waiting = self.pending.get(key, rec.seq)
            if waiting is not None and waiting.id != rec.id:
                self._fork(waiting, rec)
            else:
                self.pending.add(rec, head_seq=len(chain))
            return "pending"
        assert decision.conflicts_with_seq is not None
        self._fork(chain[decision.conflicts_with_seq - 1], rec)
        return "equivocation"

    def receive(self, envelope: bytes, source: bytes | None) -> tuple[str, Record | None]:
        """Bytes from a partner: id lookup first, then full verification, then placing."""
        self.stats.received += 1
        body, sig = decode_envelope(envelope)
        rid = record_id(body)
        held = self.by_id.get(rid)
        if held is not None:
            self.stats.duplicates += 1
            if source is not None:
                self.views[source].update((held.origin, held.feed), held.seq)
            return "duplicate", held
        try:
            rec = open_record(body, sig, now_ms=self.sim.now_ms, verifier=self.verifier,
                              rid=rid)
        except InvalidRecord:
            return "invalid", None
        if source is not None:
            # A node forwards only records it stores, and stores chains contiguously.
            self.views[source].update((rec.origin, rec.feed), rec.seq)
            self.came_from.setdefault(rec.id, source)
        return self._ingest(rec, source), rec

    # -- messages ------------------------------------------------------------------------

    def start_sync(self, partner: bytes) -> None:
        cards = [env for _, env in self.cards.values()]
        self.sim.send("sync_req", self, partner, (encode_frontier(self.frontier()), cards))

    def handle(self, msg: Msg) -> None:
        src = self.sim.nodes[msg.src].pk
        self.stats.messages[msg.kind] += 1
        getattr(self, "on_" + msg.kind)(src, msg.payload)

    def on_sync_req(self, src: bytes, payload: tuple[bytes, list[bytes]]) -> None:
        frontier_bytes, cards = payload
        for env in cards:
            self.take_card(env)
        self.views[src].update_frontier(decode_frontier(frontier_bytes))
        mine = [env for _, env in self.cards.values()]
        self.sim.send("sync_resp", self, src, (encode_frontier(self.frontier()), mine))

    def on_sync_resp(self, src: bytes, payload: tuple[bytes, list[bytes]]) -> None:
        frontier_bytes, cards = payload
        for env in cards:
            self.take_card(env)
        theirs = decode_frontier(frontier_bytes)
        self.views[src].update_frontier(theirs)
        plan = plan_sync(self.frontier(), theirs, accept=self.wants_origin)
        self.last_plan = plan
        wants = list(plan.wants)
        for key, seq, their_id in plan.check:
            if key not in self.forks and self.chains[key][seq - 1].id != their_id:
                wants.append(Want(key[0], key[1], seq, seq))
        for key, seq in plan.forks:
            if key not in self.forks:
                wants.append(Want(key[0], key[1], seq, seq))
        if wants:
            self.sim.send("wants", self, src, encode_wants(wants))
        for key, their_seq in plan.offers:
            start = max(their_seq, self.views[src].known(key) if self.use_view else 0)
            self.outbox.setdefault(src, []).extend(self.chains[key][start:])

    def on_wants(self, src: bytes, payload: bytes) -> None:
        out: list[bytes] = []
        for w in decode_wants(payload):
            chain = self.chains.get(w.key, [])
            for seq in range(w.from_seq, min(w.to_seq, len(chain)) + 1):
                if len(out) < MAX_RESPONSE:
                    out.append(chain[seq - 1].envelope)
        if out:
            self.sim.send("records", self, src, out)

    def on_records(self, src: bytes, payload: list[bytes]) -> None:
        for env in payload:
            self.receive(env, src)

    def on_push(self, src: bytes, payload: list[bytes]) -> None:
        ack: Frontier = {}
        for env in payload:
            outcome, rec = self.receive(env, src)
            if rec is None:
                continue
            key = (rec.origin, rec.feed)
            if outcome in ("refused", "quota"):
                # "Do not send me these": pull fetches them if that ever changes.
                if rec.seq > ack.get(key, (0, b""))[0]:
                    ack[key] = (rec.seq, rec.id)
            else:
                h = self.head(key)
                if h is not None and h.seq > ack.get(key, (0, b""))[0]:
                    ack[key] = (h.seq, h.id)
        if ack:
            self.sim.send("ack", self, src, encode_frontier(ack))
        gaps = [w for w in self.pending.missing() if self.wants_origin(w.origin)]
        if gaps:
            self.sim.send("wants", self, src, encode_wants(gaps))

    def on_ack(self, src: bytes, payload: bytes) -> None:
        self.views[src].update_frontier(decode_frontier(payload))

    def on_fork(self, src: bytes, payload: bytes) -> None:
        proof = ForkProof.decode(payload)
        a, _ = verify_fork_proof(proof, self.verifier)
        key = (a.origin, a.feed)
        if key not in self.forks:
            self.forks[key] = proof
            for p in self.partners - {src}:
                self.sim.send("fork", self, p, payload)

    def flush(self) -> None:
        """The prompt push: one batch per partner of what it is not known to hold."""
        for p, recs in self.outbox.items():
            view = self.views[p]
            seen: set[bytes] = set()
            batch: list[bytes] = []
            for r in recs:
                if r.id in seen or (self.use_view and view.knows((r.origin, r.feed), r.seq)):
                    continue
                if self.came_from.get(r.id) == p:
                    if self.use_view:
                        self.stats.pushed_back += 1  # the view should have stopped it
                    continue
                seen.add(r.id)
                batch.append(r.envelope)
            for i in range(0, len(batch), PUSH_BATCH):
                self.sim.send("push", self, p, batch[i:i + PUSH_BATCH])
        self.outbox.clear()


class Sim:
    def __init__(self, n: int, edges: list[tuple[int, int]], *, seed: int, loss: float = 0.0,
                 policy: str = "vouched", max_hops: int = 3,
                 quota: tuple[int, int] | None = None, use_view: bool = True) -> None:
        self.rng = random.Random(seed)
        self.loss = loss
        self.now_ms = BASE_MS
        self.nodes = [
            SimNode(self, i, policy=policy, max_hops=max_hops,
                    quota=OriginQuota(*quota) if quota else None, use_view=use_view)
            for i in range(n)
        ]
        self.by_pk = {node.pk: node for node in self.nodes}
        self.queue: list[Msg] = []
        self.sent = 0
        self.dropped = 0
        for a, b in edges:
            self.nodes[a].link(self.nodes[b])
            self.nodes[b].link(self.nodes[a])

    def send(self, kind: str, src: SimNode, dst: bytes, payload: Any) -> None:
        self.sent += 1
        if self.rng.random() < self.loss:
            self.dropped += 1
            return
        self.queue.append(Msg(kind, src.index, self.by_pk[dst].index, payload))

    def run(self) -> None:
        """Deliver in waves until quiet; each wave in random order, then every node
        flushes its push batch (the node's batching window)."""
        while True:
            for node in self.nodes:
                node.flush()
            if not self.queue:
                return
            wave, self.queue = self.queue, []
            self.rng.shuffle(wave)
            for msg in wave:
                self.nodes[msg.dst].handle(msg)

    def anti_entropy(self) -> None:
        """One round: every node starts a session with every partner, all concurrently."""
        self.now_ms += 1000
        for node in self.nodes:
            for p in sorted(node.partners):
                node.start_sync(p)
        self.run()

    def stores(self) -> list[set[bytes]]:
        return [set(node.by_id) for node in self.nodes]

    def converged(self) -> bool:
        first = self.stores()[0]
        return all(s == first for s in self.stores())

    def sync_until_converged(self, max_rounds: int) -> int:
        for i in range(max_rounds):
            if self.converged() and all(len(n.pending) == 0 for n in self.nodes):
                return i
            self.anti_entropy()
        raise AssertionError(f"not converged after {max_rounds} rounds")

    def check_invariants(self) -> None:
        for node in self.nodes:
            assert node.stats.pushed_back == 0
            total = 0
            for key, chain in node.chains.items():
                assert [r.seq for r in chain] == list(range(1, len(chain) + 1))
                assert all(r.origin == key[0] for r in chain)
                total += len(chain)
            assert total == len(node.by_id)  # no record stored twice

    def copies_per_delivery(self) -> float:
        """Record envelopes received / (node, record) pairs that had to be delivered."""
        needed = sum(sum(1 for r in n.by_id.values() if r.origin != n.pk) for n in self.nodes)
        return sum(n.stats.received for n in self.nodes) / needed


def line(n: int) -> list[tuple[int, int]]:
    return [(i, i + 1) for i in range(n - 1)]


def random_topology(rng: random.Random, n: int, stretch: float) -> list[tuple[int, int]]:
    """A random connected graph: a random tree (long and thin when ``stretch`` is near
    1) plus a few random extra edges."""
    order = list(range(n))
    rng.shuffle(order)
    edges: set[tuple[int, int]] = set()
    for i in range(1, n):
        j = i - 1 if rng.random() < stretch else rng.randrange(i)
        a, b = order[i], order[j]
        edges.add((min(a, b), max(a, b)))
    for _ in range(rng.randrange(n // 2 + 1)):
        a, b = rng.sample(range(n), 2)
        edges.add((min(a, b), max(a, b)))
    return sorted(edges)


# ----------------------------------------------------------------------------- scenarios


def test_two_nodes_sync_both_ways_in_one_session() -> None:
    sim = Sim(2, [], seed=1)  # not linked yet: records are published without pushes
    a, b = sim.nodes
    for i in range(5):
        a.publish(i)
    for i in range(3):
        b.publish(100 + i)
    a.link(b)
    b.link(a)
    a.start_sync(b.pk)
    sim.run()
    assert a.last_plan is not None
    assert a.last_plan.wants == [Want(b.pk, FEED, 1, 3)]
    assert a.last_plan.offers == [((a.pk, FEED), 0)]
    assert sim.converged() and len(a.by_id) == 8
    sim.check_invariants()
    # A session on frontiers already equal: two messages and nothing else.
    sent = sim.sent
    b.start_sync(a.pk)
    sim.run()
    assert sim.sent - sent == 2
    assert b.last_plan is not None and b.last_plan.in_sync


def test_push_reaches_partner_without_a_session() -> None:
    sim = Sim(3, line(3), seed=2)
    sim.anti_entropy()  # exchanges node cards: node 2 learns that node 1 vouches for 0
    rec = sim.nodes[0].publish(1)
    sim.run()
    assert all(rec.id in n.by_id for n in sim.nodes)
    sim.check_invariants()


def test_four_node_line_relays_with_transitive_vouching() -> None:
    sim = Sim(4, line(4), seed=3)  # default: vouched, 3 hops
    a, _, _, d = sim.nodes
    recs = [a.publish(i) for i in range(3)]
    sim.sync_until_converged(10)
    assert all(r.id in d.by_id for r in recs)
    sim.check_invariants()


def test_four_node_line_stops_with_one_hop_vouching() -> None:
    sim = Sim(4, line(4), seed=4, max_hops=1)
    a, b, c, d = sim.nodes
    ra, rb = a.publish(1), b.publish(2)
    for _ in range(6):
        sim.anti_entropy()
    assert ra.id in c.by_id and ra.id not in d.by_id  # C vouches for B, not for A
    assert rb.id in d.by_id
    assert d.stats.refused > 0
    # And the refusal is remembered: C's view of D stops it re-pushing A's records.
    assert c.views[d.pk].knows((a.pk, FEED), 1)


def test_jakarta_seoul_singapore_and_a_stranger() -> None:
    # 0 Jakarta, 1 Seoul, 2 Singapore, 3 a stranger nobody vouches for.
    sim = Sim(4, [(0, 1), (1, 2)], seed=5)
    jakarta, seoul, singapore, stranger = sim.nodes
    jakarta.policy = "any"  # a careless node relays anything it is handed
    rj = jakarta.publish(1)
    rs = stranger.publish(2)
    assert jakarta.receive(rs.envelope, None)[0] == "stored"
    for _ in range(5):
        sim.anti_entropy()
    assert rj.id in singapore.by_id  # Seoul vouches for Jakarta
    assert rs.id not in seoul.by_id and rs.id not in singapore.by_id
    assert seoul.stats.refused >= 1
    # Refused once, acknowledged as unwanted, never offered again.
    refused_after_first = seoul.stats.refused
    for _ in range(3):
        sim.anti_entropy()
    assert seoul.stats.refused == refused_after_first
    sim.check_invariants()


def test_equivocation_detected_first_copy_kept_everywhere() -> None:
    sim = Sim(6, line(6), seed=6, max_hops=4)  # the ends are 4 card hops apart
    e = sim.nodes[0]
    e.publish(1)
    a = e.publish(2)
    sim.sync_until_converged(10)
    # The origin signs a second, different seq 2 and hands it to the far end.
    b = sign_record(e.key, feed=FEED, seq=2, prev=a.prev, time_ms=sim.now_ms, type=TYPE,
                    data={"n": 999})
    assert b.id != a.id
    assert sim.nodes[5].receive(b.envelope, None)[0] == "equivocation"
    sim.run()
    for node in sim.nodes:
        assert node.chains[(e.pk, FEED)][1].id == a.id  # first copy kept
        assert b.id not in node.by_id
        proof = node.forks[(e.pk, FEED)]  # and everyone holds a verified proof
        x, y = verify_fork_proof(proof, Verifier())
        assert {x.id, y.id} == {a.id, b.id}
    sim.check_invariants()


def test_equivocation_split_each_keeps_its_first_copy() -> None:
    sim = Sim(5, line(5), seed=7)
    e, far = sim.nodes[0], sim.nodes[4]
    e.publish(1)
    sim.sync_until_converged(10)
    a = e.publish(2)  # pushed on the next run
    b = sign_record(e.key, feed=FEED, seq=2, prev=a.prev, time_ms=sim.now_ms, type=TYPE,
                    data={"n": 999})
    assert far.receive(b.envelope, None)[0] == "stored"  # far end sees b first
    for _ in range(8):
        sim.anti_entropy()
    key = (e.pk, FEED)
    assert e.chains[key][1].id == a.id and far.chains[key][1].id == b.id
    for node in sim.nodes:
        held = {r.id for r in node.chains[key]}
        assert len(held & {a.id, b.id}) == 1  # never both, never replaced
        assert key in node.forks
    sim.check_invariants()


def test_flooding_origin_is_cut_off_by_quota() -> None:
    sim = Sim(3, line(3), seed=8, quota=(10, 1_000_000))
    flooder, x, y = sim.nodes
    for i in range(40):
        flooder.publish(i)
    ry = [y.publish(100 + i) for i in range(15)]  # a normal origin, above 10 too
    for _ in range(5):
        sim.anti_entropy()
    key = (flooder.pk, FEED)
    assert len(x.chains[key]) == 10 and len(y.chains[key]) == 10
    assert all(r.id in x.by_id for r in ry[:10]) and ry[10].id not in x.by_id
    received_day1 = x.stats.received
    for _ in range(5):
        sim.anti_entropy()
    assert x.stats.received == received_day1  # no re-fetching once exhausted
    sim.now_ms += DAY_MS  # a new UTC day: the next 10 flow
    for _ in range(3):
        sim.anti_entropy()
    assert len(x.chains[key]) == 20 and len(y.chains[key]) == 20
    assert len(x.chains[(y.pk, FEED)]) == 15
    sim.check_invariants()


# ----------------------------------------------------------------------------- convergence


def run_random(seed: int, n: int, loss: float, stretch: float,
               edges: list[tuple[int, int]] | None = None) -> Sim:
    rng = random.Random(seed)
    if edges is None:
        edges = random_topology(rng, n, stretch)
    # Every node must accept every origin for stores to become identical, so trust
    # reaches across the whole graph here; trust limits are tested above.
    sim = Sim(n, edges, seed=seed, loss=loss, max_hops=n)
    for r in range(3):  # publishes interleaved with the first rounds of sync
        for _ in range(rng.randrange(2, n // 3 + 3)):
            sim.nodes[rng.randrange(n)].publish(r)
        sim.anti_entropy()
    sim.sync_until_converged(400)
    sim.check_invariants()
    total = sum(len(node.chains.get((node.pk, FEED), [])) for node in sim.nodes)
    assert all(len(s) == total for s in sim.stores())
    return sim


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          derandomize=True, database=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(5, 30),
    loss=st.sampled_from([0.0, 0.1, 0.2, 0.3]),
    stretch=st.floats(0.0, 1.0),
)
def test_random_topologies_converge(seed: int, n: int, loss: float, stretch: float) -> None:
    run_random(seed, n, loss, stretch)


def test_fixed_seeds_converge() -> None:
    run_random(10, 30, 0.3, 1.0, edges=line(30))  # a 30-node line at 30% loss
    run_random(11, 30, 0.3, 1.0)  # a long path with a few shortcuts
    run_random(12, 25, 0.2, 0.0)
    run_random(13, 5, 0.0, 0.5)


def test_copies_per_record_stay_low() -> None:
    """Push + PeerView: how many copies of a record a node receives per record it needs.
    A mesh of 20 nodes (average degree ~4), 60 records, no loss. The figure goes in the
    report; the bounds stop it from regressing."""
    rng = random.Random(21)
    edges = random_topology(rng, 20, 0.3)
    ratios = {}
    for use_view in (True, False):
        sim = Sim(20, edges, seed=21, max_hops=20, use_view=use_view)
        while any(len(node.graph) < 20 for node in sim.nodes):
            sim.anti_entropy()  # first every node learns every card, so trusts every origin
        for i in range(60):
            sim.nodes[rng.randrange(20)].publish(i)
            sim.run()
        sim.sync_until_converged(20)
        sim.check_invariants()
        ratios[use_view] = sim.copies_per_delivery()
        assert sum(node.stats.refused for node in sim.nodes) == 0
    # Plain flooding (every node forwards to every partner but the sender) costs
    # (2 * edges - nodes + 1) / (nodes - 1) copies; the view saves the crossing pushes
    # that acknowledgements and earlier copies reveal. Seen: 1.27 with, 1.32 without.
    flood = (2 * len(edges) - 20 + 1) / 19
    print(f"copies received per needed delivery: with PeerView {ratios[True]:.2f}, "
          f"without {ratios[False]:.2f}, plain flooding {flood:.2f}")
    assert 1.0 <= ratios[True] < min(ratios[False], 1.5)
    assert ratios[False] <= flood
