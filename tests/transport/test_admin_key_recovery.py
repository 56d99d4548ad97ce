"""The operator API of a recovery on a running node (real HTTPS): the node prepares and
applies, the recovery key signs elsewhere, and no recovery secret is taken over the API
(review of issue 12, M4)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest

from citynode.core import keylog
from citynode.core.keys import SigningKey, Verifier, unseal_secret_key
from citynode.datadir import init_data_dir
from citynode.errors import PublishRefused
from citynode.node import Node
from citynode.recovery import RecoveryRequest, sign_request
from citynode.transport.server import serve
from tests.conftest import FAST_KDF, InProc, free_ports

TYPE = "org.example.Noise"


async def start(d: Path) -> InProc:
    node = Node.load(d)
    await node.start()
    return InProc(node, await serve(node, host="127.0.0.1",
                                    port=node.config.node.listen_port))


async def call(n: InProc, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with n.session.request(method, n.url + path, json=body, headers=n.auth()) as r:
        return r.status, await r.json()


async def test_a_running_node_prepares_and_applies_a_recovery_signed_elsewhere(
        tmp_path: Path) -> None:
    d = tmp_path / "b"
    init_data_dir(d, name="B", listen=f"127.0.0.1:{free_ports(1)[0]}",
                  recovery_passphrase="rpw", next_passphrase="npw", **FAST_KDF)
    identity, q0 = keylog.unseal_recovery((d / "recovery.key").read_bytes(), "rpw")
    (d / "recovery.key").unlink()  # offline, as init says
    n = await start(d)
    try:
        recs = await n.node.publish("noise", TYPE, [{"db": i} for i in range(3)])
        old_key = n.node.identity.key.public_key
        # The recovery key itself is refused, whatever else the body says.
        status, out = await call(n, "POST", "/v1/admin/key/recover", {
            "recovery_seed": q0.hex(), "last_good": {"noise": 2}, "drop_feeds": [],
            "recovery_passphrase": "rpw"})
        assert status == 400 and "never goes to the node" in out["message"]
        status, out = await call(n, "POST", "/v1/admin/key/recover/prepare", {
            "last_good": {"noise": 2}, "recovery_seed": q0.hex()})
        assert status == 400 and "never a recovery key" in out["message"]
        for bad in ({"last_good": {"noise": 0}}, {"last_good": {"noise": True}},
                    {"last_good": []}, {"last_good": {}, "next_passphrase": ""}, [1],
                    # A name, not a list: it is not feeds "a", "b" and "c".
                    {"last_good": {"noise": 2}, "drop_feeds": "abc",
                     "next_passphrase": "npw2"},
                    {"last_good": {"noise": 2}, "drop_feeds": [1],
                     "next_passphrase": "npw2"}):
            status, out = await call(n, "POST", "/v1/admin/key/recover/prepare", bad)
            assert status == 400, (bad, out)
        status, out = await call(n, "POST", "/v1/admin/key/recover", {"event": "%%"})
        assert status == 400 and "base64" in out["message"]

        status, request = await call(n, "POST", "/v1/admin/key/recover/prepare", {
            "last_good": {"noise": 2}, "drop_feeds": [], "next_passphrase": "npw2"})
        assert status == 200, request
        assert request["heads"] == {"noise": {"seq": 2, "id": recs[1].id.hex()}}
        assert "npw2" not in str(request)
        with pytest.raises(PublishRefused, match="recovery is prepared"):
            await n.node.publish("noise", TYPE, [{"db": 9}])
        # A second prepare is refused (an event may be signed for the first already: a
        # second one would kill the identity), and nothing tells to sign again.
        status, out = await call(n, "POST", "/v1/admin/key/recover/prepare", {
            "last_good": {"noise": 2}, "drop_feeds": [], "next_passphrase": "npw3"})
        assert status >= 400 and "prepared already" in out["message"], out
        assert "--cancel" in out["message"] and "destroyed" in out["message"]
        assert (d / "recovery.pending").read_text().count(request["key"]) == 1
    finally:
        await n.close()
    # Prepared before a restart: still nothing is signed.
    n = await start(d)
    try:
        with pytest.raises(PublishRefused, match="recovery is prepared"):
            await n.node.publish("noise", TYPE, [{"db": 9}])
        # Elsewhere: the request alone and the recovery file.
        req = RecoveryRequest.parse(json.dumps(request).encode())
        q1 = SigningKey.generate()
        ev, _state = sign_request(req, identity, q0, q1.public_key, int(time.time() * 1000))
        status, out = await call(n, "POST", "/v1/admin/key/recover",
                                 {"event": base64.b64encode(ev.envelope).decode()})
        assert status == 200, out
        assert out == {"node_id": n.node.node_id, "seq": 1, "key": request["key"]}
        key = n.node.identity.key
        assert key.public_key.hex() == request["key"] and key.public_key != old_key
        assert n.node.replica.heads[(key.identity, "noise")].seq == 2  # seq 3 went
        await n.node.publish("noise", TYPE, [{"db": 10}])  # signs again, new key
        status, out = await call(n, "DELETE", "/v1/admin/key/recover/prepare")
        assert (status, out) == (200, {"cancelled": False})
        # Applied twice: nothing more happens.
        status, out = await call(n, "POST", "/v1/admin/key/recover",
                                 {"event": base64.b64encode(ev.envelope).decode()})
        assert status == 200 and out["already"] is True
    finally:
        await n.close()



async def test_prepare_reads_the_heads_and_stops_signing_in_one_step(tmp_path: Path) -> None:
    """Review 12b: a publish under way when the recovery is prepared finishes before the
    heads are read (it is not signed after them, to be dropped when the recovery is
    applied), and one that waited behind the prepare is refused, not signed with the
    old key."""
    d = tmp_path / "b"
    init_data_dir(d, name="B", listen=f"127.0.0.1:{free_ports(1)[0]}",
                  recovery_passphrase="rpw", next_key_on_disk=True, **FAST_KDF)
    n = await start(d)
    try:
        me = n.node.public_key
        await n.node.publish("noise", TYPE, [{"db": i} for i in range(3)])
        under_way = asyncio.ensure_future(
            n.node.publish("noise", TYPE, [{"db": i} for i in range(1000)]))
        await asyncio.sleep(0)  # past its checks, signing in a worker thread
        prepare = asyncio.ensure_future(n.node.keychanges.prepare_recovery(
            {"noise": 3}, frozenset()))  # nothing slow to seal: a short prepare
        early = asyncio.ensure_future(n.node.publish("noise", TYPE, [{"db": -1}]))
        # Once the prepare has stopped new publishes (Publisher.with_signing_stopped),
        # one more: it waits, and must then be refused, not signed with the old key.
        while n.node.publisher._no_rotation.is_set() and not prepare.done():
            await asyncio.sleep(0)
        late = asyncio.ensure_future(n.node.publish("noise", TYPE, [{"db": -2}]))
        # And publishes started all along the prepare.
        along = []
        while not prepare.done():
            along.append(asyncio.ensure_future(n.node.publish("noise", TYPE, [{"db": -3}])))
            await asyncio.sleep(0)
        await prepare
        at_prepare = n.node.replica.heads[(me, "noise")].seq
        recs = await under_way
        assert recs[-1].seq <= at_prepare  # finished before the heads were read
        try:
            assert (await early)[0].seq <= at_prepare
        except PublishRefused as exc:
            assert "recovery is prepared" in str(exc)
        with pytest.raises(PublishRefused, match="recovery is prepared"):
            await late
        for done in await asyncio.gather(*along, return_exceptions=True):
            if isinstance(done, PublishRefused):
                assert "recovery is prepared" in str(done)
            else:
                assert not isinstance(done, BaseException), done
                assert done[0].seq <= at_prepare  # acknowledged: signed before the heads
        # Nothing was signed after the request was made.
        assert at_prepare >= 1003
        assert n.node.replica.heads[(me, "noise")].seq == at_prepare
        held = n.node.storage.head(me, "noise")
        assert held is not None and held[0] == at_prepare
    finally:
        await n.close()


async def test_a_recovery_prepared_on_a_shared_database_warns_to_stop_the_others(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The prepared keys live in one process's data dir: another process taking the
    lead would sign with the old key and know of no recovery. A single process (the
    usual PostgreSQL node) recovers; the log says to stop any other."""
    d = tmp_path / "b"
    init_data_dir(d, name="B", listen=f"127.0.0.1:{free_ports(1)[0]}",
                  recovery_passphrase="rpw", next_passphrase="npw", **FAST_KDF)
    n = await start(d)
    try:
        await n.node.publish("noise", TYPE, [{"db": 1}])
        # What a PostgreSQL storage says (storage_pg.py); the refusal reads only that.
        n.node.keychanges.storage.shared = True
        with caplog.at_level(logging.WARNING, logger="citynode"):
            status, out = await call(n, "POST", "/v1/admin/key/recover/prepare", {
                "last_good": {"noise": 1}, "next_passphrase": "npw2"})
        assert status == 200, out
        assert (d / "recovery.pending").exists()
        assert any("stop every other process" in r.getMessage() for r in caplog.records)
    finally:
        await n.close()


