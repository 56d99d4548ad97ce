"""Ingest: records from outside (push, fetch, graft) become stored records, or are
refused with a reason.

    envelope bytes ──► split + id (SHA-256) ──► held, or being checked? ──yes──► duplicate
                                                   │ no                 (no verify; a copy
                                                   │                     being checked waits
                                                   │                     for its verdict)
                   from a partner, a new record of an origin over its quota? ──yes──► quota
                                                   │ no      (refused before any signature
                                                   │          is checked: see Ingest._admit)
                                      origin accepted by trust policy?
                                                   │ yes
                         open_record (canonical decode, fields, time, payload, signature)
                                                   │  a few live records (seq above the head:
                                                   │  no lookup) on the event loop when alone,
                                                   │  else in a worker thread, PyNaCl
                                                   ▼  releasing the GIL (see Ingest._open)
                    the replica places them (core/replica.py, event loop, no await)
             stored ─► Store: queue for the writer   pending ─► its buffer   equivocation
                                                   │                     ─► Lookup ─► proof
                        writer commits ─► replica.on_committed: push to partners, wake streams

The replica's decision and the write being queued happen with no ``await`` in between,
so writes reach the writer in the order the heads moved.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from citynode.core import erasure
from citynode.core import replica as rp
from citynode.core.keys import Verifier
from citynode.core.records import (
    Record,
    RecordPolicy,
    decode_record,
    open_records,
    parse_body,
    record_id,
)
from citynode.core.types import ERASURE_FEED
from citynode.errors import CitynodeError, InvalidRecord
from citynode.metrics import Metrics
from citynode.node._base import FeedKey, Spawn, in_thread
from citynode.node.partners import PartnerLink, Partners
from citynode.node.policy import Policy
from citynode.storage import INLINE_MAX_RECORDS, Storage

__all__ = ["INLINE_VERIFY_MAX", "Ingest", "IngestResult"]

log = logging.getLogger("citynode.node")

#: At most this many new records are verified on the event loop rather than in a
#: worker thread (see :meth:`Ingest._open`).
INLINE_VERIFY_MAX = 4
#: Ids of records held ahead of a gap that ingest remembers, at most (beyond, it
#: forgets them all: their copies are then verified, as they were before).
AHEAD_IDS_MAX = 100_000
#: Batches of one partner verified in worker threads at once, at most (the others
#: wait their turn; see Ingest._open).
VERIFY_TRIPS_PER_SOURCE = 2
#: Rows of the rejected log a second, at most, per source and reason.
LOG_ROWS_PER_SECOND = 10
_LOG_RATE_KEYS_MAX = 10_000
#: The log's detail of items refused before their signature was checked, by reason.
_REFUSED_UNCHECKED = {
    "quota": "origin over its daily quota (refused before checking signatures)",
}
#: Key logs fetched from the sender of one batch whose records name unknown keys.
MAX_LOG_FETCHES = 4
#: ``(index in the batch, record id, body, signature, payload or None)``
_Item = tuple[int, bytes, bytes, bytes, bytes | None]
#: Items verified together with other ingests': ``(items, now_ms, accept, result)``
_Together = tuple[list[_Item], int, Callable[[bytes], bool],
                  "asyncio.Future[list[tuple[int, Record | InvalidRecord]]]"]


@dataclass
class IngestResult:
    """What became of a batch of envelopes."""

    accepted: int = 0
    duplicates: int = 0
    pending: int = 0
    forks: int = 0
    rejected: list[tuple[int, str]] = field(default_factory=list)  # (index, reason)
    dup: list[int] = field(default_factory=list)  # indexes of copies already held
    #: Seconds this ingest kept the event loop busy (decoding, checks, placing; not
    #: the waits for worker threads or the writer): what the HTTP layer charges to
    #: the sending partner's share of the node's time. Not sent.
    loop_s: float = 0.0

    def duplicate(self, i: int) -> None:
        self.duplicates += 1
        self.dup.append(i)

    def to_wire(self) -> dict[str, Any]:
        return {
            "accepted": self.accepted,
            "duplicates": self.duplicates,
            "dup": self.dup,
            "pending": self.pending,
            "forks": self.forks,
            "rejected": [list(r) for r in self.rejected],
        }


#: ``(records, source link)``: called once records are committed.
CommitListener = Callable[[Sequence[Record], PartnerLink | None], None]
#: ``(actions) -> awaitable``: carry out the replica's actions (the gossip role's).
Execute = Callable[[Sequence[rp.Action]], Awaitable[None]]


class Ingest:
    """Verify and store records; commit records whose heads already moved."""

    def __init__(self, *, replica: rp.Replica, policy: Policy, partners: Partners,
                 storage: Storage, metrics: Metrics, verifier: Verifier,
                 record_policy: RecordPolicy, now_ms: Callable[[], int],
                 spawn: Spawn) -> None:
        self.replica = replica
        self.policy = policy
        self.partners = partners
        self.storage = storage
        self.metrics = metrics
        self.verifier = verifier
        self.record_policy = record_policy
        self.now_ms = now_ms
        self.spawn = spawn
        self.on_commit: CommitListener = lambda recs, source: None
        self.execute: Execute = _nothing
        #: A partner sent a record of a feed its origin's card (as held) does not list.
        self.on_new_feed: Callable[[PartnerLink], None] = lambda link: None
        #: A partner sent a tombstone refused (payload_missing) of this origin and time:
        #: the card in force then (its retention) may be one not held yet.
        self.on_history_wanted: Callable[[PartnerLink, bytes, int], None] = \
            lambda link, origin, time: None
        #: A write failed and the chains' heads go back to the database's (given): told
        #: first, so a database found behind what was committed before (a failover to a
        #: standby that was behind) stops own signing instead of re-signing those seqs.
        self.before_rewind: Callable[[Mapping[tuple[bytes, str], tuple[int, bytes]]],
                                     None] = lambda stored: None
        # Record ids being checked by an ingest now, with the future of its verdict.
        self._checking: dict[bytes, asyncio.Future[bool]] = {}
        self._ingesting = 0  # ingests under way
        self._together: list[_Together] = []  # waiting for the next trip to a thread
        self._drainer: asyncio.Task[None] | None = None
        # Records held ahead of a gap: id -> (chain, seq), to find their copies by id.
        self._ahead: dict[bytes, tuple[FeedKey, int]] = {}
        # Partner writes of a few records gathered this turn of the event loop, with
        # the future each one's Store waits on (see start_commit).
        self._gathered: list[tuple[list[Record], PartnerLink | None,
                                   asyncio.Future[None]]] = []
        # Metrics' children by (metric, label) (see _labelled).
        self._children: dict[tuple[int, str], Any] = {}
        # A write was made at once in this turn of the event loop (see start_commit).
        self._turn_busy = False
        # Per partner, the batches it may have in worker threads (see _open).
        self._gates: dict[bytes, asyncio.Semaphore] = {}
        # (source, reason) -> (second, rows logged in it, items not logged since a row)
        self._log_rate: dict[tuple[str, str], tuple[int, int, int]] = {}
        #: Fetch ``origin``'s key log from a partner and offer it; True if it was taken.
        self.fetch_key_log: Callable[[PartnerLink, bytes], Awaitable[bool]] = _no_log

    async def ingest(self, envelopes: Sequence[bytes], *, source: PartnerLink | None = None,
                     via: str = "push") -> IngestResult:
        """Verify and store records from outside. Never raises for bad records: each is
        rejected with a reason (counted, logged in the bounded rejected log)."""
        res = IngestResult()
        t0 = time.perf_counter()
        replica = self.replica
        now = self.now_ms()
        todo: list[_Item] = []
        # Copies of records another ingest is checking right now: they wait for its
        # verdict instead of checking the signature a second time.
        waits: list[tuple[_Item, asyncio.Future[bool]]] = []
        seen: set[bytes] = set()
        # Admission before any signature is checked: what this batch may still store
        # per origin today, and the items refused for it, by reason.
        budget: dict[bytes, tuple[int, int]] = {}
        refused: dict[str, list[int]] = {}
        self._labelled(self.metrics.received, via).inc(len(envelopes))
        for i, env in enumerate(envelopes):
            try:
                body, sig, payload = decode_record(env, self.record_policy.body_limits)
            except InvalidRecord as exc:
                self._reject(res, i, exc, source)
                continue
            rid = record_id(body)
            if rid in seen or replica.known(rid) or self._held_ahead(rid):
                res.duplicate(i)
                continue
            seen.add(rid)
            refusal = self._admit(body, source, now, budget)
            if refusal is not None:
                refused.setdefault(refusal, []).append(i)
                continue
            other = self._checking.get(rid)
            if other is not None:
                waits.append(((i, rid, body, sig, payload), other))
            else:
                todo.append((i, rid, body, sig, payload))
        for reason, idx in refused.items():
            res.rejected.extend((i, reason) for i in idx)
            self.count_invalid(source, reason, _REFUSED_UNCHECKED[reason], n=len(idx))
        mine = self._claim(todo)
        self._ingesting += 1
        res.loop_s += time.perf_counter() - t0
        try:
            key = source.key if source is not None else None
            verified = await self._open(todo, now, res, key)
            if source is not None:
                verified = await self._retry_unknown_keys(verified, todo, now, source)
            if waits:
                # The other ingest's verdict (a result, never an exception: see
                # _release). A copy whose first check failed is checked here: its
                # signature may differ.
                again: list[_Item] = []
                for item, fut in waits:
                    if await asyncio.shield(fut):
                        res.duplicate(item[0])
                    else:
                        again.append(item)
                verified += await self._open(again, now, res, key)
            if not verified:
                self._labelled(self.metrics.duplicates, via).inc(res.duplicates)
                return res
            return await self._place(verified, res, source, via, now)
        finally:
            self._ingesting -= 1
            # Only now: until the records are placed (in flight to the writer), a copy
            # that arrives must find their verdict here.
            self._release(mine)

    def _admit(self, body: bytes, source: PartnerLink | None, now: int,
               budget: dict[bytes, tuple[int, int]]) -> str | None:
        """Refuse, before its signature is checked, a record from a partner that could
        not be stored today whatever its signature: a new record (its seq above the head
        held) of another origin that is over its daily quota, or that would go over it
        with the records of this batch admitted before it. ``budget``: per origin, the
        records and bytes of today's quota this batch has left (filled here). Returns
        the reason (``quota``) or None. An erasure request (feed citynode.erasures)
        is never refused here: it must reach the payloads it names.

        The replica charges the quota only when it stores a record, after verification:
        a flood past the quota cost one Ed25519 check per record, then one refusal each
        (scripts/chaos --scenario hostile). Records at or below the head are admitted
        (a copy, or an equivocation whose proof the node keeps over any quota); so is
        a body that does not decode (the strict decode after refuses it for what it is).
        """
        if source is None:
            return None
        try:
            f = parse_body(body, self.record_policy)
        except InvalidRecord:
            return None
        origin = f["origin"]
        replica = self.replica
        if origin == replica.me or f["feed"] == ERASURE_FEED:
            return None  # an erasure request always passes the quota (core/replica.py)
        head = replica.head((origin, f["feed"]))
        if f["seq"] <= (head.seq if head is not None else 0):
            return None
        left = budget.get(origin)
        if left is None:
            quota = replica.quota
            used_records, used_bytes = quota.usage(origin, now)
            left = (quota.records_per_day - used_records, quota.bytes_per_day - used_bytes)
        records, nbytes = left[0] - 1, left[1] - len(body)
        if records < 0 or nbytes < 0:
            budget[origin] = left
            return "quota"
        budget[origin] = (records, nbytes)
        return None

    async def _verify_together(self, items: list[_Item], now: int,
                               accept: Callable[[bytes], bool]
                               ) -> list[tuple[int, Record | InvalidRecord]]:
        """:meth:`_verify` in a worker thread, with the items of every other ingest that
        asks meanwhile: one thread hop for all of them."""
        fut: asyncio.Future[list[tuple[int, Record | InvalidRecord]]] = \
            asyncio.get_running_loop().create_future()
        self._together.append((items, now, accept, fut))
        if self._drainer is None:
            self._drainer = self.spawn(self._drain(), "verify")
        return await fut

    async def _drain(self) -> None:
        """Verify what :meth:`_verify_together` gathered, in trips to a worker thread,
        until nothing is left. Every waiting ingest gets a result or an exception."""
        jobs: list[_Together] = []
        try:
            while self._together:
                jobs, self._together = self._together, []
                results = await in_thread(self._verify_jobs, jobs)
                for job, result in zip(jobs, results, strict=True):
                    if not job[3].done():  # its request may be gone
                        job[3].set_result(result)
                jobs = []
        except BaseException as exc:
            err = exc if isinstance(exc, Exception) else CitynodeError("node stopping")
            for job in [*jobs, *self._together]:
                if not job[3].done():
                    job[3].set_exception(err)
            self._together = []
            raise
        finally:
            self._drainer = None

    async def _open(self, todo: list[_Item], now: int, res: IngestResult,
                    source_key: bytes | None = None
                    ) -> list[tuple[int, Record | InvalidRecord]]:
        """Verify what of ``todo`` is not in the database; count the rest as duplicates.

        A few records that cannot be in the database (each names a seq above the head
        held of its chain) need no lookup. When no other ingest is under way they are
        verified right here, on the event loop: the trip to a worker thread and back
        costs more than their signatures (and is latency on every record pushed live).
        When others are, the event loop is the bottleneck: they are verified in a worker
        thread, in one trip with those of every other ingest waiting for one. Others
        make one trip to a worker thread: the lookup, then the verification of what is
        new (PyNaCl releases the GIL there)."""
        if not todo:
            return []
        accept = self.policy.trust_check()
        held: list[tuple[int, bytes]] = []
        if len(todo) <= INLINE_VERIFY_MAX and all(self._beyond_head(t[2]) for t in todo):
            if self._ingesting == 1:  # alone: a thread hop would cost more than this
                t0 = time.perf_counter()
                verified = self._verify(todo, now, accept)
                res.loop_s += time.perf_counter() - t0
            else:  # others are at work on the event loop: one hop for all of them
                verified = await self._verify_together(todo, now, accept)
        else:
            # At most VERIFY_TRIPS_PER_SOURCE batches of one partner in worker threads at
            # once: the threads are shared, first come first served, and one partner's
            # flood of large batches took them all while others' records waited.
            gate = self._gates.get(source_key) if source_key is not None else None
            if gate is None and source_key is not None:
                gate = self._gates[source_key] = asyncio.Semaphore(VERIFY_TRIPS_PER_SOURCE)
            async with gate if gate is not None else contextlib.nullcontext():
                held, verified = await in_thread(self._check_batch, todo, now, accept)
            for i, _rid in held:
                res.duplicate(i)
        self.metrics.verified.inc(len(verified))
        self._settle(todo, {rid for _i, rid in held} |
                     {item.id for _i, item in verified if isinstance(item, Record)})
        return verified

    async def _retry_unknown_keys(self, verified: list[tuple[int, Record | InvalidRecord]],
                                  todo: list[_Item], now: int, source: PartnerLink
                                  ) -> list[tuple[int, Record | InvalidRecord]]:
        """Records refused as ``unknown_key`` (signed by a key the log held of their
        origin does not name, or no log held): fetch their origins' logs from the
        partner that sent them (at most :data:`MAX_LOG_FETCHES` per batch), and verify
        them again if one was taken. A log refused changes nothing."""
        unknown = [(n, i) for n, (i, r) in enumerate(verified)
                   if isinstance(r, InvalidRecord) and r.reason == "unknown_key"]
        if not unknown:
            return verified
        items = {t[0]: t for t in todo}
        origins: dict[bytes, None] = {}
        for _n, i in unknown:
            try:
                origins[parse_body(items[i][2], self.record_policy)["origin"]] = None
            except (InvalidRecord, KeyError):
                continue
        taken = False
        for origin in list(origins)[:MAX_LOG_FETCHES]:
            taken = await self.fetch_key_log(source, origin) or taken
        if not taken:
            return verified
        again = await in_thread(self._verify, [items[i] for _n, i in unknown], now,
                                self.policy.trust_check())
        out = list(verified)
        for (n, _i), item in zip(unknown, again, strict=True):
            out[n] = item
        return out

    def _beyond_head(self, body: bytes) -> bool:
        """Is this a record the database cannot hold: one whose seq is above the head
        held of its chain? Chains are stored contiguous from seq 1, and heads move in
        memory before their records are queued for the writer, so the database never
        holds a seq above the head in memory. False for a body that does not decode (it
        takes the other path, and fails the same strict decode there)."""
        try:
            f = parse_body(body, self.record_policy)
        except InvalidRecord:
            return False
        head = self.replica.head((f["origin"], f["feed"]))
        return bool(f["seq"] > (head.seq if head is not None else 0))

    def _held_ahead(self, rid: bytes) -> bool:
        """Is this a copy of a record held ahead of a gap (verified already)? Checked
        against the pending buffer itself, which may have dropped it since."""
        where = self._ahead.get(rid)
        if where is None:
            return False
        held = self.replica.pending.get(*where)
        if held is not None and held.id == rid:
            return True
        del self._ahead[rid]
        return False

    async def _place(self, verified: list[tuple[int, Record | InvalidRecord]],
                     res: IngestResult, source: PartnerLink | None, via: str,
                     now: int) -> IngestResult:
        """Hand verified records to the replica, carry out what it decides (the write
        is queued before any await) and return once it is committed."""
        recs: list[Record] = []
        index: list[int] = []
        erased = await self._erased(verified)
        t0 = time.perf_counter()
        for i, item in verified:
            if not isinstance(item, InvalidRecord) and item.payload is None:
                try:
                    # The retention in force when it was signed (the origin's card
                    # history), not the newest card's: a later card may raise it.
                    erasure.tombstone_verdict(
                        item, erased=erased, now_ms=now,
                        history=await self.policy.card_history(item.origin))
                except InvalidRecord as exc:
                    if source is not None:
                        # A node that learnt the origin after the card in force then
                        # asks for its card history: the fetch again may then take it.
                        self.on_history_wanted(source, item.origin, item.time)
                    item = exc
            if isinstance(item, InvalidRecord):
                self._reject(res, i, item, source)
                continue
            if source is not None and item.origin != self.policy.public_key and \
                    self.policy.card_lists(item.origin, item.feed) is False:
                self.on_new_feed(source)  # a feed newer than the card we hold: refresh
            recs.append(item)
            index.append(i)
        outcomes, actions = self.replica.on_records(
            source.key if source is not None else None, recs, now, via)
        for i, rec, outcome in zip(index, recs, outcomes, strict=True):
            if outcome == "stored":
                res.accepted += 1
            elif outcome == "duplicate":
                res.duplicate(i)
            elif outcome == "pending":
                res.pending += 1
                if len(self._ahead) >= AHEAD_IDS_MAX:
                    self._ahead.clear()
                self._ahead[rec.id] = ((rec.origin, rec.feed), rec.seq)
            elif outcome == "equivocation":
                res.forks += 1
            elif outcome.startswith("rejected:"):
                # Counted by the replica's Rejected action.
                res.rejected.append((i, outcome.split(":", 1)[1]))
        self.metrics.pending.set(len(self.replica.pending))
        res.loop_s += time.perf_counter() - t0
        await self.execute(actions)
        # Counted at the end: a copy that arrived by two paths at once is found out
        # only after both were verified.
        self._labelled(self.metrics.duplicates, via).inc(res.duplicates)
        return res

    async def _erased(self, verified: list[tuple[int, Record | InvalidRecord]]
                      ) -> dict[bytes, bytes]:
        """For the tombstones among ``verified``: record id -> the erasure request of its
        origin that names it, arriving in this batch or held (one lookup in a worker
        thread, only when a batch holds tombstones)."""
        recs = [r for _i, r in verified if isinstance(r, Record)]
        tombs = [r for r in recs if r.payload is None]
        if not tombs:
            return {}
        found = erasure.named_by(erasure.erasures_in(recs), tombs)
        ask = [(r.id, r.origin, r.feed, r.seq) for r in tombs if r.id not in found]
        if ask:
            found.update(await in_thread(self.storage.erased_by, ask))
        return found

    def count_erasure_mismatches(self, mismatched: Sequence[tuple[bytes, str, int, str]],
                                 source: PartnerLink | None) -> None:
        """Erasure entries refused (that entry only; it erases nothing), counted under
        their reason: ``erasure_mismatch`` (a position held under another id) or
        ``erasure_not_origin`` (a record of another origin named)."""
        for by, feed, seq, reason in mismatched:
            what = ("held under another id" if reason == "erasure_mismatch" else
                    "naming a record of another origin, which only that origin can erase")
            self.count_invalid(source, reason,
                               f"erasure request {by.hex()} names {feed} seq {seq}, "
                               f"{what}: that entry is refused")

    def _verify_jobs(self, jobs: list[_Together]
                     ) -> list[list[tuple[int, Record | InvalidRecord]]]:
        """In a worker thread: :meth:`_verify` each job's items."""
        return [self._verify(items, now, accept) for items, now, accept, _f in jobs]

    def _check_batch(
        self, todo: list[_Item], now: int, accept: Callable[[bytes], bool],
    ) -> tuple[list[tuple[int, bytes]], list[tuple[int, Record | InvalidRecord]]]:
        """In a worker thread (the signature checks release the GIL): ``(held, checked)``
        -- the items already in the database as ``(index, id)``, and every other item
        verified, as ``(index, Record or the InvalidRecord it failed with)``."""
        in_db = self.storage.has_ids([t[1] for t in todo])
        held = [(t[0], t[1]) for t in todo if t[1] in in_db]
        return held, self._verify([t for t in todo if t[1] not in in_db], now, accept)

    def _verify(self, items: list[_Item], now: int, accept: Callable[[bytes], bool]
                ) -> list[tuple[int, Record | InvalidRecord]]:
        """Open (decode, check, verify) each item: ``(index, Record or InvalidRecord)``."""
        results = open_records(((body, sig, payload, rid)
                                for _, rid, body, sig, payload in items), now_ms=now,
                               verifier=self.verifier, policy=self.record_policy,
                               accept=accept, key_states=self.policy.keys.state)
        return [(t[0], r) for t, r in zip(items, results, strict=True)]

    # ------------------------------------------------------------------ one check per record

    def _claim(self, todo: list[_Item]) -> list[tuple[bytes, asyncio.Future[bool]]]:
        """Mark ``todo``'s records as being checked by this ingest (no await since the
        lookup in :attr:`_checking`: no other ingest can claim them meanwhile)."""
        loop = asyncio.get_running_loop()
        mine = [(t[1], loop.create_future()) for t in todo]
        self._checking.update(mine)
        return mine

    def _settle(self, todo: list[_Item], good: set[bytes]) -> None:
        """Give copies waiting on these records their verdict as soon as it is known
        (not when this ingest ends): True for a record held or just verified (a copy is
        a duplicate, whatever becomes of the record), False for one that failed (a copy
        is checked on its own: its signature may differ). An ingest only waits on ids
        claimed before its own, so no two ever wait on each other."""
        for t in todo:
            fut = self._checking.get(t[1])
            if fut is not None and not fut.done():
                fut.set_result(t[1] in good)

    def _release(self, mine: list[tuple[bytes, asyncio.Future[bool]]]) -> None:
        """Forget this ingest's claims; a verdict still open (the record failed, or the
        ingest failed or was cancelled) is False, so that no copy waits forever."""
        for rid, fut in mine:
            if self._checking.get(rid) is fut:
                del self._checking[rid]
            if not fut.done():
                fut.set_result(False)

    def start_commit(self, recs: list[Record], *, durable: bool,
                     source: PartnerLink | None) -> asyncio.Future[None]:
        """Queue the write of records whose heads the replica already advanced, now
        (before returning to the event loop, so writes reach the writer in the order
        their heads moved), and commit them in a task of the node's: await it shielded,
        so that a client that disconnects does not leave memory and database apart.

        A few records from a partner are gathered instead, with the others of this turn
        of the event loop, and written together at its end (see :meth:`_write_gathered`);
        any other write first sends those gathered before it on their way (order kept)."""
        if not durable and len(recs) <= INLINE_MAX_RECORDS:
            loop = asyncio.get_running_loop()
            done: asyncio.Future[None] = loop.create_future()
            alone = not self._gathered and self._ingesting <= 1 and not self._turn_busy
            if not self._gathered and not alone:
                loop.call_soon(self._write_gathered)
            self._gathered.append((recs, source, done))
            if alone:
                # No other ingest under way, and none written at once earlier in this
                # turn of the event loop: most likely nothing joins this write by the end
                # of the turn, and waiting for it cost a trip round the event loop on
                # every record a partner pushes live (scripts/bench-ingest --batch 1).
                # A second one in the same turn means requests are queueing: it, and the
                # others after it, are gathered (one commit for all of them).
                self._turn_busy = True
                loop.call_soon(self._turn_over)
                self._write_gathered()
            return done
        self._write_gathered()
        fut = self.storage.append(recs, durable=durable)
        return self.spawn(self._commit_now(recs, durable, source, fut), "commit")

    def _turn_over(self) -> None:
        self._turn_busy = False

    def _write_gathered(self) -> None:
        """Write the few-record partner writes gathered this turn of the event loop,
        in order, each a job of its own: right here, in one transaction, when the writer
        is idle (Storage.append_each), else queued for it (then together in its next
        batch). Either way they share one commit.

        Why: a partner pushing live sends one record per request. Queued one by one,
        each write cost two thread hops (wake the writer, wake the event loop with the
        result), longer than the write on a loaded 2-core machine (scripts/bench-ingest
        --batch 1 at 1 in flight); written one by one on the event loop, 64 partners'
        pushes at once lost the writer's group commit. What follows each commit runs
        here too, not in a task: no trips round the event loop."""
        gathered, self._gathered = self._gathered, []
        if not gathered:
            return
        try:
            futs = self.storage.append_each([recs for recs, _s, _d in gathered])
        except Exception as exc:  # closed (the node stops): no Store waits forever
            for _r, _s, done in gathered:
                if not done.done():
                    done.set_exception(exc)
            return
        for (recs, source, done), fut in zip(gathered, futs, strict=True):
            if fut.done() and fut.exception() is None:
                try:
                    self._committed(recs, False, source, fut.result())
                except Exception as exc:
                    done.set_exception(exc)
                else:
                    done.set_result(None)
            else:
                task = self.spawn(self._commit_now(recs, False, source, fut), "commit")
                task.add_done_callback(functools.partial(_copy_outcome, done))

    async def _commit_now(self, recs: list[Record], durable: bool,
                          source: PartnerLink | None, fut: Future[Any]) -> None:
        try:
            mismatched = await asyncio.wrap_future(fut)
        except CitynodeError:
            # The write failed (a full disk; or a bug the writer refused). The replica's
            # heads of these chains are ahead of the database: take them back to what
            # it holds, once every write queued before ours has landed.
            await asyncio.wrap_future(self.storage.barrier())  # writes nothing: a full
            # disk does not stop it
            stored = await in_thread(self.storage.heads)
            self.before_rewind(stored)
            self.replica.rewind(recs, stored)
            raise
        self._committed(recs, durable, source, mismatched)

    def _committed(self, recs: list[Record], durable: bool, source: PartnerLink | None,
                   mismatched: list[tuple[bytes, str, int, str]]) -> None:
        """The write of ``recs`` committed: count them, and tell the listeners."""
        self._labelled(self.metrics.stored, "own" if durable else "replica").inc(len(recs))
        self.metrics.feeds.set(len(self.replica.heads))
        if mismatched:
            self.count_erasure_mismatches(mismatched, source)
        self.on_commit(recs, source)

    def _labelled(self, metric: Any, label: str) -> Any:
        """``metric.labels(label)``, looked up once per label (labels() costs a few
        microseconds and a lock: several times on every record pushed live)."""
        child = self._children.get((id(metric), label))
        if child is None:
            if len(self._children) >= 256:
                self._children.clear()  # (a bound: a few metrics x a few labels)
            child = self._children[(id(metric), label)] = metric.labels(label)
        return child

    # ------------------------------------------------------------------ refusals

    def _reject(self, res: IngestResult, i: int, exc: InvalidRecord,
                source: PartnerLink | None) -> None:
        res.rejected.append((i, exc.reason))
        self.count_invalid(source, exc.reason, str(exc))

    def count_invalid(self, source: PartnerLink | None, reason: str, detail: str,
                      n: int = 1) -> None:
        """Count ``n`` rejected items (of one kind) everywhere an operator looks: the
        metrics and the partner's own tally (``citynode partner list``) count each; the
        bounded rejected log gets one row for them, at most :data:`LOG_ROWS_PER_SECOND`
        a second per source and reason (a row after a pause notes how many were not
        logged). Each row is a write on the one writer thread that also commits honest
        records: a partner sending refusals by the thousand a second must not queue
        thousands of writes ahead of them."""
        if n < 1:
            return
        self.metrics.rejected.labels(reason).inc(n)
        src = self.partners.count_invalid(source, reason, n)
        now = self.now_ms()
        second = now // 1000
        at, rows, skipped = self._log_rate.get((src, reason), (second, 0, 0))
        if at != second:
            at, rows = second, 0
        if rows >= LOG_ROWS_PER_SECOND:
            self._log_rate[(src, reason)] = (at, rows, skipped + n)
            return
        if len(self._log_rate) >= _LOG_RATE_KEYS_MAX:
            self._log_rate.clear()  # (a bound: partners x reasons, never reached)
        self._log_rate[(src, reason)] = (at, rows + 1, 0)
        if n > 1:
            detail = f"{n} items: {detail}"
        if skipped:
            detail = f"({skipped} more like it not logged) {detail}"
        self.storage.log_rejected(src, reason, detail[:500], now)


def _copy_outcome(done: asyncio.Future[None], task: asyncio.Task[None]) -> None:
    """Give ``done`` the outcome of ``task`` (unless ``done`` was settled already)."""
    if done.done():
        return
    if task.cancelled():
        done.cancel()
    else:
        exc = task.exception()
        if exc is not None:
            done.set_exception(exc)
        else:
            done.set_result(None)


async def _nothing(actions: Sequence[rp.Action]) -> None:
    return None


async def _no_log(source: PartnerLink, origin: bytes) -> bool:
    return False
