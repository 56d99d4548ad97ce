"""The operator API of a recovery on a running node (real HTTPS): the node prepares and
applies, the recovery key signs elsewhere, and no recovery secret is taken over the API
(review of issue 12, M4)."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import pytest

from citynode.core import keylog
from citynode.core.keys import SigningKey
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
                    {"last_good": []}, {"last_good": {}, "next_passphrase": ""}, [1]):
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

