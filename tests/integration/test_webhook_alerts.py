"""Alerts end to end: a real HTTP receiver on 127.0.0.1 gets signed alerts it verifies
(core/alerts.py ``verify_alert``), retried after it answered 500, once per condition,
then resolved: partner down, fork, split view, disk low, invalid-input spike, own feed late against
its cadence. Seconds-scale thresholds ([alerts] in node.toml)."""

from __future__ import annotations

import asyncio
import base64
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from citynode.cluster import free_ports
from citynode.core.alerts import KEYLOG_HEADER, SIGNATURE_HEADER, verify_alert
from citynode.core.keys import SigningKey, node_id
from citynode.core.records import sign_record
from citynode.errors import SignatureError
from citynode.node import Node
from citynode.transport.server import serve
from tests.conftest import InProc, eventually, make_node_dir
from tests.transport.test_checkpoints_api import show_split_view

pytestmark = pytest.mark.integration


class Receiver:
    """A webhook: keeps every alert whose signature verifies; answers 500 to the first
    ``fail_first`` requests."""

    def __init__(self, fail_first: int = 0) -> None:
        self.fail_first = fail_first
        self.requests = 0
        self.alerts: list[dict[str, Any]] = []
        #: The raw (body, signature header, key log) of each alert in ``alerts``.
        self.raw: list[tuple[bytes, str, bytes | None]] = []
        self.bad: list[str] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        if self.requests <= self.fail_first:
            return web.json_response({"error": "busy", "message": "try later"}, status=500)
        body = await request.read()
        try:
            # Any node the tests start may alert here; each alert's `node` is checked by
            # the test that expects it.
            header = request.headers.get(SIGNATURE_HEADER, "")
            text = request.headers.get(KEYLOG_HEADER)
            log = base64.b64decode(text) if text else None
            self.alerts.append(verify_alert(body, header, expected_node=None, key_log=log))
            self.raw.append((body, header, log))
        except Exception as exc:  # the test asserts none came
            self.bad.append(repr(exc))
            return web.Response(status=400)
        return web.Response(status=204)

    def of(self, alert: str, status: str = "firing") -> list[dict[str, Any]]:
        return [a for a in self.alerts if a["alert"] == alert and a["status"] == status]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/hook", rec.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_ports(1)[0]
    await web.TCPSite(runner, "127.0.0.1", port).start()
    rec.url = f"http://127.0.0.1:{port}/hook"
    try:
        yield rec
    finally:
        await runner.cleanup()


def alert_settings(url: str, **more: Any) -> dict[tuple[str, str], Any]:
    s: dict[tuple[str, str], Any] = {
        ("alerts", "webhook_urls"): [url], ("alerts", "allow_http_loopback"): True,
        ("alerts", "check_interval_seconds"): 0.1, ("alerts", "retry_base_seconds"): 0.05,
        # 3 s: well above a failed exchange's back-off (at most 1 s) and the pull
        # interval, so a partner that is up is never taken for down between two
        # exchanges, even on a loaded machine.
        ("alerts", "partner_down_minutes"): 0.05,
        ("alerts", "resolve_after_seconds"): 0.5,
        ("federation", "pull_interval_seconds"): 0.5,
        ("federation", "backoff_max_seconds"): 1.0,
    }
    s.update({("alerts", k): v for k, v in more.items()})
    return s


async def start(d: Path) -> InProc:
    node = Node.load(d)
    await node.start()
    return InProc(node, await serve(node, host="127.0.0.1",
                                    port=node.config.node.listen_port))


