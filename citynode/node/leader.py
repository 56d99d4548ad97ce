"""Leadership among several ``citynode run`` processes sharing one database.

All of them serve reads, streams and partner pushes; one at a time -- the leader, which
holds the database's leadership lock (:meth:`Storage.lead`) -- runs the singleton work:
signing own records, the replica's timer (sync planning), checkpoints, retention,
bridges, sinks, alerts. The others follow: when the leader dies (its database session ends
with it), one of them takes the lock within :data:`INTERVAL_S` or so, brings its chain
heads up to what the database holds, and starts that work.

Never two signers: a process signs only while it leads, and what it signs is stored
only if it extends the chain the database holds (re-checked in the write transaction,
under the writers' lock, then the UNIQUE index on (chain, seq)). A leader cut off from
the database cannot store what it signs, so nothing it signed then leaves the process.

With SQLite there is one process; it always leads.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from citynode.node._base import in_thread
from citynode.storage import Storage

__all__ = ["INTERVAL_S", "Leader"]

log = logging.getLogger("citynode.node")

#: How often a follower tries to take the leadership, and the leader checks it holds it.
INTERVAL_S = 0.5


class Leader:
    """Holds (or waits for) the leadership; starts and stops the singleton work."""

    def __init__(self, *, storage: Storage, gained: Callable[[], Awaitable[None]],
                 lost: Callable[[], None]) -> None:
        self.storage = storage
        self._gained = gained
        self._lost = lost
        self.leading = False

    async def try_once(self) -> bool:
        """Take the leadership if it is free (at start, before anything is served)."""
        if await in_thread(self.storage.lead) and not self.leading:
            self.leading = True
            log.info("leading the processes that share the database")
            await self._gained()
        return self.leading

    async def run(self) -> None:
        """Keep the leadership, or wait for it, for ever (a task of the node)."""
        while True:
            held = await in_thread(self.storage.lead)
            if held and not self.leading:
                self.leading = True
                log.info("took over the leadership of the processes that share the "
                         "database")
                await self._gained()
            elif not held and self.leading:
                self.leading = False
                log.error("leadership lost: signing and the other singleton work stop "
                          "here (another process takes over)")
                self._lost()
            await asyncio.sleep(INTERVAL_S)
