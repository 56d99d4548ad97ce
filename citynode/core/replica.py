"""The replication state machine of one node, sans I/O (as h11's ``Connection``).

Everything that decides what a node stores, pushes, fetches, grafts, reconciles and
forwards lives here; the shell (the node, or :mod:`citynode.sim`) verifies signatures,
reads and writes storage, talks HTTP, and carries out the actions this returns. Time is
a parameter (``now_ms``); nothing sleeps: deadlines are recorded and acted on by
:meth:`Replica.tick` (:meth:`Replica.next_deadline` says when to call it).

Inputs (methods; each returns a list of actions, ``on_records`` also the outcomes):

* ``load(heads, forks)``: state from storage at start.
* ``add_partner(p, first_sync)``, ``remove_partner(p)``: the partner set changes.
* ``partner_up(p, now)``, ``partner_down(p)``: reachability.
* ``on_card(node, partners, now)``: a verified, newer node card.
* ``on_records(p | None, records, now, via)``: records the shell VERIFIED (a push, the
  answer to a Fetch, a graft, a local import); returns outcomes and actions.
* ``mark_restored()``, ``mark_catching_up()``: own feeds may be behind partners'.
* ``on_committed(records, source, now)``: the shell committed a Store.
* ``on_push_result(p, dup, now)`` / ``on_push_failed(p, now)``: the Push in flight.
* ``on_announce(p, heads, now)``: a partner's lazy push (heads only).
* ``on_graft(p, origin)``: a partner asks us to push ``origin`` eagerly again.
* ``on_sync(p, data, now, initiator=...)``: a reconciliation message (its request, or
  the answer to ours); ``on_sync_failed(p, now)``: our request failed.
* ``on_frontier(p, frontier, now)``: a legacy full frontier (request or answer).
* ``on_fetch_done(p, wants, got, now, failed=...)``: a Fetch ended (``got`` records).
* ``on_lookup(origin, feed, seq, held, now)``: the record held there, or None.
* ``on_proof(p, origin, feed, seq, kind, proof)``: a proof the shell verified.
* ``on_checkpoint(p, origin, feed, envelope)``: a checkpoint new here (verified, stored).
* ``on_deliver_failed(p, kind, payload, refusals)``: a SendProof/SendCheckpoint failed.
* ``check_publish(feed)``, ``next_link(feed)``, ``publish(records, now)``: own feeds.
* ``tick(now)``: what is due; ``sync_now(p, now)``: a round with p soon.
* ``pull_now(now)``: fetch at once what rounds found missing (a one-shot catch-up,
  with no push on its way: no settle delay).
* ``access_changed()``: the access policy changed.

Queries: ``known(rid)`` (stored or being stored: skip verifying it), ``head(key)``,
``queued(p)``, ``frontier_for(p)``, ``lacks_from(frontier)``, ``first_round_pending()``,
``next_deadline()``.

Actions (frozen dataclasses): :class:`Store`, :class:`Push`, :class:`Announce`,
:class:`Fetch`, :class:`Graft`, :class:`SendSync`, :class:`Lookup`,
:class:`StoreProof`, :class:`SendProof`, :class:`SendCheckpoint`, :class:`SendHeld`,
:class:`WakeStreams`, :class:`Rejected`, :class:`ForkFound`, :class:`Paused`,
:class:`Resumed`, :class:`Confirmed`, :class:`CaughtUp`, :class:`OwnForgery`.

Rules kept from the node: trust policy and access policy are injected predicates;
quota is charged only for records stored (each one, also those released from the
pending buffer; own records are never charged; erasure requests, feed
``citynode.erasures``, always pass it: a node over an origin's quota must still drop
the personal data that origin asks it to erase); a record is never pushed back to the
partner it came from nor to one known to hold it; Plumtree per origin (a duplicate
answer prunes the origin to lazy, a graft makes it eager again); a chain that pushes
are extending is not pulled; own-feed safety (a partner claiming later records of our
own feed pauses publishing on it until they are here, or until an answer shows the claim
false: a failed fetch proves nothing and keeps it paused; a fork proof against our own
feed stops it for good; no signing before every partner's first round ended). Only a
node that may lack records of its own feeds (restored, or a new database: ``adopting``)
takes them back from partners: any other node never signed a record of its own feed
beyond its head, so one that arrives was signed with its key elsewhere (a stolen key):
it is refused (``own_forgery``), kept as evidence in :attr:`Replica.own_forgeries`
(:class:`OwnForgery`), and nothing more is signed on that feed until an own key event
(the recovery) or a start marked restored: the node cannot tell it from one of its own
that an unnoticed rollback of its data dir lost, and re-signing that seq forks it.

Everything a partner claims is hostile until shown: claims on chains it may not be told
of (``may_pass``) are ignored; what is kept per partner about chains not held here (its
view, deferred pulls, grafts) is bounded; pulls are grouped into one Fetch per partner;
reconciliation requests answered are bounded per partner per sync interval.

Eager links start from a spanning tree of the card graph when ``tree`` is on: every
node computes the same shallow spanning tree of mutual partnerships (breadth first from
the node of lowest key hash) and pushes eagerly only along its tree edges, so a record reaches
each node once; links off the tree are lazy (announced when ``announce`` is on, else
repaired by reconciliation and grafted). A partner whose card is unknown is eager.

Sync rounds (range reconciliation, :mod:`citynode.core.reconcile`) run every
``sync_interval_ms`` per partner, but yield to a push wave: while pushes are extending
chains here, a due round waits (two intervals at most), since it would only find
differences already on their way. What a round finds missing is pulled after
``settle_ms``, unless pushes are still extending that chain.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from citynode.core import reconcile as rc
from citynode.core.chain import FeedHead, Verdict, canonical_fork_proof, classify
from citynode.core.records import Record
from citynode.core.sync import MAX_WANTS, FeedKey, OriginQuota, PeerView, PendingBuffer, Want
from citynode.core.types import ERASURE_FEED
from citynode.errors import ChainError, InvalidProof, PublishRefused

__all__ = [
    "Action",
    "Announce",
    "CaughtUp",
    "Confirmed",
    "Fetch",
    "ForkFound",
    "Graft",
    "Lookup",
    "OwnForgery",
    "Paused",
    "Push",
    "RecentIds",
    "Rejected",
    "Replica",
    "ReplicaConfig",
    "Resumed",
    "SendCheckpoint",
    "SendHeld",
    "SendProof",
    "SendSync",
    "Store",
    "StoreProof",
    "WakeStreams",
]

PROOFS_PATH = "/v1/proofs"
CHECKPOINTS_PATH = "/v1/checkpoints"


def _allow_send(peer: bytes, record: Record) -> bool:
    return True


def _allow_pass(peer: bytes, origin: bytes, feed: str) -> bool:
    return True


def _trust_all(origin: bytes) -> bool:
    return True


def _short_name(peer: bytes) -> str:
    return peer.hex()[:12]


@dataclass(frozen=True)
class ReplicaConfig:
    """Limits, delays and the injected policies of one replica."""

    self_key: bytes
    trusted: Callable[[bytes], bool] = _trust_all
    may_send: Callable[[bytes, Record], bool] = _allow_send
    may_pass: Callable[[bytes, bytes, str], bool] = _allow_pass
    name_of: Callable[[bytes], str] = _short_name  # a partner, as messages name it
    quota_records_per_day: int = 1_000_000
    quota_bytes_per_day: int = 1 << 40
    pending_max_records: int = 10_000
    pending_max_bytes: int = 64 << 20
    push_batch: int = 100
    push_queue_max: int = 10_000
    batch: int = 500  # records per fetch want
    sync_interval_ms: int = 30_000
    min_sync_gap_ms: int = 250
    settle_ms: int = 1000  # a pull waits this long for records already on their way
    flowing_ms: int = 3000  # a chain pushed this recently is left to push
    graft_delay_ms: int = 500
    graft_patience_ms: int = 2000
    fetch_timeout_ms: int = 10_000
    backoff_max_ms: int = 60_000
    # A chain whose fetched records were all refused (a payload withheld, dated in the
    # future, over quota) is asked again on a back-off up to this: not endlessly at
    # backoff_max (what makes them acceptable, a request or a card, comes by itself).
    stall_max_ms: int = 3_600_000
    outbox_max: int = 1000
    outbox_per_round: int = 50
    outbox_refusals: int = 5
    recent_max: int = 200_000
    max_session_rounds: int = 16
    max_answers_per_interval: int = 64  # reconciliation requests answered per partner
    max_grafts: int = 64
    max_deferred: int = 100_000  # chains waiting for their settle delay before a pull
    max_deferred_per_peer: int = 20_000  # of those, named by one partner
    max_view_unheld: int = 10_000  # chains not held here recorded in one partner's view
    max_grafted: int = 1024  # origins not held here one partner may graft
    own_fetch_retries: int = 5  # failed fetches of a claim on our own feed before giving up
    announce: bool = True
    tree: bool = True


# ---------------------------------------------------------------------------------------
# Actions


@dataclass(frozen=True, slots=True)
class Store:
    """Append these records (chain order; heads are already advanced). Then call
    ``on_committed``. ``durable``: own records, fsync before acknowledging."""

    records: tuple[Record, ...]
    durable: bool
    source: bytes | None


@dataclass(frozen=True, slots=True)
class Push:
    """Send these records to the partner; answer with on_push_result / on_push_failed."""

    peer: bytes
    records: tuple[Record, ...]


@dataclass(frozen=True, slots=True)
class Announce:
    """Tell the partner our heads ``(origin, feed, seq, head)`` (lazy push)."""

    peer: bytes
    heads: tuple[tuple[bytes, str, int, bytes], ...]


@dataclass(frozen=True, slots=True)
class Fetch:
    """Ask the partner for these ranges; feed the records to on_records(via=via), then
    call on_fetch_done."""

    peer: bytes
    wants: tuple[Want, ...]
    via: str


@dataclass(frozen=True, slots=True)
class Graft:
    """Ask the partner to push ``origin``'s records to us eagerly again."""

    peer: bytes
    origin: bytes


