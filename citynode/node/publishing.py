"""Publishing: signing this node's own records, and never signing two records with one
seq.

Own-feed safety has three parts: at start nothing is signed until every partner's first
sync round ended (one may hold newer records of ours, after a restore from an old
backup); a partner that shows such records pauses the feed until they are fetched; and a
feed with a fork or split-view proof against it is never signed on again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from citynode.config import Config
from citynode.core import access, egress
from citynode.core import replica as rp
from citynode.core.chain import FeedHead
from citynode.core.keys import NodeKey, Verifier, canonical_id, parse_node_id
from citynode.core.records import (
    Record,
    RecordPolicy,
    check_feed_name,
    sign_record,
    stored_record,
)
from citynode.core.types import ERASURE_FEED, ERASURE_TYPE, MAX_ERASURE_ENTRIES
from citynode.errors import (
    ChainError,
    CitynodeError,
    InvalidRecord,
    NoLeader,
    PayloadError,
    PublishRefused,
)
from citynode.logs import fields
from citynode.metrics import Metrics
from citynode.node._base import in_thread
from citynode.node.ingest import Ingest
from citynode.node.partners import Partners
from citynode.node.policy import Policy

__all__ = ["Publisher"]

T = TypeVar("T")

log = logging.getLogger("citynode.node")

#: Publishes of at most this many unsealed records are signed on the event loop.
INLINE_SIGN_MAX = 2


class Publisher:
    """Sign, chain and durably commit records of this node's own feeds."""

    def __init__(self, *, config: Config, key: NodeKey, replica: rp.Replica, ingest: Ingest,
                 policy: Policy, partners: Partners, metrics: Metrics, verifier: Verifier,
                 record_policy: RecordPolicy) -> None:
        self.config = config
        self.key = key
        self.public_key = key.identity
        self.replica = replica
        self.ingest = ingest
        self.policy = policy
        self.partners = partners
        self.metrics = metrics
        self.verifier = verifier
        self.record_policy = record_policy
        self._locks: dict[str, asyncio.Lock] = {}
        # Cleared while the signing key changes (rotate_key): no publish starts then.
        self._no_rotation = asyncio.Event()
        self._no_rotation.set()
        #: Why nothing may be signed at all (the data dir holds an older key log than
        #: the partners, and not the key in force: KeyChanges.catch_up), or None.
        self.key_refusal: str | None = None

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
        await self._no_rotation.wait()
        # No await between the wait and taking the lock's place: a key change that
        # begins now finds this feed's lock and waits for this publish.
        lock = self._locks.setdefault(feed, asyncio.Lock())
        async with lock:
            # Again: a key change that held this publish may have stopped signing (a
            # recovery prepared meanwhile: KeyChanges.prepare_recovery).
            if self.key_refusal is not None:
                raise PublishRefused(self.key_refusal)
            self.replica.check_publish(feed)
            seq, prev = self.replica.next_link(feed)
            head = FeedHead(seq - 1, prev) if prev is not None else None
            # Our card as node.toml states it now, signed before the records: the card
            # in force at their time (their terms and retention) is then this one.
            self.policy.card()
            now = self.ingest.now_ms()
            fc = self.config.feeds.get(feed)
            # Erasure requests are never sealed: every node holding what they name must
            # read them.
            readers = (await self._reader_keys(fc.readers)
                       if fc is not None and fc.access == access.RESTRICTED
                       and feed != ERASURE_FEED else None)
            if len(items) <= INLINE_SIGN_MAX and readers is None:
                # A record or two: signed here, on the event loop (about 0.1 ms each).
                # A trip to a worker thread costs more, and it waited behind whatever
                # the threads were doing (a partner's flood being verified) while this
                # feed's lock held every publish behind it (scripts/chaos --scenario
                # hostile: acknowledgements queued for a second).
                recs = self._sign_batch(feed, type_name, items, subjects, head, now, readers)
            else:
                recs = await in_thread(self._sign_batch, feed, type_name, items, subjects,
                                       head, now, readers)
            # The replica refuses (PublishRefused) if own-feed safety changed meanwhile,
            # and ChainError if the feed's head moved while these were signed: another
            # process's records, heard from a database shared with it (a takeover under
            # way). Nothing was stored: a retry signs after the new head.
            try:
                actions = self.replica.publish(recs, self.ingest.now_ms())
            except ChainError as exc:
                raise NoLeader(f"not stored, retry: this feed's head moved while the "
                               f"records were signed ({exc})") from exc
            # The write is queued now, in chain order while we hold the lock; waited for
            # after releasing it, so concurrent publishes share one durable commit.
            waiter = asyncio.ensure_future(self.ingest.execute(actions))
            await asyncio.sleep(0)  # let the write be queued before the lock is free
        try:
            await waiter
        except ChainError as exc:
            # Another process stored at these seqs first (the leadership moved while
            # this was on its way): nothing of ours was stored, the head is back at
            # the database's (Ingest's rewind), and a retry signs after it.
            raise NoLeader(f"not stored, retry: the database's chain moved on while this "
                           f"was written ({exc})") from exc
        self.metrics.published.inc(len(recs))
        if head is None and feed not in self.config.feeds:
            # A new feed: the card that lists it (and its access level) is signed and
            # kept now, so an export made before anyone asks for the card has it.
            self.policy.card()
        return recs

    async def _reader_keys(self, readers: Sequence[str]) -> list[bytes]:
        """The keys to seal to: a cn1 reader's id is its key; a cn2 reader's records are
        sealed to its key in force, from the log held here or, if none is, from the
        first partner that holds one. Raises :class:`PayloadError` (``bad_sealed``) for a
        cn2 reader whose log no partner holds."""
        out = []
        for r in readers:
            ident = parse_node_id(r)
            if r.strip().startswith("cn2") and ident not in self.policy.keys:
                for link in list(self.partners.links.values()):
                    try:
                        data = await link.client.key_log(canonical_id(r))
                    except CitynodeError:
                        continue
                    self.policy.offer_log(ident, data, link.key)
                    if ident in self.policy.keys:
                        break
                if ident not in self.policy.keys:
                    raise PayloadError(
                        f"reader {r}: its key log is not known here, and no partner holds "
                        "it (its records are sealed to the key it names): add the reader "
                        "as a partner, or publish again once a partner knows it",
                        "bad_sealed")
            out.append(self.policy.keys.current_key(ident))
        return out

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
                # What may leave the city, the data and the subject, applied before
                # anything is signed (an erasure request says only what to drop).
                subject = subjects[n] if subjects else None
                if not (rules.is_open or type_name == ERASURE_TYPE):
                    leaving = egress.apply(rules, type_name, data, subject)
                    data, subject = leaving.data, leaving.subject
                r = sign_record(self.key, feed=feed, seq=seq, prev=prev, time_ms=now,
                                type=type_name, data=data, readers=readers,
                                subject=subject, identity=self.key.record_identity)
                size = max(len(r.body), len(r.payload or b""))
                if size > limit:
                    # The limit every node applies on ingest (to the body and to the
                    # payload): what our own decoder (and every partner's) refuses is
                    # never signed and kept.
                    raise PayloadError(
                        f"record payload is {size} bytes, over this node's "
                        f"[limits] max_body_bytes = {limit}", "too_large")
            except InvalidRecord as exc:
                if len(items) == 1:
                    raise
                # Which one, in a file of hundreds: the n-th line or array item.
                raise type(exc)(f"item {n + 1} of {len(items)}: {exc}", exc.reason) from exc
            prev = r.id
            out.append(r)
        return out

    async def with_signing_stopped(self, step: Callable[[], Awaitable[T]]) -> T:
        """Run ``step`` while no own record is being signed: new publishes wait, and
        every feed's publish under way finishes first (a rotation takes the heads and
        switches keys in one step: docs/PROTOCOL.md, "Wiring")."""
        self._no_rotation.clear()
        locks = [self._locks[f] for f in sorted(self._locks)]
        try:
            for lk in locks:
                await lk.acquire()
            try:
                return await step()
            finally:
                for lk in locks:
                    lk.release()
        finally:
            self._no_rotation.set()

    async def erase(self, ids: Sequence[bytes], reason: str) -> Record:
        """Publish an erasure request for records of ours (``ids``): every node holding
        them drops their payloads and keeps their signed skeletons.

        Raises :class:`PublishRefused` if a record is not held here, is not ours (only
        its origin can erase a record) or is already erased, :class:`PayloadError`
        (``bad_erasure``) for an erasure request (never erased), too many ids, or a
        reason that is not 1 to 1000 characters; as :meth:`publish` otherwise.
        """
        if not 0 < len(ids) <= MAX_ERASURE_ENTRIES:
            raise PayloadError(f"name 1 to {MAX_ERASURE_ENTRIES} records to erase",
                               "bad_erasure")
        entries = []
        for rid in dict.fromkeys(ids):
            env = await in_thread(self.ingest.storage.get_envelope, rid)
            if env is None:
                raise PublishRefused(f"record {rid.hex()} is not held here: check its id")
            rec = stored_record(env)
            if rec.origin != self.public_key:
                raise PublishRefused(
                    f"record {rid.hex()} was published by another node: only its origin "
                    "can erase it (ask that city's operators)")
            if rec.feed == ERASURE_FEED:
                raise PayloadError("an erasure request is never erased", "bad_erasure")
            # A second request would erase nothing, yet be signed, kept and forwarded
            # by every holder for ever.
            done = await in_thread(self.ingest.storage.erasure_of, rid)
            if done is not None:
                raise PublishRefused(
                    f"record {rid.hex()} is already erased (by request {done[0].hex()}: "
                    f"{done[1]}): nothing is left to erase")
            entries.append({"feed": rec.feed, "seq": rec.seq, "id": rec.id})
        [rec] = await self.publish(ERASURE_FEED, ERASURE_TYPE,
                                   [{"erase": entries, "reason": reason}])
        log.info("erasure requested", extra=fields(records=len(entries), id=rec.id.hex()))
        return rec

    # ------------------------------------------------------------------ own-feed safety

    @property
    def blocked(self) -> dict[str, str]:
        """Own feeds paused (feed -> why): a partner holds later records of them."""
        return self.replica.own_blocked

    @property
    def forked(self) -> dict[str, int]:
        """Own feeds with a fork or split-view proof against them (feed -> seq)."""
        return self.replica.own_forked

    def note_fork(self, origin: bytes, feed: str, seq: int) -> None:
        """A fork or split-view proof against ``origin``'s ``feed`` at ``seq`` is held:
        say so loudly if it is our own (the replica stops signing on it)."""
        if origin == self.public_key:
            log.error("own feed forked: publishing on it is stopped",
                      extra=fields(feed=feed, seq=seq))

    def _refuse_if_blocked(self, feed: str) -> None:
        """Raise PublishRefused if this node holds proof it signed two histories of
        ``feed``, or a partner holds newer records of it than this node does."""
        if self.key_refusal is not None:
            raise PublishRefused(self.key_refusal)
        if feed in self.replica.own_forked or feed in self.replica.own_blocked:
            self.replica.check_publish(feed)

    async def _await_first_sync(self, wait: float = 2.0) -> None:
        """Own-feed safety at start: until every partner's first sync round has ended
        (it may show that a partner holds newer records of ours, e.g. after we were
        restored from an old backup), we do not sign anything."""
        loop = asyncio.get_running_loop()
        end = loop.time() + wait
        while self.replica.first_round_pending() and loop.time() < end:
            await asyncio.sleep(0.02)
        late = [link.row.name for pk in self.replica.first_round_pending()
                if (link := self.partners.get(pk)) is not None]
        if late:
            raise PublishRefused(
                "publishing waits for the first exchange with partner(s) "
                f"{', '.join(late)} since start, so as never to re-sign a seq a partner "
                "already holds (as after a restore from a backup): retry in a moment"
            )
