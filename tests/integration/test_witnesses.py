"""Witnesses with real ``citynode run`` processes over HTTPS (issue 12, point 8): an
origin that shows two different checkpoints of one size to two witnesses is caught as
soon as they exchange cosignatures, and an audit with a quorum of 2 fails; an honest
origin's checkpoints gather both cosignatures and the audit passes."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import pytest

from citynode.cluster import Cluster, LocalNode, set_config
from citynode.core import checkpoints as cps
from citynode.core.keys import NodeKey, parse_node_id, unseal_secret_key
from citynode.transport.client import PeerClient
from tests.conftest import eventually
from tests.integration.test_federation import FAST, TYPE, converge, expected, rec, stop_all
from tests.integration.test_key_lifetimes import cli

pytestmark = pytest.mark.integration


async def forks_at(n: LocalNode) -> list[dict[str, Any]]:
    rc, out = await asyncio.to_thread(cli, "forks", "-d", str(n.dir), "--json")
    assert rc == 0, out
    return list(json.loads(out)["forks"])


async def cosigned_by(n: LocalNode, origin: LocalNode, size: int) -> set[str]:
    """The witnesses whose cosignatures ``n`` holds of ``origin``'s checkpoint of
    ``size`` on feed test (empty: none, or no such checkpoint held yet)."""
    s = await n.session()
    async with s.get(f"{n.url}/v1/cosignatures?origin={origin.node_id}&feed=test"
                     f"&size={size}", headers={"Accept": "application/json"}) as r:
        if r.status == 404:
            return set()
        assert r.status == 200, await r.text()
        rows = (await r.json())["checkpoints"]
    return {c["witness"] for row in rows for c in row["cosignatures"]}


async def export_and_audit(src: LocalNode, origin: LocalNode, witnesses: list[LocalNode],
                           quorum: int, out: Path) -> tuple[int, dict[str, Any]]:
    rc, text = await asyncio.to_thread(cli, "export", "-d", str(src.dir), "--origin",
                                       origin.node_id, "--out", str(out), "--force")
    assert rc == 0, text
    args = ["audit", str(out), "--origin", origin.node_id, "--quorum", str(quorum),
            "--workers", "0", "--json"]
    for w in witnesses:
        args += ["--witness", w.node_id]
    rc, text = await asyncio.to_thread(cli, *args)
    return rc, json.loads(text)


def mth(ids: list[bytes]) -> bytes:
    """RFC 9162 Merkle tree hash from the definition (the root an honest origin signs)."""
    if len(ids) == 1:
        return hashlib.sha256(b"\x00" + ids[0]).digest()
    k = 1
    while k * 2 < len(ids):
        k *= 2
    return hashlib.sha256(b"\x01" + mth(ids[:k]) + mth(ids[k:])).digest()


@pytest.mark.parametrize("via_relay", [False, True], ids=["direct", "via-relay"])
async def test_two_checkpoints_of_one_size_shown_to_two_witnesses(
        cluster: Cluster, tmp_path: Path, via_relay: bool) -> None:
    """A's key (held by a test process, as a thief or a lying operator would) signs two
    trees of size 4: the honest one shown to W1, another shown to W2, which are not
    partners yet (and A is down: nothing relays one to the other). Each cosigns what
    it was shown. Then W1 and W2 meet: become partners, or (``via_relay``) both become
    partners of M, a node that witnesses nothing and relays their cosigned
    checkpoints. Both end holding the split-view proof (M too), and an audit of W1's
    bundle with a quorum of 2 fails."""
    # A signs no checkpoint of its own here: only the two the test shows.
    slow = {**FAST, ("checkpoints", "interval_seconds"): 3600.0}
    a, w1, w2, *relay = cluster.create(["A", "W1", "W2", "M"][:4 if via_relay else 3],
                                       settings=slow)
    for m in relay:
        set_config(m.dir / "node.toml", "witness", "cosign", False)
    await cluster.start()
    for x, y in [(a, w1), (a, w2), *((a, m) for m in relay)]:
        await cluster.link(x, y)
    await a.publish("test", TYPE, [rec(i) for i in range(4)])
    await converge([a, w1, w2, *relay], expected({(a.node_id, "test"): 4}), timeout=60)
    page = await w1.api("GET", f"/v1/records?origin={a.node_id}&feed=test&limit=10",
                        operator=True)
    ids = [bytes.fromhex(r["id"]) for r in page["records"]]
    assert len(ids) == 4
    await stop_all([a])
    seed = unseal_secret_key((a.dir / "node.key").read_bytes(), None)
    liar = NodeKey(seed, parse_node_id(a.node_id), a.node_id, (a.dir / "keylog").read_bytes())
    now = int(time.time() * 1000)
    honest = cps.sign_checkpoint(liar, "test", 4, mth(ids), now)
    other = cps.sign_checkpoint(liar, "test", 4, b"\x07" * 32, now)

    async def show(to: LocalNode, cp: cps.Checkpoint) -> None:
        client = PeerClient(liar, to.url, node_id=to.node_id, fingerprint=to.fingerprint)
        try:
            out = json.loads(await client.request("POST", "/v1/checkpoints", cp.envelope))
            assert out["result"] == "new", out
        finally:
            await client.close()

    await asyncio.gather(show(w1, honest), show(w2, other))
    for n in (w1, w2):
        await eventually(lambda n=n: _only(n, a), timeout=30)
    assert await forks_at(w1) == [] and await forks_at(w2) == []
    # The witnesses meet.
    for x, y in [(w1, m) for m in relay] + [(m, w2) for m in relay] or [(w1, w2)]:
        await cluster.link(x, y)

    async def both_hold_the_proof() -> bool:
        held = [await forks_at(n) for n in (w1, w2, *relay)]
        return all(any(f["kind"] == "split-view" and f["seq"] == 4
                       and f["origin"] == a.node_id for f in fs) for fs in held)

    await eventually(both_hold_the_proof, timeout=60)

    async def refused(n: LocalNode) -> bool:
        # The proof may come first (forwarded by the other witness), the other root
        # with its cosignature a moment later: that one is refused and counted.
        st = await n.api("GET", "/v1/admin/status")
        return bool(st["witness"]["refused"].get("split_view", 0) >= 1)

    # Each refused the other's root, counted on the origin: it holds its own only.
    # (Via M, whichever root M took first is the one it relays on: the other reaches
    # the far witness as the proof alone, never to be cosigned.)
    for n in (w1, w2):
        if not via_relay:
            await eventually(lambda n=n: refused(n), timeout=30)
        assert await cosigned_by(n, a, 4) == {n.node_id}
        if via_relay:
            continue
        link = next(p for p in (await n.api("GET", "/v1/admin/partners"))["partners"]
                    if p["node_id"] == a.node_id)
        assert link["invalid"].get("split_view", 0) >= 1, link
    rc, report = await export_and_audit(w1, a, [w1, w2], 2, tmp_path / "w1.bundle")
    assert rc == 1
    kinds = {f["kind"] for f in report["findings"] if f["severity"] == "error"}
    assert "split_view" in kinds and "no_quorum" in kinds, report["findings"]
    assert report["witness"]["quorum"] == 2
    # With a quorum of 1 the honest root has its cosignature: the split view alone fails.
    rc, report = await export_and_audit(w1, a, [w1, w2], 1, tmp_path / "w1.bundle")
    kinds = {f["kind"] for f in report["findings"] if f["severity"] == "error"}
    assert rc == 1 and kinds == {"split_view"}, report["findings"]
    await stop_all([w1, w2, *relay])


async def _only(n: LocalNode, origin: LocalNode) -> bool:
    return await cosigned_by(n, origin, 4) == {n.node_id}


async def test_an_honest_origin_s_checkpoints_meet_a_quorum_of_two(
        cluster: Cluster, tmp_path: Path) -> None:
    a, w1, w2 = cluster.create(["A", "W1", "W2"], settings={
        **FAST, ("checkpoints", "interval_seconds"): 1.0})
    # W1 requires both witnesses: its status says when A's checkpoints are trusted.
    set_config(w1.dir / "node.toml", "witness", "require", [w1.node_id, w2.node_id])
    await cluster.start()
    for x, y in [(a, w1), (a, w2), (w1, w2)]:
        await cluster.link(x, y)
    await a.publish("test", TYPE, [rec(i) for i in range(5)])
    await converge([a, w1, w2], expected({(a.node_id, "test"): 5}), timeout=60)

    async def both_cosigned() -> bool:
        held = [await cosigned_by(n, a, 5) for n in (a, w1)]
        return all(h == {w1.node_id, w2.node_id} for h in held)

    await eventually(both_cosigned, timeout=60)
    s = await w1.session()
    async with s.get(f"{w1.url}/v1/cosignatures?origin={a.node_id}&feed=test&size=5",
                     headers={"Accept": "application/json"}) as r:
        (row,) = (await r.json())["checkpoints"]
    assert row["trusted"] is True
    st = (await w1.api("GET", "/v1/admin/status"))["witness"]
    assert st["quorum"] == 2 and st["untrusted_count"] == 0, st
    rc, report = await export_and_audit(w1, a, [w1, w2], 2, tmp_path / "w1.bundle")
    assert rc == 0, report["findings"]
    newest = [c for c in report["witness"]["checkpoints"] if c["size"] == 5]
    assert newest and newest[-1]["ok"] and len(newest[-1]["witnesses"]) == 2
    await stop_all([a, w1, w2])


async def test_a_reader_trusts_by_witnesses_that_are_not_its_partners(
        cluster: Cluster) -> None:
    """W1 and W2 witness A and are A's partners only; the reader R is a partner of A
    only and requires W1 and W2 with a quorum of 2. A relays each cosignature it
    verified: R fetches the witnesses' key logs from A, and A's checkpoint ends trusted
    at R, with nothing counted against A."""
    a, w1, w2, r = cluster.create(["A", "W1", "W2", "R"], settings={
        **FAST, ("checkpoints", "interval_seconds"): 1.0})
    set_config(r.dir / "node.toml", "witness", "require", [w1.node_id, w2.node_id])
    set_config(r.dir / "node.toml", "witness", "quorum", 2)
    set_config(r.dir / "node.toml", "witness", "cosign", False)
    await cluster.start()
    for x, y in [(a, w1), (a, w2), (a, r)]:
        await cluster.link(x, y)
    await a.publish("test", TYPE, [rec(i) for i in range(5)])
    await converge([a, w1, w2, r], expected({(a.node_id, "test"): 5}), timeout=60)

    async def trusted_at_r() -> bool:
        if await cosigned_by(r, a, 5) != {w1.node_id, w2.node_id}:
            return False
        st = (await r.api("GET", "/v1/admin/status"))["witness"]
        return bool(st["untrusted_count"] == 0)

    await eventually(trusted_at_r, timeout=60)
    s = await r.session()
    async with s.get(f"{r.url}/v1/cosignatures?origin={a.node_id}&feed=test&size=5",
                     headers={"Accept": "application/json"}) as resp:
        (row,) = (await resp.json())["checkpoints"]
    assert row["trusted"] is True
    st = (await r.api("GET", "/v1/admin/status"))["witness"]
    assert st["quorum"] == 2 and st["require_key_log_missing"] == [], st
    link = next(p for p in (await r.api("GET", "/v1/admin/partners"))["partners"]
                if p["node_id"] == a.node_id)
    assert link["invalid"] == {}, link
    await stop_all([a, w1, w2, r])
