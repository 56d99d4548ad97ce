"""Reads: what the HTTP layer serves from storage to readers -- records by id, pages by
filter, feed lists -- each read in a worker thread and bounded in time, with the read
policy applied inside the query (rows a caller may not see neither come back nor move
the cursor).
"""

from __future__ import annotations

from collections.abc import Sequence

from citynode.config import Config
from citynode.core import sync
from citynode.core.filters import ALL_RECORDS, RecordFilter
from citynode.core.records import decode_record, is_tombstone, parse_body, record_id
from citynode.core.types import ERASURE_FEED
from citynode.node._base import in_thread
from citynode.node.policy import Policy, readers_of
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

    async def erasure_of(self, rid: bytes) -> tuple[bytes, str] | None:
        """``(erasure request id, reason)`` if record ``rid``'s payload was erased."""
        return await in_thread(self.storage.erasure_of, rid)

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

    async def serve_fetch(self, wants: Sequence[sync.Want], requester: bytes
                          ) -> list[bytes]:
        """Envelopes for a partner's wants (the caller checked it is one), bounded in
        count, respecting feed access: what that partner may be sent."""
        out: list[bytes] = []
        budget = self.config.limits.max_batch_records
        for w in wants:
            if budget <= 0:
                break
            if not self.policy.may_pass(requester, w.origin, w.feed):
                continue
            envs = await in_thread(
                self.storage.range, w.origin, w.feed, w.from_seq, w.to_seq, budget)
            if self.policy.is_restricted(w.origin, w.feed):
                # Records of the feed in clear (signed before it was restricted) go
                # where the partners rule lets them.
                envs = [e for e in envs if readers_of(e) is not None
                        or self.policy.may_relay_envelope(requester, w.origin, w.feed, e)]
            out.extend(envs)
            budget -= len(envs)
        return await self._with_erasures(out, requester)

    async def _with_erasures(self, envs: list[bytes], requester: bytes) -> list[bytes]:
        """``envs`` and, after them, the erasure request behind each erased tombstone
        among them (if the requester may be sent it): a node takes a tombstone only with
        its origin's request held or in the same batch, so it is sent along. The answer
        stays within ``max_batch_records`` (records at the end wait for the next fetch)."""
        tombs = [e for e in envs if is_tombstone(e)]
        if not tombs:
            return envs

        def requests() -> list[bytes]:
            found: dict[bytes, bytes] = {}
            for env in tombs:
                rid = record_id(decode_record(env)[0])
                by = self.storage.erasure_of(rid)
                if by is not None and by[0] not in found:
                    req = self.storage.get_envelope(by[0])
                    if req is not None:
                        found[by[0]] = req
            return list(found.values())

        extra = [e for e in await in_thread(requests) if e not in envs
                 and self.policy.may_pass(requester, parse_body(decode_record(e)[0])["origin"],
                                          ERASURE_FEED)]
        limit = self.config.limits.max_batch_records
        return envs[:max(0, limit - len(extra))] + extra[:limit]

    async def db_size(self) -> int:
        return await in_thread(self.storage.db_size_bytes)

    async def rejected(self, limit: int = 100) -> list[RejectedRow]:
        return await in_thread(self.storage.rejected, limit)
