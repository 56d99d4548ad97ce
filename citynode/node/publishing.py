"""Publishing: signing this node's own records, and never signing two records with one
seq.

Own-feed safety has three parts: at start nothing is signed until every partner's first
sync round ended (one may hold newer records of ours, after a restore from an old
backup); a partner that shows such records pauses the feed until they are fetched; and a
feed with a fork or split-view proof against it is never signed on again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

from citynode.config import Config
from citynode.core import access, egress, sync
from citynode.core.chain import FeedHead
from citynode.core.keys import SigningKey, Verifier, parse_node_id
from citynode.core.records import (
    Record,
    RecordPolicy,
    check_feed_name,
    decode_envelope,
    open_record,
    sign_record,
)
from citynode.errors import InvalidRecord, PayloadError, PeerError, PublishRefused
from citynode.logs import fields
from citynode.metrics import Metrics
from citynode.node._base import in_thread
from citynode.node.chains import Chains
from citynode.node.ingest import Ingest
from citynode.node.partners import PartnerLink, Partners
from citynode.node.policy import Policy

__all__ = ["Publisher"]

log = logging.getLogger("citynode.node")


class Publisher:
    """Sign, chain and durably commit records of this node's own feeds."""

    def __init__(self, *, config: Config, key: SigningKey, chains: Chains, ingest: Ingest,
                 policy: Policy, partners: Partners, metrics: Metrics, verifier: Verifier,
                 record_policy: RecordPolicy) -> None:
        self.config = config
        self.key = key
        self.public_key = key.public_key
        self.chains = chains
        self.ingest = ingest
        self.policy = policy
        self.partners = partners
        self.metrics = metrics
        self.verifier = verifier
        self.record_policy = record_policy
        self.blocked: dict[str, str] = {}  # feed -> why publishing is refused
        # Own feeds with a fork or split-view proof against them: this node signed two
        # histories. Nothing more is signed on them, ever (feed -> the seq proven).
        self.forked: dict[str, int] = {}
        self._targets: dict[str, int] = {}  # feed -> seq a partner holds of ours
        self._locks: dict[str, asyncio.Lock] = {}

    async def publish(self, feed: str, type_name: str, items: Sequence[dict[str, Any]], *,
                      subjects: Sequence[str | None] | None = None) -> list[Record]:
        """Sign, chain and durably commit records of our own feed; return them.

        Each payload first passes the feed's egress policy (``[feeds.NAME.egress]``).
        Raises :class:`PayloadError` (nothing is signed if any item is invalid, may not
        leave the city, or is larger than ``[limits] max_body_bytes``),
        :class:`PublishRefused` if the feed is blocked by own-feed safety.
        """
        check_feed_name(feed)
        if not items:
            raise PayloadError("nothing to publish: give at least one payload", "missing_field")
        self._refuse_if_blocked(feed)
        await self._await_first_sync()
        lock = self._locks.setdefault(feed, asyncio.Lock())
        async with lock:
            self._refuse_if_blocked(feed)
            key = (self.public_key, feed)
            head = self.chains.heads.get(key)
            now = self.ingest.now_ms()
            fc = self.config.feeds.get(feed)
            readers = ([parse_node_id(r) for r in fc.readers]
                       if fc is not None and fc.access == access.RESTRICTED else None)
            recs = await in_thread(self._sign_batch, feed, type_name, items, subjects, head,
                                   now, readers)
            for r in recs:
                self.chains.inflight.add(r.id)
            self.chains.heads[key] = FeedHead(recs[-1].seq, recs[-1].id)
            # Queued in chain order while we hold the lock; waited for after releasing
            # it, so concurrent publishes share one durable commit (group commit).
            waiter = asyncio.ensure_future(self.ingest.commit(recs, durable=True, source=None))
            await asyncio.sleep(0)  # let commit queue the write before the lock is free
        await waiter
        self.metrics.published.inc(len(recs))
        if head is None and feed not in self.config.feeds:
            # A new feed: the card that lists it (and its access level) is signed and
            # kept now, so an export made before anyone asks for the card has it.
            self.policy.card()
        return recs

    def _sign_batch(self, feed: str, type_name: str, items: Sequence[dict[str, Any]],
                    subjects: Sequence[str | None] | None, head: FeedHead | None, now: int,
                    readers: list[bytes] | None = None) -> list[Record]:
        seq, prev = (head.seq, head.id) if head else (0, None)
        limit = self.record_policy.body_limits.max_bytes
        fc = self.config.feeds.get(feed)
        rules = fc.egress if fc is not None else egress.OPEN
        out = []
        for n, data in enumerate(items):
            seq += 1
            try:
                # What may leave the city, applied before anything is signed.
                leaving = data if rules.is_open else egress.apply(rules, type_name, data).data
                r = sign_record(self.key, feed=feed, seq=seq, prev=prev, time_ms=now,
                                type=type_name, data=leaving, readers=readers,
                                subject=subjects[n] if subjects else None)
                if len(r.body) > limit:
                    # The limit every node applies on ingest: a body our own decoder (and
                    # every partner's) refuses is never signed and kept.
                    raise PayloadError(
                        f"record body is {len(r.body)} bytes, over this node's "
                        f"[limits] max_body_bytes = {limit}", "too_large")
            except InvalidRecord as exc:
                if len(items) == 1:
                    raise
                # Which one, in a file of hundreds: the n-th line or array item.
                raise type(exc)(f"item {n + 1} of {len(items)}: {exc}", exc.reason) from exc
            prev = r.id
            out.append(r)
        return out

    # ------------------------------------------------------------------ own-feed safety

    def note_fork(self, origin: bytes, feed: str, seq: int) -> None:
        """A fork or split-view proof is held against ``origin``'s ``feed`` at ``seq``:
        if the origin is this node, stop signing on that feed for good."""
        if origin != self.public_key:
            return
        if feed not in self.forked:
            log.error("own feed forked: publishing on it is stopped",
                      extra=fields(feed=feed, seq=seq))
        self.forked[feed] = min(seq, self.forked.get(feed, seq))

    def _refuse_if_blocked(self, feed: str) -> None:
        """Raise PublishRefused if this node holds proof it signed two histories of
        ``feed`` (e.g. it was restored from an old backup with no partner reachable),
        or a partner holds newer records of it than this node does."""
        if feed in self.forked:
            raise PublishRefused(
                f"feed {feed!r} of this node has forked: it signed two different histories "
                f"at seq {self.forked[feed]} (`citynode forks` shows the proof, and its "
                "partners hold it too). Nothing more is signed on it: publish on a new feed "
                "name, and tell the partner cities why"
            )
        if feed in self.blocked:
            raise PublishRefused(self.blocked[feed])

    async def _await_first_sync(self, wait: float = 2.0) -> None:
        """Own-feed safety at start: until every partner's first sync round has ended
        (it may show that a partner holds newer records of ours, e.g. after we were
        restored from an old backup), we do not sign anything."""
        waiting = [link for link in self.partners.links.values()
                   if not link.first_attempt.is_set()]
        if not waiting:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(*(link.first_attempt.wait() for link in waiting)), wait
            )
        late = [link.row.name for link in waiting if not link.first_attempt.is_set()]
        if late:
            raise PublishRefused(
                "publishing waits for the first exchange with partner(s) "
                f"{', '.join(late)} since start, so as never to re-sign a seq a partner "
                "already holds (as after a restore from a backup): retry in a moment"
            )

    async def check_partner_heads(self, theirs: sync.Frontier, link: PartnerLink) -> None:
        """If a partner holds later records of our own feeds than we do (e.g. we were
        restored from an old backup), refuse to publish there until we caught up.

        Publishing on the feed pauses at once. A frontier is not signed, though, so the
        pause lasts only if the partner then shows the record at the head it claims,
        signed by us; a false claim is counted and the pause lifted."""
        for (origin, feed), (seq, hid) in theirs.items():
            if origin != self.public_key:
                continue
            have = self.chains.seq((origin, feed))
            if have >= seq or self._targets.get(feed, 0) >= seq:
                continue
            why = (
                f"feed {feed!r}: partner {link.row.name} holds our records up to seq {seq} "
                f"but this node has only {have} (restored from an old backup?): fetching "
                "them before publishing again, to never sign two records with one seq"
            )
            if feed not in self.blocked:
                log.warning("publishing paused", extra=fields(feed=feed, reason=why))
            self.blocked[feed] = why
            if await self._proves_own_record(link, feed, seq, hid):
                self._targets[feed] = seq
                continue
            self.ingest.count_invalid(link, "false_claim",
                                      f"claims our feed {feed!r} up to seq {seq} but does "
                                      "not show that record signed by us")
            if self._targets.get(feed, 0) <= have:
                self.blocked.pop(feed, None)

    async def _proves_own_record(self, link: PartnerLink, feed: str, seq: int,
                                 head: bytes) -> bool:
        try:
            envs = await link.client.fetch(
                sync.encode_wants([sync.Want(self.public_key, feed, seq, seq)]))
        except PeerError:
            return False
        for env in envs[:1]:
            try:
                body, sig = decode_envelope(env, self.record_policy.body_limits)
                rec = open_record(body, sig, now_ms=2**62, verifier=self.verifier,
                                  policy=self.record_policy)
            except InvalidRecord:
                return False
            return (rec.origin == self.public_key and rec.feed == feed and rec.seq == seq
                    and rec.id == head)
        return False

    def release_blocks(self) -> None:
        """Feeds paused for a partner's newer records: resumed once we hold them."""
        for feed in list(self.blocked):
            if self.chains.seq((self.public_key, feed)) >= self._targets.get(feed, 0):
                del self.blocked[feed]
                log.info("publishing resumed", extra=fields(feed=feed))
