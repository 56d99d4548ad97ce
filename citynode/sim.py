"""A deterministic simulator: N real :class:`~citynode.core.replica.Replica` objects over
a simulated network, with no I/O.

Each simulated node is a thin shell, as the real node is: it verifies signatures
(``open_record``, real Ed25519, cached by record id so a record is verified once per
run however many nodes receive it), keeps a store in memory, answers fetches and
lookups from it, and carries out the replica's actions as messages on the network.
The network has a latency (uniform in a range), loss, partitions (pairs that cannot
talk) and churn (nodes offline for a while); hostile nodes fork their feeds, withhold
records, flood, answer syncs from a stale snapshot of their chains, and, each time they
start a round with a partner, claim later records of the partner's own feeds than exist
(``false_claims``), send malformed or oversized reconciliation messages (``junk_sync``;
the shell counts them as ``bad_sync`` and carries on, as the real shell does) or graft
made-up origins (``graft_flood``). A request whose answer is lost fails as it would over
the network (a fetch: ``on_fetch_done(failed=True)``).

Everything random comes from one seeded :class:`random.Random`; the same seed gives the
same run and the same :meth:`Sim.result_hash`. Bytes are counted as the wire would
carry them: envelopes for records, the reconciliation and wants encodings as built.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import random
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from citynode.core import encoding
from citynode.core import reconcile as rc
from citynode.core import replica as rp
from citynode.core.chain import ForkProof, verify_fork_proof
from citynode.core.keys import SigningKey, Verifier
from citynode.core.records import Record, open_record, sign_record
from citynode.core.sync import VouchGraph, Want, accept_origin, encode_frontier, encode_wants
from citynode.errors import InvalidRecord

__all__ = ["BASE_MS", "Sim", "SimNode", "random_graph"]

BASE_MS = 1_700_000_000_000
TYPE = "org.example.Test"
FRAME = 16  # bytes of framing counted per message
# Answers, and the request each answers: a lost answer fails the request.
_ANSWERS = {"sync_resp": "sync_req", "records": "fetch", "push_ack": "push"}


@dataclass
class Stats:
    received: int = 0  # record envelopes received, every copy
    bytes_sent: int = 0
    messages: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)


class SimNode:
    """One simulated node: a Replica and the shell around it."""

    def __init__(self, sim: Sim, index: int, config: dict[str, Any]) -> None:
        self.sim = sim
        self.index = index
        self.key = sim.key(index)
        self.pk = self.key.public_key
        self.policy: str = config.pop("policy", "any")
        self.max_hops: int = config.pop("max_hops", 3)
        self.partners: set[bytes] = set()
        self.graph = VouchGraph()
        self._trusted: set[bytes] | None = None
        self.replica = rp.Replica(rp.ReplicaConfig(self_key=self.pk, trusted=self.accepts,
                                                   **config))
        self.store: dict[tuple[bytes, str], list[Record]] = {}
        self.by_id: dict[bytes, Record] = {}
        self.proofs: dict[tuple[bytes, str], bytes] = {}
        self.proof_at: int | None = None
        self.stats = Stats()
        self.online = True
        self.honest = True
        self.withhold = False  # hostile: serves no records, pushes nothing
        self.stale: Any = None  # hostile: syncs from this old ChainSet
        self.false_claims = False  # hostile: claims partners' own feeds beyond their heads
        self.junk_sync = False  # hostile: malformed and oversized reconciliation requests
        self.graft_flood = 0  # hostile: grafts of this many made-up origins per round

    # -- trust -----------------------------------------------------------------------

    def accepts(self, origin: bytes) -> bool:
        if self.policy == "any":
            return True
        if self._trusted is None:
            self._trusted = self.graph.trusted(self.pk, self.partners, self.max_hops)
        return accept_origin(origin, policy=self.policy, self_key=self.pk,
                             partners=self.partners, vouched=self._trusted)

    def learn_card(self, node: bytes, partners: frozenset[bytes]) -> None:
        if self.graph.partners_of(node) == partners and node in self.replica.cards:
            return
        self.graph.add_card(node, partners)
        self._trusted = None
        self.run(self.replica.on_card(node, partners, self.sim.now))

    def cards(self) -> dict[bytes, frozenset[bytes]]:
        return {n: self.graph.partners_of(n) for n in self.replica.cards}

    # -- own feeds -------------------------------------------------------------------

    def publish(self, feed: str, n: int = 1, *, data: Any = None) -> list[Record]:
        recs = []
        seq, prev = self.replica.next_link(feed)
        for i in range(n):
            r = sign(self.key, feed, seq, prev, self.sim.now,
                     data if data is not None else {"n": seq + i})
            recs.append(r)
            seq, prev = seq + 1, r.id
        self.run(self.replica.publish(recs, self.sim.now))
        return recs

    # -- receiving -------------------------------------------------------------------

    def verify(self, records: Iterable[Record]) -> list[Record]:
        out = []
        for r in records:
            self.stats.received += 1
            if self.replica.known(r.id) or r.id in self.by_id:
                out.append(r)  # the shell's id lookup: no signature work
                continue
            ok = self.sim.verified(r)
            if ok is not None:
                out.append(ok)
            else:
                self.stats.rejected["bad_signature"] += 1
        return out

    def ingest(self, src: bytes | None, records: list[Record], via: str) -> list[int]:
        recs = self.verify(records)
        outcomes, actions = self.replica.on_records(src, recs, self.sim.now, via)
        self.run(actions, src)
        return [i for i, o in enumerate(outcomes) if o == "duplicate"]

    def range(self, w: Want, limit: int) -> list[Record]:
        chain = self.store.get(w.key, [])
        return chain[w.from_seq - 1:min(w.to_seq, len(chain), w.from_seq - 1 + limit)]

    # -- carrying out actions ---------------------------------------------------------

    def run(self, actions: list[rp.Action], src: bytes | None = None) -> None:
        sim = self.sim
        queue = list(actions)
        while queue:
            a = queue.pop(0)
            if isinstance(a, rp.Store):
                for r in a.records:
                    chain = self.store.setdefault((r.origin, r.feed), [])
                    # The invariants under test: never a duplicate, always contiguous.
                    assert r.id not in self.by_id, "a record was stored twice"
                    assert r.seq == len(chain) + 1 and r.prev == (chain[-1].id if chain
                                                                  else None)
                    chain.append(r)
                    self.by_id[r.id] = r
                queue.extend(self.replica.on_committed(a.records, a.source, sim.now))
            elif isinstance(a, rp.Push):
                if self.withhold:
                    queue.extend(self.replica.on_push_result(a.peer, [], sim.now))
                    continue
                sim.send(self, a.peer, "push", list(a.records),
                         sum(sim.size(r) for r in a.records))
            elif isinstance(a, rp.Fetch):
                data = encode_wants(a.wants)
                sim.send(self, a.peer, "fetch", (a.wants, a.via), len(data))
            elif isinstance(a, rp.SendSync):
                kind = "sync_req" if a.initiator else "sync_resp"
                sim.send(self, a.peer, kind, a.payload, len(a.payload))
                if a.initiator:
                    self.misbehave(a.peer)
            elif isinstance(a, rp.Announce):
                heads = {(o, f): (s, h) for o, f, s, h in a.heads}
                sim.send(self, a.peer, "announce", heads, len(encode_frontier(heads)))
            elif isinstance(a, rp.Graft):
                sim.send(self, a.peer, "graft", a.origin, 32)
            elif isinstance(a, rp.Lookup):
                chain = self.store.get((a.origin, a.feed), [])
                held = chain[a.seq - 1] if a.seq <= len(chain) else None
                queue.extend(self.replica.on_lookup(a.origin, a.feed, a.seq, held, sim.now))
            elif isinstance(a, rp.StoreProof):
                if (a.origin, a.feed) not in self.proofs:
                    self.proofs[(a.origin, a.feed)] = a.proof
                    if self.proof_at is None:
                        self.proof_at = sim.now
            elif isinstance(a, rp.SendProof):
                sim.send(self, a.peer, "proof", a.proof, len(a.proof))
            elif isinstance(a, rp.Rejected):
                self.stats.rejected[a.reason] += 1
            # SendHeld, SendCheckpoint, WakeStreams, ForkFound, Paused, Resumed: no-ops

    def misbehave(self, peer: bytes) -> None:
        """What a hostile node sends a partner at the start of each round with it."""
        sim = self.sim
        if self.false_claims:
            claims = {k: (len(c) + 3, sim.rng.randbytes(32))
                      for k, c in sorted(self.store.items()) if k[0] == peer}
            claims[(peer, "f")] = (len(self.store.get((peer, "f"), [])) + 3,
                                   sim.rng.randbytes(32))
            sim.send(self, peer, "frontier", claims, len(encode_frontier(claims)))
        if self.junk_sync:
            junk = (sim.rng.randbytes(sim.rng.randint(1, 64)) if sim.rng.random() < 0.5
                    else bytes(rc.MAX_MESSAGE_BYTES + 1))
            sim.send(self, peer, "sync_req", junk, len(junk))
        for _ in range(self.graft_flood):
            sim.send(self, peer, "graft", sim.rng.randbytes(32), 32)

    def handle(self, kind: str, src: SimNode, payload: Any) -> None:
        sim, r, s = self.sim, self.replica, src.pk
        self.stats.messages[kind] += 1
        if kind == "push":
            dup = self.ingest(s, payload, "push")
            sim.send(self, s, "push_ack", dup, 4 + 2 * len(dup))
        elif kind == "push_ack":
            self.run(r.on_push_result(s, payload, sim.now))
        elif kind == "fetch":
            wants, via = payload
            out: list[Record] = []
            if not self.withhold:
                for w in wants:
                    out.extend(self.range(w, r.config.batch - len(out)))
            sim.send(self, s, "records", (wants, via, out), sum(sim.size(x) for x in out))
        elif kind == "records":
            wants, via, recs = payload
            self.ingest(s, recs, via)
            self.run(r.on_fetch_done(s, wants, len(recs), sim.now))
        elif kind in ("sync_req", "sync_resp"):
            if kind == "sync_req" and sim.gossip_cards:
                for node, ps in src.cards().items():  # cards travel with sync rounds
                    self.learn_card(node, ps)
                for node, ps in self.cards().items():
                    src.learn_card(node, ps)
            saved = r.chains
            if self.stale is not None:
                r.chains = self.stale
            try:
                self.run(r.on_sync(s, payload, sim.now, initiator=kind == "sync_resp"))
            except InvalidRecord:
                # As the real shell: a malformed message is counted, never a crash; the
                # replica ended that session (ours: the round failed, retried later).
                self.stats.rejected["bad_sync"] += 1
                if kind == "sync_resp":
                    self.run(r.on_sync_failed(s, sim.now))
            finally:
                r.chains = saved
        elif kind == "announce":
            self.run(r.on_announce(s, payload, sim.now))
        elif kind == "frontier":
            self.run(r.on_frontier(s, payload, sim.now))
        elif kind == "graft":
            r.on_graft(s, payload)
        elif kind == "proof":
            fp = ForkProof.decode(payload)
            a, _b = verify_fork_proof(fp, sim.verifier)
            self.run(r.on_proof(s, a.origin, a.feed, max(a.seq, _b.seq), "fork", payload))

    def fail(self, kind: str, dst: bytes, payload: Any) -> None:
        """A message of ours did not arrive: what the shell sees (an error, a timeout)."""
        r, now = self.replica, self.sim.now
        if kind == "push":
            self.run(r.on_push_failed(dst, now))
        elif kind == "sync_req":
            self.run(r.on_sync_failed(dst, now))
        elif kind == "fetch" or kind == "records":
            self.run(r.on_fetch_done(dst, payload[0], 0, now, failed=True))
        elif kind == "proof":
            r.on_deliver_failed(dst, "proof", payload, 0)


class Sim:
    """N nodes on a graph, a clock, a network. See the module docstring."""

    def __init__(self, n: int, edges: Iterable[tuple[int, int]], *, seed: int,
                 latency: tuple[int, int] = (5, 40), loss: float = 0.0,
                 tick_ms: int = 50, cards: str = "all", warm: bool = True,
                 **config: Any) -> None:
        self.rng = random.Random(seed)
        self.now = BASE_MS
        self.latency = latency
        self.loss = loss
        self.tick_ms = tick_ms
        self.verifier = Verifier()
        self._keys: dict[int, SigningKey] = {}
        self._verified: dict[bytes, Record | None] = {}
        self._sizes: dict[bytes, int] = {}
        self.blocked: set[frozenset[bytes]] = set()
        self.gossip_cards = cards == "partners"  # else cards are known from the start
        self.bytes_by_kind: Counter[str] = Counter()
        self.sync_bytes: Counter[frozenset[int]] = Counter()  # per link, both ways
        self.events: list[tuple[int, int, Callable[[], None]]] = []
        self._n = 0
        self.timeout_ms = 4 * latency[1] + 100
        cfg = {"sync_interval_ms": 1000, "settle_ms": 1000, "flowing_ms": 1000,
               "graft_delay_ms": 200, "graft_patience_ms": 800, "fetch_timeout_ms": 1000,
               "announce": False, **config}
        self.interval: int = cfg["sync_interval_ms"]
        self.nodes = [SimNode(self, i, dict(cfg)) for i in range(n)]
        self.by_pk = {nd.pk: nd for nd in self.nodes}
        self.edges = sorted({(min(a, b), max(a, b)) for a, b in edges})
        for a, b in self.edges:
            self.nodes[a].partners.add(self.nodes[b].pk)
            self.nodes[b].partners.add(self.nodes[a].pk)
        for nd in self.nodes:
            nd.learn_card(nd.pk, frozenset(nd.partners))
        for nd in self.nodes:
            others = (list(self.nodes) if cards == "all"
                      else [self.by_pk[p] for p in nd.partners] if cards == "partners"
                      else [])
            for m in others:
                nd.learn_card(m.pk, frozenset(m.partners))
            for p in sorted(nd.partners):
                nd.replica.add_partner(p, self.now + self.rng.randrange(self.interval))
        if warm:
            self.warm_up()

    def warm_up(self, max_rounds: int = 10) -> None:
        """Run until every node's first round with each partner has ended (own-feed
        safety: no node signs before that)."""
        end = self.now + max_rounds * self.interval
        while self.now < end and any(nd.replica.first_round_pending()
                                     for nd in self.nodes if nd.online):
            self.run_rounds(0.25)

    # -- plumbing --------------------------------------------------------------------

    def key(self, index: int) -> SigningKey:
        k = self._keys.get(index)
        if k is None:
            k = self._keys[index] = SigningKey(hashlib.sha256(b"sim%d" % index).digest())
        return k

    def size(self, r: Record) -> int:
        n = self._sizes.get(r.id)
        if n is None:
            n = self._sizes[r.id] = len(r.envelope)
        return n

    def verified(self, r: Record) -> Record | None:
        """Real verification of the envelope's bytes, once per record id per run."""
        if r.id not in self._verified:
            try:
                ok: Record | None = open_record(r.body, r.sig, r.payload, now_ms=self.now + 60_000,
                                                verifier=self.verifier)
                if ok is not None and ok.id != r.id:
                    ok = None
            except Exception:
                ok = None
            self._verified[r.id] = ok
        return self._verified[r.id]

    def at(self, t: int, fn: Callable[[], None]) -> None:
        self._n += 1
        heapq.heappush(self.events, (t, self._n, fn))

    def send(self, src: SimNode, dst: bytes, kind: str, payload: Any, nbytes: int) -> None:
        src.stats.bytes_sent += nbytes + FRAME
        self.bytes_by_kind[kind] += nbytes + FRAME
        if kind.startswith("sync"):
            self.sync_bytes[frozenset((src.index, self.by_pk[dst].index))] += nbytes + FRAME
        src.stats.messages["sent:" + kind] += 1
        target = self.by_pk.get(dst)
        lost = (target is None or not target.online or not src.online
                or frozenset((src.pk, dst)) in self.blocked or self.rng.random() < self.loss)
        if lost:
            if kind in _ANSWERS:  # the asker sees its request fail
                if target is not None:
                    waiter, peer = target, src.pk
                    self.at(self.now + self.timeout_ms,
                            lambda: waiter.fail(_ANSWERS[kind], peer, payload))
            else:
                self.at(self.now + self.timeout_ms, lambda: src.fail(kind, dst, payload))
            return
        assert target is not None
        delay = self.rng.randint(*self.latency)
        self.at(self.now + delay, lambda: target.handle(kind, src, payload))

    def step_to(self, t: int) -> None:
        """Run every event and timer until time ``t``."""
        next_tick = self.now - self.now % self.tick_ms + self.tick_ms
        while True:
            t_ev = self.events[0][0] if self.events else t + 1
            if next_tick <= min(t_ev, t):
                self.now = next_tick
                for nd in self.nodes:
                    d = nd.replica.next_deadline()
                    if nd.online and d is not None and d <= self.now:
                        nd.run(nd.replica.tick(self.now))
                next_tick += self.tick_ms
                continue
            if t_ev > t:
                break
            when, _n, fn = heapq.heappop(self.events)
            self.now = max(self.now, when)
            fn()
        self.now = t

    def run_rounds(self, rounds: float) -> None:
        self.step_to(self.now + int(rounds * self.interval))

    # -- churn, partitions -------------------------------------------------------------

    def set_online(self, i: int, online: bool) -> None:
        nd = self.nodes[i]
        nd.online = online
        for p in sorted(nd.partners):
            other = self.by_pk[p]
            if online:
                nd.run(nd.replica.partner_up(p, self.now))
                other.run(other.replica.partner_up(nd.pk, self.now))
            else:
                other.replica.partner_down(nd.pk)

    def partition(self, a: Iterable[int], b: Iterable[int], blocked: bool = True) -> None:
        for i in a:
            for j in b:
                pair = frozenset((self.nodes[i].pk, self.nodes[j].pk))
                if blocked:
                    self.blocked.add(pair)
                else:
                    self.blocked.discard(pair)

    # -- results -----------------------------------------------------------------------

    def honest(self) -> list[SimNode]:
        return [nd for nd in self.nodes if nd.honest]

    def honest_ids(self) -> set[bytes]:
        out: set[bytes] = set()
        for nd in self.honest():
            for (o, _f), chain in nd.store.items():
                if o == nd.pk:
                    out.update(r.id for r in chain)
        return out

    def converged(self, ids: set[bytes] | None = None) -> bool:
        want = self.honest_ids() if ids is None else ids
        return all(want <= nd.by_id.keys() for nd in self.honest() if nd.online)

    def run_until_converged(self, max_rounds: float, step: float = 0.25) -> float:
        """Run until every honest online node holds every honest record; return the
        rounds (sync intervals) it took. Raises AssertionError past ``max_rounds``."""
        start = self.now
        while not self.converged():
            if self.now - start > max_rounds * self.interval:
                raise AssertionError(f"not converged after {max_rounds} rounds")
            self.run_rounds(step)
        return (self.now - start) / self.interval

    def quiet(self, max_rounds: float = 50) -> None:
        """Run until no message is in flight (timers may remain)."""
        end = self.now + int(max_rounds * self.interval)
        while self.events and self.now < end:
            self.step_to(min(end, self.events[0][0]))

    def check_invariants(self) -> None:
        for nd in self.nodes:
            total = 0
            for key, chain in nd.store.items():
                assert [r.seq for r in chain] == list(range(1, len(chain) + 1))
                assert all((r.origin, r.feed) == key for r in chain)
                h = nd.replica.heads.get(key)
                assert h is not None and h.seq == len(chain) and h.id == chain[-1].id
                total += len(chain)
            assert total == len(nd.by_id)

    def result_hash(self) -> str:
        h = hashlib.sha256()
        for nd in self.nodes:
            h.update(nd.pk)
            for rid in sorted(nd.by_id):
                h.update(rid)
            for k in sorted(nd.proofs):
                h.update(nd.proofs[k])
            h.update(str((nd.stats.received, nd.stats.bytes_sent)).encode())
        return h.hexdigest()


