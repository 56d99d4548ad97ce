"""The chains this node holds: their heads, the records on their way to the database,
the records held back ahead of a gap, and the origins' daily quotas.

This is the replication state the other roles read and the ingest and publishing roles
advance. Heads move in memory before the write is queued, with no ``await`` between the
decision and the move, so two concurrent ingests never extend a chain from one head.
"""

from __future__ import annotations

from collections.abc import Callable

from citynode.core import sync
from citynode.core.chain import FeedHead
from citynode.node._base import FeedKey, RecentIds

__all__ = ["Chains"]


class Chains:
    """Heads, in-flight ids, recently committed ids, the pending buffer and quotas."""

    def __init__(self, *, pending_max_records: int, pending_max_bytes: int,
                 quota_records: int, quota_bytes: int) -> None:
        self.heads: dict[FeedKey, FeedHead] = {}
        # When a push last extended each chain (monotonic seconds): a sync round leaves
        # flowing chains to the push path.
        self.pushed_at: dict[FeedKey, float] = {}
        self.inflight: set[bytes] = set()
        self.recent = RecentIds()
        self.pending = sync.PendingBuffer(pending_max_records, pending_max_bytes)
        self.quota = sync.OriginQuota(quota_records, quota_bytes)

    def load(self, raw: dict[FeedKey, tuple[int, bytes]]) -> None:
        """Replace the heads with those read from storage."""
        self.heads = {k: FeedHead(seq, hid) for k, (seq, hid) in raw.items()}

    def seq(self, key: FeedKey) -> int:
        """The seq held of a chain (0: none)."""
        h = self.heads.get(key)
        return h.seq if h is not None else 0

    def holds(self, rid: bytes) -> bool:
        """Is this record committed lately or on its way to the database?"""
        return rid in self.inflight or rid in self.recent

    def frontier(self) -> sync.Frontier:
        """Every head held, as a sync frontier."""
        return {k: (h.seq, h.id) for k, h in self.heads.items()}

    def feeds_of(self, origin: bytes) -> set[str]:
        """The feeds of ``origin`` of which a record is held."""
        return {f for (o, f) in self.heads if o == origin}

    def holds_origin(self, origin: bytes) -> bool:
        return any(k[0] == origin for k in self.heads)

    def lacks_from(self, theirs: sync.Frontier, accept: Callable[[bytes], bool]) -> bool:
        """Does a frontier hold records (of origins ``accept`` takes) that we lack?"""
        return any(self.seq(key) < seq and accept(key[0])
                   for key, (seq, _h) in theirs.items())
