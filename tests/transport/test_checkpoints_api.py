"""Signed checkpoints between real in-process nodes: gossip, proofs, split views."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable, Callable
from dataclasses import replace

from citynode.config import FeedConfig
from citynode.core import checkpoints as cps
from citynode.core.keys import Verifier
from citynode.core.records import record_id
from citynode.errors import PeerRejected
from citynode.transport.client import PeerClient
from tests.conftest import InProc, eventually
from tests.core.test_checkpoints import mth

Make = Callable[..., Awaitable[InProc]]


async def _get(n: InProc, path: str) -> dict:
    async with n.session.get(n.url + path, headers={"Accept": "application/json"}) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def test_checkpoints_gossip_and_prove(inproc: Make) -> None:
    a = await inproc("Jakarta")
    b = await inproc("Seoul")
    await a.node.add_partner(b.url, b.node.node_id)
    await b.node.add_partner(a.url, a.node.node_id)
    recs = await a.node.publish("air", "org.example.Test", [{"n": i} for i in range(10)])
    (cp10,) = await a.node.checkpoints.checkpoint_now()
    more = await a.node.publish("air", "org.example.Test", [{"n": i} for i in range(10, 13)])
    (cp13,) = await a.node.checkpoints.checkpoint_now()
    assert cp10.size == 10 and cp13.size == 13
    ids = [r.id for r in recs + more]
    # the RFC 9162 definition, written out in the test (not the code under test)
    assert cp13.root == mth(ids)

    origin = a.node.node_id

    async def b_has_both() -> bool:
        # 404 until B holds the feed and knows (from A's newer card) that it is public.
        async with b.session.get(f"{b.url}/v1/checkpoints?origin={origin}&feed=air",
                                 headers={"Accept": "application/json"}) as r:
            if r.status == 404:
                return False
            assert r.status == 200, await r.text()
            out = await r.json()
        return [c["size"] for c in out["checkpoints"]] == [10, 13]

    await eventually(b_has_both, timeout=20)
    # An inclusion proof served by the replica verifies against the origin's signature.
    p = await _get(b, f"/v1/proofs/inclusion?id={ids[4].hex()}")
    cp = cps.open_checkpoint(base64.b64decode(p["checkpoint"]), verifier=Verifier(),
                             key_states=a.node.policy.keys.state)
    assert cp.size == 13 and cp.origin == a.node.public_key
    cps.verify_inclusion(ids[4], p["index"], p["size"], [bytes.fromhex(x) for x in p["path"]],
                         cp.root)
    # At a size given, the origin's checkpoint of that size comes with the proof too.
    p10 = await _get(b, f"/v1/proofs/inclusion?id={ids[4].hex()}&size=10")
    assert p10["size"] == 10 and base64.b64decode(p10["checkpoint"]) == cp10.envelope
    p11 = await _get(b, f"/v1/proofs/inclusion?id={ids[4].hex()}&size=11")
    assert p11["checkpoint"] is None  # none signed of that size
    c = await _get(b, f"/v1/proofs/consistency?origin={origin}&feed=air&old=10&new=13")
    cps.verify_consistency(10, 13, cp10.root, cp13.root, [bytes.fromhex(x) for x in c["path"]])
    assert base64.b64decode(c["old_checkpoint"]) == cp10.envelope
    assert base64.b64decode(c["new_checkpoint"]) == cp13.envelope
    c = await _get(b, f"/v1/proofs/consistency?origin={origin}&feed=air&old=11&new=13")
    assert c["old_checkpoint"] is None
    assert record_id(recs[0].body) == ids[0]


async def show_split_view(a: InProc, b: InProc) -> tuple[cps.Checkpoint, bytes]:
    """Partners ``a`` and ``b``: ``a`` publishes 4 records on feed ``w`` and
    checkpoints them; once ``b`` holds that checkpoint, ``a``'s key signs another
    tree of the same size (root 07..07) and shows it to ``b``. Returns the honest
    checkpoint and ``b``'s answer."""
    await a.node.add_partner(b.url, b.node.node_id)
    await b.node.add_partner(a.url, a.node.node_id)
    await a.node.publish("w", "org.example.Test", [{"n": i} for i in range(4)])
    (honest,) = await a.node.checkpoints.checkpoint_now()

    async def b_has() -> bool:
        return len(b.node.storage.checkpoints(a.node.public_key, "w")) == 1

    await eventually(b_has, timeout=20)
    forged = cps.sign_checkpoint(a.node.key, "w", 4, b"\x07" * 32, a.node.now_ms())
    client = PeerClient(a.node.key, b.url, node_id=b.node.node_id,
                        fingerprint=b.node.identity.cert_fingerprint)
    try:
        return honest, await client.request("POST", "/v1/checkpoints", forged.envelope)
    finally:
        await client.close()


