"""Witnesses between real in-process nodes over HTTPS (issue 12, point 4): partners
cosign an origin's checkpoints, exchange the cosignatures, refuse and prove split views,
and refuse bad cosignatures with a reason counted on the partner that sent them."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from citynode.audit import audit_bundle
from citynode.bundle import export_from_storage
from citynode.core import checkpoints as cps
from citynode.core import cosign as cs
from citynode.core import encoding, keylog
from citynode.core.keys import SigningKey, Verifier
from citynode.errors import InvalidRecord, PeerRejected
from citynode.transport.client import PeerClient
from tests.conftest import InProc, eventually

Make = Callable[..., Awaitable[InProc]]
TYPE = "org.example.Test"


async def link(x: InProc, y: InProc) -> None:
    await x.node.add_partner(y.url, y.node.node_id)
    await y.node.add_partner(x.url, x.node.node_id)


def cosigners(n: InProc, origin: InProc, feed: str, size: int) -> set[bytes]:
    """The witnesses whose cosignatures ``n`` holds of ``origin``'s checkpoint."""
    return {w for s, _r, w, _e in n.node.storage.cosignatures(origin.node.public_key, feed)
            if s == size}


async def three(inproc: Make, **settings: Any) -> tuple[InProc, InProc, InProc]:
    """Origin A and witnesses W1, W2, each a partner of the two others."""
    a = await inproc("Origin")
    w1 = await inproc("Witness1", settings=settings.get("w1"))
    w2 = await inproc("Witness2", settings=settings.get("w2"))
    for x, y in [(a, w1), (a, w2), (w1, w2)]:
        await link(x, y)
    return a, w1, w2


async def test_witnesses_cosign_exchange_and_an_audit_counts_the_quorum(
        inproc: Make, tmp_path: Path) -> None:
    a, w1, w2 = await three(inproc)
    me1, me2 = w1.node.public_key, w2.node.public_key
    await a.node.publish("air", TYPE, [{"n": i} for i in range(5)])
    (cp5,) = await a.node.checkpoints.checkpoint_now()

    async def both_everywhere(size: int) -> bool:
        for n in (w1, w2):
            await n.node.witness.drain()
        return all(cosigners(n, a, "air", size) == {me1, me2} for n in (a, w1, w2))

    await eventually(lambda: both_everywhere(5), timeout=30)
    # A larger checkpoint: cosigned only with a consistency proof from size 5.
    await a.node.publish("air", TYPE, [{"n": i} for i in range(5, 9)])
    (cp9,) = await a.node.checkpoints.checkpoint_now()
    await eventually(lambda: both_everywhere(9), timeout=30)
    for n in (w1, w2):
        assert n.node.storage.last_cosigned(n.node.public_key, a.node.public_key,
                                            "air") == (9, cp9.root)
    # The public read: each checkpoint with its cosignatures (msgpack: cosigned
    # checkpoints that verify with check_quorum).
    async with w1.session.get(f"{w1.url}/v1/cosignatures?origin={a.node.node_id}&feed=air"
                              "&size=9", headers={"Accept": "application/json"}) as r:
        assert r.status == 200, await r.text()
        listed = (await r.json())["checkpoints"]
    assert [c["size"] for c in listed] == [9] and listed[0]["trusted"] is None
    assert base64.b64decode(listed[0]["checkpoint"]) == cp9.envelope
    envs = [base64.b64decode(c["envelope"]) for c in listed[0]["cosignatures"]]
    book = w1.node.policy.keys
    keys = {w: cs.witness_keys(w, book.state(w)) for w in (me1, me2)}
    assert keys[me1] == {w1.node.key.public_key} != {me1}  # cn2: the key, not the id
    q = cs.check_quorum(cp9, envs, keys, 2, verifier=Verifier())
    assert q.ok and q.witnesses == {me1, me2}
    # An export from a witness carries the cosignatures; the audit counts them.
    out = tmp_path / "a.bundle"
    s = export_from_storage(w1.node.storage, a.node.public_key, ["air"], out,
                            card=None, now_ms=a.node.now_ms())
    assert s.counts.checkpoints == 2 and s.counts.cosignatures == 4
    rep = audit_bundle(out, a.node.node_id, now_ms=a.node.now_ms(),
                       witnesses=[w1.node.node_id, w2.node.node_id], quorum=2)
    assert rep.ok, rep.render_text()
    assert rep.witness is not None
    assert [(c["size"], c["ok"]) for c in rep.witness["checkpoints"]] == [(5, True),
                                                                        (9, True)]
    third = SigningKey(b"\x03" * 32)
    rep = audit_bundle(out, a.node.node_id, now_ms=a.node.now_ms(),
                       witnesses=[w1.node.node_id, third.node_id], quorum=2)
    assert not rep.ok and "no_quorum" in rep.kinds()
    assert cp5.size == 5


