"""A cn2 node's card is taken only if it is signed by the key in force in the key log
the receiver HOLDS (review of issue 12, M1; docs/PROTOCOL.md, Wiring: Cards).

After B recovers, a thief holding B's old key (now retired by the recovery) signs a
card carrying B's log of before the recovery -- a log that verifies from B's id alone
and puts the stolen key in force -- dated later than B's, naming another URL and TLS
certificate. Partner C, which holds B's recovered log, must refuse it: not kept, not
served on /v1/cards, no TLS pin moved, not in B's card history, counted on the partner
that served it (``key_not_in_force``), and an audit judging by B's newest log flags it.
In-process nodes, real HTTPS, real SQLite."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from citynode.audit import audit_bundle
from citynode.bundle import export_from_storage
from citynode.cluster import free_ports, set_config
from citynode.core import cards, keylog
from citynode.core.keys import NodeKey, SigningKey, unseal_secret_key
from citynode.datadir import init_data_dir
from citynode.errors import InvalidRecord
from citynode.node import Node
from citynode.recovery import RecoveryRequest, sign_request
from citynode.transport.server import serve
from tests.conftest import FAST_KDF, InProc
from tests.transport.test_witness import link

PW = "recovery-pass-1"


async def _start(tmp_path: Path, name: str,
                 settings: dict[tuple[str, str], Any] | None = None) -> tuple[InProc, Path]:
    d = tmp_path / name.lower()
    init_data_dir(d, name=name, listen=f"127.0.0.1:{free_ports(1)[0]}",
                  recovery_passphrase=PW, kdf_opslimit=FAST_KDF["kdf_opslimit"],
                  kdf_memlimit=FAST_KDF["kdf_memlimit"])
    for (section, key), value in (settings or {}).items():
        set_config(d / "node.toml", section, key, value)
    node = Node.load(d)
    await node.start()
    runner = await serve(node, host="127.0.0.1", port=node.config.node.listen_port)
    return InProc(node, runner), d


async def _until(pred: Callable[[], Awaitable[bool]], what: str, tries: int = 150) -> None:
    for _ in range(tries):
        if await pred():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting until {what}")


def _thief(bdir: Path, b: InProc) -> NodeKey:
    """What a thief takes from B's data dir before the recovery: node.key (K0, in force
    then) and the key log that puts it in force."""
    k0 = unseal_secret_key((bdir / "node.key").read_bytes(), None)
    return NodeKey(k0, b.node.key.identity, b.node.node_id, (bdir / "keylog").read_bytes())


def _forge(thief: NodeKey, c: InProc, tls: bytes) -> cards.NodeCard:
    """The thief's card of B: another URL, ``tls``, dated a minute after C's now."""
    return cards.make_card(thief, name="B", url="https://127.0.0.1:9", tls_fingerprint=tls,
                           feeds=[("test", "public")], partners=[],
                           software="citynode/0.1.0", now_ms=c.node.now_ms() + 60_000)


async def _recover(b: InProc, bdir: Path, last_good: dict[str, int]) -> None:
    """B recovers in the three steps (citynode/recovery.py): the node prepares, the
    recovery file signs away from it, the node applies the signed event."""
    ident, qseed = keylog.unseal_recovery((bdir / "recovery.key").read_bytes(), PW)
    request = await b.node.keychanges.prepare_recovery(last_good, frozenset(), "npw")
    req = RecoveryRequest.parse(json.dumps(request).encode())
    ev, _state = sign_request(req, ident, qseed, SigningKey.generate().public_key,
                              b.node.now_ms())
    await b.node.keychanges.apply_recovery(ev.envelope)


async def test_a_card_signed_by_a_key_a_recovery_retired_is_refused(tmp_path: Path) -> None:
    """C's partner T serves the thief's card (T took it before B's recovery, when the
    stolen key was B's key in force, and has not learnt the recovery: it pulls cards
    once an hour and takes no records of B)."""
    (b, bdir), (c, _cdir) = await _start(tmp_path, "B"), await _start(tmp_path, "C")
    t, _tdir = await _start(tmp_path, "T", {("federation", "pull_interval_seconds"): 3600.0,
                                           ("federation", "accept"): "partners"})
    try:
        await link(b, c)
        await link(c, t)
        await b.node.publish("test", "org.example.Test", [{"n": i} for i in range(3)])
        d = b.node.key.identity
        thief = _thief(bdir, b)
        forged = _forge(thief, c, b"\x66" * 32)
        assert await t.node.policy.learn_cards([forged.envelope]) == 1
        await _recover(b, bdir, {"test": 3})

        async def c_holds_recovery() -> bool:
            st = c.node.policy.keys.state(d)
            return st is not None and st.seq == 1

        await _until(c_holds_recovery, "C holds B's recovered log")
        link_b, link_t = c.node.partners.get(d), c.node.partners.get(t.node.public_key)
        assert link_b is not None and link_b.client.pins is not None and link_t is not None
        await c.node.gossip.learn_cards(link_b, force=True)
        card_before = c.node.policy.cards_seen.get(d)
        assert card_before is not None
        assert c.node.policy.card_info[d].keylog == b.node.key.log  # B's, after recovery
        assert forged.time > c.node.policy.card_info[d].time
        pins_before = set(link_b.client.pins.fingerprints)

        # C pulls T's cards: T serves the thief's card of B.
        assert forged.envelope in t.node.policy.known_cards()
        await c.node.gossip.learn_cards(link_t, force=True)
        assert c.node.policy.cards_seen.get(d) == card_before, \
            "a card signed by a key the recovery retired was kept"
        assert c.node.policy.card_info[d].url == b.url
        assert c.node.policy.keys.state(d).seq == 1  # type: ignore[union-attr]
        assert set(link_b.client.pins.fingerprints) == pins_before
        assert link_b.row.tls_fingerprint == b.node.identity.cert_fingerprint
        # Counted on the partner that served it, not on B (whose id the card names).
        assert link_t.invalid.get("key_not_in_force") == 1, link_t.invalid
        assert "key_not_in_force" not in link_b.invalid
        # Not verified nor counted again when served again.
        await c.node.gossip.learn_cards(link_t, force=True)
        assert link_t.invalid.get("key_not_in_force") == 1, link_t.invalid
        # C still talks to the real B over the pinned TLS certificate ...
        await link_b.client.cards()
        # ... and does not serve the thief's card on /v1/cards.
        c_from_b = b.node.partners.get(c.node.public_key)
        assert c_from_b is not None
        assert forged.envelope not in await c_from_b.client.cards()
        # `citynode partner add` of a URL serving it (the thief's) pins nothing.
        with pytest.raises(InvalidRecord) as refused:
            c.node.policy.check_partner_card(forged.envelope, d)
        assert refused.value.reason == "key_not_in_force"
        # A card history served with it does not take it either.
        assert await c.node.policy.learn_history(d, [forged.envelope]) == 0
        assert forged.envelope not in [x.envelope for x in await c.node.policy.card_history(d)]
        assert forged.envelope not in c.node.storage.card_history(d)

        # An audit of a bundle carrying the thief's card as B's newest card flags it when
        # it judges by B's newest log, given or carried by B's own card of after the
        # recovery (in the card history the bundle carries).
        async def bs_card_stored() -> bool:  # (written by the writer thread)
            return card_before in c.node.storage.card_history(d)

        await _until(bs_card_stored, "C's storage holds B's card of after the recovery")
        out = tmp_path / "b.bundle"
        export_from_storage(c.node.storage, d, ["test"], out, card=forged.envelope,
                            now_ms=c.node.now_ms())
        for given in ([b.node.key.log], []):
            rep = audit_bundle(out, b.node.node_id, now_ms=c.node.now_ms(),
                               key_logs=[x for x in given if x is not None])
            # The thief's card (dated after the recovery) is an error; B's own cards of
            # before the recovery in C's history, signed by the same retired key, are
            # not used either, but only a warning: they may be B's.
            assert rep.kind_counts.get("key_not_in_force") == 1, rep.render_text()
            assert "retired_key_card" in rep.kinds(), rep.render_text()
            assert not rep.ok
            assert rep.card is not None and rep.card.url == b.url
            assert forged.envelope not in [x.envelope for x in rep.cards]
            assert [e["type"] for e in rep.key_history] == ["inception", "recovery"]
        # B's own bundle after the recovery (its history holds its cards of before it)
        # audits clean by B's newest log: nothing of B's is called a forgery.
        own = tmp_path / "own.bundle"
        export_from_storage(b.node.storage, d, ["test"], own,
                            card=b.node.policy.card().envelope, now_ms=b.node.now_ms())
        rep = audit_bundle(own, b.node.node_id, now_ms=b.node.now_ms(),
                           key_logs=[x for x in [b.node.key.log] if x is not None])
        assert rep.ok, rep.render_text()
        assert "retired_key_card" in rep.kinds(), rep.render_text()
        assert rep.card is not None and rep.card.keylog == b.node.key.log
    finally:
        for n in (t, c, b):
            await n.close()


async def test_a_thiefs_card_kept_before_the_recovery_is_dropped_by_it(
        tmp_path: Path) -> None:
    """Before B recovers, the stolen key is B's key in force: C cannot tell the thief's
    card (dated later than B's) from B's and keeps it. The recovery retires that key:
    C stops holding and serving the card, and takes B's card signed after the
    recovery, although the thief's is dated later."""
    (b, bdir), (c, _cdir) = await _start(tmp_path, "B"), await _start(tmp_path, "C")
    try:
        await link(b, c)
        await b.node.publish("test", "org.example.Test", [{"n": i} for i in range(3)])
        d = b.node.key.identity
        thief = _thief(bdir, b)
        # The thief's card keeps B's certificate, so that C can still reach B.
        forged = _forge(thief, c, b.node.identity.cert_fingerprint)
        assert await c.node.policy.learn_cards([forged.envelope]) == 1
        assert c.node.policy.cards_seen[d] == forged.envelope
        await _recover(b, bdir, {"test": 3})
        c_from_b = b.node.partners.get(c.node.public_key)
        assert c_from_b is not None

        async def c_holds_bs_new_card() -> bool:
            card = c.node.policy.card_info.get(d)
            return card is not None and card.url == b.url and card.keylog == b.node.key.log

        async def forged_gone() -> bool:
            if forged.envelope in c.node.policy.known_cards():
                return False
            return forged.envelope not in await c_from_b.client.cards()

        await _until(forged_gone, "C stops serving the thief's card")
        link_b = c.node.partners.get(d)
        assert link_b is not None
        await c.node.gossip.learn_cards(link_b, force=True)
        await _until(c_holds_bs_new_card, "C holds B's card of after the recovery")
        assert forged.envelope not in [x.envelope for x in await c.node.policy.card_history(d)]
    finally:
        for n in (c, b):
            await n.close()


async def test_an_honest_partner_serving_the_origins_card_of_before_its_recovery_is_not_counted(
        tmp_path: Path) -> None:
    """Review 12b: T, honest, still holds B's own card of before B's recovery (signed
    with B's key then in force) and serves it. C, holding B's recovered log, refuses it
    (a recovery retired its key) but does not count it on T: a card dated before the
    key event that retired its key may be the origin's own of then. (A card dated after
    it, as the thief's above, is counted.)"""
    (b, bdir), (c, _cdir) = await _start(tmp_path, "B"), await _start(tmp_path, "C")
    t, _tdir = await _start(tmp_path, "T", {("federation", "pull_interval_seconds"): 3600.0,
                                           ("federation", "accept"): "partners"})
    try:
        await link(c, t)  # C never held B's old card
        await b.node.publish("test", "org.example.Test", [{"n": i} for i in range(3)])
        d = b.node.key.identity
        honest = b.node.policy.card()  # B's own card, signed with its key in force
        assert await t.node.policy.learn_cards([honest.envelope]) == 1
        await _recover(b, bdir, {"test": 3})
        assert c.node.policy.learn_card(b.node.policy.card().envelope)  # the new log

        async def c_holds() -> bool:
            st = c.node.policy.keys.state(d)
            return st is not None and st.seq == 1

        await _until(c_holds, "C holds B's recovered log")
        link_t = c.node.partners.get(t.node.public_key)
        assert link_t is not None
        await c.node.gossip.learn_cards(link_t, force=True)
        assert "key_not_in_force" not in link_t.invalid, link_t.invalid
        assert c.node.policy.card_info[d].signer == b.node.key.public_key  # B's new card
    finally:
        for n in (t, c, b):
            await n.close()