async def test_split_view_is_detected_and_kept(inproc: Make) -> None:
    honest, out = await show_split_view(a := await inproc("Surabaya"),
                                        b := await inproc("Singapore"))
    assert b'"split-view"' in out
    (row,) = b.node.storage.fork_proofs()
    assert row.kind == "split-view" and row.seq == 4
    ca, cb = cps.verify_split_view(cps.SplitViewProof.decode(row.proof), Verifier(),
                                   b.node.policy.keys.state)
    assert {ca.root, cb.root} == {honest.root, b"\x07" * 32}
    # ... and B forwards the proof to its partners (A here).

    async def a_knows() -> bool:
        await asyncio.sleep(0)
        return any(r.kind == "split-view" for r in a.node.storage.fork_proofs())

    await eventually(a_knows, timeout=20)


async def test_a_proof_is_not_served_beside_a_checkpoint_that_disagrees(inproc: Make) -> None:
    """If the first checkpoint of a size a node was shown disagrees with the records it
    holds, a proof at that size is a 409, never the records' root beside the origin's
    signature on another root (which a client might take as an anchor)."""
    slow = {("checkpoints", "interval_seconds"): 3600.0}
    a = await inproc("Surabaya", settings=slow)
    b = await inproc("Singapore", settings=slow)
    await a.node.add_partner(b.url, b.node.node_id)
    await b.node.add_partner(a.url, a.node.node_id)
    recs = await a.node.publish("w", "org.example.Test", [{"n": i} for i in range(4)])

    async def b_has_records() -> bool:
        return b.node.heads.get((a.node.public_key, "w")) is not None and \
            b.node.heads[(a.node.public_key, "w")].seq == 4

    await eventually(b_has_records, timeout=20)
    forged = cps.sign_checkpoint(a.node.key, "w", 4, b"\x07" * 32, a.node.now_ms())
    client = PeerClient(a.node.key, b.url, node_id=b.node.node_id,
                        fingerprint=b.node.identity.cert_fingerprint)
    try:
        await client.request("POST", "/v1/checkpoints", forged.envelope)
    finally:
        await client.close()
    assert [s for s, _r, _e in b.node.storage.checkpoints(a.node.public_key, "w")] == [4]
    origin = a.node.node_id
    for path in (f"/v1/proofs/inclusion?id={recs[1].id.hex()}&size=4",
                 f"/v1/proofs/inclusion?id={recs[1].id.hex()}",
                 f"/v1/proofs/consistency?origin={origin}&feed=w&old=2&new=4"):
        # As B's operator: an anonymous caller gets 404 until B has A's card listing the
        # new feed as public (unknown access is never public), a race under load.
        async with b.session.get(b.url + path, headers={"Accept": "application/json",
                                                        **b.auth()}) as r:
            assert r.status == 409, (path, r.status, await r.text())
            assert "split view" in (await r.json())["message"]
        # The binary (msgpack) answer is refused the same way.
        async with b.session.get(b.url + path, headers=b.auth()) as r:
            assert r.status == 409, (path, r.status)
    # A size with no checkpoint is served, unanchored.
    async with b.session.get(f"{b.url}/v1/proofs/inclusion?id={recs[1].id.hex()}&size=3",
                             headers={"Accept": "application/json", **b.auth()}) as r:
        assert r.status == 200, await r.text()
        p = await r.json()
    assert p["checkpoint"] is None and p["root"] == cps.root_of([r.id for r in recs[:3]]).hex()


async def test_a_checkpoint_covers_what_is_committed_while_a_publish_is_in_flight(
        inproc: Make) -> None:
    """Under steady publishing a commit is often under way, its head already moved in
    memory: the checkpoint is signed at the committed size (the tree on disk), not
    refused until memory and disk meet."""
    from citynode.core.chain import FeedHead

    a = await inproc("Lima")
    recs = await a.node.publish("air", "org.example.Test", [{"n": i} for i in range(5)])
    key = (a.node.public_key, "air")
    # As when the next publish's records are signed and queued, not yet committed.
    a.node.heads[key] = FeedHead(7, b"\x09" * 32)
    try:
        (cp,) = await a.node.checkpoints.checkpoint_now()
    finally:
        a.node.heads[key] = FeedHead(5, recs[-1].id)
    assert cp.size == 5 and cp.root == mth([r.id for r in recs])


