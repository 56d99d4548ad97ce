"""A one-shot catch-up (`citynode sync` on a stopped node): reconcile once with every
partner and fetch everything missing at once, with progress, through the same replica
and shell as the running node (its fetches are carried out here directly, with no
settle delay: nothing is on its way by push to a node that is not serving)."""

from __future__ import annotations

import logging

from citynode.core import replica as rp
from citynode.core import sync
from citynode.errors import CitynodeError, PeerError
from citynode.logs import fields
from citynode.node.gossip import Gossip, Progress
from citynode.node.partners import PartnerLink

__all__ = ["CatchUp"]

log = logging.getLogger("citynode.node")


class CatchUp:
    """Catch up with every partner once, over the gossip role's shell."""

    def __init__(self, gossip: Gossip) -> None:
        self.g = gossip

    async def catch_up(self, progress: Progress | None = None) -> int:
        """One-shot (node not serving): reconcile once with every partner and fetch
        everything missing at once; ``progress(done, total)`` is called as records
        arrive. Returns the number of records fetched. Partners that cannot be reached
        are skipped (logged); raises nothing for them."""
        self.g.serving = False
        if not self.g.partners.links:
            await self.g.partners.start()
            await self.g.policy.load_cards()
        links = list(self.g.partners.links.values())
        fetched = 0
        done = 0

        def count(n: int, _total: int) -> None:
            nonlocal done, fetched
            done += n
            fetched += n
            if progress is not None:
                progress(done, total)

        total = 0
        for link in links:
            try:
                await self.g.learn_cards(link)
                todo = await self._session(link)
            except PeerError as exc:
                log.warning("partner unreachable", extra=fields(partner=link.row.name,
                                                                error=str(exc)))
                self.g.replica.on_sync_failed(link.key, self.g.now_ms())
                continue
            except CitynodeError as exc:
                log.warning("sync failed", extra=fields(partner=link.row.name,
                                                        error=str(exc)))
                self.g.replica.on_sync_failed(link.key, self.g.now_ms())
                continue
            todo.extend(self.g.replica.pull_now(self.g.now_ms()))
            total += sum(_span(self.g.replica, a) for a in todo)
            if progress is not None:
                progress(done, total)
            while todo:
                a = todo.pop(0)
                if not isinstance(a, rp.Fetch):
                    await self.g.execute([a])
                    continue
                more = await self._fetch_direct(link, a, count)
                todo.extend(more)
        return fetched

    async def _session(self, link: PartnerLink) -> list[rp.Action]:
        """A whole reconciliation session with a partner, request after request; returns
        the fetches it asked for."""
        actions = self.g.replica.sync_now(link.key, self.g.now_ms())
        fetches: list[rp.Action] = []
        while True:
            req = next((a for a in actions if isinstance(a, rp.SendSync) and a.initiator
                        and a.peer == link.key), None)
            fetches += [a for a in actions if isinstance(a, rp.Fetch)]
            await self.g.execute([a for a in actions if a is not req
                                and not isinstance(a, rp.Fetch)])
            if req is None:
                return fetches
            answer = await link.client.reconcile(req.payload)
            actions = self.g.replica.on_sync(link.key, answer, self.g.now_ms(), initiator=True)

    async def _fetch_direct(self, link: PartnerLink, a: rp.Fetch, count: Progress
                            ) -> list[rp.Action]:
        try:
            envs = await link.client.fetch(sync.encode_wants(a.wants))
        except PeerError as exc:
            log.warning("fetch failed", extra=fields(partner=link.row.name, error=str(exc)))
            return []
        if envs:
            res = await self.g.ingest.ingest(envs, source=link, via=a.via)
            count(res.accepted, 0)
        return self.g.replica.on_fetch_done(link.key, a.wants, len(envs), self.g.now_ms())

def _span(replica: rp.Replica, a: rp.Action) -> int:
    """Records a Fetch is after, up to the end of its chain's range (not one answer)."""
    if not isinstance(a, rp.Fetch):
        return 0
    n = 0
    for w in a.wants:
        f = replica.fetching.get(w.key)
        n += max(w.to_seq, f[1] if f else 0) - w.from_seq + 1
    return n