@dataclass(frozen=True, slots=True)
class SendSync:
    """A reconciliation message. ``initiator``: our session, send it as a request and
    feed the answer to on_sync(initiator=True); else it is the answer to the request
    the partner just made."""

    peer: bytes
    payload: bytes
    initiator: bool


@dataclass(frozen=True, slots=True)
class Lookup:
    """Read the record held at (origin, feed, seq); answer with on_lookup."""

    origin: bytes
    feed: str
    seq: int


@dataclass(frozen=True, slots=True)
class StoreProof:
    """Keep this fork or split-view proof."""

    origin: bytes
    feed: str
    seq: int
    kind: str
    proof: bytes
    source: bytes | None


@dataclass(frozen=True, slots=True)
class SendProof:
    peer: bytes
    proof: bytes
    refusals: int = 0


@dataclass(frozen=True, slots=True)
class SendCheckpoint:
    peer: bytes
    envelope: bytes
    refusals: int = 0


@dataclass(frozen=True, slots=True)
class SendHeld:
    """First good round with this partner since start: send it the latest checkpoint of
    each feed it may be sent and the proofs held (read from storage)."""

    peer: bytes


@dataclass(frozen=True, slots=True)
class WakeStreams:
    records: tuple[Record, ...]


@dataclass(frozen=True, slots=True)
class Rejected:
    """Count an item refused from ``peer`` (None: local) with this reason code."""

    peer: bytes | None
    reason: str
    detail: str


@dataclass(frozen=True, slots=True)
class ForkFound:
    origin: bytes
    feed: str
    seq: int
    kind: str


@dataclass(frozen=True, slots=True)
class Paused:
    feed: str
    reason: str


@dataclass(frozen=True, slots=True)
class Resumed:
    feed: str


@dataclass(frozen=True, slots=True)
class Confirmed:
    """A restored node's heads were confirmed by ``peer``'s first good round: own feeds
    may be signed on again (those still being fetched back stay paused). The durable
    "restored" mark stays until :class:`CaughtUp`."""

    peer: bytes


@dataclass(frozen=True, slots=True)
class CaughtUp:
    """A node that took back records of its own feeds from partners (restored, or a new
    database) has caught up: its heads were confirmed (when restored), every partner's
    first round since start ended and no claim on its own feeds is being fetched. The
    shell clears the durable "restored" mark. From now on a record of an own feed
    beyond its head is one it never signed (:class:`OwnForgery`)."""


@dataclass(frozen=True, slots=True)
class OwnForgery:
    """``peer`` (None: local) sent a record of our own ``feed`` at ``seq``, validly
    signed with our key, that this node never signed (it is beyond our head, and this
    node is not catching up on its own feeds): our signing key is in other hands.
    Refused (counted as ``own_forgery``); given once per feed each time the highest seq
    seen grows."""

    peer: bytes | None
    feed: str
    seq: int
    record_id: bytes


Action = (Store | Push | Announce | Fetch | Graft | SendSync | Lookup | StoreProof
          | SendProof | SendCheckpoint | SendHeld | WakeStreams | Rejected | ForkFound
          | Paused | Resumed | Confirmed | CaughtUp | OwnForgery)


# ---------------------------------------------------------------------------------------
# State