async def test_liveness_statements_backwards_or_from_the_future_are_refused(
        inproc: Make) -> None:
    """Issue 13, bad input: a checkpoint older, smaller or from the future than the
    newest statement held is refused with its own reason, counted on the partner that
    sent it, and changes nothing; a later one of the same size is a new heartbeat."""
    a = await inproc("Jakarta")
    b = await inproc("Seoul")
    await a.node.add_partner(b.url, b.node.node_id)
    await b.node.add_partner(a.url, a.node.node_id)
    recs = await a.node.publish("w", "org.example.Test", [{"n": i} for i in range(3)])
    (cp3,) = await a.node.checkpoints.checkpoint_now()
    pk = a.node.public_key

    async def b_has() -> bool:
        return b.node.checkpoints.newest(pk, "w") == cp3.envelope

    await eventually(b_has, timeout=20)
    now = a.node.now_ms()
    root2 = mth([r.id for r in recs[:2]])
    client = PeerClient(a.node.key, b.url, node_id=b.node.node_id,
                        fingerprint=b.node.identity.cert_fingerprint)
    try:
        for cp, reason in [
            (cps.sign_checkpoint(a.node.key, "w", 4, b"\x04" * 32, cp3.time - 1),
             "checkpoint_older"),
            (cps.sign_checkpoint(a.node.key, "w", 2, root2, now + 1000), "checkpoint_smaller"),
            (cps.sign_checkpoint(a.node.key, "w", 9, b"\x05" * 32, now + 16 * 60_000),
             "future_time"),
        ]:
            try:
                await client.request("POST", "/v1/checkpoints", cp.envelope)
            except PeerRejected as exc:
                assert (exc.status, exc.reason) == (400, reason)
            else:
                raise AssertionError(f"{reason}: accepted")
        # Nothing changed: the same newest statement, the same checkpoints stored.
        assert b.node.checkpoints.newest(pk, "w") == cp3.envelope
        assert [s for s, _r, _e in b.node.storage.checkpoints(pk, "w")] == [3]
        link = b.node.partners.get(pk)
        assert link is not None
        assert link.invalid == {"checkpoint_older": 1, "checkpoint_smaller": 1,
                                "future_time": 1}
        # Issue 13 review: an earlier heartbeat arriving late (queued while a partner
        # was down) is stale: answered known, not counted, changing nothing.
        for late in (cps.sign_checkpoint(a.node.key, "w", 3, cp3.root, cp3.time - 1),
                     cps.sign_checkpoint(a.node.key, "w", 2, root2, cp3.time - 2)):
            out = await client.request("POST", "/v1/checkpoints", late.envelope)
            assert b'"known"' in out
        assert b.node.checkpoints.newest(pk, "w") == cp3.envelope
        assert link.invalid == {"checkpoint_older": 1, "checkpoint_smaller": 1,
                                "future_time": 1}
        assert b.node.metrics.rejected.labels("checkpoint_older")._value.get() == 1
        # A heartbeat: same size and root, later: new, held as the newest statement.
        beat = cps.sign_checkpoint(a.node.key, "w", 3, cp3.root, now + 2000)
        out = await client.request("POST", "/v1/checkpoints", beat.envelope)
        assert b'"new"' in out
        assert b.node.checkpoints.newest(pk, "w") == beat.envelope
        out = await client.request("POST", "/v1/checkpoints", beat.envelope)
        assert b'"known"' in out
    finally:
        await client.close()
    states = {(s["origin"], s["feed"]): s for s in b.node.checkpoints.states()}
    assert states[(pk, "w")]["signed_size"] == 3 and states[(pk, "w")]["head"] == 3


async def test_a_forked_own_feed_is_never_signed_again_and_one_proof_is_kept(
        inproc: Make) -> None:
    """Once a node holds a split-view proof against its own feed it signs no further
    checkpoint of it, not even a heartbeat (each would be one more split view at its
    partners); and a partner shown conflicting statements of one size again and again
    keeps one proof of it, not one per statement (hostile input must not grow storage
    without bound)."""
    await show_split_view(a := await inproc("Surabaya"),
                          b := await inproc("Singapore"))
    me = a.node.public_key

    async def a_knows() -> bool:
        await asyncio.sleep(0)
        return "w" in a.node.publisher.forked

    await eventually(a_knows, timeout=20)
    # A cadence of 2 s: a heartbeat is due every second, grown or not.
    cfg = a.node.checkpoints.config
    a.node.checkpoints.config = replace(
        cfg, feeds={**cfg.feeds, "w": FeedConfig("w", cadence_seconds=2)})
    before = a.node.checkpoints.newest(me, "w")
    await asyncio.sleep(1.2)
    assert await a.node.checkpoints.checkpoint_now() == []
    assert a.node.checkpoints.newest(me, "w") == before
    ready = await a.node.readiness()
    assert ready[1]["own_publishing"] is False  # its only own feed is forked
    assert ready[1]["own_forked"] == ["w"]
    # More conflicting statements of size 4, each a different envelope (a new time).
    client = PeerClient(a.node.key, b.url, node_id=b.node.node_id,
                        fingerprint=b.node.identity.cert_fingerprint)
    try:
        for i in range(3):
            forged = cps.sign_checkpoint(a.node.key, "w", 4, bytes([8 + i]) * 32,
                                         a.node.now_ms() + 1 + i)
            out = await client.request("POST", "/v1/checkpoints", forged.envelope)
            assert b'"split-view"' in out
    finally:
        await client.close()
    rows = [r for r in b.node.storage.fork_proofs() if r.kind == "split-view"]
    assert len(rows) == 1 and rows[0].seq == 4
