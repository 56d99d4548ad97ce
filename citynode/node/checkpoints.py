"""Checkpoints and proofs: this node's signed Merkle checkpoints of its own feeds, the
checkpoints and fork or split-view proofs partners send, and their forwarding.

A proof or checkpoint is verified offline before it is kept; whether it is new and
where it goes on is the replica's (``on_proof``, ``on_checkpoint``); the gossip role
carries out the sending.

Checkpoints are also liveness statements (core/liveness.py): an own feed with a cadence
gets one at least every half cadence, grown or not; the newest statement of every
(origin, feed) is held in memory, forwarded when newer, and gives the feed's state. It
is kept in storage too (``liveness``), so a restarted node knows the states at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future

from citynode.config import Config
from citynode.core import checkpoints as cps
from citynode.core import liveness as lv
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
#: Feeds whose newest liveness statement is held (memory bound; further feeds are
#: stored and forwarded as before, and show as "unknown").
LIVENESS_MAX = 100_000


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
        #: Told of every partner's checkpoint verified: (checkpoint, partner, verdict:
        #: "new", "known" or "split-view"); the witness role's.
        self.on_verified: Callable[[cps.Checkpoint, bytes | None, str], None] = \
            lambda cp, src, verdict: None
        #: A fork among a retired key's records inside its window was found: cut the
        #: origin's held chains back to what its key events confirm.
        self.on_settled: Callable[[bytes], None] = lambda origin: None
        #: The cadence of a feed from the card in force (ours: node.toml); None: none.
        self.cadence_of: Callable[[bytes, str], int | None] = lambda origin, feed: None
        #: Per (origin, feed): the newest liveness statement held (core/liveness.py).
        self.liveness: dict[tuple[bytes, str], lv.FeedLiveness] = {}
        #: Checkpoints of one feed are taken one at a time (striped: bounded memory).
        self._feed_locks = [asyncio.Lock() for _ in range(64)]
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

    async def checkpoint_now(self, *, grown: bool = True) -> list[cps.Checkpoint]:
        """Sign a checkpoint of every own feed that grew since its last one (when
        ``grown``) and of every own feed with a cadence whose last statement is half a
        cadence old (a heartbeat, grown or not), store it, and send it to the
        partners. An own feed this node holds a fork or split-view proof against is
        never signed on again, not even a heartbeat: each new statement of it would
        only show partners one more split view (and say "alive" of a feed that is
        not)."""
        made = []
        me = self.policy.public_key
        now = self.now_ms()
        cadenced = {f: fc.cadence_seconds for f, fc in self.config.feeds.items()
                    if fc.cadence_seconds is not None}
        own = {f for (o, f) in list(self.replica.heads) if o == me} | set(cadenced)
        for feed in sorted(own - set(self.replica.own_forked)):
            # The head on disk, not in memory: while a publish is being committed the
            # memory runs ahead, and a checkpoint covers committed records only (under
            # steady publishing, waiting for the two to meet could wait forever).
            committed = await in_thread(self.storage.head, me, feed)
            size = committed[0] if committed is not None else 0
            held = await self.held(me, feed)
            grew = size > (held[-1][0] if held else 0)
            fl = self.liveness.get((me, feed))
            last = fl.newest.time if fl is not None and fl.newest is not None else None
            cadence = cadenced.get(feed)
            # Half a cadence: the statement reaches partners (a hop or two, a sync
            # round) before a whole cadence has passed since the last one.
            beat = cadence is not None and (last is None or now - last >= cadence * 500)
            if not (beat or (grown and grew)):
                continue
            root = (cps.EMPTY_ROOT if size == 0 else
                    await in_thread(self.storage.tree(me, feed, size).root, size))
            cp = cps.sign_checkpoint(self.key, feed, size, root, max(now, (last or 0) + 1))
            await asyncio.wrap_future(
                self.storage.put_checkpoint(me, feed, cp.size, cp.root, cp.envelope))
            self._observe(me, feed, cp, now)
            made.append(cp)
        for cp in made:
            await self.execute(self.replica.on_checkpoint(None, me, cp.feed, cp.envelope))
        return made

    async def run(self) -> None:
        """Sign checkpoints of grown feeds every ``[checkpoints] interval_seconds``, and
        heartbeats of feeds with a cadence every half cadence, until cancelled."""
        loop = asyncio.get_running_loop()
        next_full = loop.time() + self.config.checkpoints.interval_seconds
        while True:
            # Read each time round: a reload may change the interval or a cadence.
            interval = self.config.checkpoints.interval_seconds
            tick = min([interval, *(fc.cadence_seconds / 2
                                    for fc in self.config.feeds.values()
                                    if fc.cadence_seconds is not None)])
            next_full = min(next_full, loop.time() + interval)
            await asyncio.sleep(tick)
            full = loop.time() >= next_full - tick / 10
            if full:
                next_full = loop.time() + interval
            try:
                await self.checkpoint_now(grown=full)
            except CitynodeError as exc:
                log.warning("checkpoint failed", extra=fields(error=str(exc)))

    # ------------------------------------------------------------------ liveness

    async def load_liveness(self) -> int:
        """At start: the newest liveness statement of each feed as kept before the
        restart (at most LIVENESS_MAX, the newest), so states are known at once rather
        than "unknown" until the next statements arrive. Returns how many."""
        rows = await in_thread(self.storage.liveness, LIVENESS_MAX)
        now = self.now_ms()
        for origin, feed, size, t, root, env, grew_at in rows:
            self.liveness[(origin, feed)] = lv.FeedLiveness.restored(
                lv.Statement(size, t, root, env), grew_at, now)
        return len(rows)

    def _observe(self, origin: bytes, feed: str, cp: cps.Checkpoint, now: int) -> str:
        """Take a verified checkpoint as a liveness statement: its
        :meth:`~citynode.core.liveness.FeedLiveness.verdict`, "new" if newer than the
        one held (then kept in storage too; the write is queued, not awaited). Raises
        InvalidRecord (checkpoint_older, checkpoint_smaller)."""
        fl = self.liveness.get((origin, feed))
        if fl is None:
            if len(self.liveness) >= LIVENESS_MAX:
                return "known"
            fl = self.liveness[(origin, feed)] = lv.FeedLiveness()
        st = lv.Statement(cp.size, cp.time, cp.root, cp.envelope)
        verdict = fl.verdict(st)
        if verdict == "new" and fl.observe(st, now):
            self.storage.put_liveness(origin, feed, cp.size, cp.time, cp.root, cp.envelope,
                                      fl.grew_at).add_done_callback(_log_failed_write)
        return verdict

    def rewind(self, origin: bytes, feed: str, size: int) -> None:
        """Records of a feed above ``size`` were dropped (a recovery cut them off):
        forget the liveness statement held of it if it counts them (storage forgot it
        with the records), so the feed's next honest checkpoint, of fewer records, is
        taken rather than refused as ``checkpoint_smaller``."""
        fl = self.liveness.get((origin, feed))
        if fl is not None and fl.newest is not None and fl.newest.size > size:
            del self.liveness[(origin, feed)]

    async def drop_refused(self, identity: bytes) -> int:
        """``identity``'s key log changed (a recovery): forget the checkpoints held of
        its feeds that the log now refuses (signed by a key beyond the heads it named,
        or by one it no longer names), and the liveness statement if it is one --
        whether or not the records they count were ever held here. Kept, a stolen
        key's checkpoint of more records than the honest chain would make the origin's
        next honest checkpoints look smaller (refused as ``checkpoint_smaller``), and
        the origin itself, holding one of its own feed, would sign no checkpoint until
        it grew past that size. Returns how many checkpoints went."""
        state = self.policy.keys.state(identity)
        if state is None:
            return 0
        now = self.now_ms()
        gone = 0
        feeds = {f for (o, f) in [*self.replica.heads, *self.liveness] if o == identity}
        for feed in sorted(feeds):
            # One taken of this feed meanwhile is stored first, or judged again after.
            async with self._feed_lock(identity, feed):
                base = state.established.get(feed)
                above = base.seq if base is not None else 0
                # Only statements beyond the heads its key events fixed can be refused.
                refused = [(s, r, e) for s, r, e in await self.held(identity, feed)
                           if s > above and self._refused(e, now)]
                fl = self.liveness.get((identity, feed))
                if fl is not None and fl.newest is not None and self._refused(
                        fl.newest.envelope, now):
                    del self.liveness[(identity, feed)]
                    n = fl.newest
                    if not any(e == n.envelope for _s, _r, e in refused):
                        refused.append((n.size, n.root, n.envelope))
                if refused:
                    gone += await asyncio.wrap_future(
                        self.storage.drop_checkpoints(identity, feed, refused))
                    log.warning("dropped checkpoints a key event refuses", extra=fields(
                        origin=self.policy.name(identity), feed=feed,
                        sizes=sorted(s for s, _r, _e in refused)))
        return gone

    def _refused(self, env: bytes, now: int) -> bool:
        """True if the checkpoint ``env`` is signed by a key its origin's log, as held
        now, does not let sign it."""
        try:
            cps.open_checkpoint(env, verifier=self.verifier, now_ms=now,
                                key_states=self.policy.keys.state)
        except InvalidRecord as exc:
            return exc.reason in _KEY_REFUSALS
        return False

    def newest(self, origin: bytes, feed: str) -> bytes | None:
        """The envelope of the newest liveness statement held of a feed, if any."""
        fl = self.liveness.get((origin, feed))
        return fl.newest.envelope if fl is not None and fl.newest is not None else None

    async def latest(self, origin: bytes, feed: str) -> bytes | None:
        """The checkpoint to offer of a feed: the newest liveness statement held (a
        heartbeat is newer than the first checkpoint of its size, which is what storage
        keeps), unless storage holds one of a larger size (a checkpoint of a larger
        size may have been kept when the statement of it was not: LIVENESS_MAX)."""
        held = await self.held(origin, feed)
        fl = self.liveness.get((origin, feed))
        if fl is not None and fl.newest is not None and (
                not held or fl.newest.size >= held[-1][0]):
            return fl.newest.envelope
        return held[-1][2] if held else None

    def states(self) -> list[dict[str, object]]:
        """Every feed held or heard of, with its liveness state (core/liveness.py):
        ``origin`` (key), ``feed``, ``state``, ``head`` (records held here),
        ``signed_size`` and ``signed_time`` of the newest statement (None: none),
        ``cadence_s`` and ``behind_since`` (ms; None unless behind)."""
        now = self.now_ms()
        bound = int(self.config.federation.sync_bound_seconds * 1000)
        out: list[dict[str, object]] = []
        keys = set(self.liveness) | set(self.replica.heads)
        for origin, feed in sorted(keys):
            h = self.replica.head((origin, feed))
            head = h.seq if h else 0
            fl = self.liveness.get((origin, feed)) or lv.FeedLiveness()
            cadence = self.cadence_of(origin, feed)
            n = fl.newest
            out.append({
                "origin": origin, "feed": feed,
                "state": fl.state(cadence_s=cadence, head=head, now_ms=now,
                                  sync_bound_ms=bound),
                "head": head, "signed_size": n.size if n else None,
                "signed_time": n.time if n else None, "cadence_s": cadence,
                "behind_since": fl.behind_since(head) if n and head < n.size else None,
            })
        return out

    # ------------------------------------------------------------------ from partners

    async def ingest_checkpoint(self, env: bytes, src: bytes | None) -> str:
        """A checkpoint from partner ``src``: verify, keep, forward if new. Two
        checkpoints of one feed and size with different roots are a split view: kept as
        proof and forwarded like a fork proof. A newer liveness statement (same size,
        later time) is forwarded too. Returns "new", "known" or "split-view"; a stale
        one (signed before the newest statement held, of no more records: an honest
        heartbeat arriving late, queued or by a slower path) is "known": kept if of a
        size not held (evidence for split views), not forwarded, not counted.

        Raises InvalidRecord, counted on ``src``'s tally: ``future_time``,
        ``untrusted_origin``, ``checkpoint_older`` or ``checkpoint_smaller`` (a
        statement inconsistent with the newest held: nothing is stored or forwarded),
        or any reason :func:`cps.open_checkpoint` gives."""
        try:
            return await self._ingest_checkpoint(env, src)
        except InvalidRecord as exc:
            self.metrics.rejected.labels(exc.reason).inc()
            self.partners.count_invalid(self.partners.get(src) if src else None, exc.reason)
            raise

    async def _ingest_checkpoint(self, env: bytes, src: bytes | None) -> str:
        now = self.now_ms()
        cp = cps.open_checkpoint(env, verifier=self.verifier, now_ms=now,
                                 key_states=self.policy.keys.state)
        if not self.policy.accepts_origin(cp.origin):
            raise InvalidRecord("checkpoint of an origin this node does not trust",
                                "untrusted_origin")
        # One feed's checkpoints one at a time: two roots of one size arriving together
        # (the two sides of a split view, from two partners) would each find no other
        # held, both be taken as new and passed on, and the split view go unproven here.
        async with self._feed_lock(cp.origin, cp.feed):
            mine = await self._other_root(cp)
            if mine is None:
                # The key log may have changed since the checkpoint was opened (a
                # recovery, its purge waiting for this lock): judged again, with no
                # await before it is observed, so the purge finds what it must drop.
                if cp.key is not None and self._refused(env, now):
                    raise InvalidRecord("checkpoint signed by a key its origin's log no "
                                        "longer lets sign it", "beyond_last_good")
                # Evidence of a split view first (above): going backwards in time does
                # not hide it. Then the liveness rules; a refusal changes nothing.
                verdict = self._observe(cp.origin, cp.feed, cp, now)
                new = await asyncio.wrap_future(
                    self.storage.put_checkpoint(cp.origin, cp.feed, cp.size, cp.root, env))
                # Not kept: one of this size is held. Another process on a shared
                # database may have kept another root of it meanwhile.
                mine = None if new else await self._other_root(cp)
                if mine is None:
                    if verdict == "new" or (new and verdict != "stale"):
                        await self.execute(
                            self.replica.on_checkpoint(src, cp.origin, cp.feed, env))
                        self.on_verified(cp, src, "new")
                        return "new"
                    self.on_verified(cp, src, "known")
                    return "known"
            try:
                await self.keep_split_view(mine, env)
            except InvalidProof as exc:
                if exc.reason != "settled_by_key_event":
                    raise
                self.on_verified(cp, src, "known")
                return "known"  # a retired key's word inside its settled window
        self.on_verified(cp, src, "split-view")
        return "split-view"

    def _feed_lock(self, origin: bytes, feed: str) -> asyncio.Lock:
        """The lock a feed's checkpoints are taken and dropped under (striped)."""
        return self._feed_locks[hash((origin, feed)) % len(self._feed_locks)]

    async def _other_root(self, cp: cps.Checkpoint) -> bytes | None:
        """The envelope of a checkpoint held of ``cp``'s feed and size with another
        root (a split view), if any."""
        held = await self.held(cp.origin, cp.feed)
        return next((e for s, r, e in held if s == cp.size and r != cp.root), None)

    async def keep_split_view(self, a: bytes, b: bytes) -> bool:
        """Keep and forward the split-view proof of two checkpoint envelopes (one
        origin, feed and size, two roots). Built here, from a partner's checkpoint and
        ours: every partner that may be told gets it, the one that showed us the
        checkpoint too. True if it was new. Raises InvalidProof if it proves nothing."""
        proof = cps.SplitViewProof(a, b).canonical()
        ca, _cb = cps.verify_split_view(proof, self.verifier, self.policy.keys.state)
        return await self._on_proof(None, ca.origin, ca.feed, ca.size, "split-view",
                                    proof.encode())

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
            ca, _cb = cps.verify_split_view(sv, self.verifier, self.policy.keys.state)
            origin, feed, seq, kind = ca.origin, ca.feed, ca.size, "split-view"
            enc = sv.canonical().encode()
        else:
            a, b = verify_fork_proof(proof, self.verifier, key_states=self.policy.keys.state)
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
        not hold it yet. A fork the replica found among a retired key's records inside
        its window is no fork of the identity (``settled_by_key_event``: a key event
        named the chain there): not kept, the feed is not forked, and ``on_settled``
        asks to cut the held chain back to what the key event confirms (the record that
        showed the fork is on the named chain, what is held is not)."""
        if kind == "fork" and self.policy.keys.state(origin) is not None:
            try:
                verify_fork_proof(ForkProof.decode(enc), self.verifier,
                                  key_states=self.policy.keys.state)
            except InvalidProof as exc:
                if exc.reason != "settled_by_key_event":
                    raise
                self.replica.unfork(origin, feed)
                self.on_settled(origin)
                return False
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
            env = await self.latest(origin, feed)
            if env is None:
                continue
            for link in list(self.partners.links.values()):
                if self.policy.may_pass(link.key, origin, feed):
                    self.replica.on_deliver_failed(link.key, "checkpoint", env, 0)

    async def held_for(self, link: PartnerLink) -> list[tuple[str, bytes]]:
        """What to send a partner after the first good round with it since start: the
        latest checkpoint held of each feed it may be sent, and the proofs held (what it
        may have missed while this node was down, or before it was a partner), as
        ``(kind, payload)``."""
        out: list[tuple[str, bytes]] = []
        feeds = list(dict.fromkeys([*self.replica.heads, *self.liveness]))
        for origin, feed in feeds[:HELD_MAX]:
            if not self.policy.may_pass(link.key, origin, feed):
                continue
            env = await self.latest(origin, feed)
            if env is not None:
                out.append(("checkpoint", env))
        for f in (await in_thread(self.storage.fork_proofs))[:HELD_MAX]:
            if self.policy.may_pass(link.key, f.origin, f.feed, f.proof):
                out.append(("proof", f.proof))
        return out


#: Reasons :func:`cps.open_checkpoint` refuses a checkpoint for its signing key.
_KEY_REFUSALS = frozenset({"beyond_last_good", "identity_dead", "unknown_key"})


async def _nothing(actions: Sequence[rp.Action]) -> None:
    return None


def _log_failed_write(fut: Future[None]) -> None:
    """A liveness statement that could not be kept (a full disk): the one in memory
    stands; after a restart the feed shows the older one kept, or "unknown"."""
    exc = fut.exception()
    if exc is not None:
        log.warning("liveness statement not kept", extra=fields(error=str(exc)))
