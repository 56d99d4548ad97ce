"""The node: wires storage, the protocol core and the transport; owns every background task.

Ingest pipeline for records from outside (push, fetch, subscribe)::

    envelope bytes ──► split + id (SHA-256) ──► already held? ──yes──► duplicate (no verify)
                                                   │ no
                                      origin accepted by trust policy and quota?
                                                   │ yes
                         open_record (canonical decode, fields, time, payload, signature)
                                                   │        (in a worker thread: PyNaCl
                                                   ▼         releases the GIL)
                       classify against the in-memory chain heads (event loop, no await)
             EXTENDS ─► queue for the writer   AHEAD ─► pending buffer   EQUIVOCATION ─► proof
                                                   │
                                   writer commits ─► push to partners, wake subscribers

Classification and the head update happen with no ``await`` in between, so two
concurrent ingests can never both extend a chain from the same head.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import math
import random
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from citynode import __version__
from citynode.config import Config, load_config
from citynode.core import access, cards, checkpoints, sync
from citynode.core.chain import FeedHead, ForkProof, Verdict, classify
from citynode.core.encoding import Limits
from citynode.core.keys import Verifier, node_id, parse_node_id
from citynode.core.records import (
    Record,
    RecordPolicy,
    check_feed_name,
    decode_envelope,
    open_record,
    open_records,
    parse_body,
    record_id,
    sign_record,
)
from citynode.errors import (
    ChainError,
    CitynodeError,
    InvalidProof,
    InvalidRecord,
    PayloadError,
    PeerError,
    PeerRejected,
    PublishRefused,
    StorageError,
)
from citynode.identity import Identity, load_identity
from citynode.logs import fields
from citynode.metrics import Metrics
from citynode.storage import PartnerRow, Storage
from citynode.transport.client import PeerClient

__all__ = ["IngestResult", "Node"]

log = logging.getLogger("citynode.node")
T = TypeVar("T")
FeedKey = tuple[bytes, str]

DB_NAME = "citynode.db"
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
# Checkpoints and proofs kept per partner while it is away (each a few hundred bytes).
OUTBOX_MAX = 1000
OUTBOX_PER_ROUND = 50
OUTBOX_REFUSALS = 5  # a checkpoint or proof refused for the moment this often is dropped
# A chain that a push extended this recently is flowing: a sync round leaves it to push.
PUSH_FLOWING = 3.0
# Bounds on the signed cards of other nodes kept (and served on /v1/cards).
MAX_CARDS = 10_000
MAX_CARD_BYTES = 32 * 1024 * 1024
# Live streams served at once.
MAX_SUBSCRIBERS = 1000
#: Tail batches a live stream may have waiting; past that it re-reads from the database.
STREAM_QUEUE_BATCHES = 1000


@dataclass
class IngestResult:
    """What became of a batch of envelopes."""

    accepted: int = 0
    duplicates: int = 0
    pending: int = 0
    forks: int = 0
    rejected: list[tuple[int, str]] = field(default_factory=list)  # (index, reason)
    dup: list[int] = field(default_factory=list)  # indexes of copies already held

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


class PartnerLink:
    """Everything the node keeps about one partner while running."""

    def __init__(self, row: PartnerRow, client: PeerClient, queue_max: int) -> None:
        self.row = row
        self.client = client
        self.key = row.public_key
        self.view = sync.PeerView()
        self.queue: deque[Record] = deque()
        self.queue_max = queue_max
        self.overflowed = False  # push dropped something: pull must repair
        self.wake = asyncio.Event()
        self.sync_now = asyncio.Event()
        self.up = False
        self.failures = 0
        self.last_ok_ms: int | None = None
        self.last_error: str | None = None
        self.invalid: dict[str, int] = {}
        self.synced_once = asyncio.Event()
        self.first_attempt = asyncio.Event()  # the first sync round ended, well or not
        self.tasks: list[asyncio.Task[None]] = []
        # Plumtree-style lazy push: origins whose records this partner already gets
        # through someone else. For those we only announce (origin, feed, seq, head).
        self.lazy: set[bytes] = set()
        self.announce: dict[tuple[bytes, str], tuple[int, bytes]] = {}
        self.graft_pending: set[tuple[bytes, str]] = set()
        # Checkpoints and proofs this partner has not taken yet (it was down): sent again
        # after the next good sync round. Keyed by a hash of (path, payload), so one
        # is kept once; oldest first; bounded.
        self.outbox: OrderedDict[bytes, tuple[str, bytes, int]] = OrderedDict()

    def keep_for_later(self, path: str, payload: bytes, refusals: int = 0) -> None:
        """Send ``payload`` to ``path`` after the next good round (the oldest goes once
        OUTBOX_MAX wait: a partner that long gone is caught up by a newer checkpoint).
        ``refusals``: how often the partner, reachable, refused it for the moment; at
        OUTBOX_REFUSALS it is dropped (it may never trust that origin)."""
        if refusals >= OUTBOX_REFUSALS:
            return
        key = hashlib.sha256(path.encode() + b"\0" + payload).digest()
        self.outbox[key] = (path, payload, refusals)
        while len(self.outbox) > OUTBOX_MAX:
            self.outbox.popitem(last=False)

    def announce_later(self, rec: Record) -> None:
        key = (rec.origin, rec.feed)
        old = self.announce.get(key)
        if old is None or old[0] < rec.seq:
            self.announce[key] = (rec.seq, rec.id)
        self.wake.set()

    def enqueue(self, rec: Record) -> None:
        if len(self.queue) >= self.queue_max:
            self.queue.popleft()
            self.overflowed = True
            self.sync_now.set()
        self.queue.append(rec)
        self.wake.set()

    def status(self) -> dict[str, Any]:
        return {
            "node_id": self.row.node_id,
            "name": self.row.name,
            "url": self.row.url,
            "up": self.up,
            "failures": self.failures,
            "last_ok_ms": self.last_ok_ms,
            "last_error": self.last_error,
            "queue": len(self.queue),
            "invalid": dict(self.invalid),
        }


class StreamBatch(NamedTuple):
    """Consecutive tail rows for one live stream: their cursors, their SSE events, and
    the events as one chunk ready to write (shared by every stream of the same group)."""

    rowids: list[int]
    texts: list[str]
    chunk: bytes

    def after(self, cursor: int) -> bytes:
        """The events of rows after ``cursor`` (a stream that caught up from storage
        must not send what it already sent)."""
        if self.rowids[0] > cursor:
            return self.chunk
        return "".join(t for r, t in zip(self.rowids, self.texts, strict=True)
                       if r > cursor).encode()


class Subscriber:
    """One live stream's view of the tail: batches of new stored rows matching its
    filter.

    Streams with the same ``group`` (same filter, same reader) see the same rows: the
    tail matches and renders them once per group, not once per stream. A stream with its
    own ``render`` (the operator's, decrypting) is a group of its own.
    """

    def __init__(self, match: Callable[[Any], bool],
                 render: Callable[[Any], str] | None = None,
                 group: Hashable | None = None,
                 on_lag: Callable[[], None] | None = None,
                 envelope_only: bool = False) -> None:
        self.match = match
        self.render = render
        self.envelope_only = envelope_only  # events carry the envelope alone (see below)
        self.group: Hashable = group if group is not None and render is None else self
        # None in the queue: wake up, the stream is to end (see close()).
        self.queue: asyncio.Queue[StreamBatch | None] = asyncio.Queue(STREAM_QUEUE_BATCHES)
        self.lagging = False  # the queue overflowed: re-read from storage by cursor
        self.closed = False  # asked to end: the stream's handler ends its response
        self._on_lag = on_lag

    def offer(self, batch: StreamBatch) -> None:
        if self.closed:
            return
        try:
            self.queue.put_nowait(batch)
        except asyncio.QueueFull:
            self.lagging = True
            if self._on_lag is not None:
                self._on_lag()

    def close(self) -> None:
        """Ask the stream to end: its handler stops waiting for batches, ends its response
        and unregisters (the subscriber resumes by cursor, losing nothing). Idempotent."""
        if self.closed:
            return
        self.closed = True
        # A full queue: the handler is not waiting; it writes those, then sees ``closed``.
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait(None)  # wakes a handler waiting for the next batch


class _RecentIds:
    """A bounded set of ids recently committed, so a duplicate arriving while the database
    is still being asked costs no signature verification."""

    def __init__(self, size: int = 200_000) -> None:
        self._d: OrderedDict[bytes, None] = OrderedDict()
        self._size = size

    def add(self, rid: bytes) -> None:
        self._d[rid] = None
        if len(self._d) > self._size:
            self._d.popitem(last=False)

    def __contains__(self, rid: object) -> bool:
        return rid in self._d


class Node:
    """A running citynode. Create with :meth:`load`, then ``await start()``."""

    def __init__(
        self,
        data_dir: Path,
        config: Config,
        identity: Identity,
        storage: Storage,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.data_dir = data_dir
        self.config = config
        self.identity = identity
        self.key = identity.key
        self.public_key = identity.key.public_key
        self.node_id = identity.node_id
        self.storage = storage
        self.clock = clock
        self.metrics = Metrics()
        self.verifier = Verifier()
        lim = config.limits
        self.policy = RecordPolicy(
            body_limits=Limits(max_bytes=lim.max_body_bytes),
            future_tolerance_ms=int(lim.future_tolerance_seconds * 1000),
        )
        self.heads: dict[FeedKey, FeedHead] = {}
        # When a push last extended each chain (monotonic seconds): see sync_with.
        self.pushed_at: dict[FeedKey, float] = {}
        self.inflight: set[bytes] = set()
        self.recent = _RecentIds()
        self.pending = sync.PendingBuffer(lim.pending_max_records, lim.pending_max_bytes)
        self.quota = sync.OriginQuota(
            config.federation.origin_quota_records_per_day,
            config.federation.origin_quota_bytes_per_day,
        )
        self.vouch = sync.VouchGraph()
        self.links: dict[bytes, PartnerLink] = {}
        self.own_blocked: dict[str, str] = {}  # feed -> why publishing is refused
        # Own feeds with a fork or split-view proof against them: this node signed two
        # histories. Nothing more is signed on them, ever (feed -> the seq proven).
        self.own_forked: dict[str, int] = {}
        self._own_targets: dict[str, int] = {}  # feed -> seq a partner holds of ours
        self._trusted: Callable[[bytes], bool] | None = None  # trust policy snapshot
        # Derived from cards and links, rebuilt after either changes (_forget_derived):
        # feed policies asked for on every record pushed and every sync answer, and the
        # keys this node knows (signed reads).
        self._policies: dict[tuple[bytes, str], access.FeedPolicy] = {}
        self._known: frozenset[bytes] | None = None
        self.feed_locks: dict[str, asyncio.Lock] = {}
        self.listeners: set[Callable[[Sequence[Record]], None]] = set()
        self.cards_seen: dict[bytes, bytes] = {}  # public key -> card envelope
        self.card_info: dict[bytes, cards.NodeCard] = {}  # public key -> parsed card
        self._card_envs: set[bytes] = set()  # the envelopes in cards_seen
        self._cards_bytes = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self.subscribers: set[Subscriber] = set()
        self.logs: dict[FeedKey, checkpoints.MerkleLog] = {}  # Merkle trees, built lazily
        self._tail_rowid = 0
        self._tail_wake = asyncio.Event()
        self._card: cards.NodeCard | None = None
        self._stopping = False
        self.streams_closed = False  # close_streams() was called: no new streams
        self.ready = False

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def load(cls, data_dir: Path, *, passphrase: str | None = None) -> Node:
        """Open a data dir made by ``citynode init``. Raises ConfigError, KeyFileError,
        StorageError with a message naming what to fix."""
        data_dir = Path(data_dir)
        config = load_config(data_dir / "node.toml")
        identity = load_identity(data_dir, passphrase)
        storage = Storage.open(
            data_dir / DB_NAME, rejected_log_rows=config.limits.rejected_log_rows
        )
        return cls(data_dir, config, identity, storage)

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    async def _io(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking storage read in a worker thread."""
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    async def start(self, *, partners: bool = True) -> None:
        """Load state and (unless ``partners=False``, for one-shot CLI commands) start the
        partner tasks. The HTTP server is the caller's."""
        raw = await self._io(self.storage.heads)
        self.heads = {k: FeedHead(seq, hid) for k, (seq, hid) in raw.items()}
        for row in await self._io(self.storage.fork_proofs):
            self._note_fork(row.origin, row.feed, row.seq)
        if partners:
            for row in await self._io(self.storage.partners):
                self._start_link(row)
        for k, env in await self._io(self._load_cards):
            self._learn_card(env, k)
        self._tail_rowid = await self._io(self.storage.max_rowid)
        self.spawn(self._tail_loop(), "tail")
        if partners:
            self.spawn(self._checkpoint_loop(), "checkpoints")
            # Signed (and kept) now, not first when served: an export of our own feeds
            # carries it, and tells the feeds' access levels from it.
            self.card()
        self.ready = True
        self.metrics.feeds.set(len(self.heads))
        log.info(
            "node started",
            # Chains held (any origin) and own feeds configured: two different counts.
            extra=fields(node=self.node_id, chains_held=len(self.heads),
                         feeds_configured=len(self.config.feeds), partners=len(self.links)),
        )

    def _load_cards(self) -> list[tuple[bytes, bytes]]:
        out = []
        for row in self.storage.partners():
            if row.card:
                out.append((row.public_key, row.card))
        return out

    async def stop(self) -> None:
        """Stop background tasks and close storage; everything acknowledged is committed."""
        self._stopping = True
        self.ready = False
        self.close_streams()
        for link in list(self.links.values()):
            await self._stop_link(link)
        commits = [t for t in self._tasks if t.get_name() == "commit"]
        if commits:  # let writes already under way finish and be acknowledged
            await asyncio.wait(commits, timeout=30)
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._io(self.storage.close)
        log.info("node stopped", extra=fields(node=self.node_id))

    def spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        """Start a background task owned by the node (kept until it ends)."""
        t = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(t)
        t.add_done_callback(self._task_done)
        return t

    def _task_done(self, t: asyncio.Task[Any]) -> None:
        self._tasks.discard(t)
        if not t.cancelled() and t.exception() is not None:
            # A background task must never die silently: say so loudly.
            log.error("background task failed", exc_info=t.exception(),
                      extra=fields(task=t.get_name()))

    # ------------------------------------------------------------------ card

    def card(self) -> cards.NodeCard:
        """Our signed node card, re-signed whenever our partners or our feeds change (a
        feed must be listed before partners relay it: unlisted feeds are not public)."""
        feeds = sorted(
            {f for (o, f) in self.heads if o == self.public_key} | set(self.config.feeds)
        )
        if self._card is None or [f.name for f in self._card.feeds] != feeds:
            self._card = cards.make_card(
                self.key,
                name=self.config.node.name,
                url=self.config.node.public_url,
                tls_fingerprint=self.identity.cert_fingerprint if self.config.tls.enabled else None,
                feeds=[(f, self.feed_access(f)) for f in feeds],
                partners=sorted(self.links),
                software=f"citynode/{__version__}",
                now_ms=self.now_ms(),
            )
            self.storage.set_meta("card:" + self.public_key.hex(), self._card.envelope)
        return self._card

    def feed_access(self, feed: str) -> str:
        """The access level of this node's own ``feed`` as configured when it started
        (a feed not in node.toml is public)."""
        fc = self.config.feeds.get(feed)
        return fc.access if fc is not None else "public"

    def _learn_card(self, env: bytes, expected_key: bytes | None = None) -> bool:
        if env in self._card_envs:
            return False  # seen exactly this one: no need to verify it again
        try:
            c = cards.open_card(
                env,
                expected_node_id=node_id(expected_key) if expected_key else None,
                verifier=self.verifier,
                now_ms=self.now_ms(),
            )
        except CitynodeError as exc:
            log.info("ignored an invalid card", extra=fields(error=str(exc)))
            return False
        prev = self.card_info.get(c.node)
        if prev is not None and prev.time >= c.time:
            return False
        if c.node not in self.cards_seen and (
                len(self.cards_seen) >= MAX_CARDS or self._cards_bytes + len(env) > MAX_CARD_BYTES):
            return False  # bounded: a flood of self-made cards cannot fill memory
        old = self.cards_seen.get(c.node)
        if old is not None:
            self._card_envs.discard(old)
            self._cards_bytes -= len(old)
        self._card_envs.add(env)
        self._cards_bytes += len(env)
        self.cards_seen[c.node] = env
        self.card_info[c.node] = c
        self.vouch.add_card(c.node, set(c.partners))
        self._forget_derived()
        if c.node != self.public_key and (
                prev is None or prev.feeds != c.feeds or prev.partners != c.partners) and (
                any(k[0] == c.node for k in self.heads)):
            # Records of that node we hold and may have held back (a feed its old card
            # did not list, a partner it did not have) may now go on: a sync round with every
            # partner now tells them of our heads, and they fetch what they lack (and
            # this card first). Otherwise a new feed would cross one relay hop per pull
            # interval.
            for link in self.links.values():
                link.sync_now.set()
        # Kept so `citynode export` can put the origin's card in an auditor's bundle.
        self.storage.set_meta("card:" + c.node.hex(), env)
        return True

    def trust_check(self) -> Callable[[bytes], bool]:
        """The trust policy (config ``federation.accept``) as a function of an origin key,
        over a frozen snapshot of partners and vouches: safe to call from worker threads,
        rebuilt when partners or cards change."""
        if self._trusted is None:
            fed = self.config.federation
            direct = frozenset(self.links)
            vouched = frozenset(
                self.vouch.trusted(self.public_key, set(direct), fed.vouch_hops)
                if fed.accept == "vouched" else ()
            )
            me, policy = self.public_key, fed.accept

            def check(origin: bytes) -> bool:
                return sync.accept_origin(origin, policy=policy, self_key=me,
                                          partners=direct, vouched=vouched)

            self._trusted = check
        return self._trusted

    def accepts_origin(self, origin: bytes) -> bool:
        """Does the trust policy accept records of ``origin``?"""
        return self.trust_check()(origin)

    # ------------------------------------------------------------------ ingest

    async def ingest(
        self, envelopes: Sequence[bytes], *, source: PartnerLink | None = None,
        via: str = "push",
    ) -> IngestResult:
        """Verify and store records from outside. Never raises for bad records: each is
        rejected with a reason (counted, logged in the bounded rejected log)."""
        res = IngestResult()
        src = source.row.node_id if source else "local"
        now = self.now_ms()
        mono = time.monotonic()
        todo: list[tuple[int, bytes, bytes, bytes]] = []
        seen: set[bytes] = set()
        self.metrics.received.labels(via).inc(len(envelopes))
        for i, env in enumerate(envelopes):
            try:
                body, sig = decode_envelope(env, self.policy.body_limits)
            except InvalidRecord as exc:
                self._reject(res, i, exc, source)
                continue
            rid = record_id(body)
            if rid in seen or rid in self.inflight or rid in self.recent:
                res.duplicate(i)
                continue
            seen.add(rid)
            todo.append((i, rid, body, sig))
        verified: list[tuple[int, Record | InvalidRecord]] = []
        if todo:
            # One trip to a worker thread: the lookup, then verification of what is new
            # (each thread hop is latency on every relay hop).
            held, verified = await asyncio.get_running_loop().run_in_executor(
                None, self._check_batch, todo, now, self.trust_check()
            )
            for i, rid in held:
                res.duplicate(i)
                self.recent.add(rid)
        if not verified:
            self.metrics.duplicates.labels(via).inc(res.duplicates)
            return res
        to_store: list[Record] = []
        forks: list[tuple[Record, int]] = []
        for i, item in verified:
            if isinstance(item, InvalidRecord):
                self._reject(res, i, item, source)
                continue
            rec = item
            key = (rec.origin, rec.feed)
            if source is not None:
                source.view.update(key, rec.seq)
                c = self.card_info.get(rec.origin)
                if c is not None and rec.origin != self.public_key and not any(
                        f.name == rec.feed for f in c.feeds):
                    source.sync_now.set()  # a feed newer than the card we hold: refresh
            if rec.id in self.inflight or rec.id in self.recent:
                res.duplicate(i)
                continue
            if not self.accepts_origin(rec.origin):  # trust changed while verifying
                self._reject(res, i, InvalidRecord(
                    f"origin {node_id(rec.origin)} is not trusted by this node's policy "
                    f"({self.config.federation.accept})", "untrusted_origin"), source)
                continue
            d = classify(rec, self.heads.get(key), None)
            if d.verdict is Verdict.EXTENDS and not self.quota.allow(
                    rec.origin, len(rec.body), now):
                # Charged only for records stored: re-sent or out-of-order copies cannot
                # spend a third party's quota.
                self._reject(
                    res, i, InvalidRecord("origin over its daily quota", "quota"), source
                )
                continue
            if d.verdict is Verdict.EXTENDS:
                self._extend(rec, to_store)
                res.accepted += 1
                if via in ("push", "graft"):
                    self.pushed_at[key] = mono
            elif d.verdict is Verdict.AHEAD:
                head = self.heads.get(key)
                if self.pending.add(rec, head_seq=head.seq if head else 0):
                    res.pending += 1
                if source is not None:
                    source.sync_now.set()
            else:
                forks.append((rec, d.conflicts_with_seq or rec.seq))
        for rec in self.pending.take_conflicts():
            key = (rec.origin, rec.feed)
            d = classify(rec, self.heads.get(key), None)
            if d.verdict is Verdict.EQUIVOCATION:
                forks.append((rec, d.conflicts_with_seq or rec.seq))
        self.metrics.pending.set(len(self.pending))
        if to_store:
            await self._commit(to_store, durable=False, source=source)
        for rec, seq in forks:
            if await self._equivocation(rec, seq, src):
                res.forks += 1
            else:
                res.duplicates += 1
        # Counted at the end: a copy that arrived by two paths at once is found out
        # only after both were verified.
        self.metrics.duplicates.labels(via).inc(res.duplicates)
        return res

    def _check_batch(
        self, todo: list[tuple[int, bytes, bytes, bytes]], now: int,
        accept: Callable[[bytes], bool],
    ) -> tuple[list[tuple[int, bytes]], list[tuple[int, Record | InvalidRecord]]]:
        """In a worker thread (the signature checks release the GIL): ``(held, checked)``
        -- the items already in the database as ``(index, id)``, and every other item
        verified, as ``(index, Record or the InvalidRecord it failed with)``."""
        in_db = self.storage.has_ids([t[1] for t in todo])
        held = [(t[0], t[1]) for t in todo if t[1] in in_db]
        fresh = [t for t in todo if t[1] not in in_db]
        results = open_records(((body, sig, rid) for _, rid, body, sig in fresh), now_ms=now,
                               verifier=self.verifier, policy=self.policy, accept=accept)
        return held, [(t[0], r) for t, r in zip(fresh, results, strict=True)]

    def _extend(self, rec: Record, to_store: list[Record]) -> None:
        """Append ``rec`` (which extends its chain) and any pending records it unblocks."""
        key = (rec.origin, rec.feed)
        for r in [rec, *self.pending.take_ready(key, rec.seq, rec.id)]:
            self.heads[key] = FeedHead(r.seq, r.id)
            self.inflight.add(r.id)
            to_store.append(r)
        # the last one appended is the head
        last = to_store[-1]
        self.heads[key] = FeedHead(last.seq, last.id)

    async def _commit(
        self, recs: list[Record], *, durable: bool, source: PartnerLink | None
    ) -> None:
        """Commit records whose heads are already advanced in memory, then push and wake
        streams. Shielded: a client that disconnects must not leave memory and database
        apart (the write and everything after it run to the end regardless).

        The write is queued now, before this returns to the event loop, so writes reach
        the writer in the order their heads were advanced."""
        fut = self.storage.append(recs, durable=durable)
        await asyncio.shield(
            self.spawn(self._commit_now(recs, durable, source, fut), "commit"))

    async def _commit_now(
        self, recs: list[Record], durable: bool, source: PartnerLink | None,
        fut: Any,
    ) -> None:
        try:
            await asyncio.wrap_future(fut)
        except CitynodeError:
            # The writer refused (should not happen: defence in depth). Our in-memory heads
            # may be ahead of the database: reload them.
            for r in recs:
                self.inflight.discard(r.id)
            # Reload only after every write queued before ours has landed.
            await asyncio.wrap_future(self.storage.set_meta("heads-reloaded", b""))
            raw = await self._io(self.storage.heads)
            self.heads = {k: FeedHead(s, h) for k, (s, h) in raw.items()}
            raise
        for r in recs:
            self.inflight.discard(r.id)
            self.recent.add(r.id)
        self.metrics.stored.labels("own" if durable else "replica").inc(len(recs))
        self.metrics.feeds.set(len(self.heads))
        self._after_commit(recs, source)

    def _after_commit(self, recs: Sequence[Record], source: PartnerLink | None) -> None:
        for link in self.links.values():
            if link is source:
                continue
            for r in recs:
                key = (r.origin, r.feed)
                if link.view.knows(key, r.seq) or not self._may_send(link, r):
                    continue
                if r.origin in link.lazy:
                    link.announce_later(r)
                else:
                    link.enqueue(r)
        self._tail_wake.set()
        for fn in list(self.listeners):
            try:
                fn(recs)
            except Exception:  # a subscriber's bug must not break ingest
                log.exception("listener failed")

    def _forget_derived(self) -> None:
        """Cards or partners changed: what was derived from them is rebuilt when asked."""
        self._trusted = None
        self._policies = {}
        self._known = None

    def feed_policy(self, origin: bytes, feed: str) -> access.FeedPolicy:
        """The access level of a feed: ours from node.toml, others' from their cards."""
        key = (origin, feed)
        pol = self._policies.get(key)
        if pol is None:
            if len(self._policies) >= 100_000:  # bounded: feeds are many, cards change
                self._policies = {}
            pol = self._policies[key] = self._feed_policy(origin, feed)
        return pol

    def _feed_policy(self, origin: bytes, feed: str) -> access.FeedPolicy:
        if origin == self.public_key:
            fc = self.config.feeds.get(feed)
            level = fc.access if fc is not None else access.PUBLIC
            readers = frozenset(parse_node_id(r) for r in fc.readers) if fc else frozenset()
            return access.FeedPolicy(level, frozenset(self.links), readers)
        c = self.card_info.get(origin)
        if c is None:
            return access.FeedPolicy(access.PARTNERS)
        # A card lists every feed its node has configured or published when it signed
        # it; a feed it does not list is newer than the card: unknown, so not public
        # (the next card exchange tells).
        level = next((f.access for f in c.feeds if f.name == feed), access.PARTNERS)
        return access.FeedPolicy(level, frozenset(c.partners))

    def _may_send(self, link: PartnerLink, rec: Record) -> bool:
        """Access policy on the push path, for this record (sealed or not)."""
        pol = self.feed_policy(rec.origin, rec.feed)
        if pol.access == access.RESTRICTED:
            pol = access.for_record(pol, _sealed_to(rec.sealed))
        return access.may_relay(pol, rec.origin, link.key)

    def may_pass(self, link: PartnerLink, origin: bytes, feed: str,
                 proof: bytes | None = None) -> bool:
        """May this partner be sent what is about a feed -- its head in a frontier, its
        checkpoints, a proof about it? As for the feed's records: a partners feed's
        seqs, heads and roots stay with the origin's partners (its name and level are
        in the origin's card, which is public). A fork ``proof`` carries two records: of
        a restricted feed, if either is in clear, the partners rule holds."""
        pol = self.feed_policy(origin, feed)
        if pol.access == access.RESTRICTED and proof is not None:
            try:
                fp = ForkProof.decode(proof)
            except InvalidProof:  # a split view: checkpoints, no record
                return access.may_relay(pol, origin, link.key)
            # Both records: the proof carries either one in clear if it is.
            return all(access.may_relay(access.for_record(pol, _readers_of(env)), origin,
                                        link.key) for env in (fp.a, fp.b))
        return access.may_relay(pol, origin, link.key)

    def knows_key(self, key: bytes) -> bool:
        """Is ``key`` a node this one knows: a partner, a partner of a partner (listed in
        that partner's signed card), or a reader of one of its own restricted feeds?
        Not every card held: a member could gossip cards of keys it made up."""
        if self._known is None:
            known = set(self.links)
            for pk in self.links:
                c = self.card_info.get(pk)
                if c is not None:
                    known.update(c.partners)
            known.update(parse_node_id(r) for fc in self.config.feeds.values()
                         for r in fc.readers)
            self._known = frozenset(known)
        return key in self._known

    def frontier_for(self, link: PartnerLink) -> sync.Frontier:
        """Our heads, less the feeds this partner may not be sent."""
        return {k: (h.seq, h.id) for k, h in self.heads.items()
                if self.may_pass(link, k[0], k[1])}

    async def may_read_feed(self, origin: bytes, feed: str, caller: bytes | None) -> bool:
        """May ``caller`` read what is about a whole feed (its checkpoints, consistency
        proofs)? As it may read the feed's latest record held: for a restricted feed,
        that record's recipients are the readers known here (in clear: the partners
        rule); with no record held, the feed's policy alone."""
        head = self.heads.get((origin, feed))
        env = None
        if head is not None and self.feed_policy(origin, feed).access == access.RESTRICTED:
            env = await self._io(self.storage.envelope_at, origin, feed, head.seq)
        return self.may_read(origin, feed, caller, env)

    def may_read(self, origin: bytes, feed: str, caller: bytes | None,
                 envelope: bytes | None = None) -> bool:
        """Access policy on the read paths (get, query, stream, export): for a record when
        its ``envelope`` is given (a restricted feed's record is readable by the nodes it
        is sealed to, and one in clear is held to the partners rule), else for the feed
        (for a restricted feed: its origin's readers, or none known here)."""
        pol = self.feed_policy(origin, feed)
        if pol.access == access.RESTRICTED and envelope is not None:
            pol = access.for_record(pol, _readers_of(envelope))
        return access.may_read(pol, origin, caller)

    async def _equivocation(self, rec: Record, seq: int, src: str) -> bool:
        held = await self._io(self.storage.envelope_at, rec.origin, rec.feed, seq)
        if held is None:
            return False
        try:
            from citynode.core.chain import canonical_fork_proof, verify_fork_proof

            proof, at = canonical_fork_proof(
                *verify_fork_proof(ForkProof(held, rec.envelope), self.verifier))
        except CitynodeError:
            return False  # not a fork after all (e.g. same record)
        new = await asyncio.wrap_future(
            self.storage.add_fork_proof(
                rec.origin, rec.feed, at, "fork", proof.encode(), src, self.now_ms()
            )
        )
        self._note_fork(rec.origin, rec.feed, at)
        if new:
            self.metrics.forks.inc()
            log.warning(
                "equivocation detected: the origin signed two different records for one seq",
                extra=fields(origin=node_id(rec.origin), feed=rec.feed, seq=rec.seq, by=src),
            )
            enc = proof.encode()
            for link in self.links.values():
                if self.may_pass(link, rec.origin, rec.feed, enc):
                    self.spawn(self._send_proof(link, enc), "send-proof")
        return True

    async def _send_proof(self, link: PartnerLink, proof: bytes) -> None:
        await self._deliver(link, "/v1/proofs", proof)

    async def _deliver(self, link: PartnerLink, path: str, payload: bytes,
                       refusals: int = 0) -> bool:
        """POST a checkpoint or proof to a partner. Unreachable (or a 5xx): kept for
        after its next good sync round, so one that was down still gets it; returns
        False. Refused for the moment (busy, clock skew, an origin it does not trust
        yet): kept, a few times; refused for what it is (invalid, too large): dropped.
        Returns True when the partner answered."""
        try:
            await link.client.request("POST", path, payload)
        except PeerRejected as exc:
            if exc.status >= 500:
                link.keep_for_later(path, payload, refusals)
                return False
            if not _verdict_on_payload(exc):
                link.keep_for_later(path, payload, refusals + 1)
            return True
        except PeerError:
            link.keep_for_later(path, payload, refusals)
            return False
        return True

    async def _flush_outbox(self, link: PartnerLink, first_round: bool) -> None:
        """After a good sync round: what this partner missed while it was away. After the
        first round since this node started, also the latest checkpoint held of each
        feed it may be sent, and the proofs held (what it may have missed while this
        node was down, or before it was a partner), since the outbox does not outlive
        the process."""
        if first_round:
            for origin, feed in list(self.heads)[:OUTBOX_MAX // 2]:
                if not self.may_pass(link, origin, feed):
                    continue
                held = await self._io(self.storage.checkpoints, origin, feed)
                if held:
                    link.keep_for_later("/v1/checkpoints", held[-1][2])
            for f in (await self._io(self.storage.fork_proofs))[:OUTBOX_MAX // 2]:
                if self.may_pass(link, f.origin, f.feed, f.proof):
                    link.keep_for_later("/v1/proofs", f.proof)
        # A budget per round: a partner that answers slowly must not hold this link's
        # sync rounds for the whole outbox (the rest goes after the next round).
        for _ in range(min(len(link.outbox), OUTBOX_PER_ROUND)):
            key, (path, payload, refusals) = next(iter(link.outbox.items()))
            del link.outbox[key]
            if not await self._deliver(link, path, payload, refusals):
                return  # away again: kept (at the end), tried after the next good round

    async def ingest_proof(self, data: bytes, src: str) -> bool:
        """A fork or split-view proof from a partner: verify it offline, store and
        forward it if new. Raises InvalidProof if it proves nothing."""
        from citynode.core.chain import canonical_fork_proof, verify_fork_proof

        try:
            proof = ForkProof.decode(data)
        except InvalidProof:
            sv = checkpoints.SplitViewProof.decode(data)
            ca, _cb = checkpoints.verify_split_view(sv, self.verifier)
            origin, feed, seq, kind = ca.origin, ca.feed, ca.size, "split-view"
            enc = sv.canonical().encode()
        else:
            a, b = verify_fork_proof(proof, self.verifier)
            proof, seq = canonical_fork_proof(a, b)
            origin, feed, kind, enc = a.origin, a.feed, "fork", proof.encode()
        if not self.accepts_origin(origin):
            # Proofs about strangers are no business of ours (and would let anyone fill
            # our database and our partners' with them).
            raise InvalidProof("proof about an origin this node does not trust")
        new = await asyncio.wrap_future(
            self.storage.add_fork_proof(origin, feed, seq, kind, enc, src, self.now_ms())
        )
        self._note_fork(origin, feed, seq)
        if new:
            self.metrics.forks.inc()
            for link in self.links.values():
                if link.row.node_id != src and self.may_pass(link, origin, feed, enc):
                    self.spawn(self._send_proof(link, enc), "send-proof")
        return new

    def _reject(
        self, res: IngestResult, i: int, exc: InvalidRecord, source: PartnerLink | None
    ) -> None:
        res.rejected.append((i, exc.reason))
        self.count_invalid(source, exc.reason, str(exc))

    def count_invalid(self, source: PartnerLink | None, reason: str, detail: str) -> None:
        """Count one rejected item everywhere an operator looks: the metrics, the
        partner's own tally (``citynode partner list``) and the bounded rejected log."""
        self.metrics.rejected.labels(reason).inc()
        src = source.row.node_id if source else "local"
        if source is not None:
            source.invalid[reason] = source.invalid.get(reason, 0) + 1
            self.metrics.partner_invalid.labels(source.row.name, reason).inc()
        self.storage.log_rejected(src, reason, detail[:500], self.now_ms())

    # ------------------------------------------------------------------ publish

    async def publish(
        self,
        feed: str,
        type_name: str,
        items: Sequence[dict[str, Any]],
        *,
        subjects: Sequence[str | None] | None = None,
    ) -> list[Record]:
        """Sign, chain and durably commit records of our own feed; return them.

        Raises :class:`PayloadError` (nothing is signed if any item is invalid),
        :class:`PublishRefused` if the feed is blocked by own-feed safety.
        """
        check_feed_name(feed)
        if not items:
            raise PayloadError("nothing to publish: give at least one payload", "missing_field")
        self._refuse_if_forked(feed)
        if feed in self.own_blocked:
            raise PublishRefused(self.own_blocked[feed])
        await self._await_first_sync()
        lock = self.feed_locks.setdefault(feed, asyncio.Lock())
        async with lock:
            self._refuse_if_forked(feed)
            if feed in self.own_blocked:
                raise PublishRefused(self.own_blocked[feed])
            key = (self.public_key, feed)
            head = self.heads.get(key)
            now = self.now_ms()
            fc = self.config.feeds.get(feed)
            readers = ([parse_node_id(r) for r in fc.readers]
                       if fc is not None and fc.access == access.RESTRICTED else None)
            recs = await asyncio.get_running_loop().run_in_executor(
                None, self._sign_batch, feed, type_name, items, subjects, head, now, readers
            )
            for r in recs:
                self.inflight.add(r.id)
            self.heads[key] = FeedHead(recs[-1].seq, recs[-1].id)
            # Queued in chain order while we hold the lock; waited for after releasing
            # it, so concurrent publishes share one durable commit (group commit).
            commit = self._commit(recs, durable=True, source=None)
            waiter = asyncio.ensure_future(commit)
            await asyncio.sleep(0)  # let _commit queue the write before the lock is free
        await waiter
        self.metrics.published.inc(len(recs))
        if head is None and feed not in self.config.feeds:
            # A new feed: the card that lists it (and its access level) is signed and
            # kept now, so an export made before anyone asks for the card has it.
            self.card()
        return recs

    def _note_fork(self, origin: bytes, feed: str, seq: int) -> None:
        """A fork or split-view proof is held against ``origin``'s ``feed`` at ``seq``:
        if the origin is this node, stop signing on that feed for good."""
        if origin != self.public_key:
            return
        if feed not in self.own_forked:
            log.error("own feed forked: publishing on it is stopped",
                      extra=fields(feed=feed, seq=seq))
        self.own_forked[feed] = min(seq, self.own_forked.get(feed, seq))

    def _refuse_if_forked(self, feed: str) -> None:
        """Raise PublishRefused if this node holds proof it signed two histories of
        ``feed`` (e.g. it was restored from an old backup with no partner reachable)."""
        if feed in self.own_forked:
            raise PublishRefused(
                f"feed {feed!r} of this node has forked: it signed two different histories "
                f"at seq {self.own_forked[feed]} (`citynode forks` shows the proof, and its "
                "partners hold it too). Nothing more is signed on it: publish on a new feed "
                "name, and tell the partner cities why"
            )

    async def _await_first_sync(self, wait: float = 2.0) -> None:
        """Own-feed safety at start: until every partner's first sync round has ended
        (it may show that a partner holds newer records of ours, e.g. after we were
        restored from an old backup), we do not sign anything."""
        waiting = [link for link in self.links.values() if not link.first_attempt.is_set()]
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

    def _sign_batch(
        self,
        feed: str,
        type_name: str,
        items: Sequence[dict[str, Any]],
        subjects: Sequence[str | None] | None,
        head: FeedHead | None,
        now: int,
        readers: list[bytes] | None = None,
    ) -> list[Record]:
        seq, prev = (head.seq, head.id) if head else (0, None)
        out = []
        for n, data in enumerate(items):
            seq += 1
            try:
                r = sign_record(self.key, feed=feed, seq=seq, prev=prev, time_ms=now,
                                type=type_name, data=data, readers=readers,
                                subject=subjects[n] if subjects else None)
            except InvalidRecord as exc:
                if len(items) == 1:
                    raise
                # Which one, in a file of hundreds: the n-th line or array item.
                raise type(exc)(f"item {n + 1} of {len(items)}: {exc}", exc.reason) from exc
            prev = r.id
            out.append(r)
        return out

    # ------------------------------------------------------------------ partners

    def _start_link(self, row: PartnerRow, *, tasks: bool = True) -> PartnerLink:
        client = PeerClient(
            self.key,
            row.url,
            node_id=row.node_id,
            fingerprint=row.tls_fingerprint,
            timeout=self.config.limits.read_timeout_seconds,
            clock=self.clock,
        )
        link = PartnerLink(row, client, self.config.federation.push_queue_max)
        self.links[row.public_key] = link
        self._card = None
        self._forget_derived()
        if tasks:
            link.tasks.append(self.spawn(self._push_loop(link), f"push-{row.name}"))
            link.tasks.append(self.spawn(self._sync_loop(link), f"sync-{row.name}"))
        return link

    async def catch_up(self, progress: Callable[[int, int], None] | None = None) -> int:
        """One-shot (node not serving): sync once with every partner, fetching
        everything missing; ``progress(done, total)`` is called as records arrive.
        Returns the number of records fetched. Partners that cannot be reached are
        skipped (logged); raises nothing for them."""
        rows = await self._io(self.storage.partners)
        links = [self._start_link(r, tasks=False) for r in rows]
        for r in rows:
            if r.card:
                self._learn_card(r.card, r.public_key)
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

    async def _stop_link(self, link: PartnerLink) -> None:
        for t in link.tasks:
            t.cancel()
        await asyncio.gather(*link.tasks, return_exceptions=True)
        await link.client.close()

    async def add_partner(self, url: str, partner_id: str) -> PartnerRow:
        """Fetch and verify the card at ``url`` (must be signed by ``partner_id``), pin its
        TLS fingerprint, store the partner and start exchanging records."""
        from citynode.transport.client import fetch_card

        pk = parse_node_id(partner_id)
        if pk == self.public_key:
            raise PeerError("that is this node's own id")
        card = await fetch_card(url, partner_id, now_ms=self.now_ms())
        row = PartnerRow(
            node_id=partner_id,
            public_key=pk,
            url=url.rstrip("/"),
            name=card.name,
            tls_fingerprint=card.tls,
            card=card.envelope,
            added_at=self.now_ms(),
        )
        await asyncio.wrap_future(self.storage.put_partner(row))
        old = self.links.pop(pk, None)
        if old is not None:
            await self._stop_link(old)
        self._learn_card(card.envelope, pk)
        self._start_link(row)
        return row

    async def remove_partner(self, partner_id: str) -> bool:
        pk = parse_node_id(partner_id)
        gone = await asyncio.wrap_future(self.storage.remove_partner(partner_id))
        link = self.links.pop(pk, None)
        if link is not None:
            await self._stop_link(link)
        self._card = None
        self._forget_derived()
        return gone or link is not None

    def link_for(self, public_key: bytes) -> PartnerLink | None:
        return self.links.get(public_key)

    def _backoff(self, link: PartnerLink) -> float:
        cap = self.config.federation.backoff_max_seconds
        base = min(cap, 0.2 * (2 ** min(link.failures, 16)))
        return random.uniform(base / 2, base)  # full jitter on the upper half

    def _mark(self, link: PartnerLink, ok: bool, err: str | None = None) -> None:
        if ok:
            link.up, link.failures, link.last_ok_ms = True, 0, self.now_ms()
        else:
            link.up, link.last_error = False, err
            link.failures += 1
        self.metrics.partner_up.labels(link.row.name).set(1 if link.up else 0)

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
                self._mark(link, False, str(exc))
                # Put the batch back in front (bounded: the queue may overflow, pull repairs).
                for r in reversed(batch):
                    if len(link.queue) < link.queue_max:
                        link.queue.appendleft(r)
                    else:
                        link.overflowed = True
                await asyncio.sleep(self._backoff(link))
                continue
            self.metrics.push_latency.observe(time.perf_counter() - t0)
            self._mark(link, True)
            for r in batch:
                link.view.update((r.origin, r.feed), r.seq)
            self._prune(link, batch, out.get("dup"))

    def _prune(self, link: PartnerLink, batch: list[Record], dup: Any) -> None:
        """Origins of which the partner already had a record we pushed: it gets them
        through someone else, so from now on we only announce them (Plumtree's prune,
        per origin, our own included). The partner grafts us back when an announced
        record does not reach it by the other path in time."""
        if not isinstance(dup, list) or not dup:
            return
        link.lazy.update(batch[i].origin for i in dup
                         if isinstance(i, int) and 0 <= i < len(batch))

    async def on_announce(self, link: PartnerLink, theirs: sync.Frontier) -> None:
        """A partner holds these heads. Where we are behind, give the eager path a moment,
        then fetch from this partner and graft it (make it push that origin to us again)."""
        link.view.update_frontier(theirs)
        for key, (seq, _head) in theirs.items():
            mine = self.heads.get(key)
            if (mine is not None and mine.seq >= seq) or key in link.graft_pending:
                continue
            if not self.accepts_origin(key[0]):
                continue
            if len(link.graft_pending) >= 64:
                link.sync_now.set()  # many gaps at once: one pull round instead
                break
            link.graft_pending.add(key)
            self.spawn(self._graft_later(link, key, seq), "graft")

    async def _graft_later(self, link: PartnerLink, key: FeedKey, seq: int) -> None:
        try:
            # While pushes keep extending the chain the eager path is only slow (a loaded
            # partner), not broken: wait on (up to GRAFT_PATIENCE) instead of fetching
            # copies that are already on their way.
            waited = 0.0
            while True:
                await asyncio.sleep(GRAFT_DELAY)
                waited += GRAFT_DELAY
                mine = self.heads.get(key)
                have = mine.seq if mine else 0
                if have >= seq:
                    return
                pushed = self.pushed_at.get(key, -math.inf)
                if waited >= GRAFT_PATIENCE or time.monotonic() - pushed > GRAFT_DELAY:
                    break
            with contextlib.suppress(PeerError):
                await self._fetch_want(link, sync.Want(key[0], key[1], have + 1, seq), None,
                                       via="graft")
                await link.client.request("POST", "/v1/graft", key[0])
        finally:
            link.graft_pending.discard(key)

    async def _sync_loop(self, link: PartnerLink) -> None:
        interval = self.config.federation.pull_interval_seconds
        while True:
            # Cleared as the round starts: a wake-up that comes during the round (new
            # heads, a new card) is for a later round, not lost.
            link.sync_now.clear()
            try:
                await self.sync_with(link)
                self._mark(link, True)
                try:
                    await self._flush_outbox(link, first_round=not link.synced_once.is_set())
                except CitynodeError as exc:  # our storage: the round itself went well
                    log.warning("resending checkpoints failed",
                                extra=fields(partner=link.row.name, error=str(exc)))
                link.synced_once.set()
                delay = interval
            except PeerError as exc:
                self._mark(link, False, str(exc))
                # A 401/403 is an answer, not an outage: most often the partner has not
                # added this node (yet), or has removed it.
                refused = isinstance(exc, PeerRejected) and exc.status in (401, 403)
                log.info(
                    "partner refuses this node (has it added us as a partner?)" if refused
                    else "partner unreachable",
                    extra=fields(partner=link.row.name, error=str(exc)),
                )
                delay = self._backoff(link)
            except CitynodeError as exc:
                self._mark(link, False, str(exc))
                log.warning("sync failed", extra=fields(partner=link.row.name, error=str(exc)))
                delay = self._backoff(link)
            except Exception as exc:  # a bug must not end syncing with this partner
                self._mark(link, False, f"internal error: {exc}")
                log.exception("sync failed", extra=fields(partner=link.row.name))
                delay = self._backoff(link)
            link.first_attempt.set()
            # However often a round is asked for, rounds with one partner are spaced.
            await asyncio.sleep(min(delay, MIN_SYNC_GAP))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(link.sync_now.wait(), max(0.0, delay - MIN_SYNC_GAP))

    def lacks_from(self, theirs: sync.Frontier) -> bool:
        """Does a partner's frontier hold records (of origins we accept) that we lack?"""
        for key, (seq, _h) in theirs.items():
            mine = self.heads.get(key)
            if (mine is None or mine.seq < seq) and self.accepts_origin(key[0]):
                return True
        return False

    def frontier(self) -> sync.Frontier:
        return {k: (h.seq, h.id) for k, h in self.heads.items()}

    async def sync_with(
        self, link: PartnerLink, *, progress: Callable[[int, int], None] | None = None
    ) -> int:
        """One anti-entropy round with a partner; returns the number of records fetched."""
        # Cards first: they carry the vouches the trust policy needs.
        try:
            for env in await link.client.cards():
                self._learn_card(env)
        except PeerError:
            raise
        theirs = sync.decode_frontier(
            await link.client.sync(sync.encode_frontier(self.frontier_for(link))))
        link.view.update_frontier(theirs)
        link.overflowed = False
        now = self.now_ms()
        plan = sync.plan_sync(
            self.frontier(),
            theirs,
            accept=lambda o: self.accepts_origin(o) and not self.quota.exhausted(o, now),
            batch=self.config.limits.max_batch_records,
        )
        await self._own_feed_safety(theirs, link)
        if plan.wants and not self.own_blocked and progress is None:
            # Records still travelling by push would be fetched twice: let them land,
            # then fetch only what is still missing -- and not at all for chains that
            # pushes are extending right now (pull repairs stalls, not flows; a stalled
            # chain is fetched in the next round).
            await asyncio.sleep(PULL_SETTLE)
            flowing = time.monotonic() - PUSH_FLOWING
            plan = sync.plan_sync(
                self.frontier(), theirs,
                accept=lambda o: self.accepts_origin(o) and not self.quota.exhausted(o, now),
                batch=self.config.limits.max_batch_records,
            )
            wants = [w for w in plan.wants
                     if self.pushed_at.get((w.origin, w.feed), -math.inf) < flowing]
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
            progress = self._progress_adder(progress, total)
        # What they lack, they fetch themselves in their own round (our sync request
        # wakes it): pushing it here too would only send copies twice.
        for want in plan.wants:
            fetched += await self._fetch_want(link, want, progress)
        for key, seq in plan.forks:
            await self._fetch_want(link, sync.Want(key[0], key[1], seq, seq), None)
        for key, seq, their_id in plan.check:
            mine = await self._io(self.storage.id_at, key[0], key[1], seq)
            if mine is not None and mine != their_id:
                await self._fetch_want(link, sync.Want(key[0], key[1], seq, seq), None)
        # what the pending buffer still misses, ask this partner too
        for want in self.pending.missing()[:64]:
            await self._fetch_want(link, want, None, via="gap")
        self._release_own_blocks()
        return fetched

    @staticmethod
    def _progress_adder(
        report: Callable[[int, int], None], total: int
    ) -> Callable[[int, int], None]:
        done = 0

        def add(n: int, _total: int) -> None:
            nonlocal done
            done += n
            report(done, total)

        return add

    async def _fetch_want(
        self, link: PartnerLink, want: sync.Want, progress: Callable[[int, int], None] | None,
        via: str = "sync",
    ) -> int:
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
            res = await self.ingest(envs, source=link, via=via)
            got += res.accepted
            if progress:
                progress(res.accepted, 0)
            if res.accepted == 0 and res.duplicates == 0:
                break
            start += len(envs)
        return got

    async def _own_feed_safety(self, theirs: sync.Frontier, link: PartnerLink) -> None:
        """If a partner holds later records of our own feeds than we do (e.g. we were
        restored from an old backup), refuse to publish there until we caught up.

        Publishing on the feed pauses at once. A frontier is not signed, though, so the
        pause lasts only if the partner then shows the record at the head it claims,
        signed by us; a false claim is counted and the pause lifted."""
        for (origin, feed), (seq, hid) in theirs.items():
            if origin != self.public_key:
                continue
            mine = self.heads.get((origin, feed))
            have = mine.seq if mine else 0
            if have >= seq or self._own_targets.get(feed, 0) >= seq:
                continue
            why = (
                f"feed {feed!r}: partner {link.row.name} holds our records up to seq {seq} "
                f"but this node has only {have} (restored from an old backup?): fetching "
                "them before publishing again, to never sign two records with one seq"
            )
            if feed not in self.own_blocked:
                log.warning("publishing paused", extra=fields(feed=feed, reason=why))
            self.own_blocked[feed] = why
            if await self._proves_own_record(link, feed, seq, hid):
                self._own_targets[feed] = seq
                continue
            self.count_invalid(link, "false_claim",
                               f"claims our feed {feed!r} up to seq {seq} but does not "
                               "show that record signed by us")
            if self._own_targets.get(feed, 0) <= have:
                self.own_blocked.pop(feed, None)

    async def _proves_own_record(self, link: PartnerLink, feed: str, seq: int,
                                 head: bytes) -> bool:
        try:
            envs = await link.client.fetch(
                sync.encode_wants([sync.Want(self.public_key, feed, seq, seq)]))
        except PeerError:
            return False
        for env in envs[:1]:
            try:
                body, sig = decode_envelope(env, self.policy.body_limits)
                rec = open_record(body, sig, now_ms=2**62, verifier=self.verifier,
                                  policy=self.policy)
            except InvalidRecord:
                return False
            return (rec.origin == self.public_key and rec.feed == feed and rec.seq == seq
                    and rec.id == head)
        return False

    def _release_own_blocks(self) -> None:
        for feed in list(self.own_blocked):
            mine = self.heads.get((self.public_key, feed))
            if mine is not None and mine.seq >= self._own_targets.get(feed, 0):
                del self.own_blocked[feed]
                log.info("publishing resumed", extra=fields(feed=feed))

    # ------------------------------------------------------------------ serving partners

    async def serve_fetch(self, wants: Iterable[sync.Want], requester: bytes) -> list[bytes]:
        """Envelopes for a partner's wants, bounded, respecting feed access."""
        out: list[bytes] = []
        budget = self.config.limits.max_batch_records
        link = self.links.get(requester)
        if link is None:  # no longer a partner (removed while its request ran)
            return out
        for w in wants:
            if budget <= 0:
                break
            pol = self.feed_policy(w.origin, w.feed)
            if not access.may_relay(pol, w.origin, link.key):
                continue
            envs = await self._io(
                self.storage.range, w.origin, w.feed, w.from_seq, w.to_seq, budget
            )
            if pol.access == access.RESTRICTED and not access.may_relay(
                    access.for_record(pol, None), w.origin, link.key):
                # Records of the feed in clear (signed before it was restricted) go
                # where the partners rule lets them, and this partner is not there.
                envs = [e for e in envs if _readers_of(e) is not None]
            out.extend(envs)
            budget -= len(envs)
        return out

    def known_cards(self) -> list[bytes]:
        return [self.card().envelope, *self.cards_seen.values()]

    # ------------------------------------------------------------------ checkpoints

    def _read_ids(self, origin: bytes, feed: str, start: int, end: int) -> list[bytes]:
        out: list[bytes] = []
        while start <= end:
            envs = self.storage.range(origin, feed, start, min(end, start + 4999), 5000)
            if not envs:
                break
            out.extend(record_id(decode_envelope(e)[0]) for e in envs)
            start += len(envs)
        return out

    async def merkle_log(self, origin: bytes, feed: str, size: int) -> checkpoints.MerkleLog:
        """The Merkle tree of a feed held here, with at least ``size`` leaves. Raises
        ChainError if this node holds fewer than ``size`` records of it."""
        head = self.heads.get((origin, feed))
        if head is None or head.seq < size:
            raise ChainError(f"this node holds {head.seq if head else 0} records of that "
                             f"feed, not {size}")
        log_ = self.logs.setdefault((origin, feed), checkpoints.MerkleLog())
        start = log_.size
        if start < size:
            ids = await self._io(self._read_ids, origin, feed, start + 1, size)
            if start + len(ids) < size:
                raise ChainError(f"this node holds only {start + len(ids)} records of "
                                 f"that feed, not {size}")
            # Another task may have extended the log while we read: add only the rest.
            log_.extend(ids[log_.size - start:])
        return log_

    async def checkpoint_now(self) -> list[checkpoints.Checkpoint]:
        """Sign a checkpoint of every own feed that grew since its last one, store it,
        and send it to the partners."""
        made = []
        for (origin, feed), head in list(self.heads.items()):
            if origin != self.public_key:
                continue
            held = await self._io(self.storage.checkpoints, origin, feed)
            if held and held[-1][0] >= head.seq:
                continue
            log_ = await self.merkle_log(origin, feed, head.seq)
            cp = checkpoints.sign_checkpoint(self.key, feed, head.seq, log_.root(head.seq),
                                             self.now_ms())
            await asyncio.wrap_future(
                self.storage.put_checkpoint(origin, feed, cp.size, cp.root, cp.envelope))
            made.append(cp)
        for cp in made:
            for link in self.links.values():
                self.spawn(self._send_checkpoint(link, cp.envelope), "send-checkpoint")
        return made

    async def _checkpoint_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.checkpoints.interval_seconds)
            try:
                await self.checkpoint_now()
            except CitynodeError as exc:
                log.warning("checkpoint failed", extra=fields(error=str(exc)))

    async def _send_checkpoint(self, link: PartnerLink, env: bytes) -> None:
        await self._deliver(link, "/v1/checkpoints", env)

    async def ingest_checkpoint(self, env: bytes, src: str) -> str:
        """A checkpoint from a partner: verify, keep, forward if new. Two checkpoints of
        one feed and size with different roots are a split view: kept as proof and
        forwarded like a fork proof. Returns "new", "known" or "split-view"."""
        cp = checkpoints.open_checkpoint(env, verifier=self.verifier, now_ms=self.now_ms())
        if not self.accepts_origin(cp.origin):
            raise InvalidRecord("checkpoint of an origin this node does not trust",
                                "untrusted_origin")
        new = await asyncio.wrap_future(
            self.storage.put_checkpoint(cp.origin, cp.feed, cp.size, cp.root, env))
        if new:
            for link in self.links.values():
                if link.row.node_id != src and self.may_pass(link, cp.origin, cp.feed):
                    self.spawn(self._send_checkpoint(link, env), "send-checkpoint")
            return "new"
        held = await self._io(self.storage.checkpoints, cp.origin, cp.feed)
        mine = next((e for s, r, e in held if s == cp.size and r != cp.root), None)
        if mine is None:
            return "known"
        proof = checkpoints.SplitViewProof(mine, env).canonical()
        checkpoints.verify_split_view(proof, self.verifier)
        stored = await asyncio.wrap_future(self.storage.add_fork_proof(
            cp.origin, cp.feed, cp.size, "split-view", proof.encode(), src, self.now_ms()))
        self._note_fork(cp.origin, cp.feed, cp.size)
        if stored:
            self.metrics.forks.inc()
            log.warning("split view: the origin signed two different checkpoints of one size",
                        extra=fields(origin=node_id(cp.origin), feed=cp.feed, size=cp.size))
            for link in self.links.values():
                if self.may_pass(link, cp.origin, cp.feed):
                    self.spawn(self._send_proof(link, proof.encode()), "send-proof")
        return "split-view"

    # ------------------------------------------------------------------ live streams

    async def _tail_loop(self) -> None:
        """Read each newly committed row once and hand it to every matching stream, so
        the cost per commit does not grow with the number of subscribers."""
        while True:
            await self._tail_wake.wait()
            self._tail_wake.clear()
            try:
                await self._tail_once()
            except Exception:  # keep streams alive; the next commit retries
                log.exception("live stream tail failed")
                await asyncio.sleep(1.0)
                self._tail_wake.set()

    async def _tail_once(self) -> None:
        while True:
            after = self._tail_rowid
            rows, texts = await self._io(self._tail_read, after)
            if not rows:
                return
            if self.subscribers:
                # Before the tail moves on: if this raises, the rows are handed out again
                # (streams drop by cursor what they already got).
                self._fan_out(rows, texts)
            self._tail_rowid = rows[-1].rowid
            if len(rows) < 1000:
                return

    def _tail_read(self, after: int) -> tuple[list[Any], list[str]]:
        """In a worker thread: the next committed rows, and their events if anyone
        listens (rendering is the costly part: once per row, off the event loop)."""
        rows = self.storage.query(after_rowid=after, limit=1000)
        return rows, _render_rows(rows) if rows and self.subscribers else []

    def _fan_out(self, rows: list[Any], texts: list[str]) -> None:
        """Hand new tail rows to every live stream whose filter and reader match them;
        ``texts`` are the rows' shared events (empty: none were rendered)."""
        groups: dict[Hashable, list[Subscriber]] = {}
        for sub in self.subscribers:
            if not sub.lagging:
                groups.setdefault(sub.group, []).append(sub)
        for members in groups.values():
            first = members[0]
            picked = [n for n, row in enumerate(rows) if first.match(row)]
            if not picked:
                continue
            if first.render is not None:
                chosen = [first.render(rows[n]) for n in picked]
            elif first.envelope_only:
                chosen = [sse_envelope_event(rows[n]) for n in picked]
            elif texts:
                chosen = [texts[n] for n in picked]
            else:  # the first stream arrived while the rows were read
                chosen = [sse_event(rows[n]) for n in picked]
            batch = StreamBatch([rows[n].rowid for n in picked], chosen,
                                "".join(chosen).encode())
            for sub in members:
                sub.offer(batch)

    def close_streams(self) -> None:
        """End every live stream promptly and refuse new ones (graceful shutdown: a live
        stream would otherwise hold the server open until its shutdown timeout).
        Subscribers lose nothing: they resume with ``Last-Event-ID``."""
        self.streams_closed = True
        for sub in list(self.subscribers):
            sub.close()

    def tail_rowid(self) -> int:
        """The cursor of the newest row handed to streams."""
        return self._tail_rowid

    # ------------------------------------------------------------------ status

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        try:
            ok_db = await self._io(self.storage.writable)
        except StorageError:
            ok_db = False
        # Damage SQLite reported while serving: the node answers, but not from a
        # database it can trust (restore from a backup).
        intact = self.storage.corrupt is None
        ok = self.ready and ok_db and intact
        out: dict[str, Any] = {"database_writable": ok_db, "database_intact": intact,
                               "key_loaded": True, "started": self.ready}
        if not intact:
            out["database_error"] = self.storage.corrupt
        return ok, out

    def partner_status(self) -> list[dict[str, Any]]:
        return [link.status() for link in self.links.values()]


def _verdict_on_payload(exc: PeerRejected) -> bool:
    """Is a partner's refusal of a checkpoint or proof about the payload itself (invalid,
    too large), so that sending it again would get the same answer? Refusals about the
    moment -- busy, clock skew, a slow body, an origin it does not trust yet (vouches
    travel with cards, which may come later), a 5xx -- are not: it is sent again."""
    if exc.status in (413, 422):
        return True
    text = str(exc)
    return exc.status == 400 and "untrusted_origin" not in text and "not trust" not in text


def _readers_of(envelope: bytes) -> frozenset[bytes] | None:
    """The recipients a record is sealed to; None if it is not sealed (its payload is in
    clear), or cannot be read (it was verified when stored: not expected)."""
    try:
        body, _sig = decode_envelope(envelope)
        sealed = parse_body(body).get("sealed")
    except InvalidRecord:
        return None
    return _sealed_to(sealed)


def _sealed_to(sealed: Any) -> frozenset[bytes] | None:
    """The recipients of a record's ``sealed`` field; None if there is none."""
    if not isinstance(sealed, dict):
        return None
    return frozenset(r[0] for r in sealed.get("to", ()) if isinstance(r, list) and r)


def sse_event(row: Any, key: Any = None) -> str:
    """One Server-Sent Event for a stored row: ``id`` (its cursor), ``event: record`` and
    the JSON record as ``data`` (JSON has no raw newlines, so one data line)."""
    import json

    from citynode.render import stored_record_json

    data = json.dumps(stored_record_json(row.envelope, key=key))
    # CRLF, as aiohttp-sse frames its keep-alive pings on the same stream.
    return f"id: {row.rowid}\r\nevent: record\r\ndata: {data}\r\n\r\n"


def sse_envelope_event(row: Any) -> str:
    """The compact event for a stored row (``?format=envelope``): ``id`` and ``event``
    as :func:`sse_event`, ``data`` = the signed envelope in base64 and nothing else --
    what a subscriber that verifies records itself needs, in about half the bytes."""
    import base64

    return (f"id: {row.rowid}\r\nevent: record\r\n"
            f"data: {base64.b64encode(row.envelope).decode()}\r\n\r\n")


def _render_rows(rows: Sequence[Any]) -> list[str]:
    return [sse_event(r) for r in rows]
