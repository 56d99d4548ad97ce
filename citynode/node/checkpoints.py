"""Checkpoints and proofs: this node's signed Merkle checkpoints of its own feeds, the
checkpoints and fork or split-view proofs partners send, and their forwarding.

A proof or checkpoint is verified offline before it is kept; whether it is new and
where it goes on is the replica's (``on_proof``, ``on_checkpoint``); the gossip role
carries out the sending.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

from citynode.config import Config
from citynode.core import checkpoints as cps
from citynode.core import replica as rp
from citynode.core.chain import ForkProof, canonical_fork_proof, verify_fork_proof
from citynode.core.keys import SigningKey, Verifier
from citynode.errors import ChainError, CitynodeError, InvalidProof, InvalidRecord
from citynode.logs import fields
from citynode.metrics import Metrics
from citynode.node._base import in_thread
from citynode.node.partners import PartnerLink, Partners
from citynode.node.policy import Policy
from citynode.storage import Storage

#: Checkpoints, and proofs, sent to a partner after the first good round since start.
HELD_MAX = 500


__all__ = ["Checkpoints"]

log = logging.getLogger("citynode.node")


class Checkpoints:
    """Sign, verify, keep and forward checkpoints and proofs. ``on_fork(origin, feed,
    seq)`` is told of every fork or split view held (the publishing role stops signing
    on an own feed that forked)."""

    def __init__(self, *, config: Config, key: SigningKey, replica: rp.Replica,
                 policy: Policy, partners: Partners, storage: Storage, metrics: Metrics,
                 verifier: Verifier, now_ms: Callable[[], int]) -> None:
        self.config = config
        self.key = key
        self.replica = replica
        self.policy = policy
        self.partners = partners
        self.storage = storage
        self.metrics = metrics
        self.verifier = verifier
        self.now_ms = now_ms
        self.on_fork: Callable[[bytes, str, int], None] = lambda origin, feed, seq: None
        # The gossip role's: carry out actions (and wait for those touching storage).
        self.execute: Callable[[Sequence[rp.Action]], Awaitable[None]] = _nothing

    # ------------------------------------------------------------------ trees

    async def merkle_log(self, origin: bytes, feed: str, size: int) -> cps.StoredTree:
        """The Merkle tree of a feed held here, with at least ``size`` leaves. Raises
        ChainError if this node holds fewer than ``size`` records of it.

        The tree lives on disk (storage grows it with the records): nothing is held in
        memory, and each root or proof of the tree returned reads O(log n) stored hashes
        (a few ms at most; call it from a worker thread where that matters)."""
        h = self.replica.head((origin, feed))
        have = h.seq if h else 0
        if have < size:
            raise ChainError(f"this node holds {have} records of that feed, not {size}")
        # The head in memory may run ahead of the commit: the tree is what is on disk.
        held = await in_thread(self.storage.head, origin, feed)
        if held is None or held[0] < size:
            raise ChainError(f"this node holds only {held[0] if held else 0} records of "
                             f"that feed, not {size}")
        return self.storage.tree(origin, feed, held[0])

    async def inclusion(self, origin: bytes, feed: str, seq: int, size: int
                        ) -> tuple[list[bytes], bytes]:
        """``(path, root)``: the inclusion proof of the record at ``seq`` in the feed's
        tree of ``size``, and that tree's root, read off the event loop. Raises
        ChainError if fewer than ``size`` records are held."""
        tree = await self.merkle_log(origin, feed, size)
        return await in_thread(lambda: (tree.inclusion_proof(seq - 1, size), tree.root(size)))

    async def consistency(self, origin: bytes, feed: str, old: int, new: int
                          ) -> tuple[list[bytes], bytes, bytes]:
        """``(path, old root, new root)`` of the feed's trees of ``old`` and ``new``
        leaves, read off the event loop. Raises ChainError as :meth:`inclusion`."""
        tree = await self.merkle_log(origin, feed, new)
        return await in_thread(lambda: (tree.consistency_proof(old, new), tree.root(old),
                                        tree.root(new)))

    async def held(self, origin: bytes, feed: str) -> list[tuple[int, bytes, bytes]]:
        """The checkpoints held of a feed: ``(size, root, envelope)`` by size."""
        return await in_thread(self.storage.checkpoints, origin, feed)

    # ------------------------------------------------------------------ our checkpoints

    async def checkpoint_now(self) -> list[cps.Checkpoint]:
        """Sign a checkpoint of every own feed that grew since its last one, store it,
        and send it to the partners."""
        made = []
        me = self.key.public_key
        for (origin, feed) in list(self.replica.heads):
            if origin != me:
                continue
            # The head on disk, not in memory: while a publish is being committed the
            # memory runs ahead, and a checkpoint covers committed records only (under
            # steady publishing, waiting for the two to meet could wait forever).
            committed = await in_thread(self.storage.head, origin, feed)
            if committed is None:
                continue
            size = committed[0]
            held = await self.held(origin, feed)
            if held and held[-1][0] >= size:
                continue
            root = await in_thread(self.storage.tree(origin, feed, size).root, size)
            cp = cps.sign_checkpoint(self.key, feed, size, root, self.now_ms())
            await asyncio.wrap_future(
                self.storage.put_checkpoint(origin, feed, cp.size, cp.root, cp.envelope))
            made.append(cp)
        for cp in made:
            await self.execute(self.replica.on_checkpoint(None, me, cp.feed, cp.envelope))
        return made

    async def run(self) -> None:
        """Sign checkpoints every ``[checkpoints] interval_seconds``, until cancelled."""
        while True:
            await asyncio.sleep(self.config.checkpoints.interval_seconds)
            try:
                await self.checkpoint_now()
            except CitynodeError as exc:
                log.warning("checkpoint failed", extra=fields(error=str(exc)))

    # ------------------------------------------------------------------ from partners

    async def ingest_checkpoint(self, env: bytes, src: bytes | None) -> str:
        """A checkpoint from partner ``src``: verify, keep, forward if new. Two
        checkpoints of one feed and size with different roots are a split view: kept as
        proof and forwarded like a fork proof. Returns "new", "known" or
        "split-view"."""
        cp = cps.open_checkpoint(env, verifier=self.verifier, now_ms=self.now_ms())
        if not self.policy.accepts_origin(cp.origin):
            raise InvalidRecord("checkpoint of an origin this node does not trust",
                                "untrusted_origin")
        new = await asyncio.wrap_future(
            self.storage.put_checkpoint(cp.origin, cp.feed, cp.size, cp.root, env))
        if new:
            await self.execute(self.replica.on_checkpoint(src, cp.origin, cp.feed, env))
            return "new"
        held = await self.held(cp.origin, cp.feed)
        mine = next((e for s, r, e in held if s == cp.size and r != cp.root), None)
        if mine is None:
            return "known"
        proof = cps.SplitViewProof(mine, env).canonical()
        cps.verify_split_view(proof, self.verifier)
        # Built here (from the partner's checkpoint and ours): every partner that may
        # be told gets it, the one that showed us the checkpoint too.
        await self._on_proof(None, cp.origin, cp.feed, cp.size, "split-view",
                             proof.encode())
        return "split-view"

    async def _on_proof(self, src: bytes | None, origin: bytes, feed: str, seq: int,
                        kind: str, enc: bytes) -> bool:
        """Hand a verified proof to the replica; True if it was new and kept."""
        actions = self.replica.on_proof(src, origin, feed, seq, kind, enc)
        new = False
        for a in actions:
            if isinstance(a, rp.StoreProof):
                new = await self.keep_proof(a.origin, a.feed, a.seq, a.kind, a.proof,
                                            a.source) or new
        await self.execute([a for a in actions if not isinstance(a, rp.StoreProof)])
        return new

    async def ingest_proof(self, data: bytes, src: bytes | None) -> bool:
        """A fork or split-view proof from a partner: verify it offline, store and
        forward it if new. Raises InvalidProof if it proves nothing."""
        try:
            proof = ForkProof.decode(data)
        except InvalidProof:
            sv = cps.SplitViewProof.decode(data)
            ca, _cb = cps.verify_split_view(sv, self.verifier)
            origin, feed, seq, kind = ca.origin, ca.feed, ca.size, "split-view"
            enc = sv.canonical().encode()
        else:
            a, b = verify_fork_proof(proof, self.verifier)
            proof, seq = canonical_fork_proof(a, b)
            origin, feed, kind, enc = a.origin, a.feed, "fork", proof.encode()
        if not self.policy.accepts_origin(origin):
            # Proofs about strangers are no business of ours (and would let anyone fill
            # our database and our partners' with them).
            raise InvalidProof("proof about an origin this node does not trust",
                               "untrusted_origin")
        return await self._on_proof(src, origin, feed, seq, kind, enc)

    async def keep_proof(self, origin: bytes, feed: str, seq: int, kind: str,
                         enc: bytes, src: bytes | None) -> bool:
        """Store a proof the replica found new (a StoreProof); True if the database did
        not hold it yet."""
        by = self.partners.get(src) if src is not None else None
        new = await asyncio.wrap_future(self.storage.add_fork_proof(
            origin, feed, seq, kind, enc, by.row.node_id if by else "local", self.now_ms()))
        self.on_fork(origin, feed, seq)
        if new:
            self.metrics.forks.inc()
        return new

    async def offer_latest(self, origin: bytes) -> None:
        """A newer card of ``origin`` may let more partners be told about its feeds: the
        latest checkpoint held of each of its feeds waits for the next round with every
        partner that may now be sent it (one that has it already answers "known")."""
        for feed in {f for (o, f) in list(self.replica.heads) if o == origin}:
            held = await self.held(origin, feed)
            if not held:
                continue
            for link in list(self.partners.links.values()):
                if self.policy.may_pass(link.key, origin, feed):
                    self.replica.on_deliver_failed(link.key, "checkpoint", held[-1][2], 0)

    async def held_for(self, link: PartnerLink) -> list[tuple[str, bytes]]:
        """What to send a partner after the first good round with it since start: the
        latest checkpoint held of each feed it may be sent, and the proofs held (what it
        may have missed while this node was down, or before it was a partner), as
        ``(kind, payload)``."""
        out: list[tuple[str, bytes]] = []
        for origin, feed in list(self.replica.heads)[:HELD_MAX]:
            if not self.policy.may_pass(link.key, origin, feed):
                continue
            held = await self.held(origin, feed)
            if held:
                out.append(("checkpoint", held[-1][2]))
        for f in (await in_thread(self.storage.fork_proofs))[:HELD_MAX]:
            if self.policy.may_pass(link.key, f.origin, f.feed, f.proof):
                out.append(("proof", f.proof))
        return out


async def _nothing(actions: Sequence[rp.Action]) -> None:
    return None
