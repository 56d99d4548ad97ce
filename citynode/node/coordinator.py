"""The node: builds the roles, wires them together, and owns every background task.

    Node ── replica      ALL replication state and decisions (core/replica.py, pure):
        │                heads, pending, quotas, push queues, eager/lazy links, sync
        │                sessions, outbox, own-feed safety; returns actions
        ├── gossip       the replica's shell: carries out its actions (one timer task,
        │                a task per partner request), feeds it outcomes and partners'
        │                messages, serves fetches
        ├── policy       cards, trust, access levels (the replica's injected predicates)
        ├── partners     links to partners, their health, delivery of checkpoints/proofs
        ├── ingest       verify records (threads) + hand them to the replica; commits
        ├── publisher    sign own records (the replica says if and at which seq)
        ├── checkpoints  Merkle checkpoints, verify fork and split-view proofs
        ├── witness      cosign partners' checkpoints, exchange cosignatures, quorum
        ├── streams      live tail for SSE streams
        ├── reads        what readers are served from storage
        ├── bridges      MQTT in (citynode/bridges/): publish through the publisher
        ├── sinks        CloudEvents / NGSI-LD out (citynode/sinks/): woken on commits
        ├── alerts       signed webhook alerts on forks, partners down, late feeds,
                         a full disk, invalid input (one task)
        └── leader       of several processes sharing one PostgreSQL database, the one
                         that runs the singleton work (signing, the replica's timer,
                         checkpoints, retention, bridges, sinks, alerts); SQLite: always
                         this one

Each role is reached through its public methods; the HTTP layer calls roles, never
storage. Storage is the only database code; the node is the only place tasks start.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any

from citynode.bridges.service import Bridges
from citynode.config import Config, load_config
from citynode.core import cards, erasure, keylog
from citynode.core.chain import FeedHead
from citynode.core.encoding import Limits
from citynode.core.keys import Verifier
from citynode.core.records import Record, RecordPolicy
from citynode.core.replica import Replica
from citynode.errors import (
    CitynodeError,
    ConfigError,
    InvalidRecord,
    NoLeader,
    StorageError,
)
from citynode.identity import Identity, load_identity
from citynode.logs import fields
from citynode.metrics import Metrics
from citynode.node._base import in_thread
from citynode.node.alerts import Alerts
from citynode.node.checkpoints import Checkpoints
from citynode.node.gossip import CATCHING_UP, Gossip, Progress, replica_config
from citynode.node.ingest import Ingest
from citynode.node.keychange import KeyChanges
from citynode.node.leader import Leader, own_address
from citynode.node.partners import PartnerLink, Partners
from citynode.node.policy import Policy
from citynode.node.publishing import Publisher
from citynode.node.reads import Reads
from citynode.node.retention import Retention
from citynode.node.streams import Streams, Subscriber
from citynode.node.witness import Witness
from citynode.reload import ConfigDiff, diff_config, live_config, shown
from citynode.sinks.service import Sinks
from citynode.storage import PartnerRow, Storage, open_storage

__all__ = ["DB_NAME", "Node"]

log = logging.getLogger("citynode.node")

DB_NAME = "citynode.db"


class Node:
    """A running citynode. Create with :meth:`load`, then ``await start()``."""

    def __init__(self, data_dir: Path, config: Config, identity: Identity, storage: Storage,
                 *, clock: Callable[[], float] = time.time) -> None:
        self.data_dir = data_dir
        self.config = config
        self.identity = identity
        self.key = identity.key
        self.public_key = identity.identity  # what partners pin: D of a cn2 node
        self.node_id = identity.node_id
        self.storage = storage
        self.clock = clock
        self.metrics = Metrics()
        self.verifier = Verifier()
        self.ready = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reload_lock = asyncio.Lock()  # one reload at a time (SIGHUPs may pile up)
        self.listeners: set[Callable[[Sequence[Record]], None]] = set()
        lim = config.limits
        record_policy = RecordPolicy(
            body_limits=Limits(max_bytes=lim.max_body_bytes),
            future_tolerance_ms=int(lim.future_tolerance_seconds * 1000),
        )
        self.replica = Replica(replica_config(config, self.public_key, lambda: self.policy,
                                              self._partner_name))
        # Processes sharing a database: own records are the leader's (_lead_gained).
        self.replica.signing = not storage.shared
        self.partners = Partners(config=config, key=self.key, storage=storage,
                                 metrics=self.metrics, clock=clock, now_ms=self.now_ms,
                                 spawn=self.spawn)
        self.policy = Policy(config=config, identity=identity, storage=storage,
                             replica=self.replica, verifier=self.verifier,
                             now_ms=self.now_ms,
                             partners=self.partners.keys)
        self.ingest_role = Ingest(replica=self.replica, policy=self.policy,
                                  partners=self.partners, storage=storage,
                                  metrics=self.metrics, verifier=self.verifier,
                                  record_policy=record_policy, now_ms=self.now_ms,
                                  spawn=self.spawn)
        self.publisher = Publisher(config=config, key=self.key, replica=self.replica,
                                   ingest=self.ingest_role, policy=self.policy,
                                   partners=self.partners, metrics=self.metrics,
                                   verifier=self.verifier, record_policy=record_policy)
        self.checkpoints = Checkpoints(config=config, key=self.key, replica=self.replica,
                                       policy=self.policy, partners=self.partners,
                                       storage=storage, metrics=self.metrics,
                                       verifier=self.verifier, now_ms=self.now_ms)
        self.gossip = Gossip(config=config, replica=self.replica, policy=self.policy,
                             partners=self.partners, ingest=self.ingest_role,
                             publisher=self.publisher, checkpoints=self.checkpoints,
                             storage=storage, metrics=self.metrics, now_ms=self.now_ms,
                             spawn=self.spawn)
        self.witness = Witness(config=config, key=self.key, policy=self.policy,
                               partners=self.partners, checkpoints=self.checkpoints,
                               storage=storage, metrics=self.metrics,
                               verifier=self.verifier, now_ms=self.now_ms, spawn=self.spawn)
        self.streams = Streams(storage=storage, metrics=self.metrics, spawn=self.spawn)
        self.reads = Reads(config=config, storage=storage, policy=self.policy)
        self.bridges = Bridges(config=config, data_dir=data_dir, origin=self.public_key,
                               publish=self.publish, storage=storage, metrics=self.metrics,
                               own_seq=lambda feed: self.seq((self.public_key, feed)),
                               now_ms=self.now_ms)
        self.sinks = Sinks(config=config, data_dir=data_dir, storage=storage,
                           metrics=self.metrics, now_ms=self.now_ms)
        self.listeners.add(self.sinks.committed)
        self.retention = Retention(config=config, public_key=self.public_key,
                                   policy=self.policy, replica=self.replica, storage=storage,
                                   now_ms=self.now_ms)
        self.alerts = Alerts(config=config, key=self.key, data_dir=data_dir,
                             partners=self.partners, checkpoints=self.checkpoints,
                             replica=self.replica, storage=storage, metrics=self.metrics,
                             now_ms=self.now_ms, names=self.policy.keys)
        self.leader = Leader(
            storage=storage, gained=self._lead_gained, lost=self._lead_lost,
            address=((own_address(config), identity.cert_fingerprint) if storage.shared
                     else None))
        self._singletons: set[asyncio.Task[Any]] = set()
        self._background = False  # start(partners=True): a serving node, not a CLI one
        self._refreshing = False
        #: The highest seq of each own feed this process saw committed: a database that
        #: holds less lost records it acknowledged (see _own_heads_as_stored).
        self._own_stored: dict[str, int] = {}
        self.keychanges = KeyChanges(data_dir=data_dir, identity=identity, policy=self.policy,
                                     publisher=self.publisher, partners=self.partners,
                                     storage=storage, now_ms=self.now_ms, spawn=self.spawn)
        self.keychanges.on_truncated = self._truncated
        self.keychanges.on_purged = self.checkpoints.drop_refused
        self.keychanges.on_tls_switched = self.leader.readdress
        self._wire()

    def _partner_name(self, key: bytes) -> str:
        link = self.partners.get(key)
        return link.row.name if link is not None else self.policy.name(key)

    def _wire(self) -> None:
        """Connect the roles' outputs to the roles that act on them."""
        g = self.gossip
        self.partners.on_change = self.policy.partners_changed
        self.partners.on_open = self._link_opened
        self.partners.on_close = g.link_closed
        self.partners.on_sync_now = g.sync_now
        self.partners.queued = self.replica.queued
        self.policy.on_card = g.card_learnt
        self.policy.on_card_kept = self.partners.follow_card
        self.policy.on_card_news = self._card_news
        self.policy.on_access_change = self.replica.access_changed
        self.ingest_role.execute = g.execute
        self.ingest_role.on_commit = g.committed
        self.ingest_role.before_rewind = self._lost_on_rewind
        self.ingest_role.on_new_feed = g.cards_stale
        self.ingest_role.on_history_wanted = g.history_wanted
        self.ingest_role.fetch_key_log = self._fetch_key_log
        self.witness.fetch_key_log = self._fetch_key_log
        self.policy.on_log_refused = self._log_refused
        self.policy.on_card_refused = self._card_refused
        self.policy.on_recovery = self._recovered
        self.checkpoints.execute = g.execute
        self.checkpoints.on_fork = self.publisher.note_fork
        self.checkpoints.on_settled = self._settled
        self.checkpoints.cadence_of = self.policy.cadence_of
        self.checkpoints.on_verified = self.witness.checkpoint_seen
        g.on_wake = self._committed

    def _link_opened(self, link: PartnerLink) -> None:
        self.gossip.link_opened(link)
        self.witness.link_opened(link.key)

    async def _fetch_key_log(self, link: PartnerLink, origin: bytes) -> bool:
        """Fetch ``origin``'s key log from ``link``'s partner and offer it: True if a
        log was taken (its records are then verified again)."""
        try:
            data = await link.client.key_log(keylog.identity_id(origin))
        except CitynodeError as exc:
            log.info("no key log from partner", extra=fields(
                partner=link.row.name, origin=keylog.identity_id(origin), error=str(exc)))
            return False
        d = self.policy.offer_log(origin, data, link.key)
        return d is not None and d.accept

    def _settled(self, identity: bytes) -> None:
        """A record on a chain a key event named showed that what is held inside the
        retired key's window is off it: cut back, in a task."""
        self.spawn(self.keychanges.purge(identity, unconfirmed=True), "purge-settled")

    def _recovered(self, identity: bytes) -> None:
        """A key log with a recovery was taken: drop what it cuts off, in a task."""
        self.spawn(self.keychanges.purge(identity), "purge-recovered")

    def _log_refused(self, source: bytes | None, exc: InvalidRecord) -> None:
        """A received key log refused: counted on the partner it came from, with the
        reason code the core gave."""
        link = self.partners.get(source) if source is not None else None
        self.ingest_role.count_invalid(link, exc.reason, f"key log: {exc}")

    def _card_refused(self, source: bytes | None, exc: InvalidRecord) -> None:
        """A card signed by a key not in force refused: counted on the partner that
        served it."""
        link = self.partners.get(source) if source is not None else None
        self.ingest_role.count_invalid(link, exc.reason, f"card: {exc}")

    def _card_news(self, origin: bytes) -> None:
        """A card that changes what may be relayed of ``origin``'s records held: its
        latest checkpoints may go where they could not (after the round the replica
        starts with every partner)."""
        self.spawn(self.checkpoints.offer_latest(origin), "offer-checkpoints")

    def _committed(self, recs: Sequence[Record]) -> None:
        self.streams.wake()
        for r in recs:
            if r.origin == self.public_key and r.seq > self._own_stored.get(r.feed, 0):
                self._own_stored[r.feed] = r.seq
            if erasure.is_erasure(r) and self.streams.subscribers:
                # Live streams may have sent what this request just erased: tell them.
                named = [e.id for e in erasure.erasures_in([r])]
                self.spawn(self.streams.erased(r.id, named), "stream-erased")
        for fn in list(self.listeners):
            try:
                fn(recs)
            except Exception:  # a subscriber's bug must not break ingest
                log.exception("listener failed")

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def load(cls, data_dir: Path, *, passphrase: str | None = None,
             clock: Callable[[], float] = time.time) -> Node:
        """Open a data dir made by ``citynode init``. ``clock``: seconds since the epoch
        (tests give a skewed one). Raises ConfigError, KeyFileError, StorageError with a
        message naming what to fix."""
        data_dir = Path(data_dir)
        config = load_config(data_dir / "node.toml")
        identity = load_identity(data_dir, passphrase)
        storage = open_storage(data_dir, config.storage.url,
                               rejected_log_rows=config.limits.rejected_log_rows)
        return cls(data_dir, config, identity, storage, clock=clock)

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    # ------------------------------------------------------------------ leadership

    async def _lead_gained(self) -> None:
        """This process leads: its heads catch up with the database (a write of the
        previous leader's still under way lands first), then the singleton work starts."""
        await asyncio.wrap_future(self.storage.barrier())
        await self._own_heads_as_stored()
        await self._refresh_heads()
        self.replica.signing = True
        if not self._background:
            return
        spawn = self._spawn_singleton
        spawn(self.gossip.run(), "replica-timer")
        spawn(self.checkpoints.run(), "checkpoints")
        spawn(self.witness.run(), "witness")
        self.bridges.start(spawn)  # [[bridges.*]]: a task each
        await self.sinks.start(spawn)  # [[sinks.*]]: a task each
        spawn(self.retention.run(), "prune")
        if self.alerts.enabled:  # [alerts] webhook_urls
            spawn(self.alerts.run(), "alerts")
        # Signed (and kept) now, not first when served: an export of our own feeds
        # carries it, and tells the feeds' access levels from it.
        self.policy.card()

    async def _own_heads_as_stored(self) -> None:
        """Own feeds' heads back to what the database holds. A publish whose write failed
        takes its head back to the stored one (Ingest's rewind), but reads it from the
        database: with the database away (a failover) that read fails too and the head
        stays ahead of what is stored, so every later record would be refused as not
        extending the chain. Leadership is lost with the database and taken again when
        it is back: from here on the leader signs after what is stored. (Nothing of ours
        is on its way now: the barrier above let every earlier write land or fail.)"""
        stored = await in_thread(self.storage.heads)
        why = self._lost_own(stored)
        if why is not None:
            await asyncio.wrap_future(self.storage.mark_restored(why))
        for key, head in list(self.replica.heads.items()):
            if key[0] == self.public_key and (key not in stored or stored[key][0] < head.seq):
                log.warning("own feed's head taken back to the database's (a write of it "
                            "failed)", extra=fields(feed=key[1], held=head.seq,
                                                    stored=stored.get(key, (0,))[0]))
                self.replica.cut(key, stored.get(key))

    def _lost_own(self, stored: Mapping[tuple[bytes, str], tuple[int, bytes]]
                  ) -> str | None:
        """If the database (heads ``stored``) holds less of an own feed than this process
        saw committed and acknowledged, own signing stops at once (the replica is
        marked restored) and the reason is returned, for the caller to keep in the
        database (again: keeping it may have failed before); else None.

        Records committed and acknowledged here are gone: a failover to a standby that
        had not received them (asynchronous replication), or a restore. Partners may
        hold them: signing those seqs again would fork our feeds. As after a restore,
        own feeds wait for every partner to confirm (and hand back what they hold)."""
        lost = {feed: (seq, stored.get((self.public_key, feed), (0,))[0])
                for feed, seq in self._own_stored.items()
                if stored.get((self.public_key, feed), (0,))[0] < seq}
        if not lost:
            return None
        why = ("the database lost records this node had stored (a failover to a "
               "standby that was behind, or a restore): " + ", ".join(
                   f"{f} held up to seq {s}, now {d}" for f, (s, d) in sorted(lost.items())))
        if not self.replica.restored:
            self.replica.mark_restored()
            log.error("database behind what this node stored: own feeds wait for the "
                      "partners' confirmation before signing", extra=fields(why=why))
        return why

    async def _catching_up(self, held: bytes | None, why: str) -> None:
        """Take back records of own feeds from partners until caught up, also across a
        restart (a durable mark, :data:`CATCHING_UP`, emptied at CaughtUp)."""
        self.replica.mark_catching_up()
        if not held:
            await asyncio.wrap_future(self.storage.set_meta(CATCHING_UP, why.encode(),
                                                            durable=True))

    def _lost_on_rewind(self, stored: Mapping[tuple[bytes, str], tuple[int, bytes]]
                        ) -> None:
        """A write failed and heads go back to the database's: the database may be
        another now (a failover found by this write before leadership moved)."""
        why = self._lost_own(stored)
        if why is not None:
            self.spawn(self._keep_restored(why), "mark-restored")

    async def _keep_restored(self, why: str) -> None:
        try:
            await asyncio.wrap_future(self.storage.mark_restored(why))
        except CitynodeError as exc:  # signing stays stopped here; said again at takeover
            log.warning("cannot mark the database restored yet: %s", exc)

    def _truncated(self, origin: bytes, feed: str, seq: int) -> None:
        """A recovery cut a feed back to ``seq``: for an own feed, what was committed
        above it is not 'lost' by the database."""
        if origin == self.public_key and self._own_stored.get(feed, 0) > seq:
            self._own_stored[feed] = seq
        self.checkpoints.rewind(origin, feed, seq)

    def _lead_lost(self) -> None:
        self.replica.signing = False
        for t in list(self._singletons):
            t.cancel()

    def _spawn_singleton(self, coro: Coroutine[Any, Any, Any], name: str
                         ) -> asyncio.Task[Any]:
        t = self.spawn(coro, name)
        self._singletons.add(t)
        t.add_done_callback(self._singletons.discard)
        return t

    def _heard(self) -> None:
        """Another process committed records (LISTEN/NOTIFY): live streams read them;
        the chain heads follow (one refresh at a time); sinks (on the leader) send them."""
        self.streams.wake()
        self.sinks.committed(())
        if not self._refreshing:
            self._refreshing = True
            self.spawn(self._refresh_heads(), "refresh-heads")

    async def _refresh_heads(self) -> None:
        """Move the replica's heads forward to what the database holds (never back:
        what this process has on its way is ahead of the database for a moment), and
        its pending buffer with them (Replica.advance_heads)."""
        try:
            heads = await in_thread(self.storage.heads)
            newer = {k: v for k, v in heads.items()
                     if (h := self.replica.head(k)) is None or h.seq < v[0]}
            if newer:
                # Pending records the other process's commit made fit (or stale) go.
                actions = self.replica.advance_heads(newer, self.now_ms())
                self.metrics.feeds.set(len(self.replica.heads))
                if actions:
                    await self.gossip.execute(actions)
        finally:
            self._refreshing = False

    def _check_leading(self) -> None:
        if not self.leader.leading:
            raise NoLeader(
                "this process does not lead the processes sharing the database, so it "
                "signs nothing: publish through the leader (its /v1/admin/status says "
                '"leader": true; the HTTP API hands a publish on to it), or retry in a few '
                "seconds if it just went down")

    async def start(self, *, partners: bool = True, accept_fork_risk: bool = False,
                    rolled_back: bool = False) -> None:
        """Load state and (unless ``partners=False``, for one-shot CLI commands) start the
        partner tasks. The HTTP server is the caller's.

        A database marked restored (Storage.restored) makes the replica refuse to sign
        on own feeds until a partner confirms the heads; ``accept_fork_risk`` clears the
        mark instead (the operator's explicit choice); ``rolled_back`` sets it first (the
        operator says the data dir was rolled back outside ``citynode restore``)."""
        loop = asyncio.get_running_loop()
        if rolled_back:
            await asyncio.wrap_future(self.storage.mark_restored(
                "the operator started it with `citynode run --restored` (its data dir "
                "was rolled back or copied back)"))
        restored = await loop.run_in_executor(None, self.storage.restored)
        catching = await loop.run_in_executor(None, self.storage.get_meta, CATCHING_UP)
        if restored is not None and accept_fork_risk:
            await asyncio.wrap_future(self.storage.clear_restored())
            # Still behind, maybe: what partners hold of its own feeds is taken back
            # (not refused as forgeries) until it caught up.
            await self._catching_up(catching, "restored, started with --accept-fork-risk")
            log.warning("database restored, and --accept-fork-risk given: signing on own "
                        "feeds without a partner's confirmation", extra=fields(why=restored))
        elif restored is not None:
            self.replica.mark_restored()
            log.warning("database restored: own feeds wait for every partner to confirm "
                        "their heads before anything is signed", extra=fields(why=restored))
        heads = await loop.run_in_executor(None, self.storage.heads)
        forks = await loop.run_in_executor(None, self.storage.fork_proofs)
        self.replica.load(heads, [(f.origin, f.feed, f.seq) for f in forks])
        if not any(o == self.public_key for o, _f in heads) or catching:
            # No record of its own feeds here (a new database, or one lost and made
            # again), or a start before it caught up: what partners hold of them may be
            # its own, taken back until it caught up. Any other node holds every record
            # it signed, so one of its own feeds beyond its head is refused as a forgery
            # (core/replica.py).
            await self._catching_up(catching, "no record of its own feeds held at start")
        for f in forks:
            self.publisher.note_fork(f.origin, f.feed, f.seq)
        # Key logs first: a partner's requests verify with its log's key in force.
        await self.policy.load_key_logs()
        if partners:
            await self.partners.start()
            # A data dir restored from a backup older than a rotation: take the newer
            # own log from partners (or stop signing, saying what to do).
            self.spawn(self.keychanges.catch_up(), "own-key-log")
        await self.policy.load_cards()
        await self.checkpoints.load_liveness()
        await self.streams.start()
        self._background = partners
        if self.storage.shared:
            # Records other processes commit: streams here see them, heads follow.
            loop = asyncio.get_running_loop()

            def heard(_rowid: int) -> None:  # in the storage's listening thread
                loop.call_soon_threadsafe(self._heard)

            self.storage.listen(heard)
        await self.leader.try_once()
        if partners and self.storage.shared:
            self.spawn(self.leader.run(), "leader")
        self.ready = True
        self.metrics.feeds.set(len(self.replica.heads))
        log.info(
            "node started",
            # Chains held (any origin) and own feeds configured: two different counts.
            extra=fields(node=self.node_id, chains_held=len(self.replica.heads),
                         feeds_configured=len(self.config.feeds),
                         partners=len(self.partners.links)),
        )

    async def stop(self) -> None:
        """Stop background tasks and close storage; everything acknowledged is committed."""
        self.ready = False
        self.streams.close()
        self.gossip.stop()  # no new requests to partners from here on
        commits = [t for t in self._tasks if t.get_name() == "commit"]
        if commits:  # let writes already under way finish and be acknowledged
            await asyncio.wait(commits, timeout=30)
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # Only now: no task of ours is using a partner's connection any more.
        await self.partners.close_all()
        await self.leader.close()
        await asyncio.get_running_loop().run_in_executor(None, self.storage.close)
        log.info("node stopped", extra=fields(node=self.node_id))

    async def reload(self) -> ConfigDiff | None:
        """Re-read node.toml (SIGHUP) and apply what can change live (citynode/reload.py
        says what): one ``config changed`` line per setting applied, one ``needs a
        restart`` warning per setting not applied. Our card is re-signed if its feeds
        changed (partners learn it at their next card refresh). Then the partner links
        are made to match the stored partners. An invalid node.toml is one error line
        and changes nothing. Returns the differences, or None if the file was invalid;
        never raises a CitynodeError."""
        async with self._reload_lock:
            try:
                new = await in_thread(load_config, self.data_dir / "node.toml")
            except ConfigError as exc:
                log.error("reload refused: node.toml is invalid, the running config is "
                          "kept", extra=fields(error=str(exc)))
                return None
            diff = diff_config(self.config, new)
            for c in diff.changes:
                facts = fields(key=c.key, old=shown(c.old), new=shown(c.new))
                if c.live:
                    log.info(f"config changed: {c.key}", extra=facts)
                else:
                    log.warning(f"config change needs a restart, not applied: {c.key}",
                                extra=facts)
            cfg = live_config(self.config, new)
            self.config = cfg
            for role in (self.partners, self.publisher, self.checkpoints, self.gossip,
                         self.reads, self.retention, self.bridges):
                role.config = cfg
            self.policy.reconfigure(cfg)
            if self.ready and diff.live:
                self.policy.card()  # re-signed now, if its feeds changed
            opened, closed = await self.partners.reload()
            for row in closed:
                log.info("partner link closed on reload", extra=fields(
                    partner=row.node_id, name=row.name, url=row.url))
            for row in opened:
                if row.card:
                    self.policy.learn_card(row.card, row.public_key)
                log.info("partner link opened on reload", extra=fields(
                    partner=row.node_id, name=row.name, url=row.url))
            log.info("reloaded", extra=fields(applied=len(diff.live),
                                               need_restart=len(diff.restart),
                                               partners_opened=len(opened),
                                               partners_closed=len(closed)))
            return diff

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Start a background task owned by the node (kept until it ends)."""
        t = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(t)
        t.add_done_callback(self._task_done)
        return t

    def _task_done(self, t: asyncio.Task[Any]) -> None:
        self._tasks.discard(t)
        if not t.cancelled() and t.exception() is not None:
            # A background task must never die silently: say so loudly.
            log.error("background task failed", exc_info=t.exception(),
                      extra=fields(task=t.get_name()))

    # ------------------------------------------------------------------ operator API

    async def publish(self, feed: str, type_name: str, items: Sequence[dict[str, Any]], *,
                      subjects: Sequence[str | None] | None = None) -> list[Record]:
        """See :meth:`Publisher.publish`; refused (NoLeader, 503) on a process that
        does not lead (several processes sharing one database)."""
        self._check_leading()
        return await self.publisher.publish(feed, type_name, items, subjects=subjects)

    async def erase(self, ids: Sequence[bytes], reason: str) -> Record:
        """See :meth:`Publisher.erase` (and :meth:`publish`)."""
        self._check_leading()
        return await self.publisher.erase(ids, reason)

    async def prune(self, now_ms: int | None = None) -> int:
        """See :meth:`Retention.prune` (the prune task runs it hourly)."""
        return await self.retention.prune(now_ms)

    def feed_access(self, feed: str) -> str:
        return self.policy.feed_access(feed)

    def card(self) -> cards.NodeCard:
        return self.policy.card()

    async def add_partner(self, url: str, partner_id: str) -> PartnerRow:
        """See :meth:`Partners.add`."""
        return await self.partners.add(url, partner_id, self.policy.check_partner_card)

    async def remove_partner(self, partner_id: str) -> bool:
        return await self.partners.remove(partner_id)

    async def catch_up(self, progress: Progress | None = None) -> int:
        """See :meth:`CatchUp.catch_up`."""
        from citynode.node.catchup import CatchUp

        return await CatchUp(self.gossip).catch_up(progress)

    async def ingest(self, envelopes: Sequence[bytes], *, source: PartnerLink | None = None,
                     via: str = "push") -> Any:
        """See :meth:`Ingest.ingest`."""
        return await self.ingest_role.ingest(envelopes, source=source, via=via)

    # ------------------------------------------------------------------ status

    @property
    def heads(self) -> dict[tuple[bytes, str], FeedHead]:
        """The chain heads held (read-only use)."""
        return self.replica.heads

    def seq(self, key: tuple[bytes, str]) -> int:
        """The seq held of a chain (0: none)."""
        h = self.replica.head(key)
        return h.seq if h is not None else 0

    @property
    def links(self) -> dict[bytes, PartnerLink]:
        """The partner links (read-only use)."""
        return self.partners.links

    @property
    def subscribers(self) -> set[Subscriber]:
        """The live streams (read-only use)."""
        return self.streams.subscribers

    def status(self) -> dict[str, Any]:
        """What ``/v1/admin/status`` shows."""
        return {
            "node_id": self.node_id,
            "name": self.config.node.name,
            "leader": self.leader.leading,
            "feeds": len(self.replica.heads),
            "pending": len(self.replica.pending),
            "own_blocked": dict(self.publisher.blocked),
            "own_forked": dict(self.publisher.forked),
            "restored_unconfirmed": self.replica.restored,
            "own_forgeries": self._own_forgeries(),
            "restored_awaiting": [self._partner_name(k)
                                  for k in self.replica.awaiting_confirmation()],
            "partners": self.partners.status(),
            "witness": self.witness.status(),
        }

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        try:
            ok_db = await asyncio.get_running_loop().run_in_executor(
                None, self.storage.writable)
        except StorageError:
            ok_db = False
        # Damage SQLite reported while serving: the node answers, but not from a
        # database it can trust (restore from a backup).
        intact = self.storage.corrupt is None
        ok = self.ready and ok_db and intact
        out: dict[str, Any] = {"database_writable": ok_db, "database_intact": intact,
                               "disk_full": self.storage.disk_full,
                               "key_loaded": True, "started": self.ready}
        if not intact:
            out["database_error"] = self.storage.corrupt
        # A restored node serves and relays, but signs nothing on its own feeds yet:
        # say so (and whom it waits for), without calling the node unready.
        # Nor on an own feed it holds a fork proof against (for good): when that is
        # every own feed it has (declared or published on), it publishes nothing.
        me = self.public_key
        own = set(self.config.feeds) | {f for (o, f) in list(self.replica.heads) if o == me}
        forked = sorted(self.publisher.forked)
        out["own_publishing"] = not self.replica.restored and not (own and own <= set(forked))
        out["own_forked"] = forked
        if self.replica.restored:
            out["restored_awaiting"] = [self._partner_name(k)
                                        for k in self.replica.awaiting_confirmation()]
        if self.replica.own_forgeries:
            out["own_forgeries"] = self._own_forgeries()
        return ok, out

    def _own_forgeries(self) -> dict[str, Any]:
        """Own feeds of which a record signed with this node's key, never by this node,
        was seen: the highest seq, who sent it, and what to do (empty: none)."""
        return {feed: {"seq": seq, "record": rid.hex(),
                       "from": self._partner_name(peer) if peer is not None else "local",
                       "do": "the node key may be stolen: run `citynode key recover` "
                             "naming this node's own heads as --last-good"}
                for feed, (seq, peer, rid) in sorted(self.replica.own_forgeries.items())}
