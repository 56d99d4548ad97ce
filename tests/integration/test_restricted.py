"""Restricted feeds end to end: sealed to named readers, relayed by a node that cannot
read them, decrypted by the reader; never readable by anyone else."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from citynode.client import Client, plaintext
from citynode.cluster import Cluster, LocalNode
from citynode.core.keys import Verifier
from citynode.core.records import open_record
from citynode.errors import AccessDenied, PeerRejected
from citynode.identity import load_identity
from tests.conftest import eventually, key_states

pytestmark = pytest.mark.integration

FAST = {("federation", "pull_interval_seconds"): 1.0}
NOTICE = {
    "severity": "high", "tlp": "TLP:AMBER", "affectedSystem": "SCADA gateway",
    "description": "Exploited in the wild; patch now.", "dateIssued": "2026-11-28T07:00:00Z",
}


def add_feed(n: LocalNode, feed: str, access: str, readers: list[str]) -> None:
    with open(n.dir / "node.toml", "a") as f:
        f.write(f'\n[feeds.{feed}]\naccess = "{access}"\nreaders = {json.dumps(readers)}\n')


async def test_relay_forwards_what_it_cannot_read(cluster: Cluster) -> None:
    a, b, c = cluster.create(["Singapore", "Jakarta", "Seoul"], settings=FAST)
    add_feed(a, "cyber-notices", "restricted", [c.node_id])
    await cluster.start()
    await cluster.link(a, b)  # Seoul reaches Singapore only through Jakarta
    await cluster.link(b, c)
    out = await a.publish("cyber-notices", "CyberSecurityNotice", [NOTICE])
    rid = out["ids"][0]

    async def at_seoul() -> bool:
        feeds = await c.api("GET", "/v1/feeds")  # operator: sees restricted heads
        return any(f["feed"] == "cyber-notices" and f["seq"] == 1 for f in feeds["feeds"])

    await eventually(at_seoul, timeout=30)

    # The relay holds it, verified, but neither it nor anonymous callers can read it.
    r = subprocess.run([sys.executable, "-m", "citynode", "records", "-d", str(b.dir),
                        "--feed", "cyber-notices", "--json"], capture_output=True, text=True)
    (at_relay,) = json.loads(r.stdout)["records"]
    assert at_relay["type"] == "sealed" and "data" not in at_relay
    assert "Exploited" not in r.stdout and c.node_id in at_relay["sealed"]["to"]
    for n in (a, b, c):
        with pytest.raises(PeerRejected) as e:
            await n.api("GET", f"/v1/records/{rid}", operator=False)
        assert e.value.status == 404
        page = await n.api("GET", "/v1/records?feed=cyber-notices", operator=False)
        assert page["records"] == []

    # The reader's own node decrypts for its operator ...
    mine = await c.api("GET", f"/v1/records/{rid}")
    assert mine["decrypted"] is True and mine["data"]["tlp"] == "TLP:AMBER"
    # ... and a reader's application, signing as Seoul, reads it from the relay: the
    # client decrypts it by itself in get, query and subscribe, and the record is still
    # the signed one.
    seoul_key = load_identity(c.dir).key
    async with Client(b.url, fingerprint=b.fingerprint, key=seoul_key) as cl:
        rec = await cl.get(rid)
        got = [r async for r in cl.query(feed="cyber-notices")]
        stream = cl.subscribe(feed="cyber-notices", last_event_id=0)
        _, streamed = await anext(stream)
        await stream.aclose()
        assert len(got) == 1
        for r in (rec, *got, streamed):
            assert r.id.hex() == rid and r.sealed is not None
            assert r.type == "CyberSecurityNotice" and r.data["severity"] == "high"
            assert open_record(r.body, r.sig, r.payload, now_ms=2**62, verifier=Verifier(),
                               key_states=key_states(a.dir, b.dir, c.dir)).id == r.id
        inner = plaintext(rec, seoul_key)
        assert inner.type == "CyberSecurityNotice" and inner.data["severity"] == "high"
        with pytest.raises(AccessDenied):
            plaintext(rec, load_identity(b.dir).key)
    # The relay signing as itself is not a reader.
    async with Client(c.url, fingerprint=c.fingerprint, key=load_identity(b.dir).key) as cl:
        with pytest.raises(PeerRejected):
            await cl.get(rid)


async def test_records_signed_before_a_feed_was_restricted_keep_the_partners_rule(
        cluster: Cluster) -> None:
    """An operator turns a `partners` feed into a `restricted` one. Its earlier records
    are in clear: they must not now travel where sealed records may (through a relay to
    a node outside the origin's partners), nor be read by a reader who is not a
    partner. Records signed after the change are sealed and go to their reader."""
    a, b, c = cluster.create(["Lima", "Quito", "Bogota"], settings=FAST)
    add_feed(a, "priv", "partners", [])
    await cluster.start()
    await cluster.link(a, b)  # Quito is Lima's partner
    await cluster.link(b, c)  # Bogota is Quito's only: not Lima's
    old = (await a.publish("priv", "org.example.Test", [{"secret": "partners-only"}]))["ids"][0]

    async def held(n: LocalNode, seq: int) -> bool:
        return any(f["origin"] == a.node_id and f["feed"] == "priv" and f["seq"] >= seq
                   for f in await n.feeds())

    await eventually(lambda: held(b, 1), timeout=30)
    await a.close()
    a.stop()
    text = (a.dir / "node.toml").read_text().replace('access = "partners"\nreaders = []',
                                                     'access = "restricted"\nreaders = '
                                                     f'["{c.node_id}"]')
    (a.dir / "node.toml").write_text(text)
    await cluster.start([a])
    new = (await a.publish("priv", "org.example.Test", [{"secret": "for Bogota"}]))["ids"][0]
    await eventually(lambda: held(b, 2), timeout=30)  # the partner holds both
    for _ in range(3):  # sync rounds every second: Bogota asks Quito, Quito pushes
        await c.api("POST", "/v1/admin/sync", body=b"")
        await b.api("POST", "/v1/admin/sync", body=b"")
    await asyncio.sleep(2)
    assert not await held(c, 1), "a record in clear travelled beyond the origin's partners"
    # At the origin, the reader signing as itself gets the sealed record, not the old one.
    async with Client(a.url, fingerprint=a.fingerprint, key=load_identity(c.dir).key) as cl:
        with pytest.raises(PeerRejected) as e:
            await cl.get(old)
        assert e.value.status == 404
        rec = await cl.get(new)
        assert rec.sealed is not None and rec.data == {"secret": "for Bogota"}
        assert [r.id.hex() async for r in cl.query(feed="priv")] == [new]
    # The partner still reads the old record: the partners rule is what holds it.
    async with Client(a.url, fingerprint=a.fingerprint, key=load_identity(b.dir).key) as cl:
        assert (await cl.get(old)).data == {"secret": "partners-only"}


async def test_a_fork_proof_with_a_record_in_clear_stays_with_the_origins_partners(
        cluster: Cluster) -> None:
    """An origin signs a sealed and an in-clear record at one seq of a restricted feed
    (a restore from a backup taken while the feed was `partners`; or a faulty origin).
    Its partner detects the fork and keeps the proof; the proof carries the record in
    clear, so it goes no further than the origin's partners -- also when the sealed
    record comes first in it (the clear one is longer)."""
    import sqlite3
    import time

    from citynode.core.chain import ForkProof
    from citynode.core.records import decode_record, parse_body, sign_record
    from citynode.transport.client import PeerClient

    secret = "PARTNERS-ONLY-" + "x" * 2000
    a, b, c = cluster.create(["Lima", "Quito", "Bogota"], settings=FAST)
    add_feed(a, "priv", "restricted", [c.node_id])
    await cluster.start()
    await cluster.link(a, b)  # Quito: Lima's partner
    await cluster.link(b, c)  # Bogota: Quito's only, and a reader of priv
    await a.publish("priv", "org.example.Test", [{"s": "for Bogota"}])

    async def held(n: LocalNode) -> bool:
        return any(f["origin"] == a.node_id and f["feed"] == "priv" for f in await n.feeds())

    await eventually(lambda: held(b), timeout=30)
    key = load_identity(a.dir).key
    clear = sign_record(key, feed="priv", seq=1, prev=None, time_ms=int(time.time() * 1000),
                        type="org.example.Test", data={"secret": secret})
    pc = PeerClient(key, b.url, node_id=b.node_id, fingerprint=b.fingerprint)
    try:
        await pc.push([clear.envelope])
    finally:
        await pc.close()

    def proofs(n: LocalNode) -> list[bytes]:
        db = sqlite3.connect(n.dir / "citynode.db")
        try:
            return [r[0] for r in db.execute("SELECT proof FROM fork_proofs")]
        finally:
            db.close()

    async def detected() -> bool:
        return bool(proofs(b))

    await eventually(detected, timeout=30)
    (proof,) = proofs(b)
    fp = ForkProof.decode(proof)
    first = parse_body(decode_record(fp.a)[0])
    assert "sealed_digest" in first, "the case under test: the sealed record comes first"
    for _ in range(3):
        await b.api("POST", "/v1/admin/sync", body=b"")
        await c.api("POST", "/v1/admin/sync", body=b"")
    await asyncio.sleep(2)
    assert not any(secret.encode() in p for p in proofs(c)), \
        "a record in clear reached a node beyond the origin's partners in a fork proof"