def random_graph(rng: random.Random, n: int, lo: int = 3, hi: int = 8
                 ) -> list[tuple[int, int]]:
    """A connected random graph whose nodes have about ``lo``..``hi`` partners: a random
    spanning path for connectivity, then random edges up to each node's drawn degree."""
    order = list(range(n))
    rng.shuffle(order)
    edges = {(min(a, b), max(a, b)) for a, b in itertools.pairwise(order)}
    target = [rng.randint(lo, hi) for _ in range(n)]
    deg = Counter[int]()
    for a, b in edges:
        deg[a] += 1
        deg[b] += 1
    for a in order:
        tries = 0
        while deg[a] < target[a] and tries < 50:
            tries += 1
            b = rng.randrange(n)
            e = (min(a, b), max(a, b))
            if b == a or e in edges or deg[b] >= hi:
                continue
            edges.add(e)
            deg[a] += 1
            deg[b] += 1
    return sorted(edges)


def sign(key: SigningKey, feed: str, seq: int, prev: bytes | None, now: int,
         data: dict[str, Any]) -> Record:
    """Sign a record for a simulated origin (hostile nodes build forks with it). The
    payload salt is derived from everything signed, not drawn at random, so that a seed
    gives the same run (a real node's salt is random)."""
    salt = hashlib.sha256(b"citynode/sim/salt" + key.public_key + feed.encode()
                          + seq.to_bytes(8, "big") + now.to_bytes(8, "big")
                          + encoding.encode(data)).digest()[:16]
    return sign_record(key, feed=feed, seq=seq, prev=prev, time_ms=now, type=TYPE, data=data,
                       salt=salt)