async def test_a_restart_catching_up_keeps_the_prepared_recovery_appliable(
        tmp_path: Path) -> None:
    """A recovery prepared before a restart whose catch-up finds a partner with a newer
    log of this identity (and not the key it puts in force): once the recovery is
    applied the node signs again (catch-up's refusal did not replace the prepared one,
    which applying lifts); a cancel instead brings catch-up's refusal back."""
    d = tmp_path / "b"
    init_data_dir(d, name="B", listen=f"127.0.0.1:{free_ports(1)[0]}",
                  recovery_passphrase="rpw", next_passphrase="npw", **FAST_KDF)
    identity, q0 = keylog.unseal_recovery((d / "recovery.key").read_bytes(), "rpw")
    n = await start(d)
    try:
        await n.node.publish("noise", TYPE, [{"db": 1}])
        request = await n.node.keychanges.prepare_recovery({"noise": 1}, frozenset(),
                                                           "npw2")
    finally:
        await n.close()
    # A partner's newer log: rotated (elsewhere) with the next key, not on disk here.
    nxt = SigningKey(unseal_secret_key((d / "node.next.key").read_bytes(), "npw"))
    wire = (d / "keylog").read_bytes()
    state = keylog.verify_log(identity, wire, verifier=Verifier())
    rot = keylog.rotate(state, nxt, SigningKey.generate().public_key, state.time + 1, {})
    newer = keylog.encode_log([*keylog.decode_log(wire), rot.envelope])
    newer_state = keylog.verify_log(identity, newer, verifier=Verifier())

    async def partner_holds_newer() -> tuple[str, bytes, keylog.KeyState]:
        return "P", newer, newer_state

    for cancel in (True, False):
        n = await start(d)
        try:
            kc = n.node.keychanges
            kc.newer_own_log = partner_holds_newer  # type: ignore[method-assign]
            await kc.catch_up()
            with pytest.raises(PublishRefused, match="recovery is prepared"):
                await n.node.publish("noise", TYPE, [{"db": 2}])
            if cancel:
                assert await kc.cancel_recovery()
                with pytest.raises(PublishRefused, match="partner P holds"):
                    await n.node.publish("noise", TYPE, [{"db": 2}])
                request = await kc.prepare_recovery({"noise": 1}, frozenset(), "npw2")
                continue
            req = RecoveryRequest.parse(json.dumps(request).encode())
            ev, _ = sign_request(req, identity, q0, SigningKey.generate().public_key,
                                 int(time.time() * 1000))
            await kc.apply_recovery(ev.envelope)
            await n.node.publish("noise", TYPE, [{"db": 3}])  # the recovered key signs
        finally:
            await n.close()