async def test_partner_down_is_alerted_once_after_retries_then_resolved(
        tmp_path: Path, receiver: Receiver) -> None:
    receiver.fail_first = 2
    a = await start(make_node_dir(tmp_path, "Athens", settings=alert_settings(
        receiver.url, resolve_after_seconds=2.0)))
    b = await start(make_node_dir(tmp_path, "Berlin"))
    try:
        await b.node.add_partner(a.url, a.node.node_id)
        await a.node.add_partner(b.url, b.node.node_id)
        link = a.node.partners.get(b.node.public_key)
        assert link is not None

        async def up() -> bool:
            return link.up

        await eventually(up)
        b_dir = b.node.data_dir
        await b.close()

        async def alerted() -> bool:
            return bool(receiver.of("partner_down"))

        await eventually(alerted, timeout=30)
        assert receiver.bad == []
        [alert] = receiver.of("partner_down")
        assert alert["node"] == a.node.node_id and alert["kind"] == "citynode.alert"
        assert alert["subject"]["partner"] == b.node.node_id
        assert alert["id"] == f"partner_down:{b.node.node_id}"
        # Two 500s were retried: the third attempt got through.
        assert receiver.requests >= 3
        assert total_deliveries(a, "retry") >= 2 and total_deliveries(a, "ok") >= 1
        # Still down: no storm, the same condition is not alerted again.
        await asyncio.sleep(1.0)
        assert len(receiver.of("partner_down")) == 1

        b = await start(b_dir)  # back on the same port

        async def resolved() -> bool:
            return bool(receiver.of("partner_down", "resolved"))

        await eventually(resolved, timeout=30)
        [back] = receiver.of("partner_down", "resolved")
        assert back["id"] == alert["id"] and back["since"] == alert["since"]
        # Its own words, not the firing message again.
        assert re.fullmatch(r"partner Berlin reachable again after \d+ s", back["message"])
        # Up for resolve_after_seconds before it resolved: not fired again since.
        assert len(receiver.of("partner_down")) == 1
    finally:
        await b.close()
        await a.close()


def total_deliveries(n: InProc, outcome: str) -> float:
    v = n.node.metrics.registry.get_sample_value("citynode_alert_deliveries_total",
                                                 {"outcome": outcome})
    return v or 0.0


async def test_a_fork_of_a_held_feed_is_alerted(tmp_path: Path, receiver: Receiver) -> None:
    a = await start(make_node_dir(tmp_path, "Athens", settings=alert_settings(receiver.url)))
    try:
        recs = await a.node.publish("air", "org.example.T", [{"n": 1}])
        other = sign_record(a.node.key, feed="air", seq=1, prev=None,
                            time_ms=a.node.now_ms(), type="org.example.T",
                            data={"n": 2})
        assert other.id != recs[0].id
        await a.node.ingest([other.envelope])

        async def alerted() -> bool:
            return bool(receiver.of("fork"))

        await eventually(alerted, timeout=20)
        [alert] = receiver.of("fork")
        assert alert["severity"] == "critical"
        assert alert["subject"] == {"origin": a.node.node_id, "feed": "air", "seq": 1}
        assert receiver.bad == []
        await asyncio.sleep(0.5)
        assert len(receiver.of("fork")) == 1  # proofs stay: never again, never resolved
    finally:
        await a.close()


