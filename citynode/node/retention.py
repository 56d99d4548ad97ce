"""Retention: payloads older than their origin's declared retention are dropped here too.

Every node prunes: the origin (its own feeds) and every partner holding the origin's
records, each record by the ``retention_days`` of its feed in the origin's card in force
when it was signed (the card history; node.toml states ours, signed into our card),
never by the newest card alone. Pruning keeps each record's signed skeleton (the
tombstone), so chains, checkpoints and proofs still verify. It runs in a task the node
owns, a bounded batch per transaction, then gives the freed pages back to the file
system.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from citynode.config import Config
from citynode.core.erasure import retention_cutoff, retention_in_force, retention_periods
from citynode.core.replica import Replica
from citynode.core.types import ERASURE_FEED
from citynode.logs import fields
from citynode.node.policy import Policy
from citynode.storage import Storage

__all__ = ["PRUNE_BATCH", "PRUNE_INTERVAL_S", "Retention"]

log = logging.getLogger("citynode.node")

#: Seconds between two prunes (the first one runs shortly after start).
PRUNE_INTERVAL_S = 3600.0
_FIRST_PRUNE_S = 30.0
#: Records examined per write transaction: short enough not to hold the writer.
PRUNE_BATCH = 5000


class Retention:
    """Which retention applies to a feed, and the prune that enforces it."""

    def __init__(self, *, config: Config, public_key: bytes, policy: Policy,
                 replica: Replica, storage: Storage, now_ms: Callable[[], int]) -> None:
        self.config = config
        self.public_key = public_key
        self.policy = policy
        self.replica = replica
        self.storage = storage
        self.now_ms = now_ms
        self.pruned = 0  # payloads dropped since start

    async def retention_of(self, origin: bytes, feed: str, time_ms: int) -> int | None:
        """Days ``origin`` keeps the payloads of its records of ``feed`` signed at
        ``time_ms``: the retention of its card in force then (ours too: node.toml is
        signed into our card). None: none declared, or no card of that time held."""
        if feed == ERASURE_FEED:
            return None  # erasure requests are kept for ever
        return retention_in_force(await self.policy.card_history(origin), feed, time_ms)

    async def prune(self, now_ms: int | None = None) -> int:
        """Drop every payload past the retention in force when its record was signed,
        at ``now_ms`` (default: now); return how many. Then give the freed pages back
        (incremental vacuum)."""
        now = self.now_ms() if now_ms is None else now_ms
        self.policy.card()  # our card as node.toml states it now, in our card history
        total = 0
        for origin, feed in list(self.replica.heads):
            if feed == ERASURE_FEED:
                continue
            for since, until, days in retention_periods(
                    await self.policy.card_history(origin), feed):
                # The records of [since, until) were signed under a card keeping them
                # `days` days: past it are those dated before the cutoff.
                before = retention_cutoff(days, now)
                if until is not None:
                    before = min(before, until)
                if before <= since:
                    continue
                after: int | None = 0
                while after is not None:
                    n, after = await asyncio.wrap_future(self.storage.prune(
                        origin, feed, before, since_ms=since, after_seq=after,
                        limit=PRUNE_BATCH))
                    total += n
        if total:
            pages = await asyncio.wrap_future(self.storage.reclaim())
            self.pruned += total
            log.info("payloads pruned by retention",
                     extra=fields(pruned=total, pages_freed=pages))
        return total

    async def run(self) -> None:
        """Prune now and then, for ever (cancelled when the node stops)."""
        await asyncio.sleep(_FIRST_PRUNE_S)
        while True:
            try:
                await self.prune()
            except Exception:  # a failed prune (a full disk ...) is tried again later
                log.exception("prune failed")
            await asyncio.sleep(PRUNE_INTERVAL_S)
