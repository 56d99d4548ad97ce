"""Changing this node's signing key: a planned rotation (``citynode key rotate``) and a
recovery after a compromise (``citynode key recover``), as docs/PROTOCOL.md ("Wiring")
describes; and its TLS certificate (``citynode tls renew``).

A rotation is one step while no own record is being signed: take the head of every own
feed, sign the rotation with the pre-committed next key, write the keys and the log
(crash-safe: identity.write_key_change), and sign with the new key from then on.
Nothing waits on the network, so there is no downtime; partners learn the new log from
the node's card, from ``POST /v1/keylog`` sent right after, or when a record signed by
the new key makes them fetch it.

A recovery is signed away from this node (citynode/recovery.py): the recovery secret
never enters this process. The node prepares the new keys and a request
(:meth:`KeyChanges.prepare_recovery`), signs nothing until the signed event comes back,
and then applies it (:meth:`KeyChanges.apply_recovery`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from citynode.core import keylog
from citynode.core.chain import ForkProof, verify_fork_proof
from citynode.core.checkpoints import SplitViewProof, verify_split_view
from citynode.core.keylog import Head
from citynode.core.keys import SigningKey, seal_secret_key, unseal_secret_key
from citynode.core.records import decode_record, parse_body, record_id
from citynode.errors import (
    CitynodeError,
    ConfigError,
    InvalidProof,
    InvalidRecord,
    KeyFileError,
)
from citynode.identity import (
    Identity,
    drop_recovery_pending,
    load_tls,
    next_key_on_disk,
    read_next_key,
    read_recovery_pending,
    stage_tls_renewal,
    switch_tls,
    write_key_change,
    write_recovery_pending,
)
from citynode.logs import fields
from citynode.node._base import Spawn, in_thread
from citynode.node.partners import Partners
from citynode.node.policy import Policy
from citynode.node.publishing import Publisher
from citynode.recovery import RecoveryRequest
from citynode.storage import Storage

__all__ = ["KeyChanges"]

log = logging.getLogger("citynode.node")


class KeyChanges:
    """Rotations and recoveries of this node's own key log."""

    def __init__(self, *, data_dir: Path, identity: Identity, policy: Policy,
                 publisher: Publisher, partners: Partners, storage: Storage,
                 now_ms: Callable[[], int], spawn: Spawn) -> None:
        self.data_dir = data_dir
        self.identity = identity
        self.key = identity.key
        self.policy = policy
        self.publisher = publisher
        self.partners = partners
        self.storage = storage
        self.now_ms = now_ms
        self.spawn = spawn
        #: Records of ``(origin, feed)`` above ``seq`` were dropped by :meth:`purge`.
        self.on_truncated: Callable[[bytes, str, int], None] = lambda o, feed, seq: None
        #: After a purge of an identity: forget the checkpoints its key log now refuses.
        self.on_purged: Callable[[bytes], Awaitable[int]] = _none
        #: Told the new certificate's fingerprint after a TLS switch (the leader's
        #: address written for processes that share the database names it).
        self.on_tls_switched: Callable[[bytes], None] = lambda fingerprint: None
        #: The TLS contexts the server accepts connections with (a renewal loads the
        #: new certificate into them: new connections get it, with no restart).
        self.tls_contexts: list[ssl.SSLContext] = []
        if (data_dir / "recovery.pending").exists():
            # Prepared before a restart: still nothing is signed until it is applied.
            publisher.key_refusal = _PENDING
        #: What stopped signing before a recovery was prepared (a cancel restores it).
        self._refusal_before: str | None = None

    def serve_tls(self, ctx: ssl.SSLContext) -> None:
        """The server accepts connections with ``ctx``: a TLS switch reloads it."""
        self.tls_contexts.append(ctx)

    async def renew_tls(self, switch: bool) -> dict[str, Any]:
        """A TLS renewal in two steps, with no window where a partner refuses this node.
        Without ``switch``: a new certificate is staged and our card names it next to
        the one in force (partners then accept either). With ``switch``: the staged
        certificate is put in force, served from the next connection on, and our card
        names it alone. Returns ``{tls, tls_next}`` (hex; None when absent). Raises
        :class:`ConfigError` when this node does not serve TLS, :class:`KeyFileError`
        (nothing staged to switch to, one staged already, a file not written)."""
        if not self.policy.config.tls.enabled:
            raise ConfigError("this node does not serve TLS itself ([tls] enabled = "
                              "false): renew the proxy's certificate instead")
        if switch:
            await in_thread(switch_tls, self.data_dir)
        else:
            await in_thread(stage_tls_renewal, self.data_dir)
        fp, pem, next_fp = await in_thread(load_tls, self.data_dir)
        self.identity = dataclasses.replace(self.identity, cert_fingerprint=fp, cert_pem=pem,
                                            next_cert_fingerprint=next_fp)
        if switch:
            for ctx in self.tls_contexts:
                ctx.load_cert_chain(self.identity.cert_path, self.identity.key_path)
            self.on_tls_switched(fp)
        self.policy.tls_changed(self.identity)
        card = self.policy.card()
        log.warning("TLS certificate switched" if switch else "TLS certificate renewal "
                    "staged (switch once partners hold the new card)", extra=fields(
                        tls=_hex(card.tls), tls_next=_hex(card.tls_next)))
        return {"tls": _hex(card.tls), "tls_next": _hex(card.tls_next)}

    def _state(self) -> keylog.KeyState:
        if self.key.log is None:
            raise ConfigError("this node has a cn1 id (its key is its identity): it has no "
                              "key log to rotate or recover; make a new node with "
                              "`citynode init` for a cn2 id")
        return keylog.verify_log(self.key.identity, self.key.log,
                                 verifier=self.policy.verifier)

    def _own_heads(self) -> dict[str, Head]:
        me = self.key.identity
        return {f: Head(h.seq, h.id) for (o, f), h in list(self.publisher.replica.heads.items())
                if o == me and h.seq >= 1}

    def _heads_held(self, heads: dict[str, Head]) -> None:
        """In a worker thread: raise :class:`ConfigError` unless every head a rotation
        would name is the record this node's own database holds at that seq. A key
        event fixes its heads for good (a later recovery cannot name lower ones:
        ``heads_regress``), so it names only records this node signed and stored, never
        a head that came from anywhere else."""
        me = self.key.identity
        for feed, h in sorted(heads.items()):
            if self.storage.id_at(me, feed, h.seq) != h.id:
                raise ConfigError(
                    f"not rotating: the head of own feed {feed!r} (seq {h.seq}) is not a "
                    "record this node's database holds; a key event names only heads "
                    "this node signed (see `citynode status`; if its key may be stolen, "
                    "run `citynode key recover`)")

    async def newer_own_log(self) -> tuple[str, bytes, keylog.KeyState] | None:
        """The newest log of this node's own identity that a partner holds, when it
        goes further than the one in this data dir (``extends``: this data dir was
        restored from a backup taken before a rotation; ``recovered``): ``(partner
        name, wire bytes, its state)``, or None (none newer, none reachable)."""
        if self.key.log is None:
            return None
        me = self.key.identity
        held_state, held = keylog.verified_events(me, self.key.log,
                                                  verifier=self.policy.verifier)

        async def ask(link: Any) -> tuple[str, bytes, keylog.KeyState] | None:
            try:
                data = await asyncio.wait_for(link.client.key_log(self.key.node_id), 10)
                st, evs = await in_thread(functools.partial(
                    keylog.verified_events, me, data, verifier=self.policy.verifier,
                    now_ms=self.now_ms()))
            except (CitynodeError, TimeoutError):
                return None  # unreachable, none held, or a log that does not verify
            d = keylog.compare_logs(held, evs, held_state=held_state, received_state=st)
            return (link.row.name, data, st) if d.accept else None

        found = [f for f in await asyncio.gather(
            *(ask(link) for link in list(self.partners.links.values()))) if f is not None]
        return max(found, key=lambda f: f[2].seq, default=None)

    async def catch_up(self) -> None:
        """At start: when a partner holds a newer log of this identity than this data
        dir (a restore from a backup taken before a rotation), take it. If the key it
        puts in force is here (node.next.key: one rotation since the backup), sign with
        it from now on; else sign nothing (:attr:`Publisher.key_refusal`) and say
        exactly what to do. Either way a later rotation from the stale log (a second
        event at one seq: a key fork) cannot happen."""
        found = await self.newer_own_log()
        if found is None:
            return
        name, wire, st = found
        own = keylog.verify_log(self.key.identity, self.key.log or b"",
                                verifier=self.policy.verifier)
        try:
            nxt: SigningKey | None = await in_thread(read_next_key, self.data_dir,
                                                     self.identity.passphrase)
        except CitynodeError:
            nxt = None
        if nxt is not None and nxt.public_key == st.key and st.seq == own.seq + 1:
            await self._adopt(name, wire, st, nxt)
            return
        why = (f"nothing is signed: partner {name} holds this node's key log at seq "
               f"{st.seq}, this data dir seq {own.seq} (an older backup?), without the "
               "key in force: `citynode key rotate` takes the next key if it is that key, "
               "else restore the newest backup or `citynode key recover`")
        if self.publisher.key_refusal == _PENDING:
            # A recovery prepared before this restart still holds signing; a cancel
            # brings this reason back, applying it puts a key this node holds in force.
            self._refusal_before = why
        else:
            self.publisher.key_refusal = why
        log.error("signing stopped: " + why)

    async def _adopt(self, name: str, wire: bytes, st: keylog.KeyState,
                     nxt: SigningKey, next_passphrase: str | None = None) -> None:
        """Take a partner's newer own log whose key in force is ``nxt`` (this data dir's
        next key: one rotation since its backup) and sign with it from now on. The
        next key that log commits to was made after the backup and is not here: the
        next change of keys must be a recovery."""
        async def step() -> None:
            await in_thread(write_key_change, self.data_dir, wire, nxt.seed, nxt.seed,
                            self.identity.passphrase, self.key.seed, next_passphrase)
            self.key.switch(nxt.seed, wire)
            self.policy.own_log_changed()

        await self.publisher.with_signing_stopped(step)
        if self.publisher.key_refusal != _PENDING:
            self.publisher.key_refusal = None
        log.warning("this data dir held an older key log than partner %s: took its newer "
                    "log and signs with the key in force (this data dir's next key); the "
                    "next key it commits to is not here, so change keys next with "
                    "`citynode key recover`", name, extra=fields(seq=st.seq))

    async def rotate(self, next_seed: bytes | None = None,
                     next_passphrase: str | None = None) -> dict[str, Any]:
        """Rotate to the pre-committed next key; return ``{node_id, seq, key}``.

        The next key is ``next_seed`` when given (the operator unsealed it off the
        node: it is kept sealed with a passphrase the node never holds), and the fresh
        next key is then sealed with ``next_passphrase``; else node.next.key, which
        opens with the node's own passphrase only on a node made with ``init
        --next-key-on-disk``. Refused when a partner holds a newer log of this
        identity (a stale data dir would sign a second rotation at one seq: a key
        fork). Raises :class:`ConfigError` (a cn1 node, a stale log, a next key the
        node cannot open), :class:`KeyFileError`."""
        state = self._state()
        newer = await self.newer_own_log()
        if (newer is not None and next_seed is not None and next_passphrase
                and SigningKey(next_seed).public_key == newer[2].key
                and newer[2].seq == state.seq + 1):
            # Restored from a backup taken one rotation ago: the next key given is the
            # key in force; take the newer log instead of rotating again.
            await self._adopt(newer[0], newer[1], newer[2], SigningKey(next_seed),
                              next_passphrase)
            return {"node_id": self.key.node_id, "seq": newer[2].seq,
                    "key": newer[2].key.hex(), "adopted": True}
        if self.publisher.key_refusal is not None:
            raise ConfigError(self.publisher.key_refusal)
        if newer is not None:
            raise ConfigError(
                f"partner {newer[0]} holds this node's key log at seq {newer[2].seq}, newer "
                f"than this data dir's (seq {state.seq}): it was restored from an older "
                "backup. Start the node (it takes the newer log when it holds the key in "
                "force) or restore the newest backup; rotating now would sign a second "
                "key event at one seq (a key fork)")
        if next_seed is not None:
            if not next_passphrase:
                raise ConfigError("give the passphrase to seal the new next key with")
            nxt = SigningKey(next_seed)
        else:
            try:
                nxt = await in_thread(read_next_key, self.data_dir, self.identity.passphrase)
            except KeyFileError as exc:
                raise ConfigError(
                    f"{exc}: the next key is sealed with the next-key passphrase, which "
                    "this node does not hold: run `citynode key rotate` on a terminal or "
                    "with CITYNODE_NEXT_KEY_PASSPHRASE, or give --next-key FILE") from exc
        if keylog.commit_key(nxt.public_key) != state.next:
            raise ConfigError(f"{self.data_dir}/node.next.key is not the key this node's log "
                              "committed to: restore it from the same backup as node.key; "
                              "if it is lost (a backup older than the last rotation), "
                              "change keys with `citynode key recover`")

        async def step() -> keylog.KeyEvent:
            heads = self._own_heads()
            # Publishes queue their write before letting go of the feed: let it land.
            await asyncio.wrap_future(self.storage.barrier())
            await in_thread(self._heads_held, heads)
            after = SigningKey.generate()
            ev = keylog.rotate(state, nxt, after.public_key, max(self.now_ms(), state.time),
                               heads)
            wire = keylog.encode_log([*keylog.decode_log(self.key.log or b""), ev.envelope])
            await in_thread(write_key_change, self.data_dir, wire, nxt.seed, after.seed,
                            self.identity.passphrase, self.key.seed,
                            next_passphrase if next_seed is not None else None)
            self.key.switch(nxt.seed, wire)
            self.policy.own_log_changed()
            self.publisher.replica.own_key_changed()
            return ev

        ev = await self.publisher.with_signing_stopped(step)
        log.warning("signing key rotated", extra=fields(node=self.key.node_id, seq=ev.seq,
                                                        key=ev.key.hex()))
        self._announce()
        return {"node_id": self.key.node_id, "seq": ev.seq, "key": ev.key.hex()}

    async def prepare_recovery(self, last_good: dict[str, int],
                               drop: frozenset[str] = frozenset(),
                               next_passphrase: str | None = None) -> dict[str, Any]:
        """Step 1 of a recovery (citynode/recovery.py): make the new signing key and
        next key here, keep them in recovery.pending (the signing key sealed like
        node.key, the next key with ``next_passphrase``, or like node.key on a node
        whose next key is on disk) and return the request for the recovery key to
        sign elsewhere (:meth:`RecoveryRequest.encode`'s JSON object). No recovery
        secret is needed or seen here. ``last_good``: feed -> seq of the last good
        record, each held here; ``drop``: feeds on which the old key keeps nothing.
        Every own feed the superseded key signed on must be decided, in one or the
        other: a recovery cannot be undone, so nothing is dropped by omission. From
        now until the recovery is applied or cancelled this node signs nothing (what
        it signed meanwhile with the old key would be beyond the heads named): the
        heads are read and signing is stopped in one step, after every publish under
        way finished (:meth:`Publisher.with_signing_stopped`), as for a rotation.
        A second prepare while one is prepared is refused: an event may already be
        signed for the first request, and a second event of one recovery key kills
        the identity. On a database several processes share, the prepared keys live in
        this process's data dir only: the others must be stopped until it is applied
        (a warning says so). Raises
        :class:`ConfigError` (a cn1 node, a dead identity, one prepared already, a
        record not held, a feed not decided or decided twice, no
        passphrase for the next key), :class:`KeyFileError`."""
        state = self._state()
        if state.dead:
            raise ConfigError("this identity is dead (its recovery key was used twice): "
                              "no recovery can take it back; make a new node")
        if self.storage.shared:
            # storage.shared: PostgreSQL, whether one process runs on it or several. The
            # prepared keys live in this process's data dir only: another process taking
            # the lead would sign with the old key and know of no recovery. A single
            # process (the usual PostgreSQL node) is not concerned; several must be
            # stopped but this one until the recovery is applied (README).
            log.warning("recovery prepared on a shared database: stop every other "
                        "process of this node until it is applied (the prepared keys "
                        "live in this process's data dir only)")
        if await in_thread(read_recovery_pending, self.data_dir) is not None:
            raise ConfigError(_PREPARED_ALREADY)
        both = sorted(set(last_good) & drop)
        if both:
            raise ConfigError(f"feed(s) {', '.join(both)} given both --last-good and "
                              "--drop-feed: keep records up to a seq, or none")
        me = self.key.identity
        on_disk = await in_thread(next_key_on_disk, self.data_dir)
        if not on_disk and not next_passphrase:
            raise ConfigError("give the passphrase to seal the new next key with (the "
                              "next-key passphrase: CITYNODE_NEXT_KEY_PASSPHRASE)")

        async def step() -> tuple[dict[str, Head], RecoveryRequest, SigningKey]:
            # Publishes under way have finished and none starts: the heads read here
            # are the last this key signs until the recovery is applied or cancelled.
            await asyncio.wrap_future(self.storage.barrier())
            cur = self._state()  # a rotation may have landed since
            undecided = sorted(
                f for f, h in self._own_heads().items() if f not in last_good
                and f not in drop and h.seq > cur.established.get(f, Head(0, b"")).seq)
            if undecided:
                shown = ", ".join(undecided[:10]) + (" ..." if len(undecided) > 10 else "")
                raise ConfigError(
                    f"{len(undecided)} own feed(s) not named: {shown}; give --last-good "
                    "FEED=SEQ (the last record you made yourself) or --drop-feed FEED "
                    "(keep nothing the old key signed there) for each: a recovery cannot "
                    "be undone")
            heads: dict[str, Head] = {}
            for feed, seq in sorted(last_good.items()):
                rid = await in_thread(self.storage.id_at, me, feed, seq)
                if rid is None:
                    raise ConfigError(f"--last-good {feed}={seq}: no record of this node "
                                      "at that position is held here")
                heads[feed] = Head(seq, rid)
                # Refused now rather than after the operator's trip to the recovery key.
                old = cur.established.get(feed)
                if old is not None and (seq < old.seq
                                        or (seq == old.seq and rid != old.id)):
                    raise ConfigError(f"--last-good {feed}={seq} goes back on the head a "
                                      f"key event of this node settled (seq {old.seq}): "
                                      "name a later record")
            new, after = SigningKey.generate(), SigningKey.generate()
            req = RecoveryRequest(me, self.key.log or b"", heads, tuple(sorted(drop)),
                                  new.public_key, keylog.commit_key(after.public_key),
                                  self.now_ms())

            def write() -> None:
                pending = {"key": seal_secret_key(new.seed,
                                                  self.identity.passphrase).decode(),
                           "next": seal_secret_key(after.seed, None if on_disk
                                                   else next_passphrase).decode(),
                           "request": req.encode().decode()}
                write_recovery_pending(self.data_dir, json.dumps(pending).encode())

            if await in_thread(read_recovery_pending, self.data_dir) is not None:
                raise ConfigError(_PREPARED_ALREADY)  # prepared meanwhile
            await in_thread(write)
            if self.publisher.key_refusal != _PENDING:
                self._refusal_before = self.publisher.key_refusal
            self.publisher.key_refusal = _PENDING
            return heads, req, new

        heads, req, new = await self.publisher.with_signing_stopped(step)
        log.warning("recovery prepared: nothing is signed until it is applied (citynode "
                    "key recover --event) or cancelled", extra=fields(
                        heads={f: h.seq for f, h in heads.items()}, dropped=sorted(drop),
                        key=new.public_key.hex()))
        out: dict[str, Any] = json.loads(req.encode())
        return out

    async def cancel_recovery(self) -> bool:
        """Forget a prepared recovery (its keys and request) and sign again; whether
        there was one."""
        gone = await in_thread(drop_recovery_pending, self.data_dir)
        if self.publisher.key_refusal == _PENDING:
            self.publisher.key_refusal = self._refusal_before
        if gone:
            log.warning("prepared recovery cancelled: signing with the key in force again")
        return gone

    async def apply_recovery(self, envelope: bytes) -> dict[str, Any]:
        """Step 3 of a recovery (citynode/recovery.py): apply the recovery event signed
        away from this node. It must extend the key log held here, be signed by the
        recovery key that log commits to, and name the keys and heads prepared here
        (:meth:`prepare_recovery`). Then, as for any recovery: the prepared keys go in
        force, records held beyond the heads (the thief's, fetched from partners) are
        dropped, and partners get the new log at once. Returns ``{node_id, seq, key}``
        (and ``already``: True when this very event is the held log's last one: applied
        before). Raises :class:`ConfigError` saying what does not fit."""
        state = self._state()
        try:
            ev = keylog.open_event(envelope, verifier=self.policy.verifier)
        except InvalidRecord as exc:
            raise ConfigError(f"the recovery event does not verify: {exc}") from exc
        if ev.type != "recovery":
            raise ConfigError(f"that is a key event of type {ev.type}, not a recovery")
        if ev.identity != state.identity:
            raise ConfigError(f"that recovery is of {keylog.identity_id(ev.identity or b'')}"
                              f", not of this node ({state.node_id})")
        if ev.id == state.head_id:
            # Applied before (perhaps cut short before its prepared keys were dropped).
            await in_thread(drop_recovery_pending, self.data_dir)
            if self.publisher.key_refusal == _PENDING:
                self.publisher.key_refusal = None
            return {"node_id": self.key.node_id, "seq": ev.seq, "key": ev.key.hex(),
                    "already": True}
        raw = await in_thread(read_recovery_pending, self.data_dir)
        if raw is None:
            raise ConfigError("no recovery is prepared on this node: run `citynode key "
                              "recover-prepare` here, sign its request with `citynode key "
                              "recover-sign`, then give that event")
        try:
            pending = json.loads(raw)
            req = RecoveryRequest.parse(str(pending["request"]).encode(),
                                        "recovery.pending")
            sealed_key = str(pending["key"]).encode()
            sealed_next = str(pending["next"]).encode()
        except (ValueError, KeyError, TypeError, KeyFileError) as exc:
            raise ConfigError(f"{self.data_dir}/recovery.pending is damaged ({exc}): this "
                              "event cannot be applied here. " + _NEVER_TWICE) from exc
        if ev.key != req.key or ev.next != req.next:
            raise ConfigError("that recovery names other keys than the ones prepared here "
                              "(signed for a request cancelled since?): it cannot be "
                              "applied here. " + _NEVER_TWICE)
        if dict(ev.heads) != req.heads:
            raise ConfigError("that recovery names other heads than the request prepared "
                              "here (the request was altered on its way): it cannot be "
                              "applied here. " + _NEVER_TWICE)
        try:
            keylog.apply_event(state, ev, now_ms=self.now_ms())
        except InvalidRecord as exc:
            raise ConfigError(_refusal(exc, state)) from exc
        try:
            seed = await in_thread(unseal_secret_key, sealed_key, self.identity.passphrase)
        except KeyFileError as exc:
            raise ConfigError(f"{self.data_dir}/recovery.pending: the new key does not open "
                              f"with this node's passphrase ({exc})") from exc
        if SigningKey(seed).public_key != req.key:
            raise ConfigError(f"{self.data_dir}/recovery.pending is damaged: this event "
                              "cannot be applied here. " + _NEVER_TWICE)

        async def step() -> None:
            wire = keylog.encode_log([*keylog.decode_log(self.key.log or b""), ev.envelope])
            await in_thread(functools.partial(
                write_key_change, self.data_dir, wire, seed, None, self.identity.passphrase,
                self.key.seed, sealed_next=sealed_next))
            await in_thread(drop_recovery_pending, self.data_dir)
            self.key.switch(seed, wire)
            self.policy.own_log_changed()
            self.publisher.replica.own_key_changed()

        await self.publisher.with_signing_stopped(step)
        if self.publisher.key_refusal == _PENDING:
            self.publisher.key_refusal = None
        log.warning("identity recovered with the recovery key", extra=fields(
            node=self.key.node_id, seq=ev.seq, heads={f: h.seq for f, h in ev.heads.items()}))
        # Our own copies of what the thief signed (fetched from partners) go too.
        await self.purge(self.key.identity)
        self._announce()
        return {"node_id": self.key.node_id, "seq": ev.seq, "key": ev.key.hex()}

    async def purge(self, identity: bytes, *, unconfirmed: bool = False) -> int:
        """Drop the records held of ``identity`` that its key log (just taken, with a
        rotation or a recovery) now refuses, and the proofs it refutes:

        * beyond a retired key's heads: from the first such record of each feed on (its
          successors chain to it);
        * inside a retired key's window, off the chain that ends at the head its key
          event named (docs/PROTOCOL.md, "Settled windows"): a held chain whose record
          at a named head's seq is not that record is cut back to the highest named
          head it does hold; with ``unconfirmed`` (a record at a named head was seen
          not to link to what is held), a held head inside a window, which no named
          head confirms, is cut back the same way (partners serve the named chain);
        * fork and split-view proofs made of a retired key's statements inside its
          window (``settled_by_key_event``): forgotten, and the feed is not forked
          any more (our own: publishing resumes).
        * checkpoints of its feeds the log refuses, held with or without the records
          they count (``on_purged``: the checkpoints role).

        Returns how many records went."""
        state = self.policy.keys.state(identity)
        if state is None:
            return 0
        await self._drop_refuted_proofs(identity)
        replica = self.publisher.replica
        gone = 0
        for (o, feed), h in list(replica.heads.items()):
            if o != identity:
                continue
            keep = await self._settled_keep(state, o, feed, h.seq, unconfirmed)
            base = state.established.get(feed)
            seq = base.seq if base is not None else 0
            if h.seq > seq:
                for env in await in_thread(self.storage.range, o, feed, seq + 1, h.seq,
                                           h.seq):
                    body, _sig, _payload = decode_record(env)
                    f = parse_body(body)
                    v = state.key_verdict(f.get("key", o), feed, f["seq"], record_id(body))
                    if not v.valid:
                        keep = f["seq"] - 1 if keep is None else min(keep, f["seq"] - 1)
                        break
            if keep is None:
                continue
            n = await asyncio.wrap_future(self.storage.truncate(o, feed, keep))
            kept = await in_thread(self.storage.head, o, feed)
            replica.cut((o, feed), kept)
            self.on_truncated(o, feed, keep)
            gone += n
            log.warning("dropped records a key event cut off", extra=fields(
                origin=self.policy.name(o), feed=feed, from_seq=keep + 1, records=n))
        # Statements too: a stolen key's checkpoint may be held here without the
        # records it counts (it travels on its own).
        await self.on_purged(identity)
        return gone

    async def _settled_keep(self, state: keylog.KeyState, origin: bytes, feed: str,
                            held: int, unconfirmed: bool) -> int | None:
        """The seq to cut ``feed`` back to so that what is held inside retired keys'
        windows is on the chains their key events named, or None (nothing to cut)."""
        named = sorted({w.end[feed] for w in state.keys if w.end is not None
                        and feed in w.end and state.settled(w.key, feed, w.end[feed].seq)
                        is not None}, key=lambda hd: hd.seq)
        confirmed = 0
        for hd in named:
            if hd.seq > held:
                # The held chain ends inside a window whose named head is not held yet.
                return confirmed if unconfirmed and held > confirmed else None
            if await in_thread(self.storage.id_at, origin, feed, hd.seq) != hd.id:
                return confirmed  # off the named chain from somewhere above `confirmed`
            confirmed = hd.seq  # held chains are linked: all below it is on it too
        return None

    async def _drop_refuted_proofs(self, identity: bytes) -> None:
        """Forget the proofs against ``identity`` that its key log now refutes
        (``settled_by_key_event``) and clear the fork state they put a feed in."""
        rows = [r for r in await in_thread(self.storage.fork_proofs) if r.origin == identity]
        refuted = []
        for r in rows:
            try:
                if r.kind == "fork":
                    verify_fork_proof(ForkProof.decode(r.proof), self.policy.verifier,
                                      key_states=self.policy.keys.state)
                else:
                    verify_split_view(SplitViewProof.decode(r.proof), self.policy.verifier,
                                      self.policy.keys.state)
            except InvalidProof as exc:
                if exc.reason == "settled_by_key_event":
                    refuted.append(r)
        if not refuted:
            return
        await asyncio.wrap_future(self.storage.drop_fork_proofs([r.id for r in refuted]))
        gone = {r.id for r in refuted}
        for feed in sorted({r.feed for r in refuted}):
            self.publisher.replica.unfork(identity, feed, [
                r.seq for r in rows if r.feed == feed and r.id not in gone])
            log.warning("fork proofs dropped: a key event of the origin settled the "
                        "retired key's window they were in", extra=fields(
                            origin=self.policy.name(identity), feed=feed))

    def _announce(self) -> None:
        """Send our new log to every partner now (they would also learn it from our
        card or from our next record); a partner that is down learns it later."""
        wire = self.key.log
        if wire is None:
            return
        for link in self.partners.links.values():
            self.spawn(self._offer(link.client, link.row.name, wire), "announce-keylog")

    async def _offer(self, client: Any, name: str, wire: bytes) -> None:
        try:
            out = await client.offer_key_log(self.key.node_id, wire)
        except CitynodeError as exc:
            log.info("key log not delivered", extra=fields(partner=name, error=str(exc)))
            return
        log.info("key log delivered", extra=fields(partner=name, outcome=out.get("outcome")))