async def test_disk_low_is_alerted_and_resolved(small_fs: Path, receiver: Receiver) -> None:
    a = await start(make_node_dir(small_fs, "Athens",
                                  settings=alert_settings(receiver.url,
                                                          disk_free_percent=50.0)))
    filler = small_fs / "filler"
    try:
        await asyncio.sleep(0.5)
        assert receiver.of("disk_low") == []
        st = os.statvfs(small_fs)
        filler.write_bytes(b"\0" * (st.f_bavail * st.f_frsize * 3 // 4))

        async def alerted() -> bool:
            return bool(receiver.of("disk_low"))

        await eventually(alerted, timeout=20)
        [alert] = receiver.of("disk_low")
        assert alert["subject"]["free_percent"] < 50.0
        filler.unlink()

        async def resolved() -> bool:
            return bool(receiver.of("disk_low", "resolved"))

        await eventually(resolved, timeout=20)
        assert len(receiver.of("disk_low")) == 1 and receiver.bad == []
        [back] = receiver.of("disk_low", "resolved")
        assert re.fullmatch(r"disk space back to \d+\.\d% free in the data dir",
                            back["message"])
    finally:
        filler.unlink(missing_ok=True)
        await a.close()


async def test_a_spike_of_invalid_input_is_alerted(tmp_path: Path, receiver: Receiver) -> None:
    a = await start(make_node_dir(tmp_path, "Athens", settings=alert_settings(
        receiver.url, invalid_rate_per_minute=3)))
    try:
        good = sign_record(a.node.key, feed="air", seq=1, prev=None, time_ms=a.node.now_ms(),
                           type="org.example.T", data={"n": 1})
        await asyncio.sleep(0.5)  # the alerts task took its first count
        out = await a.node.ingest([good.envelope[:-1] + bytes([good.envelope[-1] ^ 1]),
                                   b"\x93garbage"])
        assert len(out.rejected) == 2
        await asyncio.sleep(0.5)
        assert receiver.of("invalid_spike") == []  # 2 in the last minute: not more than 3
        out = await a.node.ingest([b"\xc1", good.envelope[:-2]])
        assert len(out.rejected) == 2

        async def alerted() -> bool:
            return bool(receiver.of("invalid_spike"))

        await eventually(alerted, timeout=20)
        [alert] = receiver.of("invalid_spike")
        assert alert["subject"]["count"] == 4 and alert["subject"]["threshold"] == 3
        assert receiver.bad == []
    finally:
        await a.close()


async def test_an_own_feed_late_against_its_cadence_is_alerted_then_resolved(
        tmp_path: Path, receiver: Receiver) -> None:
    """Feed ``air`` declares a 1 s cadence, ``slow`` an hour's; both get one record. Once
    ``air`` has signed nothing new for longer than its cadence, the receiver gets one
    ``feed_late`` alert for it, signed by this node (checked here against the node id
    the receiver trusts, and refused when a byte of it changes); ``slow`` is never
    alerted. A new record on ``air`` resolves it."""
    d = make_node_dir(tmp_path, "Athens", settings=alert_settings(receiver.url))
    with open(d / "node.toml", "a") as f:
        f.write("\n[feeds.air]\ncadence_seconds = 1\n\n[feeds.slow]\ncadence_seconds = 3600\n")
    a = await start(d)
    try:
        await a.node.publish("air", "org.example.T", [{"n": 1}])
        await a.node.publish("slow", "org.example.T", [{"n": 1}])

        async def alerted() -> bool:
            return bool(receiver.of("feed_late"))

        await eventually(alerted, timeout=30)
        [alert] = receiver.of("feed_late")
        assert alert["node"] == a.node.node_id and alert["severity"] == "warning"
        assert alert["id"] == "feed_late:air"
        assert alert["subject"]["feed"] == "air" and alert["subject"]["cadence_s"] == 1
        assert alert["subject"]["state"] in ("silent", "dead")
        # The receiver's view: the raw request verifies against THIS node's id ...
        body, header, log = receiver.raw[receiver.alerts.index(alert)]
        assert verify_alert(body, header, expected_node=a.node.node_id,
                            key_log=log)["id"] == alert["id"]
        # ... and not against another node's, nor with one byte changed.
        with pytest.raises(SignatureError):
            verify_alert(body, header, expected_node=node_id(SigningKey.generate().public_key),
                         key_log=log)
        with pytest.raises(SignatureError):
            verify_alert(body.replace(b'"air"', b'"aiR"'), header,
                         expected_node=a.node.node_id, key_log=log)
        await asyncio.sleep(1.0)  # ten more checks: still late, not alerted again
        assert len(receiver.of("feed_late")) == 1

        await a.node.publish("air", "org.example.T", [{"n": 2}])

        async def resolved() -> bool:
            return bool(receiver.of("feed_late", "resolved"))

        await eventually(resolved, timeout=30)
        assert receiver.of("feed_late", "resolved")[0]["id"] == "feed_late:air"
        # The hour-cadence feed, published once like the other, was never late.
        assert all(x["subject"]["feed"] == "air" for x in receiver.alerts
                   if x["alert"] == "feed_late")
        assert receiver.bad == []
    finally:
        await a.close()


async def test_a_split_view_of_a_held_feed_is_alerted(tmp_path: Path,
                                                      receiver: Receiver) -> None:
    """A partner's origin shows this node a checkpoint of a size it already signed
    with another root: one critical ``split_view`` alert naming the origin."""
    a = await start(make_node_dir(tmp_path, "Athens"))
    b = await start(make_node_dir(tmp_path, "Berlin", settings=alert_settings(receiver.url)))
    try:
        await show_split_view(a, b)

        async def alerted() -> bool:
            return bool(receiver.of("split_view"))

        await eventually(alerted, timeout=20)
        [alert] = receiver.of("split_view")
        body, header, log = receiver.raw[receiver.alerts.index(alert)]
        verify_alert(body, header, expected_node=b.node.node_id, key_log=log)
        assert alert["severity"] == "critical" and alert["node"] == b.node.node_id
        assert alert["subject"] == {"origin": a.node.node_id, "feed": "w", "seq": 4}
        assert receiver.of("fork") == [] and receiver.bad == []
    finally:
        await b.close()
        await a.close()
