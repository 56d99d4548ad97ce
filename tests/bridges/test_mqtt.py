"""MQTT in, end to end: a real Mosquitto broker, real ``citynode run`` processes.

Every message the test publishes must appear exactly once as a record (none lost, none
twice) whatever happens between: the node killed with SIGKILL mid-stream, the broker
restarted; and every message that cannot be a record is a dead letter, visible in the
CLI and the metrics, without stopping the bridge.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from citynode.bridges.mosquitto import Broker, bridge_toml, reading, wait_for
from citynode.cluster import Cluster, LocalNode

pytestmark = pytest.mark.integration


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "citynode", *args], capture_output=True,
                          text=True, timeout=60)


@pytest.fixture
def broker(tmp_path: Path) -> Any:
    b = Broker(tmp_path)
    b.start()
    try:
        yield b
    finally:
        b.stop()


def bridged_node(cluster: Cluster, broker_port: int, extra: str = "") -> LocalNode:
    (n,) = cluster.create(["Jakarta"])
    with open(n.dir / "node.toml", "a") as f:
        f.write(bridge_toml(broker_port, extra=extra))
    return n


async def records(n: LocalNode) -> list[dict[str, Any]]:
    """Every record of the node's air-quality feed."""
    out: list[dict[str, Any]] = []
    after = 0
    while True:
        page = await n.api("GET", f"/v1/records?feed=air-quality&limit=1000&after={after}")
        out += page["records"]
        if page["next"] is None:
            return out
        after = page["next"]


async def metric(n: LocalNode, name: str) -> float:
    text = (await n.api("GET", "/metrics", raw=True)).decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def connected(n: LocalNode) -> bool:
    return await metric(n, "citynode_bridge_connected") == 1


def readings_of(recs: list[dict[str, Any]]) -> Counter[str]:
    return Counter(r["data"]["name"] for r in recs)


