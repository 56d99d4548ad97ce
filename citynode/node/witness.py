"""The witness role: cosign partners' checkpoints, keep and exchange cosignatures, refuse
and prove split views, and say which checkpoints have the quorum of cosignatures this
node requires (docs/PROTOCOL.md, "Cosignatures"; the decisions are core/cosign.py's).

* A checkpoint a partner sent that verified and was kept (the checkpoints role calls
  :meth:`Witness.checkpoint_seen`) is queued, one per (origin, feed), newest kept; one
  task (:meth:`Witness.run`) cosigns what is queued: with the last checkpoint this node
  cosigned of that feed and a consistency proof from its size (computed from the
  records held, else fetched from the partner that sent it, else from the origin), it
  runs ``cosign``; a cosignature is stored and sent to every partner that may be told
  of the feed (``POST /v1/cosignatures``, a cosigned checkpoint).
* Relaying: a cosignature received that verified and was stored here for the first
  time is passed on, as records are gossiped, to every partner that may be told of the
  feed but the sender and its witness (:meth:`Witness.relay`), so a node requires
  witnesses that are not its partners and witnesses meet through any path.
* A cosigned checkpoint from a partner (:meth:`Witness.ingest`): the checkpoint is
  taken as any checkpoint (the checkpoints role: a different root at a size held is a
  split view, kept as proof, alerted and forwarded), then each cosignature verified:
  by a witness this node has a reason to take (:meth:`Witness.known_witness`: itself,
  one ``[witness] require`` names, or a partner when this node cosigns or is the
  origin; never the origin itself), with a key accepted for it, about exactly that
  checkpoint. Any other is dropped before its signature is checked (refused
  ``not_witness`` when the sender claims it as its own; counted on the sender only
  when the sender is the checkpoint's origin vouching for itself). Only
  verified cosignatures of a checkpoint held here are stored (and relayed); each
  refusal is counted on the partner by reason.
* Trust: a checkpoint is trusted when cosignatures of at least ``[witness] quorum``
  distinct witnesses of ``[witness] require`` are held of it (:meth:`Witness.trust`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from prometheus_client import Counter, Gauge

from citynode.config import Config
from citynode.core import checkpoints as cps
from citynode.core import cosign as cs
from citynode.core.keys import NodeKey, SigningKey, Verifier, canonical_id, parse_node_id
from citynode.errors import (
    CitynodeError,
    EncodingError,
    InvalidProof,
    InvalidRecord,
    PeerError,
)
from citynode.logs import fields
from citynode.metrics import Metrics
from citynode.node._base import Spawn, in_thread
from citynode.node.checkpoints import Checkpoints
from citynode.node.partners import Partners
from citynode.node.policy import Policy
from citynode.storage import Storage

__all__ = ["MAX_QUEUED", "Witness"]

log = logging.getLogger("citynode.node")

#: Feeds whose newest checkpoint waits to be cosigned, at most (one each).
MAX_QUEUED = 10_000
#: Feeds whose trust (quorum met or not) is tracked for status and the metric.
MAX_TRACKED = 100_000
#: Checkpoints of one feed listed with their cosignatures (``GET /v1/cosignatures``).
MAX_LISTED = 1000
#: Feeds whose last cosigned checkpoint is sent to a partner whose link opens.
HELD_MAX = 500
#: Seconds between looks at whether this node's signing key changed (a rotation or a
#: recovery): then its latest cosignatures are made again with the new key.
REKEY_POLL = 2.0
#: Cosignatures read per checkpoint listed, before the 64 sent are chosen.
_PER_CHECKPOINT = 2 * cs.MAX_COSIGNATURES
#: Key logs fetched per cosigned checkpoint received, for witnesses whose key is not
#: the one held (a rotation whose log has not arrived yet, a log never held).
MAX_LOG_FETCHES = 4
#: Attempts to deliver one cosigned checkpoint to one partner.
DELIVERY_ATTEMPTS = 4
#: Refusals of the witness's decision that say nothing against the partner that sent
#: the checkpoint: an honest, older checkpoint arriving late.
_NOT_COUNTED = frozenset({"checkpoint_regress"})


def _identity(key: SigningKey) -> bytes:
    return key.identity if isinstance(key, NodeKey) else key.public_key


class Witness:
    """Cosign, keep and exchange cosignatures; see the module docstring."""

    def __init__(self, *, config: Config, key: SigningKey, policy: Policy,
                 partners: Partners, checkpoints: Checkpoints, storage: Storage,
                 metrics: Metrics, verifier: Verifier, now_ms: Callable[[], int],
                 spawn: Spawn) -> None:
        self.config = config
        self.key = key
        self.me = _identity(key)
        self.policy = policy
        self.partners = partners
        self.checkpoints = checkpoints
        self.storage = storage
        self.verifier = verifier
        self.now_ms = now_ms
        self.spawn = spawn
        w = config.witness
        self.cosign_for = frozenset(parse_node_id(i) for i in w.cosign_for)
        self.require = tuple(parse_node_id(i) for i in w.require)
        self.k = w.k
        self._queue: dict[tuple[bytes, str], tuple[cps.Checkpoint, bytes | None]] = {}
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        #: run() under way: this process witnesses (the leader, when several share a
        #: PostgreSQL database); only then are checkpoints queued and links greeted.
        self.running = False
        #: (origin, feed) -> (size, witnesses required holding a cosignature, trusted)
        self.tracked: dict[tuple[bytes, str], tuple[int, int, bool]] = {}
        self._untrusted = 0  # of tracked, not trusted (kept as tracked changes)
        self._signed_with = key.public_key
        self.counts: dict[str, int] = {}
        #: Fetch a key log from a partner and offer it (the coordinator's; True if taken).
        self.fetch_key_log: Callable[[Any, bytes], Awaitable[bool]] | None = None
        r = metrics.registry
        self.m_cosigned = Counter("citynode_cosignatures_signed",
                                  "Checkpoints this node cosigned as a witness", registry=r)
        self.m_received = Counter("citynode_cosignatures_received",
                                  "Cosignatures received from partners, by result",
                                  ["result"], registry=r)
        self.m_refused = Counter("citynode_cosign_refused",
                                 "Checkpoints this node refused to cosign, by reason",
                                 ["reason"], registry=r)
        self.m_untrusted = Gauge("citynode_checkpoints_untrusted",
                                 "Feeds whose newest checkpoint lacks the [witness] quorum "
                                 "of cosignatures", registry=r)

    # ------------------------------------------------------------------ who

    def cosigns_for(self, origin: bytes) -> bool:
        """Whether this node cosigns ``origin``'s checkpoints: ``[witness] cosign``, and
        ``origin`` is a partner (one ``cosign_for`` names, when it names any)."""
        if not self.config.witness.cosign or origin == self.me:
            return False
        if self.partners.get(origin) is None:
            return False
        return not self.cosign_for or origin in self.cosign_for

    def keys_of(self, witness: bytes) -> frozenset[bytes]:
        """The keys a cosignature of ``witness`` may be signed by: a cn1 witness's key
        (its id); for a cn2 witness only the key in force now in its log held (a key
        rotated away from or cut off by a recovery counts for nothing), none if it
        died (``cosign.witness_keys``)."""
        return cs.witness_keys(witness, self.policy.keys.state(witness))

    def known_witness(self, witness: bytes, origin: bytes) -> bool:
        """Whether this node has a reason to take (verify, keep and relay) a
        cosignature by ``witness`` of a checkpoint of ``origin``: its own; one of a
        witness ``[witness] require`` names (a partner or not: its cosignatures arrive
        relayed); or one of a partner when this node takes part in witnessing, that is
        it cosigns (``cosign = true``: witnesses meet, keep and pass on each other's
        cosignatures) or ``origin`` is this node (it gathers its own checkpoints'
        cosignatures, serves and relays them, and its bundles carry them). An origin
        never witnesses its own checkpoint: it signed it already, and its cosignature
        would stand for a second, independent observer. Anyone else's is dropped
        unchecked (``not_witness`` when the sender sent it as its own; counted on it only
        when it is the origin)."""
        if witness == self.me:
            return True
        if witness == origin:
            return False
        if witness in self.require:
            return True
        return ((self.config.witness.cosign or origin == self.me)
                and self.partners.get(witness) is not None)

    def require_log_missing(self) -> list[str]:
        """The cn2 witnesses ``[witness] require`` names whose key log is not held (as
        written in node.toml): none of their cosignatures verifies here yet."""
        return [name for name, w in zip(self.config.witness.require, self.require,
                                        strict=True)
                if canonical_id(name).startswith("cn2")
                and self.policy.keys.state(w) is None]

    # ------------------------------------------------------------------ cosigning

    def checkpoint_seen(self, cp: cps.Checkpoint, src: bytes | None, verdict: str) -> None:
        """The checkpoints role verified ``cp`` from partner ``src``: ``verdict`` "new",
        "known" or "split-view". A split view is counted on ``src`` (this node never
        cosigns it); any other is queued for cosigning (newest per feed) and its trust
        looked at again."""
        if verdict == "split-view":
            # The origin signed both: counted on it (when a partner), not on the
            # partner that passed one of them on.
            origin_link = self.partners.get(cp.origin)
            self._count(cp.origin if origin_link is not None else src, "split_view")
            self.m_refused.labels("split_view").inc()
            return
        if self.require:
            self.spawn(self.refresh(cp.origin, cp.feed), "witness-trust")
        if not self.running or not self.cosigns_for(cp.origin):
            # Not queued where nothing cosigns (a process that does not lead: the
            # leader's own partners' requests reach it too).
            return
        key = (cp.origin, cp.feed)
        queued = self._queue.get(key)
        if queued is None and len(self._queue) >= MAX_QUEUED:
            return
        if queued is None or queued[0].size <= cp.size:
            self._queue[key] = (cp, src)
            self._wake.set()

    async def run(self) -> None:
        """Cosign what is queued, until cancelled."""
        self.running = True
        for name in self.require_log_missing():
            # Its cosignatures still arrive (relayed): its key log is fetched from the
            # partner that passes the first one on.
            log.info("the key log of a required witness is not held yet",
                     extra=fields(witness=name))
        try:
            # A key changed while this node was down (or before its cosignatures were
            # made again): the same as a change seen while running.
            try:
                await self.rekey()
            except CitynodeError as exc:
                log.warning("cosigning again with the new key failed",
                            extra=fields(error=str(exc)))
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), REKEY_POLL)
                self._wake.clear()
                if self.key.public_key != self._signed_with:
                    try:
                        await self.rekey()
                    except CitynodeError as exc:
                        log.warning("cosigning again with the new key failed",
                                    extra=fields(error=str(exc)))
                await self.drain()
        finally:
            self.running = False

    async def drain(self) -> None:
        """Cosign every checkpoint queued now (one at a time)."""
        while self._queue:
            key = next(iter(self._queue))
            cp, src = self._queue.pop(key)
            try:
                await self.cosign(cp, src)
            except CitynodeError as exc:  # storage: the next checkpoint tries again
                log.warning("cosigning failed", extra=fields(error=str(exc)))

    async def rekey(self) -> int:
        """This node's signing key changed: cosign again, with the key in force now, the
        last checkpoint it cosigned of each feed (only that key's cosignatures count),
        keep and send each. Returns how many."""
        self._signed_with = new_key = self.key.public_key
        rows = await in_thread(self.storage.latest_cosigned, self.me, MAX_QUEUED)
        n = 0
        for origin, feed, size, root, cosig in rows:
            wk = cs.cosignature_fields(cosig)
            if wk is not None and wk[1] == new_key:
                continue
            env = next((e for s, r, e in await self.checkpoints.held(origin, feed)
                        if s == size and r == root), None)
            if env is None:
                continue
            try:
                cp = cps.open_checkpoint(env, verifier=self.verifier,
                                         key_states=self.policy.keys.state)
            except InvalidRecord:
                continue  # the origin's key log now refuses it
            async with self._lock:
                c = cs.sign_cosignature(self.key, self.me, cp, self.now_ms())
                await asyncio.wrap_future(self.storage.put_cosignature(
                    origin, feed, size, root, self.me, c.time, c.envelope))
            n += 1
            await self.refresh(origin, feed)
            self.send(cp, (c.envelope,))
        if n:
            log.warning("checkpoints cosigned again with the new key",
                        extra=fields(count=n))
        return n

    async def _last(self, origin: bytes, feed: str
                    ) -> tuple[cps.Checkpoint | None, bool]:
        """The checkpoint this node cosigned last of a feed, as held (None: never), and
        whether it is held: a cosignature is stored only with its checkpoint, so False
        means the database lost it (then nothing is cosigned: this node could no longer
        tell a split view)."""
        last = await in_thread(self.storage.last_cosigned, self.me, origin, feed)
        if last is None:
            return None, True
        size, root = last
        env = next((e for s, r, e in await self.checkpoints.held(origin, feed)
                    if s == size and r == root), None)
        if env is None:
            return None, False
        return cps.open_checkpoint(env, verifier=self.verifier,
                                   key_states=self.policy.keys.state), True

    async def cosign(self, cp: cps.Checkpoint, src: bytes | None) -> str:
        """Cosign ``cp`` (verified, of a feed this node cosigns) if the witness's
        decision allows: returns "cosigned", "known" (this head is cosigned already),
        "no_proof" (no consistency proof could be had: tried again with the next
        checkpoint), "lost" (the checkpoint last cosigned is no longer held) or the
        refusal's reason code (``split_view``, ``not_consistent`` counted on the origin,
        or on ``src`` when the origin is no partner; ``checkpoint_regress``, an older
        one arriving late, not). The checkpoint is kept with its cosignature."""
        async with self._lock:
            last, intact = await self._last(cp.origin, cp.feed)
            if not intact:
                log.warning("the checkpoint last cosigned is not held: not cosigning",
                            extra=fields(origin=self.policy.name(cp.origin), feed=cp.feed))
                self.m_refused.labels("lost").inc()
                self.counts["lost"] = self.counts.get("lost", 0) + 1
                return "lost"
            if last is not None and (last.size, last.root) == (cp.size, cp.root):
                return "known"
            held = next(((r, e) for s, r, e in await self.checkpoints.held(
                cp.origin, cp.feed) if s == cp.size), None)
            if held is not None and held[0] != cp.root and (
                    last is None or last.size < cp.size):
                # Another root of this size is held (not cosigned): a split view all
                # the same; cosign's own check covers the one it cosigned.
                last = cps.open_checkpoint(held[1], verifier=self.verifier,
                                           key_states=self.policy.keys.state)
            proof: Sequence[bytes] = ()
            if last is not None and 0 < last.size < cp.size:
                got = await self._proof(cp, last.size, src)
                if got is None:
                    return "no_proof"
                proof = got
            now = self.now_ms()
            try:
                c = cs.cosign(self.key, self.me, cp, now, last=last, proof=proof)
            except InvalidRecord as exc:
                self.m_refused.labels(exc.reason).inc()
                if exc.reason == "split_view" and last is not None:
                    await self.checkpoints.keep_split_view(last.envelope, cp.envelope)
                if exc.reason not in _NOT_COUNTED:
                    # The origin's doing (it signed both), counted on it when a partner.
                    self._count(cp.origin if self.partners.get(cp.origin) else src,
                                exc.reason)
                    log.warning("checkpoint not cosigned", extra=fields(
                        origin=self.policy.name(cp.origin), feed=cp.feed, size=cp.size,
                        reason=exc.reason))
                return exc.reason
            if held is None:
                await asyncio.wrap_future(self.storage.put_checkpoint(
                    cp.origin, cp.feed, cp.size, cp.root, cp.envelope))
            await asyncio.wrap_future(self.storage.put_cosignature(
                cp.origin, cp.feed, cp.size, cp.root, self.me, c.time, c.envelope))
            self.m_cosigned.inc()
        await self.refresh(cp.origin, cp.feed)
        self.send(cp, (c.envelope,))
        return "cosigned"

    async def _proof(self, cp: cps.Checkpoint, old: int, src: bytes | None
                     ) -> Sequence[bytes] | None:
        """The consistency proof from ``old`` to ``cp.size``: from the records held
        when they reach ``cp.size`` (a proof from another history fails the check, as
        it must), else asked of ``src``, then of the origin. None if none could be had."""
        head = await in_thread(self.storage.head, cp.origin, cp.feed)
        if head is not None and head[0] >= cp.size:
            path, _old_root, _new_root = await self.checkpoints.consistency(
                cp.origin, cp.feed, old, cp.size)
            return path
        origin_id = self.policy.keys.name(cp.origin)
        path_qs = (f"/v1/proofs/consistency?origin={origin_id}&feed={cp.feed}"
                   f"&old={old}&new={cp.size}")
        for who in dict.fromkeys([k for k in (src, cp.origin) if k is not None]):
            link = self.partners.get(who)
            if link is None:
                continue
            try:
                data = await link.client.request("GET", path_qs, max_bytes=4096)
                proof = cps.decode_consistency(data)
            except (PeerError, InvalidProof) as exc:
                log.info("no consistency proof from partner", extra=fields(
                    partner=link.row.name, error=str(exc)))
                continue
            if (proof.old_size, proof.new_size) == (old, cp.size):
                return proof.path
        return None

    def send(self, cp: cps.Checkpoint, cosignatures: Sequence[bytes]) -> None:
        """Send a cosigned checkpoint to every partner that may be told of its feed
        (not its origin's own partners only: witnesses meet through any partner)."""
        payload = cs.CosignedCheckpoint(cp.envelope, tuple(cosignatures)).encode()
        for link in list(self.partners.links.values()):
            if self.policy.may_pass(link.key, cp.origin, cp.feed):
                self.spawn(self._deliver(link.key, payload), "send-cosignature")

    def link_opened(self, key: bytes) -> None:
        """A partner link opened while this node witnesses: witnesses meet. It is sent
        the last checkpoint this node cosigned of each feed it may be told of, with the
        cosignature, so that a split view between the two shows at once; then the
        newest checkpoint held of each such feed with the cosignatures held of it (the
        relayed ones too: a partner that joins after a quiet feed's last checkpoint
        still learns who vouched for it)."""
        if self.running:
            self.spawn(self._send_held(key), "send-cosignatures")

    async def _send_newest(self, key: bytes) -> None:
        feeds = [f for f in list(self.checkpoints.replica.heads)
                 if self.policy.may_pass(key, *f)][:HELD_MAX]
        for origin, feed in feeds:
            held = await self.checkpoints.held(origin, feed)
            if not held:
                continue
            size, root, env = held[-1]
            rows = await in_thread(functools.partial(
                self.storage.cosignatures, origin, feed, size,
                per_checkpoint=_PER_CHECKPOINT))
            envs = [e for _s, r, w, e in rows
                    if r == root and w != key and self._counts_for(w, e)]
            if envs:
                await self._deliver(key, cs.CosignedCheckpoint(
                    env, cs.select_cosignatures(envs, self.require)).encode())

    async def _send_held(self, key: bytes) -> None:
        rows = await in_thread(self.storage.latest_cosigned, self.me, HELD_MAX)
        for origin, feed, size, root, cosig in rows:
            if not self.policy.may_pass(key, origin, feed):
                continue
            env = next((e for s, r, e in await self.checkpoints.held(origin, feed)
                        if s == size and r == root), None)
            if env is not None:
                await self._deliver(key, cs.CosignedCheckpoint(env, (cosig,)).encode())
        await self._send_newest(key)

    async def _deliver(self, partner: bytes, payload: bytes) -> None:
        wait = 1.0
        refusals = 0
        for _ in range(DELIVERY_ATTEMPTS):
            link = self.partners.get(partner)
            if link is None:
                return
            left = await self.partners.deliver(link, "/v1/cosignatures", payload, refusals)
            if left is None:
                return
            refusals = left
            await asyncio.sleep(wait)
            wait *= 2

    # ------------------------------------------------------------------ from partners

    async def ingest(self, body: bytes, src: bytes | None) -> dict[str, Any]:
        """A cosigned checkpoint from partner ``src``: take the checkpoint (as
        ``POST /v1/checkpoints`` does), then verify and keep its cosignatures. Returns
        ``{"result": the checkpoint's verdict, "stored": n, "known": n, "rejected":
        {reason: n}}``. Raises InvalidRecord (counted on ``src``) if the body is not a
        cosigned checkpoint (at most :data:`cs.MAX_COSIGNATURES`) or the checkpoint is
        refused."""
        try:
            cc = cs.CosignedCheckpoint.decode(body)
        except EncodingError as exc:
            self._count(src, exc.reason)
            self.m_received.labels("malformed").inc()
            raise
        verdict = await self.checkpoints.ingest_checkpoint(cc.checkpoint, src)
        cp = cps.open_checkpoint(cc.checkpoint, verifier=self.verifier,
                                 key_states=self.policy.keys.state)
        # The signatures (up to 64) off the event loop: a partner's batch never holds
        # up what this node does for the others.
        # Cheaply, before any signature is checked: a cosignature of a witness this
        # node does not know is dropped. Passed on by a relay (a partner that knows the
        # witness), it says nothing against the relay and is not counted; claimed by the
        # sender as its own, the sender is no witness here (``not_witness``).
        to_open: list[bytes] = []
        ignored = 0
        rejected: dict[str, int] = {}
        for env in cc.cosignatures:
            wk = cs.cosignature_fields(env)
            if wk is None or self.known_witness(wk[0], cp.origin):
                to_open.append(env)
            elif src is not None and wk[0] == src:
                # Refused ``not_witness`` in the answer either way; counted on the
                # sender only when it is the checkpoint's origin vouching for itself,
                # which no honest node does. An honest witness sends its cosignatures to
                # every partner, and one that has no use for them (it neither cosigns
                # nor requires that witness) is no fault of the sender's: counted, it
                # raised invalid-input alerts on honest partners.
                self._refuse(src if wk[0] == cp.origin else None, "not_witness",
                             rejected)
            else:
                ignored += 1
                self.m_received.labels("ignored").inc()
        # The signatures (up to 64) off the event loop: a partner's batch never holds
        # up what this node does for the others.
        opened = await in_thread(self._open_all, to_open)
        stored = known = 0
        fetched: set[bytes] = set()
        fresh: list[tuple[bytes, bytes]] = []  # (witness, envelope) stored now
        for c, reason in opened:
            if c is not None:
                if not self.known_witness(c.witness, cp.origin):
                    reason = "not_witness"
                elif c.key not in self.keys_of(c.witness) and not (
                        await self._learn_key(c.witness, src, fetched)
                        and c.key in self.keys_of(c.witness)):
                    reason = "wrong_key"
                elif not c.covers(cp):
                    reason = "wrong_checkpoint"
            if c is None or reason is not None:
                reason = reason or "bad_cosignature"
                # A relay checked the key against the log it holds, which may be older
                # or newer than this node's: a key judged differently is not its fault.
                counted = not (reason == "wrong_key" and c is not None
                               and c.witness != src)
                self._refuse(src if counted else None, reason, rejected)
                continue
            if verdict == "split-view" or c.witness == self.me:
                # Of a checkpoint not held here (the other side of a split view, whose
                # proof is kept): nothing to attach it to. Our own: held already.
                known += 1
                continue
            new = await asyncio.wrap_future(self.storage.put_cosignature(
                cp.origin, cp.feed, cp.size, cp.root, c.witness, c.time, c.envelope))
            stored += new
            known += not new
            self.m_received.labels("stored" if new else "known").inc()
            if new:
                fresh.append((c.witness, c.envelope))
        if stored:
            await self.refresh(cp.origin, cp.feed)
            self.relay(cp, fresh, src)
        return {"result": verdict, "stored": stored, "known": known, "ignored": ignored,
                "rejected": rejected}

    def _refuse(self, src: bytes | None, reason: str, rejected: dict[str, int]) -> None:
        """A cosignature refused for ``reason``: in the answer and the metric, and
        counted on ``src`` (None: on nobody, only in the status)."""
        rejected[reason] = rejected.get(reason, 0) + 1
        self._count(src, reason)
        self.m_received.labels(reason).inc()

    def relay(self, cp: cps.Checkpoint, fresh: Sequence[tuple[bytes, bytes]],
              src: bytes | None) -> None:
        """Pass on cosignatures this node verified and stored just now (``(witness,
        envelope)``, at most :data:`cs.MAX_COSIGNATURES`) as records are gossiped: to
        every partner that may be told of the feed, except the one that sent them and,
        for each cosignature, its own witness (both hold it). A cosignature is relayed
        once, when first stored (one already held is not passed on again), so it
        crosses each link at most once each way and the flood ends."""
        for link in list(self.partners.links.values()):
            if link.key == src or not self.policy.may_pass(link.key, cp.origin, cp.feed):
                continue
            envs = tuple(e for w, e in fresh if w != link.key)[:cs.MAX_COSIGNATURES]
            if envs:
                payload = cs.CosignedCheckpoint(cp.envelope, envs).encode()
                self.spawn(self._deliver(link.key, payload), "relay-cosignature")

    async def _learn_key(self, witness: bytes, src: bytes | None,
                         fetched: set[bytes]) -> bool:
        """A cosignature of ``witness`` by a key not accepted for it: the log held may
        be behind (it rotated) or none is held (a required witness that is no partner).
        Fetch its log from the witness, else from ``src`` (at most
        :data:`MAX_LOG_FETCHES` witnesses per batch): True if a log was taken."""
        if (self.fetch_key_log is None or witness in fetched
                or len(fetched) >= MAX_LOG_FETCHES):
            return False
        fetched.add(witness)
        for who in dict.fromkeys(k for k in (witness, src) if k is not None):
            link = self.partners.get(who)
            if link is not None and await self.fetch_key_log(link, witness):
                return True
        return False

    def _open_all(self, envelopes: Sequence[bytes]
                  ) -> list[tuple[cs.Cosignature | None, str | None]]:
        """Open each cosignature with the clock (in a worker thread): the cosignature,
        or None and the reason it was refused."""
        now = self.now_ms()
        tolerance = self.config.limits.future_tolerance_seconds * 1000
        out: list[tuple[cs.Cosignature | None, str | None]] = []
        for env in envelopes:
            try:
                out.append((cs.open_cosignature(env, verifier=self.verifier, now_ms=now,
                                                future_tolerance_ms=tolerance), None))
            except InvalidRecord as exc:
                out.append((None, exc.reason))
        return out

    def _count(self, src: bytes | None, reason: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        self.partners.count_invalid(self.partners.get(src) if src else None, reason)

    # ------------------------------------------------------------------ trust

    async def cosigned(self, origin: bytes, feed: str, size: int | None = None
                       ) -> list[dict[str, Any]]:
        """The checkpoints held of a feed (of one ``size`` if given, else the newest
        :data:`MAX_LISTED`) with their
        cosignatures: ``{"size", "root", "checkpoint", "cosignatures": [(witness,
        envelope)], "trusted"}`` by size; ``trusted`` None when no witness is required."""
        held = await self.checkpoints.held(origin, feed)
        held = held[-MAX_LISTED:] if size is None else [h for h in held if h[0] == size]
        if not held:
            return []
        # Exactly the checkpoints listed (one size, or the newest from the oldest
        # listed), a bounded number each.
        rows = await in_thread(functools.partial(
            self.storage.cosignatures, origin, feed, size, min_size=held[0][0],
            per_checkpoint=_PER_CHECKPOINT, limit=len(held) * _PER_CHECKPOINT))
        by_cp: dict[tuple[int, bytes], dict[bytes, bytes]] = {}
        for cs_size, r, w, e in rows:
            by_cp.setdefault((cs_size, r), {})[w] = e
        out = []
        for s, root, env in held:
            got = by_cp.get((s, root), {})
            chosen = set(cs.select_cosignatures(list(got.values()), self.require))
            sigs = [(w, e) for w, e in got.items() if e in chosen]
            out.append({"size": s, "root": root, "checkpoint": env, "cosignatures": sigs,
                        "trusted": self.trusted_by({w for w, e in sigs
                                                    if self._counts_for(w, e)})})
        return out

    def _counts_for(self, witness: bytes, envelope: bytes) -> bool:
        """Whether a cosignature held (verified when stored) still counts: signed by a
        key accepted for its witness now (its key log may have moved on since)."""
        wk = cs.cosignature_fields(envelope)
        return wk is not None and wk[0] == witness and wk[1] in self.keys_of(witness)

    def trusted_by(self, witnesses: set[bytes]) -> bool | None:
        """Whether cosignatures held by ``witnesses`` (verified when stored) meet the
        quorum; None when ``[witness] require`` names nobody."""
        if not self.require:
            return None
        return len(witnesses & set(self.require)) >= self.k

    async def trust(self, origin: bytes, feed: str) -> tuple[int, int, bool] | None:
        """``(size, required witnesses that cosigned it, trusted)`` of the newest
        checkpoint held of a feed; None if none is held or no witness is required."""
        if not self.require:
            return None
        held = await self.checkpoints.held(origin, feed)
        if not held:
            return None
        size, root, _env = held[-1]
        rows = await in_thread(functools.partial(
            self.storage.cosignatures, origin, feed, size, per_checkpoint=_PER_CHECKPOINT))
        got = {w for _s, r, w, e in rows
               if r == root and w in self.require and self._counts_for(w, e)}
        return size, len(got), len(got) >= self.k

    async def refresh(self, origin: bytes, feed: str) -> None:
        """Look at a feed's trust again (status, the untrusted metric)."""
        t = await self.trust(origin, feed)
        if t is None:
            return
        key = (origin, feed)
        before = self.tracked.get(key)
        if before is not None or len(self.tracked) < MAX_TRACKED:
            self._untrusted += (not t[2]) - (before is not None and not before[2])
            self.tracked[key] = t
        self.m_untrusted.set(self._untrusted)

    def status(self) -> dict[str, Any]:
        """What ``/v1/admin/status`` shows under ``witness``."""
        untrusted = [{"origin": self.policy.name(o), "feed": f, "size": s, "cosigned": n}
                     for (o, f), (s, n, ok) in sorted(self.tracked.items()) if not ok]
        return {
            "cosign": self.config.witness.cosign,
            "require": [self.policy.name(w) for w in self.require],
            # Its cosignatures cannot be checked until its key log is held (fetched
            # with the first one relayed here).
            "require_key_log_missing": self.require_log_missing(),
            "quorum": self.k,
            "refused": dict(sorted(self.counts.items())),
            "untrusted": untrusted[:100],
            "untrusted_count": len(untrusted),
        }

