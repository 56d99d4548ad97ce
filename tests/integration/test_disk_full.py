"""A full disk: publishing gets a clear 507, nothing half-written, readiness says so,
and the node resumes by itself when space returns (a real 8 MiB tmpfs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from citynode.node import Node
from citynode.transport.server import serve
from tests.conftest import make_node_dir

pytestmark = pytest.mark.integration


async def test_a_full_disk_is_a_clear_507_readiness_says_so_and_the_node_resumes(
        small_fs: Path) -> None:
    d = make_node_dir(small_fs, "Jakarta")
    node = Node.load(d)
    await node.start()
    runner = await serve(node, host="127.0.0.1", port=node.config.node.listen_port)
    url = f"https://127.0.0.1:{node.config.node.listen_port}"
    auth = {"Authorization": f"Bearer {node.identity.token}"}
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(
        ssl=aiohttp.Fingerprint(node.identity.cert_fingerprint)))
    filler = small_fs / "filler"
    try:
        stat = os.statvfs(small_fs)
        filler.write_bytes(b"\0" * max(0, stat.f_bavail * stat.f_frsize - 1024 * 1024))
        batch = json.dumps([{"n": i, "note": "x" * 300} for i in range(200)]).encode()
        acknowledged = 0
        status, body = 200, {}
        for _ in range(200):
            async with session.post(f"{url}/v1/publish?feed=f&type=org.example.T",
                                    data=batch, headers=auth) as r:
                status, body = r.status, await r.json()
            if status != 200:
                break
            acknowledged = body["last_seq"]
        assert status == 507 and body["error"] == "disk_full", (status, body)
        assert acknowledged > 0
        # Whatever SQLite gave back meanwhile (its log is reset after a checkpoint), the
        # disk is full when readiness is asked.
        stat = os.statvfs(small_fs)
        (small_fs / "filler2").write_bytes(
            b"\0" * max(0, stat.f_bavail * stat.f_frsize - 64 * 1024))
        async with session.get(f"{url}/readyz") as r:
            ready = await r.json()
            assert r.status == 503
        assert ready["disk_full"] is True and ready["database_writable"] is False
        filler.unlink()  # space returns
        (small_fs / "filler2").unlink()
        async with session.get(f"{url}/readyz") as r:
            ready = await r.json()
            assert r.status == 200, ready
        assert ready["disk_full"] is False
        async with session.post(f"{url}/v1/publish?feed=f&type=org.example.T",
                                data=batch, headers=auth) as r:
            assert r.status == 200
            assert (await r.json())["first_seq"] == acknowledged + 1  # nothing lost
    finally:
        await session.close()
        await runner.cleanup()
        await node.stop()
    out = subprocess.run([sys.executable, "-m", "citynode", "check", "-d", str(d), "--json"],
                         capture_output=True, text=True, timeout=120)
    report = json.loads(out.stdout)
    assert out.returncode == 0 and report["problems"] == [], out.stderr
    assert report["records"] == acknowledged + 200
