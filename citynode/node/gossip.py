"""Gossip: the shell around the replica (:mod:`citynode.core.replica`).

The replica holds all replication state and makes every decision -- what to store,
push, announce, fetch, graft, reconcile and forward. This role only carries out its
actions and feeds it what happened:

* one timer task (:meth:`Gossip.run`) sleeps until the replica's next deadline (or a
  wake-up), then runs ``tick`` and carries out what is due;
* each action that talks to a partner runs as a task of its own (push, announce, graft,
  fetch, a reconciliation request, a checkpoint or proof), and reports its outcome back
  to the replica (``on_push_result``, ``on_fetch_done``, ``on_sync`` ...);
* the partner routes of the HTTP layer call :meth:`on_reconcile`, :meth:`on_frontier`,
  :meth:`on_announce`, :meth:`on_graft` and :meth:`serve_fetch`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from citynode.config import Config
from citynode.core import replica as rp
from citynode.core import sync
from citynode.core.chain import ForkProof
from citynode.core.records import (
    Record,
    decode_record,
    parse_body,
    stored_record,
)
from citynode.errors import AccessDenied, CitynodeError, InvalidProof, PeerError, PeerRejected
from citynode.logs import fields
from citynode.metrics import Metrics
from citynode.node._base import Spawn, in_thread
from citynode.node.checkpoints import Checkpoints
from citynode.node.ingest import Ingest
from citynode.node.partners import PartnerLink, Partners
from citynode.node.policy import Policy
from citynode.node.publishing import Publisher
from citynode.storage import Storage

__all__ = ["CATCHING_UP", "Gossip", "Progress", "replica_config"]

log = logging.getLogger("citynode.node")

#: Meta key: this node takes back records of its own feeds that partners hold (its
#: database held none at a start, or it was restored and started with
#: --accept-fork-risk) until it caught up; empty once caught up. (The "restored" mark
#: covers a restore: it goes at the same moment.)
CATCHING_UP = "own-catching-up"

Progress = Callable[[int, int], None]

#: How many (partner, origin) card-history requests are remembered (to ask once each).
MAX_HISTORY_ASKED = 10_000
#: A partner answered 429 without a (readable) Retry-After: wait this long.
BUSY_DEFAULT_MS = 1000

#: The shortest sleep of the timer task: a deadline already past never spins it.
MIN_TICK = 0.005


def replica_config(config: Config, self_key: bytes, policy: Callable[[], Policy],
                   name_of: Callable[[bytes], str]) -> rp.ReplicaConfig:
    """node.toml's ``[federation]`` and ``[limits]`` as the replica's settings, with the
    trust and access policies read live from ``policy()`` (the node's policy role), and
    partners named in messages by ``name_of``."""
    fed, lim = config.federation, config.limits
    return rp.ReplicaConfig(
        self_key=self_key,
        trusted=lambda origin: policy().trust_check()(origin),
        may_send=lambda peer, rec: policy().may_send(peer, rec),
        may_pass=lambda peer, origin, feed: policy().may_pass(peer, origin, feed),
        name_of=name_of,
        quota_records_per_day=fed.origin_quota_records_per_day,
        quota_bytes_per_day=fed.origin_quota_bytes_per_day,
        pending_max_records=lim.pending_max_records,
        pending_max_bytes=lim.pending_max_bytes,
        push_batch=fed.push_batch,
        push_queue_max=fed.push_queue_max,
        batch=lim.max_batch_records,
        sync_interval_ms=int(fed.pull_interval_seconds * 1000),
        backoff_max_ms=int(fed.backoff_max_seconds * 1000),
        announce=False,
        tree=True,
    )


class Gossip:
    """Carry out the replica's actions; feed it their outcomes and the partners'
    messages."""

    def __init__(self, *, config: Config, replica: rp.Replica, policy: Policy,
                 partners: Partners, ingest: Ingest, publisher: Publisher,
                 checkpoints: Checkpoints, storage: Storage, metrics: Metrics,
                 now_ms: Callable[[], int], spawn: Spawn) -> None:
        self.config = config
        self.replica = replica
        self.policy = policy
        self.partners = partners
        self.ingest = ingest
        self.publisher = publisher
        self.checkpoints = checkpoints
        self.storage = storage
        self.metrics = metrics
        self.now_ms = now_ms
        self.spawn = spawn
        # The timer task's sleep (see run), and a wake-up that came while it was awake.
        self._waiter: asyncio.Future[None] | None = None
        self._woken = False
        # Off for a one-shot catch-up: records fetched are not pushed on, nothing is sent
        # but the requests of the catch-up itself.
        self.serving = True
        self._stopped = False
        self._cards_at: dict[bytes, float] = {}  # partner -> when its cards were fetched
        self._cards_busy: set[bytes] = set()  # partners whose cards are being fetched
        self._cards_again: set[bytes] = set()  # ... and asked for again meanwhile
        # (partner, origin) -> the oldest record time we asked its card history for.
        self._history_asked: dict[tuple[bytes, bytes], int] = {}
        #: Records committed: wake the streams and listeners (the node's).
        self.on_wake: Callable[[Sequence[Record]], None] = lambda records: None

    def committed(self, records: Sequence[Record], source: PartnerLink | None) -> None:
        """A Store is committed: the replica pushes, announces, wakes streams."""
        self.act(self.replica.on_committed(records, source.key if source else None,
                                           self.now_ms()))
        if source is not None and records:
            oldest: dict[bytes, int] = {}
            for r in records:
                if r.time < oldest.get(r.origin, r.time + 1):
                    oldest[r.origin] = r.time
            for origin, t in oldest.items():
                self.history_wanted(source, origin, t)

    def history_wanted(self, source: PartnerLink, origin: bytes, t: int) -> None:
        """Records of ``origin`` signed at ``t`` came from ``source`` (committed, or
        tombstones refused for want of the retention in force then): ask ``source`` for
        the origin's card history if no card of that time is held. Once per partner and
        origin, again only for older records (bounded)."""
        asked = self._history_asked.get((source.key, origin))
        if (asked is None or t < asked) and origin != self.policy.public_key \
                and not self._stopped:
            if len(self._history_asked) >= MAX_HISTORY_ASKED:
                self._history_asked.clear()  # bounded: at worst, asked again
            self._history_asked[(source.key, origin)] = t
            self.spawn(self._fetch_history(source, origin, t), "card-history")

    async def _fetch_history(self, link: PartnerLink, origin: bytes, time_ms: int) -> None:
        """Issue 13: records of ``origin`` from ``link`` older than every card of it held
        (we learnt the origin later) would show unknown terms: fetch the origin's card
        history from that partner, verify each card as the origin's, keep them. Asked
        once per partner and origin, again only for still older records."""
        if not await self.policy.lacks_history(origin, time_ms):
            return
        try:
            envs = await link.client.card_history(self.policy.name(origin))
        except PeerError as exc:
            log.info("card history not fetched", extra=fields(
                partner=link.row.name, origin=self.policy.name(origin), error=str(exc)))
            return
        n = await self.policy.learn_history(origin, envs)
        log.debug("card history fetched", extra=fields(
            partner=link.row.name, origin=self.policy.name(origin), cards=n))

    # ------------------------------------------------------------------ the timer task

    def stop(self) -> None:
        """The node is stopping: no new request to a partner starts (those under way are
        the node's to cancel)."""
        self.serving = False
        self._stopped = True

    def wake(self) -> None:
        """The replica's deadlines may have changed: the timer task looks again."""
        waiter = self._waiter
        if waiter is None:
            self._woken = True  # (the timer task is ticking: it looks before sleeping)
        elif not waiter.done():
            waiter.set_result(None)

    async def run(self) -> None:
        """The one timer task: sleep until the replica's next deadline or a wake-up,
        then carry out what is due. Until cancelled.

        It sleeps on a bare future, which :meth:`wake` completes, and one timer handle,
        moved only when the deadline moves: every commit wakes it (``asyncio.wait_for``
        on an Event started a task and a timer per wake-up, a measurable share of a
        record pushed live: scripts/bench-ingest --batch 1)."""
        loop = asyncio.get_running_loop()
        timer: asyncio.TimerHandle | None = None
        try:
            while not self._stopped:
                deadline = self.replica.next_deadline()
                delay = None if deadline is None else max(
                    MIN_TICK, (deadline - self.now_ms()) / 1000)
                cards = self._refresh_due()
                if cards is not None:
                    delay = max(MIN_TICK, cards) if delay is None else min(
                        delay, max(MIN_TICK, cards))
                if not self._woken:
                    waiter: asyncio.Future[None] = loop.create_future()
                    at = None if delay is None else loop.time() + delay
                    if timer is not None and (at is None or abs(timer.when() - at) > 0.001):
                        timer.cancel()
                        timer = None
                    if at is not None and timer is None:
                        timer = loop.call_at(at, self._timer_fired)
                    self._waiter = waiter
                    try:
                        await waiter
                    finally:
                        self._waiter = None
                if timer is not None and timer.when() <= loop.time():
                    timer = None  # (it fired, or is about to: a new one is set)
                try:
                    self.act(self.replica.tick(self.now_ms()))
                except Exception:  # a bug must not stop replication
                    log.exception("replica tick failed")
                    await asyncio.sleep(1)
                # Cleared after the tick (no await since it ran): its own wake-up is not
                # one, the next deadline is read afresh.
                self._woken = False
        finally:
            if timer is not None:
                timer.cancel()

    def _timer_fired(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _refresh_due(self) -> float | None:
        """Start a card refresh with every partner whose cards are an interval old (a
        newer card changes trust and access: learnt whether or not rounds run, as they
        wait while pushes flow); return the seconds until the next one is due."""
        interval = self.config.federation.pull_interval_seconds
        now = time.monotonic()
        nxt: float | None = None
        for link in list(self.partners.links.values()):
            if self._stopped:
                break
            last = self._cards_at.get(link.key)
            if last is None:
                continue  # the first round with it fetches them, before reconciling
            due = last + interval - now
            if due <= 0 and self.serving:
                self._cards_at[link.key] = now
                self.spawn(self._refresh_cards(link, force=True), "cards")
                due = interval
            nxt = due if nxt is None else min(nxt, due)
        return nxt

    # ------------------------------------------------------------------ partners

    def link_opened(self, link: PartnerLink) -> None:
        """A partner link opened: the replica syncs with it at once."""
        now = self.now_ms()
        # A one-shot catch-up runs its rounds itself, one partner after the other.
        self.replica.add_partner(link.key, now if self.serving else now + (1 << 40))
        self.replica.access_changed()
        self.wake()

    def link_closed(self, link: PartnerLink) -> None:
        self.replica.remove_partner(link.key)
        self.replica.access_changed()
        self._cards_at.pop(link.key, None)

    def sync_now(self, link: PartnerLink) -> None:
        """A sync round with this partner as soon as the spacing allows."""
        self.act(self.replica.sync_now(link.key, self.now_ms()))

    def card_learnt(self, node: bytes, partners: frozenset[bytes]) -> None:
        self.act(self.replica.on_card(node, partners, self.now_ms()))
        self.wake()

    def _failed(self, link: PartnerLink, exc: PeerError) -> int | None:
        """A request to this partner failed. A 429 is "busy, retry after": the partner
        is up and refused nothing, so it is not marked down; the milliseconds to wait
        (its Retry-After, else BUSY_DEFAULT_MS) are returned. Anything else marks it
        down and returns None."""
        if isinstance(exc, PeerRejected) and exc.status == 429:
            if exc.retry_after_s is None:
                return BUSY_DEFAULT_MS
            return int(exc.retry_after_s * 1000)
        self._mark(link, False, str(exc))
        return None

    def _mark(self, link: PartnerLink, ok: bool, err: str | None = None) -> None:
        was_up = link.up
        self.partners.mark(link, ok, err)
        if ok and not was_up:
            self.act(self.replica.partner_up(link.key, self.now_ms()))

    # ------------------------------------------------------------------ actions

    def act(self, actions: Sequence[rp.Action]) -> None:
        """Carry out actions from a synchronous caller: what needs awaiting (a store, a
        lookup, a proof kept) runs in a task, in order. (The call that returned them
        may have moved a deadline: the timer task looks again.)"""
        self.wake()
        if not actions:
            return
        slow = [a for a in actions if isinstance(a, rp.Store | rp.Lookup | rp.StoreProof)]
        # A Store's write is queued first and now (the replica already moved the heads):
        # writes reach the writer in the order the heads moved.
        waits = [self._store(a) if isinstance(a, rp.Store) else None for a in slow]
        for a in actions:
            if not isinstance(a, rp.Store | rp.Lookup | rp.StoreProof):
                self._now(a)
        if slow:
            self.spawn(self._slow(slow, waits), "actions")

    async def execute(self, actions: Sequence[rp.Action]) -> None:
        """Carry out actions and wait for those that touch storage (a store is committed,
        a lookup answered, a proof kept) before returning."""
        self.wake()
        if not actions:
            return
        waits = [self._store(a) if isinstance(a, rp.Store) else None for a in actions]
        for a in actions:
            if not isinstance(a, rp.Store | rp.Lookup | rp.StoreProof):
                self._now(a)
        self.wake()
        await self._slow([a for a in actions if isinstance(a, rp.Store | rp.Lookup
                                                          | rp.StoreProof)],
                         [w for a, w in zip(actions, waits, strict=True)
                          if isinstance(a, rp.Store | rp.Lookup | rp.StoreProof)])

    def _store(self, a: rp.Action) -> asyncio.Future[None] | None:
        assert isinstance(a, rp.Store)
        return self.ingest.start_commit(list(a.records), durable=a.durable,
                                        source=self.partners.get(a.source)
                                        if a.source else None)

    async def _slow(self, actions: Sequence[rp.Action],
                    waits: Sequence[asyncio.Future[None] | None]) -> None:
        for a, w in zip(actions, waits, strict=True):
            if w is not None:
                await asyncio.shield(w)
            elif isinstance(a, rp.Lookup):
                env = await in_thread(self.storage.envelope_at, a.origin, a.feed, a.seq)
                held = _stored_record(env) if env is not None else None
                await self.execute(self.replica.on_lookup(a.origin, a.feed, a.seq, held,
                                                          self.now_ms()))
            elif isinstance(a, rp.StoreProof):
                await self.checkpoints.keep_proof(a.origin, a.feed, a.seq, a.kind,
                                                  a.proof, a.source)

    def _now(self, a: rp.Action) -> None:
        """Carry out one action that needs no waiting (tasks for the network)."""
        if isinstance(a, rp.WakeStreams):
            self.on_wake(a.records)
        elif isinstance(a, rp.Rejected):
            self.ingest.count_invalid(self.partners.get(a.peer) if a.peer else None,
                                      a.reason, a.detail)
        elif isinstance(a, rp.ForkFound):
            if a.kind == "fork":
                log.warning("equivocation detected: the origin signed two different "
                            "records for one seq",
                            extra=fields(origin=self.policy.name(a.origin), feed=a.feed, seq=a.seq))
            else:
                log.warning("split view: the origin signed two different checkpoints of "
                            "one size",
                            extra=fields(origin=self.policy.name(a.origin), feed=a.feed,
                                         size=a.seq))
            self.publisher.note_fork(a.origin, a.feed, a.seq)
        elif isinstance(a, rp.Paused):
            log.warning("publishing paused", extra=fields(feed=a.feed, reason=a.reason))
        elif isinstance(a, rp.Resumed):
            log.info("publishing resumed", extra=fields(feed=a.feed))
        elif isinstance(a, rp.Confirmed):
            log.info("every partner confirmed this restored node's heads: publishing allowed",
                     extra=fields(partner=self.policy.name(a.peer)))
        elif isinstance(a, rp.CaughtUp):
            # Only now: a restart while own records were still being taken back must
            # take the rest back too, not refuse them as records it never signed.
            self.storage.clear_restored()
            self.storage.set_meta(CATCHING_UP, b"", durable=True)
            log.info("own feeds caught up with the partners: records of them beyond this "
                     "node's heads are no longer taken back")
        elif isinstance(a, rp.OwnForgery):
            link = self.partners.get(a.peer) if a.peer is not None else None
            log.error("records signed with this node's key beyond what it holds: the key "
                      "may be stolen (run `citynode key recover` naming this node's own "
                      "heads as last good), or its data dir was rolled back (restart it "
                      "with `citynode run --restored`); refused, and nothing is signed on "
                      "that feed meanwhile",
                      extra=fields(feed=a.feed, seq=a.seq, record=a.record_id.hex(),
                                   partner=link.row.name if link is not None
                                   else self.policy.name(a.peer) if a.peer else "local"))
            self.metrics.own_forgeries.set(len(self.replica.own_forgeries))
        else:
            self._send(a)

    def _send(self, a: rp.Action) -> None:
        if self._stopped:
            return
        peer = getattr(a, "peer", None)
        link = self.partners.get(peer) if isinstance(peer, bytes) else None
        if link is None:
            return  # removed meanwhile
        if isinstance(a, rp.Fetch):
            self.spawn(self._fetch(link, a), "fetch")
        elif isinstance(a, rp.SendSync):
            if a.initiator and self.serving:
                self.spawn(self._reconcile(link, a.payload), "sync")
        elif not self.serving:
            return  # a one-shot catch-up sends only its own requests
        elif isinstance(a, rp.Push):
            self.spawn(self._push(link, a.records), "push")
        elif isinstance(a, rp.Announce):
            heads = {(o, f): (s, h) for o, f, s, h in a.heads}
            self.spawn(self._post(link, "/v1/announce", sync.encode_frontier(heads)),
                       "announce")
        elif isinstance(a, rp.Graft):
            self.spawn(self._post(link, "/v1/graft", a.origin), "graft")
        elif isinstance(a, rp.SendProof):
            self.spawn(self._deliver(link, "proof", a.proof, a.refusals), "send-proofs")
        elif isinstance(a, rp.SendCheckpoint):
            self.spawn(self._deliver(link, "checkpoint", a.envelope, a.refusals),
                       "send-checkpoints")
        elif isinstance(a, rp.SendHeld):
            self.spawn(self._send_held(link), "send-held")

    # ------------------------------------------------------------------ partner I/O

    async def _push(self, link: PartnerLink, records: Sequence[Record]) -> None:
        t0 = time.perf_counter()
        parts = _split_bulk(records)
        outs: list[dict[str, Any]] = []
        try:
            for part in parts:  # one after the other: a partner takes one push of ours
                # at a time (its cap leaves room for one whose client gave up)
                outs.append(await link.client.push([records[i].envelope for i in part]))
        except PeerError as exc:
            busy = self._failed(link, exc)
            self.act(self.replica.on_push_failed(link.key, self.now_ms()) if busy is None
                     else self.replica.on_push_busy(link.key, busy, self.now_ms()))
            return
        self.metrics.push_latency.observe(time.perf_counter() - t0)
        self._mark(link, True)
        idx: list[int] = []
        for part, out in zip(parts, outs, strict=True):
            dup = out.get("dup")
            if isinstance(dup, list):  # (indexes in that part's request)
                idx.extend(part[i] for i in dup if isinstance(i, int) and 0 <= i < len(part))
        self.act(self.replica.on_push_result(link.key, idx, self.now_ms()))
        self.metrics.partner_queue.labels(link.row.name).set(self.replica.queued(link.key))

    async def _post(self, link: PartnerLink, path: str, body: bytes) -> None:
        """An announcement or a graft: not retried (pull repairs)."""
        try:
            await link.client.request("POST", path, body)
        except PeerError as exc:
            self._failed(link, exc)

    async def _fetch(self, link: PartnerLink, a: rp.Fetch,
                     progress: Progress | None = None) -> None:
        try:
            envs = await link.client.fetch(sync.encode_wants(a.wants))
        except PeerError as exc:
            # Busy or not, this fetch is over: failed=True asks it again after a delay.
            self._failed(link, exc)
            await self.execute(self.replica.on_fetch_done(link.key, a.wants, 0,
                                                          self.now_ms(), failed=True))
            return
        self._mark(link, True)
        if envs:
            res = await self.ingest.ingest(envs, source=link, via=a.via)
            if progress is not None:
                progress(res.accepted, 0)
        await self.execute(self.replica.on_fetch_done(link.key, a.wants, len(envs),
                                                      self.now_ms()))

    def cards_stale(self, link: PartnerLink) -> None:
        """This partner sent a record of a feed its origin's card held does not list: a
        newer card may change trust and let records held back go on, so its cards are
        fetched now (one fetch in flight per partner, and one more after it if asked
        meanwhile: a partner sending many such records costs no more)."""
        if link.key in self._cards_busy:
            self._cards_again.add(link.key)
            return
        if not self._stopped:
            self.spawn(self._refresh_cards(link, force=True), "cards")

    async def _refresh_cards(self, link: PartnerLink, *, force: bool = False) -> None:
        if link.key in self._cards_busy:
            return
        self._cards_busy.add(link.key)
        try:
            await self.learn_cards(link, force=force)
        except PeerError as exc:
            self._failed(link, exc)
        finally:
            self._cards_busy.discard(link.key)
        if link.key in self._cards_again and self.partners.get(link.key) is link \
                and not self._stopped:
            self._cards_again.discard(link.key)
            self.spawn(self._refresh_cards(link, force=True), "cards")

    async def learn_cards(self, link: PartnerLink, *, force: bool = False) -> None:
        """The partner's cards (they carry the vouches the trust policy needs), at most
        once per half interval unless ``force``."""
        now = time.monotonic()
        if not force and now - self._cards_at.get(link.key, -1e9) < \
                self.config.federation.pull_interval_seconds / 2:
            return
        self._cards_at[link.key] = now
        await self.policy.learn_cards(await link.client.cards(), link.key)

    async def _reconcile(self, link: PartnerLink, payload: bytes) -> None:
        """One message of our reconciliation session with a partner; its answer goes to
        the replica."""
        try:
            await self.learn_cards(link)
            answer = await link.client.reconcile(payload)
        except PeerError as exc:
            busy = self._failed(link, exc)
            # A 401/403 is an answer, not an outage: most often the partner has not
            # added this node (yet), or has removed it.
            refused = isinstance(exc, PeerRejected) and exc.status in (401, 403)
            log.info("partner busy, round again after its Retry-After" if busy is not None
                     else "partner refuses this node (has it added us as a partner?)"
                     if refused else "partner unreachable",
                     extra=fields(partner=link.row.name, error=str(exc)))
            self.act(self.replica.on_sync_failed(link.key, self.now_ms(), busy))
            return
        self._mark(link, True)
        try:
            actions = self.replica.on_sync(link.key, answer, self.now_ms(), initiator=True)
        except CitynodeError as exc:
            log.warning("sync failed", extra=fields(partner=link.row.name, error=str(exc)))
            self.ingest.count_invalid(link, getattr(exc, "reason", "invalid"), str(exc))
            self.act(self.replica.on_sync_failed(link.key, self.now_ms()))
            return
        await self.execute(actions)

    async def _deliver(self, link: PartnerLink, kind: str, payload: bytes,
                       refusals: int) -> None:
        if kind == "proof" and not self._may_forward_proof(link, payload):
            return
        path = "/v1/proofs" if kind == "proof" else "/v1/checkpoints"
        keep = await self.partners.deliver(link, path, payload, refusals)
        if keep is not None:
            self.replica.on_deliver_failed(link.key, kind, payload, keep)

    def _may_forward_proof(self, link: PartnerLink, proof: bytes) -> bool:
        """The replica's access check has no proof: a fork proof of a restricted feed is
        checked again against the two records it carries."""
        try:
            a = ForkProof.decode(proof).a
            f = parse_body(decode_record(a)[0])
        except (InvalidProof, CitynodeError):
            return True  # a split view: the feed's rule, already applied
        return self.policy.may_pass(link.key, f["origin"], f["feed"], proof)

    async def _send_held(self, link: PartnerLink) -> None:
        """After the first good round with a partner since start: the latest checkpoint
        of each feed it may be sent, and the proofs held."""
        try:
            held = await self.checkpoints.held_for(link)
        except CitynodeError as exc:  # our storage: the round itself went well
            log.warning("resending checkpoints failed",
                        extra=fields(partner=link.row.name, error=str(exc)))
            return
        for i, (kind, payload) in enumerate(held):
            path = "/v1/proofs" if kind == "proof" else "/v1/checkpoints"
            keep = await self.partners.deliver(link, path, payload, 0)
            if keep is not None:
                self.replica.on_deliver_failed(link.key, kind, payload, keep)
                if keep == 0:  # away again: the rest waits for the next round
                    for k, p in held[i + 1:]:
                        self.replica.on_deliver_failed(link.key, k, p, 0)
                    return

    # ------------------------------------------------------------------ from partners

    def on_reconcile(self, peer: bytes, body: bytes) -> bytes:
        """A partner's reconciliation request: our answer. Raises
        :class:`EncodingError` for a malformed message."""
        actions = self.replica.on_sync(peer, body, self.now_ms(), initiator=False)
        if not actions or not isinstance(actions[0], rp.SendSync):
            raise AccessDenied("not a partner of this node")
        self.act(actions[1:])
        link = self.partners.get(peer)
        if link is not None and time.monotonic() - self._cards_at.get(peer, -1e9) >= 1.0:
            # Cards travel with rounds both ways (as the initiator's do): the partner's
            # chains we are not told of yet may need a card it holds and we do not.
            self.cards_stale(link)
        return actions[0].payload

    def on_frontier(self, peer: bytes, theirs: sync.Frontier) -> sync.Frontier:
        """A partner's legacy sync request (a full frontier): act on it, answer with our
        heads it may be told of."""
        self.act(self.replica.on_frontier(peer, theirs, self.now_ms()))
        return self.replica.frontier_for(peer)

    def on_announce(self, peer: bytes, theirs: sync.Frontier) -> None:
        self.act(self.replica.on_announce(peer, theirs, self.now_ms()))

    def on_graft(self, peer: bytes, origin: bytes) -> None:
        self.replica.on_graft(peer, origin)


#: A push batch holding at least this many records of one origin goes as two requests
#: (see :func:`_split_bulk`).
BULK_SPLIT_MIN = 32


def _split_bulk(records: Sequence[Record]) -> list[list[int]]:
    """The positions of a push batch's records, as the requests that carry it, in the
    order they go: one, or, when one origin has at least :data:`BULK_SPLIT_MIN` records
    in it and others have some too, two: the other origins' records, then that
    origin's. Why: the partner stores a request's records once it has verified all of
    them, so a record of ours (or of a quiet origin) batched with 250 of a partner's
    flood waited for those 250 to be checked at the next node (scripts/chaos --scenario
    hostile). Each origin's records stay in one request, in order."""
    counts: dict[bytes, int] = {}
    for r in records:
        counts[r.origin] = counts.get(r.origin, 0) + 1
    if len(counts) < 2:
        return [list(range(len(records)))]
    bulk, n = max(counts.items(), key=lambda kv: kv[1])
    if n < BULK_SPLIT_MIN:
        return [list(range(len(records)))]
    return [[i for i, r in enumerate(records) if r.origin != bulk],
            [i for i, r in enumerate(records) if r.origin == bulk]]


def _stored_record(env: bytes) -> Record:
    """A record read back from our database (verified when it was stored)."""
    return stored_record(env)