async def test_trust_follows_the_required_witnesses(inproc: Make) -> None:
    a = await inproc("Origin")
    w1 = await inproc("Witness1")
    await link(a, w1)
    # A second node requires W1 (and, first, an unknown witness too).
    other = SigningKey(b"\x05" * 32).node_id
    r = await inproc("Reader", settings={("witness", "require"): [w1.node.node_id, other],
                                         ("witness", "quorum"): 1,
                                         ("witness", "cosign"): False})
    await link(r, w1)
    await link(r, a)
    await a.node.publish("air", TYPE, [{"n": 1}])
    (cp,) = await a.node.checkpoints.checkpoint_now()

    async def trusted() -> bool:
        await w1.node.witness.drain()
        t = await r.node.witness.trust(a.node.public_key, "air")
        return t is not None and t[2]

    await eventually(trusted, timeout=30)
    await r.node.witness.refresh(a.node.public_key, "air")
    st = r.node.status()["witness"]
    assert st["quorum"] == 1 and st["untrusted_count"] == 0
    assert not r.node.witness.cosigns_for(a.node.public_key)  # cosign = false
    assert cosigners(r, a, "air", cp.size) == {w1.node.public_key}
    metrics = r.node.metrics.render().decode()
    assert "citynode_checkpoints_untrusted 0.0" in metrics


async def show(a: InProc, to: InProc, root: bytes, size: int = 4) -> cps.Checkpoint:
    """``a``'s key signs a tree of ``size`` with ``root`` and shows it to ``to`` only."""
    cp = cps.sign_checkpoint(a.node.key, "w", size, root, a.node.now_ms())
    client = PeerClient(a.node.key, to.url, node_id=to.node.node_id,
                        fingerprint=to.node.identity.cert_fingerprint)
    try:
        out = json.loads(await client.request("POST", "/v1/checkpoints", cp.envelope))
        assert out["result"] == "new"
    finally:
        await client.close()
    return cp


async def test_two_roots_of_one_size_arriving_together_are_a_split_view(
        inproc: Make) -> None:
    """The two sides of a split view reaching a node at the same moment (from two
    partners): one is taken, the other proves the split view -- not both taken as new
    and passed on (each finding no other held yet)."""
    a = await inproc("Origin")
    w = await inproc("Witness")
    await link(a, w)
    now = a.node.now_ms()
    x1, x2 = (cps.sign_checkpoint(a.node.key, "w", 4, root, now)
              for root in (b"\x07" * 32, b"\x08" * 32))
    got = await asyncio.gather(*(w.node.checkpoints.ingest_checkpoint(x.envelope, None)
                                 for x in (x1, x2)))
    assert sorted(got) == ["new", "split-view"]
    (held,) = [r for s, r, _e in w.node.storage.checkpoints(a.node.public_key, "w")
               if s == 4]
    assert held == (x1.root if got[0] == "new" else x2.root)
    assert [(r.kind, r.seq) for r in w.node.storage.fork_proofs()] == [("split-view", 4)]