async def _none(identity: bytes) -> int:
    return 0


#: What an event that cannot be applied means for the recovery key that signed it.
_NEVER_TWICE = ("Do not sign another event with that recovery key unless you are certain "
                "every copy of this one is destroyed: two recovery events of one recovery "
                "key kill the identity for good")

#: Why a second ``key recover-prepare`` is refused.
_PREPARED_ALREADY = (
    "a recovery is prepared already: apply the event recover-sign signed for its request "
    "(`citynode key recover --event FILE`), or cancel it first (`citynode key "
    "recover-prepare --cancel`; an event already signed for it must then be destroyed)")

#: Why nothing is signed between ``key recover-prepare`` and ``key recover --event``.
_PENDING = ("a recovery is prepared (citynode key recover-prepare): nothing is signed "
            "until it is applied (`citynode key recover --event FILE`) or cancelled "
            "(`citynode key recover-prepare --cancel`)")


def _refusal(exc: InvalidRecord, state: keylog.KeyState) -> str:
    """One line for a recovery event the held log refuses."""
    if exc.reason in ("key_event_order", "bad_prev"):
        return (f"that recovery does not follow this node's key log (key event "
                f"{state.seq}): the log changed since the request was made, so it cannot "
                "be applied here. " + _NEVER_TWICE)
    if exc.reason == "bad_recovery":
        return ("that recovery is not signed by the recovery key this node's log commits "
                "to (an older recovery file?)")
    if exc.reason == "future_time":
        return ("that recovery is dated in the future (the clock of the machine that "
                "signed it is ahead): give it again once this node's clock has passed its "
                "time; do not sign another")
    return f"that recovery does not fit this node's key log: {exc}"


def _hex(fp: bytes | None) -> str | None:
    return fp.hex() if fp is not None else None
