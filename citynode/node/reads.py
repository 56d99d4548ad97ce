"""Reads: what the HTTP layer serves from storage to readers -- records by id, pages by
filter, feed lists -- each read in a worker thread and bounded in time, with the read
policy applied inside the query (rows a caller may not see neither come back nor move
the cursor).
"""

from __future__ import annotations

from citynode.config import Config
from citynode.core.filters import ALL_RECORDS, RecordFilter
from citynode.node._base import in_thread
from citynode.node.policy import Policy
from citynode.storage import FeedRow, RejectedRow, Storage, StoredRow

__all__ = ["Reads"]


class Reads:
    """Reads for callers outside the node (HTTP, CLI)."""

    def __init__(self, *, config: Config, storage: Storage, policy: Policy) -> None:
        self.config = config
        self.storage = storage
        self.policy = policy

    async def envelope(self, rid: bytes) -> bytes | None:
        """The envelope of a record held, by id (no access check: see Policy)."""
        return await in_thread(self.storage.get_envelope, rid)

    async def query(self, where: RecordFilter = ALL_RECORDS, *, limit: int,
                    after_rowid: int = 0,
                    only_feeds: list[tuple[bytes, str]] | None = None) -> list[StoredRow]:
        """Stored rows matching ``where``, after ``after_rowid``, at most ``limit``, only
        of ``only_feeds`` when given, bounded by ``[limits] query_time_limit_seconds``
        (raises QueryTooSlow past it)."""
        tl = self.config.limits.query_time_limit_seconds
        return await in_thread(lambda: self.storage.query(
            where, after_rowid=after_rowid, limit=limit, only_feeds=only_feeds,
            time_limit=tl))

    async def feeds(self) -> list[FeedRow]:
        """Every chain held: origin, feed, head, count, last time."""
        return await in_thread(self.storage.feeds)

    async def listable_feeds(self, caller: bytes | None, *, operator: bool = False
                             ) -> list[FeedRow]:
        """The chains held that ``caller`` may see listed (Policy.may_list); the
        operator sees every one."""
        rows = await self.feeds()
        if operator:
            return rows
        return [r for r in rows if self.policy.may_list(r.origin, r.feed, caller)]

    async def db_size(self) -> int:
        return await in_thread(self.storage.db_size_bytes)

    async def rejected(self, limit: int = 100) -> list[RejectedRow]:
        return await in_thread(self.storage.rejected, limit)