async def test_a_checkpoint_taken_while_a_recovery_purges_is_judged_by_the_new_log(
        inproc: Make, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint opened under the key log before a recovery, still being taken when
    the recovery's purge runs, is judged again under the feed's lock: refused, never
    stored after the purge (where it would stand as the feed's liveness statement)."""
    a = await inproc("Origin")
    w = await inproc("Witness")
    await link(a, w)
    ck = w.node.checkpoints
    cp = cps.sign_checkpoint(a.node.key, "w", 9, b"\x11" * 32, a.node.now_ms())
    assert cp.key is not None  # signed by a key the origin's log names (cn2)
    parked, go = asyncio.Event(), asyncio.Event()
    held = ck.held

    async def slow_held(origin: bytes, feed: str) -> list[tuple[int, bytes, bytes]]:
        parked.set()
        await go.wait()
        return await held(origin, feed)

    monkeypatch.setattr(ck, "held", slow_held)
    taking = asyncio.ensure_future(ck.ingest_checkpoint(cp.envelope, None))
    await parked.wait()  # opened (the log let that key sign it) and holding the lock
    monkeypatch.setattr(ck, "held", held)
    # The recovery lands: from now on the log refuses that key's statement.
    monkeypatch.setattr(ck, "_refused", lambda env, now: True)
    purge = asyncio.ensure_future(ck.drop_refused(a.node.public_key))
    go.set()
    with pytest.raises(InvalidRecord) as err:
        await taking
    assert err.value.reason == "beyond_last_good"
    await purge
    assert w.node.storage.checkpoints(a.node.public_key, "w") == []
    assert ck.newest(a.node.public_key, "w") is None


async def test_a_split_view_between_witnesses_ends_proven_at_both(inproc: Make) -> None:
    """The origin shows one root of size 4 to W1 and another to W2: each cosigns what
    it was shown, and once they exchange cosignatures both hold the split-view proof,
    refuse to cosign the other, and count it on the origin."""
    a, w1, w2 = await three(inproc)
    x1 = await show(a, w1, b"\x07" * 32)
    x2 = await show(a, w2, b"\x08" * 32)

    async def both_proven() -> bool:
        for n in (w1, w2):
            await n.node.witness.drain()
        return all(any(r.kind == "split-view" and r.seq == 4
                       for r in n.node.storage.fork_proofs()) for n in (w1, w2))

    await eventually(both_proven, timeout=30)
    for n, mine, other in [(w1, x1, x2), (w2, x2, x1)]:
        (row,) = [r for r in n.node.storage.fork_proofs() if r.kind == "split-view"]
        ca, cb = cps.verify_split_view(cps.SplitViewProof.decode(row.proof), Verifier(),
                                       n.node.policy.keys.state)
        assert {ca.root, cb.root} == {x1.root, x2.root}
        # It cosigned what it was shown first, never the other root.
        assert cosigners(n, a, "w", 4) == {n.node.public_key}
        held = n.node.storage.cosignatures(a.node.public_key, "w")
        assert {r for _s, r, _w, _e in held} == {mine.root}
        link_a = n.node.partners.get(a.node.public_key)
        assert link_a is not None and link_a.invalid.get("split_view", 0) >= 1
        assert other.root not in {r for _s, r, _e in n.node.storage.checkpoints(
            a.node.public_key, "w")}
        assert n.node.witness.status()["refused"].get("split_view", 0) >= 1


async def post(sender: InProc, to: InProc, body: bytes) -> dict[str, Any]:
    client = PeerClient(sender.node.key, to.url, node_id=to.node.node_id,
                        fingerprint=to.node.identity.cert_fingerprint)
    try:
        return dict(json.loads(await client.request("POST", "/v1/cosignatures", body)))
    finally:
        await client.close()


async def test_bad_cosignatures_are_refused_with_reasons_counted_on_the_partner(
        inproc: Make) -> None:
    off = {("witness", "cosign"): False}  # only the cosignatures posted here
    # W1 is a witness (of another origin only, so it cosigns nothing of A's): it takes
    # its partners' cosignatures, and judges each.
    elsewhere = {("witness", "cosign_for"): [SigningKey(b"\x0b" * 32).node_id]}
    a, w1, w2 = await three(inproc, w1=elsewhere, w2=off)
    await a.node.publish("air", TYPE, [{"n": i} for i in range(3)])
    (cp,) = await a.node.checkpoints.checkpoint_now()
    now = a.node.now_ms()
    w2key = w2.node.key
    me2 = w2.node.public_key
    stranger = SigningKey(b"\x09" * 32)
    good = cs.sign_cosignature(w2key, me2, cp, now)
    bad_sig = bytearray(good.envelope)
    bad_sig[-1] ^= 1
    other = cps.sign_checkpoint(a.node.key, "air", 2, b"\x01" * 32, now)
    # A witness W1 does not know, passed on by W2 (a relay, as any partner may be):
    # dropped before its signature is checked, and nothing against W2.
    unknown = cs.sign_cosignature(stranger, stranger.public_key, cp, now).envelope
    cases = {
        "bad_cosignature": bytes(bad_sig),
        "future_time": cs.sign_cosignature(w2key, me2, cp, now + 3_600_000).envelope,
        "wrong_checkpoint": cs.sign_cosignature(w2key, me2, other, now).envelope,
        "wrong_key": cs.sign_cosignature(stranger, me2, cp, now).envelope,
    }
    body = cs.CosignedCheckpoint(cp.envelope, (*cases.values(), unknown)).encode()
    out = await post(w2, w1, body)
    assert out["stored"] == 0 and out["ignored"] == 1
    assert out["rejected"] == dict.fromkeys(cases, 1)
    link = w1.node.partners.get(me2)
    assert link is not None
    assert {k: link.invalid.get(k) for k in cases} == dict.fromkeys(cases, 1)
    assert "not_witness" not in link.invalid
    assert w1.node.storage.cosignatures(a.node.public_key, "air") == []
    # An oversized batch (65 cosignatures) or garbage: refused whole, counted.
    reasons = []
    # (encode refuses 65 itself: built by hand, as a hostile partner would.)
    for junk in [encoding.encode({"checkpoint": cp.envelope,
                                  "cosignatures": [good.envelope] * 65}),
                 b"\x93\x01\x02"]:
        try:
            await post(w2, w1, junk)
        except PeerRejected as exc:
            assert exc.status == 400
            reasons.append(exc.reason)
        else:
            raise AssertionError("a malformed batch was taken")
    assert reasons[0] == "bad_field"
    for reason in set(reasons):
        assert link.invalid.get(reason) == reasons.count(reason)
    # ... and the same partner's honest cosignature still goes through, once.
    out = await post(w2, w1, cs.CosignedCheckpoint(cp.envelope, (good.envelope,)).encode())
    assert out["stored"] == 1 and out["rejected"] == {}
    out = await post(w2, w1, cs.CosignedCheckpoint(cp.envelope, (good.envelope,)).encode())
    assert out["stored"] == 0 and out["known"] == 1
    assert cosigners(w1, a, "air", 3) == {me2}


async def test_a_cosignature_of_a_non_witness_is_refused_and_counted_on_its_sender(
        inproc: Make) -> None:
    """Review S1: W1 cosigns nothing and requires nobody, so it has no reason to take a
    partner's cosignature: W2's own is refused ``not_witness`` before its signature is
    checked, and neither stored nor relayed; it is not counted on W2 (an honest witness
    sends its cosignatures to every partner: counted, it raised invalid-input alerts on
    honest partners). A node never takes the origin's cosignature of its own checkpoint
    either (it would pose as a second observer), even from a witness it requires; sent
    by the origin itself (never honest) that is counted on it. A witness it requires,
    or any partner's when it is the origin, is taken."""
    off = {("witness", "cosign"): False}
    a, w1, w2 = await three(inproc, w1=off, w2=off)
    me1, me2 = w1.node.public_key, w2.node.public_key
    await a.node.publish("air", TYPE, [{"n": i} for i in range(3)])
    (cp,) = await a.node.checkpoints.checkpoint_now()
    now = a.node.now_ms()
    own = cs.sign_cosignature(w2.node.key, me2, cp, now)
    out = await post(w2, w1, cs.CosignedCheckpoint(cp.envelope, (own.envelope,)).encode())
    assert out["rejected"] == {"not_witness": 1} and out["stored"] == 0, out
    w2_link = w1.node.partners.get(me2)
    assert w2_link is not None and w2_link.invalid == {}
    assert not w1.node.witness.known_witness(me2, a.node.public_key)
    assert w1.node.storage.cosignatures(a.node.public_key, "air") == []
    assert w1.node.status()["witness"]["refused"] == {"not_witness": 1}  # (the status)
    # The origin's cosignature of its own checkpoint: refused from the origin itself,
    # counted on it; passed on by W2 (a relay), dropped and counted on nobody.
    selfie = cs.sign_cosignature(a.node.key, a.node.public_key, cp, now).envelope
    body = cs.CosignedCheckpoint(cp.envelope, (selfie,)).encode()
    out = await post(a, w1, body)
    assert out["rejected"] == {"not_witness": 1}, out
    a_link = w1.node.partners.get(a.node.public_key)
    assert a_link is not None and a_link.invalid == {"not_witness": 1}
    assert w1.node.status()["witness"]["refused"] == {"not_witness": 2}
    out = await post(w2, w1, body)
    assert out["rejected"] == {} and out["ignored"] == 1, out
    assert w2_link.invalid == {}
    # The origin takes its partners' cosignatures of its checkpoints (it serves and
    # relays them), whatever its own [witness] settings.
    out = await post(w2, a, cs.CosignedCheckpoint(cp.envelope, (own.envelope,)).encode())
    assert out["stored"] == 1 and out["rejected"] == {}, out
    assert cosigners(a, a, "air", cp.size) == {me2}
    # A node requiring W2 takes its cosignature, but never the origin's own, even when
    # it requires the origin too.
    r = await inproc("Reader", settings={
        ("witness", "require"): [w2.node.node_id, a.node.node_id],
        ("witness", "quorum"): 1, ("witness", "cosign"): False})
    await link(r, a)
    await link(r, w2)
    out = await post(a, r, body)
    assert out["rejected"] == {"not_witness": 1}, out
    out = await post(w2, r, cs.CosignedCheckpoint(cp.envelope, (own.envelope,)).encode())
    assert out["rejected"] == {}, out
    assert cosigners(r, a, "air", cp.size) == {me2}
    assert me1 not in cosigners(r, a, "air", cp.size)


async def test_a_witness_without_the_records_fetches_the_proof_and_refuses_a_bad_one(
        inproc: Make) -> None:
    """W lists A as a partner, A does not list W: W holds none of A's records (A sends
    it nothing) and asks A for each consistency proof (a signed public read). A tree
    that does not extend the one cosigned is refused, counted on A; an older checkpoint
    arriving late is refused without counting."""
    a = await inproc("Origin")
    w = await inproc("Witness")
    await w.node.add_partner(a.url, a.node.node_id)
    await a.node.publish("air", TYPE, [{"n": i} for i in range(3)])
    (cp3,) = await a.node.checkpoints.checkpoint_now()
    await a.node.publish("air", TYPE, [{"n": i} for i in range(3, 8)])
    (cp8,) = await a.node.checkpoints.checkpoint_now()
    await a.node.publish("air", TYPE, [{"n": i} for i in range(8, 10)])
    bogus = cps.sign_checkpoint(a.node.key, "air", 10, b"\x05" * 32, a.node.now_ms())
    role = w.node.witness
    assert role.cosigns_for(a.node.public_key) and not role.cosigns_for(w.node.public_key)
    assert await role.cosign(cp3, a.node.public_key) == "cosigned"
    assert await role.cosign(cp3, a.node.public_key) == "known"
    assert w.node.storage.head(a.node.public_key, "air") is None  # no records here
    assert await role.cosign(cp8, a.node.public_key) == "cosigned"
    # Each checkpoint cosigned is kept with its cosignature.
    assert [s for s, _r, _e in w.node.storage.checkpoints(a.node.public_key, "air")] == [
        3, 8]
    assert w.node.storage.last_cosigned(w.node.public_key, a.node.public_key,
                                        "air") == (8, cp8.root)
    assert await role.cosign(bogus, a.node.public_key) == "not_consistent"
    assert await role.cosign(cp3, a.node.public_key) == "checkpoint_regress"
    link = w.node.partners.get(a.node.public_key)
    assert link is not None and link.invalid.get("not_consistent") == 1
    assert "checkpoint_regress" not in link.invalid
    assert role.status()["refused"] == {"not_consistent": 1}
    assert w.node.storage.latest_cosigned(w.node.public_key, 10) == [
        (a.node.public_key, "air", 8, cp8.root, w.node.storage.cosignatures(
            a.node.public_key, "air", 8)[0][3])]
    # No partner to ask, no records: not cosigned now, nothing counted.
    w.node.partners.links.pop(a.node.public_key)
    cp10 = cps.sign_checkpoint(a.node.key, "air", 10, b"\x06" * 32, a.node.now_ms())
    assert await role.cosign(cp10, a.node.public_key) == "no_proof"
    assert not role.cosigns_for(a.node.public_key)


async def test_the_queue_keeps_the_newest_checkpoint_of_each_feed_it_witnesses(
        inproc: Make) -> None:
    a = await inproc("Origin")
    b = await inproc("Other")
    w = await inproc("Witness", settings={("witness", "cosign_for"): [a.node.node_id]})
    await link(a, w)
    await link(b, w)
    role = w.node.witness
    assert role.cosigns_for(a.node.public_key) and not role.cosigns_for(b.node.public_key)
    now = a.node.now_ms()
    c1 = cps.sign_checkpoint(a.node.key, "q", 1, b"\x01" * 32, now)
    c2 = cps.sign_checkpoint(a.node.key, "q", 2, b"\x02" * 32, now)
    theirs = cps.sign_checkpoint(b.node.key, "q", 1, b"\x01" * 32, now)
    mine = cps.sign_checkpoint(w.node.key, "q", 1, b"\x01" * 32, now)
    # Synchronous: the cosigning task runs only when this test next awaits.
    assert role.running  # the leader's witness task
    role.running = False  # as in a process that does not lead: nothing is queued
    role.checkpoint_seen(c2, a.node.public_key, "new")
    assert role._queue == {}
    role.running = True
    role.checkpoint_seen(c2, a.node.public_key, "new")
    role.checkpoint_seen(c1, a.node.public_key, "known")  # older: the newer one stays
    role.checkpoint_seen(theirs, b.node.public_key, "new")  # not in cosign_for
    role.checkpoint_seen(mine, a.node.public_key, "new")  # our own: never cosigned
    assert {k: v[0].size for k, v in role._queue.items()} == {(a.node.public_key, "q"): 2}
    role._queue.clear()
    # A split view is counted on the origin, not on the partner that passed it on.
    role.checkpoint_seen(c1, b.node.public_key, "split-view")
    la, lb = w.node.partners.get(a.node.public_key), w.node.partners.get(b.node.public_key)
    assert la is not None and lb is not None
    assert la.invalid.get("split_view") == 1 and "split_view" not in lb.invalid


async def test_a_checkpoint_short_of_the_quorum_is_shown_untrusted(inproc: Make) -> None:
    a = await inproc("Origin")
    w1 = await inproc("Witness1")
    # A required cn2 witness that never cosigns, whose key log is never held.
    other = keylog.identity_id(b"\x06" * 32)
    r = await inproc("Reader", settings={("witness", "require"): [w1.node.node_id, other],
                                         ("witness", "cosign"): False})
    for x, y in [(a, w1), (r, w1), (r, a)]:
        await link(x, y)
    await a.node.publish("air", TYPE, [{"n": 1}, {"n": 2}])
    (cp,) = await a.node.checkpoints.checkpoint_now()

    async def one_of_two() -> bool:
        await w1.node.witness.drain()
        return await r.node.witness.trust(a.node.public_key, "air") == (cp.size, 1, False)

    await eventually(one_of_two, timeout=30)
    await r.node.witness.refresh(a.node.public_key, "air")
    st = r.node.status()["witness"]
    assert st["quorum"] == 2 and st["untrusted_count"] == 1
    # The required witness whose key log is not held is named (W1's came with its
    # partnership): none of its cosignatures could be checked yet.
    assert st["require_key_log_missing"] == [other]
    assert st["untrusted"] == [{"origin": a.node.node_id, "feed": "air", "size": cp.size,
                                "cosigned": 1}]
    assert "citynode_checkpoints_untrusted 1.0" in r.node.metrics.render().decode()
    (row,) = await r.node.witness.cosigned(a.node.public_key, "air", cp.size)
    assert row["trusted"] is False and [w for w, _e in row["cosignatures"]] == [
        w1.node.public_key]


async def test_another_root_held_at_the_size_is_a_split_view_to_the_witness(
        inproc: Make) -> None:
    """A root of some size held (not cosigned) and another of that size to cosign: the
    witness refuses it as a split view and keeps the proof."""
    a = await inproc("Origin")
    w = await inproc("Witness", settings={("witness", "cosign"): False})
    await link(a, w)
    now = a.node.now_ms()
    x = cps.sign_checkpoint(a.node.key, "z", 2, b"\x0a" * 32, now)
    y = cps.sign_checkpoint(a.node.key, "z", 2, b"\x0b" * 32, now)
    await asyncio.wrap_future(w.node.storage.put_checkpoint(
        a.node.public_key, "z", 2, x.root, x.envelope))
    assert await w.node.witness.cosign(y, a.node.public_key) == "split_view"
    assert [r.kind for r in w.node.storage.fork_proofs()] == ["split-view"]
    assert w.node.storage.cosignatures(a.node.public_key, "z") == []


async def test_the_cosignatures_read_in_msgpack_and_its_refusals(inproc: Make) -> None:
    import msgpack

    a = await inproc("Origin")
    w = await inproc("Witness")
    await link(a, w)
    await a.node.publish("air", TYPE, [{"n": 1}])
    (cp,) = await a.node.checkpoints.checkpoint_now()

    async def cosigned() -> bool:
        await w.node.witness.drain()
        return cosigners(a, a, "air", cp.size) == {w.node.public_key}

    await eventually(cosigned, timeout=30)
    base = f"{a.url}/v1/cosignatures?origin={a.node.node_id}"
    async with a.session.get(base + "&feed=air") as r:
        assert r.status == 200 and r.content_type == "application/msgpack"
        (item,) = msgpack.unpackb(await r.read())
    cc = cs.CosignedCheckpoint.decode(item)
    assert cc.checkpoint == cp.envelope and len(cc.cosignatures) == 1
    keys = {w.node.public_key: cs.witness_keys(w.node.public_key,
                                               a.node.policy.keys.state(w.node.public_key))}
    assert cs.check_quorum(cp, cc.cosignatures, keys, 1, verifier=Verifier()).ok
    for query, status in [("&feed=nothing", 404), ("", 400), ("&feed=air&size=x", 400),
                          ("&feed=air&size=99", 200)]:
        async with a.session.get(base + query) as r:
            assert r.status == status, (query, await r.text())


async def test_a_rotating_witness_cosigns_again_and_the_quorum_holds(inproc: Make) -> None:
    """B1/S3: after a witness rotates, only its new key counts (a node that required it
    stops counting the old cosignature as soon as it holds the new log); the witness
    cosigns its latest checkpoint again with the new key and the quorum holds."""
    a = await inproc("Origin")
    w1 = await inproc("Witness1", next_key_on_disk=True)  # rotates unattended
    r = await inproc("Reader", settings={("witness", "require"): [w1.node.node_id],
                                         ("witness", "quorum"): 1,
                                         ("witness", "cosign"): False})
    for x, y in [(a, w1), (r, w1), (r, a)]:
        await link(x, y)
    await a.node.publish("air", TYPE, [{"n": 1}, {"n": 2}])
    (cp,) = await a.node.checkpoints.checkpoint_now()
    me = w1.node.public_key

    async def held_by(key: bytes) -> bool:
        await w1.node.witness.drain()
        rows = r.node.storage.cosignatures(a.node.public_key, "air", cp.size)
        t = await r.node.witness.trust(a.node.public_key, "air")
        return (t is not None and t[2] and len(rows) == 1
                and cs.cosignature_fields(rows[0][3]) == (me, key))

    old_key = w1.node.key.public_key
    await eventually(lambda: held_by(old_key), timeout=30)
    (row,) = r.node.storage.cosignatures(a.node.public_key, "air", cp.size)
    old_env = row[3]
    await w1.node.keychanges.rotate()
    new_key = w1.node.key.public_key
    assert new_key != old_key
    await eventually(lambda: held_by(new_key), timeout=30)
    # The old one, as held before, no longer counts at the reader or in a quorum.
    assert not r.node.witness._counts_for(me, old_env)
    keys = {me: cs.witness_keys(me, r.node.policy.keys.state(me))}
    assert keys[me] == {new_key}
    q = cs.check_quorum(cp, [old_env], keys, 1, verifier=Verifier())
    assert not q.ok and q.rejected == ((0, "wrong_key"),)
    # The witness's own row was replaced too.
    (own,) = w1.node.storage.cosignatures(a.node.public_key, "air", cp.size)
    assert cs.cosignature_fields(own[3]) == (me, new_key)


async def test_a_cut_feed_rebases_the_witness_and_lost_is_counted(inproc: Make) -> None:
    """S2: a recovery's cut (Storage.truncate) drops the cosignatures above it with the
    checkpoints: the witness goes on from the last checkpoint it cosigned at or below
    the cut. A cosigned checkpoint no longer held is "lost", counted and shown."""
    a = await inproc("Origin")
    w = await inproc("Witness")
    await link(a, w)
    await a.node.publish("air", TYPE, [{"n": i} for i in range(3)])
    (cp3,) = await a.node.checkpoints.checkpoint_now()
    me, origin = w.node.public_key, a.node.public_key

    async def cosigned(size: int) -> bool:
        await w.node.witness.drain()
        last = w.node.storage.last_cosigned(me, origin, "air")
        return last is not None and last[0] == size

    await eventually(lambda: cosigned(3), timeout=30)
    await a.node.publish("air", TYPE, [{"n": i} for i in range(3, 6)])
    (cp6,) = await a.node.checkpoints.checkpoint_now()
    await eventually(lambda: cosigned(6), timeout=30)
    assert await asyncio.wrap_future(w.node.storage.truncate(origin, "air", 3)) == 3
    assert w.node.storage.last_cosigned(me, origin, "air") == (3, cp3.root)
    assert w.node.storage.cosignatures(origin, "air", min_size=4) == []
    # Not lost: the next checkpoint is cosigned from size 3 (the proof fetched).
    assert await w.node.witness.cosign(cp6, origin) == "cosigned"
    # A cosignature of a checkpoint not held: lost, counted, in status and the metric.
    junk = cs.sign_cosignature(w.node.key, me, cps.sign_checkpoint(
        a.node.key, "air", 9, b"\x09" * 32, a.node.now_ms()), a.node.now_ms())
    await asyncio.wrap_future(w.node.storage.put_cosignature(
        origin, "air", 9, b"\x09" * 32, me, junk.time, junk.envelope))
    assert await w.node.witness.cosign(cp6, origin) == "lost"
    assert w.node.status()["witness"]["refused"].get("lost") == 1
    assert 'citynode_cosign_refused_total{reason="lost"} 1.0' in \
        w.node.metrics.render().decode()


async def test_a_cosignature_by_a_witness_whose_log_is_not_held_fetches_the_log(
        inproc: Make) -> None:
    """A required cn2 witness whose key log this node does not hold (no partner here):
    its cosignature, passed on by a partner, makes the node fetch the log from that
    partner, then counts (instead of wrong_key)."""
    a = await inproc("Origin")
    w1 = await inproc("Witness1")
    await link(a, w1)
    me = w1.node.public_key
    await a.node.publish("air", TYPE, [{"n": 1}])
    (cp,) = await a.node.checkpoints.checkpoint_now()

    async def at_origin() -> bool:
        await w1.node.witness.drain()
        return me in cosigners(a, a, "air", cp.size)

    await eventually(at_origin, timeout=30)
    (row,) = [x for x in a.node.storage.cosignatures(a.node.public_key, "air", cp.size)
              if x[2] == me]
    # The reader is made now, partner of the origin only: it knows W1 by its id.
    r = await inproc("Reader", settings={("witness", "require"): [w1.node.node_id],
                                         ("witness", "quorum"): 1,
                                         ("witness", "cosign"): False})
    await r.node.add_partner(a.url, a.node.node_id)
    assert r.node.policy.keys.state(me) is None
    await a.node.add_partner(r.url, r.node.node_id)
    out = await post(a, r, cs.CosignedCheckpoint(cp.envelope, (row[3],)).encode())
    # A may have sent it first, as its link to R opened (the newest checkpoint with the
    # cosignatures held): then this one is known. Either way the log was fetched.
    assert out["stored"] + out["known"] == 1 and out["rejected"] == {}, out
    assert r.node.policy.keys.state(me) is not None
    assert await r.node.witness.trust(a.node.public_key, "air") == (cp.size, 1, True)


async def test_cosignatures_are_relayed_to_a_reader_that_requires_non_partners(
        inproc: Make) -> None:
    """W1 and W2 witness A and are partners of A only (not of each other); R is a
    partner of A only and requires W1 and W2 (quorum 2). A passes on each witness's
    cosignature it verified: R fetches the witnesses' key logs from A and ends
    trusting A's checkpoint. Neither witness knows the other (no partner, not
    required): what A relays of it is dropped unchecked, and not held against A."""
    a = await inproc("Origin")
    w1 = await inproc("Witness1")
    w2 = await inproc("Witness2")
    for w in (w1, w2):
        await link(a, w)
    r = await inproc("Reader", settings={
        ("witness", "require"): [w1.node.node_id, w2.node.node_id],
        ("witness", "quorum"): 2, ("witness", "cosign"): False})
    await link(a, r)
    await a.node.publish("air", TYPE, [{"n": i} for i in range(3)])
    (cp,) = await a.node.checkpoints.checkpoint_now()
    both = {w1.node.public_key, w2.node.public_key}

    async def everywhere() -> bool:
        for w in (w1, w2):
            await w.node.witness.drain()
        return all(cosigners(n, a, "air", cp.size) == both for n in (a, r))

    await eventually(everywhere, timeout=30)
    assert await r.node.witness.trust(a.node.public_key, "air") == (cp.size, 2, True)
    st = r.node.status()["witness"]
    assert st["require_key_log_missing"] == []
    for w, other in [(w1, w2), (w2, w1)]:
        assert other.node.public_key not in cosigners(w, a, "air", cp.size)
    # Relayed by A, an honest relay: nothing counted against it anywhere.
    for n in (r, w1, w2):
        p = n.node.partners.get(a.node.public_key)
        assert p is not None
        assert not p.invalid, p.invalid


async def test_a_reader_that_links_after_the_cosigning_is_sent_the_relayed_ones(
        inproc: Make) -> None:
    """A's checkpoint is cosigned by W1 and W2 (partners of A only) before the reader
    R exists; R, requiring both, becomes A's partner afterwards and A publishes
    nothing more: A sends R its newest checkpoint with the cosignatures it holds of it,
    and R trusts it."""
    a = await inproc("Origin")
    w1 = await inproc("Witness1")
    w2 = await inproc("Witness2")
    for w in (w1, w2):
        await link(a, w)
    await a.node.publish("air", TYPE, [{"n": i} for i in range(3)])
    (cp,) = await a.node.checkpoints.checkpoint_now()
    both = {w1.node.public_key, w2.node.public_key}

    async def at_origin() -> bool:
        for w in (w1, w2):
            await w.node.witness.drain()
        return cosigners(a, a, "air", cp.size) == both

    await eventually(at_origin, timeout=30)
    r = await inproc("Reader", settings={
        ("witness", "require"): [w1.node.node_id, w2.node.node_id],
        ("witness", "quorum"): 2, ("witness", "cosign"): False})
    await link(a, r)

    async def trusted() -> bool:
        return await r.node.witness.trust(a.node.public_key, "air") == (cp.size, 2, True)

    await eventually(trusted, timeout=30)
    assert cosigners(r, a, "air", cp.size) == both