@pytest.mark.slow
async def test_messages_become_records_once_and_bad_ones_are_dead_letters(
        cluster: Cluster, broker: Broker) -> None:
    n = bridged_node(cluster, broker.port)
    await cluster.start()
    await wait_for(lambda: connected(n), what="bridge connected")

    big = b'{"values": {"pm25": 1}, "pad": "' + b"x" * (10 * 1024 * 1024) + b'"}'
    await broker.publish([
        *[(f"city/air/st{i % 3}/reading", reading(i)) for i in range(5)],
        ("city/air/st0/reading", b"{not json"),                      # malformed JSON
        ("city/air/st0/reading", reading(90, values={"pm25": "high", "no2": 1.0})),  # wrong type
        ("city/air/st0/reading", big),                               # 10 MB
        ("city/air/st0/reading", json.dumps([1, 2]).encode()),       # not an object
        ("city/air/st1/reading", reading(91, values={})),             # field missing
        *[(f"city/air/st{i % 3}/reading", reading(i)) for i in range(5, 10)],
        ("city/air/st0/reading", reading(3)),                 # the same message again
    ])

    async def all_in() -> bool:
        return len(await records(n)) >= 10 and await metric(
            n, "citynode_bridge_messages_dead_lettered_total") >= 5
    await wait_for(all_in, what="10 records and 5 dead letters")
    await asyncio.sleep(0.5)  # anything extra would show now
    recs = await records(n)
    assert readings_of(recs) == Counter(f"reading-{i}" for i in range(10))
    one = next(r for r in recs if r["data"]["name"] == "reading-4")
    assert one["type"] == "AirQualityObserved" and one["subject"] == "station-st1"
    assert one["data"]["pm25"] == 14.0 and one["data"]["location"]["type"] == "Point"

    assert await metric(n, "citynode_bridge_messages_received_total") == 16
    assert await metric(n, "citynode_bridge_messages_published_total") == 10
    assert await metric(n, "citynode_bridge_messages_duplicate_total") == 1
    text = (await n.api("GET", "/metrics", raw=True)).decode()
    for reason in ("not_json", "bad_value", "too_large", "not_object", "missing_field"):
        assert (f'citynode_bridge_messages_dead_lettered_total{{bridge="air",'
                f'reason="{reason}"}} 1.0') in text

    # The CLI shows them while the node runs ...
    r = cli("bridges", "-d", str(n.dir), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    (b,) = out["bridges"]
    assert b["connected"] is True and b["dead_letters_held"] == 5 and b["published"] == 10
    letters = {d["reason"]: d for d in out["dead_letters"]}
    assert set(letters) == {"not_json", "bad_value", "too_large", "not_object",
                            "missing_field"}
    assert letters["too_large"]["size"] == len(big)
    assert len(letters["too_large"]["excerpt_b64"]) <= 4 * 1024 // 3 + 4  # bounded
    assert letters["not_json"]["excerpt"] == "{not json"
    assert "pm25" in letters["bad_value"]["detail"]

    # ... and after it stopped (the same command, on the stopped node).
    await n.close()
    assert n.stop() == 0
    r = cli("bridges", "-d", str(n.dir))
    assert r.returncode == 0, r.stderr
    assert "node not running" in r.stdout and "too_large" in r.stdout


@pytest.mark.slow
async def test_kill_9_mid_stream_loses_nothing_and_doubles_nothing(
        cluster: Cluster, broker: Broker) -> None:
    n = bridged_node(cluster, broker.port)
    await cluster.start()
    await wait_for(lambda: connected(n), what="bridge connected")
    total = 600

    async def stream() -> None:
        for start in range(0, total, 50):
            await broker.publish([(f"city/air/st{i % 7}/reading", reading(i))
                                  for i in range(start, start + 50)])

    sender = asyncio.ensure_future(stream())
    for seen in (100, 250):
        await wait_for(lambda seen=seen: _at_least(n, seen), what=f"{seen} records")
        n.kill()  # mid-stream: the broker keeps the rest for the bridge's session
        await cluster.start([n])
    await sender
    await wait_for(lambda: _at_least(n, total), timeout=60, what=f"{total} records")
    await asyncio.sleep(1)
    counts = readings_of(await records(n))
    assert counts == Counter(f"reading-{i}" for i in range(total))


@pytest.mark.slow
async def test_a_broker_restart_loses_nothing_and_doubles_nothing(
        cluster: Cluster, broker: Broker) -> None:
    n = bridged_node(cluster, broker.port, extra="backoff_max_seconds = 1")
    await cluster.start()
    await wait_for(lambda: connected(n), what="bridge connected")
    await broker.publish([(f"city/air/st{i % 2}/reading", reading(i)) for i in range(50)])
    await wait_for(lambda: _at_least(n, 50), what="50 records")

    broker.stop()
    await wait_for(lambda: _not(connected(n)), what="bridge sees the broker gone")
    r = cli("bridges", "-d", str(n.dir), "--json")
    (b,) = json.loads(r.stdout)["bridges"]
    assert b["connected"] is False and b["last_error"]
    broker.start()
    await wait_for(lambda: connected(n), what="bridge reconnected")
    await broker.publish([(f"city/air/st{i % 2}/reading", reading(i)) for i in range(50, 100)])
    await wait_for(lambda: _at_least(n, 100), what="100 records")
    await asyncio.sleep(0.5)
    assert readings_of(await records(n)) == Counter(f"reading-{i}" for i in range(100))
    r = cli("bridges", "-d", str(n.dir), "--json")
    (b,) = json.loads(r.stdout)["bridges"]
    assert b["connected"] is True and b["connects"] == 2


async def _at_least(n: LocalNode, count: int) -> bool:
    return len(await records(n)) >= count


async def _not(aw: Any) -> bool:
    return not await aw


async def test_tls_with_a_client_certificate_and_a_password(
        cluster: Cluster, tmp_path: Path) -> None:
    from citynode.identity import make_tls_certificate

    certs = tmp_path / "certs"
    certs.mkdir()
    made = {}
    for name, host in (("broker", "127.0.0.1"), ("bridge", "localhost"), ("other", "127.0.0.1")):
        cert, key = make_tls_certificate(name, [host])
        (certs / f"{name}.pem").write_bytes(cert)
        (certs / f"{name}.key").write_bytes(key)
        made[name] = certs / f"{name}.pem"
    passwords = certs / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwords), "city", "s3cret"],
                   check=True, capture_output=True)
    broker = Broker(tmp_path, tls=[
        f"certfile {certs / 'broker.pem'}", f"keyfile {certs / 'broker.key'}",
        f"cafile {certs / 'bridge.pem'}",  # the clients it trusts
        "require_certificate true", "allow_anonymous false", f"password_file {passwords}"])
    broker.start()
    try:
        (n,) = cluster.create(["Jakarta"])
        (n.dir / "mqtt-password").write_text("s3cret\n")
        for name in ("broker.pem", "bridge.pem", "bridge.key", "other.pem"):
            (n.dir / name).write_bytes((certs / name).read_bytes())
        with open(n.dir / "node.toml", "a") as f:
            f.write(bridge_toml(broker.tls_port, extra=(
                'ca_file = "broker.pem"\ncert_file = "bridge.pem"\nkey_file = "bridge.key"\n'
                'username = "city"\npassword_file = "mqtt-password"')))
            # The same broker, but a CA that did not sign its certificate: never connects.
            f.write(bridge_toml(broker.tls_port, name="wrongca", extra=(
                'ca_file = "other.pem"\ncert_file = "bridge.pem"\nkey_file = "bridge.key"\n'
                'username = "city"\npassword_file = "mqtt-password"')).replace(
                    "city/air/+/reading", "nowhere/+/x"))
        await cluster.start()
        await wait_for(lambda: _up(n, "air"), what="TLS bridge connected")
        # Published over the plain listener; delivered to the bridge over TLS.
        await broker.publish([(f"city/air/st{i}/reading", reading(i)) for i in range(5)])
        await wait_for(lambda: _at_least(n, 5), what="5 records")
        out = json.loads(cli("bridges", "-d", str(n.dir), "--json").stdout)
        by_name = {b["name"]: b for b in out["bridges"]}
        assert by_name["air"]["tls"] is True and by_name["air"]["published"] == 5
        wrong = by_name["wrongca"]
        assert wrong["connected"] is False and wrong["connects"] == 0
        assert "CERTIFICATE_VERIFY_FAILED" in (wrong["last_error"] or "")
    finally:
        broker.stop()


async def _up(n: LocalNode, bridge: str) -> bool:
    text = (await n.api("GET", "/metrics", raw=True)).decode()
    return f'citynode_bridge_connected{{bridge="{bridge}"}} 1.0' in text


async def test_a_password_file_missing_at_start_is_said_at_once(tmp_path: Path) -> None:
    """Not a node that runs and reconnects for ever with a password it cannot read: the
    start fails with the bridge's name and the file (``citynode run`` prints it)."""
    from citynode.errors import ConfigError
    from citynode.node import Node
    from tests.conftest import make_node_dir

    d = make_node_dir(tmp_path, "Jakarta")
    with open(d / "node.toml", "a") as f:
        f.write(bridge_toml(1, extra='username = "citynode"\npassword_file = "mqtt-pw"'))
    n = Node.load(d)
    try:
        with pytest.raises(ConfigError, match=r"bridge air: .*mqtt-pw"):
            await n.start()
        assert not n.ready
    finally:
        await n.stop()
