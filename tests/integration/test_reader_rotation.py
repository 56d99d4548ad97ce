"""A reader of a restricted feed rotates its key, with real ``citynode run`` processes
(issue 12, point 3): the publisher's next records are sealed to the reader's new key,
and the reader opens both those and the ones sealed to its retired key."""

from __future__ import annotations

import asyncio
import base64

import pytest
from click.testing import CliRunner

from citynode.cli import main as cli_main
from citynode.client import Client, plaintext
from citynode.cluster import Cluster
from citynode.core import keylog
from citynode.core.keys import Verifier
from citynode.core.records import sealed_of
from citynode.errors import AccessDenied
from citynode.identity import load_identity
from tests.conftest import eventually
from tests.integration.test_federation import FAST, stop_all
from tests.integration.test_restricted import NOTICE, add_feed

pytestmark = pytest.mark.integration


async def test_a_reader_that_rotates_gets_new_records_sealed_to_its_new_key(
        cluster: Cluster) -> None:
    a, b = cluster.create(["Singapore", "Seoul"], settings=FAST)
    add_feed(a, "cyber-notices", "restricted", [b.node_id])
    await cluster.start()
    await cluster.link(a, b)
    key0 = load_identity(b.dir).key.public_key
    old_id = (await a.publish("cyber-notices", "CyberSecurityNotice", [NOTICE]))["ids"][0]

    rc = await asyncio.to_thread(
        CliRunner().invoke, cli_main, ["key", "rotate", "-d", str(b.dir)],
        env={"CITYNODE_NEXT_KEY_PASSPHRASE": b.recovery_passphrase})
    assert rc.exit_code == 0, rc.output
    key1 = load_identity(b.dir).key.public_key
    assert key1 != key0

    async def publisher_knows_rotation() -> bool:
        s = await a.session()
        async with s.get(f"{a.url}/v1/keylog?origin={b.node_id}") as r:
            return r.status == 200 and keylog.verify_log(
                b.node_id, await r.read(), verifier=Verifier()).key == key1

    await eventually(publisher_knows_rotation, timeout=30)
    new_id = (await a.publish("cyber-notices", "CyberSecurityNotice",
                              [dict(NOTICE, severity="low")]))["ids"][0]

    async def readers_of(rid: str) -> set[bytes]:
        # The recipients apart from the publisher itself (it seals to itself too).
        env = base64.b64decode((await a.api("GET", f"/v1/records/{rid}"))["envelope"])
        return {r[0] for r in sealed_of(env)["to"]} - {load_identity(a.dir).key.public_key}

    assert await readers_of(old_id) == {key0}
    assert await readers_of(new_id) == {key1}

    async def at_reader() -> bool:
        feeds = (await b.api("GET", "/v1/feeds"))["feeds"]
        return any(f["feed"] == "cyber-notices" and f["seq"] == 2 for f in feeds)

    await eventually(at_reader, timeout=30)
    # The reader's node opens both for its operator: the old record with its retired key.
    for rid, severity in ((old_id, "high"), (new_id, "low")):
        got = await b.api("GET", f"/v1/records/{rid}")
        assert got.get("decrypted") is True, got
        assert got["data"]["severity"] == severity
    # So does a reader's application signing with the node's key as loaded from disk
    # (the retired key kept sealed in node.retired.key).
    reader = load_identity(b.dir).key
    assert [k.public_key for k in reader.reading_keys()] == [key1, key0]
    async with Client(b.url, fingerprint=b.fingerprint, key=reader) as cl:
        recs = [r async for r in cl.query(feed="cyber-notices")]
        assert [r.data["severity"] for r in recs] == ["high", "low"]
        assert plaintext(recs[0], reader).data["severity"] == "high"
    # A key without the retired one does not open the old record: the retired key is
    # what does.
    from citynode.core.keys import SigningKey

    with pytest.raises(AccessDenied):
        plaintext(recs[0], SigningKey(reader.seed))
    await stop_all([a, b])
