"""Who is trusted and who may see what: node cards (ours and others'), the trust policy,
and every feed's access level on the push, sync and read paths.

The rules themselves are the core's (``core.access``, ``core.sync.accept_origin``); this
role holds what they are applied to -- the cards learned, the partners, node.toml's
feeds -- and caches what it derives from them until either changes.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Callable

from citynode import __version__
from citynode.config import Config
from citynode.core import access, cards, keylog, sync
from citynode.core.chain import ForkProof
from citynode.core.keybook import HeldLog, KeyBook
from citynode.core.keys import NodeKey, Verifier, parse_node_id
from citynode.core.records import Record, sealed_of
from citynode.core.replica import Replica
from citynode.errors import CitynodeError, InvalidProof, InvalidRecord
from citynode.identity import Identity
from citynode.logs import fields
from citynode.node._base import in_thread
from citynode.storage import Storage

__all__ = ["Policy", "readers_of", "sealed_to"]

log = logging.getLogger("citynode.node")

# Bounds on the signed cards of other nodes kept (and served on /v1/cards).
MAX_CARDS = cards.MAX_CARDS_KEPT
MAX_CARD_BYTES = cards.MAX_CARDS_KEPT_BYTES
#: Card histories held parsed in memory (the rest are read from storage when asked).
HISTORY_CACHE = 256


class Policy:
    """Cards, trust and access. ``partners()`` gives the current partner keys;
    ``on_card_news(origin)`` is called when a card that changes what may be relayed of
    records held arrives (the gossip role then asks every partner for a round)."""

    def __init__(self, *, config: Config, identity: Identity, storage: Storage,
                 replica: Replica, verifier: Verifier, now_ms: Callable[[], int],
                 partners: Callable[[], frozenset[bytes]]) -> None:
        self.config = config
        self.identity = identity
        self.key: NodeKey = identity.key
        self.public_key = identity.identity  # what partners pin (D of a cn2 node)
        #: The key logs held, one per cn2 identity (ours included).
        self.keys = KeyBook()
        if self.key.log is not None:
            self.keys.restore(self.public_key, self.key.log, verifier=verifier)
            # Kept with the others: `citynode check` verifies our records offline by it.
            storage.set_meta("keylog:" + self.public_key.hex(), self.key.log)
        #: A key log with a recovery was taken: ``(identity)`` (records the recovery cut
        #: off are then dropped).
        self.on_recovery: Callable[[bytes], None] = lambda identity: None
        #: A received key log was refused: ``(source partner or None, error)``.
        self.on_log_refused: Callable[[bytes | None, InvalidRecord], None] = \
            lambda source, exc: None
        #: A card signed by a key not in force was refused: ``(source partner or None,
        #: error)`` (reason ``key_not_in_force``).
        self.on_card_refused: Callable[[bytes | None, InvalidRecord], None] = \
            lambda source, exc: None
        self.storage = storage
        self.replica = replica
        self.verifier = verifier
        self.now_ms = now_ms
        self.partners = partners
        self.on_card_news: Callable[[bytes], None] = lambda origin: None
        #: Every card learnt (newer than the one held): ``(node, its partners)``.
        self.on_card: Callable[[bytes, frozenset[bytes]], None] = lambda node, ps: None
        #: Every card learnt (newer than the one held), whole: partners follow its TLS
        #: pins.
        self.on_card_kept: Callable[[cards.NodeCard], None] = lambda card: None
        #: Cards or partners changed what may be sent where.
        self.on_access_change: Callable[[], None] = lambda: None
        self.cards_seen: dict[bytes, bytes] = {}  # public key -> card envelope
        self.card_info: dict[bytes, cards.NodeCard] = {}  # public key -> parsed card
        self.vouch = sync.VouchGraph()
        self._card_envs: set[bytes] = set()  # the envelopes in cards_seen
        #: SHA-256 of the envelopes refused as signed by a key not in force (bounded): a
        #: retired key stays retired, so they are not verified (nor counted) again.
        self._cards_refused: set[bytes] = set()
        self._cards_bytes = 0
        self._card: cards.NodeCard | None = None
        self._card_stale = False  # partners changed: compare our card's content again
        self._history: dict[bytes, tuple[cards.NodeCard, ...]] = {}  # origin -> cards
        self._history_stale: set[bytes] = set()  # written since cached: read again
        #: Counts the cards kept (ours and others'): streams compare it to tell that
        #: terms may have changed.
        self.cards_version = 0
        # Derived from cards and partners, rebuilt when asked after either changes.
        self._trusted: Callable[[bytes], bool] | None = None
        self._policies: dict[tuple[bytes, str], access.FeedPolicy] = {}
        self._known: frozenset[bytes] | None = None

    # ------------------------------------------------------------------ our card

    def card(self) -> cards.NodeCard:
        """Our signed node card. It is signed again only when its content (everything
        but the signing time: name, url, TLS pin, feeds, partners, software) changes; at
        start the newest card we signed before is reused if its content is what would be
        signed now. (Re-signing at every start or partner round-trip would fill the card
        history, which decides the terms in force for our records, with copies.)"""
        names = sorted(self._feeds_of(self.public_key) | set(self.config.feeds))
        # Each feed with its access, terms, egress policy digest and cadence: a change
        # of any of them (node.toml is read at start) is a new signed card.
        feeds = tuple(self.config.feed(f).card_feed() for f in names)
        if self._card is not None and not self._card_stale and self._card.feeds == feeds:
            return self._card
        tls = self.identity.cert_fingerprint if self.config.tls.enabled else None
        tls_next = self.identity.next_cert_fingerprint if tls is not None else None
        want = (self.config.node.name, self.config.node.public_url, tls, feeds,
                tuple(sorted(self.partners())), f"citynode/{__version__}", self.key.log,
                tls_next)
        held = self._card if self._card is not None else self._stored_own_card()
        if held is not None and _content(held) == want:
            self._card = held
        else:
            self._card = cards.make_card(
                self.key, name=want[0], url=want[1], tls_fingerprint=tls, feeds=feeds,
                partners=want[4], software=want[5], now_ms=self.now_ms(),
                tls_next=tls_next)
            self.storage.set_meta("card:" + self.public_key.hex(), self._card.envelope)
            self._add_history(self._card)
        self._card_stale = False
        return self._card

    def _stored_own_card(self) -> cards.NodeCard | None:
        """The newest card we signed and kept (verified again), or None."""
        env = self.storage.get_meta("card:" + self.public_key.hex())
        return None if env is None else self._open(env, self.public_key, None)

    def feed_access(self, feed: str) -> str:
        """The access level of this node's own ``feed`` as configured (at start or the
        last reload; a feed not in node.toml is public)."""
        fc = self.config.feeds.get(feed)
        return fc.access if fc is not None else "public"

    def reconfigure(self, config: Config) -> None:
        """node.toml was reloaded: access levels, readers and the trust policy are derived
        again from ``config``; our card is re-signed when next asked if its feeds
        changed."""
        self.config = config
        self._forget_derived()

    def tls_changed(self, identity: Identity) -> None:
        """Our TLS certificates changed (``citynode tls renew``): ``identity`` names
        them; our card is signed again when next asked."""
        self.identity = identity
        self._card_stale = True

    def partners_changed(self) -> None:
        """A partner was added or removed: our card (if its partners changed) and what was
        derived is re-made."""
        self._card_stale = True
        self._forget_derived()

    # ------------------------------------------------------------------ others' cards

    def known_cards(self) -> list[bytes]:
        """Our card and every card held, as envelopes (served on /v1/cards)."""
        return [self.card().envelope, *self.cards_seen.values()]

    async def load_cards(self) -> None:
        """At start: learn the cards pinned with the partners, then every newer card
        learned since and kept. A relay restarted while an origin is down must judge that
        origin's feeds by the newest card it had (a feed added after the partner was
        pinned is otherwise unknown, so not relayed or listed)."""
        # Both read before any is learnt: keeping a card writes it back as the node's
        # newest ("card:" meta), so the pinned one, learnt first, could overwrite the
        # newer one kept before the stored cards were read (a race the restarted
        # relay of test_federation lost under load).
        rows = await in_thread(self.storage.partners)
        stored = await in_thread(self.storage.cards, MAX_CARDS)
        for row in rows:
            if row.card:
                self.learn_card(row.card, row.public_key, restore=True)
        for env in stored:
            self.learn_card(env, restore=True)  # verified again; an older one is ignored

    async def learn_cards(self, envelopes: list[bytes], source: bytes | None = None) -> int:
        """Learn the cards a partner (``source``) served: those not seen before are
        verified in a worker thread (a partner may serve thousands: their signature checks
        must not hold the event loop), a cn2 card's key log offered, the card judged by
        the log then held (:func:`cards.judge_card_key`), and kept when signed by the key
        in force and newer. A card signed by a key not in force is refused and counted on
        ``source`` (``key_not_in_force``). Returns how many were kept."""
        fresh = [e for e in dict.fromkeys(envelopes)
                 if e not in self._card_envs and _digest(e) not in self._cards_refused]
        if not fresh:
            return 0
        now = self.now_ms()
        opened = await in_thread(lambda: [self._open(e, None, now) for e in fresh])
        kept = 0
        for c, e in zip(opened, fresh, strict=True):
            if c is not None and self._judge(c, source, offer=True) == "current":
                kept += self._keep(c, e)
        return kept

    def learn_card(self, env: bytes, expected_key: bytes | None = None, *,
                   restore: bool = False) -> bool:
        """Verify and keep a node card newer than the one held, if it is signed by the
        key in force in the key log held of its node (after offering it the card's own
        log). ``restore``: a card this node kept before (its partners' rows, storage):
        also taken when a rotation since retired its key, if it is dated before that
        rotation (the node's card until a newer one comes). Returns whether it was kept;
        an invalid card is logged and ignored (never raises)."""
        if env in self._card_envs or _digest(env) in self._cards_refused:
            return False  # seen exactly this one: no need to verify it again
        c = self._open(env, expected_key, self.now_ms())
        if c is None:
            return False
        # Not counted: a card kept here before, or fetched by the operator's partner add.
        use = self._judge(c, None, offer=True, log_source=expected_key, count=False)
        return (use == "current" or (restore and use == "past")) and self._keep(c, env)

    def check_partner_card(self, env: bytes, expected_key: bytes) -> None:
        """``citynode partner add``: the card fetched from the partner's URL (verified,
        signed by ``expected_key``'s node) is learnt, its key log offered; raises
        :class:`InvalidRecord` (``key_not_in_force``) if it is signed by a key not in
        force in the key log then held of that node (a recovery retired it: the URL may
        be a thief's), so that its TLS certificate is never pinned."""
        c = cards.open_card(env, expected_node_id=None, expected_key=expected_key,
                            verifier=self.verifier, now_ms=self.now_ms())
        if c.keylog is not None:
            self.offer_log(c.node, c.keylog, expected_key)
        cards.judge_card_key(c, self.keys.held(c.node))
        self.learn_card(env, expected_key)

    def _judge(self, c: cards.NodeCard, source: bytes | None, *, offer: bool,
               log_source: bytes | None = None, count: bool = True
               ) -> cards.CardUse | None:
        """What a verified card may be used for (:func:`cards.judge_card_key`), by the
        key log held of its node after offering it the card's own log (``offer``; a
        refusal of that log counted on ``log_source``). None: refused -- logged,
        remembered (not verified again) and, with ``count``, counted on ``source``."""
        if offer and c.keylog is not None:
            self.offer_log(c.node, c.keylog, log_source)
        try:
            return cards.judge_card_key(c, self.keys.held(c.node))
        except InvalidRecord as exc:
            if len(self._cards_refused) >= MAX_CARDS:
                self._cards_refused.clear()  # bounded: at worst judged (counted) again
            self._cards_refused.add(_digest(c.envelope))
            log.info("refused a card signed by a key not in force", extra=fields(
                node=self.name(c.node), time=c.time, error=str(exc)))
            # Counted on the sender only for a card no honest history holds: one dated
            # after the key event that retired its key. One dated before may be the
            # origin's own card of then, which an honest partner that has not learnt
            # the key event yet still serves (review 12b).
            held = self.keys.held(c.node)
            retired_at = None if held is None else cards.signer_retired_at(c, held)
            if count and retired_at is not None and c.time > retired_at:
                self.on_card_refused(source, exc)
            return None

    # ------------------------------------------------------------------ key logs

    def offer_log(self, identity: bytes, log: bytes, source: bytes | None,
                  verifier: Verifier | None = None) -> keylog.LogDecision | None:
        """Verify a received key log of ``identity`` and hold it if
        :func:`keylog.compare_logs` says so (kept in storage). A log that does not verify,
        or that the decision refuses, is counted on ``source`` (the partner it came
        from) with its reason and changes nothing: records valid under the held log
        stay valid. Returns the decision, or None for a log that did not verify."""
        if identity == self.public_key and log == self.key.log:
            return None  # ours, as we hold it
        before = self.keys.held(identity)
        try:
            decision = self.keys.offer(identity, log, verifier=verifier or self.verifier,
                                       now_ms=self.now_ms())
        except (InvalidRecord, ValueError) as exc:
            err = exc if isinstance(exc, InvalidRecord) else InvalidRecord(str(exc))
            self.on_log_refused(source, err)
            return None
        if decision.error is not None:
            self.on_log_refused(source, decision.error)
        if decision.outcome in ("extends", "recovered", "dead", "key-fork"):
            held = self.keys.held(identity)
            if held is not None and any(e.type != "inception" and (
                    before is None or e.body not in {b.body for b in before.events})
                    for e in held.events):
                # A rotation or recovery new here: drop what it cuts off or refutes.
                self.on_recovery(identity)
            if held is not None:
                self.storage.set_meta("keylog:" + identity.hex(), held.wire)
                if held.proof is not None:
                    self.storage.set_meta("keyproof:" + identity.hex(), held.proof.encode())
            self._history.pop(identity, None)  # judged again by the new log when read
            self._drop_card_not_in_force(identity)
            self._forget_derived()
        return decision

    def _drop_card_not_in_force(self, identity: bytes) -> None:
        """The log held of ``identity`` changed: the card held of it, if the new log
        refuses it (a recovery retired its key: it may be a thief's, kept while that
        key was in force), is no longer held nor served."""
        c = self.card_info.get(identity)
        if c is None:
            return
        try:
            cards.judge_card_key(c, self.keys.held(identity))
        except InvalidRecord as exc:
            log.warning("dropped the card held of a node: a key event retired the key "
                        "that signed it", extra=fields(node=self.name(identity),
                                                       error=str(exc)))
            env = self.cards_seen.pop(identity)
            del self.card_info[identity]
            self._card_envs.discard(env)
            self._cards_bytes -= len(env)
            self._cards_refused.add(_digest(env))
            self.vouch.remove(identity)

    async def load_key_logs(self) -> None:
        """At start: hold the key logs kept (verified again)."""
        for name, data in await in_thread(self.storage.meta_prefixed, "keylog:"):
            try:
                ident = bytes.fromhex(name.removeprefix("keylog:"))
                if ident != self.public_key:
                    self.keys.restore(ident, data, verifier=self.verifier)
            except (ValueError, CitynodeError) as exc:
                log.info("ignored a kept key log that does not verify",
                         extra=fields(error=str(exc)))

    def own_log_changed(self) -> None:
        """Our key log changed (a rotation or a recovery): hold it, and sign a new card
        (which carries it) when next asked."""
        assert self.key.log is not None
        self.keys.restore(self.public_key, self.key.log, verifier=self.verifier)
        self.storage.set_meta("keylog:" + self.public_key.hex(), self.key.log)
        self._card_stale = True
        self._forget_derived()

    def _who(self, recipients: frozenset[bytes] | None) -> frozenset[bytes] | None:
        """A sealed record's recipients (keys) as the identities partners are pinned
        by (a cn2 reader's key belongs to its identity)."""
        if recipients is None or not len(self.keys):
            return recipients
        return frozenset(self.keys.owner(k) for k in recipients)

    def identity_of_key(self, key: bytes) -> bytes:
        """The identity a signing key belongs to among the logs held (a reader's sealed
        recipient key), else the key itself (a cn1 node)."""
        return self.keys.owner(key)

    def name(self, identity: bytes) -> str:
        """The printable id of ``identity`` (``cn2`` if its log is held)."""
        return self.keys.name(identity)

    def _open(self, env: bytes, expected_key: bytes | None, now: int | None
              ) -> cards.NodeCard | None:
        """The verified card, or None (logged) if it is invalid. Thread-safe."""
        try:
            return cards.open_card(
                env,
                expected_node_id=None,
                expected_key=expected_key or None,
                verifier=self.verifier,
                now_ms=now,
            )
        except CitynodeError as exc:
            log.info("ignored an invalid card", extra=fields(error=str(exc)))
            return None

    def _keep(self, c: cards.NodeCard, env: bytes) -> bool:
        """Keep a verified card if it is newer than the one held (and within bounds)."""
        if c.node == self.public_key:
            return False  # ours, gossiped back (or kept): we sign our own
        prev = self.card_info.get(c.node)
        if prev is not None and prev.time >= c.time:
            return False
        if c.node not in self.cards_seen and (
                len(self.cards_seen) >= MAX_CARDS
                or self._cards_bytes + len(env) > MAX_CARD_BYTES):
            return False  # bounded: a flood of self-made cards cannot fill memory
        old = self.cards_seen.get(c.node)
        if old is not None:
            self._card_envs.discard(old)
            self._cards_bytes -= len(old)
        self._card_envs.add(env)
        self._cards_bytes += len(env)
        self.cards_seen[c.node] = env
        self.card_info[c.node] = c
        self.vouch.add_card(c.node, set(c.partners))
        self._forget_derived()
        self.on_card(c.node, frozenset(c.partners))
        self.on_card_kept(c)
        if (prev is None or prev.feeds != c.feeds or prev.partners != c.partners) and (
                self._feeds_of(c.node)):
            # Records of that node we hold and may have held back (a feed its old card
            # did not list, a partner it did not have) may now go on.
            self.on_card_news(c.node)
        # Kept so `citynode export` can put the origin's card in an auditor's bundle.
        self.storage.set_meta("card:" + c.node.hex(), env)
        self._add_history(c)
        return True

    # ------------------------------------------------------------------ terms and cadence

    def _add_history(self, c: cards.NodeCard) -> None:
        """A verified card (ours or another node's) enters its node's card history."""
        done = self.storage.add_card_history(c.node, c.time, c.envelope)
        self._history.pop(c.node, None)
        # A read of the history may run before the write commits and cache it without
        # this card: once written, the cached copy is read again (a set's add is
        # atomic: the writer thread may call this).
        done.add_done_callback(functools.partial(_mark_stale, self._history_stale, c.node))
        self.cards_version += 1

    async def card_history(self, origin: bytes) -> tuple[cards.NodeCard, ...]:
        """The cards kept of ``origin`` (ours too), oldest first: what decides the terms
        in force for its records. Verified again when read from storage (a few per
        origin, cached for the most recent origins)."""
        if origin in self._history_stale:
            self._history_stale.discard(origin)
            self._history.pop(origin, None)
        hist = self._history.get(origin)
        if hist is not None:
            return hist
        envs = await in_thread(self.storage.card_history, origin)

        held = None if origin == self.public_key else self.keys.held(origin)

        def parse() -> tuple[cards.NodeCard, ...]:
            out = []
            for e in envs:
                c = self._open(e, origin, None)
                if c is not None and _usable(c, held):
                    out.append(c)
            return tuple(out)

        hist = await in_thread(parse)
        if len(self._history) >= HISTORY_CACHE:
            self._history.pop(next(iter(self._history)))
        self._history[origin] = hist
        return hist

    async def lacks_history(self, origin: bytes, time_ms: int) -> bool:
        """True if no card of ``origin`` held is dated at most ``time_ms``: the terms in
        force for its records of that time are unknown here (we learnt the origin after
        they were signed), and its card history is worth asking the partners for."""
        if origin == self.public_key:
            return False
        hist = await self.card_history(origin)
        return not hist or hist[0].time > time_ms

    async def learn_history(self, origin: bytes, envelopes: list[bytes]) -> int:
        """Keep the cards of ``origin``'s card history a partner served: each verified
        (in a worker thread) as signed by ``origin`` and not dated in the future, and
        judged by the key log held of ``origin`` (:func:`cards.judge_card_key`); the
        others are logged and ignored. (A history is old cards: an honest partner serves
        the cards its origin signed before a recovery, so a refusal here is not counted
        on it.) The newest also replaces the card held if it is newer and signed by the
        key in force. Returns how many were taken."""
        if origin == self.public_key:
            return 0  # we sign our own
        envs = list(dict.fromkeys(envelopes))
        now = self.now_ms()
        opened = await in_thread(lambda: [self._open(e, origin, now) for e in envs])
        n = 0
        for c, env in zip(opened, envs, strict=True):
            if c is None:
                continue
            use = self._judge(c, None, offer=False, count=False)
            if use is None:
                continue
            n += 1
            if use == "past" or not self._keep(c, env):
                self._add_history(c)  # an older card: for the terms of older records
        return n

    async def terms_in_force(self, origin: bytes, feed: str, time_ms: int
                             ) -> cards.CardFeed | None:
        """The entry of ``feed`` in ``origin``'s card in force at ``time_ms`` (the card
        with the greatest time at most ``time_ms``); None: unknown."""
        return cards.terms_in_force(await self.card_history(origin), feed, time_ms)

    async def terms_json(self, items: list[tuple[bytes, str, int]]
                         ) -> list[dict[str, object] | None]:
        """For each ``(origin, feed, time)``: the terms in force (``CardFeed.terms()``
        plus ``card_time``, the time of the card they come from), or None (unknown)."""
        out: list[dict[str, object] | None] = []
        for origin, feed, t in items:
            hist = await self.card_history(origin)
            best = max((c for c in hist if c.time <= t), key=lambda c: c.time, default=None)
            entry = cards.terms_in_force(hist, feed, t)
            out.append(None if entry is None or best is None
                       else {**entry.terms(), "card_time": best.time})
        return out

    def current_terms(self, origin: bytes, feed: str) -> cards.CardFeed | None:
        """The entry of ``feed`` in the newest card held of ``origin`` (ours: as signed
        now); None if no card held lists it."""
        c = self.card() if origin == self.public_key else self.card_info.get(origin)
        return next((f for f in c.feeds if f.name == feed), None) if c else None

    def cadence_of(self, origin: bytes, feed: str) -> int | None:
        """The cadence the newest card of ``origin`` states for ``feed`` (seconds)."""
        t = self.current_terms(origin, feed)
        return t.cadence_s if t is not None else None

    def _feeds_of(self, origin: bytes) -> set[str]:
        """The feeds of ``origin`` of which a record is held."""
        return {f for (o, f) in self.replica.heads if o == origin}

    def card_lists(self, origin: bytes, feed: str) -> bool | None:
        """Does the card held of ``origin`` list ``feed``? None: no card held."""
        c = self.card_info.get(origin)
        if c is None:
            return None
        return any(f.name == feed for f in c.feeds)

    # ------------------------------------------------------------------ trust

    def trust_check(self) -> Callable[[bytes], bool]:
        """The trust policy (config ``federation.accept``) as a function of an origin key,
        over a frozen snapshot of partners and vouches: safe to call from worker threads,
        rebuilt when partners or cards change."""
        if self._trusted is None:
            fed = self.config.federation
            direct = self.partners()
            vouched = frozenset(
                self.vouch.trusted(self.public_key, set(direct), fed.vouch_hops)
                if fed.accept == "vouched" else ()
            )
            me, policy = self.public_key, fed.accept

            def check(origin: bytes) -> bool:
                return sync.accept_origin(origin, policy=policy, self_key=me,
                                          partners=direct, vouched=vouched)

            self._trusted = check
        return self._trusted

    def accepts_origin(self, origin: bytes) -> bool:
        """Does the trust policy accept records of ``origin``?"""
        return self.trust_check()(origin)

    def untrusted(self, origin: bytes) -> InvalidRecord:
        """The refusal of a record of an origin the trust policy does not accept."""
        return InvalidRecord(
            f"origin {self.name(origin)} is not trusted by this node's policy "
            f"({self.config.federation.accept})", "untrusted_origin")

    def knows_key(self, key: bytes) -> bool:
        """Is ``key`` a node this one knows: a partner, a partner of a partner (listed in
        that partner's signed card), or a reader of one of its own restricted feeds?
        Not every card held: a member could gossip cards of keys it made up."""
        if self._known is None:
            partners = self.partners()
            known = set(partners)
            for pk in partners:
                c = self.card_info.get(pk)
                if c is not None:
                    known.update(c.partners)
            known.update(parse_node_id(r) for fc in self.config.feeds.values()
                         for r in fc.readers)
            self._known = frozenset(known)
        return key in self._known

    def _forget_derived(self) -> None:
        """Cards or partners changed: what was derived from them is rebuilt when asked."""
        self._trusted = None
        self._policies = {}
        self._known = None
        self.on_access_change()

    # ------------------------------------------------------------------ access

    def feed_policy(self, origin: bytes, feed: str) -> access.FeedPolicy:
        """The access level of a feed: ours from node.toml, others' from their cards."""
        key = (origin, feed)
        pol = self._policies.get(key)
        if pol is None:
            if len(self._policies) >= 100_000:  # bounded: feeds are many, cards change
                self._policies = {}
            pol = self._policies[key] = self._feed_policy(origin, feed)
        return pol

    def _feed_policy(self, origin: bytes, feed: str) -> access.FeedPolicy:
        if origin == self.public_key:
            fc = self.config.feeds.get(feed)
            level = fc.access if fc is not None else access.PUBLIC
            readers = frozenset(parse_node_id(r) for r in fc.readers) if fc else frozenset()
            return access.FeedPolicy(level, self.partners(), readers)
        c = self.card_info.get(origin)
        if c is None:
            return access.FeedPolicy(access.PARTNERS)
        # A card lists every feed its node has configured or published when it signed
        # it; a feed it does not list is newer than the card: unknown, so not public
        # (the next card exchange tells).
        level = next((f.access for f in c.feeds if f.name == feed), access.PARTNERS)
        return access.FeedPolicy(level, frozenset(c.partners))

    def is_restricted(self, origin: bytes, feed: str) -> bool:
        return self.feed_policy(origin, feed).access == access.RESTRICTED

    def may_send(self, partner: bytes, rec: Record) -> bool:
        """Access policy on the push path, for this record (sealed or not)."""
        pol = self.feed_policy(rec.origin, rec.feed)
        if pol.access == access.RESTRICTED:
            pol = access.for_record(pol, self._who(sealed_to(rec.sealed)))
        return access.may_relay(pol, rec.origin, partner)

    def may_relay_envelope(self, partner: bytes, origin: bytes, feed: str,
                           envelope: bytes) -> bool:
        """As :meth:`may_send`, for a stored envelope (the fetch path)."""
        pol = self.feed_policy(origin, feed)
        if pol.access == access.RESTRICTED:
            pol = access.for_record(pol, self._who(readers_of(envelope)))
        return access.may_relay(pol, origin, partner)

    def may_pass(self, partner: bytes, origin: bytes, feed: str,
                 proof: bytes | None = None) -> bool:
        """May this partner be sent what is about a feed -- its head in a frontier, its
        checkpoints, a proof about it? As for the feed's records: a partners feed's
        seqs, heads and roots stay with the origin's partners (its name and level are
        in the origin's card, which is public). A fork ``proof`` carries two records: of
        a restricted feed, if either is in clear, the partners rule holds."""
        pol = self.feed_policy(origin, feed)
        if pol.access == access.RESTRICTED and proof is not None:
            try:
                fp = ForkProof.decode(proof)
            except InvalidProof:  # a split view: checkpoints, no record
                return access.may_relay(pol, origin, partner)
            # Both records: the proof carries either one in clear if it is.
            return all(access.may_relay(access.for_record(pol, self._who(readers_of(env))), origin,
                                        partner) for env in (fp.a, fp.b))
        return access.may_relay(pol, origin, partner)

    def may_read(self, origin: bytes, feed: str, caller: bytes | None,
                 envelope: bytes | None = None) -> bool:
        """Access policy on the read paths (get, query, stream, export): for a record when
        its ``envelope`` is given (a restricted feed's record is readable by the nodes it
        is sealed to, and one in clear is held to the partners rule), else for the feed
        (for a restricted feed: its origin's readers, or none known here)."""
        pol = self.feed_policy(origin, feed)
        if pol.access == access.RESTRICTED and envelope is not None:
            pol = access.for_record(pol, self._who(readers_of(envelope)))
        return access.may_read(pol, origin, caller)

    def may_list(self, origin: bytes, feed: str, caller: bytes | None) -> bool:
        """May ``caller`` see that this feed is held here, and its head (not its
        content)? Where it may read the feed; and a restricted feed, to any node that
        signs its request (its records are then given to their readers alone)."""
        return self.may_read(origin, feed, caller) or (
            caller is not None and self.is_restricted(origin, feed))

    async def may_read_feed(self, origin: bytes, feed: str, caller: bytes | None) -> bool:
        """May ``caller`` read what is about a whole feed (its checkpoints, consistency
        proofs)? As it may read the feed's latest record held: for a restricted feed,
        that record's recipients are the readers known here (in clear: the partners
        rule); with no record held, the feed's policy alone."""
        head = self.replica.head((origin, feed))
        env = None
        if head is not None and self.is_restricted(origin, feed):
            env = await in_thread(self.storage.envelope_at, origin, feed, head.seq)
        return self.may_read(origin, feed, caller, env)


def _content(c: cards.NodeCard) -> tuple[object, ...]:
    """What a card states, apart from when it was signed."""
    return (c.name, c.url, c.tls, c.feeds, c.partners, c.software, c.keylog, c.tls_next)


def _digest(envelope: bytes) -> bytes:
    return hashlib.sha256(envelope).digest()


def _usable(c: cards.NodeCard, held: HeldLog | None) -> bool:
    """May this card of the history kept stand for its node's terms, judged by the key
    log held now? A card kept while its key was in force, which a recovery retired
    since, may be a thief's: it no longer counts. (Our own history: ``held`` None.)"""
    try:
        cards.judge_card_key(c, held)
    except InvalidRecord:
        return False
    return True


def readers_of(envelope: bytes) -> frozenset[bytes] | None:
    """The recipients a record is sealed to; None if it is not sealed (its payload is in
    clear), or cannot be read (it was verified when stored: not expected)."""
    try:
        sealed = sealed_of(envelope)
    except InvalidRecord:
        return None
    return frozenset() if sealed == {} else sealed_to(sealed)


def sealed_to(sealed: object) -> frozenset[bytes] | None:
    """The recipients of a record's ``sealed`` field; None if there is none."""
    if not isinstance(sealed, dict):
        return None
    return frozenset(r[0] for r in sealed.get("to", ()) if isinstance(r, list) and r)


def _mark_stale(stale: set[bytes], node: bytes, _done: object) -> None:
    """A card of ``node`` was written: its cached history is read again."""
    stale.add(node)