class RecentIds:
    """A bounded set of ids recently stored, so a copy arriving while the database is
    still being asked costs no signature verification.

    Two generations of plain sets, at most ``size`` ids in all: when the young one is
    full the old one is dropped whole. Half the memory of an ordered dict (no links, no
    values), O(1) per id, and an id stays for at least ``size // 2`` additions."""

    __slots__ = ("_half", "_keep_old", "_old", "_young")

    def __init__(self, size: int = 200_000) -> None:
        self._young: set[bytes] = set()
        self._old: set[bytes] = set()
        self._half = max(1, size // 2)
        self._keep_old = size >= 2  # a window of one keeps no old generation

    def add(self, rid: bytes) -> None:
        if len(self._young) >= self._half:
            self._old = self._young if self._keep_old else set()
            self._young = set()
        self._young.add(rid)

    def clear(self) -> None:
        self._young, self._old = set(), set()

    def __contains__(self, rid: object) -> bool:
        return rid in self._young or rid in self._old

    def __len__(self) -> int:
        return len(self._young) + len(self._old)


@dataclass
class _Session:
    diff: rc.Diff
    mine: rc.ChainSet
    rounds: int = 0


class PushQueue:
    """Records waiting to be pushed to one partner, one FIFO per origin, taken round-robin.

    A partner flooding its own valid records within quota must not delay everyone
    else's: one FIFO would relay its backlog to the next partner ahead of our own
    records and other origins'. Order within an origin is kept (a chain is pushed in
    sequence order); across origins each batch takes one record from each in turn.
    When full, the oldest record of the origin holding the most is dropped (the flood
    pays for the overflow, not the others)."""

    def __init__(self) -> None:
        self._by_origin: OrderedDict[bytes, deque[Record]] = OrderedDict()
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def __bool__(self) -> bool:
        return self._n > 0

    def append(self, r: Record) -> None:
        """Queue ``r`` behind its origin's records."""
        self._by_origin.setdefault(r.origin, deque()).append(r)
        self._n += 1

    def appendleft(self, r: Record) -> None:
        """Queue ``r`` ahead of its origin's records (a failed push sent again)."""
        q = self._by_origin.get(r.origin)
        if q is None:
            q = self._by_origin[r.origin] = deque()
            self._by_origin.move_to_end(r.origin, last=False)
        q.appendleft(r)
        self._n += 1

    def drop_one(self) -> None:
        """Drop the oldest record of the origin with the most queued (no-op if empty)."""
        if not self._n:
            return
        origin = max(self._by_origin, key=lambda o: len(self._by_origin[o]))
        q = self._by_origin[origin]
        q.popleft()
        self._n -= 1
        if not q:
            del self._by_origin[origin]

    def take(self, n: int) -> list[Record]:
        """Remove and return up to ``n`` records, one per origin in turn; the origins
        served last go to the back so that the next batch starts with the others."""
        out: list[Record] = []
        while self._n and len(out) < n:
            for origin in list(self._by_origin):
                if len(out) >= n:
                    break
                q = self._by_origin[origin]
                out.append(q.popleft())
                self._n -= 1
                if q:
                    self._by_origin.move_to_end(origin)
                else:
                    del self._by_origin[origin]
        return out


@dataclass
class _Partner:
    key: bytes
    view: PeerView = field(default_factory=PeerView)
    up: bool = True
    queue: PushQueue = field(default_factory=PushQueue)
    overflowed: bool = False
    in_flight: tuple[Record, ...] | None = None
    resent: set[bytes] = field(default_factory=set)  # ids pushed again after a failure
    retry_at: int = 0
    failures: int = 0
    lazy: set[bytes] = field(default_factory=set)
    grafted: set[bytes] = field(default_factory=set)
    announce: dict[FeedKey, tuple[int, bytes]] = field(default_factory=dict)
    graft_pending: dict[FeedKey, tuple[int, int, int]] = field(default_factory=dict)
    outbox: OrderedDict[bytes, tuple[str, bytes, int]] = field(default_factory=OrderedDict)
    next_sync: int = 0
    sync_due: int | None = None  # when the round now deferred was first due
    session: _Session | None = None
    answering: _Session | None = None
    answered: int = 0  # requests answered since answered_since (the answering budget)
    answered_since: int = -(1 << 62)
    first_done: bool = False  # a first round since start ended, well or not
    held_sent: bool = False  # a first round since start ended well (SendHeld given)
    hidden: set[bytes] | None = None


class Replica:
    """All replication state and decisions of one node. See the module docstring."""

    def __init__(self, config: ReplicaConfig) -> None:
        self.config = config
        self.me = config.self_key
        self.heads: dict[FeedKey, FeedHead] = {}
        #: The database was restored (from a backup, or copied back by hand): our own
        #: feeds may be behind what partners hold, and a failed first round proves
        #: nothing, so nothing is signed on them until every partner's good round has
        #: confirmed the heads (:class:`Confirmed`). See :meth:`mark_restored`.
        self.restored = False
        #: This node may lack records of its own feeds that partners hold (it was
        #: restored, or its database is new): it takes them back. Cleared when caught up
        #: (:class:`CaughtUp`). A node that is not adopting never stores a record of its
        #: own feed beyond its head: it did not sign it (:class:`OwnForgery`).
        self.adopting = False
        #: This process signs the node's own records (it leads the processes sharing a
        #: database; always, alone). One that does not leaves records of own feeds
        #: beyond its heads to the leader, which takes them back or judges them.
        self.signing = True
        #: feed -> (highest seq, partner, record id) of records of our own feeds signed
        #: with our key that this node never signed (evidence of a stolen key).
        self.own_forgeries: dict[str, tuple[int, bytes | None, bytes]] = {}
        self._probes: dict[str, int] = {}  # own feed -> claimed seq fetched as evidence
        self._awaiting: set[bytes] = set()  # partners that have not confirmed yet
        self._confirmed_by: bytes | None = None  # the last partner that did
        self.chains = rc.ChainSet()
        self.pending = PendingBuffer(config.pending_max_records, config.pending_max_bytes)
        self.quota = OriginQuota(config.quota_records_per_day, config.quota_bytes_per_day)
        self.inflight: set[bytes] = set()
        self._recent = RecentIds(config.recent_max)
        self.partners: dict[bytes, _Partner] = {}
        self.pushed_at: dict[FeedKey, int] = {}
        self.fetching: dict[FeedKey, tuple[bytes, int, int]] = {}  # key -> peer, to, until
        self.deferred: dict[FeedKey, tuple[bytes, int, int]] = {}  # key -> peer, seq, due
        # Chains whose fetched records were all refused (dated in the future, say): how
        # often in a row, and until when no fetch of them is asked (a back-off, not a
        # fetch and a refusal on every round). Cleared when the chain grows.
        self.stalled: dict[FeedKey, tuple[int, int]] = {}
        self._deferred_by: dict[bytes, int] = {}  # peer -> entries of deferred naming it
        self._lookups: dict[tuple[bytes, str, int], list[tuple[str, object, bytes | None]]]
        self._lookups = {}
        self.proofs: OrderedDict[bytes, None] = OrderedDict()
        self.forked: set[FeedKey] = set()
        self.own_forked: dict[str, int] = {}
        self.own_blocked: dict[str, str] = {}
        self._own_targets: dict[str, int] = {}
        # feed -> (peer, seq, head, failed fetches so far)
        self._own_claims: dict[str, tuple[bytes, int, bytes, int]] = {}
        self.cards: dict[bytes, frozenset[bytes]] = {}
        self._tree: set[bytes] | None = None
        self._origins: set[bytes] = set()
        self._last_push = -(1 << 62)  # when a push last extended a chain here

    # ------------------------------------------------------------------ queries

    def known(self, rid: bytes) -> bool:
        """Is this record id stored (recently) or being stored? Then skip verifying it."""
        return rid in self.inflight or rid in self._recent

    def head(self, key: FeedKey) -> FeedHead | None:
        return self.heads.get(key)

    def queued(self, peer: bytes) -> int:
        """Records waiting to be pushed to this partner (0 for one unknown)."""
        p = self.partners.get(peer)
        return len(p.queue) if p is not None else 0

    def frontier_for(self, peer: bytes) -> dict[FeedKey, tuple[int, bytes]]:
        """Our heads less the chains this partner may not be told of (legacy sync)."""
        return {k: (h.seq, h.id) for k, h in self.heads.items()
                if self.config.may_pass(peer, k[0], k[1])}

    def mark_restored(self) -> None:
        """This node's database was restored: refuse to sign on own feeds until EVERY
        partner has completed a good round with us (a failed round does not count).
        One is not enough: a partner that is up may be behind one that is down, which
        holds later records of ours. A partner added meanwhile must confirm too; one
        removed no longer counts. With no partner at all nothing can confirm: the
        operator decides (``--accept-fork-risk``)."""
        self.restored = True
        self.adopting = True
        self._awaiting = set(self.partners)

    def mark_catching_up(self) -> None:
        """This node may lack records of its own feeds (its database holds none: new, or
        lost and made again): it takes back what partners hold of them, until every
        partner's first round since start ended and no claim is being fetched
        (:class:`CaughtUp`). Publishing waits for those first rounds anyway."""
        self.adopting = True

    def own_key_changed(self) -> None:
        """This node signed a key event (a rotation or a recovery naming its own heads):
        records beyond those heads signed with the retired key are refused by the key
        log now, so the evidence kept of forgeries no longer stands for a live threat."""
        self.own_forgeries.clear()
        self._probes.clear()

    def awaiting_confirmation(self) -> list[bytes]:
        """Partners a restored node still waits for (empty when not restored)."""
        return sorted(self._awaiting) if self.restored else []

    def _confirm_if_done(self, out: list[Action]) -> None:
        if self.restored and not self._awaiting and self._confirmed_by is not None:
            self.restored = False
            out.append(Confirmed(self._confirmed_by))
        # The durable mark goes only once the records partners hold of our own feeds
        # are here: a restart meanwhile must still take them back, not refuse them.
        # Not with no partner at all: a database lost with its partner rows has nobody
        # to take its records back from yet; the partners the operator adds again do
        # (their copies of our records are ours, not forgeries).
        if (self.adopting and not self.restored and not self._own_claims
                and self.partners and not self.first_round_pending()):
            self.adopting = False
            out.append(CaughtUp())

    def first_round_pending(self) -> list[bytes]:
        """Partners whose first sync round since start has not ended (publishing waits)."""
        return [p.key for p in self.partners.values() if not p.first_done]

    def next_deadline(self) -> int | None:
        """The earliest time ``tick`` has something to do (None: nothing scheduled)."""
        times: list[int] = []
        for p in self.partners.values():
            if p.up and p.session is None:
                times.append(p.next_sync)
            if p.up and p.queue and p.in_flight is None:
                times.append(p.retry_at)
            times.extend(d for _s, d, _f in p.graft_pending.values())
        times.extend(d for _p, _s, d in self.deferred.values())
        times.extend(u for _p, _t, u in self.fetching.values())
        return min(times) if times else None

    # ------------------------------------------------------------------ setup

    def load(self, heads: Mapping[FeedKey, tuple[int, bytes]],
             forks: Iterable[tuple[bytes, str, int]] = ()) -> None:
        """State from storage at start: every chain's head, and the proofs held."""
        for key, (seq, hid) in heads.items():
            self._set_head(key, seq, hid)
        for origin, feed, seq in forks:
            self._note_fork(origin, feed, seq)

    def advance_heads(self, heads: Mapping[FeedKey, tuple[int, bytes]], now_ms: int
                      ) -> list[Action]:
        """Heads another process sharing the database committed (LISTEN/NOTIFY): each
        chain's head moves forward to it (never back: what this process has on its way
        is ahead of the database for a moment). The pending buffer follows: records
        at or below the new head leave it (a different record at a seq held is checked
        as a possible fork: a Lookup), and a pending run that now extends the chain is
        stored (a Store, as if it had just arrived)."""
        out: list[Action] = []
        to_store: list[Record] = []
        for key, (seq, hid) in heads.items():
            h = self.heads.get(key)
            if h is not None and h.seq >= seq:
                continue
            self._set_head(key, seq, hid)
            ready = self.pending.take_ready(key, seq, hid)
            for r in ready:
                if not self._charge(r, now_ms):
                    out.append(Rejected(None, "quota", "origin over its daily quota"))
                    break  # the rest is fetched again another day
                self.inflight.add(r.id)
                to_store.append(r)
                self._set_head(key, r.seq, r.id)
        self._check_conflicts(out)
        if to_store:
            out.insert(0, Store(tuple(to_store), False, None))
            self._release_own_blocks(out)
        return out

    def _check_conflicts(self, out: list[Action]) -> None:
        """Pending records found not to fit their chain: a possible fork is looked up."""
        for rec in self.pending.take_conflicts():
            h = self.heads.get((rec.origin, rec.feed))
            d = classify(rec, h, h.id if h and rec.seq == h.seq else None)
            if d.verdict is Verdict.EQUIVOCATION:
                self._ask_lookup(rec.origin, rec.feed, d.conflicts_with_seq or rec.seq,
                                 ("fork", rec, None), out)

    def rewind(self, records: Iterable[Record],
               stored: Mapping[FeedKey, tuple[int, bytes]]) -> None:
        """A Store of these records failed (the disk is full, say): they are no longer on
        their way, and their chains' heads go back to what storage holds (``stored``),
        or are forgotten where it holds none, so the next record signed or stored
        follows what is on disk."""
        keys = set()
        for r in records:
            self.inflight.discard(r.id)
            keys.add((r.origin, r.feed))
        for key in keys:
            if key in stored:
                self._set_head(key, *stored[key])
            elif key in self.heads:
                del self.heads[key]
                self.chains.remove(*key)

    def cut(self, key: FeedKey, head: tuple[int, bytes] | None) -> None:
        """Storage dropped chain ``key``'s records above ``head`` (records its origin's
        key log now refuses: a stolen key's, cut off by a recovery); the head goes back
        to ``head``, or the chain is forgotten (None). The ids recently stored are
        forgotten too (rare: a recovery): a copy of a dropped record arriving again is
        verified, and refused, not answered as a duplicate held."""
        self._recent.clear()
        if head is not None:
            self._set_head(key, *head)
        elif key in self.heads:
            del self.heads[key]
            self.chains.remove(*key)
        self._tree = None

    def add_partner(self, peer: bytes, first_sync_ms: int) -> None:
        """A new partner; the first round with it is due at ``first_sync_ms`` (call
        ``tick``)."""
        if peer not in self.partners:
            self.partners[peer] = _Partner(peer, next_sync=first_sync_ms)
            self._tree = None
            if self.restored:
                self._awaiting.add(peer)

    def remove_partner(self, peer: bytes) -> None:
        self.partners.pop(peer, None)
        self._awaiting.discard(peer)  # the next tick confirms if it was the last
        self._tree = None
        for key in [k for k, v in self.fetching.items() if v[0] == peer]:
            del self.fetching[key]

    def partner_up(self, peer: bytes, now_ms: int) -> list[Action]:
        p = self.partners.get(peer)
        if p is None or p.up:
            return []
        p.up, p.failures, p.retry_at = True, 0, now_ms
        p.next_sync = min(p.next_sync, now_ms)
        return self.tick(now_ms)

    def partner_down(self, peer: bytes) -> None:
        p = self.partners.get(peer)
        if p is None:
            return
        p.up = False
        if p.in_flight:
            self._requeue(p, p.in_flight)
            p.in_flight = None
        p.session = p.answering = None

    def on_card(self, node: bytes, partners: Iterable[bytes], now_ms: int) -> list[Action]:
        """A verified (and newer) node card: its partner list shapes the tree; records of
        that node we may have held back may now go on (a round with every partner), also
        when only its feeds changed (a feed it did not list, now listed)."""
        new = frozenset(partners)
        if self.cards.get(node) != new:
            self.cards[node] = new
            self._tree = None
        if node != self.me and node in self._origins:
            for p in self.partners.values():
                p.next_sync = min(p.next_sync, now_ms)
        return []

    def access_changed(self) -> None:
        """The access policy changed (cards, partners, config): recompute what each
        partner may be told of."""
        for p in self.partners.values():
            p.hidden = None

    # ------------------------------------------------------------------ internals

    def _set_head(self, key: FeedKey, seq: int, hid: bytes) -> None:
        self.stalled.pop(key, None)
        new = key not in self.heads
        self.heads[key] = FeedHead(seq, hid)
        self.chains.set(key[0], key[1], seq, hid)
        if new:
            self._origins.add(key[0])
            kb = rc.key_bytes(*key)
            for p in self.partners.values():
                if p.hidden is not None and not self.config.may_pass(p.key, *key):
                    p.hidden.add(kb)

    def _remember(self, rid: bytes) -> None:
        self._recent.add(rid)

    def _charge(self, rec: Record, now_ms: int) -> bool:
        if rec.origin == self.me or rec.feed == ERASURE_FEED:
            # An erasure request always passes the quota (small, each naming records
            # its origin published): refusing it would keep personal data here.
            return True
        return self.quota.allow(rec.origin, len(rec.body), now_ms)

    def _over_quota(self, key: FeedKey, now_ms: int) -> bool:
        """No record of this chain can be stored today: its origin is another node's,
        over its quota, and the chain is not its erasure requests (those always pass)."""
        return (key[0] != self.me and key[1] != ERASURE_FEED
                and self.quota.exhausted(key[0], now_ms))

    def _backoff(self, p: _Partner) -> int:
        return min(self.config.backoff_max_ms, 100 << min(p.failures, 16))

    def _tree_nbrs(self) -> set[bytes]:
        """Our neighbours in the spanning tree of mutual partnerships known from cards
        (our own partner set stands for our card). Every node computes the same tree
        from the same cards: per connected part, a breadth-first tree from its node of
        lowest ``SHA-256(key)``; each other node's parent is its neighbour one level
        up with the lowest hash. Shallow (about 2 log N hops across), so a record
        crosses it quickly."""
        if self._tree is None:
            adj = dict(self.cards)
            adj[self.me] = frozenset(self.partners)
            mutual = {a: [b for b in ps if a in adj.get(b, frozenset())]
                      for a, ps in adj.items()}
            rank = {a: hashlib.sha256(a).digest()[:8] for a in mutual}
            dist: dict[bytes, int] = {}
            for root in sorted(mutual, key=rank.__getitem__):
                if root in dist:
                    continue
                dist[root] = 0
                level = [root]
                while level:
                    nxt = []
                    for a in level:
                        for b in mutual[a]:
                            if b not in dist:
                                dist[b] = dist[a] + 1
                                nxt.append(b)
                    level = nxt

            def parent(v: bytes) -> bytes | None:
                up = [u for u in mutual.get(v, ()) if dist.get(u) == dist[v] - 1]
                return min(up, key=rank.__getitem__) if up else None

            mine = {v for v in mutual[self.me] if parent(v) == self.me}
            top = parent(self.me)
            if top is not None:
                mine.add(top)
            self._tree = mine
        return self._tree

    def _eager(self, p: _Partner, origin: bytes) -> bool:
        if origin in p.grafted:
            return True
        if origin in p.lazy:
            return False
        if self.config.tree and self.me in self.cards.get(p.key, frozenset()):
            return p.key in self._tree_nbrs()
        return True  # Plumtree: eager until pruned

    def _requeue(self, p: _Partner, recs: Sequence[Record]) -> None:
        # A push whose answer was lost may have landed: a duplicate answer to the resend
        # says nothing about another path, so it must not prune (bounded set).
        if len(p.resent) < self.config.push_queue_max:
            p.resent.update(r.id for r in recs)
        for r in reversed(recs):
            if len(p.queue) < self.config.push_queue_max:
                p.queue.appendleft(r)
            else:
                p.overflowed = True

    def _pump(self, p: _Partner, now_ms: int, out: list[Action]) -> None:
        if not p.up:
            return
        if p.announce:
            heads = tuple((k[0], k[1], s, h) for k, (s, h) in sorted(p.announce.items()))
            p.announce = {}
            for o, f, s, _h in heads:
                p.view.update((o, f), s)
            out.append(Announce(p.key, heads))
        if p.in_flight is not None or now_ms < p.retry_at:
            return
        batch: list[Record] = []
        while p.queue and len(batch) < self.config.push_batch:
            for r in p.queue.take(self.config.push_batch - len(batch)):
                if not p.view.knows((r.origin, r.feed), r.seq):
                    batch.append(r)
        if batch:
            p.in_flight = tuple(batch)
            out.append(Push(p.key, p.in_flight))

    def _want(self, peer: bytes, key: FeedKey, lo: int, hi: int, via: str, now_ms: int,
              out: list[Action],
              group: dict[tuple[bytes, str], list[Want]] | None = None) -> None:
        """Fetch ``lo..hi`` of a chain from ``peer`` unless a fetch of it is in flight.
        With ``group``, the want is collected there (see :meth:`_flush_wants`) instead of
        becoming a Fetch of its own."""
        if lo > hi:
            return
        if (key[0] != self.me and not self.config.trusted(key[0])) or \
                self._over_quota(key, now_ms):
            return  # not stored if it came: do not ask (pull again another day)
        f = self.fetching.get(key)
        if f is not None and f[2] > now_ms and f[1] >= hi:
            return
        stalled = self.stalled.get(key)
        if stalled is not None and now_ms < stalled[1]:
            # Its records were refused lately: asked again when the back-off ends.
            if self._may_defer(key, peer):
                self._defer(key, peer, hi, stalled[1])
            return
        # One answer holds at most ``batch`` records; on_fetch_done asks for the rest.
        self.fetching[key] = (peer, hi, now_ms + self.config.fetch_timeout_ms)
        want = Want(key[0], key[1], lo, min(hi, lo + self.config.batch - 1))
        if group is not None:
            group.setdefault((peer, via), []).append(want)
        else:
            out.append(Fetch(peer, (want,), via))

    def _stall(self, key: FeedKey, now_ms: int) -> int | None:
        """A fetch of ``key`` was answered but nothing of it was stored (refused: dated
        in the future, over quota, invalid): the next fetch waits settle_ms, doubling
        each time in a row, at most stall_max_ms (an hour by default: a payload refused
        is not fetched again every minute for ever). Bounded like deferred pulls."""
        n = self.stalled[key][0] + 1 if key in self.stalled else 0
        if key not in self.stalled and len(self.stalled) >= self.config.max_deferred:
            return None
        delay = min(self.config.settle_ms << min(n, 32), self.config.stall_max_ms)
        self.stalled[key] = (n, now_ms + delay)
        return now_ms + delay

    def _defer(self, key: FeedKey, peer: bytes, seq: int, due: int) -> None:
        old = self.deferred.get(key)
        if old is not None:
            self._deferred_by[old[0]] -= 1
        self.deferred[key] = (peer, seq, due)
        self._deferred_by[peer] = self._deferred_by.get(peer, 0) + 1

    def _undefer(self, key: FeedKey) -> None:
        old = self.deferred.pop(key, None)
        if old is not None:
            left = self._deferred_by[old[0]] - 1
            if left:
                self._deferred_by[old[0]] = left
            else:
                del self._deferred_by[old[0]]

    def _may_defer(self, key: FeedKey, peer: bytes) -> bool:
        """Room for a new deferred pull of ``key`` named by ``peer``: bounded overall and
        per partner, so one partner claiming endless chains crowds out no other."""
        return key in self.deferred or (
            len(self.deferred) < self.config.max_deferred
            and self._deferred_by.get(peer, 0) < self.config.max_deferred_per_peer)

    def _note_view(self, p: _Partner, key: FeedKey, seq: int) -> None:
        """Record that ``p`` holds ``key`` up to ``seq``: always for a chain held here
        (bounded by our own state), for another only if its origin is trusted and the
        partner's view has room (a claim is not evidence: made-up chains must not grow
        our state)."""
        if (key in self.heads or p.view.known(key)
                or (self.config.trusted(key[0])
                    and len(p.view) < len(self.heads) + self.config.max_view_unheld)):
            p.view.update(key, seq)

    def _flush_wants(self, group: dict[tuple[bytes, str], list[Want]],
                     out: list[Action]) -> None:
        """One Fetch per partner and purpose, of at most ``MAX_WANTS`` wants each."""
        for (peer, via), wants in group.items():
            for i in range(0, len(wants), MAX_WANTS):
                out.append(Fetch(peer, tuple(wants[i:i + MAX_WANTS]), via))

    # ------------------------------------------------------------------ records in

    def on_records(self, peer: bytes | None, records: Sequence[Record], now_ms: int,
                   via: str = "push") -> tuple[list[str], list[Action]]:
        """Place records the shell verified. Returns one outcome per record
        (``stored``, ``duplicate``, ``pending``, ``ignored``: ahead of its chain but not
        held, ``equivocation``: checked by a Lookup, or ``rejected:<reason>``) and the
        actions."""
        out: list[Action] = []
        outcomes: list[str] = []
        to_store: list[Record] = []
        p = self.partners.get(peer) if peer is not None else None
        gaps: set[FeedKey] = set()
        for rec in records:
            key = (rec.origin, rec.feed)
            if p is not None:
                # A node forwards only records it stores, and stores chains contiguously.
                self._note_view(p, key, rec.seq)
            if rec.id in self.inflight or rec.id in self._recent:
                outcomes.append("duplicate")
                continue
            if not self.config.trusted(rec.origin):
                outcomes.append("rejected:untrusted_origin")
                out.append(Rejected(peer, "untrusted_origin", "origin not trusted"))
                continue
            head = self.heads.get(key)
            if rec.origin == self.me and rec.seq > (head.seq if head is not None else 0):
                if not self.signing:
                    outcomes.append("ignored")  # the leader's to take back or refuse
                    continue
                if not self.adopting:
                    self._forgery(peer, rec, out)
                    outcomes.append("rejected:own_forgery")
                    continue
            # At our head the id is known: an old copy is a duplicate, not a Lookup.
            d = classify(rec, head, head.id if head and rec.seq == head.seq else None)
            if d.verdict is Verdict.EXTENDS:
                if not self._charge(rec, now_ms):
                    outcomes.append("rejected:quota")
                    out.append(Rejected(peer, "quota", "origin over its daily quota"))
                    continue
                self._extend(rec, to_store, now_ms, out)
                outcomes.append("stored")
                if via in ("push", "graft"):
                    self.pushed_at[key] = now_ms
                    self._last_push = now_ms
            elif d.verdict is Verdict.AHEAD:
                if self._over_quota(key, now_ms):
                    # It could never be stored today (its chain cannot extend), so it is
                    # not held: an origin flooding past its quota filled the shared
                    # pending buffer with such records (scripts/chaos.py, ``hostile``).
                    outcomes.append("rejected:quota")
                    out.append(Rejected(peer, "quota", "origin over its daily quota"))
                elif self.pending.add(rec, head_seq=head.seq if head else 0):
                    gaps.add(key)
                    outcomes.append("pending")
                else:
                    outcomes.append("ignored")  # too far ahead, or no room: pull brings it
            elif d.verdict is Verdict.DUPLICATE:
                outcomes.append("duplicate")
            else:
                self._ask_lookup(rec.origin, rec.feed, d.conflicts_with_seq or rec.seq,
                                 ("fork", rec, peer), out)
                outcomes.append("equivocation")
        self._check_conflicts(out)
        if to_store:
            out.insert(0, Store(tuple(to_store), False, peer))
            self._release_own_blocks(out)
        if peer is not None and gaps:
            for w in self.pending.missing():
                if w.key in gaps and self.config.trusted(w.origin):
                    self._want(peer, w.key, w.from_seq, w.to_seq, "gap", now_ms, out)
        return outcomes, out

    def _extend(self, rec: Record, to_store: list[Record], now_ms: int,
                out: list[Action]) -> None:
        key = (rec.origin, rec.feed)
        chain = [rec]
        for r in self.pending.take_ready(key, rec.seq, rec.id):
            if not self._charge(r, now_ms):
                out.append(Rejected(None, "quota", "origin over its daily quota"))
                break  # the rest is fetched again another day
            chain.append(r)
        for r in chain:
            self.inflight.add(r.id)
            to_store.append(r)
        last = chain[-1]
        self._set_head(key, last.seq, last.id)

    def on_committed(self, records: Sequence[Record], source: bytes | None,
                     now_ms: int) -> list[Action]:
        """The shell committed a Store: push to partners (eager or lazy), wake streams."""
        out: list[Action] = []
        for r in records:
            self.inflight.discard(r.id)
            self._remember(r.id)
        for p in self.partners.values():
            if p.key == source:
                continue
            for r in records:
                key = (r.origin, r.feed)
                if p.view.knows(key, r.seq) or not self.config.may_send(p.key, r):
                    continue
                if self._eager(p, r.origin):
                    if len(p.queue) >= self.config.push_queue_max:
                        p.queue.drop_one()
                        p.overflowed = True
                        p.next_sync = min(p.next_sync, now_ms)
                    p.queue.append(r)
                elif self.config.announce:
                    old = p.announce.get(key)
                    if old is None or old[0] < r.seq:
                        p.announce[key] = (r.seq, r.id)
            self._pump(p, now_ms, out)
        out.append(WakeStreams(tuple(records)))
        return out

    def on_push_result(self, peer: bytes, dup: Iterable[int], now_ms: int) -> list[Action]:
        """The partner took the Push in flight; ``dup``: indexes it already held. Those
        origins it gets through someone else: prune them to lazy (Plumtree)."""
        p = self.partners.get(peer)
        out: list[Action] = []
        if p is None or p.in_flight is None:
            return out
        batch, p.in_flight = p.in_flight, None
        p.failures = 0
        for r in batch:
            p.view.update((r.origin, r.feed), r.seq)
        for i in dup:
            if 0 <= i < len(batch) and batch[i].id not in p.resent:
                p.lazy.add(batch[i].origin)
                p.grafted.discard(batch[i].origin)
        if p.resent:
            p.resent.difference_update(r.id for r in batch)
        self._pump(p, now_ms, out)
        return out

    def on_push_failed(self, peer: bytes, now_ms: int) -> list[Action]:
        p = self.partners.get(peer)
        if p is None or p.in_flight is None:
            return []
        self._requeue(p, p.in_flight)
        p.in_flight = None
        p.failures += 1
        p.retry_at = now_ms + self._backoff(p)
        return []

    def on_push_busy(self, peer: bytes, retry_after_ms: int, now_ms: int) -> list[Action]:
        """The partner answered the Push in flight "busy, retry after" (a 429): it is up
        and refused nothing, so no failure is counted and no back-off grows; the batch
        goes again (first) once ``retry_after_ms`` (at least 100 ms) has passed."""
        p = self.partners.get(peer)
        if p is None or p.in_flight is None:
            return []
        self._requeue(p, p.in_flight)
        p.in_flight = None
        p.retry_at = now_ms + max(100, retry_after_ms)
        return []

    def on_announce(self, peer: bytes, heads: Mapping[FeedKey, tuple[int, bytes]],
                    now_ms: int) -> list[Action]:
        """A partner holds these heads. Where we are behind, give the eager path
        ``graft_delay_ms``, then fetch from this partner and graft it."""
        p = self.partners.get(peer)
        if p is None:
            return []
        for key, (seq, _h) in heads.items():
            if not self.config.may_pass(peer, key[0], key[1]):
                continue  # a chain this partner may not be told of: no claim taken
            self._note_view(p, key, seq)
            mine = self.heads.get(key)
            if (mine is not None and mine.seq >= seq) or key in p.graft_pending:
                continue
            if key[0] == self.me and not self.adopting:
                continue  # nothing of our own beyond our head is ours (see _consider)
            if not self.config.trusted(key[0]):
                continue
            if len(p.graft_pending) >= self.config.max_grafts:
                p.next_sync = min(p.next_sync, now_ms)  # many gaps: one round instead
                break
            p.graft_pending[key] = (seq, now_ms + self.config.graft_delay_ms, now_ms)
        return []

    def on_graft(self, peer: bytes, origin: bytes) -> None:
        """The partner asks for ``origin`` eagerly again. Kept for an origin held here,
        or a trusted one while the partner's grafts of origins not held stay under
        ``max_grafted`` (made-up origins must not grow our state)."""
        p = self.partners.get(peer)
        if p is None:
            return
        if origin not in self._origins and (
                not self.config.trusted(origin)
                or len(p.grafted) >= len(self._origins) + self.config.max_grafted):
            return
        p.lazy.discard(origin)
        p.grafted.add(origin)

    # ------------------------------------------------------------------ sync

    def _mine_for(self, p: _Partner) -> rc.ChainSet:
        if p.hidden is None:
            p.hidden = {rc.key_bytes(*k) for k in self.heads
                        if not self.config.may_pass(p.key, *k)}
        return self.chains.copy_without(p.hidden) if p.hidden else self.chains

    def _start_sync(self, p: _Partner, now_ms: int, out: list[Action]) -> None:
        mine = self._mine_for(p)
        p.session = _Session(rc.Diff(), mine)
        p.next_sync = now_ms + self.config.sync_interval_ms
        out.append(SendSync(p.key, rc.encode_message(rc.initial(mine)), True))

    def sync_now(self, peer: bytes, now_ms: int) -> list[Action]:
        """Start a round with this partner as soon as the spacing allows."""
        p = self.partners.get(peer)
        if p is not None:
            p.next_sync = min(p.next_sync, now_ms)
        return self.tick(now_ms)

    def pull_now(self, now_ms: int) -> list[Action]:
        """Fetch now every chain a round found missing, without waiting for the settle
        delay or for pushes extending it (a one-shot catch-up: nothing is on its way)."""
        out: list[Action] = []
        group: dict[tuple[bytes, str], list[Want]] = {}
        for key, (peer, seq, _due) in list(self.deferred.items()):
            self._undefer(key)
            h = self.heads.get(key)
            have = h.seq if h else 0
            if have < seq and peer in self.partners:
                via = "own" if key[0] == self.me else "sync"
                self._want(peer, key, have + 1, seq, via, now_ms, out, group)
        self._flush_wants(group, out)
        return out

    def on_sync(self, peer: bytes, data: bytes, now_ms: int, *, initiator: bool
                ) -> list[Action]:
        """A reconciliation message from ``peer``: the answer to our session's request
        (``initiator``) or a request of theirs (then the first action is the SendSync
        answer, always present; past ``max_answers_per_interval`` requests from this
        partner in one ``sync_interval_ms`` it is empty: nothing more). Raises
        :class:`EncodingError` / ``InvalidRecord`` for a malformed message (our session
        with it then ends)."""
        p = self.partners.get(peer)
        out: list[Action] = []
        if p is None:
            return out
        sess = p.session if initiator else p.answering
        if not initiator:
            # A session ends after max_session_rounds messages, but a partner could start
            # session after session: the answering side is bounded per partner too.
            if now_ms - p.answered_since >= self.config.sync_interval_ms:
                p.answered, p.answered_since = 0, now_ms
            if p.answered >= self.config.max_answers_per_interval:
                p.answering = None
                return [SendSync(peer, rc.encode_message([]), False),
                        Rejected(peer, "sync_budget", "too many reconciliation requests "
                                 "this sync interval: answered with nothing more")]
            p.answered += 1
        if sess is None:
            if initiator:
                return out  # a late answer to a session that ended
            sess = p.answering = _Session(rc.Diff(), self._mine_for(p))
        try:
            msg = rc.decode_message(data)
        except Exception:
            if initiator:
                p.session = None
            else:
                p.answering = None
            raise
        reply = rc.respond(sess.mine, msg, sess.diff)
        sess.rounds += 1
        learnt, sess.diff.theirs = sess.diff.theirs, {}
        if not initiator:
            out.append(SendSync(peer, rc.encode_message(reply), False))
            if not reply or sess.rounds >= self.config.max_session_rounds:
                p.answering = None
        self._consider(p, learnt, now_ms, out)
        if initiator:
            if reply and sess.rounds < self.config.max_session_rounds:
                out.append(SendSync(peer, rc.encode_message(reply), True))
            else:
                p.session = None
                self._round_done(p, now_ms, out)
        return out

    def on_sync_failed(self, peer: bytes, now_ms: int,
                       busy_ms: int | None = None) -> list[Action]:
        """Our round with this partner failed. ``busy_ms``: it answered "busy, retry
        after" (a 429): not a failure (no back-off grows), the next round is due then
        (at least 100 ms)."""
        p = self.partners.get(peer)
        if p is not None:
            p.session = None
            p.first_done = True
            if busy_ms is None:
                p.failures += 1
                p.next_sync = now_ms + self._backoff(p)
            else:
                p.next_sync = now_ms + max(100, busy_ms)
        return []

    def on_frontier(self, peer: bytes, frontier: Mapping[FeedKey, tuple[int, bytes]],
                    now_ms: int) -> list[Action]:
        """A partner's full frontier (the legacy sync request or answer): one round."""
        p = self.partners.get(peer)
        out: list[Action] = []
        if p is None:
            return out
        theirs = {k: v for k, v in frontier.items() if self.heads.get(k) != v}
        for key, (seq, _h) in frontier.items():
            if key not in theirs and self.config.may_pass(peer, key[0], key[1]):
                self._note_view(p, key, seq)  # the others: in _consider
        self._consider(p, theirs, now_ms, out)
        self._round_done(p, now_ms, out)
        return out

    def lacks_from(self, frontier: Mapping[FeedKey, tuple[int, bytes]]) -> bool:
        """Does a partner's frontier hold records (of origins we accept) that we lack?"""
        for key, (seq, _h) in frontier.items():
            mine = self.heads.get(key)
            if (mine is None or mine.seq < seq) and self.config.trusted(key[0]):
                return True
        return False

    def _consider(self, p: _Partner, theirs: Mapping[FeedKey, tuple[int, bytes]],
                  now_ms: int, out: list[Action]) -> None:
        """Act on the partner's chains that differ from ours: pull what we lack (after
        the settle delay), find forks, check our own feeds' safety."""
        group: dict[tuple[bytes, str], list[Want]] = {}
        for key, (seq, head) in theirs.items():
            if seq == 0:
                continue  # they hold none of it: they pull it themselves
            if not self.config.may_pass(p.key, key[0], key[1]):
                # A chain this partner may not be told of: acting on its claim (a pull
                # from our head, a fork check at an exact seq) would tell it our head.
                continue
            self._note_view(p, key, seq)
            mine = self.heads.get(key)
            mseq = mine.seq if mine else 0
            if key[0] == self.me:
                self._own_claim(p, key[1], seq, head, mseq, now_ms, out)
                if seq > mseq and not self.adopting:
                    continue  # nothing of it beyond our head is ours: not pulled
            if seq > mseq:
                if not self.config.trusted(key[0]) or self._over_quota(key, now_ms):
                    continue
                old = self.deferred.get(key)
                if not self._may_defer(key, p.key):
                    continue  # bounded: a partner claiming endless chains; a later round
                if old is None or old[1] < seq:
                    self._defer(key, p.key, seq, now_ms + self.config.settle_ms)
            elif key in self.forked:
                continue
            elif mine is not None and seq == mseq and head != mine.id:
                self._want(p.key, key, seq, seq, "fork", now_ms, out, group)
            elif seq < mseq:
                self._ask_lookup(key[0], key[1], seq, ("check", head, p.key), out)
        self._flush_wants(group, out)

    def _round_done(self, p: _Partner, now_ms: int, out: list[Action]) -> None:
        p.first_done = True
        if self.restored and p.key in self._awaiting:
            # This round compared every chain with the partner, ours included: any
            # later record of ours it holds is now an own claim being fetched (and
            # publishing on that feed stays paused until it is here).
            self._awaiting.discard(p.key)
            self._confirmed_by = p.key
        self._confirm_if_done(out)
        p.failures = 0
        p.overflowed = False
        if not p.held_sent:  # the first GOOD round: one that failed sent nothing
            p.held_sent = True
            out.append(SendHeld(p.key))
        for _ in range(min(len(p.outbox), self.config.outbox_per_round)):
            _k, (path, payload, refusals) = p.outbox.popitem(last=False)
            if path == PROOFS_PATH:
                out.append(SendProof(p.key, payload, refusals))
            else:
                out.append(SendCheckpoint(p.key, payload, refusals))
        group: dict[tuple[bytes, str], list[Want]] = {}
        for w in self.pending.missing()[:64]:
            self._want(p.key, w.key, w.from_seq, w.to_seq, "gap", now_ms, out, group)
        self._flush_wants(group, out)

    def on_fetch_done(self, peer: bytes, wants: Sequence[Want], got: int, now_ms: int,
                      *, failed: bool = False) -> list[Action]:
        """A Fetch ended with ``got`` records received. A full answer that did not reach
        the end of a want is asked again from where it stopped. ``failed``: the request
        itself failed (no answer): asked again after the settle delay, not a round later
        (an empty answer is not retried: the partner does not hold them, or withholds).
        A failed fetch of a claim on our own feed proves nothing: publishing on it stays
        paused and the fetch is retried (``own_fetch_retries`` times, then it stays
        paused until the records come or a new claim is answered); only an answer can
        show a claim false."""
        out: list[Action] = []
        group: dict[tuple[bytes, str], list[Want]] = {}
        for w in wants:
            f = self.fetching.get(w.key)
            target = w.to_seq
            if f is not None and f[0] == peer:
                del self.fetching[w.key]
                target = max(target, f[1])
            h = self.heads.get(w.key)
            have = h.seq if h else 0
            p = self.partners.get(peer)
            if w.origin == self.me and not self.adopting:
                # An evidence fetch (see _own_claim): a record shown was refused as a
                # forgery on arrival; none shown (an answer, not a failure) is a claim
                # the partner cannot back.
                if self._probes.pop(w.feed, None) is not None and not failed and got == 0:
                    out.append(Rejected(peer, "false_claim",
                                        f"claims our feed {w.feed!r} up to seq {w.to_seq} "
                                        "but does not show that record signed by us"))
                continue
            own = w.origin == self.me and w.feed in self._own_claims
            if own and failed:
                self._own_fetch_failed(w.feed, peer, target, have, now_ms)
                continue
            if got > 0 and not failed and have < w.from_seq and p is not None and not own:
                # An answer, none of it stored: asked again when the back-off ends.
                until = self._stall(w.key, now_ms)
                if until is not None and self._may_defer(w.key, peer):
                    self._defer(w.key, peer, target, until)
                continue
            if (p is not None and failed and have < target and w.key not in self.deferred
                    and self._may_defer(w.key, peer)):
                self._defer(w.key, peer, target, now_ms + self.config.settle_ms)
            if p is not None and got > 0:
                if w.from_seq <= have < target:
                    via = "own" if w.origin == self.me else "sync"
                    self._want(peer, w.key, have + 1, target, via, now_ms, out, group)
                elif have >= w.from_seq and w.origin not in p.grafted and w.origin != self.me:
                    # The eager path did not bring these: this partner will push them.
                    out.append(Graft(peer, w.origin))
            if own and not failed:
                self._check_claim(w.feed, out)
        self._flush_wants(group, out)
        return out

    # ------------------------------------------------------------------ own feeds

    def _forgery(self, peer: bytes | None, rec: Record, out: list[Action]) -> None:
        """``rec``, of our own feed beyond our head, reached a node that is not catching
        up on its own feeds: signed with our key, and not held here. Refused and kept as
        evidence, and nothing more is signed on that feed (:meth:`check_publish`): from
        here the node cannot tell a thief's record from one of its own that a rollback
        of its data dir (a snapshot, a copy) lost, and signing that seq again would fork
        its feed either way. A recovery (the key was stolen) or a start with
        ``--restored`` (the data was rolled back: its records are taken back) ends it."""
        out.append(Rejected(peer, "own_forgery",
                            f"a record of this node's own feed {rec.feed!r} at seq "
                            f"{rec.seq}, signed with its key, that it never signed (its "
                            "head there is lower): the key may be stolen"))
        old = self.own_forgeries.get(rec.feed)
        if old is None or old[0] < rec.seq:
            if old is None and len(self.own_forgeries) >= self.config.max_grafts:
                return  # bounded: the evidence of a few feeds says enough
            self.own_forgeries[rec.feed] = (rec.seq, peer, rec.id)
            out.append(OwnForgery(peer, rec.feed, rec.seq, rec.id))

    def _own_claim(self, p: _Partner, feed: str, seq: int, head: bytes, have: int,
                   now_ms: int, out: list[Action]) -> None:
        if have >= seq:
            return
        if not self.adopting:
            # We hold every record we signed (unless rolled back unnoticed): a claim
            # beyond our head is either false or records signed with our key elsewhere.
            # The claimed record alone is fetched, as signed evidence either way (shown,
            # it stops signing on that feed: _forgery).
            seen = self.own_forgeries.get(feed)
            if (seen is not None and seen[0] >= seq) or self._probes.get(feed, 0) >= seq:
                return
            if len(self._probes) >= self.config.max_grafts and feed not in self._probes:
                return  # bounded; a later round asks again
            self._probes[feed] = seq
            out.append(Fetch(p.key, (Want(self.me, feed, seq, seq),), "own"))
            return
        claim = self._own_claims.get(feed)
        if self._own_targets.get(feed, 0) >= seq and (
                claim is None or claim[3] <= self.config.own_fetch_retries):
            return  # being fetched (a claim whose retries ran out is asked again)
        why = (f"feed {feed!r}: partner {self.config.name_of(p.key)} holds our records up "
               f"to seq {seq} but this node "
               f"has only {have} (restored from an old backup?): fetching them before "
               "publishing again, to never sign two records with one seq")
        if feed not in self.own_blocked:
            out.append(Paused(feed, why))
        self.own_blocked[feed] = why
        self._own_targets[feed] = seq
        self._own_claims[feed] = (p.key, seq, head, 0)
        self._want(p.key, (self.me, feed), have + 1, seq, "own", now_ms, out)

    def _own_fetch_failed(self, feed: str, peer: bytes, target: int, have: int,
                          now_ms: int) -> None:
        """A fetch of a claim on our own feed got no answer: silence proves nothing, so
        the feed stays paused; asked again after the settle delay, a bounded number of
        times (then the feed stays paused: never resumed on silence)."""
        cpeer, seq, head, tries = self._own_claims[feed]
        tries += 1
        self._own_claims[feed] = (cpeer, seq, head, tries)
        key = (self.me, feed)
        if have >= target or peer not in self.partners:
            return
        if tries <= self.config.own_fetch_retries:
            # Own-feed safety is not subject to the deferred caps.
            self._defer(key, peer, target, now_ms + self.config.settle_ms)

    def _check_claim(self, feed: str, out: list[Action]) -> None:
        peer, seq, head, _tries = self._own_claims[feed]
        h = self.heads.get((self.me, feed))
        have = h.seq if h else 0
        if have > seq or (h is not None and have == seq and h.id == head):
            del self._own_claims[feed]
            self._release_own_blocks(out)
            self._confirm_if_done(out)
            return
        if have < seq and self.fetching.get((self.me, feed)) is None:
            del self._own_claims[feed]
            out.append(Rejected(peer, "false_claim",
                                f"claims our feed {feed!r} up to seq {seq} but does not "
                                "show that record signed by us"))
            self._own_targets[feed] = have
            self._release_own_blocks(out)
            self._confirm_if_done(out)

    def _release_own_blocks(self, out: list[Action]) -> None:
        for feed in list(self.own_blocked):
            mine = self.heads.get((self.me, feed))
            have = mine.seq if mine else 0
            if have >= self._own_targets.get(feed, 0):
                del self.own_blocked[feed]
                out.append(Resumed(feed))

    def check_publish(self, feed: str) -> None:
        """Raise :class:`PublishRefused` if own-feed safety forbids signing on ``feed``:
        a proof that it forked, a partner holding later records of it, or a partner
        whose first round since start has not ended."""
        if feed in self.own_forked:
            raise PublishRefused(
                f"feed {feed!r} of this node has forked: it signed two different histories "
                f"at seq {self.own_forked[feed]} (`citynode forks` shows the proof, and its "
                "partners hold it too). Nothing more is signed on it: publish on a new feed "
                "name, and tell the partner cities why")
        if feed in self.own_blocked:
            raise PublishRefused(self.own_blocked[feed])
        if feed in self.own_forgeries:
            seq = self.own_forgeries[feed][0]
            raise PublishRefused(
                f"feed {feed!r}: a partner showed a record of it at seq {seq}, signed with "
                "this node's key, beyond what this node holds. Either this node's data was "
                "rolled back (a snapshot, a copy): restart it with `citynode run "
                "--restored` to take its records back; or its key is stolen: run "
                "`citynode key recover` naming its own heads. Nothing is signed on this "
                "feed until then (signing that seq again would fork it)")
        if self.restored:
            waiting = ", ".join(self.config.name_of(k) for k in sorted(self._awaiting))
            raise PublishRefused(
                f"feed {feed!r}: this node's database was restored (from a backup or a "
                "copy): it may hold fewer of its own records than its partners do, so it "
                "signs nothing on its own feeds until every partner has confirmed its heads"
                + (f" (still waiting for {waiting})" if waiting else " (it has no partner)")
                + ". Wait for them to be reachable, or, if none of them holds any record "
                "of this node that this copy lacks, start it with --accept-fork-risk")
        late = self.first_round_pending()
        if late:
            raise PublishRefused(
                f"publishing waits for the first exchange with {len(late)} partner(s) "
                "since start, so as never to re-sign a seq a partner already holds (as "
                "after a restore from a backup): retry in a moment")

    def next_link(self, feed: str) -> tuple[int, bytes | None]:
        """(seq, prev) the next record of our ``feed`` must carry."""
        h = self.heads.get((self.me, feed))
        return (h.seq + 1, h.id) if h else (1, None)

    def publish(self, records: Sequence[Record], now_ms: int) -> list[Action]:
        """Records of our own feed, signed by the shell at :meth:`next_link`: advance the
        head and store them durably. Raises :class:`PublishRefused` (see
        :meth:`check_publish`) or :class:`ChainError` if they do not extend the feed."""
        if not records:
            return []
        feed = records[0].feed
        self.check_publish(feed)
        seq, prev = self.next_link(feed)
        for r in records:
            if r.origin != self.me or r.feed != feed or r.seq != seq or r.prev != prev:
                raise ChainError("published records must extend our feed in order")
            seq, prev = seq + 1, r.id
        for r in records:
            self.inflight.add(r.id)
        self._set_head((self.me, feed), records[-1].seq, records[-1].id)
        return [Store(tuple(records), True, None)]

    # ------------------------------------------------------------------ forks, proofs

    def _ask_lookup(self, origin: bytes, feed: str, seq: int,
                    purpose: tuple[str, object, bytes | None], out: list[Action]) -> None:
        k = (origin, feed, seq)
        waiting = self._lookups.get(k)
        if waiting is None:
            if len(self._lookups) >= 1000:
                return  # bounded: the next round finds it again
            self._lookups[k] = [purpose]
            out.append(Lookup(origin, feed, seq))
        elif len(waiting) < 16:
            waiting.append(purpose)

    def on_lookup(self, origin: bytes, feed: str, seq: int, held: Record | None,
                  now_ms: int) -> list[Action]:
        """The record held at (origin, feed, seq), or None."""
        out: list[Action] = []
        for kind, item, peer in self._lookups.pop((origin, feed, seq), []):
            if held is None:
                continue
            if kind == "fork" and isinstance(item, Record) and held.id != item.id:
                self._fork(held, item, peer, out)
            elif kind == "check" and held.id != item and peer in self.partners:
                self._want(peer, (origin, feed), seq, seq, "fork", now_ms, out)
        return out

    def _fork(self, a: Record, b: Record, source: bytes | None, out: list[Action]) -> None:
        if a.origin != b.origin or a.feed != b.feed or a.id == b.id:
            return
        lo, hi = (a, b) if a.seq <= b.seq else (b, a)
        if lo.seq != hi.seq and not (hi.seq == lo.seq + 1 and hi.prev != lo.id):
            return
        proof, at = canonical_fork_proof(a, b)
        self._proof(a.origin, a.feed, at, "fork", proof.encode(), source, out, echo=True)

    def _proof(self, origin: bytes, feed: str, seq: int, kind: str, enc: bytes,
               source: bytes | None, out: list[Action], *, echo: bool) -> bool:
        # One proof of a kind per (origin, feed, seq) is news; another of the same point
        # (an origin signing conflicting statements of one size again and again) proves
        # nothing more: not stored, forwarded or reported again.
        h = hashlib.sha256(b"\0".join([origin, feed.encode(), str(seq).encode(),
                                        kind.encode()])).digest()
        if h in self.proofs:
            return False
        self.proofs[h] = None
        if len(self.proofs) > 100_000:
            self.proofs.popitem(last=False)
        self._note_fork(origin, feed, seq)
        out.append(StoreProof(origin, feed, seq, kind, enc, source))
        out.append(ForkFound(origin, feed, seq, kind))
        for p in self.partners.values():
            if (echo or p.key != source) and self.config.may_pass(p.key, origin, feed):
                out.append(SendProof(p.key, enc))
        return True

    def unfork(self, origin: bytes, feed: str, still: Iterable[int] = ()) -> None:
        """The proofs held against (``origin``, ``feed``) no longer hold (a key event of
        the origin settled the retired key's window they were in): the feed is not
        forked any more, unless proofs at the seqs ``still`` remain. Our own feed:
        publishing on it resumes."""
        self.forked.discard((origin, feed))
        if origin == self.me:
            self.own_forked.pop(feed, None)
        for seq in still:
            self._note_fork(origin, feed, seq)

    def _note_fork(self, origin: bytes, feed: str, seq: int) -> None:
        self.forked.add((origin, feed))
        if origin == self.me:
            self.own_forked[feed] = min(seq, self.own_forked.get(feed, seq))

    def on_proof(self, peer: bytes | None, origin: bytes, feed: str, seq: int, kind: str,
                 proof: bytes) -> list[Action]:
        """A fork or split-view proof the shell verified (``proof`` in canonical form):
        keep and forward it if new. Raises :class:`InvalidProof` for an origin we do not
        trust (proofs about strangers are no business of ours)."""
        if not self.config.trusted(origin):
            raise InvalidProof("proof about an origin this node does not trust")
        out: list[Action] = []
        self._proof(origin, feed, seq, kind, proof, peer, out, echo=False)
        return out

    def on_checkpoint(self, peer: bytes | None, origin: bytes, feed: str, envelope: bytes
                      ) -> list[Action]:
        """A checkpoint new here (verified and stored by the shell): forward it to the
        other partners that may be told of the feed (our own: to every partner)."""
        return [SendCheckpoint(p.key, envelope) for p in self.partners.values()
                if p.key != peer and (origin == self.me
                                      or self.config.may_pass(p.key, origin, feed))]

    def on_deliver_failed(self, peer: bytes, kind: str, payload: bytes, refusals: int
                          ) -> None:
        """A SendProof (``kind`` "proof") or SendCheckpoint did not land: keep it for
        after the next good round, unless refused ``outbox_refusals`` times."""
        p = self.partners.get(peer)
        if p is None or refusals >= self.config.outbox_refusals:
            return
        path = PROOFS_PATH if kind == "proof" else CHECKPOINTS_PATH
        k = hashlib.sha256(path.encode() + b"\0" + payload).digest()
        p.outbox[k] = (path, payload, refusals)
        while len(p.outbox) > self.config.outbox_max:
            p.outbox.popitem(last=False)

    # ------------------------------------------------------------------ timers

    def tick(self, now_ms: int) -> list[Action]:
        """Do what is due at ``now_ms``: sync rounds, grafts, settled pulls, retries."""
        out: list[Action] = []
        self._confirm_if_done(out)  # a restored node whose last awaited partner was removed
        for key, (_peer, _to, until) in list(self.fetching.items()):
            if until <= now_ms:
                del self.fetching[key]
        group: dict[tuple[bytes, str], list[Want]] = {}
        for key, (peer, seq, due) in list(self.deferred.items()):
            if due > now_ms:
                continue
            h = self.heads.get(key)
            have = h.seq if h else 0
            if have >= seq or peer not in self.partners:
                self._undefer(key)
                continue
            pushed = self.pushed_at.get(key)
            if pushed is not None and now_ms - pushed < self.config.flowing_ms:
                self.deferred[key] = (peer, seq, pushed + self.config.flowing_ms)
                continue
            self._undefer(key)
            via = "own" if key[0] == self.me else "sync"
            self._want(peer, key, have + 1, seq, via, now_ms, out, group)
        for p in self.partners.values():
            for key, (seq, due, since) in list(p.graft_pending.items()):
                if due > now_ms:
                    continue
                h = self.heads.get(key)
                have = h.seq if h else 0
                if have >= seq:
                    del p.graft_pending[key]
                    continue
                pushed = self.pushed_at.get(key)
                if (now_ms - since < self.config.graft_patience_ms and pushed is not None
                        and now_ms - pushed <= self.config.graft_delay_ms):
                    p.graft_pending[key] = (seq, now_ms + self.config.graft_delay_ms, since)
                    continue
                del p.graft_pending[key]
                self._want(p.key, key, have + 1, seq, "graft", now_ms, out, group)
                out.append(Graft(p.key, key[0]))
        self._flush_wants(group, out)
        for p in self.partners.values():
            if not p.up:
                continue
            if p.session is None and p.next_sync <= now_ms:
                since = p.next_sync if p.sync_due is None else p.sync_due
                if (now_ms - self._last_push < self.config.settle_ms
                        and now_ms - since < 2 * self.config.sync_interval_ms
                        and not p.overflowed and p.first_done):
                    # Records are arriving by push: a round now would find differences
                    # that are on their way. Wait for the wave to pass (an interval at
                    # most: a round still happens at least every second interval).
                    p.sync_due = since
                    p.next_sync = max(now_ms + 1, self._last_push + self.config.settle_ms)
                else:
                    p.sync_due = None
                    self._start_sync(p, now_ms, out)
            self._pump(p, now_ms, out)
        return out
