"""Partners: the links to the nodes this one exchanges records with, their state while
running (up or down, queues, what they are known to hold), and the delivery of
checkpoints and proofs with an outbox for a partner that is away.

The gossip role runs each link's push and sync loops; this role starts and stops them,
adds and removes partners, and says how each one is doing.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from typing import Any

from citynode.config import Config
from citynode.core import sync
from citynode.core.keys import SigningKey, parse_node_id
from citynode.core.records import Record
from citynode.errors import CitynodeError, PeerError, PeerRejected
from citynode.logs import fields
from citynode.metrics import Metrics
from citynode.node._base import Spawn, in_thread
from citynode.storage import PartnerRow, Storage
from citynode.transport.client import PeerClient

__all__ = ["OUTBOX_MAX", "OUTBOX_PER_ROUND", "OUTBOX_REFUSALS", "PartnerLink", "Partners"]

log = logging.getLogger("citynode.node")

# Checkpoints and proofs kept per partner while it is away (each a few hundred bytes).
OUTBOX_MAX = 1000
OUTBOX_PER_ROUND = 50
OUTBOX_REFUSALS = 5  # a checkpoint or proof refused for the moment this often is dropped
# A partner's clock this far from ours (s) is logged: time-based refusals are near.
CLOCK_WARN_S = 10


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
        self.clock_warned: int | None = None  # the clock offset last logged
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
            # The partner's clock minus ours (s), from its latest answer: past
            # [limits] future_tolerance_seconds, records and requests are refused.
            "clock_offset_s": self.client.clock_offset_s,
        }


#: Starts a link's loops: ``(link) -> tasks`` (the gossip role's push and sync loops).
LinkRunner = Callable[[PartnerLink], list["asyncio.Task[None]"]]


class Partners:
    """The partner links. ``on_change()`` is called when one is added or removed (the
    card and the trust policy depend on them)."""

    def __init__(self, *, config: Config, key: SigningKey, storage: Storage,
                 metrics: Metrics, clock: Callable[[], float], now_ms: Callable[[], int],
                 spawn: Spawn) -> None:
        self.config = config
        self.key = key
        self.storage = storage
        self.metrics = metrics
        self.clock = clock
        self.now_ms = now_ms
        self.spawn = spawn
        self.links: dict[bytes, PartnerLink] = {}
        self._keys: frozenset[bytes] = frozenset()
        self.on_change: Callable[[], None] = lambda: None
        self.run_link: LinkRunner = lambda link: []

    def keys(self) -> frozenset[bytes]:
        """The partners' public keys."""
        return self._keys

    def get(self, public_key: bytes) -> PartnerLink | None:
        return self.links.get(public_key)

    def status(self) -> list[dict[str, Any]]:
        return [link.status() for link in self.links.values()]

    def sync_all(self) -> int:
        """Ask every partner for a sync round now; returns how many there are."""
        for link in self.links.values():
            link.sync_now.set()
        return len(self.links)

    # ------------------------------------------------------------------ links

    async def start(self, *, tasks: bool = True) -> list[PartnerLink]:
        """Open a link to every stored partner (with its loops unless ``tasks=False``)."""
        return [self.open(row, tasks=tasks) for row in await in_thread(self.storage.partners)]

    def open(self, row: PartnerRow, *, tasks: bool = True) -> PartnerLink:
        client = PeerClient(
            self.key,
            row.url,
            node_id=row.node_id,
            fingerprint=row.tls_fingerprint,
            timeout=self.config.limits.read_timeout_seconds,
            clock=self.clock,
            max_batch=self.config.limits.max_batch_records,
        )
        link = PartnerLink(row, client, self.config.federation.push_queue_max)
        self.links[row.public_key] = link
        self._changed()
        if tasks:
            link.tasks.extend(self.run_link(link))
        return link

    async def close(self, link: PartnerLink) -> None:
        for t in link.tasks:
            t.cancel()
        await asyncio.gather(*link.tasks, return_exceptions=True)
        await link.client.close()

    async def close_all(self) -> None:
        for link in list(self.links.values()):
            await self.close(link)

    def _changed(self) -> None:
        self._keys = frozenset(self.links)
        self.on_change()

    async def add(self, url: str, partner_id: str,
                  learn_card: Callable[[bytes, bytes], bool]) -> PartnerRow:
        """Fetch and verify the card at ``url`` (must be signed by ``partner_id``), pin its
        TLS fingerprint, store the partner and start exchanging records."""
        from citynode.transport.client import fetch_card

        pk = parse_node_id(partner_id)
        if pk == self.key.public_key:
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
            await self.close(old)
        learn_card(card.envelope, pk)
        self.open(row)
        return row

    async def remove(self, partner_id: str) -> bool:
        pk = parse_node_id(partner_id)
        gone = await asyncio.wrap_future(self.storage.remove_partner(partner_id))
        link = self.links.pop(pk, None)
        if link is not None:
            await self.close(link)
        self._changed()
        return gone or link is not None

    # ------------------------------------------------------------------ health

    def backoff(self, link: PartnerLink) -> float:
        cap = self.config.federation.backoff_max_seconds
        base = min(cap, 0.2 * (2 ** min(link.failures, 16)))
        return random.uniform(base / 2, base)  # full jitter on the upper half

    def mark(self, link: PartnerLink, ok: bool, err: str | None = None) -> None:
        if ok:
            link.up, link.failures, link.last_ok_ms = True, 0, self.now_ms()
        else:
            link.up, link.last_error = False, err
            link.failures += 1
        self.metrics.partner_up.labels(link.row.name).set(1 if link.up else 0)
        self._check_clock(link)

    def _check_clock(self, link: PartnerLink) -> None:
        """Say it once (and again when it changes by as much) when this node's clock and
        a partner's differ by CLOCK_WARN_S or more: past the tolerance, records or
        requests are refused for their time, and the operator must know whose clock."""
        offset = link.client.clock_offset_s
        if offset is None or abs(offset) < CLOCK_WARN_S:
            link.clock_warned = None
            return
        if link.clock_warned is not None and abs(offset - link.clock_warned) < CLOCK_WARN_S:
            return
        link.clock_warned = offset
        tolerance = self.config.limits.future_tolerance_seconds
        log.warning(
            f"this node's clock is {abs(offset)} s {'behind' if offset > 0 else 'ahead of'} "
            f"partner {link.row.name}'s (records and requests are refused past "
            f"{tolerance} s ahead; run NTP on both)",
            extra=fields(partner=link.row.name, clock_offset_s=offset))

    # ------------------------------------------------------------------ delivery

    def send(self, link: PartnerLink, path: str, payload: bytes) -> None:
        """Deliver a checkpoint or proof to a partner in the background."""
        self.spawn(self.deliver(link, path, payload), "send-" + path.rsplit("/", 1)[-1])

    async def deliver(self, link: PartnerLink, path: str, payload: bytes,
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
            if not verdict_on_payload(exc):
                link.keep_for_later(path, payload, refusals + 1)
            return True
        except PeerError:
            link.keep_for_later(path, payload, refusals)
            return False
        return True

    async def flush_outbox(self, link: PartnerLink,
                           first_round: Callable[[PartnerLink], Awaitable[None]] | None
                           ) -> None:
        """After a good sync round: what this partner missed while it was away.
        ``first_round`` (after the first good round since start) first fills the outbox
        with what it may have missed while this node was down."""
        try:
            if first_round is not None:
                await first_round(link)
            # A budget per round: a partner that answers slowly must not hold this
            # link's sync rounds for the whole outbox (the rest goes next round).
            for _ in range(min(len(link.outbox), OUTBOX_PER_ROUND)):
                key, (path, payload, refusals) = next(iter(link.outbox.items()))
                del link.outbox[key]
                if not await self.deliver(link, path, payload, refusals):
                    return  # away again: kept (at the end), tried after the next round
        except CitynodeError as exc:  # our storage: the round itself went well
            log.warning("resending checkpoints failed",
                        extra=fields(partner=link.row.name, error=str(exc)))

    def count_invalid(self, link: PartnerLink | None, reason: str) -> str:
        """Count one item refused from ``link`` on its tally; returns its node id (or
        "local")."""
        if link is None:
            return "local"
        link.invalid[reason] = link.invalid.get(reason, 0) + 1
        self.metrics.partner_invalid.labels(link.row.name, reason).inc()
        return link.row.node_id


# Refusals with these reason codes are about the moment, not the payload: an origin the
# partner does not trust yet (vouches travel with cards, which may come later).
_NOT_YET = frozenset({"untrusted_origin"})


def verdict_on_payload(exc: PeerRejected) -> bool:
    """Is a partner's refusal of a checkpoint or proof about the payload itself (invalid,
    too large), so that sending it again would get the same answer? Refusals about the
    moment -- busy, clock skew, a slow body, an origin it does not trust yet, a 5xx --
    are not: it is sent again. Decided on the status and the reason code the partner
    sent, never on its message text."""
    if exc.status in (413, 422):
        return True
    return exc.status == 400 and exc.reason not in _NOT_YET
