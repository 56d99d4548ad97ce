"""A recovery signed away from the node, with real ``citynode run`` processes over
HTTPS (review of issue 12, M4): the running node prepares the new keys and stops
signing, the recovery file signs the request on "another machine" (a directory with no
data dir, the CLI given no -d), and the node applies the event; the thief's forgeries
go at the partner too, and nobody re-pins."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from citynode.cli import main as cli_main
from citynode.cluster import Cluster, LocalNode
from citynode.core import keylog
from citynode.core.keys import NodeKey, Verifier, parse_node_id, unseal_secret_key
from citynode.core.records import sign_record
from citynode.errors import PeerRejected
from citynode.transport.client import PeerClient
from tests.conftest import eventually
from tests.integration.test_federation import FAST, TYPE, converge, expected, rec, stop_all

pytestmark = pytest.mark.integration


def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    r = CliRunner().invoke(cli_main, list(args), env=env)
    return r.exit_code, r.output


async def head_at(n: LocalNode, origin: LocalNode) -> int:
    for f in await n.feeds():
        if f["origin"] == origin.node_id and f["feed"] == "test":
            return int(f["seq"])
    return 0


async def key_log_seq(n: LocalNode, origin: LocalNode) -> int | None:
    s = await n.session()
    async with s.get(f"{n.url}/v1/keylog?origin={origin.node_id}") as r:
        if r.status == 404:
            return None
        return keylog.verify_log(origin.node_id, await r.read(), verifier=Verifier()).seq


async def test_a_running_node_recovers_with_the_recovery_key_kept_offline(
        cluster: Cluster, tmp_path: Path) -> None:
    b, c = cluster.create(["B", "C"], settings=FAST)
    await cluster.start()
    await cluster.link(b, c)
    await b.publish("test", TYPE, [rec(i) for i in range(6)])
    await converge([b, c], expected({(b.node_id, "test"): 6}), timeout=60)
    page = await c.api("GET", f"/v1/records?origin={b.node_id}&feed=test&limit=100",
                       operator=True)
    last = page["records"][-1]
    # The thief copies B's node.key and pushes records 7-9 to C, signed as B.
    thief = NodeKey(unseal_secret_key((b.dir / "node.key").read_bytes(), None),
                    parse_node_id(b.node_id), b.node_id, (b.dir / "keylog").read_bytes())
    forged, prev = [], bytes.fromhex(last["id"])
    for seq in (7, 8, 9):
        r = sign_record(thief, feed="test", seq=seq, prev=prev, time_ms=int(last["time"]) - seq,
                        type=TYPE, data={"n": -seq, "station": "FORGED"})
        forged.append(r.envelope)
        prev = r.id
    client = PeerClient(thief, c.url, node_id=c.node_id, fingerprint=c.fingerprint)
    try:
        assert (await client.push(forged))["accepted"] == 3
    finally:
        await client.close()
    await eventually(lambda: _head_is(c, b, 9), timeout=20)

    # The recovery file goes offline, as init says; the node never sees it again.
    away = tmp_path / "offline"
    away.mkdir()
    os.replace(b.dir / "recovery.key", away / "recovery.key")
    req, event = away / "request.json", away / "event.json"
    rc, out = await asyncio.to_thread(
        cli, "key", "recover-prepare", "-d", str(b.dir), "--last-good", "test=6",
        "--out", str(req), env={"CITYNODE_NEXT_KEY_PASSPHRASE": "a new next-key pw"})
    assert rc == 0, out
    with pytest.raises(PeerRejected, match="recovery is prepared"):
        await b.publish("test", TYPE, [rec(50)])
    request = json.loads(req.read_text())
    assert request["heads"]["test"] == {"seq": 6, "id": last["id"]}
    rc, out = await asyncio.to_thread(
        cli, "key", "recover-sign", "--request", str(req), "--recovery",
        str(away / "recovery.key"), "--out", str(event), "--yes",
        env={"CITYNODE_RECOVERY_PASSPHRASE": b.recovery_passphrase})
    assert rc == 0, out
    rc, out = await asyncio.to_thread(cli, "key", "recover", "-d", str(b.dir),
                                      "--event", str(event))
    assert rc == 0, out
    assert f"recovered: {b.node_id} now signs with key {request['key']}" in out

    async def forgeries_gone() -> bool:
        return all([await key_log_seq(x, b) == 1 and await head_at(x, b) == 6
                    for x in (b, c)])

    await eventually(forgeries_gone, timeout=60)
    # Pushed again, the forgeries are refused; B publishes on under its new key.
    client = PeerClient(thief, c.url, node_id=c.node_id, fingerprint=c.fingerprint)
    try:
        with pytest.raises(PeerRejected):
            await client.push(forged)
    finally:
        await client.close()
    await b.publish("test", TYPE, [rec(100)])
    await converge([b, c], expected({(b.node_id, "test"): 7}), timeout=60)
    assert sorted(p.name for p in b.dir.iterdir() if p.name.startswith("recovery")) == []
    await stop_all([b, c])
    for x in (b, c):
        rc, out = await asyncio.to_thread(cli, "check", "-d", str(x.dir))
        assert rc == 0, out



async def _head_is(n: LocalNode, origin: LocalNode, seq: int) -> bool:
    return await head_at(n, origin) == seq
