"""Gossip: how records travel between partners.

* **Push** (eager): each committed record is queued for every partner that may be sent
  it and does not hold it yet; a loop per partner sends the queue in batches.
* **Lazy push** (Plumtree): an origin whose records a partner already gets from someone
  else is only announced to it; the partner grafts us back (eager again) if an announced
  record does not reach it by the other path in time.
* **Sync rounds** (anti-entropy): frontiers are exchanged with each partner at an
  interval, or at once when something suggests a gap; what is missing is fetched.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence

from citynode.config import Config
from citynode.core import sync
from citynode.core.records import Record
from citynode.errors import CitynodeError, PeerError, PeerRejected
from citynode.logs import fields
from citynode.metrics import Metrics
from citynode.node._base import FeedKey, Spawn, in_thread
from citynode.node.chains import Chains
from citynode.node.checkpoints import Checkpoints
from citynode.node.ingest import Ingest
from citynode.node.partners import PartnerLink, Partners
from citynode.node.policy import Policy, readers_of
from citynode.node.publishing import Publisher
from citynode.storage import Storage

__all__ = ["Gossip"]

log = logging.getLogger("citynode.node")

# How long a lazily announced record may take to arrive by the eager path before we
# fetch it from the announcer and graft it back: a few eager hops on a loaded machine.
GRAFT_DELAY = 0.5
# How long at most to keep waiting for an announced record while pushes still extend
# its chain.
GRAFT_PATIENCE = 2.0
# How long a pull waits for records already on their way by push before fetching.
PULL_SETTLE = 1.0
# The shortest time between two sync rounds with one partner.
MIN_SYNC_GAP = 0.25
# A chain that a push extended this recently is flowing: a sync round leaves it to push.
PUSH_FLOWING = 3.0

Progress = Callable[[int, int], None]


class Gossip:
    """Push, announce, graft and sync with every partner."""

    def __init__(self, *, config: Config, chains: Chains, policy: Policy,
                 partners: Partners, ingest: Ingest, publisher: Publisher,
                 checkpoints: Checkpoints, storage: Storage, metrics: Metrics,
                 spawn: Spawn) -> None:
        self.config = config
        self.chains = chains
        self.policy = policy
        self.partners = partners
        self.ingest = ingest
        self.publisher = publisher
        self.checkpoints = checkpoints
        self.storage = storage
        self.metrics = metrics
        self.spawn = spawn

    def run_link(self, link: PartnerLink) -> list[asyncio.Task[None]]:
        """Start a partner's push and sync loops."""
        return [self.spawn(self._push_loop(link), f"push-{link.row.name}"),
                self.spawn(self._sync_loop(link), f"sync-{link.row.name}")]

    def wake_all(self) -> None:
        """Ask every partner for a sync round now (a card changed what may be relayed)."""
        self.partners.sync_all()

    # ------------------------------------------------------------------ push

    def offer(self, recs: Sequence[Record], source: PartnerLink | None) -> None:
        """Committed records: queue (or announce) them for every partner but their
        source that may be sent them and does not hold them."""
        for link in self.partners.links.values():
            if link is source:
                continue
            for r in recs:
                if link.view.knows((r.origin, r.feed), r.seq) or \
                        not self.policy.may_send(link.key, r):
                    continue
                if r.origin in link.lazy:
                    link.announce_later(r)
                else:
                    link.enqueue(r)

    async def _push_loop(self, link: PartnerLink) -> None:
        batch_max = self.config.federation.push_batch
        while True:
            if not link.queue and not link.announce:
                link.wake.clear()
                await link.wake.wait()
            if link.announce:
                ann, link.announce = link.announce, {}
                with contextlib.suppress(PeerError):
                    await link.client.request("POST", "/v1/announce", sync.encode_frontier(ann))
                    for key, (seq, _h) in ann.items():
                        link.view.update(key, seq)
            batch: list[Record] = []
            while link.queue and len(batch) < batch_max:
                r = link.queue.popleft()
                if not link.view.knows((r.origin, r.feed), r.seq):
                    batch.append(r)
            self.metrics.partner_queue.labels(link.row.name).set(len(link.queue))
            if not batch:
                continue
            t0 = time.perf_counter()
            try:
                out = await link.client.push([r.envelope for r in batch])
            except PeerError as exc:
                self.partners.mark(link, False, str(exc))
                # Put the batch back in front (bounded: the queue may overflow, pull repairs).
                for r in reversed(batch):
                    if len(link.queue) < link.queue_max:
                        link.queue.appendleft(r)
                    else:
                        link.overflowed = True
                await asyncio.sleep(self.partners.backoff(link))
                continue
            self.metrics.push_latency.observe(time.perf_counter() - t0)
            self.partners.mark(link, True)
            for r in batch:
                link.view.update((r.origin, r.feed), r.seq)
            dup = out.get("dup")
            if isinstance(dup, list) and dup:
                # Origins of which the partner already had a record we pushed: it gets
                # them through someone else, so from now on we only announce them
                # (Plumtree's prune, per origin, our own included).
                link.lazy.update(batch[i].origin for i in dup
                                 if isinstance(i, int) and 0 <= i < len(batch))

    # ------------------------------------------------------------------ lazy push

    def on_announce(self, link: PartnerLink, theirs: sync.Frontier) -> None:
        """A partner holds these heads. Where we are behind, give the eager path a moment,
        then fetch from this partner and graft it (make it push that origin to us again)."""
        link.view.update_frontier(theirs)
        for key, (seq, _head) in theirs.items():
            if self.chains.seq(key) >= seq or key in link.graft_pending:
                continue
            if not self.policy.accepts_origin(key[0]):
                continue
            if len(link.graft_pending) >= 64:
                link.sync_now.set()  # many gaps at once: one pull round instead
                break
            link.graft_pending.add(key)
            self.spawn(self._graft_later(link, key, seq), "graft")

    @staticmethod
    def on_graft(link: PartnerLink, origin: bytes) -> None:
        """A partner wants ``origin``'s records pushed eagerly again."""
        link.lazy.discard(origin)

    async def _graft_later(self, link: PartnerLink, key: FeedKey, seq: int) -> None:
        try:
            # While pushes keep extending the chain the eager path is only slow (a loaded
            # partner), not broken: wait on (up to GRAFT_PATIENCE) instead of fetching
            # copies that are already on their way.
            waited = 0.0
            while True:
                await asyncio.sleep(GRAFT_DELAY)
                waited += GRAFT_DELAY
                have = self.chains.seq(key)
                if have >= seq:
                    return
                pushed = self.chains.pushed_at.get(key, -math.inf)
                if waited >= GRAFT_PATIENCE or time.monotonic() - pushed > GRAFT_DELAY:
                    break
            with contextlib.suppress(PeerError):
                await self._fetch_want(link, sync.Want(key[0], key[1], have + 1, seq), None,
                                       via="graft")
                await link.client.request("POST", "/v1/graft", key[0])
        finally:
            link.graft_pending.discard(key)

    # ------------------------------------------------------------------ sync rounds

    def on_sync_request(self, link: PartnerLink, theirs: sync.Frontier) -> sync.Frontier:
        """A partner's sync request: note what it holds, start our own round at once if
        it holds what we lack, and answer with our heads it may be sent."""
        link.view.update_frontier(theirs)
        if self.chains.lacks_from(theirs, self.policy.accepts_origin):
            # (Only then: two partners waking each other's rounds would never rest.)
            link.sync_now.set()
        return self.policy.frontier_for(link.key)

    async def _sync_loop(self, link: PartnerLink) -> None:
        interval = self.config.federation.pull_interval_seconds
        while True:
            # Cleared as the round starts: a wake-up that comes during the round (new
            # heads, a new card) is for a later round, not lost.
            link.sync_now.clear()
            try:
                await self.sync_with(link)
                self.partners.mark(link, True)
                await self.partners.flush_outbox(
                    link, None if link.synced_once.is_set() else self.checkpoints.fill_outbox)
                link.synced_once.set()
                delay = interval
            except PeerError as exc:
                self.partners.mark(link, False, str(exc))
                # A 401/403 is an answer, not an outage: most often the partner has not
                # added this node (yet), or has removed it.
                refused = isinstance(exc, PeerRejected) and exc.status in (401, 403)
                log.info(
                    "partner refuses this node (has it added us as a partner?)" if refused
                    else "partner unreachable",
                    extra=fields(partner=link.row.name, error=str(exc)),
                )
                delay = self.partners.backoff(link)
            except CitynodeError as exc:
                self.partners.mark(link, False, str(exc))
                log.warning("sync failed", extra=fields(partner=link.row.name, error=str(exc)))
                delay = self.partners.backoff(link)
            except Exception as exc:  # a bug must not end syncing with this partner
                self.partners.mark(link, False, f"internal error: {exc}")
                log.exception("sync failed", extra=fields(partner=link.row.name))
                delay = self.partners.backoff(link)
            link.first_attempt.set()
            # However often a round is asked for, rounds with one partner are spaced.
            await asyncio.sleep(min(delay, MIN_SYNC_GAP))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(link.sync_now.wait(), max(0.0, delay - MIN_SYNC_GAP))

    def _plan(self, theirs: sync.Frontier, now: int) -> sync.SyncPlan:
        quota = self.chains.quota
        return sync.plan_sync(
            self.chains.frontier(), theirs,
            accept=lambda o: self.policy.accepts_origin(o) and not quota.exhausted(o, now),
            batch=self.config.limits.max_batch_records,
        )

    async def sync_with(self, link: PartnerLink, *, progress: Progress | None = None) -> int:
        """One anti-entropy round with a partner; returns the number of records fetched."""
        # Cards first: they carry the vouches the trust policy needs.
        await self.policy.learn_cards(await link.client.cards())
        theirs = sync.decode_frontier(
            await link.client.sync(sync.encode_frontier(self.policy.frontier_for(link.key))))
        link.view.update_frontier(theirs)
        link.overflowed = False
        now = self.ingest.now_ms()
        plan = self._plan(theirs, now)
        await self.publisher.check_partner_heads(theirs, link)
        if plan.wants and not self.publisher.blocked and progress is None:
            # Records still travelling by push would be fetched twice: let them land,
            # then fetch only what is still missing -- and not at all for chains that
            # pushes are extending right now (pull repairs stalls, not flows; a stalled
            # chain is fetched in the next round).
            await asyncio.sleep(PULL_SETTLE)
            flowing = time.monotonic() - PUSH_FLOWING
            plan = self._plan(theirs, now)
            wants = [w for w in plan.wants
                     if self.chains.pushed_at.get((w.origin, w.feed), -math.inf) < flowing]
            if len(wants) < len(plan.wants):
                # Look again once those chains would count as stalled, not a pull
                # interval later.
                asyncio.get_running_loop().call_later(
                    PUSH_FLOWING + MIN_SYNC_GAP, link.sync_now.set)
            plan = dataclasses.replace(plan, wants=wants)
        fetched = 0
        total = sum(w.to_seq - w.from_seq + 1 for w in plan.wants)
        if progress is not None:
            progress(0, total)
            progress = _progress_adder(progress, total)
        # What they lack, they fetch themselves in their own round (our sync request
        # wakes it): pushing it here too would only send copies twice.
        for want in plan.wants:
            fetched += await self._fetch_want(link, want, progress)
        for key, seq in plan.forks:
            await self._fetch_want(link, sync.Want(key[0], key[1], seq, seq), None)
        for key, seq, their_id in plan.check:
            mine = await in_thread(self.storage.id_at, key[0], key[1], seq)
            if mine is not None and mine != their_id:
                await self._fetch_want(link, sync.Want(key[0], key[1], seq, seq), None)
        # what the pending buffer still misses, ask this partner too
        for want in self.chains.pending.missing()[:64]:
            await self._fetch_want(link, want, None, via="gap")
        self.publisher.release_blocks()
        return fetched

    async def _fetch_want(self, link: PartnerLink, want: sync.Want,
                          progress: Progress | None, via: str = "sync") -> int:
        """Fetch a range from a partner and ingest it; ``via`` labels the copies received
        (sync round, graft, gap in a chain). Returns the number of records accepted."""
        got = 0
        start = want.from_seq
        batch = self.config.limits.max_batch_records
        while start <= want.to_seq:
            w = sync.Want(want.origin, want.feed, start, min(want.to_seq, start + batch - 1))
            envs = await link.client.fetch(sync.encode_wants([w]))
            if not envs:
                break
            res = await self.ingest.ingest(envs, source=link, via=via)
            got += res.accepted
            if progress:
                progress(res.accepted, 0)
            if res.accepted == 0 and res.duplicates == 0:
                break
            start += len(envs)
        return got

    async def catch_up(self, progress: Progress | None = None) -> int:
        """One-shot (node not serving): sync once with every partner, fetching
        everything missing; ``progress(done, total)`` is called as records arrive.
        Returns the number of records fetched. Partners that cannot be reached are
        skipped (logged); raises nothing for them."""
        links = await self.partners.start(tasks=False)
        await self.policy.load_cards()
        fetched = 0
        for link in links:
            try:
                fetched += await self.sync_with(link, progress=progress)
            except PeerError as exc:
                log.warning("partner unreachable", extra=fields(partner=link.row.name,
                                                                error=str(exc)))
            finally:
                link.first_attempt.set()
        return fetched

    # ------------------------------------------------------------------ serving partners

    async def serve_fetch(self, wants: Iterable[sync.Want], requester: bytes) -> list[bytes]:
        """Envelopes for a partner's wants, bounded, respecting feed access."""
        out: list[bytes] = []
        budget = self.config.limits.max_batch_records
        link = self.partners.get(requester)
        if link is None:  # no longer a partner (removed while its request ran)
            return out
        for w in wants:
            if budget <= 0:
                break
            if not self.policy.may_pass(link.key, w.origin, w.feed):
                continue
            envs = await in_thread(
                self.storage.range, w.origin, w.feed, w.from_seq, w.to_seq, budget)
            if self.policy.is_restricted(w.origin, w.feed):
                # Records of the feed in clear (signed before it was restricted) go
                # where the partners rule lets them.
                envs = [e for e in envs if readers_of(e) is not None
                        or self.policy.may_relay_envelope(link.key, w.origin, w.feed, e)]
            out.extend(envs)
            budget -= len(envs)
        return out


def _progress_adder(report: Progress, total: int) -> Progress:
    done = 0

    def add(n: int, _total: int) -> None:
        nonlocal done
        done += n
        report(done, total)

    return add
