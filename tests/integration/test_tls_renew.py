"""A node renews its TLS certificate and rotates its signing key while its partner keeps
pulling from it and pushing to it, with real ``citynode run`` processes over HTTPS
(issue 12, point 3): the partner follows the node's card, never refuses it and never
re-pins by hand."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from typing import Any

import pytest
from click.testing import CliRunner

from citynode.cli import main as cli_main
from citynode.cluster import Cluster, LocalNode
from citynode.core import keylog
from citynode.core.cards import open_card
from citynode.core.keys import DOMAIN_CARD, Verifier, verify
from tests.conftest import eventually
from tests.integration.test_federation import FAST, TYPE, converge, expected, rec, stop_all

pytestmark = pytest.mark.integration


def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    r = CliRunner().invoke(cli_main, list(args), env=env)
    return r.exit_code, r.output


async def served_fingerprint(n: LocalNode) -> bytes:
    """SHA-256 of the certificate the node presents to a new connection."""
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    _r, w = await asyncio.open_connection(n.host, n.port, ssl=ctx)
    der = w.get_extra_info("ssl_object").getpeercert(binary_form=True)
    w.close()
    await w.wait_closed()
    return hashlib.sha256(der).digest()


async def link_to(n: LocalNode, other: LocalNode) -> dict[str, Any]:
    out = await n.api("GET", "/v1/admin/partners")
    return next(p for p in out["partners"] if p["node_id"] == other.node_id)


async def card_of(n: LocalNode) -> Any:
    s = await n.session()
    async with s.get(f"{n.url}/.well-known/citynode",
                     headers={"Accept": "application/msgpack"}) as r:
        assert r.status == 200, await r.text()
        return open_card(await r.read(), expected_node_id=n.node_id, verifier=Verifier())


async def test_tls_renewal_and_key_rotation_under_traffic(cluster: Cluster) -> None:
    a, b = cluster.create(["A", "B"], settings=FAST)
    await cluster.start()
    await cluster.link(a, b)
    old_fp = a.fingerprint
    assert (await link_to(b, a))["tls"] == [old_fp.hex()]
    counts = {a.name: 0, b.name: 0}
    errors: list[str] = []
    stop = asyncio.Event()
    # The test's own client to A pins A's certificate too: it holds off while A switches.
    a_calls = asyncio.Lock()

    async def traffic(n: LocalNode) -> None:
        # A publishes (B pulls it), B publishes (and pushes to A).
        while not stop.is_set():
            async with a_calls if n is a else asyncio.Lock():
                await publish3(n)
            await asyncio.sleep(0.1)

    async def publish3(n: LocalNode) -> None:
        out = await n.publish("test", TYPE, [rec(counts[n.name] + j) for j in range(3)])
        assert out["first_seq"] == counts[n.name] + 1
        counts[n.name] += 3

    async def watch() -> None:
        # B's view of its link to A: never one failed request (a refused certificate
        # would show as a failure with its error).
        while not stop.is_set():
            p = await link_to(b, a)
            if p["failures"] or p["last_error"]:
                errors.append(str(p["last_error"]))
            await asyncio.sleep(0.1)

    async def renew() -> bytes:
        await asyncio.sleep(1.0)
        rc, out = await asyncio.to_thread(cli, "tls", "renew", "-d", str(a.dir))
        assert rc == 0, out
        card = await card_of(a)
        assert card.tls == old_fp and card.tls_next is not None
        new_fp = card.tls_next
        assert await served_fingerprint(a) == old_fp  # staged, not served yet
        # B follows A's card by gossip: it accepts both before A switches.
        await eventually(lambda: _pins_are(b, a, {old_fp, new_fp}), timeout=30)
        async with a_calls:
            rc, out = await asyncio.to_thread(cli, "tls", "renew", "--switch", "-d",
                                              str(a.dir))
            assert rc == 0, out
            assert new_fp.hex() in out
            assert await served_fingerprint(a) == new_fp  # no restart
            await a.close()  # the test's own client pinned the old certificate
            a.fingerprint = new_fp
        card = await card_of(a)
        assert (card.tls, card.tls_next) == (new_fp, None)
        await eventually(lambda: _pins_are(b, a, {new_fp}), timeout=30)
        await asyncio.sleep(2.0)  # more rounds over new connections
        return new_fp

    async def rotate() -> None:
        before = keylog.verify_log(a.node_id, (await card_of(a)).keylog or b"",
                                   verifier=Verifier())
        rc, out = await asyncio.to_thread(
            cli, "key", "rotate", "-d", str(a.dir),
            env={"CITYNODE_NEXT_KEY_PASSPHRASE": a.recovery_passphrase})
        assert rc == 0, out
        card = await card_of(a)
        state = keylog.verify_log(a.node_id, card.keylog or b"", verifier=Verifier())
        assert state.seq == before.seq + 1 and state.key != before.key
        # The card is signed again, by the new key in force.
        verify(state.key, DOMAIN_CARD, card.body, card.sig)
        await asyncio.sleep(2.0)

    tasks = [asyncio.create_task(traffic(a)), asyncio.create_task(traffic(b)),
             asyncio.create_task(watch())]
    try:
        new_fp = await renew()
        await rotate()
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    await converge([a, b], expected({(a.node_id, "test"): counts[a.name],
                                     (b.node_id, "test"): counts[b.name]}), timeout=60)
    assert errors == []
    p = await link_to(b, a)
    assert p["failures"] == 0 and p["last_error"] is None and p["up"]
    # Nobody re-pinned: B's partner is the same id, now pinned to the new certificate,
    # and stays so across a restart of B (the pin is stored with the partner).
    b.stop()
    b.start()
    await b.wait_ready()
    p = await link_to(b, a)
    assert p["tls"] == [new_fp.hex()] and p["node_id"] == a.node_id
    out = await a.publish("test", TYPE, [rec(-1)])
    await converge([a, b], expected({(a.node_id, "test"): out["last_seq"],
                                     (b.node_id, "test"): counts[b.name]}), timeout=60)
    await stop_all([a, b])


async def _pins_are(n: LocalNode, other: LocalNode, fps: set[bytes]) -> bool:
    return set((await link_to(n, other))["tls"]) == {fp.hex() for fp in fps}
